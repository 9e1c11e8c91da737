"""Rigid transforms: quaternions (ROS order x, y, z, w), 4x4 matrices, interpolation.

``tf_transformations`` is used for the quaternion/matrix conversions where it is installed, so a
ROS machine gets the same numbers as the rest of its stack; otherwise a small numpy
implementation of the same formulas is used (tested to agree where both are present). Everything
else here (rigid inverse, slerp, point transforms) is a few lines of numpy that no reachable
library provides without pulling in SciPy or tf2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import MessageError

try:  # pragma: no cover - exercised only where ROS's tf_transformations is installed
    import tf_transformations as _tft
except ImportError:
    _tft = None

#: Below this norm a quaternion has no direction to normalise to.
_MIN_QUATERNION_NORM = 1e-12


def _quaternion(q: Any) -> np.ndarray:
    """``q`` as a unit float64 (4,) in x, y, z, w order; ValueError if it is not a rotation."""
    arr = np.asarray(q, dtype=np.float64).reshape(-1)
    if arr.shape != (4,):
        raise ValueError(f"quaternion must have 4 values (x, y, z, w), got shape {np.shape(q)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"quaternion has non-finite values: {arr.tolist()}")
    norm = float(np.linalg.norm(arr))
    if norm < _MIN_QUATERNION_NORM:
        raise ValueError(f"quaternion {arr.tolist()} has zero norm and is not a rotation")
    return arr / norm


def _matrix(T: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    arr = np.asarray(T, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def quaternion_to_matrix(q: Any) -> np.ndarray:
    """(3, 3) rotation matrix of quaternion ``q`` = (x, y, z, w); ``q`` is normalised first."""
    unit = _quaternion(q)
    if _tft is not None:  # pragma: no cover
        return np.asarray(_tft.quaternion_matrix(unit), dtype=np.float64)[:3, :3].copy()
    return _rotation_of_unit_quaternion(unit)


def _rotation_of_unit_quaternion(q: np.ndarray) -> np.ndarray:
    """The numpy fallback of ``quaternion_to_matrix`` (``q`` already unit, x, y, z, w)."""
    x, y, z, w = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float64,
    )


def _shepperd(R: np.ndarray) -> np.ndarray:
    """Shepperd's method: pivot on the largest of (trace, diagonal) so no square root is tiny."""
    trace = R[0, 0] + R[1, 1] + R[2, 2]
    pivot = int(np.argmax([trace, R[0, 0], R[1, 1], R[2, 2]]))
    if pivot == 0:
        s = 2.0 * np.sqrt(1.0 + trace)  # s = 4w
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, s / 4]
    elif pivot == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])  # s = 4x
        q = [s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif pivot == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])  # s = 4y
        q = [(R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])  # s = 4z
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4, (R[1, 0] - R[0, 1]) / s]
    return np.asarray(q, dtype=np.float64)


