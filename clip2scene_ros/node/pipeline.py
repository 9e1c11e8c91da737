"""The ROS side both nodes share: parameters, subscriptions, camera sync, publishers, diagnostics.

``Clip2SceneNode`` builds a :class:`Pipeline` and opens it in its constructor;
``Clip2SceneLifecycleNode`` builds it in ``on_configure`` and opens and closes it in
``on_activate`` / ``on_deactivate``. What needs rclpy lives here once: parameters, QoS,
subscriptions and publishers, message conversion (through :mod:`clip2scene_ros.codecs`), tf2
lookups, the worker thread, diagnostics and the marker outputs. Everything between a decoded
message and an array to publish (sweep history, pose gating, camera views, fusion, colouring,
the overlay, the PointCLIP object pass) is the ROS-free
:class:`~clip2scene_ros.runtime.frame_processor.FrameProcessor`, called once per frame.

Flow: clouds and images go into a :class:`CameraSync` as they arrive (images are decoded only
once they are paired, so unpaired frames cost nothing); each complete set (a cloud with the
nearest image per camera, or LiDAR-only after ``camera_timeout_s``) goes to a one-slot mailbox
that a worker thread empties. A set arriving while the previous one is still being labelled
replaces the waiting one and is counted as dropped, so the node never lags behind the sensor.

Why one module of ~650 lines: it is the whole rclpy surface of both executables (parameter
declaration, the :class:`Pipeline`'s entities, callbacks and worker, and :func:`run_node`'s
init/spin/shutdown); each part is short and none holds processing logic.
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64
from visualization_msgs.msg import Marker, MarkerArray

from ..bag.sync import SyncedSet
from ..codecs import (
    camera_info_to_model,
    decode_pointcloud2,
    encode_image,
    encode_labelled_cloud,
    image_to_rgb8,
)
from ..codecs.messages import RclpyFactory, stamp_to_ns
from ..config import load_config
from ..errors import STARTUP_ERRORS, ConfigError, MessageError
from ..geometry.transforms import transform_from_msg
from ..health import Health
from ..node_params import RUNTIME_PARAMETERS, NodeParams, description
from ..runtime import malloc
from ..runtime.camera_views import CameraImage
from ..runtime.frame_processor import (
    FrameProcessor,
    LabelledFrame,
    PredictorFactory,
    predictor_from_params,
)
from ..runtime.predictor import Predictor
from .camera_sync import CameraSync
from .objects import ObjectsOutput

__all__ = ["Pipeline", "PredictorFactory", "predictor_from_params", "qos", "run_node"]

LEVELS = {"OK": DiagnosticStatus.OK, "WARN": DiagnosticStatus.WARN,
          "ERROR": DiagnosticStatus.ERROR}
#: How long a tf2 lookup at the cloud's stamp may block the worker (Autoware's fusion: 0.01 s).
TF_TIMEOUT_S = 0.01


def qos(reliability: str, depth: int, latched: bool = False) -> QoSProfile:
    return QoSProfile(
        depth=depth,
        reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                     else ReliabilityPolicy.RELIABLE),
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


# --- parameters -----------------------------------------------------------------------------
def declare_parameters(node: Node, *, frozen: bool = True) -> None:
    """Declare every ``NodeParams`` field with its description (the field's metadata).

    ``frozen``: read-only after start-up except the vocabulary (the plain node, which reads them
    once). The lifecycle node leaves them writable: it reads them again at each configure.
    """
    defaults = NodeParams()
    for f in fields(NodeParams):
        default = getattr(defaults, f.name)
        runtime = f.name in RUNTIME_PARAMETERS
        text = description(f.name)
        if not frozen and not runtime:
            text += " (applied at the next configure)"
        read_only = frozen and not runtime
        if isinstance(default, list):
            declare_string_array(node, f.name, text, read_only)
        else:
            node.declare_parameter(f.name, default,
                                   ParameterDescriptor(description=text, read_only=read_only))


def declare_string_array(node: Node, name: str, description: str, read_only: bool) -> None:
    """Declare ``name`` as a statically typed string array whose default is empty.

    rclpy infers an empty list's type as a byte array, and a parameter declared by type alone
    has no value: ``get_parameters`` (``ros2 param get`` / ``dump``) then returns nothing for
    it, nor for any request naming it. So the type is declared first (a value given at start-up
    is taken as is) and, when none was given, an explicitly typed empty string array is set;
    the descriptor is made read-only only afterwards.
    """
    string_array = ParameterType.PARAMETER_STRING_ARRAY
    declared: Parameter = node.declare_parameter(name, Parameter.Type.STRING_ARRAY,
                                      ParameterDescriptor(description=description))
    if declared.type_ == Parameter.Type.NOT_SET:
        (result,) = node.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])
        if not result.successful:
            raise ConfigError(name, f"could not be set to an empty list: {result.reason}")
    if read_only:
        node.set_descriptor(name, ParameterDescriptor(description=description, type=string_array,
                                                      read_only=True))


def read_parameters(node: Node) -> NodeParams:
    """The declared parameters' current values, validated (``ConfigError`` names the bad one)."""
    defaults = NodeParams()
    values: dict[str, Any] = {}
    for f in fields(NodeParams):
        if isinstance(getattr(defaults, f.name), list):
            values[f.name] = list(node.get_parameter(f.name).value or [])
        else:
            values[f.name] = node.get_parameter(f.name).value
    return load_config(NodeParams, values)


def freeze_startup_objects() -> None:
    """Take everything alive now (torch, the model, CLIP: hundreds of thousands of objects) out
    of the cyclic garbage collector's walk.

    Otherwise every full collection walks them all, mid-frame: 340 ms measured with PointCLIP's
    CLIP loaded, a frame's whole object budget. A frame's own objects hold no reference cycles
    (see :mod:`clip2scene_ros.sparse.kmap`), so reference counting still frees them at once;
    only cycles among the frozen objects would outlive them, until :meth:`Pipeline.close`
    unfreezes.
    """
    gc.collect()
    gc.freeze()


def vocabulary_callback(pipeline: Callable[[], Pipeline | None]
                        ) -> Callable[[list[Parameter]], SetParametersResult]:
    """``on_set_parameters`` handler swapping the vocabulary of the current pipeline, if any.

    Without a pipeline (a lifecycle node not configured yet) the value is simply accepted; it
    is read at the next configure.
    """

    def on_set(params: list[Parameter]) -> SetParametersResult:
        current = pipeline()
        for param in params:
            if param.name == "vocabulary" and param.value and current is not None:
                try:
                    current.set_vocabulary(str(param.value))
                except (ConfigError, FileNotFoundError, ValueError) as exc:
                    current._bad("vocabulary", str(exc), time.monotonic())
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    return on_set


# --- tf2 ----------------------------------------------------------------------------------
def tf2_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


# --- the pipeline ---------------------------------------------------------------------------
class Pipeline:
    """Parameters → :class:`FrameProcessor`; callbacks → codec calls; results → messages.

    Building it is the "configure" step (the processor: bundle, Predictor, TensorRT engine,
    calibration, MaskCLIP, PointCLIP); :meth:`open_outputs` / :meth:`open_inputs` create the ROS
    entities and start the worker; :meth:`close` stops the worker and destroys them again.
    """

    def __init__(self, node: Node, params: NodeParams,
                 predictor_factory: PredictorFactory | None = None) -> None:
        self.node = node
        self.log = node.get_logger()
        self.processor = FrameProcessor(params, self.log, predictor_factory,
                                        tf_available=tf2_available())
        params = self.processor.params  # paths made absolute
        self.params = params
        # ROS entities: created by open_outputs / open_inputs, None until then
        self.output: Any = None
        self.diagnostics: Any = None
        self.legend: Any = None
        self.overlay: Any = None
        self.latency: dict[str, Any] = {}
        self.factory = RclpyFactory()
        self._legend_dirty = True
        self._legend_lock = threading.Lock()
        self.objects = (ObjectsOutput(params, self.processor)
                        if self.processor.objects is not None else None)
        synced = [] if self.processor.unusable else [c.name for c in self.processor.cameras]
        self.sync: CameraSync[Any] = CameraSync(synced, params.sync_slop_s,
                                                params.camera_timeout_s,
                                                queue_size=max(2, params.input_depth))
        self.processor.jump_forward_ns = self.sync.jump_forward_ns
        self._sync_dropped = 0
        self._jumps_seen: Counter[str] = Counter()  # sync.jumps already counted in health
        self._slot: SyncedSet[Any] | None = None
        self._lock = threading.Lock()  # the mailbox
        self._sync_lock = threading.Lock()  # the sync (callbacks and the worker's poll)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._publishers: list[Any] = []
        self._subscriptions: list[Any] = []
        self._timers: list[Any] = []
        self._tf_buffer: Any = None
        self._tf_listener: Any = None

    # --- the processor's state, as the node reports it ----------------------------------------
    @property
    def predictor(self) -> Predictor:
        return self.processor.predictor

    @property
    def health(self) -> Health:
        return self.processor.health

    @property
    def work(self) -> Counter[str]:
        """Optional outputs computed, by output (fusion, overlay, objects, legend)."""
        return self.processor.work

    @property
    def paths(self) -> dict[str, str]:
        return self.processor.paths

    @property
    def cameras(self) -> list[Any]:
        return self.processor.cameras

    @property
    def camera_models(self) -> dict[str, Any]:
        return self.processor.camera_models

    @property
    def camera_state(self) -> dict[str, str]:
        return self.processor.camera_state

    @property
    def unusable(self) -> str | None:
        return self.processor.unusable

    @property
    def sweep_state(self) -> str:
        return self.processor.sweep_state

    @property
    def maskclip(self) -> Any:
        return self.processor.maskclip

    def set_vocabulary(self, path: str) -> None:
        """Label with the text bank at ``path`` from the next frame (ConfigError if unusable);
        the legend is drawn again."""
        self.processor.set_vocabulary(path)
        self._legend_dirty = True
        self._maybe_publish_legend()

    # --- ROS entities -------------------------------------------------------------------------
    def open_outputs(self, create_publisher: Callable[..., Any]) -> None:
        """Create the publishers (``create_publisher``: the node's, or its lifecycle one)."""
        p = self.params

        def make(*args: Any) -> Any:
            pub = create_publisher(*args)
            self._publishers.append(pub)
            return pub

        self.output = make(PointCloud2, p.output_topic, qos(p.output_reliability, p.output_depth))
        self.diagnostics = make(DiagnosticArray, "/diagnostics", 10)
        self.latency = {stage: make(Float64, f"~/debug/{stage}_ms", 1)
                        for stage in ("preprocess", "inference", "postprocess", "total",
                                      "pipeline_latency")} if p.publish_latency else {}
        # latched: drawn once for the first subscriber, kept for later ones by the middleware
        self.legend = make(MarkerArray, "~/output/legend", qos("reliable", 1, latched=True)) \
            if p.publish_legend else None
        self.overlay = make(Image, "~/output/overlay", qos(p.output_reliability, 1)) \
            if p.publish_overlay else None
        if self.objects is not None:
            self.objects.open(self.node, make(MarkerArray, p.objects_topic,
                                              qos(p.output_reliability, 1)))
        self._legend_dirty = True
        self._timers.append(self.node.create_timer(p.diagnostics_period_s, self._on_timer))

    def open_inputs(self) -> None:
        """Subscribe to the LiDAR, cameras and CameraInfo, start tf2 and the worker."""
        p = self.params
        freeze_startup_objects()
        sensor = qos(p.input_reliability, p.input_depth)
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="clip2scene-worker", daemon=True)
        self._worker.start()
        subscribe = self.node.create_subscription
        self._subscriptions.append(subscribe(PointCloud2, p.lidar_topic, self.on_cloud, sensor))
        if not self.unusable:
            for cam in self.cameras:
                kind = CompressedImage if cam.compressed else Image
                self._subscriptions += [
                    subscribe(kind, cam.image_topic, partial(self.on_image, cam.name), sensor),
                    subscribe(CameraInfo, cam.info_topic, partial(self.on_camera_info, cam.name),
                              sensor)]
        if self.processor.wants_lookup:
            import tf2_ros

            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self.node)
            self.processor.lookup = self._tf_lookup
        sources = ", ".join(f"{c.image_topic} ({c.name})" for c in self.cameras) or "no cameras"
        self.log.info(
            f"labelling {p.lidar_topic} -> {self.output.topic_name} with "
            f"{len(self.predictor.vocabulary.classes)} classes ({self.predictor.vocabulary.name}),"
            f" backend {self.predictor.backend.describe()}; cameras: {sources}; sync: "
            f"{self.sync.engine_name}; fusion {'on' if self.maskclip is not None else 'off'}")

    def close(self, destroy_publisher: Callable[[Any], Any] | None = None) -> None:
        """Stop the worker and destroy what ``open_*`` created (idempotent)."""
        gc.unfreeze()  # what is dropped from here on may hold cycles: the collector's again
        if self._worker is not None:
            self._stop.set()
            self._wake.set()
            self._worker.join(timeout=5.0)
            self._worker = None
        for sub in self._subscriptions:
            self.node.destroy_subscription(sub)
        for timer in self._timers:
            self.node.destroy_timer(timer)
        if self.objects is not None:
            self.objects.close(self.node)
        if self._tf_listener is not None:
            self._tf_listener.unregister()
        destroy = destroy_publisher or self.node.destroy_publisher
        for pub in self._publishers:
            destroy(pub)
        self._subscriptions, self._timers, self._publishers = [], [], []
        self._tf_buffer = self._tf_listener = None
        self.processor.lookup = None
        self.output = self.diagnostics = self.legend = self.overlay = None
        self.latency = {}
        with self._sync_lock:
            self.sync.reset()  # a reactivated node starts from fresh messages
        with self._lock:
            self._slot = None
        self.processor.reset()

    # --- callbacks ----------------------------------------------------------------------------
    def on_cloud(self, msg: PointCloud2) -> None:
        now = time.monotonic()
        self.health.frame("received", now)
        stamp = stamp_to_ns(msg.header.stamp)
        if stamp <= 0:
            self._bad("PointCloud2", "PointCloud2.header.stamp: is zero or negative", now)
            return
        with self._sync_lock:
            sets = self.sync.add_cloud(stamp, msg, time.monotonic_ns())
            self._count_jumps(now)
        self._deliver(sets)

    def on_image(self, camera: str, msg: Image | CompressedImage) -> None:
        stamp = stamp_to_ns(msg.header.stamp)
        if stamp <= 0:
            kind = type(msg).__name__
            self._bad(kind, f"{kind}.header.stamp: is zero or negative", time.monotonic())
            return
        with self._sync_lock:
            sets = self.sync.add_image(camera, stamp, msg, time.monotonic_ns())
            self._count_jumps(time.monotonic())
        self._deliver(sets)

    def _count_jumps(self, now: float) -> None:
        """Count and log the stamp jumps the sync just reset on (``frames_clock_jump_*``)."""
        for direction, total in self.sync.jumps.items():
            new = total - self._jumps_seen[direction]
            self._jumps_seen[direction] = total
            for _ in range(new):
                self.health.frame(f"clock_jump_{direction}", now)
            if new:
                log, suppressed = self.health.should_log("clock_jump", now)
                if log:
                    more = f" ({suppressed} more since the last report)" if suppressed else ""
                    self.log.warning(f"{self.sync.last_jump}: camera sync and sweep history "
                                     f"reset{more}")

    def on_camera_info(self, camera: str, msg: CameraInfo) -> None:
        try:
            self.processor.rig.set_intrinsics(camera, camera_info_to_model(msg))
        except MessageError as exc:
            self._bad(exc.kind, str(exc), time.monotonic())

    def _deliver(self, sets: list[SyncedSet[Any]]) -> None:
        now = time.monotonic()
        with self._lock:
            dropped = self.sync.dropped - self._sync_dropped  # clouds the sync queue pushed out
            self._sync_dropped += dropped
            for _ in range(dropped):
                self.health.frame("dropped_stale", now)
            for item in sets:
                if self._slot is not None:
                    self.health.frame("dropped_stale", now)
                self._slot = item
        if sets:
            self._wake.set()

    def _work(self) -> None:
        # Waiting clouds time out only when polled: poll a few times per timeout.
        period = max(0.005, min(0.05, self.params.camera_timeout_s / 4)) if self.sync.cameras \
            else 0.1
        while not self._stop.is_set():
            self._wake.wait(timeout=period)
            if self._stop.is_set():
                break
            with self._sync_lock:
                timed_out = self.sync.poll(time.monotonic_ns())
            self._deliver(timed_out)
            with self._lock:
                item, self._slot = self._slot, None
                self._wake.clear()
            if item is None:
                continue
            try:
                self._process(item)
            except Exception as exc:  # one bad frame must not end the worker
                self.health.frame("failed", time.monotonic())
                log, suppressed = self.health.should_log("processing", time.monotonic())
                if log:
                    more = f" ({suppressed} more since the last report)" if suppressed else ""
                    self.log.error(f"labelling a frame failed: {type(exc).__name__}: {exc}"
                                   f"{more}")

    # --- processing ---------------------------------------------------------------------------
    def _process(self, synced: SyncedSet[Any]) -> None:
        output, overlay = self.output, self.overlay
        if output is None:
            return  # closed meanwhile
        want_cloud = output.get_subscription_count() > 0
        want_overlay = overlay is not None and overlay.get_subscription_count() > 0
        want_objects = self.objects is not None and self.objects.wanted()
        if not (want_cloud or want_overlay or want_objects):
            return  # nobody listens: no work
        msg = synced.reference
        now = time.monotonic()
        try:
            cloud = decode_pointcloud2(msg)
        except MessageError as exc:
            self._bad(exc.kind, str(exc), now)
            return
        images = {name: CameraImage(stamp, str(image.header.frame_id),
                                    partial(image_to_rgb8, image))
                  for name, (stamp, image) in synced.matches.items()}
        labelled = self.processor.label(cloud, stamp_to_ns(msg.header.stamp),
                                        msg.header.frame_id, images, cloud_out=want_cloud,
                                        overlay=want_overlay, now=now)
        if labelled is None:
            return  # a malformed cloud: counted
        self._publish(msg, labelled, want_objects)

    def _publish(self, msg: PointCloud2, labelled: LabelledFrame, want_objects: bool) -> None:
        """The frame's outputs: the cloud (input header), the overlay (its image's header), the
        objects (after the cloud: it waits for nothing), the legend; then the latencies."""
        cloud, output = labelled.cloud, self.output
        if cloud is not None and output is not None:
            out = encode_labelled_cloud(cloud.xyz, cloud.intensity, cloud.label, cloud.score,
                                        cloud.rgb, stamp_ns=0, frame_id="", factory=self.factory)
            out.header = msg.header  # the input header, exactly
            output.publish(out)
        drawn, overlay = labelled.overlay, self.overlay
        if drawn is not None and overlay is not None:
            overlay.publish(encode_image(drawn.image, "rgb8", stamp_ns=drawn.stamp_ns,
                                         frame_id=drawn.frame_id, factory=self.factory))
        if want_objects and self.objects is not None:
            self.objects.publish(msg.header, labelled)
        self._maybe_publish_legend()
        timings = labelled.timings_ms
        timings["pipeline_latency"] = (self.node.get_clock().now().nanoseconds
                                       - labelled.frame.stamp_ns) * 1e-6
        self.processor.done(timings, time.monotonic())
        for stage, ms in timings.items():
            if stage in self.latency:
                self.latency[stage].publish(Float64(data=float(ms)))

    def _tf_lookup(self, target: str, source: str, stamp_ns: int, latest: bool = True
                   ) -> np.ndarray | str:
        """The processor's transform lookup: ``target`` ← ``source`` at ``stamp_ns`` from tf2,
        or why not. ``latest`` falls back to the newest transform: right for a static rig
        (/tf_static is published once), wrong for an ego pose."""
        import tf2_ros
        from rclpy.duration import Duration
        from rclpy.time import Time

        try:
            t = self._tf_buffer.lookup_transform(target, source, Time(nanoseconds=stamp_ns),
                                                 timeout=Duration(seconds=TF_TIMEOUT_S))
        except tf2_ros.TransformException as exc:
            if not latest:
                return f"no tf2 transform {source} -> {target} ({exc})"
            try:
                t = self._tf_buffer.lookup_transform(target, source, Time())
            except tf2_ros.TransformException as exc:
                return f"no tf2 transform {source} -> {target} ({exc})"
        try:
            return transform_from_msg(t)
        except MessageError as exc:
            return f"tf2 transform {source} -> {target} is invalid ({exc})"

    def _bad(self, kind: str, text: str, now: float) -> None:
        self.processor.bad(kind, text, now)

    # --- outputs ------------------------------------------------------------------------------
    def _legend(self) -> MarkerArray:
        markers = MarkerArray()
        for i, (name, color) in enumerate(zip(self.predictor.vocabulary.classes,
                                              self.predictor.vocabulary.palette, strict=True)):
            m = Marker(ns="clip2scene_legend", id=i, type=Marker.TEXT_VIEW_FACING,
                       action=Marker.ADD, text=name)
            m.header.frame_id = "clip2scene_legend"
            m.pose.position.y = -0.6 * i
            m.pose.orientation.w = 1.0
            m.scale.z = 0.5
            m.color.r, m.color.g, m.color.b = (c / 255.0 for c in color)
            m.color.a = 1.0
            markers.markers.append(m)
        return markers

    def _maybe_publish_legend(self) -> None:
        """Publish the legend once someone listens (latched, so later listeners get it too)."""
        legend = self.legend
        if legend is None or not self._legend_dirty or legend.get_subscription_count() == 0:
            return
        with self._legend_lock:
            if self._legend_dirty:
                self._legend_dirty = False
                legend.publish(self._legend())
                self.work["legend"] += 1

    def _on_timer(self) -> None:
        self._maybe_publish_legend()
        self.publish_diagnostics()

    def publish_diagnostics(self) -> None:
        if self.diagnostics is None:
            return
        level, message, values = self.processor.diagnostics(time.monotonic(),
                                                            sync=self.sync.engine_name)
        diag = DiagnosticArray()
        diag.header.stamp = self.node.get_clock().now().to_msg()
        diag.status.append(DiagnosticStatus(
            level=LEVELS[level], name="clip2scene_node: segmentation", message=message,
            hardware_id=self.node.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()]))
        self.diagnostics.publish(diag)


