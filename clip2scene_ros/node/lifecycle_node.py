"""``clip2scene_lifecycle_node``: the segmentation node as a managed (lifecycle) node.

The expensive and failure-prone steps move out of the constructor into transitions a launch
system or an operator drives (reference §3.4: no anchor does this; the engine belongs in
``on_configure``):

* **configure**: read and validate the parameters, load the bundle, build the Predictor (and
  the TensorRT engine where chosen), MaskCLIP for fusion and the calibration. A bad parameter or
  bundle fails the transition with the message (the node stays unconfigured, ready for another
  try after the parameters are fixed; they stay writable for that).
* **activate**: create the (lifecycle) publishers, enable them, then subscribe and start the
  worker.
* **deactivate**: stop processing: no subscriptions, no worker, publishers gone.
* **cleanup**: drop the model (GPU memory is released).
* **shutdown**: whatever state it is in, stop and drop everything.

The ROS side is :class:`~clip2scene_ros.node.pipeline.Pipeline`, shared with
``clip2scene_node``; the processing is its ROS-free
:class:`~clip2scene_ros.runtime.frame_processor.FrameProcessor`.
"""

from __future__ import annotations

from .starting import exit_on_stop_signals_while_starting

# first: a stop while the modules below load (seconds) is an exit with status 0, no traceback
exit_on_stop_signals_while_starting(__name__)

import gc  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn  # noqa: E402

from ..errors import STARTUP_ERRORS  # noqa: E402
from .pipeline import (  # noqa: E402
    Pipeline,
    PredictorFactory,
    declare_parameters,
    read_parameters,
    run_node,
    vocabulary_callback,
)


class Clip2SceneLifecycleNode(LifecycleNode):
    """The managed segmentation node; ``predictor_factory`` as in ``Clip2SceneNode``."""

    def __init__(self, predictor_factory: PredictorFactory | None = None,
                 node_name: str = "clip2scene_node", **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self.predictor_factory = predictor_factory
        self.pipeline: Pipeline | None = None
        self.active = False
        # writable: each configure reads them afresh
        declare_parameters(self, frozen=False)
        self.add_on_set_parameters_callback(vocabulary_callback(lambda: self.pipeline))

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            params = read_parameters(self)
            self.pipeline = Pipeline(self, params, self.predictor_factory)
        except STARTUP_ERRORS as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"configured: {self.pipeline.predictor.backend.describe()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        pipeline = self.pipeline
        if pipeline is None:
            return TransitionCallbackReturn.FAILURE
        pipeline.open_outputs(self.create_lifecycle_publisher)
        # enables the lifecycle publishers before any input can reach the worker
        result = super().on_activate(state)
        if result != TransitionCallbackReturn.SUCCESS:
            pipeline.close(self.destroy_lifecycle_publisher)
            return result
        pipeline.open_inputs()
        self.active = True
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_deactivate(state)  # publishers go quiet first
        self._close()
        return result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # an exception in a transition: drop everything, back to unconfigured
        self._drop()
        return TransitionCallbackReturn.SUCCESS

    def _close(self) -> None:
        if self.pipeline is not None and self.active:
            self.pipeline.close(self.destroy_lifecycle_publisher)
        self.active = False

    def _drop(self) -> None:
        self._close()
        if self.pipeline is not None:
            device = self.pipeline.predictor.device
            self.pipeline = None
            gc.collect()  # the Predictor and MaskCLIP hold the model's (GPU) memory
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def destroy_node(self) -> None:
        self._drop()
        super().destroy_node()


def _build_only(node: Clip2SceneLifecycleNode) -> int | None:
    if not node.get_parameter("build_only").value:
        return None
    return 0 if node.trigger_configure() == TransitionCallbackReturn.SUCCESS else 2


def main(args: list[str] | None = None) -> int:
    """Spin the node unconfigured; with ``build_only`` configure (build the engine) and exit."""
    return run_node(Clip2SceneLifecycleNode, _build_only, args, "clip2scene_lifecycle_node")


if __name__ == "__main__":
    raise SystemExit(main())