def matrix_to_quaternion(R: Any) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with ``w >= 0`` of a (3, 3) rotation (or a (4, 4) transform)."""
    arr = np.asarray(R, dtype=np.float64)
    if arr.shape == (4, 4):
        arr = arr[:3, :3]
    arr = _matrix(arr, (3, 3), "rotation matrix")
    if _tft is not None:  # pragma: no cover
        full = np.eye(4)
        full[:3, :3] = arr
        q = np.asarray(_tft.quaternion_from_matrix(full), dtype=np.float64)
    else:
        q = _shepperd(arr)
    q = q / np.linalg.norm(q)
    # q and -q are the same rotation; pick the one with w >= 0 so results are comparable.
    return -q if q[3] < 0 else q


def make_transform(translation: Any, quaternion: Any) -> np.ndarray:
    """(4, 4) homogeneous transform from a translation (3,) and a quaternion (x, y, z, w)."""
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ValueError(f"translation must be 3 finite values, got {np.asarray(translation)!r}")
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(quaternion)
    T[:3, 3] = t
    return T


def transform_from_msg(t: Any) -> np.ndarray:
    """(4, 4) transform of a ``geometry_msgs`` Transform or Pose, rclpy or rosbags flavour.

    Accepts ``Transform`` (``.translation``/``.rotation``), ``Pose`` (``.position``/
    ``.orientation``), and their stamped wrappers ``TransformStamped`` (``.transform``) and
    ``PoseStamped``/``PoseWithCovariance`` (``.pose``). A message without those fields or with a
    zero/non-finite quaternion raises ``MessageError``.
    """
    kind = type(t).__name__.split("__")[-1]
    if hasattr(t, "transform"):
        t = t.transform
    elif hasattr(t, "pose"):
        t = t.pose
        if hasattr(t, "pose"):  # PoseWithCovarianceStamped -> PoseWithCovariance -> Pose
            t = t.pose
    if hasattr(t, "translation") and hasattr(t, "rotation"):
        position, orientation, fields = t.translation, t.rotation, ("translation", "rotation")
    elif hasattr(t, "position") and hasattr(t, "orientation"):
        position, orientation, fields = t.position, t.orientation, ("position", "orientation")
    else:
        raise MessageError(kind, "translation/rotation", "not a Transform or Pose message")
    try:
        translation = [float(position.x), float(position.y), float(position.z)]
    except (AttributeError, TypeError, ValueError) as exc:
        raise MessageError(kind, fields[0], f"needs numeric x, y, z ({exc})") from exc
    try:
        quat = [float(orientation.x), float(orientation.y), float(orientation.z),
                float(orientation.w)]  # fmt: skip
    except (AttributeError, TypeError, ValueError) as exc:
        raise MessageError(kind, fields[1], f"needs numeric x, y, z, w ({exc})") from exc
    if not np.all(np.isfinite(translation)):
        raise MessageError(kind, fields[0], f"non-finite value {translation}")
    try:
        return make_transform(translation, quat)
    except ValueError as exc:
        raise MessageError(kind, fields[1], str(exc)) from exc


def invert_transform(T: Any) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform: ``[R^T | -R^T t]``, exact where ``inv`` rounds."""
    T = _matrix(T, (4, 4), "transform")
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def transform_points(T: Any, points: Any) -> np.ndarray:
    """Apply (4, 4) ``T`` to (N, 3) ``points``.

    Computed in float64 (a float32 product drifts by millimetres at 100 m); float32 input comes
    back as float32, anything else as float64.
    """
    T = _matrix(T, (4, 4), "transform")
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {pts.shape}")
    out: np.ndarray = pts.astype(np.float64, copy=False) @ T[:3, :3].T + T[:3, 3]
    return out.astype(np.float32) if pts.dtype == np.float32 else out


def _slerp(q0: np.ndarray, q1: np.ndarray, alpha: float) -> np.ndarray:
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # q and -q are one rotation: flip to take the shorter arc
        q1, dot = -q1, -dot
    dot = min(dot, 1.0)
    if dot > 1.0 - 1e-12:  # (almost) the same rotation: sin(theta) ~ 0, lerp is exact enough
        q = q0 + alpha * (q1 - q0)
    else:
        theta = np.arccos(dot)
        q = (np.sin((1.0 - alpha) * theta) * q0 + np.sin(alpha * theta) * q1) / np.sin(theta)
    unit: np.ndarray = q / np.linalg.norm(q)
    return unit


def interpolate_transform(T0: Any, T1: Any, alpha: float) -> np.ndarray:
    """Transform a fraction ``alpha`` of the way from ``T0`` to ``T1``.

    Translation is interpolated linearly and rotation by slerp along the shortest arc. ``alpha``
    outside [0, 1] extrapolates along the same path (used for short pose extrapolation).
    """
    T0 = _matrix(T0, (4, 4), "T0")
    T1 = _matrix(T1, (4, 4), "T1")
    alpha = float(alpha)
    if not np.isfinite(alpha):
        raise ValueError(f"interpolation alpha must be finite, got {alpha}")
    q = _slerp(matrix_to_quaternion(T0), matrix_to_quaternion(T1), alpha)
    return make_transform(T0[:3, 3] + alpha * (T1[:3, 3] - T0[:3, 3]), q)
