"""The node's parameters: one typed, documented schema, validated before anything starts.

The schema is ROS-free so it is tested with plain pytest and shared by the node (which declares
every field as a ROS parameter with its description and reads them back), the launch files and
``config/clip2scene.yaml``. An invalid value raises ``ConfigError`` naming the parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .config import load_config, read_yaml
from .errors import ConfigError
from .precision_names import DEFAULT_PRECISION, Precision
from .runtime.engine_cache import engine_cache_dir
from .vocabulary import names_a_file

Reliability = Literal["best_effort", "reliable"]
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


#: Parameters that may change while the node runs; the others are read-only after start-up.
RUNTIME_PARAMETERS = frozenset({"vocabulary"})


@dataclass(frozen=True)
class NodeParams:
    """Every parameter of ``clip2scene_node``; names are the ROS parameter names.

    Each field's ``metadata["description"]`` is its ROS parameter description (shown by
    ``ros2 param describe``); :func:`description` reads it.
    """

    # inputs
    lidar_topic: str = field(
        default="/points",
        metadata={"description": "PointCloud2 input topic (any driver layout)"})
    camera_topics: list[str] = field(
        default_factory=list,
        metadata={"description": ("Image or CompressedImage topics ('.../compressed'); empty: "
                                  "LiDAR-only")})
    camera_info_topics: list[str] = field(
        default_factory=list,
        metadata={"description": "CameraInfo topic per camera; empty: the image topic's namespace"})
    input_reliability: Reliability = field(
        default="best_effort",
        metadata={"description": "input QoS reliability (sensor data)"})
    input_depth: int = field(default=5, metadata={"description": "input QoS history depth"})
    sync_slop_s: float = field(
        default=0.05,
        metadata={"description": "largest |image stamp - cloud stamp| to pair them (s)"})
    camera_timeout_s: float = field(
        default=0.1,
        metadata={"description": ("wait this long for images, then go on LiDAR-only for the cloud "
                                  "(s)")})
    calibration_file: str = field(
        default="",
        metadata={"description": ("calibration YAML (extrinsics[, intrinsics]); empty: tf2, "
                                  "CameraInfo")})
    # model
    model_path: str = field(
        default="",
        metadata={"description": "model bundle directory (model.yaml + model.safetensors)"})
    backend: str = field(
        default="auto",
        metadata={"description": "inference backend: auto, torch, onnxruntime or tensorrt"})
    precision: Precision = field(
        default=DEFAULT_PRECISION,
        metadata={"description": ("inference precision: auto, fp32, bf16 (CPU) or fp16 (CUDA); "
                                  "auto: bf16 on a CPU with bf16 matrix units, fp16 on CUDA, "
                                  "else fp32")})
    device: str = field(
        default="auto",
        metadata={"description": "torch device: auto, cpu, cuda or cuda:N"})
    threads: int = field(
        default=0,
        metadata={"description": ("CPU threads of the network (torch; onnxruntime follows); 0: "
                                  "torch's default, one per core. Fewer on a CPU shared with other "
                                  "nodes: idle OpenMP threads spin and a contended predictor slows "
                                  "down many times over")})
    engine_cache_dir: str = field(
        default="",
        metadata={"description": "TensorRT engine cache; empty: <model_path>/engines"})
    build_only: bool = field(
        default=False,
        metadata={"description": "build the TensorRT engine, then exit"})
    engine_min_points: int = field(
        default=0,
        metadata={"description": ("TensorRT profile: fewest points per cloud; 0: the bundle's "
                                  "engine setting")})
    engine_opt_points: int = field(
        default=0,
        metadata={"description": ("TensorRT profile: the points per cloud kernels are tuned for; "
                                  "0: the bundle's engine setting")})
    engine_max_points: int = field(
        default=0,
        metadata={"description": ("TensorRT profile: most points per cloud (more are thinned, "
                                  "counted as over_profile); 0: the bundle's engine setting")})
    sweeps: int = field(
        default=0,
        metadata={"description": "sweeps merged per frame; 0: the bundle's setting"})
    world_frame: str = field(
        default="odom",
        metadata={"description": ("fixed frame of the ego poses (tf2) that past sweeps are moved "
                                  "by; empty: the key frame alone")})
    max_points: int = field(
        default=0,
        metadata={"description": "points per frame fed to the network; 0: the bundle's setting"})
    vocabulary: str = field(
        default="",
        metadata={"description": ("text bank file (.safetensors + .yaml) to label with; empty: the "
                                  "bundle's. Settable at run time (open vocabulary)")})
    fusion: bool = field(
        default=False,
        metadata={"description": "fuse MaskCLIP logits of synced images for points in view"})
    fusion_weight: float = field(
        default=0.5,
        metadata={"description": "weight of the image logits in the fusion (0..1)"})
    clip_model: str = field(
        default="ViT-B-16",
        metadata={"description": ("open_clip model of the MaskCLIP teacher that fusion runs (the "
                                  "bundle's CLIP); PointCLIP objects run it too")})
    clip_pretrained: str = field(
        default="",
        metadata={"description": ("CLIP weights for fusion and objects: an open_clip pretrained "
                                  "tag or a weights file ('random': tests only, labels "
                                  "meaningless); empty: fusion and objects refused")})
    # outputs
    output_topic: str = field(
        default="~/output/labels",
        metadata={"description": "labelled PointCloud2 (x,y,z,intensity,label,score,rgb)"})
    output_reliability: Reliability = field(
        default="reliable",
        metadata={"description": "output QoS reliability"})
    output_depth: int = field(default=1, metadata={"description": "output QoS history depth"})
    publish_overlay: bool = field(
        default=False,
        metadata={"description": "publish the labels drawn over the first camera image"})
    publish_legend: bool = field(
        default=True,
        metadata={"description": "publish a MarkerArray legend of the vocabulary"})
    publish_objects: bool = field(
        default=False,
        metadata={"description": ("publish PointCLIP object labels (boxes and texts) as a "
                                  "MarkerArray; needs clip_pretrained")})
    objects_topic: str = field(
        default="~/output/objects",
        metadata={"description": "MarkerArray topic of the object labels"})
    objects_mode: Literal["every_frame", "on_demand"] = field(
        default="every_frame",
        metadata={"description": ("every_frame: label the objects of every frame; on_demand: only "
                                  "the next frame after a call of the ~/classify_objects service "
                                  "(std_srvs/Trigger)")})
    objects_budget_ms: float = field(
        default=50.0,
        metadata={"description": ("time per frame for the object pass; objects are labelled "
                                  "largest first and the rest keep their segmentation class (0: "
                                  "none labelled)")})
    objects_vocabulary: str = field(
        default="",
        metadata={"description": ("vocabulary YAML or built-in name PointCLIP names objects with; "
                                  "empty: the object classes of the labelling vocabulary")})
    objects_classes: list[str] = field(
        default_factory=list,
        metadata={"description": ("classes of the labelling vocabulary clustered into objects; "
                                  "empty: those named like objects (car, pedestrian, pole, ...)")})
    objects_ensemble_weight: float = field(
        default=0.0,
        metadata={"description": ("weight of the segmentation network's pooled log-probabilities "
                                  "added to PointCLIP's object logits; 0: PointCLIP alone")})
    publish_latency: bool = field(
        default=True,
        metadata={"description": "publish per-stage latency topics (ms)"})
    diagnostics_period_s: float = field(
        default=1.0,
        metadata={"description": "diagnostics publishing period (s)"})
    log_throttle_s: float = field(
        default=5.0,
        metadata={"description": "at most one log line per kind of bad message per period"})


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
                        "engine_min_points": self.engine_min_points,
                        "engine_opt_points": self.engine_opt_points,
                        "engine_max_points": self.engine_max_points,
                        "threads": self.threads,
                        "log_throttle_s": self.log_throttle_s,
                        "objects_budget_ms": self.objects_budget_ms,
                        "objects_ensemble_weight": self.objects_ensemble_weight}
        for key, value in non_negative.items():
            if not value >= 0:
                raise ConfigError(key, f"must be >= 0, got {value}")
        profile = [("engine_min_points", self.engine_min_points),
                   ("engine_opt_points", self.engine_opt_points),
                   ("engine_max_points", self.engine_max_points)]
        given = [(k, v) for k, v in profile if v > 0]
        for (low_key, low), (key, value) in itertools.pairwise(given):
            if value < low:
                raise ConfigError(key, f"must be >= {low_key} ({low}), got {value}")
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

    def engine_profile(self) -> tuple[int, int, int] | None:
        """The TensorRT (min, opt, max) points given (0: the bundle's), or None for none."""
        profile = (self.engine_min_points, self.engine_opt_points, self.engine_max_points)
        return profile if any(profile) else None

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


def description(name: str) -> str:
    """The ROS parameter description of the :class:`NodeParams` field ``name``."""
    return str(_FIELDS[name].metadata["description"])


_FIELDS = {f.name: f for f in fields(NodeParams)}


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
    when it names a file), and the engine cache that will be used
    (:func:`~.runtime.engine_cache.engine_cache_dir`: ``<model_path>/engines`` when
    ``engine_cache_dir`` is empty) spelt out."""
    values: dict[str, Any] = {name: resolve_path(getattr(params, name)) for name in PATH_PARAMETERS}
    values["objects_vocabulary"] = resolve_vocabulary_path(params.objects_vocabulary)
    if not values["engine_cache_dir"] and values["model_path"]:
        values["engine_cache_dir"] = str(engine_cache_dir(values["model_path"]))
    return replace(params, **values)
