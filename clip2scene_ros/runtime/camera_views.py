"""The cameras of a rig, and the views of one frame: intrinsics, extrinsics, images, or why not.

ROS-free. The node decodes each CameraInfo into a :class:`~clip2scene_ros.geometry.camera_model.
CameraModel` (:meth:`CameraRig.set_intrinsics`) and hands each synced image over as a
:class:`CameraImage` whose ``decode`` runs only when a view needs the pixels; transforms come
through a :data:`TransformLookup` (tf2 in the node).

Contract of :meth:`CameraRig.views`, per configured camera, in order:

1. no synced image: skipped, "no image within <slop> s of the cloud (waited <timeout> s)";
2. intrinsics: the calibration file's camera model wins over CameraInfo; neither: skipped,
   "no CameraInfo on <info topic> yet";
3. extrinsics (LiDAR → camera optical frame): the calibration file's, by camera name or the
   image's frame id, when the file calibrates the cloud's frame (or names none); else the
   lookup (its reason when it fails); without a lookup, the reason none applies;
4. only with ``decode``: the image is decoded (a ``MessageError`` is reported to ``bad`` and the
   camera skipped as "image malformed (<field>)"), and an image whose size differs from its
   intrinsics is skipped.

A rig with cameras, no calibration file and no lookup is *unusable* (:attr:`CameraRig.unusable`):
every camera is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..bag.topics import camera_name, image_namespace
from ..calibration import Calibration
from ..errors import ConfigError, MessageError
from ..frame import CameraView, Frame
from ..geometry.camera_model import CameraModel
from ..geometry.projection import image_size
from ..node_params import NodeParams

#: ``lookup(target, source, stamp_ns, latest)``: the 4x4 transform ``target`` ← ``source`` at
#: ``stamp_ns``, or why there is none. ``latest`` allows the newest transform instead (right for
#: a static rig, wrong for an ego pose).
TransformLookup = Callable[[str, str, int, bool], "np.ndarray | str"]


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
    """The configured cameras; two topics giving one camera name are a ``ConfigError``."""
    out = [CameraInput(camera_name(image_namespace(topic)), topic, info)
           for topic, info in zip(params.camera_topics, params.info_topics(), strict=True)]
    names = [c.name for c in out]
    for name in set(names):
        if names.count(name) > 1:
            topics = [c.image_topic for c in out if c.name == name]
            raise ConfigError("camera_topics", f"topics {topics} give one camera name {name!r}; "
                              "put each camera in its own namespace")
    return out


@dataclass(frozen=True)
class CameraImage:
    """A synced image, not decoded yet: ``decode()`` returns it as RGB8 ``[H, W, 3]`` or raises
    ``MessageError``."""

    stamp_ns: int
    frame_id: str
    decode: Callable[[], np.ndarray]


@dataclass(frozen=True)
class Views:
    """The usable cameras of one frame: their views (when decoded), names, and why each other
    camera was left out."""

    views: list[CameraView]
    used: list[str]
    skipped: dict[str, str]


def lookup_or_reason(lookup: TransformLookup | None, target: str, source: str, stamp_ns: int,
                     latest: bool = True) -> np.ndarray | str:
    """``lookup``'s answer, or why it cannot be asked (no lookup, an empty frame id)."""
    if lookup is None:
        return "tf2_ros is not installed"
    if not target or not source:
        return "no extrinsics: the image or cloud has an empty header.frame_id"
    return lookup(target, source, stamp_ns, latest)


class CameraRig:
    """The configured cameras, their calibration and latest intrinsics (see the module doc)."""

    def __init__(self, cameras: list[CameraInput], calibration: Calibration | None,
                 calibration_file: str, slop_s: float, timeout_s: float) -> None:
        self.cameras = cameras
        self.calibration = calibration
        self.calibration_file = calibration_file
        self.slop_s, self.timeout_s = slop_s, timeout_s
        self.camera_models: dict[str, CameraModel] = {}  # latest CameraInfo per camera
        self.lookup: TransformLookup | None = None
        self.unusable: str | None = None

    def needs_lookup(self) -> bool:
        """Whether some camera's extrinsics must come from a lookup (none in the file)."""
        return bool(self.cameras) and (self.calibration is None or any(
            c.name not in self.calibration for c in self.cameras))

    def set_intrinsics(self, camera: str, model: CameraModel) -> None:
        self.camera_models[camera] = model

    def intrinsics(self, cam: CameraInput) -> CameraModel | None:
        if self.calibration is not None and cam.name in self.calibration:
            model = self.calibration[cam.name].camera
            if model is not None:  # the file's intrinsics win over CameraInfo, as in the reader
                return model
        return self.camera_models.get(cam.name)

    def extrinsic(self, cam: CameraInput, camera_frame: str, frame: Frame) -> np.ndarray | str:
        """LiDAR → camera optical frame from the calibration file, else the lookup; or why not."""
        lidar = self.calibration.lidar_frame if self.calibration is not None else None
        if self.calibration is not None and lidar in (None, frame.frame_id):
            for key in (cam.name, camera_frame):
                if key and key in self.calibration:
                    return np.asarray(self.calibration[key].lidar_to_camera, dtype=np.float64)
        if self.lookup is None:
            if lidar is not None and lidar != frame.frame_id:
                # the file's extrinsics start from another frame: using them would misplace
                # every point in the image, so this cloud goes without the camera
                return (f"no extrinsics: the cloud is in frame {frame.frame_id!r}, "
                        f"{self.calibration_file} calibrates {lidar!r}")
            return (f"no extrinsics: {cam.name!r} is not in {self.calibration_file} and "
                    "tf2_ros is not installed")
        return lookup_or_reason(self.lookup, camera_frame, frame.frame_id, frame.stamp_ns)

    def views(self, images: Mapping[str, CameraImage], frame: Frame, *, decode: bool,
              bad: Callable[[MessageError], object]) -> Views:
        """The views of ``frame`` from its synced ``images`` (by camera name); see the module
        doc. Without ``decode`` no image is decoded: nothing would read it (a JPEG costs
        milliseconds per camera and frame), and its faults surface once fusion or the overlay
        needs it."""
        if self.unusable:
            return Views([], [], {c.name: self.unusable for c in self.cameras})
        out = Views([], [], {})
        for cam in self.cameras:
            image = images.get(cam.name)
            if image is None:
                out.skipped[cam.name] = (f"no image within {self.slop_s} s of the cloud "
                                         f"(waited {self.timeout_s} s)")
                continue
            model = self.intrinsics(cam)
            if model is None:
                out.skipped[cam.name] = f"no CameraInfo on {cam.info_topic} yet"
                continue
            extrinsic = self.extrinsic(cam, image.frame_id, frame)
            if isinstance(extrinsic, str):
                out.skipped[cam.name] = extrinsic
                continue
            if not decode:
                out.used.append(cam.name)
                continue
            try:
                rgb = image.decode()
            except MessageError as exc:
                bad(exc)
                out.skipped[cam.name] = f"image malformed ({exc.field})"
                continue
            size = (rgb.shape[1], rgb.shape[0])
            if image_size(model) != size:
                out.skipped[cam.name] = (f"image is {size[0]}x{size[1]} but its intrinsics "
                                         f"publish {image_size(model)[0]}x"
                                         f"{image_size(model)[1]}")
                continue
            out.views.append(CameraView(cam.name, rgb, model, extrinsic, image.stamp_ns,
                                        image.frame_id))
            out.used.append(cam.name)
        return out
