"""The processing both nodes share: parameters, camera sync, prediction, fusion and outputs.

``Clip2SceneNode`` builds a :class:`Pipeline` and opens it in its constructor;
``Clip2SceneLifecycleNode`` builds it in ``on_configure`` and opens and closes it in
``on_activate`` / ``on_deactivate``. Everything between a callback and a publish lives here once.
The logic it relies on is ROS-free and tested on its own: the parameter schema (``node_params``),
the codecs, the camera sync (``camera_sync``), the predictor, the fusion maths
(``runtime.fusion``) and the health bookkeeping (``health``).

Flow: clouds and images go into a :class:`CameraSync` as they arrive (images are decoded only
once they are paired, so unpaired frames cost nothing); each complete set (a cloud with the
nearest image per camera, or LiDAR-only after ``camera_timeout_s``) goes to a one-slot mailbox
that a worker thread empties. A set arriving while the previous one is still being labelled
replaces the waiting one and is counted as dropped, so the node never lags behind the sensor.
"""

from __future__ import annotations

import gc
import signal
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from numpy.lib.recfunctions import structured_to_unstructured
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64
from visualization_msgs.msg import Marker, MarkerArray

from ..bag.sync import SyncedSet
from ..bag.topics import camera_name, image_namespace
from ..calibration import Calibration, load_calibration
from ..codecs import (
    UNKNOWN_LABEL,
    camera_info_to_model,
    decode_pointcloud2,
    encode_image,
    encode_labelled_cloud,
    image_to_rgb8,
    lidar_points,
)
from ..codecs.messages import RclpyFactory, stamp_to_ns
from ..codecs.pointcloud2 import INTENSITY_FIELDS
from ..config import load_config
from ..errors import ConfigError, MessageError
from ..frame import CameraView, Frame
from ..geometry.camera_model import CameraModel
from ..geometry.correspondence import PointPixelPairs, point_pixel_pairs
from ..geometry.projection import image_size
from ..geometry.transforms import transform_from_msg
from ..health import Health
from ..node_params import (
    DESCRIPTIONS,
    PATH_PARAMETERS,
    RUNTIME_PARAMETERS,
    NodeParams,
    resolve_path,
    resolve_paths,
)
from ..runtime import malloc
from ..runtime.fusion import TEMPERATURE, fuse_prediction
from ..runtime.labels import PointLabels
from ..runtime.predictor import Predictor
from .camera_sync import CameraSync
from .objects import ObjectsOutput

LEVELS = {"OK": DiagnosticStatus.OK, "WARN": DiagnosticStatus.WARN,
          "ERROR": DiagnosticStatus.ERROR}
#: Depth below which a point is not paired with a pixel (the teacher cache's default: the LiDAR
#: sees the ego car's roof and mirrors closer than that).
MIN_DEPTH_M = 1.0
#: How long a tf2 lookup at the cloud's stamp may block the worker (Autoware's fusion: 0.01 s).
TF_TIMEOUT_S = 0.01
#: Half-size in pixels of the square drawn for each point on the overlay.
OVERLAY_RADIUS = 1

PredictorFactory = Callable[[NodeParams], Predictor]


def qos(reliability: str, depth: int, latched: bool = False) -> QoSProfile:
    return QoSProfile(
        depth=depth,
        reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                     else ReliabilityPolicy.RELIABLE),
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


