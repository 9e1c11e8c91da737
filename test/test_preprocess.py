"""The shared preprocessing path: sweeps, features and scaling, filtering, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import InputSpec
from clip2scene_ros.preprocess import prepare_frames, to_point_tensor


def pose(x: float) -> np.ndarray:
    out = np.eye(4)
    out[0, 3] = x
    return out


def frame(xyz: list[list[float]], stamp_s: float, x: float = 0.0, **channels: list) -> Frame:
    arrays = {k: np.asarray(v, np.float32 if k != "ring" else np.uint16)
              for k, v in channels.items()}
    return Frame(stamp_ns=round(stamp_s * 1e9), frame_id="lidar",
                 xyz=np.asarray(xyz, np.float32), pose=pose(x), **arrays)


def test_features_are_scaled_in_spec_order() -> None:
    f = frame([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], 10.0, intensity=[100, 255], ring=[3, 7])
    spec = InputSpec(voxel_size=0.5, features=("intensity", "z", "ring"),
                     offset=(0.0, 1.0, 0.0), scale=(1 / 255, 2.0, 1.0))
    out = prepare_frames([f], spec)
    np.testing.assert_allclose(out.coords, [[2, 4, 6], [1, -2, 0]])
    np.testing.assert_allclose(out.feats, [[100 / 255, 4.0, 3.0], [1.0, -2.0, 7.0]], rtol=1e-6)
    assert out.source.tolist() == [0, 1] and out.sweep.tolist() == [0, 0]
    assert out.key_points == 2
    assert out.dropped == {"non_finite": 0, "out_of_range": 0, "over_max_points": 0}


def test_past_sweeps_move_into_the_key_frame() -> None:
    # The vehicle drove +1 m in x between the sweeps; a static point seen at x=5 before is at
    # x=4 now. Only `sweeps` frames are used.
    key = frame([[4.0, 0.0, 0.0]], 10.1, x=1.0, time=[0.01])
    past = frame([[5.0, 0.0, 0.0]], 10.0, x=0.0, time=[0.02])
    older = frame([[9.0, 9.0, 9.0]], 9.9, x=-1.0)
    spec = InputSpec(voxel_size=1.0, features=("x", "time"), sweeps=2)
    out = prepare_frames([key, past, older], spec)
    np.testing.assert_allclose(out.coords, [[4, 0, 0], [4, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(out.feats[:, 1], [0.01, 0.02 - 0.1], atol=1e-6)
    assert out.sweep.tolist() == [0, 1]


def test_out_of_range_and_max_points_are_dropped_and_counted() -> None:
    xyz = [[float(i), 0.0, 0.0] for i in range(10)] + [[1e9, 0, 0]]
    f = frame(xyz, 1.0, intensity=list(range(11)))
    spec = InputSpec(voxel_size=0.1, features=("intensity",), max_points=4)
    out = prepare_frames([f], spec)
    assert out.dropped == {"non_finite": 0, "out_of_range": 1, "over_max_points": 6}
    assert out.source.tolist() == [0, 3, 6, 9]  # deterministic stride without an rng
    assert out.feats[:, 0].tolist() == [0, 3, 6, 9]
    picked = prepare_frames([f], spec, rng=np.random.default_rng(0)).source
    assert len(picked) == 4 and np.all(np.diff(picked) > 0) and picked.max() < 10


def test_non_finite_points_are_dropped_and_counted_apart() -> None:
    xyz = [[1.0, 0.0, 0.0], [np.nan, 0, 0], [0, np.inf, 0], [2.0, 0, 0], [-1e12, 0, 0]]
    f = frame(xyz, 1.0, intensity=[1, 2, 3, np.nan, 5])
    out = prepare_frames([f], InputSpec(voxel_size=0.1, features=("intensity",)))
    assert out.dropped == {"non_finite": 3, "out_of_range": 1, "over_max_points": 0}
    assert out.source.tolist() == [0]


def test_empty_cloud_and_missing_channels() -> None:
    empty = Frame(stamp_ns=1, frame_id="l", xyz=np.zeros((0, 3), np.float32))
    out = prepare_frames([empty], InputSpec(features=("intensity",)))
    assert out.num_points == 0 and out.feats.shape == (0, 1)
    no_intensity = frame([[1.0, 1.0, 1.0]], 1.0)
    assert prepare_frames([no_intensity], InputSpec()).feats.tolist() == [[0.0]]
    with pytest.raises(ValueError, match="at least one"):
        prepare_frames([], InputSpec())


def test_batching_into_a_point_tensor() -> None:
    spec = InputSpec(voxel_size=0.5, features=("intensity",))
    a = prepare_frames([frame([[1.0, 0, 0], [2.0, 0, 0]], 1.0, intensity=[1, 2])], spec)
    b = prepare_frames([frame([[3.0, 0, 0]], 1.0, intensity=[3])], spec)
    z = to_point_tensor([a, b])
    assert z.batch.tolist() == [0, 0, 1]
    assert torch.equal(z.coords[:, 0], torch.tensor([2.0, 4.0, 6.0]))
    assert z.feats[:, 0].tolist() == [1.0, 2.0, 3.0]
