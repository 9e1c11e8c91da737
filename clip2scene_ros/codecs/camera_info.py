"""``sensor_msgs/CameraInfo`` ↔ :class:`~clip2scene_ros.geometry.camera_model.CameraModel`."""

from __future__ import annotations

import array
from typing import Any

import numpy as np

from ..errors import MessageError
from ..geometry.camera_model import DISTORTION_MODELS, CameraModel, RegionOfInterest
from ..geometry.projection import image_size
from .messages import MessageFactory, make_header

KIND = "CameraInfo"


def _matrix(msg: Any, field: str, shape: tuple[int, int]) -> np.ndarray:
    values = np.asarray(getattr(msg, field), dtype=np.float64).reshape(-1)
    if values.size != shape[0] * shape[1]:
        raise MessageError(KIND, field, f"has {values.size} values, needs {shape[0] * shape[1]}")
    if not np.isfinite(values).all():
        raise MessageError(KIND, field, "has non-finite values")
    return values.reshape(shape)


def camera_info_to_model(msg: Any) -> CameraModel:
    """The camera model of a CameraInfo; an uncalibrated one (K all zeros) is refused.

    An all-zero ``R`` (some drivers leave it unset) means identity and an all-zero ``P`` means
    ``[K | 0]``. An empty ``distortion_model`` is accepted only with no coefficients.
    """
    K = _matrix(msg, "k", (3, 3))
    if not K.any():
        raise MessageError(KIND, "k", "is all zeros: the camera is not calibrated")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise MessageError(KIND, "k", f"focal lengths must be positive, got fx={K[0, 0]}, "
                           f"fy={K[1, 1]}")
    D = np.asarray(msg.d, dtype=np.float64).reshape(-1)
    if not np.isfinite(D).all():
        raise MessageError(KIND, "d", "has non-finite values")
    distortion = str(msg.distortion_model) or ("none" if D.size == 0 else "")
    if distortion not in DISTORTION_MODELS:
        raise MessageError(KIND, "distortion_model",
                           f"{msg.distortion_model!r} is not one of {sorted(DISTORTION_MODELS)}")
    if distortion == "none" and D.any():
        raise MessageError(KIND, "d", "has coefficients but no distortion_model")
    if distortion != "none" and D.size not in DISTORTION_MODELS[distortion]:
        raise MessageError(KIND, "d", f"has {D.size} coefficients; {distortion} takes "
                           f"{' or '.join(map(str, DISTORTION_MODELS[distortion]))}")
    R = _matrix(msg, "r", (3, 3))
    P = _matrix(msg, "p", (3, 4))
    roi = msg.roi
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise MessageError(KIND, "width/height", f"image size is {width}x{height}")
    binning = (int(msg.binning_x), int(msg.binning_y))
    if min(binning) < 0:
        raise MessageError(KIND, "binning_x/binning_y", f"must be >= 0, got {binning}")
    roi_model = RegionOfInterest(int(roi.x_offset), int(roi.y_offset), int(roi.width),
                                 int(roi.height), bool(roi.do_rectify))
    model = CameraModel(
        width=width,
        height=height,
        K=K,
        D=D if distortion != "none" else np.zeros(0),
        distortion_model=distortion,
        R=R if R.any() else np.eye(3),
        P=P if P.any() else None,
        binning_x=binning[0],
        binning_y=binning[1],
        roi=roi_model,
    )
    # The published window by projection's own rule, so every model accepted here can be
    # projected with (a zero ROI width or height means "to the sensor's edge", which an offset
    # can push past it).
    try:
        published = image_size(model)
    except ValueError as exc:
        raise MessageError(KIND, "roi", f"{roi_model} lies outside the {width}x{height} sensor"
                           ) from exc
    if min(published) <= 0:
        raise MessageError(KIND, "binning_x/binning_y", f"binning {binning} leaves no pixel of "
                           f"the {width}x{height} sensor's region")
    return model


def model_to_camera_info(
    model: CameraModel, *, stamp_ns: int, frame_id: str, factory: MessageFactory
) -> Any:
    """A CameraInfo (of the factory's flavour) describing ``model``."""
    if factory.flavour == "rosbags":
        d: Any = np.array(model.D, dtype=np.float64)
    else:  # rclpy takes float64[] fastest (and only) as array('d')
        d = array.array("d", model.D.tolist())
    roi = model.roi
    return factory("sensor_msgs/msg/CameraInfo")(
        header=make_header(factory, stamp_ns, frame_id),
        height=model.height,
        width=model.width,
        distortion_model="" if model.distortion_model == "none" else model.distortion_model,
        d=d,
        k=np.array(model.K, dtype=np.float64).reshape(9),
        r=np.array(model.R, dtype=np.float64).reshape(9),
        p=np.array(model.P, dtype=np.float64).reshape(12),
        binning_x=model.binning_x,
        binning_y=model.binning_y,
        roi=factory("sensor_msgs/msg/RegionOfInterest")(
            x_offset=roi.x_offset, y_offset=roi.y_offset, height=roi.height, width=roi.width,
            do_rectify=roi.do_rectify),
    )
