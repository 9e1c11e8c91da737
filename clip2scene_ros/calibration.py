"""Calibration YAML: per camera, the LiDAR→camera extrinsic and optionally the intrinsics.

For recordings without ``/tf_static`` (or with a wrong one) and for the node when ``tf2_ros`` is
absent. The file::

    lidar_frame: LIDAR_TOP          # optional: the LiDAR frame id the extrinsics start from
    cameras:
      CAM_FRONT:                    # the camera name (topic namespace, see bag.topics)
        lidar_to_camera:            # 4x4 row-major, LiDAR points -> camera OPTICAL frame
          - [1.0, 0.0, 0.0, 0.0]
          - ...
        intrinsics:                 # optional; without it CameraInfo is used
          width: 1600
          height: 900
          K: [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]
          D: []
          distortion_model: none
      CAM_BACK:                     # or the static_transform_publisher form:
        parent_frame: LIDAR_TOP     #   pose of child_frame in parent_frame,
        child_frame: CAM_BACK       #   one of them the LiDAR (parent, unless lidar_frame
        translation: [x, y, z]      #   names the child), the other the camera's optical frame
        rotation: [qx, qy, qz, qw]

The extrinsics are the static rig calibration; the bag reader folds the ego motion between the
LiDAR and camera stamps in on top when poses are known (``ReaderConfig.fold_ego_motion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import load_config
from .errors import ConfigError
from .geometry.camera_model import DISTORTION_MODELS, CameraModel
from .geometry.transforms import invert_transform, make_transform

#: Largest deviation of an extrinsic's rotation block from orthonormal that is accepted (float32
#: calibration files round at ~1e-7; a transposed or scaled matrix is off by far more).
_ORTHONORMAL_TOL = 1e-4


@dataclass(frozen=True)
class IntrinsicsConfig:
    width: int
    height: int
    K: list[list[float]]
    D: list[float] = field(default_factory=list)
    distortion_model: str = "none"

    def validate(self) -> None:
        if self.width <= 0 or self.height <= 0:
            size = f"{self.width}x{self.height}"
            raise ConfigError("width", f"image size must be positive, got {size}")
        if np.shape(self.K) != (3, 3):
            raise ConfigError("K", f"must be a 3x3 matrix, got shape {np.shape(self.K)}")
        if self.distortion_model not in DISTORTION_MODELS:
            raise ConfigError(
                "distortion_model",
                f"must be one of {sorted(DISTORTION_MODELS)}, got {self.distortion_model!r}",
            )
        try:
            self.to_model()
        except ValueError as exc:
            raise ConfigError("D" if "CameraModel.D" in str(exc) else "K", str(exc)) from exc

    def to_model(self) -> CameraModel:
        return CameraModel(
            width=self.width,
            height=self.height,
            K=np.asarray(self.K, dtype=np.float64),
            D=np.asarray(self.D, dtype=np.float64),
            distortion_model=self.distortion_model,
        )


@dataclass(frozen=True)
class CameraCalibrationConfig:
    lidar_to_camera: list[list[float]] | None = None
    parent_frame: str | None = None
    child_frame: str | None = None
    translation: list[float] | None = None
    rotation: list[float] | None = None
    intrinsics: IntrinsicsConfig | None = None

    def validate(self) -> None:
        pose = {
            "parent_frame": self.parent_frame,
            "child_frame": self.child_frame,
            "translation": self.translation,
            "rotation": self.rotation,
        }
        given = [k for k, v in pose.items() if v is not None]
        if self.lidar_to_camera is not None:
            if given:
                raise ConfigError(
                    given[0],
                    "give either lidar_to_camera or the parent_frame/child_frame/translation/"
                    "rotation form, not both",
                )
            _check_extrinsic(np.asarray(self.lidar_to_camera, dtype=np.float64), "lidar_to_camera")
            return
        if not given:
            raise ConfigError(
                "lidar_to_camera",
                "is required (or parent_frame, child_frame, translation and rotation)",
            )
        for key, value in pose.items():
            if value is None:
                raise ConfigError(key, f"is required with {', '.join(given)}")
        if len(self.translation or ()) != 3:
            raise ConfigError("translation", f"must be [x, y, z], got {self.translation}")
        if len(self.rotation or ()) != 4:
            raise ConfigError("rotation", f"must be a quaternion [x, y, z, w], got {self.rotation}")
        if self.parent_frame == self.child_frame:
            raise ConfigError("child_frame", f"equals parent_frame {self.parent_frame!r}")
        try:
            make_transform(self.translation, self.rotation)
        except ValueError as exc:
            raise ConfigError("rotation", str(exc)) from exc


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration file as loaded by ``load_config`` (see the module docstring)."""

    cameras: dict[str, CameraCalibrationConfig]
    lidar_frame: str | None = None


