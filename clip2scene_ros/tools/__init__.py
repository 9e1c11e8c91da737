"""Tools over the node and the trainer: replay, replay evaluation, soak, the transport benchmark
and the demo. They sit above both (they may start the node and run the trainer); nothing in the
core, the node or the trainer imports them."""
