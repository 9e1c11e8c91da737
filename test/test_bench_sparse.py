"""`clip2scene bench sparse`: the JSON keys, the parity it checks, and scan loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("spconv.pytorch", reason="spconv (test-only dependency) is not installed")

from clip2scene_ros import cli
from clip2scene_ros.bench.sparse import load_scan

KEYS = ("points", "voxels", "ours_ms", "spconv_ms", "ratio", "kmap_ms", "useful_gflops",
        "sgemm_gflops", "peak_rss_mb", "onnx_max_rel_err")


def test_bench_json_on_a_tiny_scan(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scan = np.concatenate([rng.uniform(-8, 8, (1500, 3)), rng.uniform(0, 1, (1500, 1))], 1)
    path = tmp_path / "000000.bin"
    scan.astype(np.float32).tofile(path)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "sparse", "--scan", str(path), "--voxel", "0.2", "--cr", "0.25",
                     "--repeat", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(key in result for key in KEYS)
    assert result["points"] == 1500 and 0 < result["voxels"] <= 1500
    assert result["ratio"] == pytest.approx(result["ours_ms"] / result["spconv_ms"])
    assert result["malloc"] in ("node", "default")  # what was in effect for both engines
    # ours and spconv were timed side by side, once each per round
    assert len(result["rounds_ms"]["ours"]) == len(result["rounds_ms"]["spconv"]) == 1
    assert result["ratio_paired"] == pytest.approx(result["rounds_ms"]["ours"][0]
                                                   / result["rounds_ms"]["spconv"][0])
    assert result["parity_max_rel_err"] <= 1e-4
    assert 0 < result["kmap_ms"] < result["ours_ms"] and result["useful_gflops"] > 0
    assert result["onnx_max_rel_err"] <= 1e-4
    assert result["ours_peak_rss_mb"] > 0 and result["ours_unfolded_ms"] > 0


def test_scan_formats(tmp_path: Path) -> None:
    nuscenes = tmp_path / "x.pcd.bin"
    np.arange(10, dtype=np.float32).tofile(nuscenes)  # two 5-float points
    assert load_scan(nuscenes).tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    bad = tmp_path / "y.bin"
    np.arange(6, dtype=np.float32).tofile(bad)
    with pytest.raises(ValueError, match="whole number of 4-float"):
        load_scan(bad)
