"""The node's parameters: one typed, documented schema, validated before anything starts.

The schema is ROS-free so it is tested with plain pytest and shared by the node (which declares
every field as a ROS parameter with its description and reads them back), the launch files and
``config/clip2scene.yaml``. An invalid value raises ``ConfigError`` naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .config import load_config, read_yaml
from .errors import ConfigError
from .vocabulary import names_a_file

Reliability = Literal["best_effort", "reliable"]
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


#: The ROS parameter description of every field (shown by ``ros2 param describe``).
DESCRIPTIONS: dict[str, str] = {
    "lidar_topic": "PointCloud2 input topic (any driver layout)",
    "camera_topics": "Image or CompressedImage topics ('.../compressed'); empty: LiDAR-only",
    "camera_info_topics": "CameraInfo topic per camera; empty: the image topic's namespace",
    "input_reliability": "input QoS reliability (sensor data)",
    "input_depth": "input QoS history depth",
    "sync_slop_s": "largest |image stamp - cloud stamp| to pair them (s)",
    "camera_timeout_s": "wait this long for images, then go on LiDAR-only for the cloud (s)",
    "calibration_file": "calibration YAML (extrinsics[, intrinsics]); empty: tf2, CameraInfo",
    "model_path": "model bundle directory (model.yaml + model.safetensors)",
    "backend": "inference backend: auto, torch, onnxruntime or tensorrt",
    "precision": "inference precision (fp16: GPU only)",
    "device": "torch device: auto, cpu, cuda or cuda:N",
    "threads": ("CPU threads of the network (torch; onnxruntime follows); 0: torch's default, "
                "one per core. Fewer on a CPU shared with other nodes: idle OpenMP threads "
                "spin and a contended predictor slows down many times over"),
    "engine_cache_dir": "TensorRT engine cache; empty: <model_path>/engines",
    "build_only": "build the TensorRT engine, then exit",
    "sweeps": "sweeps merged per frame; 0: the bundle's setting",
    "world_frame": ("fixed frame of the ego poses (tf2) that past sweeps are moved by; "
                    "empty: the key frame alone"),
    "max_points": "points per frame fed to the network; 0: the bundle's setting",
    "vocabulary": ("text bank file (.safetensors + .yaml) to label with; empty: the bundle's. "
                   "Settable at run time (open vocabulary)"),
    "fusion": "fuse MaskCLIP logits of synced images for points in view",
    "fusion_weight": "weight of the image logits in the fusion (0..1)",
    "clip_model": ("open_clip model of the MaskCLIP teacher that fusion runs (the bundle's "
                   "CLIP); PointCLIP objects run it too"),
    "clip_pretrained": ("CLIP weights for fusion and objects: an open_clip pretrained tag or a "
                        "weights file ('random': tests only, labels meaningless); empty: fusion "
                        "and objects refused"),
    "output_topic": "labelled PointCloud2 (x,y,z,intensity,label,score,rgb)",
    "output_reliability": "output QoS reliability",
    "output_depth": "output QoS history depth",
    "publish_overlay": "publish the labels drawn over the first camera image",
    "publish_legend": "publish a MarkerArray legend of the vocabulary",
    "publish_objects": ("publish PointCLIP object labels (boxes and texts) as a MarkerArray; "
                        "needs clip_pretrained"),
    "objects_topic": "MarkerArray topic of the object labels",
    "objects_mode": ("every_frame: label the objects of every frame; on_demand: only the next "
                     "frame after a call of the ~/classify_objects service (std_srvs/Trigger)"),
    "objects_budget_ms": ("time per frame for the object pass; objects are labelled largest "
                          "first and the rest keep their segmentation class (0: none labelled)"),
    "objects_vocabulary": ("vocabulary YAML or built-in name PointCLIP names objects with; "
                           "empty: the object classes of the labelling vocabulary"),
    "objects_classes": ("classes of the labelling vocabulary clustered into objects; empty: "
                        "those named like objects (car, pedestrian, pole, ...)"),
    "objects_ensemble_weight": ("weight of the segmentation network's pooled log-probabilities "
                                "added to PointCLIP's object logits; 0: PointCLIP alone"),
    "publish_latency": "publish per-stage latency topics (ms)",
    "diagnostics_period_s": "diagnostics publishing period (s)",
    "log_throttle_s": "at most one log line per kind of bad message per period",
}


#: Parameters that may change while the node runs; the others are read-only after start-up.
RUNTIME_PARAMETERS = frozenset({"vocabulary"})


@dataclass(frozen=True)
class NodeParams:
    """Every parameter of ``clip2scene_node``; names are the ROS parameter names."""

    # inputs
    lidar_topic: str = "/points"
    camera_topics: list[str] = field(default_factory=list)
    camera_info_topics: list[str] = field(default_factory=list)
    input_reliability: Reliability = "best_effort"
    input_depth: int = 5
    sync_slop_s: float = 0.05
    camera_timeout_s: float = 0.1
    calibration_file: str = ""
    # model
    model_path: str = ""
    backend: str = "auto"
    precision: Literal["fp32", "fp16"] = "fp32"
    device: str = "auto"
    threads: int = 0
    engine_cache_dir: str = ""
    build_only: bool = False
    sweeps: int = 0
    world_frame: str = "odom"
    max_points: int = 0
    vocabulary: str = ""
    fusion: bool = False
    fusion_weight: float = 0.5
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = ""
    # outputs
    output_topic: str = "~/output/labels"
    output_reliability: Reliability = "reliable"
    output_depth: int = 1
    publish_overlay: bool = False
    publish_legend: bool = True
    publish_objects: bool = False
    objects_topic: str = "~/output/objects"
    objects_mode: Literal["every_frame", "on_demand"] = "every_frame"
    objects_budget_ms: float = 50.0
    objects_vocabulary: str = ""
    objects_classes: list[str] = field(default_factory=list)
    objects_ensemble_weight: float = 0.0
    publish_latency: bool = True
    diagnostics_period_s: float = 1.0
    log_throttle_s: float = 5.0

    def validate(self) -> None:
        if not self.lidar_topic:
            raise ConfigError("lidar_topic", "must not be empty")
        if self.camera_info_topics and len(self.camera_info_topics) != len(self.camera_topics):
            raise ConfigError("camera_info_topics", f"has {len(self.camera_info_topics)} topics "
                              f"for {len(self.camera_topics)} cameras (or leave it empty)")
        if len(set(self.camera_topics)) != len(self.camera_topics):
            raise ConfigError("camera_topics", "lists a topic twice")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        positive = {"input_depth": self.input_depth, "output_depth": self.output_depth,
                    "diagnostics_period_s": self.diagnostics_period_s}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(key, f"must be > 0, got {value}")
        non_negative = {"sync_slop_s": self.sync_slop_s, "camera_timeout_s": self.camera_timeout_s,
                        "sweeps": self.sweeps, "max_points": self.max_points,
                        "threads": self.threads,
                        "log_throttle_s": self.log_throttle_s,
                        "objects_budget_ms": self.objects_budget_ms,
                        "objects_ensemble_weight": self.objects_ensemble_weight}
        for key, value in non_negative.items():
            if not value >= 0:
                raise ConfigError(key, f"must be >= 0, got {value}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ConfigError("fusion_weight", f"must be in [0, 1], got {self.fusion_weight}")
        if not self.clip_model:
            raise ConfigError("clip_model", "must name an open_clip model (e.g. ViT-B-16)")
        if self.fusion and not self.camera_topics:
            raise ConfigError("fusion", "needs camera_topics (fusion blends camera images in)")
        if self.fusion and not self.clip_pretrained.strip():
            # the loader's own wording: the same two ways out as `clip2scene text-bank` gives
            from .teacher.clip_loader import both_options

            raise ConfigError("clip_pretrained", f"is empty but fusion needs CLIP weights for "
                              f"clip_model {self.clip_model!r}: {both_options(self.clip_model)}")
        if self.publish_objects and not self.objects_topic:
            raise ConfigError("objects_topic", "must not be empty when publish_objects is true")
        if self.publish_objects and not self.clip_pretrained.strip():
            # refused like fusion: object labels without CLIP weights would be noise
            from .teacher.clip_loader import both_options

            raise ConfigError("clip_pretrained", f"is empty but publish_objects needs CLIP "
                              f"weights for clip_model {self.clip_model!r}: "
                              f"{both_options(self.clip_model)}")
        if self.build_only and self.backend not in ("auto", "tensorrt"):
            raise ConfigError("build_only", f"only builds TensorRT engines; backend is "
                              f"{self.backend!r}")

    def info_topics(self) -> list[str]:
        """CameraInfo topic of each camera (given, or the image topic's sibling)."""
        if self.camera_info_topics:
            return list(self.camera_info_topics)
        out = []
        for topic in self.camera_topics:
            parts = topic.rstrip("/").split("/")
            if parts[-1] == "compressed":
                parts = parts[:-1]
            out.append("/".join([*parts[:-1], "camera_info"]))
        return out


def load_node_params(source: str | Path | dict[str, Any]) -> NodeParams:
    """Parameters from a ROS 2 parameter YAML (``/**: ros__parameters:`` or ``<node>:``).

    A plain mapping of parameter names is accepted too.
    """
    raw = read_yaml(source) if isinstance(source, str | Path) else source
    origin = str(source) if isinstance(source, str | Path) else None
    if isinstance(raw, dict) and len(raw) == 1:
        (body,) = raw.values()
        if isinstance(body, dict) and "ros__parameters" in body:
            raw = body["ros__parameters"]
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "must be a mapping of parameters", origin)
    try:
        return load_config(NodeParams, raw)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.reason, exc.source or origin) from None


