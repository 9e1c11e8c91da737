"""Ego motion: pose interpolation, sweep compensation, merging and sweep selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.ego_motion import (
    PoseStream,
    compensate_sweep,
    merge_sweeps,
    relative_transform,
    select_sweeps,
)
from clip2scene_ros.geometry.transforms import invert_transform, make_transform, transform_points

EPOCH_NS = 1_532_402_927_647_951_000  # a real 2018 stamp: beyond float64's exact integers
STEP_NS = 50_000_000  # 20 Hz


def yaw(angle: float) -> np.ndarray:
    return np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])


def vehicle_pose(t: float, speed: float = 10.0, yaw_rate: float = 0.0) -> np.ndarray:
    """world<-body of a vehicle driving along x at constant speed (straight if yaw_rate = 0)."""
    return make_transform([speed * t, 0.5 * t, 0.0], yaw(yaw_rate * t))


def test_pose_stream_exact_and_interpolated() -> None:
    stamps = EPOCH_NS + np.arange(4, dtype=np.int64) * STEP_NS
    poses = np.stack([vehicle_pose(0.05 * i, yaw_rate=0.4) for i in range(4)])
    stream = PoseStream(stamps, poses)
    assert len(stream) == 4
    np.testing.assert_array_equal(stream.at(int(stamps[2])), poses[2])
    mid = stream.at(EPOCH_NS + STEP_NS // 2)
    np.testing.assert_allclose(mid[:3, 3], [0.25, 0.0125, 0.0], atol=1e-12)
    np.testing.assert_allclose(mid, vehicle_pose(0.025, yaw_rate=0.4), atol=1e-12)
    # One nanosecond past a stamp must not be lost to float rounding of epoch stamps.
    one_ns = stream.at(EPOCH_NS + 1)
    assert one_ns[0, 3] == pytest.approx(10.0 * 1e-9, rel=1e-6)


def test_pose_stream_extrapolation_limit() -> None:
    stamps = EPOCH_NS + np.arange(3, dtype=np.int64) * STEP_NS
    stream = PoseStream(stamps, np.stack([vehicle_pose(0.05 * i) for i in range(3)]))
    late = int(stamps[-1]) + 10_000_000
    with pytest.raises(ValueError, match=str(late)) as info:
        stream.at(late)
    assert str(int(stamps[0])) in str(info.value) and str(int(stamps[-1])) in str(info.value)
    with pytest.raises(ValueError, match="no pose"):
        stream.at(int(stamps[0]) - 1)
    # Within the allowance the last segment's motion continues.
    ahead = stream.at(late, max_extrapolation_ns=20_000_000)
    np.testing.assert_allclose(ahead[:3, 3], vehicle_pose(0.11)[:3, 3], atol=1e-9)
    behind = stream.at(int(stamps[0]) - STEP_NS, max_extrapolation_ns=STEP_NS)
    np.testing.assert_allclose(behind[:3, 3], vehicle_pose(-0.05)[:3, 3], atol=1e-9)


def test_pose_stream_single_pose_and_from_pairs() -> None:
    single = PoseStream(np.array([EPOCH_NS]), vehicle_pose(1.0)[None])
    held = single.at(EPOCH_NS + 5, max_extrapolation_ns=10)
    np.testing.assert_array_equal(held, vehicle_pose(1.0))
    with pytest.raises(ValueError, match="no pose"):
        single.at(EPOCH_NS + 11, max_extrapolation_ns=10)
    pairs = [(EPOCH_NS + STEP_NS, vehicle_pose(0.05)), (EPOCH_NS, vehicle_pose(0.0))]
    stream = PoseStream.from_pairs(pairs)
    np.testing.assert_array_equal(stream.stamps_ns, [EPOCH_NS, EPOCH_NS + STEP_NS])
    np.testing.assert_allclose(stream.at(EPOCH_NS + STEP_NS), vehicle_pose(0.05))


def test_pose_stream_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        PoseStream(np.array([2, 1]), np.stack([np.eye(4)] * 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        PoseStream.from_pairs([(5, np.eye(4)), (5, np.eye(4))])
    with pytest.raises(ValueError, match="integer"):
        PoseStream(np.array([1.0, 2.0]), np.stack([np.eye(4)] * 2))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        PoseStream(np.array([1, 2]), np.eye(4)[None])
    with pytest.raises(ValueError, match="non-empty"):
        PoseStream(np.zeros(0, np.int64), np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="at least one"):
        PoseStream.from_pairs([])


def test_relative_transform_definition() -> None:
    src, dst = vehicle_pose(0.0, yaw_rate=0.3), vehicle_pose(0.4, yaw_rate=0.3)
    rel = relative_transform(src, dst)
    np.testing.assert_allclose(rel, np.linalg.inv(dst) @ src, atol=1e-12)
    np.testing.assert_allclose(relative_transform(src, src), np.eye(4), atol=1e-12)


@pytest.mark.parametrize("yaw_rate", [0.0, 0.5])
def test_static_world_point_is_fixed_after_compensation(yaw_rate: float) -> None:
    world = np.array([[30.0, 4.0, 1.5], [12.0, -6.0, 0.2]])
    times = [0.0, 0.05, 0.1, 0.15, 0.2]
    poses = [vehicle_pose(t, yaw_rate=yaw_rate) for t in times]
    # What the LiDAR measures at each time: the world points in the moving body frame.
    observed = [transform_points(invert_transform(p), world) for p in poses]
    assert np.abs(observed[0] - observed[-1]).max() > 1.0  # the raw sweeps disagree
    for obs, pose in zip(observed, poses, strict=True):
        np.testing.assert_allclose(compensate_sweep(obs, pose, poses[-1]), observed[-1], atol=1e-9)


def make_frame(t: float, xyz: np.ndarray, pose: np.ndarray | None) -> Frame:
    return Frame(
        stamp_ns=EPOCH_NS + round(t * 1e9),
        frame_id="lidar",
        xyz=xyz.astype(np.float32),
        pose=pose,
    )


def test_merge_sweeps_aligns_and_labels_points() -> None:
    world = np.array([[30.0, 4.0, 1.5]])
    times = [0.2, 0.15, 0.1]  # keyframe first, older sweeps after
    poses = [vehicle_pose(t, yaw_rate=0.5) for t in times]
    frames = []
    for t, pose, extra in zip(times, poses, (0, 2, 1), strict=True):
        body = transform_points(invert_transform(pose), world)
        noise = np.full((extra, 3), 100.0)  # sweeps of different sizes
        frames.append(make_frame(t, np.concatenate([body, noise]), pose))
    xyz, sweep, dt = merge_sweeps(frames)
    assert xyz.shape == (6, 3) and xyz.dtype == np.float32
    assert sweep.dtype == np.uint8 and dt.dtype == np.float32
    np.testing.assert_array_equal(sweep, [0, 1, 1, 1, 2, 2])
    np.testing.assert_allclose(dt, [0.0, 0.05, 0.05, 0.05, 0.1, 0.1], atol=1e-7)
    key_obs = frames[0].xyz[0]
    for row in (0, 1, 4):  # the static world point from each sweep
        np.testing.assert_allclose(xyz[row], key_obs, atol=1e-4)
    # Another key: everything lands in that sweep's frame instead.
    xyz_k2, _, dt_k2 = merge_sweeps(frames, key=2)
    np.testing.assert_allclose(xyz_k2[0], frames[2].xyz[0], atol=1e-4)
    np.testing.assert_allclose(dt_k2[0], -0.1, atol=1e-7)


def test_merge_sweeps_errors() -> None:
    good = make_frame(0.0, np.zeros((2, 3)), np.eye(4))
    missing = make_frame(0.05, np.zeros((2, 3)), None)
    with pytest.raises(ValueError, match=r"frames\[1\].*no pose"):
        merge_sweeps([good, missing])
    with pytest.raises(ValueError, match="at least one"):
        merge_sweeps([])
    with pytest.raises(ValueError, match="key 3"):
        merge_sweeps([good, good], key=3)
    xyz, sweep, _ = merge_sweeps([good])
    assert xyz.shape == (2, 3) and sweep.tolist() == [0, 0]


def test_select_sweeps_deterministic() -> None:
    stamps = EPOCH_NS + np.arange(30, dtype=np.int64) * STEP_NS
    assert select_sweeps(stamps, 20) == [20, 19, 18]
    assert select_sweeps(stamps, 20, num_sweeps=1) == [20]
    assert select_sweeps(stamps, 20, num_sweeps=5, window=2) == [20, 19, 18]
    assert select_sweeps(stamps, 1, num_sweeps=3) == [1, 0]  # start of the log
    assert select_sweeps(stamps, 0) == [0]
    assert select_sweeps(stamps, 20, window=0) == [20]


def test_select_sweeps_random() -> None:
    stamps = EPOCH_NS + np.arange(30, dtype=np.int64) * STEP_NS
    seen: set[int] = set()
    rng = np.random.default_rng(0)
    for _ in range(50):
        chosen = select_sweeps(stamps, 20, num_sweeps=4, window=10, rng=rng)
        assert chosen[0] == 20 and len(chosen) == 4
        others = chosen[1:]
        assert len(set(others)) == 3 and all(10 <= i <= 19 for i in others)
        assert others == sorted(others, reverse=True)
        seen.update(others)
    assert seen == set(range(10, 20))  # the whole window is reachable
    assert select_sweeps(stamps, 20, rng=7) == select_sweeps(stamps, 20, rng=7)
    assert select_sweeps(stamps, 0, rng=rng) == [0]
    assert select_sweeps(stamps, 1, rng=rng) == [1, 0]


def test_select_sweeps_rejects_bad_input() -> None:
    stamps = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match="key_index"):
        select_sweeps(stamps, 5)
    with pytest.raises(ValueError, match="num_sweeps"):
        select_sweeps(stamps, 2, num_sweeps=0)
    with pytest.raises(ValueError, match="increasing"):
        select_sweeps(np.array([3, 2, 1]), 1)
