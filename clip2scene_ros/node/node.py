"""``clip2scene_node``: a LiDAR cloud in, a labelled cloud out (DESIGN rule 3: a thin node).

It turns parameters into a :class:`Predictor`, callbacks into codec calls, and results into
messages. All logic it relies on is ROS-free and tested on its own: the parameter schema
(``node_params``), the codecs, the predictor and the health bookkeeping (``health``).

Frames are processed on a worker thread from a one-slot mailbox: a cloud arriving while the
previous one is still being labelled replaces the waiting one and is counted as dropped, so the
node never lags behind the sensor.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from numpy.lib.recfunctions import structured_to_unstructured
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64
from visualization_msgs.msg import Marker, MarkerArray

from ..codecs import UNKNOWN_LABEL, decode_pointcloud2, encode_labelled_cloud, lidar_points
from ..codecs.messages import RclpyFactory, stamp_to_ns
from ..codecs.pointcloud2 import INTENSITY_FIELDS
from ..config import load_config
from ..errors import ConfigError, MessageError
from ..frame import Frame
from ..health import Health
from ..node_params import DESCRIPTIONS, RUNTIME_PARAMETERS, NodeParams
from ..runtime.predictor import Predictor

LEVELS = {"OK": DiagnosticStatus.OK, "WARN": DiagnosticStatus.WARN,
          "ERROR": DiagnosticStatus.ERROR}


def _qos(reliability: str, depth: int, latched: bool = False) -> QoSProfile:
    return QoSProfile(
        depth=depth,
        reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                     else ReliabilityPolicy.RELIABLE),
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class Clip2SceneNode(Node):
    """The segmentation node. ``predictor_factory`` builds the Predictor from the parameters."""

    def __init__(self, predictor_factory: Callable[[NodeParams], Predictor] | None = None,
                 **node_kwargs: Any) -> None:
        super().__init__("clip2scene_node", **node_kwargs)
        self.params = self._read_parameters()
        self.health = Health(log_throttle_s=self.params.log_throttle_s)
        factory = predictor_factory or _predictor_from_params
        self.predictor = factory(self.params)
        if self.params.vocabulary:
            self._set_vocabulary(self.params.vocabulary)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.factory = RclpyFactory()
        self._history: deque[Frame] = deque(maxlen=max(1, self.predictor.sweeps))
        self._slot: PointCloud2 | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

        p = self.params
        self.output = self.create_publisher(PointCloud2, p.output_topic,
                                            _qos(p.output_reliability, p.output_depth))
        self.diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.latency = {stage: self.create_publisher(Float64, f"~/debug/{stage}_ms", 1)
                        for stage in ("preprocess", "inference", "postprocess", "total",
                                      "pipeline_latency")} if p.publish_latency else {}
        if p.publish_legend:
            self.legend = self.create_publisher(MarkerArray, "~/output/legend",
                                                _qos("reliable", 1, latched=True))
            self.legend.publish(self._legend())
        self.create_subscription(PointCloud2, p.lidar_topic, self._on_cloud,
                                 _qos(p.input_reliability, p.input_depth))
        self.create_timer(p.diagnostics_period_s, self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="clip2scene-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"labelling {p.lidar_topic} -> {self.output.topic_name} with "
            f"{len(self.predictor.vocabulary.classes)} classes ({self.predictor.vocabulary.name}), "
            f"backend {self.predictor.backend.describe()}")

    # --- parameters -------------------------------------------------------------------------
    def _read_parameters(self) -> NodeParams:
        defaults = NodeParams()
        values = {}
        for f in fields(NodeParams):
            default = getattr(defaults, f.name)
            # only the vocabulary changes at run time; the rest needs a restart, so say so
            descriptor = ParameterDescriptor(description=DESCRIPTIONS[f.name],
                                             read_only=f.name not in RUNTIME_PARAMETERS)
            if isinstance(default, list):  # an empty list has no ROS type: declare as strings
                param = self.declare_parameter(f.name, Parameter.Type.STRING_ARRAY, descriptor)
                values[f.name] = list(param.value or [])
            else:
                values[f.name] = self.declare_parameter(f.name, default, descriptor).value
        return load_config(NodeParams, values)

    def _set_vocabulary(self, path: str) -> None:
        """Label with the text bank at ``path`` from the next frame (ConfigError if unusable)."""
        from ..teacher.text_bank import load_text_bank

        bank, vocabulary, _ = load_text_bank(path)
        self.predictor.set_vocabulary(bank, vocabulary)
        if getattr(self, "legend", None) is not None:
            self.legend.publish(self._legend())
        self.get_logger().info(f"vocabulary {vocabulary.name!r} ({len(vocabulary.classes)} "
                               f"classes) from {path}")

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for param in params:
            if param.name == "vocabulary" and param.value:
                try:
                    self._set_vocabulary(str(param.value))
                except (ConfigError, FileNotFoundError, ValueError) as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    # --- callbacks ----------------------------------------------------------------------------
    def _on_cloud(self, msg: PointCloud2) -> None:
        self.health.frame("received", time.monotonic())
        with self._lock:
            if self._slot is not None:
                self.health.frame("dropped_stale", time.monotonic())
            self._slot = msg
        self._wake.set()

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(timeout=0.1):
                continue
            with self._lock:
                msg, self._slot = self._slot, None
                self._wake.clear()
            if msg is not None:
                self._process(msg)

    def _process(self, msg: PointCloud2) -> None:
        if self.output.get_subscription_count() == 0:
            return  # nobody listens: no work
        now = time.monotonic()
        try:
            frame, cloud, kept = self._frame(msg)
        except MessageError as exc:
            self._bad(exc.kind, str(exc), now)
            return
        if self._history and frame.stamp_ns <= self._history[0].stamp_ns:
            self._history.clear()  # the clock went backwards (bag loop): start over
        self._history.appendleft(frame)
        # past sweeps need ego poses; without them the key frame alone is used
        usable = all(f.pose is not None for f in self._history)
        result = self.predictor.predict(list(self._history) if usable else [frame])
        for reason, count in result.prepared.dropped.items():
            self.health.points_dropped(reason, count)
        out = self._labelled(cloud, kept, result.labels.label, result.labels.score)
        out.header = msg.header  # the input header, exactly
        self.output.publish(out)
        self.health.frame("processed", time.monotonic())
        timings = dict(result.timings_ms)
        clock_ns = self.get_clock().now().nanoseconds
        timings["pipeline_latency"] = (clock_ns - frame.stamp_ns) * 1e-6
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

    def _bad(self, kind: str, text: str, now: float) -> None:
        self.health.bad_message(kind)
        log, suppressed = self.health.should_log(kind, now)
        if log:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.get_logger().warning(f"dropped a bad {kind}: {text}{more}")

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

    def _publish_diagnostics(self) -> None:
        status = self.health.status(time.monotonic())
        diag = DiagnosticArray()
        diag.header.stamp = self.get_clock().now().to_msg()
        values = {**status.values, "backend": self.predictor.backend.describe(),
                  "device": str(self.predictor.device),
                  "vocabulary": self.predictor.vocabulary.name}
        diag.status.append(DiagnosticStatus(
            level=LEVELS[status.level], name="clip2scene_node: segmentation",
            message=status.message, hardware_id=self.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()]))
        self.diagnostics.publish(diag)

    def destroy_node(self) -> None:
        worker = getattr(self, "_worker", None)  # absent when start-up was refused
        if worker is not None:
            self._stop.set()
            worker.join(timeout=2.0)
        super().destroy_node()


def _predictor_from_params(params: NodeParams) -> Predictor:
    if not params.model_path:
        raise ConfigError("model_path", "is empty: point it at a model bundle directory "
                          "(`clip2scene export` writes one)")
    cache = params.engine_cache_dir or str(Path(params.model_path) / "engines")
    return Predictor(params.model_path, backend=params.backend, device=params.device,
                     sweeps=params.sweeps, max_points=params.max_points,
                     precision=params.precision, engine_cache=cache)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = None
    try:
        node = Clip2SceneNode()
        if node.params.build_only:  # the Predictor built (or loaded) the engine: done
            node.get_logger().info(f"build_only: {node.predictor.backend.describe()} ready")
            return 0
        rclpy.spin(node)
    except (ConfigError, FileNotFoundError) as exc:
        # invalid parameters or a missing/incompatible bundle stop start-up with what to do
        rclpy.logging.get_logger("clip2scene_node").fatal(str(exc))
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
