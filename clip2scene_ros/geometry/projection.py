"""Projection of camera-frame points into the published image of a ``CameraModel``.

Conventions (shared with ``correspondence`` and ``/work/shared/data/README.md``):

* Points are in the camera's OPTICAL frame (z forward, x right, y down); depth is z.
* We project into the RAW image with ``K`` and ``D``. ``R`` (the stereo rectification rotation)
  and ``P`` only describe the rectified image, which is not what the camera drivers publish on
  ``image_raw``/``compressed``, so they are not applied. For an undistorted camera (``D`` = 0
  and ``R`` = I, as in nuScenes) both images coincide.
* ``uv`` are continuous pixel coordinates in the PUBLISHED image: the full-resolution coordinate
  is shifted by the ROI offset and divided by the binning factor, exactly as ``image_geometry``
  adjusts K (``cx' = (cx - x_offset) / binning_x``, ``fx' = fx / binning_x``).
* Pixel ``i`` spans ``[i, i + 1)``: the pixel index of ``u`` is ``floor(u)``, valid when
  ``0 <= u < width``. Under this convention binning is exactly a division.
* A point with depth <= 0 (or non-finite) gets NaN ``uv``, so no comparison can make it valid.

The distortion formulas are OpenCV's (``projectPoints`` and ``fisheye::projectPoints``), written
out in numpy because OpenCV is not a dependency of the core and the formulas are short.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .camera_model import CameraModel


def _plumb_bob(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k1, k2, p1, p2, k3 = d
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return xd, yd


def _rational(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coeffs = np.zeros(14)
    coeffs[: d.size] = d
    k1, k2, p1, p2, k3, k4, k5, k6, s1, s2, s3, s4, tau_x, tau_y = coeffs
    if tau_x != 0.0 or tau_y != 0.0:
        # The tilted-sensor model (Scheimpflug cameras) is not supported; projecting without it
        # would silently put points in the wrong pixels.
        raise ValueError(
            f"rational_polynomial tilt coefficients tx={tau_x}, ty={tau_y} are not supported "
            "(only zero tilt)"
        )
    r2 = x * x + y * y
    r4 = r2 * r2
    with np.errstate(divide="ignore", invalid="ignore"):
        radial = (1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1.0 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x) + s1 * r2 + s2 * r4
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y + s3 * r2 + s4 * r4
    return xd, yd


def _equidistant(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # OpenCV fisheye (Kannala–Brandt): theta = atan(r), theta_d = theta (1 + k1 θ² + … + k4 θ⁸).
    k1, k2, k3, k4 = d
    r = np.hypot(x, y)
    theta = np.arctan(r)
    t2 = theta * theta
    theta_d = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    small = r < 1e-8  # on the axis theta_d / r -> 1
    scale = np.where(small, 1.0, theta_d / np.where(small, 1.0, r))
    return x * scale, y * scale


def distort_normalized(x: Any, y: Any, camera: CameraModel) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``camera``'s lens distortion to normalised coordinates ``x = X/Z``, ``y = Y/Z``.

    Supports ``none``, ``plumb_bob`` (k1 k2 t1 t2 k3), ``rational_polynomial`` (k1 k2 t1 t2 k3
    k4 k5 k6, optionally s1..s4 thin prism; tilt tx, ty must be zero) and ``equidistant``
    (k1..k4, OpenCV fisheye). Returns float64 arrays of the broadcast shape of ``x`` and ``y``.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    model = camera.distortion_model
    # All-zero D is the identity for the polynomial models, but not for equidistant (theta != r).
    if model == "none" or (model != "equidistant" and not np.any(camera.D)):
        return x.copy(), y.copy()
    if model == "plumb_bob":
        return _plumb_bob(x, y, camera.D)
    if model == "rational_polynomial":
        return _rational(x, y, camera.D)
    if model == "equidistant":
        return _equidistant(x, y, camera.D)
    raise ValueError(f"distortion model {model!r} is not supported")  # CameraModel forbids it


def _published_window(camera: CameraModel) -> tuple[int, int, int, int, int, int]:
    """(x_offset, y_offset, roi_width, roi_height, binning_x, binning_y) in full-res pixels."""
    roi = camera.roi
    bx, by = max(1, camera.binning_x), max(1, camera.binning_y)
    if roi.x_offset < 0 or roi.y_offset < 0 or roi.width < 0 or roi.height < 0:
        raise ValueError(f"CameraModel.roi has negative values: {roi}")
    # A zero ROI size means "to the edge of the sensor" (all zeros: the full image).
    width = roi.width if roi.width > 0 else camera.width - roi.x_offset
    height = roi.height if roi.height > 0 else camera.height - roi.y_offset
    if width <= 0 or roi.x_offset + width > camera.width:
        raise ValueError(
            f"CameraModel.roi x_offset={roi.x_offset} width={roi.width} does not fit in "
            f"width {camera.width}"
        )
    if height <= 0 or roi.y_offset + height > camera.height:
        raise ValueError(
            f"CameraModel.roi y_offset={roi.y_offset} height={roi.height} does not fit in "
            f"height {camera.height}"
        )
    return roi.x_offset, roi.y_offset, width, height, bx, by


def image_size(camera: CameraModel) -> tuple[int, int]:
    """(width, height) of the published image: the ROI, then integer binning."""
    _, _, width, height, bx, by = _published_window(camera)
    return width // bx, height // by


def project_points(points_cam: Any, camera: CameraModel) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 3) optical-frame points into the published image.

    Returns ``uv`` (N, 2) float64 continuous pixel coordinates (NaN where depth <= 0 or the
    point is not finite) and ``depth`` (N,) float64, the z coordinate. Whether a point lands in
    the image is left to the caller (``0 <= u < width`` with ``image_size``).
    """
    pts = np.asarray(points_cam)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points_cam must have shape (N, 3), got {pts.shape}")
    pts = pts.astype(np.float64, copy=False)
    depth = pts[:, 2].copy()
    in_front = depth > 0.0  # False for NaN too
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(in_front, depth, 1.0)
        xd, yd = distort_normalized(pts[:, 0] / z, pts[:, 1] / z, camera)
    K = camera.K
    x_off, y_off, _, _, bx, by = _published_window(camera)
    # The general homogeneous form; for CameraInfo's [fx s cx; 0 fy cy; 0 0 1] w is exactly 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        w = K[2, 0] * xd + K[2, 1] * yd + K[2, 2]
        u = ((K[0, 0] * xd + K[0, 1] * yd + K[0, 2]) / w - x_off) / bx
        v = ((K[1, 0] * xd + K[1, 1] * yd + K[1, 2]) / w - y_off) / by
    uv = np.stack([u, v], axis=1)
    uv[~(in_front & np.isfinite(uv).all(axis=1))] = np.nan
    return uv, depth
