"""What one codec-level case runs: the decode calls the node makes for a message, plus checks
that an accepted message gave a sane result (a codec must never return garbage silently).

Each ``check_*`` returns normally when the message is accepted, raises
:class:`~clip2scene_ros.errors.MessageError` when it is rejected, and raises
:class:`InvariantError` when a codec accepted it but returned something inconsistent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..codecs import (
    camera_info_to_model,
    decode_image,
    decode_pointcloud2,
    decode_xyz,
    image_to_rgb8,
    lidar_points,
    model_to_camera_info,
)
from ..codecs.messages import rosbags_factory, stamp_to_ns
from ..errors import MessageError
from ..geometry.projection import image_size


class InvariantError(AssertionError):
    """A codec accepted a message but its result breaks a rule it promises."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise InvariantError(what)


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except MessageError as exc:
        return exc


def check_pointcloud2(msg: Any) -> None:
    """decode_pointcloud2 (flat and organised), then lidar_points (the node's call) and
    decode_xyz (the hot path). Whatever decode_xyz refuses (x, y, z) lidar_points must refuse
    too; lidar_points alone also refuses a per-point channel (intensity, ring, time) that is
    not a scalar."""
    height, width = int(msg.height), int(msg.width)
    cloud = decode_pointcloud2(msg)
    organized = decode_pointcloud2(msg, organized=True)
    _expect(cloud.shape == (height * width,) and organized.shape == (height, width),
            f"shapes {cloud.shape} / {organized.shape} for {height}x{width}")
    points = _outcome(lambda: lidar_points(cloud, stamp_ns=stamp_to_ns(msg.header.stamp)))
    xyz = _outcome(lambda: decode_xyz(msg))
    if isinstance(xyz, MessageError):
        _expect(isinstance(points, MessageError), f"decode_xyz refused ({xyz}), lidar_points "
                "did not")
        raise xyz
    if isinstance(points, MessageError):
        _expect(not any(f"'{axis}'" in points.field for axis in "xyz"),
                f"lidar_points refused ({points}), decode_xyz did not")
        raise points
    _expect(xyz.dtype == np.float32 and xyz.ndim == 2 and xyz.shape[1] == 3,
            f"decode_xyz gave {xyz.dtype} {xyz.shape}")
    _expect(bool(np.isfinite(xyz).all()), "decode_xyz kept a non-finite point")
    _expect(np.array_equal(xyz, points.xyz), "decode_xyz and lidar_points keep different points")
    _expect(points.index.shape == (len(xyz),) and bool((points.index < cloud.size).all()),
            "lidar_points index does not address the cloud")


def check_image(msg: Any) -> None:
    """decode_image, then image_to_rgb8 (the node's call; depth images are refused there)."""
    height, width = int(msg.height), int(msg.width)
    image = decode_image(msg)
    _expect(image.shape[:2] == (height, width) and not image.flags.writeable,
            f"decode_image gave {image.shape} for {height}x{width}")
    rgb = image_to_rgb8(msg)
    _expect(rgb.shape == (height, width, 3) and rgb.dtype == np.uint8,
            f"image_to_rgb8 gave {rgb.dtype} {rgb.shape}")


def check_compressed_image(msg: Any) -> None:
    """image_to_rgb8, which the node calls and which decodes JPEG/PNG."""
    rgb = image_to_rgb8(msg)
    _expect(rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
            and min(rgb.shape[:2]) > 0, f"image_to_rgb8 gave {rgb.dtype} {rgb.shape}")


def check_camera_info(msg: Any) -> None:
    """camera_info_to_model; the model must project (image_size) and survive a round trip."""
    model = camera_info_to_model(msg)
    width, height = image_size(model)
    _expect(width > 0 and height > 0, f"published image is {width}x{height}")
    back = camera_info_to_model(model_to_camera_info(model, stamp_ns=1, frame_id="camera",
                                                     factory=rosbags_factory()))
    same = all(np.array_equal(getattr(back, k), getattr(model, k)) for k in ("K", "D", "R", "P"))
    _expect(same and (back.width, back.height, back.distortion_model, back.binning_x,
                      back.binning_y, back.roi) == (model.width, model.height,
                                                    model.distortion_model, model.binning_x,
                                                    model.binning_y, model.roi),
            "CameraInfo -> model -> CameraInfo changed the model")


CHECKS: dict[str, Callable[[Any], None]] = {
    "pointcloud2": check_pointcloud2,
    "image": check_image,
    "compressed_image": check_compressed_image,
    "camera_info": check_camera_info,
}