#: Parameters naming files or directories: resolved to absolute paths once, at start-up.
PATH_PARAMETERS = ("model_path", "calibration_file", "vocabulary", "engine_cache_dir")


def resolve_path(value: str) -> str:
    """``value`` as an absolute path (``~`` expanded, relative to the working directory); empty
    stays empty. The node reports the result, so a relative path is never a guess."""
    return str(Path(value).expanduser().resolve()) if value else ""


def resolve_vocabulary_path(value: str) -> str:
    """A vocabulary parameter that names a shipped vocabulary (``modelnet40``) stays a name;
    one that names a file (:func:`~.vocabulary.names_a_file`) is resolved like the other
    paths."""
    return resolve_path(value) if value and names_a_file(value) else value


def resolve_paths(params: NodeParams) -> NodeParams:
    """``params`` with every :data:`PATH_PARAMETERS` value absolute (and ``objects_vocabulary``
    when it names a file), and the engine cache that will be used (``<model_path>/engines``
    when ``engine_cache_dir`` is empty) spelt out."""
    values: dict[str, Any] = {name: resolve_path(getattr(params, name)) for name in PATH_PARAMETERS}
    values["objects_vocabulary"] = resolve_vocabulary_path(params.objects_vocabulary)
    if not values["engine_cache_dir"] and values["model_path"]:
        values["engine_cache_dir"] = str(Path(values["model_path"]) / "engines")
    return replace(params, **values)