def run_node(make_node: Callable[[], Node], build_only: Callable[[Any], int | None],
             args: list[str] | None, name: str) -> int:
    """The executables' main: init, build the node, spin until stopped, clean up.

    ``build_only(node)`` returns an exit status to stop at once (the engine is built) or None
    to spin. A refused start-up (bad parameter, missing or incompatible bundle) logs what to do
    and exits with status 2. The node's glibc malloc settings are applied first (here, not in
    the launch files, so that a plain ``ros2 run`` gets them too) and logged once.

    SIGINT (Ctrl-C) and SIGTERM (``ros2 launch`` stopping its processes) are a normal stop:
    rclpy's signal handlers shut the context down, which ends the spin with
    ``ExternalShutdownException``; the node is destroyed (publishers, subscriptions, the worker)
    and the process exits with status 0, without a traceback. So does a signal while the node
    is still starting (see :mod:`.starting` for one before ``rclpy.init``). A parameter given
    with the wrong type is a refused start-up too.
    """
    import rclpy
    import rclpy.signals
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from .starting import hold_stop_signals, restore_python_handlers

    in_effect = malloc.describe(malloc.apply_node_malloc())  # before rclpy.init and the Predictor
    held = hold_stop_signals()  # a stop signal now waits for rclpy's handlers
    try:
        rclpy.init(args=args)
        # made at once: an executor made after a signal has shut the context down fails half-built
        executor = SingleThreadedExecutor()
    except BaseException:
        restore_python_handlers()
        raise
    node = None
    interrupted = False
    try:
        held.release()  # one that came meanwhile is a stop (KeyboardInterrupt)
        node = make_node()
        node.get_logger().info(in_effect)
        status = build_only(node)
        if status is not None:
            return status
        rclpy.spin(node, executor)
    except STARTUP_ERRORS as exc:
        rclpy.logging.get_logger(name).fatal(str(exc))
        return 2
    except ParameterException as exc:  # e.g. `-p max_points:=abc`: rclpy's message names it
        rclpy.logging.get_logger(name).fatal(f"refused parameter: {exc}")
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        interrupted = True  # stopped by a signal
    except Exception:
        if rclpy.ok():
            raise
        # a signal shut the context down while the node was starting (loading the model,
        # building an engine), so creating a publisher or the like failed: a stop, not a crash
    finally:
        # only rclpy's signal handlers shut this process's context down
        stopping = interrupted or not rclpy.ok()
        rclpy.signals.uninstall_signal_handlers()
        restore_python_handlers()
        if stopping:
            # Ctrl-C on `ros2 launch` reaches the whole process group and launch passes it on:
            # a second SIGINT (or launch's SIGTERM) must not interrupt the clean-up or the exit
            # (SIGKILL still ends a hung one)
            ignore_stop_signals()
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        # once: a signal has already shut the context down
        rclpy.try_shutdown(uninstall_handlers=False)
    return 0


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM for the rest of the process, which is stopping (in the main
    thread; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)