# --- parameters -----------------------------------------------------------------------------
def declare_parameters(node: Node, *, frozen: bool = True) -> None:
    """Declare every ``NodeParams`` field with its description.

    ``frozen``: read-only after start-up except the vocabulary (the plain node, which reads them
    once). The lifecycle node leaves them writable: it reads them again at each configure.
    """
    defaults = NodeParams()
    for f in fields(NodeParams):
        default = getattr(defaults, f.name)
        runtime = f.name in RUNTIME_PARAMETERS
        text = DESCRIPTIONS[f.name]
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
    declared = node.declare_parameter(name, Parameter.Type.STRING_ARRAY,
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


def predictor_from_params(params: NodeParams) -> Predictor:
    if not params.model_path:
        raise ConfigError("model_path", "is empty: point it at a model bundle directory "
                          "(`clip2scene export` writes one)")
    cache = params.engine_cache_dir or str(Path(params.model_path) / "engines")
    if params.threads:
        torch.set_num_threads(params.threads)  # process-wide: the node runs one network
    return Predictor(params.model_path, backend=params.backend, device=params.device,
                     sweeps=params.sweeps, max_points=params.max_points,
                     precision=params.precision, engine_cache=cache)


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


# --- cameras --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraInput:
    """One camera: its name (the image topic's namespace, as the bag reader names it) and
    topics. A topic ending in ``/compressed`` carries ``sensor_msgs/CompressedImage``."""

    name: str
    image_topic: str
    info_topic: str

    @property
    def compressed(self) -> bool:
        return self.image_topic.rstrip("/").endswith("/compressed")


def camera_inputs(params: NodeParams) -> list[CameraInput]:
    out = [CameraInput(camera_name(image_namespace(topic)), topic, info)
           for topic, info in zip(params.camera_topics, params.info_topics(), strict=True)]
    names = [c.name for c in out]
    for name in set(names):
        if names.count(name) > 1:
            topics = [c.image_topic for c in out if c.name == name]
            raise ConfigError("camera_topics", f"topics {topics} give one camera name {name!r}; "
                              "put each camera in its own namespace")
    return out


def tf2_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


def overlay_image(image: np.ndarray, pixel: np.ndarray, colors: np.ndarray, depth: np.ndarray,
                  radius: int = OVERLAY_RADIUS) -> np.ndarray:
    """``image`` with a ``(2r+1)²`` square of ``colors[i]`` at each ``pixel[i]`` (col, row).

    Far points are drawn first, so where squares overlap the nearest point shows, as it would
    in the scene. One vectorised assignment: numpy keeps the last of repeated indices.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    if pixel.shape[0] == 0:
        return out
    height, width = out.shape[:2]
    order = np.argsort(-depth, kind="stable")
    px, rgb = pixel[order].astype(np.int64), colors[order]
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    # [offsets, M] -> point-major order so every square of a nearer point comes later
    cols = np.stack([px[:, 0] + dx for dx, _ in offsets], axis=1).reshape(-1)
    rows = np.stack([px[:, 1] + dy for _, dy in offsets], axis=1).reshape(-1)
    fill = np.repeat(rgb, len(offsets), axis=0)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    out[rows[inside], cols[inside]] = fill[inside]
    return out


# --- the pipeline ---------------------------------------------------------------------------
class Pipeline:
    """Parameters → Predictor (+ MaskCLIP); callbacks → codec calls; results → messages.

    Building it is the "configure" step (bundle, Predictor, TensorRT engine, calibration,
    MaskCLIP); :meth:`open_outputs` / :meth:`open_inputs` create the ROS entities and start the
    worker; :meth:`close` stops the worker and destroys them again.
    """

    def __init__(self, node: Node, params: NodeParams,
                 predictor_factory: PredictorFactory | None = None) -> None:
        self.node = node
        params = resolve_paths(params)  # absolute once: reported, and immune to a chdir
        self.params = params
        self.log = node.get_logger()
        self.paths = {name: getattr(params, name) for name in PATH_PARAMETERS}
        if params.objects_vocabulary:
            self.paths["objects_vocabulary"] = params.objects_vocabulary
        self.log.info("paths: " + ", ".join(f"{k} {v or '(none)'}" for k, v in self.paths.items()))
        # ROS entities: created by open_outputs / open_inputs, None until then
        self.output: Any = None
        self.diagnostics: Any = None
        self.legend: Any = None
        self.overlay: Any = None
        self.latency: dict[str, Any] = {}
        self.health = Health(log_throttle_s=params.log_throttle_s)
        self.work: Counter[str] = Counter()  # optional outputs computed, by output
        self.factory = RclpyFactory()
        self.predictor = (predictor_factory or predictor_from_params)(params)
        self._legend_dirty = True
        self._legend_lock = threading.Lock()
        if params.vocabulary:
            try:
                self.set_vocabulary(params.vocabulary)
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                # a bad bank must not stop a vehicle's perception: label with the bundle's own
                self._bad("vocabulary", f"{exc}; labelling with the bundle's vocabulary "
                          f"{self.predictor.vocabulary.name!r}", time.monotonic())

        self.cameras = camera_inputs(params)
        self.calibration: Calibration | None = (
            load_calibration(params.calibration_file) if params.calibration_file else None)
        self.camera_models: dict[str, CameraModel] = {}  # latest CameraInfo per camera
        self.camera_state: dict[str, str] = {}  # per camera: "ok" or why the last frame lacked it
        self.unusable: str | None = None
        # tf2 serves the extrinsics the calibration file lacks, and the ego poses that move
        # past sweeps into the key frame (a multi-sweep model)
        self._use_tf2 = tf2_available() and (
            (bool(self.cameras) and (self.calibration is None
                                     or any(c.name not in self.calibration
                                            for c in self.cameras)))
            or (self.predictor.sweeps > 1 and bool(params.world_frame)))
        if self.cameras and self.calibration is None and not self._use_tf2:
            self.unusable = "no extrinsics: calibration_file is empty and tf2_ros is not installed"
            if params.fusion:
                raise ConfigError("calibration_file", f"fusion needs camera extrinsics, but "
                                  f"{self.unusable.removeprefix('no extrinsics: ')}")
            # said once here; diagnostics keep showing it per camera
            self.log.error(f"cameras {[c.name for c in self.cameras]} are unusable "
                           f"({self.unusable}); labelling LiDAR-only")
            self.camera_state = dict.fromkeys((c.name for c in self.cameras), self.unusable)
        self._clip: tuple[Any, Any] | None = None  # (model, tokenizer) fusion loaded
        self.maskclip = self._load_maskclip() if params.fusion else None
        # PointCLIP objects share fusion's CLIP when both run: one copy of the weights
        self.objects = (ObjectsOutput(params, self.predictor, self.log, self._clip)
                        if params.publish_objects else None)
        synced = [] if self.unusable else [c.name for c in self.cameras]
        self.sync: CameraSync[Any] = CameraSync(synced, params.sync_slop_s,
                                                params.camera_timeout_s,
                                                queue_size=max(2, params.input_depth))
        self._sync_dropped = 0
        self._jumps_seen: Counter[str] = Counter()  # sync.jumps already counted in health
        self._history: deque[Frame] = deque(maxlen=max(1, self.predictor.sweeps))
        self.sweep_state = f"1 of {self.predictor.sweeps}"  # sweeps merged into the last frame
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

    # --- configure ----------------------------------------------------------------------------
    def _load_maskclip(self) -> Any:
        from ..teacher.clip_loader import RANDOM, load_clip
        from ..teacher.maskclip import MaskCLIP

        p = self.params
        if p.clip_pretrained.strip().lower() in RANDOM:
            self.log.warning(f"fusion runs CLIP {p.clip_model} with RANDOM weights "
                             f"(clip_pretrained: {p.clip_pretrained!r}): the fused labels are "
                             "meaningless; use this for tests only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, logged
            clip, tokenizer = load_clip(p.clip_model, p.clip_pretrained,
                                        device=str(self.predictor.device))
        self._clip = (clip, tokenizer)
        # MaskCLIP keeps the visual tower only; the text tower goes with ``clip``
        maskclip = MaskCLIP(clip).to(self.predictor.device)
        dim = int(self.predictor.text_bank.shape[1])
        if maskclip.embed_dim != dim:
            raise ConfigError("clip_model", f"{p.clip_model} embeds images in "
                              f"{maskclip.embed_dim} dims but the bundle's text bank has {dim}: "
                              "use the CLIP the bundle was distilled from")
        self.log.info(f"fusion: MaskCLIP {p.clip_model} ({p.clip_pretrained}), image weight "
                      f"{p.fusion_weight}")
        return maskclip

    def set_vocabulary(self, path: str) -> None:
        """Label with the text bank at ``path`` from the next frame (ConfigError if unusable).

        MaskCLIP reads the Predictor's bank each frame, so fusion follows the swap too.
        """
        from ..teacher.text_bank import load_text_bank

        path = resolve_path(path)
        bank, vocabulary, _ = load_text_bank(path)
        try:
            self.predictor.set_vocabulary(bank, vocabulary)
        except ConfigError as exc:  # e.g. a bank of another CLIP: say which file and setting
            raise ConfigError("vocabulary", f"{exc.key} {exc.reason}", path) from None
        self.paths["vocabulary"] = path
        self._legend_dirty = True
        self._maybe_publish_legend()
        self.log.info(f"vocabulary {vocabulary.name!r} ({len(vocabulary.classes)} classes) "
                      f"from {path}")

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
        if self._use_tf2:
            import tf2_ros

            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self.node)
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
        self.output = self.diagnostics = self.legend = self.overlay = None
        self.latency = {}
        with self._sync_lock:
            self.sync.reset()  # a reactivated node starts from fresh messages
        with self._lock:
            self._slot = None
        self._history.clear()

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
            self.camera_models[camera] = camera_info_to_model(msg)
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
            frame, cloud, kept = self._frame(msg)
        except MessageError as exc:
            self._bad(exc.kind, str(exc), now)
            return
        need_images = self.maskclip is not None or want_overlay
        views, used, skipped = self._camera_views(synced, frame, decode=need_images)
        self._note_cameras(used, skipped, now)
        if self._history and not (0 < frame.stamp_ns - self._history[0].stamp_ns
                                  <= self.sync.jump_forward_ns):
            self._history.clear()  # the clock went backwards (bag loop) or far ahead: start over
        pose = self._ego_pose(frame) if self.predictor.sweeps > 1 else None
        frame = replace(frame, pose=None if isinstance(pose, str) else pose)
        self._history.appendleft(frame)  # past sweeps keep no images
        frame = replace(frame, cameras=tuple(views), skipped_cameras=tuple(skipped.items()))
        # past sweeps are moved by the ego poses; without them the key frame alone is used
        past = list(self._history)[1:]
        usable = all(f.pose is not None for f in self._history)
        self._note_sweeps(1 + len(past) if usable else 1, pose, now)
        bank = self.predictor.text_bank  # one bank for the 3D and the image logits
        result = self.predictor.predict([frame, *past] if usable else [frame])
        for reason, count in result.prepared.dropped.items():
            self.health.points_dropped(reason, count)
        labels = result.labels
        timings = dict(result.timings_ms)
        pairs = None
        if frame.cameras:  # decoded only when fusion or the overlay needs them
            pairs = point_pixel_pairs(frame.xyz, [(v.camera, v.lidar_to_camera)
                                                  for v in frame.cameras], min_depth=MIN_DEPTH_M)
        if self.maskclip is not None and pairs is not None:
            t0 = time.perf_counter()
            labels = self._fuse(frame, result, bank, pairs)
            ms = 1e3 * (time.perf_counter() - t0)
            timings["inference"] = timings.get("inference", 0.0) + ms
            timings["total"] = timings.get("total", 0.0) + ms
        if want_cloud:
            out = self._labelled(cloud, kept, labels.label, labels.score)
            out.header = msg.header  # the input header, exactly
            output.publish(out)
        if want_overlay and pairs is not None:
            self._publish_overlay(overlay, frame.cameras[0], pairs, labels)
        if want_objects and self.objects is not None:  # after the cloud: it waits for nothing
            self.objects.publish(msg.header, frame.xyz, labels, result)
            self.work["objects"] += 1
        self._maybe_publish_legend()
        self.health.frame("processed", time.monotonic())
        timings["pipeline_latency"] = (self.node.get_clock().now().nanoseconds
                                       - frame.stamp_ns) * 1e-6
        for stage, ms in timings.items():
            self.health.latency("pipeline" if stage == "pipeline_latency" else stage, ms)
            if stage in self.latency:
                self.latency[stage].publish(Float64(data=float(ms)))

    def _frame(self, msg: PointCloud2) -> tuple[Frame, np.ndarray, np.ndarray]:
        stamp = stamp_to_ns(msg.header.stamp)
        if stamp <= 0:
            raise MessageError("PointCloud2", "header.stamp", "is zero or negative")
        cloud = decode_pointcloud2(msg)
        points = lidar_points(cloud, stamp_ns=stamp)
        frame = Frame(stamp_ns=stamp, frame_id=msg.header.frame_id, xyz=points.xyz,
                      intensity=points.intensity, ring=points.ring, time=points.time)
        return frame, cloud, points.index

    def _camera_views(self, synced: SyncedSet[Any], frame: Frame, *, decode: bool
                      ) -> tuple[list[CameraView], list[str], dict[str, str]]:
        """The usable cameras of the set (and their views when ``decode``), and why each other
        camera is left out. Without ``decode`` no image is decoded: nothing would read it (a
        JPEG costs milliseconds per camera and frame), and its faults surface once fusion or
        the overlay needs it."""
        if self.unusable:
            return [], [], {c.name: self.unusable for c in self.cameras}
        views: list[CameraView] = []
        used: list[str] = []
        skipped: dict[str, str] = {}
        for cam in self.cameras:
            match = synced.matches.get(cam.name)
            if match is None:
                skipped[cam.name] = (f"no image within {self.params.sync_slop_s} s of the cloud "
                                     f"(waited {self.params.camera_timeout_s} s)")
                continue
            stamp, msg = match
            model = self._intrinsics(cam)
            if model is None:
                skipped[cam.name] = f"no CameraInfo on {cam.info_topic} yet"
                continue
            extrinsic = self._extrinsic(cam, str(msg.header.frame_id), frame)
            if isinstance(extrinsic, str):
                skipped[cam.name] = extrinsic
                continue
            if not decode:
                used.append(cam.name)
                continue
            try:
                image = image_to_rgb8(msg)
            except MessageError as exc:
                self._bad(exc.kind, str(exc), time.monotonic())
                skipped[cam.name] = f"image malformed ({exc.field})"
                continue
            size = (image.shape[1], image.shape[0])
            if image_size(model) != size:
                skipped[cam.name] = (f"image is {size[0]}x{size[1]} but its intrinsics publish "
                                     f"{image_size(model)[0]}x{image_size(model)[1]}")
                continue
            views.append(CameraView(cam.name, image, model, extrinsic, stamp,
                                    str(msg.header.frame_id)))
            used.append(cam.name)
        return views, used, skipped

    def _intrinsics(self, cam: CameraInput) -> CameraModel | None:
        if self.calibration is not None and cam.name in self.calibration:
            model = self.calibration[cam.name].camera
            if model is not None:  # the file's intrinsics win over CameraInfo, as in the reader
                return model
        return self.camera_models.get(cam.name)

    def _extrinsic(self, cam: CameraInput, camera_frame: str, frame: Frame) -> np.ndarray | str:
        """LiDAR → camera optical frame from the calibration file, else tf2; or why not."""
        lidar = self.calibration.lidar_frame if self.calibration is not None else None
        if self.calibration is not None and lidar in (None, frame.frame_id):
            for key in (cam.name, camera_frame):
                if key and key in self.calibration:
                    return np.asarray(self.calibration[key].lidar_to_camera, dtype=np.float64)
        if self._tf_buffer is None:
            if lidar is not None and lidar != frame.frame_id:
                # the file's extrinsics start from another frame: using them would misplace
                # every point in the image, so this cloud goes without the camera
                return (f"no extrinsics: the cloud is in frame {frame.frame_id!r}, "
                        f"{self.params.calibration_file} calibrates {lidar!r}")
            return (f"no extrinsics: {cam.name!r} is not in {self.params.calibration_file} and "
                    "tf2_ros is not installed")
        return self._tf_lookup(camera_frame, frame.frame_id, frame.stamp_ns)

    def _ego_pose(self, frame: Frame) -> np.ndarray | str:
        """world_frame ← LiDAR at the sweep's stamp from tf2; or why not."""
        world = self.params.world_frame
        if not world:
            return "world_frame is empty"
        if self._tf_buffer is None:
            return "tf2_ros is not installed"
        return self._tf_lookup(world, frame.frame_id, frame.stamp_ns, latest=False)

    def _note_sweeps(self, merged: int, pose: np.ndarray | str | None, now: float) -> None:
        """Diagnostics say how many sweeps the model got; a missing pose is a WARN (a model
        trained on several sweeps sees a sparser cloud) with a throttled log line."""
        sweeps = self.predictor.sweeps
        state = f"{merged} of {sweeps}"
        if isinstance(pose, str):
            state += f": no ego pose ({pose})"
            log, _ = self.health.should_log("sweeps", now)
            if log and state != self.sweep_state:
                self.log.warning(f"sweeps {state}; the key frame alone is labelled")
        self.sweep_state = state

    def _tf_lookup(self, target: str, source: str, stamp_ns: int, *, latest: bool = True
                   ) -> np.ndarray | str:
        """``target`` ← ``source`` at ``stamp_ns`` from tf2, or why not. ``latest`` falls back
        to the newest transform: right for a static rig (/tf_static is published once), wrong
        for an ego pose."""
        import tf2_ros
        from rclpy.duration import Duration
        from rclpy.time import Time

        if not target or not source:
            return "no extrinsics: the image or cloud has an empty header.frame_id"
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

    def _note_cameras(self, used: list[str], skipped: dict[str, str], now: float) -> None:
        if not self.cameras:
            return  # LiDAR-only by configuration, nothing to report
        for cam in self.cameras:
            state = "ok" if cam.name in used else skipped.get(cam.name, "not synced")
            if state != "ok" and state != self.camera_state.get(cam.name):
                log, _ = self.health.should_log(f"camera:{cam.name}", now)
                if log:
                    self.log.warning(f"camera {cam.name}: {state}")
            self.camera_state[cam.name] = state
        self.health.frame("with_cameras" if used else "lidar_only", now)

    def _fuse(self, frame: Frame, result: Any, bank: torch.Tensor,
              pairs: PointPixelPairs) -> PointLabels:
        from ..teacher.labeller import DEFAULT_IMAGE_SIZE, resize_images

        # the teacher cache's input size: MaskCLIP sees images as it did in training
        device = self.predictor.device
        images = resize_images([v.image for v in frame.cameras], DEFAULT_IMAGE_SIZE).to(device)
        with torch.inference_mode():
            logits = self.maskclip.dense_logits(images, bank.to(device))
        fused = fuse_prediction(result, list(logits), pairs,
                                [v.image.shape[:2] for v in frame.cameras],
                                self.params.fusion_weight, TEMPERATURE)
        self.work["fusion"] += 1
        return fused.labels

    def _labelled(self, cloud: np.ndarray, kept: np.ndarray, label: np.ndarray,
                  score: np.ndarray) -> PointCloud2:
        """The output cloud, point for point the input (NaN points stay, labelled unknown)."""
        n = cloud.size
        full_label = np.full(n, UNKNOWN_LABEL, np.uint16)
        full_score = np.zeros(n, np.float32)
        full_label[kept], full_score[kept] = label, score
        palette = self.predictor.palette
        rgb = np.full((n, 3), 128, np.uint8)  # unknown points are grey
        known = full_label < len(palette)
        rgb[known] = palette[full_label[known]]
        xyz = structured_to_unstructured(cloud[["x", "y", "z"]], dtype=np.float32)
        name = next((n for n in INTENSITY_FIELDS if n in (cloud.dtype.names or ())), None)
        intensity = None if name is None else cloud[name]
        return encode_labelled_cloud(xyz, intensity, full_label, full_score, rgb, stamp_ns=0,
                                     frame_id="", factory=self.factory)

    def _publish_overlay(self, publisher: Any, view: CameraView, pairs: PointPixelPairs,
                         labels: PointLabels) -> None:
        """The first synced image with its points in their label colours (image header)."""
        own = pairs.camera_index == 0
        label = labels.label[pairs.point_index[own]]
        palette = self.predictor.palette
        known = label < len(palette)
        drawn = overlay_image(view.image, pairs.pixel[own][known], palette[label[known]],
                              pairs.depth[own][known])
        publisher.publish(encode_image(drawn, "rgb8", stamp_ns=view.stamp_ns,
                                       frame_id=view.frame_id, factory=self.factory))
        self.work["overlay"] += 1

    def _bad(self, kind: str, text: str, now: float) -> None:
        self.health.bad_message(kind)
        log, suppressed = self.health.should_log(kind, now)
        if log:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.log.warning(f"dropped a bad {kind}: {text}{more}")

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
        status = self.health.status(time.monotonic())
        level, message = status.level, status.message
        values = {**status.values, "backend": self.predictor.backend.describe(),
                  "device": str(self.predictor.device),
                  "vocabulary": self.predictor.vocabulary.name,
                  **{f"path_{k}": v for k, v in self.paths.items() if v}}
        if self.objects is not None:
            values.update(self.objects.diagnostics())
        if self.predictor.sweeps > 1:
            values["sweeps"] = self.sweep_state
            if "no ego pose" in self.sweep_state:
                text = f"sweeps {self.sweep_state}"
                message = text if message == "ok" else f"{message}; {text}"
                level = "WARN" if level == "OK" else level
        if self.cameras:
            values["sync"] = self.sync.engine_name
            values["fusion"] = (f"on ({self.params.clip_model}, weight "
                                f"{self.params.fusion_weight})" if self.maskclip else "off")
            states = dict(self.camera_state)
            values.update({f"camera_{name}": state for name, state in states.items()})
            missing = {name: state for name, state in states.items() if state != "ok"}
            if missing:
                text = "; ".join(f"camera {name} missing: {state}"
                                 for name, state in missing.items())
                if len(missing) == len(self.cameras):
                    text = f"LiDAR-only ({text})"
                message = text if message == "ok" else f"{message}; {text}"
                level = "WARN" if level == "OK" else level
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
    except (ConfigError, FileNotFoundError) as exc:
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

