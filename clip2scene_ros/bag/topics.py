"""Which topics of a bag are the LiDAR, the cameras, the labels and the odometry.

Topics given in the configuration are used as they are (and checked to exist with the right
type); the rest is detected from the message types:

* LiDAR: the one ``PointCloud2`` topic whose name does not contain ``label``.
* Labels: the one ``PointCloud2`` topic whose name contains ``label`` (ground truth, optional).
* Cameras: ``Image``/``CompressedImage`` topics grouped by namespace with the ``CameraInfo`` of
  the same namespace: ``/CAM_FRONT/image/compressed`` and ``/CAM_FRONT/camera_info`` form camera
  ``CAM_FRONT``. A namespace with several image topics uses the raw ``Image`` (lossless, no JPEG
  decode). Depth images are not cameras for point–pixel pairing and are left out.
* Odometry: the one ``nav_msgs/Odometry`` topic, if any.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError

POINTCLOUD2 = "sensor_msgs/msg/PointCloud2"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
ODOMETRY = "nav_msgs/msg/Odometry"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)


@dataclass(frozen=True)
class CameraTopics:
    """One camera's topics.

    Attributes:
        name: camera name used in ``Frame.cameras`` and calibration files (e.g. ``CAM_FRONT``).
        image_topic: an ``Image`` or ``CompressedImage`` topic.
        info_topic: its ``CameraInfo`` topic; None when intrinsics come from a calibration file.
    """

    name: str
    image_topic: str
    info_topic: str | None = None


@dataclass(frozen=True)
class DetectedTopics:
    """The topics a reader uses, with the image topics it found but does not use."""

    lidar: str
    labels: str | None = None
    cameras: tuple[CameraTopics, ...] = ()
    tf: str | None = None
    tf_static: str | None = None
    odometry: str | None = None
    unused_images: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {
            "lidar": self.lidar,
            "labels": self.labels,
            "cameras": {
                c.name: {"image": c.image_topic, "info": c.info_topic} for c in self.cameras
            },
            "tf": self.tf,
            "tf_static": self.tf_static,
            "odometry": self.odometry,
            "unused_images": list(self.unused_images),
        }


def _parts(topic: str) -> list[str]:
    return [p for p in topic.split("/") if p]


def image_namespace(topic: str) -> str:
    """``/CAM_FRONT/image/compressed`` -> ``/CAM_FRONT``; ``/cam/left/image_raw`` -> ``/cam/left``.

    Strips a transport suffix (``compressed``) and then an ``image*`` leaf (``image``,
    ``image_raw``, ``image_rect_color`` ...).
    """
    parts = _parts(topic)
    if parts and parts[-1] in ("compressed", "compressedDepth", "theora", "zstd"):
        parts = parts[:-1]
    if len(parts) > 1 and parts[-1].startswith("image"):
        parts = parts[:-1]
    return "/" + "/".join(parts)


def info_namespace(topic: str) -> str:
    """``/CAM_FRONT/camera_info`` -> ``/CAM_FRONT``."""
    parts = _parts(topic)
    return "/" + "/".join(parts[:-1] if len(parts) > 1 else parts)


def camera_name(namespace: str) -> str:
    """Camera name of a namespace: ``/CAM_FRONT`` -> ``CAM_FRONT``, ``/a/left`` -> ``a_left``."""
    return "_".join(_parts(namespace)) or "camera"


def _one(candidates: list[str], what: str, key: str) -> str | None:
    if len(candidates) > 1:
        raise ConfigError(
            key, f"several {what} topics {candidates}; set {key} to the one to use"
        )
    return candidates[0] if candidates else None


def _check(topic_types: Mapping[str, str], topic: str, types: Sequence[str], key: str) -> None:
    if topic not in topic_types:
        raise ConfigError(key, f"topic {topic!r} is not in the bag (topics: {sorted(topic_types)})")
    if topic_types[topic] not in types:
        raise ConfigError(
            key, f"topic {topic!r} has type {topic_types[topic]}, expected {' or '.join(types)}"
        )


def detect_topics(
    topic_types: Mapping[str, str],
    *,
    lidar_topic: str | None = None,
    label_topic: str | None = None,
    cameras: Sequence[CameraTopics] | None = None,
    odometry_topic: str | None = None,
    tf_topic: str = "/tf",
    tf_static_topic: str = "/tf_static",
) -> DetectedTopics:
    """Choose the topics to read from a bag's ``{topic: message type}``.

    Arguments given are used (and checked); ``None`` means detect. ``cameras=()`` means no
    cameras (LiDAR-only). Ambiguities raise ``ConfigError`` naming the setting that resolves them.
    """
    by_type: dict[str, list[str]] = {}
    for topic, msgtype in sorted(topic_types.items()):
        by_type.setdefault(msgtype, []).append(topic)

    clouds = by_type.get(POINTCLOUD2, [])
    if lidar_topic is None:
        plain = [t for t in clouds if "label" not in t.lower()]
        if not plain:
            raise ConfigError(
                "lidar_topic", f"no PointCloud2 topic to use as the LiDAR (clouds: {clouds})"
            )
        lidar_topic = _one(plain, "PointCloud2", "lidar_topic")
    else:
        _check(topic_types, lidar_topic, (POINTCLOUD2,), "lidar_topic")
    assert lidar_topic is not None

    if label_topic is None:
        labels = [t for t in clouds if "label" in t.lower() and t != lidar_topic]
        label_topic = _one(labels, "label PointCloud2", "label_topic")
    else:
        _check(topic_types, label_topic, (POINTCLOUD2,), "label_topic")

    images = [t for ty in IMAGE_TYPES for t in by_type.get(ty, [])]
    if cameras is None:
        infos = {info_namespace(t): t for t in by_type.get(CAMERA_INFO, [])}
        groups: dict[str, list[str]] = {}
        for topic in images:
            if "depth" in topic.lower():
                continue
            groups.setdefault(image_namespace(topic), []).append(topic)
        found = []
        for ns, topics in sorted(groups.items()):
            # Prefer the raw Image (lossless, no decode), then the shortest name.
            topics.sort(key=lambda t: (topic_types[t] != IMAGE, len(t), t))
            found.append(CameraTopics(camera_name(ns), topics[0], infos.get(ns)))
        cameras = tuple(found)
    else:
        for i, cam in enumerate(cameras):
            _check(topic_types, cam.image_topic, IMAGE_TYPES, f"cameras[{i}].image_topic")
            if cam.info_topic is not None:
                _check(topic_types, cam.info_topic, (CAMERA_INFO,), f"cameras[{i}].info_topic")
        cameras = tuple(cameras)
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        raise ConfigError("cameras", f"camera names must be unique, got {names}")

    if odometry_topic is None:
        odometry_topic = _one(by_type.get(ODOMETRY, []), "Odometry", "odometry_topic")
    else:
        _check(topic_types, odometry_topic, (ODOMETRY,), "odometry_topic")

    used = {c.image_topic for c in cameras}
    return DetectedTopics(
        lidar=lidar_topic,
        labels=label_topic,
        cameras=cameras,
        tf=tf_topic if topic_types.get(tf_topic) == TF_MESSAGE else None,
        tf_static=tf_static_topic if topic_types.get(tf_static_topic) == TF_MESSAGE else None,
        odometry=odometry_topic,
        unused_images=tuple(t for t in images if t not in used),
    )
