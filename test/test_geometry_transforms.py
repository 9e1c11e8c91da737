"""Rigid transforms: quaternion/matrix conversions, inverse, point transforms, interpolation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.errors import MessageError
from clip2scene_ros.geometry import transforms
from clip2scene_ros.geometry.transforms import (
    interpolate_transform,
    invert_transform,
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    transform_from_msg,
    transform_points,
)

finite = st.floats(-1.0, 1.0, allow_nan=False)
quaternions = st.tuples(finite, finite, finite, finite).filter(
    lambda q: math.sqrt(sum(c * c for c in q)) > 0.1
)
translations = st.tuples(*(st.floats(-100.0, 100.0, allow_nan=False),) * 3)


def axis_angle(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    """Quaternion (x, y, z, w) of a rotation by ``angle`` about the unit ``axis``."""
    s = math.sin(angle / 2)
    return np.array([axis[0] * s, axis[1] * s, axis[2] * s, math.cos(angle / 2)])


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@settings(max_examples=200, deadline=None)
@given(quaternions)
def test_quaternion_matrix_round_trip(q: tuple[float, float, float, float]) -> None:
    R = quaternion_to_matrix(q)
    assert R.dtype == np.float64
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
    back = matrix_to_quaternion(R)
    unit = np.asarray(q) / np.linalg.norm(q)
    assert back[3] >= 0.0
    assert np.linalg.norm(back) == pytest.approx(1.0)
    # q and -q are the same rotation.
    assert min(np.abs(back - unit).max(), np.abs(back + unit).max()) < 1e-9
    np.testing.assert_allclose(quaternion_to_matrix(back), R, atol=1e-12)


def test_quaternion_to_matrix_known_rotations() -> None:
    np.testing.assert_allclose(quaternion_to_matrix([0, 0, 0, 1]), np.eye(3))
    np.testing.assert_allclose(
        quaternion_to_matrix(axis_angle((0, 0, 1), math.pi / 2)),
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
        atol=1e-15,
    )
    np.testing.assert_allclose(
        quaternion_to_matrix(axis_angle((1, 0, 0), math.pi / 2)),
        [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
        atol=1e-15,
    )
    # Not normalised: scaled quaternions are the same rotation.
    np.testing.assert_allclose(
        quaternion_to_matrix(5.0 * axis_angle((0, 1, 0), 0.3)),
        quaternion_to_matrix(axis_angle((0, 1, 0), 0.3)),
    )


@pytest.mark.parametrize(
    ("R", "expected"),
    [
        (np.diag([1.0, -1.0, -1.0]), [1, 0, 0, 0]),  # 180 deg about x: Shepperd's x pivot
        (np.diag([-1.0, 1.0, -1.0]), [0, 1, 0, 0]),  # y pivot
        (np.diag([-1.0, -1.0, 1.0]), [0, 0, 1, 0]),  # z pivot
        (rot_z(0.2), [0, 0, math.sin(0.1), math.cos(0.1)]),  # trace pivot
    ],
)
def test_matrix_to_quaternion_every_pivot(R: np.ndarray, expected: list[float]) -> None:
    q = matrix_to_quaternion(R)
    assert min(np.abs(q - expected).max(), np.abs(q + expected).max()) < 1e-12


def test_matrix_to_quaternion_w_non_negative_and_accepts_4x4() -> None:
    q = matrix_to_quaternion(make_transform([1, 2, 3], axis_angle((0, 0, 1), 1.9 * math.pi)))
    assert q[3] > 0  # 342 deg about +z is 18 deg about -z
    np.testing.assert_allclose(q, axis_angle((0, 0, -1), 0.1 * math.pi), atol=1e-12)


@pytest.mark.parametrize("bad", [[0, 0, 0, 0], [np.nan, 0, 0, 1], [np.inf, 0, 0, 1], [0, 0, 1]])
def test_quaternion_rejects_non_rotations(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="quaternion"):
        quaternion_to_matrix(bad)


def test_matrix_to_quaternion_rejects_bad_matrices() -> None:
    with pytest.raises(ValueError, match="shape"):
        matrix_to_quaternion(np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        matrix_to_quaternion(np.full((3, 3), np.nan))


@settings(max_examples=100, deadline=None)
@given(translations, quaternions)
def test_invert_transform_is_the_inverse(t: tuple[float, ...], q: tuple[float, ...]) -> None:
    T = make_transform(t, q)
    inv = invert_transform(T)
    np.testing.assert_allclose(T @ inv, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(inv @ T, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(inv[3], [0, 0, 0, 1])


def test_make_transform_layout_and_errors() -> None:
    T = make_transform([1.0, 2.0, 3.0], axis_angle((0, 0, 1), math.pi / 2))
    np.testing.assert_allclose(T[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(T[:3, :3], rot_z(math.pi / 2), atol=1e-15)
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="translation"):
        make_transform([1.0, 2.0], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="translation"):
        make_transform([1.0, np.nan, 0.0], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        invert_transform(np.eye(3))


def test_transform_points_dtype_and_values() -> None:
    T = make_transform([10.0, 0.0, -1.0], axis_angle((0, 0, 1), math.pi / 2))
    pts = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    out = transform_points(T, pts)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[10.0, 1.0, -1.0], [8.0, 0.0, 0.0]], atol=1e-12)
    out32 = transform_points(T, pts.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out, atol=1e-6)
    # float64 internally: a float32 result equals the float64 result rounded once.
    far = np.array([[123.456, -98.765, 4.321]], dtype=np.float32)
    T2 = make_transform([1e-3, 2e-3, 0.0], axis_angle((0.6, 0.8, 0.0), 0.7))
    exact = transform_points(T2, far.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(transform_points(T2, far), exact)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        transform_points(T, np.zeros(3))


def test_interpolation_endpoints_and_midpoint() -> None:
    T0 = make_transform([0.0, 0.0, 0.0], axis_angle((0, 0, 1), 0.0))
    T1 = make_transform([2.0, -4.0, 6.0], axis_angle((0, 0, 1), math.pi / 2))
    np.testing.assert_allclose(interpolate_transform(T0, T1, 0.0), T0, atol=1e-12)
    np.testing.assert_allclose(interpolate_transform(T0, T1, 1.0), T1, atol=1e-12)
    mid = interpolate_transform(T0, T1, 0.5)
    np.testing.assert_allclose(mid[:3, 3], [1.0, -2.0, 3.0])
    np.testing.assert_allclose(mid[:3, :3], rot_z(math.pi / 4), atol=1e-12)
    quarter = interpolate_transform(T0, T1, 0.25)
    np.testing.assert_allclose(quarter[:3, :3], rot_z(math.pi / 8), atol=1e-12)
    # Extrapolation continues the same rotation rate.
    np.testing.assert_allclose(
        interpolate_transform(T0, T1, 1.5)[:3, :3], rot_z(3 * math.pi / 4), atol=1e-12
    )
    with pytest.raises(ValueError, match="alpha"):
        interpolate_transform(T0, T1, float("nan"))


def test_slerp_takes_the_shortest_arc() -> None:
    # +170 deg and -170 deg about z are 20 deg apart through 180 deg; their w >= 0 quaternions
    # have a negative dot product, so a naive slerp would sweep 340 deg through 0 deg.
    T0 = make_transform([0, 0, 0], axis_angle((0, 0, 1), math.radians(170)))
    T1 = make_transform([0, 0, 0], axis_angle((0, 0, 1), math.radians(-170)))
    mid = interpolate_transform(T0, T1, 0.5)
    np.testing.assert_allclose(mid[:3, :3], rot_z(math.pi), atol=1e-12)
    np.testing.assert_allclose(
        interpolate_transform(T0, T1, 0.25)[:3, :3], rot_z(math.radians(175)), atol=1e-12
    )


def test_interpolating_identical_rotations_is_stable() -> None:
    T = make_transform([1.0, 2.0, 3.0], axis_angle((0, 1, 0), 0.4))
    np.testing.assert_allclose(interpolate_transform(T, T, 0.3), T, atol=1e-12)


def test_transform_from_msg_plain_objects() -> None:
    q = axis_angle((0, 0, 1), math.pi / 2)
    xyz = SimpleNamespace(x=1.0, y=2.0, z=3.0)
    quat = SimpleNamespace(x=q[0], y=q[1], z=q[2], w=q[3])
    expected = make_transform([1, 2, 3], q)
    transform = SimpleNamespace(translation=xyz, rotation=quat)
    np.testing.assert_allclose(transform_from_msg(transform), expected)
    np.testing.assert_allclose(
        transform_from_msg(SimpleNamespace(position=xyz, orientation=quat)), expected
    )
    np.testing.assert_allclose(transform_from_msg(SimpleNamespace(transform=transform)), expected)
    with pytest.raises(MessageError, match="rotation"):
        zero = SimpleNamespace(x=0, y=0, z=0, w=0)
        transform_from_msg(SimpleNamespace(translation=xyz, rotation=zero))
    with pytest.raises(MessageError, match="not a Transform or Pose"):
        transform_from_msg(SimpleNamespace(x=1))
    with pytest.raises(MessageError, match="translation"):
        transform_from_msg(SimpleNamespace(translation=SimpleNamespace(x=1.0), rotation=quat))


def test_transform_from_msg_rosbags_types() -> None:
    from clip2scene_ros.codecs.messages import rosbags_factory

    f = rosbags_factory()
    Vector3, Quaternion = f("geometry_msgs/msg/Vector3"), f("geometry_msgs/msg/Quaternion")
    q = axis_angle((1, 0, 0), 0.5)
    tf = f("geometry_msgs/msg/Transform")(
        translation=Vector3(x=1.0, y=-2.0, z=0.5),
        rotation=Quaternion(x=q[0], y=q[1], z=q[2], w=q[3]),
    )
    np.testing.assert_allclose(transform_from_msg(tf), make_transform([1, -2, 0.5], q))
    pose = f("geometry_msgs/msg/Pose")(
        position=f("geometry_msgs/msg/Point")(x=4.0, y=5.0, z=6.0),
        orientation=Quaternion(x=q[0], y=q[1], z=q[2], w=q[3]),
    )
    np.testing.assert_allclose(transform_from_msg(pose), make_transform([4, 5, 6], q))


def test_transform_from_msg_rclpy_types() -> None:
    msg = pytest.importorskip("geometry_msgs.msg")
    t = msg.Transform()
    t.translation.x, t.rotation.z, t.rotation.w = 3.0, math.sin(0.25), math.cos(0.25)
    np.testing.assert_allclose(
        transform_from_msg(t), make_transform([3, 0, 0], axis_angle((0, 0, 1), 0.5))
    )
    p = msg.Pose()
    p.position.y = -1.0
    np.testing.assert_allclose(transform_from_msg(p), make_transform([0, -1, 0], [0, 0, 0, 1]))


def test_numpy_fallback_agrees_with_tf_transformations() -> None:
    tft = pytest.importorskip("tf_transformations")
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(20, 4)):
        unit = q / np.linalg.norm(q)
        np.testing.assert_allclose(
            transforms._rotation_of_unit_quaternion(unit),
            tft.quaternion_matrix(unit)[:3, :3],
            atol=1e-12,
        )
        theirs = tft.quaternion_from_matrix(tft.quaternion_matrix(unit))
        ours = transforms._shepperd(transforms._rotation_of_unit_quaternion(unit))
        assert min(np.abs(ours - theirs).max(), np.abs(ours + theirs).max()) < 1e-9
