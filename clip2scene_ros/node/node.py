"""``clip2scene_node``: a LiDAR cloud (and synced camera images) in, a labelled cloud out.

DESIGN rule 3, a thin node: it declares the parameters, builds the shared
:class:`~clip2scene_ros.node.pipeline.Pipeline` (subscriptions, publishers, message conversion,
diagnostics, shared with ``clip2scene_lifecycle_node``) and opens it at once. What happens to a
frame between its callback and its publish is the ROS-free
:class:`~clip2scene_ros.runtime.frame_processor.FrameProcessor`.
"""

from __future__ import annotations

from .starting import exit_on_stop_signals_while_starting

# first: a stop while the modules below load (seconds) is an exit with status 0, no traceback
exit_on_stop_signals_while_starting(__name__)

from typing import Any  # noqa: E402

from rclpy.node import Node  # noqa: E402

from ..health import Health  # noqa: E402
from ..node_params import NodeParams  # noqa: E402
from ..runtime.predictor import Predictor  # noqa: E402
from .pipeline import (  # noqa: E402
    Pipeline,
    PredictorFactory,
    declare_parameters,
    read_parameters,
    run_node,
    vocabulary_callback,
)


class Clip2SceneNode(Node):
    """The segmentation node. ``predictor_factory`` builds the Predictor from the parameters."""

    def __init__(self, predictor_factory: PredictorFactory | None = None,
                 **node_kwargs: Any) -> None:
        # set first: a refused start-up (a parameter of the wrong type) destroys the node half-made
        self.pipeline: Pipeline | None = None
        super().__init__("clip2scene_node", **node_kwargs)
        # only the vocabulary changes at run time; the rest needs a restart, so they are frozen
        declare_parameters(self, frozen=True)
        self.pipeline = Pipeline(self, read_parameters(self), predictor_factory)
        self.add_on_set_parameters_callback(vocabulary_callback(lambda: self.pipeline))
        self.pipeline.open_outputs(self.create_publisher)
        self.pipeline.open_inputs()

    @property
    def _running(self) -> Pipeline:
        if self.pipeline is None:
            raise RuntimeError("the node was destroyed")
        return self.pipeline

    @property
    def params(self) -> NodeParams:
        return self._running.params

    @property
    def predictor(self) -> Predictor:
        return self._running.predictor

    @property
    def health(self) -> Health:
        return self._running.health

    @property
    def output(self) -> Any:
        return self._running.output

    def destroy_node(self) -> None:
        if self.pipeline is not None:  # None when start-up was refused
            self.pipeline.close()
        super().destroy_node()


def _build_only(node: Clip2SceneNode) -> int | None:
    if not node.params.build_only:
        return None
    node.get_logger().info(f"build_only: {node.predictor.backend.describe()} ready")
    return 0  # the Predictor built (or loaded) the engine: done


def main(args: list[str] | None = None) -> int:
    return run_node(Clip2SceneNode, _build_only, args, "clip2scene_node")


if __name__ == "__main__":
    raise SystemExit(main())
