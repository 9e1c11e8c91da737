"""The weight layout is torchsparse's: the same SPVCNN with spconv convolutions (weights
converted from ours) gives the same outputs, on a real scan and on a synthetic cloud."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("spconv.pytorch", reason="spconv (test-only dependency) is not installed")

from clip2scene_ros.models.spconv_twin import SpconvTwin, random_spvcnn
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.sparse.tensor import PointTensor


def max_relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def run_both(net: SPVCNN, coords: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # both engines need the same non-negative grid: shift by a multiple of the deepest stride
    coords = coords - torch.floor(coords.min(0).values / 16) * 16
    with torch.no_grad():
        ours = net(PointTensor(feats, coords))
        theirs = SpconvTwin(net)(PointTensor(feats, coords))
    return ours, theirs


def test_parity_on_a_real_scan(semantickitti_dir: Path) -> None:
    scan = np.fromfile(semantickitti_dir / "000000.bin", dtype=np.float32).reshape(-1, 4)
    near = scan[np.abs(scan[:, :2]).max(1) < 15.0]  # a 30 m crop keeps the test fast
    coords = torch.from_numpy(near[:, :3].copy()) / 0.1  # 0.1 m voxels
    feats = torch.from_numpy(near.copy())
    ours, theirs = run_both(random_spvcnn(0.5, seed=0), coords, feats)
    assert ours.shape == (len(near), 240)
    assert max_relative_error(ours, theirs) <= 1e-4


def test_parity_on_a_synthetic_cloud() -> None:
    gen = torch.Generator().manual_seed(3)
    coords = torch.rand(2500, 3, generator=gen) * torch.tensor([90.0, 70.0, 12.0]) - 20
    feats = torch.rand(2500, 4, generator=gen)
    ours, theirs = run_both(random_spvcnn(0.25, seed=1), coords, feats)
    assert max_relative_error(ours, theirs) <= 1e-4


def _twin_events(net: SPVCNN, coords: torch.Tensor, feats: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, int]]:
    """The twin's output and how often each aten op ran in one no-grad forward."""
    twin = SpconvTwin(net)
    with torch.no_grad():
        twin(PointTensor(feats, coords))  # builds the spconv layers
        with torch.autograd.profiler.profile() as prof:
            out = twin(PointTensor(feats, coords))
    counts: dict[str, int] = {}
    for event in prof.function_events:
        counts[event.name] = counts.get(event.name, 0) + 1
    return out, counts


def test_the_twin_of_a_folded_model_runs_no_batch_norm_and_sums_in_place() -> None:
    """What `bench sparse` compares: the twin does the work ours does (batch norms folded into
    the convolutions, ReLU and residual sums in place), with the same result."""
    from clip2scene_ros.models.bundle import ArchitectureSpec
    from clip2scene_ros.models.fuse import fold_batchnorms

    gen = torch.Generator().manual_seed(3)
    coords = torch.rand(2500, 3, generator=gen) * torch.tensor([90.0, 70.0, 12.0])
    feats = torch.rand(2500, 4, generator=gen)
    net = random_spvcnn(0.25, seed=1)
    ours, _ = run_both(net, coords, feats)
    folded, events = _twin_events(fold_batchnorms(net), coords, feats)
    assert max_relative_error(ours, folded) <= 1e-4
    assert not any("batch_norm" in name for name in events)
    assert events.get("aten::relu", 0) == 0 and events.get("aten::relu_", 0) > 0
    # a residual sum that allocated would add one aten::add per residual block
    deeper = SPVCNN(ArchitectureSpec(cr=0.25, blocks=3), in_channels=4).eval()
    _, deeper_events = _twin_events(fold_batchnorms(deeper), coords, feats)
    assert deeper_events.get("aten::add", 0) == events.get("aten::add", 0)
