"""``Frame``: the one unit of sensor data that bags, the node, training and evaluation share.

A Frame is what the codecs and the bag reader produce and what everything downstream consumes:
one LiDAR sweep in its own frame, plus the camera images synchronized to it and the calibration
needed to relate the two. It holds numpy arrays only: no ROS types, so the core stays ROS-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry.camera_model import CameraModel


@dataclass(frozen=True)
class CameraView:
    """One camera's image synchronized to a LiDAR sweep.

    Attributes:
        name: camera name (e.g. ``"CAM_FRONT"``), stable across frames.
        image: ``(H, W, 3)`` uint8 RGB, as published (binned/cropped if the camera does so).
        camera: intrinsics from CameraInfo or a calibration file.
        lidar_to_camera: ``(4, 4)`` float64 transform taking LiDAR-frame points (at the sweep's
            stamp) into this camera's optical frame (z forward, x right, y down) at the image's
            stamp; ego motion between the two stamps is folded in when poses are known.
        stamp_ns: image stamp in nanoseconds.
        frame_id: the image's optical frame id.
    """

    name: str
    image: np.ndarray
    camera: CameraModel
    lidar_to_camera: np.ndarray
    stamp_ns: int
    frame_id: str = ""


@dataclass(frozen=True)
class Frame:
    """One LiDAR sweep with its synchronized cameras.

    Attributes:
        stamp_ns: sweep stamp (header stamp of the PointCloud2) in nanoseconds.
        frame_id: the LiDAR frame id.
        xyz: ``(N, 3)`` float32 finite points in the LiDAR frame.
        intensity: ``(N,)`` float32, or None if the sensor has no intensity field.
        ring: ``(N,)`` uint16 laser/ring index, or None.
        time: ``(N,)`` float32 seconds of each point relative to ``stamp_ns``, or None.
        labels: ``(N,)`` uint16 ground-truth labels where the recording carries them, or None.
        cameras: the synchronized camera views (possibly empty: LiDAR-only).
        pose: ``(4, 4)`` float64 world←LiDAR pose at ``stamp_ns``, or None without odometry.
        index: position of the frame in its source (bag message order), for resumable readers.
        skipped_cameras: ``(camera name, reason)`` of each camera the reader left out of
            ``cameras`` for this frame (e.g. ``no_camera_info``, ``image_malformed``).
    """

    stamp_ns: int
    frame_id: str
    xyz: np.ndarray
    intensity: np.ndarray | None = None
    ring: np.ndarray | None = None
    time: np.ndarray | None = None
    labels: np.ndarray | None = None
    cameras: tuple[CameraView, ...] = field(default_factory=tuple)
    pose: np.ndarray | None = None
    index: int = 0
    skipped_cameras: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3:
            raise ValueError(f"Frame.xyz must be (N, 3), got {self.xyz.shape}")
        n = self.xyz.shape[0]
        for name in ("intensity", "ring", "time", "labels"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"Frame.{name} must be ({n},), got {value.shape}")

    @property
    def num_points(self) -> int:
        return int(self.xyz.shape[0])

    def camera(self, name: str) -> CameraView:
        for view in self.cameras:
            if view.name == name:
                return view
        raise KeyError(f"frame has no camera {name!r}; it has {[v.name for v in self.cameras]}")
