"""The engine A/B bench: identical results are checked before any timing, and the rounds are
paired (old and new alternate)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from test_bench_predictor import tiny_bag  # one LiDAR cloud in a bag

from clip2scene_ros.bench import geometry_ab

ROOT = Path(__file__).resolve().parent.parent




def test_against_the_committed_engine(tmp_path: Path, one_torch_thread: None) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git history (a clone, not an sdist)")
    result = geometry_ab.run(tiny_bag(tmp_path / "bag", 1200), "HEAD", rounds=3, cr=0.125,
                             voxel=0.4)
    assert result["identical"] == {"kernel_maps": 9, "strides": 5}
    for stage in ("geometry", "total", "geometry_cpu", "total_cpu"):
        entry = result[stage]
        old, new = entry["old_rounds_ms"], entry["new_rounds_ms"]
        assert len(old) == len(new) == 3 and min(old + new) > 0
        assert entry["ratio_paired"] == pytest.approx(
            statistics.median(n / o for n, o in zip(new, old, strict=True)))
    assert result["geometry"]["new_ms"] < result["total"]["new_ms"]


def test_a_difference_aborts_the_bench() -> None:
    a = torch.arange(5)
    geometry_ab._same((a, [a]), (a.clone(), [a.clone()]), "maps")
    with pytest.raises(RuntimeError, match=r"maps\[1\]\[0\] differs"):
        geometry_ab._same((a, [a]), (a, [a + 1]), "maps")
    with pytest.raises(RuntimeError, match="differs"):
        geometry_ab._same(a, a.to(torch.int32), "dtype")
