"""TfTree: chaining through the common ancestor, interpolation, time travel, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.codecs.messages import make_header, rosbags_factory
from clip2scene_ros.errors import MessageError
from clip2scene_ros.geometry.transforms import (
    invert_transform,
    make_transform,
    matrix_to_quaternion,
)
from clip2scene_ros.tf_tree import TfTree, tree_from_messages


def yaw(deg: float) -> np.ndarray:
    half = np.deg2rad(deg) / 2
    return np.array([0.0, 0.0, np.sin(half), np.cos(half)])


T_BASE_LIDAR = make_transform([1.0, 0.0, 2.0], yaw(90))
T_BASE_CAM = make_transform([2.0, 0.5, 1.5], [-0.5, 0.5, -0.5, 0.5])  # optical: z forward


def rig() -> TfTree:
    tree = TfTree()
    tree.add_transform("base_link", "lidar", T_BASE_LIDAR)
    tree.add_transform("base_link", "cam", T_BASE_CAM)
    tree.add_transform("map", "base_link", np.eye(4), stamp_ns=0)
    tree.add_transform("map", "base_link", make_transform([10.0, 0, 0], yaw(90)), stamp_ns=10)
    return tree


def test_static_chain_through_common_ancestor() -> None:
    tree = rig()
    expected = invert_transform(T_BASE_CAM) @ T_BASE_LIDAR
    np.testing.assert_allclose(tree.lookup("cam", "lidar"), expected, atol=1e-12)
    np.testing.assert_allclose(tree.lookup("lidar", "cam"), invert_transform(expected), atol=1e-12)
    np.testing.assert_allclose(tree.lookup("lidar", "lidar"), np.eye(4))
    assert tree.root("cam") == "map" and tree.chain("lidar") == ["lidar", "base_link", "map"]
    assert tree.frames == {"map", "base_link", "lidar", "cam"}
    assert not tree.is_static("lidar")


def test_dynamic_interpolation_linear_and_slerp() -> None:
    tree = rig()
    T = tree.lookup("map", "base_link", 5)
    np.testing.assert_allclose(T[:3, 3], [5.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(matrix_to_quaternion(T), yaw(45), atol=1e-12)
    # Exact samples, and None = latest.
    np.testing.assert_allclose(tree.lookup("map", "base_link", 10)[:3, 3], [10.0, 0, 0])
    np.testing.assert_allclose(tree.lookup("map", "base_link")[:3, 3], [10.0, 0, 0])
    # Chained with statics: the LiDAR origin in the map at t=5.
    T_map_lidar = tree.lookup("map", "lidar", 5)
    np.testing.assert_allclose(T_map_lidar, T @ T_BASE_LIDAR, atol=1e-12)


def test_out_of_range_names_frames_and_tolerance_clamps() -> None:
    tree = rig()
    with pytest.raises(LookupError, match=r"'lidar' into 'map' at stamp 11.*'map' -> 'base_link'"):
        tree.lookup("map", "lidar", 11)
    tolerant = rig()
    tolerant.tolerance_ns = 2
    np.testing.assert_allclose(tolerant.lookup("map", "base_link", 12)[:3, 3], [10.0, 0, 0])
    np.testing.assert_allclose(tolerant.lookup("map", "base_link", -2), np.eye(4))
    with pytest.raises(LookupError, match="only known for"):
        tolerant.lookup("map", "base_link", 13)


def test_unconnected_and_unknown_frames() -> None:
    tree = rig()
    tree.add_transform("odom", "imu", np.eye(4))
    with pytest.raises(LookupError, match=r"'imu' into 'cam'.*not connected.*'map'.*'odom'"):
        tree.lookup("cam", "imu", 0)
    with pytest.raises(LookupError, match="frame 'radar' is not in the TF tree"):
        tree.lookup("cam", "radar", 0)
    assert not tree.can_transform("cam", "imu") and tree.can_transform("cam", "lidar", 3)


def test_bad_structure_is_refused() -> None:
    tree = rig()
    with pytest.raises(ValueError, match="already has parent 'base_link'"):
        tree.add_transform("map", "lidar", np.eye(4))
    with pytest.raises(ValueError, match="close a loop"):
        tree.add_transform("lidar", "map", np.eye(4))
    with pytest.raises(ValueError, match="is static; it cannot also be dynamic"):
        tree.add_transform("base_link", "cam", np.eye(4), stamp_ns=3)
    with pytest.raises(ValueError, match=r"finite \(4, 4\)"):
        tree.add_transform("base_link", "radar", np.eye(3))
    with pytest.raises(ValueError, match="to itself"):
        tree.add_transform("x", "x", np.eye(4))


def test_lookup_full_folds_ego_motion() -> None:
    tree = rig()
    # LiDAR at t=0, camera at t=10: the car moved 10 m and turned 90° in between.
    T = tree.lookup_full("cam", 10, "lidar", 0, "map")
    T_map_base_10 = make_transform([10.0, 0, 0], yaw(90))
    expected = invert_transform(T_BASE_CAM) @ invert_transform(T_map_base_10) @ T_BASE_LIDAR
    np.testing.assert_allclose(T, expected, atol=1e-12)
    assert not np.allclose(T, tree.lookup("cam", "lidar"))


def test_arrays_duplicates_and_cache() -> None:
    tree = TfTree(cache_ns=20)
    stamps = np.array([30, 0, 10, 20, 10])
    xs = np.array([3.0, 0.0, 1.0, 2.0, 1.5])  # stamp 10 appears twice: the last one wins
    t = np.stack([xs, np.zeros(5), np.zeros(5)], axis=1)
    q = np.tile([0.0, 0.0, 0.0, 1.0], (5, 1))
    tree.add_arrays("odom", "base", stamps, t, q)
    assert tree.stamp_range("odom", "base") == (10, 30)  # stamp 0 fell out of the 20 ns cache
    np.testing.assert_allclose(tree.lookup("odom", "base", 10)[0, 3], 1.5)
    np.testing.assert_allclose(tree.lookup("odom", "base", 25)[0, 3], 2.5)
    with pytest.raises(ValueError, match=r"translations \(N, 3\)"):
        tree.add_arrays("odom", "base", [1, 2], t, q)


def _tf_message(transforms: list[tuple[str, str, int, list[float]]]) -> object:
    f = rosbags_factory()
    out = []
    for parent, child, stamp, xyz in transforms:
        out.append(
            f("geometry_msgs/msg/TransformStamped")(
                header=make_header(f, stamp, parent),
                child_frame_id=child,
                transform=f("geometry_msgs/msg/Transform")(
                    translation=f("geometry_msgs/msg/Vector3")(x=xyz[0], y=xyz[1], z=xyz[2]),
                    rotation=f("geometry_msgs/msg/Quaternion")(x=0.0, y=0.0, z=0.0, w=1.0),
                ),
            )
        )
    return f("tf2_msgs/msg/TFMessage")(transforms=out)


def test_from_tf_messages() -> None:
    static = _tf_message([("base", "lidar", 99, [0, 0, 2]), ("base", "cam", 99, [1, 0, 0])])
    dynamic = [_tf_message([("map", "base", s, [s * 1e-9, 0, 0])]) for s in (0, 10**9)]
    tree = tree_from_messages([static], dynamic)
    assert tree.stamp_range("map", "base") == (0, 10**9)
    assert tree.stamp_range("base", "lidar") is None  # static: no stamp
    np.testing.assert_allclose(tree.lookup("map", "lidar", 5 * 10**8)[:3, 3], [0.5, 0, 2])
    bad = _tf_message([("base", "base", 0, [0, 0, 0])])
    with pytest.raises(MessageError, match=r"TFMessage.transforms\[0\].*to itself"):
        tree.add_message(bad, static=True)
    with pytest.raises(MessageError, match="not a TFMessage"):
        tree.add_message(object(), static=False)