def _check_extrinsic(T: np.ndarray, key: str) -> None:
    if T.shape != (4, 4):
        raise ConfigError(key, f"must be a 4x4 matrix (row-major), got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ConfigError(key, "has non-finite values")
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0]):
        raise ConfigError(key, f"last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    err = float(np.abs(R @ R.T - np.eye(3)).max())
    if err > _ORTHONORMAL_TOL or np.linalg.det(R) < 0:
        det = float(np.linalg.det(R))
        raise ConfigError(
            key, f"rotation block is not a rotation (|R R^T - I| = {err:.2g}, det = {det:.3g})"
        )


@dataclass(frozen=True)
class CameraCalibration:
    """One camera's calibration, resolved.

    Attributes:
        name: camera name.
        lidar_to_camera: (4, 4) float64, LiDAR points -> camera optical frame (static rig).
        camera: intrinsics, or None to take them from CameraInfo.
        frame_id: the camera's optical frame id where the file names it, else None.
    """

    name: str
    lidar_to_camera: np.ndarray
    camera: CameraModel | None = None
    frame_id: str | None = None


@dataclass(frozen=True)
class Calibration:
    cameras: dict[str, CameraCalibration]
    lidar_frame: str | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.cameras

    def __getitem__(self, name: str) -> CameraCalibration:
        try:
            return self.cameras[name]
        except KeyError:
            raise KeyError(
                f"calibration has no camera {name!r}; it has {sorted(self.cameras)}"
            ) from None


def _resolve(name: str, cfg: CameraCalibrationConfig, lidar_frame: str | None, source: str | None
             ) -> CameraCalibration:
    camera = None if cfg.intrinsics is None else cfg.intrinsics.to_model()
    if cfg.lidar_to_camera is not None:
        T = np.asarray(cfg.lidar_to_camera, dtype=np.float64)
        return CameraCalibration(name, T, camera)
    T_parent_child = make_transform(cfg.translation, cfg.rotation)
    if lidar_frame is None or cfg.parent_frame == lidar_frame:
        # parent is the LiDAR: T_lidar<-camera, so LiDAR->camera is its inverse.
        return CameraCalibration(name, invert_transform(T_parent_child), camera, cfg.child_frame)
    if cfg.child_frame == lidar_frame:
        return CameraCalibration(name, T_parent_child, camera, cfg.parent_frame)
    raise ConfigError(
        f"cameras.{name}.parent_frame",
        f"one of parent_frame {cfg.parent_frame!r} / child_frame {cfg.child_frame!r} must be the "
        f"LiDAR frame {lidar_frame!r}",
        source,
    )


def load_calibration(source: str | Path | dict[str, Any]) -> Calibration:
    """Load a calibration YAML (path or parsed mapping); errors name the offending key."""
    cfg = load_config(CalibrationConfig, source)
    origin = None if isinstance(source, dict) else str(source)
    cameras = {
        name: _resolve(name, cam, cfg.lidar_frame, origin) for name, cam in cfg.cameras.items()
    }
    return Calibration(cameras, cfg.lidar_frame)


def calibration_to_dict(calibration: Calibration) -> dict[str, Any]:
    """The YAML-able mapping of ``calibration`` (extrinsics as ``lidar_to_camera`` matrices)."""
    cameras: dict[str, Any] = {}
    for name, cam in calibration.cameras.items():
        entry: dict[str, Any] = {"lidar_to_camera": np.asarray(cam.lidar_to_camera).tolist()}
        model = cam.camera
        if model is not None:
            if model.binning_x > 1 or model.binning_y > 1 or model.roi.width or model.roi.height:
                raise ValueError(
                    f"camera {name!r}: binning/ROI cannot be saved to a calibration file; give "
                    "the intrinsics of the published image"
                )
            entry["intrinsics"] = {
                "width": int(model.width),
                "height": int(model.height),
                "K": model.K.tolist(),
                "D": model.D.tolist(),
                "distortion_model": model.distortion_model,
            }
        cameras[name] = entry
    out: dict[str, Any] = {"cameras": cameras}
    if calibration.lidar_frame is not None:
        out = {"lidar_frame": calibration.lidar_frame, **out}
    return out


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write ``calibration`` as YAML (floats round-trip exactly); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(calibration_to_dict(calibration), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
