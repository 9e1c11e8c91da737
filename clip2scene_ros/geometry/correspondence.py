"""Point–pixel pairs: which LiDAR point lands on which pixel of which camera.

This is the link CLIP2Scene distils through: every pair ties a 3D point to the teacher's pixel
feature. A point seen by two overlapping cameras gives two pairs. Everything is vectorised over
points; the only Python loop is over the (few) cameras.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..frame import Frame
from .camera_model import CameraModel
from .projection import image_size, project_points
from .transforms import transform_points


@dataclass(frozen=True)
class PointPixelPairs:
    """M point–camera pairs, ordered by camera and then by point index.

    Attributes:
        point_index: (M,) int64 row of the point in the cloud.
        camera_index: (M,) int32 position of the camera in the list given.
        uv: (M, 2) float32 continuous pixel coordinates in the published image.
        pixel: (M, 2) int32 ``floor(uv)`` as (col, row), computed from the float64 coordinates.
        depth: (M,) float32 depth (optical z) in metres.
    """

    point_index: np.ndarray
    camera_index: np.ndarray
    uv: np.ndarray
    pixel: np.ndarray
    depth: np.ndarray

    def __post_init__(self) -> None:
        m = self.point_index.shape[0]
        expected = {
            "point_index": ((m,), np.int64),
            "camera_index": ((m,), np.int32),
            "uv": ((m, 2), np.float32),
            "pixel": ((m, 2), np.int32),
            "depth": ((m,), np.float32),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(
                    f"PointPixelPairs.{name} must be {shape} {np.dtype(dtype).name}, "
                    f"got {value.shape} {value.dtype}"
                )

    @property
    def num_pairs(self) -> int:
        return int(self.point_index.shape[0])

    def distinct_points(self) -> np.ndarray:
        """Sorted unique indices of the points seen by at least one camera (int64)."""
        return np.unique(self.point_index)

    def count_per_camera(self, num_cameras: int) -> np.ndarray:
        """(num_cameras,) int64 number of pairs of each camera."""
        if self.num_pairs and int(self.camera_index.max()) >= num_cameras:
            raise ValueError(
                f"pairs reference camera {int(self.camera_index.max())}, "
                f"but num_cameras is {num_cameras}"
            )
        return np.bincount(self.camera_index, minlength=num_cameras).astype(np.int64)


def _empty_pairs() -> PointPixelPairs:
    return PointPixelPairs(
        point_index=np.zeros(0, np.int64),
        camera_index=np.zeros(0, np.int32),
        uv=np.zeros((0, 2), np.float32),
        pixel=np.zeros((0, 2), np.int32),
        depth=np.zeros(0, np.float32),
    )


def _visible_in_zbuffer(
    pixel: np.ndarray, depth: np.ndarray, width: int, radius: int, tolerance: float
) -> np.ndarray:
    """Mask of pairs within ``tolerance`` of the nearest depth in their pixel's neighbourhood.

    A sparse z-buffer: the minimum depth per occupied pixel (``np.minimum.at`` over unique
    pixel keys), looked up for each point over the (2r+1)² pixels around it. With r = 0 only
    points falling in the very same pixel occlude each other; LiDAR is sparse in the image, so
    r = 1..2 is what catches a far point seen through the gaps of a near surface. Memory is
    O(M), never O(image).
    """
    keys = pixel[:, 1].astype(np.int64) * width + pixel[:, 0]
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    nearest_per_key = np.full(unique_keys.size, np.inf)
    np.minimum.at(nearest_per_key, inverse, depth)
    nearest = nearest_per_key[inverse]
    if radius > 0:
        col, row = pixel[:, 0].astype(np.int64), pixel[:, 1].astype(np.int64)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx == 0 and dy == 0:
                    continue
                c = col + dx
                # Neighbours off the left/right edge must not wrap onto the adjacent row.
                inside = (c >= 0) & (c < width)
                neighbour = (row + dy) * width + c
                pos = np.minimum(np.searchsorted(unique_keys, neighbour), unique_keys.size - 1)
                found = inside & (unique_keys[pos] == neighbour)
                nearest = np.where(found, np.minimum(nearest, nearest_per_key[pos]), nearest)
    return depth <= nearest + tolerance


def point_pixel_pairs(
    xyz: Any,
    cameras: Sequence[tuple[CameraModel, np.ndarray]],
    *,
    min_depth: float = 1.0,
    occlusion: bool = False,
    occlusion_tolerance: float = 0.5,
    occlusion_radius: int = 0,
) -> PointPixelPairs:
    """Pairs of every point and every camera whose published image it falls in.

    Args:
        xyz: (N, 3) points in the LiDAR frame (computed in float64 whatever the input dtype).
        cameras: ``(model, lidar_to_camera)`` per camera; ``lidar_to_camera`` is (4, 4) into
            the optical frame.
        min_depth: keep pairs with depth > ``min_depth`` metres (the LiDAR sees the ego car's
            own roof and mirrors closer than that).
        occlusion: keep only points within ``occlusion_tolerance`` metres of the nearest depth
            at their pixel (a z-buffer), so a far point does not take the colour of a near one.
        occlusion_tolerance: metres behind the nearest surface still counted as visible.
        occlusion_radius: z-buffer neighbourhood half-size in published pixels (0: the pixel
            itself); see ``_visible_in_zbuffer``.

    A pair is kept when ``depth > min_depth`` and ``0 <= u < width``, ``0 <= v < height`` in
    the published image (``image_size``); its pixel is ``floor(uv)``.
    """
    pts = np.asarray(xyz)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {pts.shape}")
    pts = pts.astype(np.float64, copy=False)
    if not np.isfinite(min_depth):
        raise ValueError(f"min_depth must be finite, got {min_depth}")
    if occlusion and not (occlusion_tolerance >= 0.0):
        raise ValueError(f"occlusion_tolerance must be >= 0, got {occlusion_tolerance}")
    if occlusion_radius < 0:
        raise ValueError(f"occlusion_radius must be >= 0, got {occlusion_radius}")

    parts: list[PointPixelPairs] = []
    for c, entry in enumerate(cameras):
        try:
            model, lidar_to_camera = entry
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cameras[{c}] must be a (CameraModel, 4x4) pair") from exc
        if not isinstance(model, CameraModel):
            raise ValueError(f"cameras[{c}][0] must be a CameraModel, got {type(model).__name__}")
        try:
            uv, depth = project_points(transform_points(lidar_to_camera, pts), model)
        except ValueError as exc:
            raise ValueError(f"cameras[{c}]: {exc}") from exc
        width, height = image_size(model)
        with np.errstate(invalid="ignore"):  # NaN uv (behind the camera) compares False
            keep = (
                (depth > min_depth)
                & (uv[:, 0] >= 0.0) & (uv[:, 0] < width)
                & (uv[:, 1] >= 0.0) & (uv[:, 1] < height)
            )  # fmt: skip
        index = np.flatnonzero(keep)
        uv, depth = uv[index], depth[index]
        pixel = np.floor(uv).astype(np.int32)
        if occlusion and index.size:
            visible = _visible_in_zbuffer(
                pixel, depth, width, occlusion_radius, occlusion_tolerance
            )
            index, uv, depth, pixel = index[visible], uv[visible], depth[visible], pixel[visible]
        # float32 may round u = 1599.99999 up to 1600.0; clamp so floor(uv) == pixel still holds.
        uv32 = np.minimum(uv.astype(np.float32), np.nextafter((pixel + 1).astype(np.float32), 0))
        parts.append(
            PointPixelPairs(
                point_index=index.astype(np.int64),
                camera_index=np.full(index.size, c, dtype=np.int32),
                uv=uv32,
                pixel=pixel,
                depth=depth.astype(np.float32),
            )
        )
    if not parts:
        return _empty_pairs()
    return PointPixelPairs(
        point_index=np.concatenate([p.point_index for p in parts]),
        camera_index=np.concatenate([p.camera_index for p in parts]),
        uv=np.concatenate([p.uv for p in parts]),
        pixel=np.concatenate([p.pixel for p in parts]),
        depth=np.concatenate([p.depth for p in parts]),
    )


def frame_pairs(frame: Frame, **kwargs: Any) -> PointPixelPairs:
    """``point_pixel_pairs`` over ``frame.cameras``; camera_index is the position in that tuple.

    Each view's image must have the published size of its camera model, otherwise the pixels
    would index the wrong place (ValueError naming the camera).
    """
    for view in frame.cameras:
        expected = image_size(view.camera)
        got = (view.image.shape[1], view.image.shape[0]) if view.image.ndim >= 2 else None
        if got != expected:
            raise ValueError(
                f"camera {view.name!r}: image is {got} (width, height) but its CameraModel "
                f"publishes {expected}"
            )
    return point_pixel_pairs(
        frame.xyz, [(view.camera, view.lidar_to_camera) for view in frame.cameras], **kwargs
    )
