"""Geometry plans: scatter-free segment sums, and a planned SPVCNN pass equal to the eager one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.models.bundle import ArchitectureSpec
from clip2scene_ros.models.spvcnn import SPVCNN, plan_schema
from clip2scene_ros.sparse.plan import (
    CHUNK,
    build_plan,
    levels_for,
    planned_point_tensor,
    segment_sum_plan,
)
from clip2scene_ros.sparse.tensor import PointTensor
from clip2scene_ros.sparse.voxelize import scatter_mean


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 9), min_size=0, max_size=300), st.integers(1, 3))
def test_segment_sum_equals_index_add(index: list[int], levels: int) -> None:
    size = 10
    idx = torch.tensor(index, dtype=torch.int64)
    if idx.numel() and int(torch.bincount(idx[idx >= 0], minlength=size).max()) > CHUNK**levels:
        with pytest.raises(ValueError, match="more than"):
            segment_sum_plan(idx, size, levels)
        return
    feats = torch.randn(idx.numel(), 3, dtype=torch.float64)
    expected = torch.zeros(size, 3, dtype=torch.float64)
    keep = idx >= 0
    expected.index_add_(0, idx[keep], feats[keep])
    got = segment_sum_plan(idx, size, levels)(feats)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_levels_cover_max_points() -> None:
    assert levels_for(1) == 1 and levels_for(8) == 1 and levels_for(9) == 2
    assert CHUNK ** levels_for(400_000) >= 400_000


def _random_net(cr: float = 0.25) -> SPVCNN:
    torch.manual_seed(0)
    net = SPVCNN(ArchitectureSpec(cr=cr, clip_dim=24), in_channels=4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("points", [1, 2, 3000])
def test_planned_pass_equals_eager_and_reads_exactly_the_schema(points: int) -> None:
    net = _random_net()
    g = torch.Generator().manual_seed(points)
    coords = torch.rand(points, 3, generator=g) * torch.tensor([300.0, 300.0, 40.0])
    coords[: points // 3] = coords[: points // 3] * 0.01 + 50.0  # dense voxels too
    feats = torch.randn(points, 4, generator=g)
    schema = plan_schema(points)
    plan = build_plan(schema, coords, torch.zeros(points, dtype=torch.int64))
    with torch.no_grad():
        eager = net.text_features(PointTensor(feats, coords))
        planned = net.text_features(planned_point_tensor(feats, plan))
    assert torch.allclose(planned, eager, rtol=1e-5, atol=1e-5)
    every = {("conv", k) for k in schema.convs} | {("pool", s) for s in schema.pools} | {
        ("interp", s) for s in schema.interps}
    assert plan.used == every  # plan_schema lists exactly what forward reads
    assert len(plan.tensors()) == len(schema.input_names())


def test_planned_pass_pools_like_scatter_mean() -> None:
    coords = torch.tensor([[0.2, 0.1, 0.0], [0.7, 0.3, 0.9], [5.5, 0.0, 0.0]])
    plan = build_plan(plan_schema(8), coords, torch.zeros(3, dtype=torch.int64))
    feats = torch.tensor([[1.0], [3.0], [7.0]])
    index = torch.tensor([0, 0, 1])
    assert torch.equal(plan.pool_mean(feats, (1, 1, 1)), scatter_mean(feats, index, 2))
