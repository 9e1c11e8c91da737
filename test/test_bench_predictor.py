"""`clip2scene bench predictor`: the JSON it writes, on a tiny LiDAR-only bag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros import cli
from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.bench.predictor import STAGES, _Clock, _patched
from clip2scene_ros.codecs import encode_pointcloud2
from clip2scene_ros.codecs.messages import rosbags_factory


def tiny_bag(path: Path, n: int = 1500) -> Path:
    rng = np.random.default_rng(0)
    cloud = np.zeros(n, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                  ("intensity", "<f4")]))
    cloud["x"], cloud["y"] = rng.uniform(-15, 15, n), rng.uniform(-15, 15, n)
    cloud["z"], cloud["intensity"] = rng.uniform(-2, 2, n), rng.uniform(0, 255, n)
    with BagWriter(path) as bag:
        bag.write("/points", encode_pointcloud2(cloud, stamp_ns=10**9, frame_id="lidar",
                                                factory=rosbags_factory()), 10**9)
    return path


def test_bench_json_per_stage_and_backend(tmp_path: Path, one_torch_thread: None) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "predictor", "--bag", str(tiny_bag(tmp_path / "bag")),
                     "--repeat", "2", "--cr", "0.125", "--voxel", "0.4",
                     "--sgemm-size", "256", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["points"] == 1500 and 0 < result["voxels"] <= 1500
    assert result["threads"] == 1 and result["malloc"] in ("node", "default")
    assert result["stages"] == list(STAGES) and result["sgemm_gflops"] > 0
    assert set(result["backends"]) == {"torch", "onnxruntime"}
    for name, entry in result["backends"].items():
        stages = entry["stages_ms"]
        assert set(stages) == set(STAGES) and len(entry["runs"]) == 2
        assert all(stages[s] >= 0 for s in STAGES if s != "network"), (name, stages)
        parts = sum(stages[s] for s in STAGES if s != "total")
        assert parts == pytest.approx(stages["total"], rel=0.05), (name, stages)
        assert stages["geometry"] > 0 and stages["network"] > 0
        assert entry["total_ms"]["min"] <= entry["total_ms"]["p50"] <= entry["total_ms"]["max"]
        assert 0 < entry["gemm_share"] < 1 and entry["gemm_ms"] > 0
        assert set(entry["thread_cpu_ms"]) == {"geometry", "network", "other", "total"}
    ort = result["backends"]["onnxruntime"]
    assert ort["features_max_rel_err_vs_torch"] <= 1e-4 and ort["labels_equal_torch"] > 0.99


def test_clock_counts_outermost_calls_and_restores_what_it_wrapped() -> None:
    class Owner:
        def outer(self) -> int:
            return self.inner() + 1

        def inner(self) -> int:
            return 1

    owner, clock = Owner(), _Clock()
    with _patched([(Owner, "outer"), (Owner, "inner"), (owner, "inner")], clock):
        assert owner.outer() == 2
        assert "inner" in vars(owner)
    wall, cpu = clock.take_ms()
    assert wall >= 0 and cpu >= 0 and clock.take_ms() == (0.0, 0.0)
    assert "inner" not in vars(owner) and Owner.outer.__name__ == "outer"
