"""`clip2scene bench sparse`: the JSON keys, the parity it checks, and scan loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("spconv.pytorch", reason="spconv (test-only dependency) is not installed")

from clip2scene_ros import cli
from clip2scene_ros.bag.scans import load_scan

KEYS = ("points", "voxels", "ours_ms", "spconv_ms", "ratio", "kmap_ms", "useful_gflops",
        "sgemm_gflops", "peak_rss_mb", "onnx_max_rel_err", "ours_bf16_ms", "ratio_bf16",
        "bf16_label_agreement", "bf16_peak_gflops")


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
    # bf16: our folded network with a bf16 trunk against spconv fp32, in the same rounds
    assert result["ratio_bf16"] == pytest.approx(result["ours_bf16_ms"] / result["spconv_ms"])
    assert len(result["rounds_ms"]["ours_bf16"]) == len(result["rounds_ms"]["bf16_gemm"]) == 1
    assert 0.95 <= result["bf16_label_agreement"] <= 1 and result["bf16_peak_gflops"] > 0
    assert result["malloc"] in ("node", "default")  # what was in effect for both engines
    # ours and spconv were timed side by side, once each per round
    assert len(result["rounds_ms"]["ours"]) == len(result["rounds_ms"]["spconv"]) == 1
    assert result["ratio_paired"] == pytest.approx(result["rounds_ms"]["ours"][0]
                                                   / result["rounds_ms"]["spconv"][0])
    assert result["parity_max_rel_err"] <= 1e-4
    assert 0 < result["kmap_ms"] < result["ours_ms"] and result["useful_gflops"] > 0
    assert 0 < result["kmap_share"] < 1
    # one definition of kernel-map time, the one bench predictor uses
    from clip2scene_ros.bench.clock import GEOMETRY

    assert result["kmap_functions"] == [f"{m}.{n}" for m, n in GEOMETRY]
    assert "folded" in result["compared"] and "in place" in result["compared"]
    assert result["onnx_max_rel_err"] <= 1e-4
    assert result["ours_peak_rss_mb"] > 0 and result["ours_unfolded_ms"] > 0
    # where the time goes: every sparse conv of SPVCNN, timed in both engines
    layers = result["layers"]
    assert len(layers) == 49 and len({row["name"] for row in layers}) == 49
    stem = layers[0]
    assert (stem["name"], stem["kernel"], stem["cin"]) == ("stem.0", 3, 4)
    assert all(row["ours_ms"] > 0 and row["spconv_ms"] > 0 and row["pairs"] > 0
               for row in layers)
    for engine in ("ours", "spconv"):
        conv = sum(row[f"{engine}_ms"] for row in layers)
        assert result["conv_ms"][engine] == pytest.approx(conv)
        assert result["rest_ms"][engine] == pytest.approx(result[f"{engine}_ms"] - conv)
    assert all(0 < row["voxels_out"] <= row["pairs"] for row in layers)
    assert result["gemm_floor_ms"] > 0 and result["traffic_floor_ms"] > 0
    # the baselines ran in the same round as the engines; one round: the medians are its values
    assert all(len(result["rounds_ms"][k]) == 1 for k in ("gemm_floor", "gather", "sgemm"))
    assert result["gemm_floor_ms"] == pytest.approx(result["rounds_ms"]["gemm_floor"][0])
    assert result["sgemm_share"] == pytest.approx(result["useful_gflops"]
                                                  / result["sgemm_gflops"])
    assert result["ratio_floor"] == pytest.approx(
        (result["gemm_floor_ms"] + result["traffic_floor_ms"] + result["rest_ms"]["ours"])
        / result["spconv_ms"])


def test_scan_formats(tmp_path: Path) -> None:
    nuscenes = tmp_path / "x.pcd.bin"
    np.arange(10, dtype=np.float32).tofile(nuscenes)  # two 5-float points
    assert load_scan(nuscenes).tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    bad = tmp_path / "y.bin"
    np.arange(6, dtype=np.float32).tofile(bad)
    with pytest.raises(ValueError, match="whole number of 4-float"):
        load_scan(bad)


def test_conv_calls_count_what_moves_through_memory() -> None:
    """The floors' inputs: GEMM rows per offset, and the pairs that pass a gather and a
    scatter (all but a submanifold map's identity offset, whose rows are one plain matmul)."""
    import torch

    from clip2scene_ros.bench.sparse import _conv_calls
    from clip2scene_ros.models.spconv_twin import random_spvcnn
    from clip2scene_ros.sparse.tensor import PointTensor

    rng = np.random.default_rng(1)
    points = torch.from_numpy(rng.uniform(0, 30, (800, 4)).astype(np.float32))
    net = random_spvcnn(0.25)
    calls, linear_flops = _conv_calls(net, PointTensor(points, points[:, :3]))
    linears = [m for m in net.point_transforms.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3  # every point gets each of the three point transforms
    assert linear_flops == sum(2.0 * len(points) * m.in_features * m.out_features
                               for m in linears)
    assert len(calls) == 49 and calls[0].name == "stem.0"
    for call in calls:
        m = call.module
        if m.kernel_volume == 1:
            assert call.rows == (call.n_out,) and call.moved == 0
        elif m.stride == (1, 1, 1):  # submanifold: the identity offset reaches every voxel
            assert call.moved == sum(call.rows) - call.n_out
        else:  # strided and transposed maps have no identity offset
            assert call.moved == sum(call.rows)
