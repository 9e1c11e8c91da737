"""`clip2scene bench predictor`: the JSON it writes, on a tiny LiDAR-only bag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros import cli
from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.bench.clock import GEOMETRY, StageClock, geometry_targets, patched
from clip2scene_ros.bench.predictor import STAGES, ort_gemm_of_last_run
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


def test_bench_json_per_stage_backend_and_precision(tmp_path: Path,
                                                    one_torch_thread: None) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "predictor", "--bag", str(tiny_bag(tmp_path / "bag")),
                     "--repeat", "2", "--cr", "0.125", "--voxel", "0.4",
                     "--sgemm-size", "256", "--device", "cpu", "--precision", "fp32,bf16",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["points"] == 1500 and 0 < result["voxels"] <= 1500
    assert result["threads"] == 1 and result["malloc"] in ("node", "default")
    assert result["device"] == "cpu" and result["precisions"] == ["fp32", "bf16"]
    assert result["stages"] == list(STAGES) and result["sgemm_gflops"] > 0
    assert set(result["backends"]) == {"torch", "onnxruntime"}
    measured = [(name, p, entry[p]) for name, entry in result["backends"].items()
                for p in ("fp32", "bf16") if "stages_ms" in entry[p]]
    assert [(n, p) for n, p, _ in measured] == [("torch", "fp32"), ("torch", "bf16"),
                                                ("onnxruntime", "fp32")]
    for name, _, entry in measured:
        stages = entry["stages_ms"]
        assert set(stages) == set(STAGES) and len(entry["runs"]) == 2
        assert all(stages[s] >= 0 for s in STAGES if s != "network"), (name, stages)
        parts = sum(stages[s] for s in STAGES if s != "total")
        assert parts == pytest.approx(stages["total"], rel=0.05), (name, stages)
        assert stages["geometry"] > 0 and stages["network"] > 0
        assert entry["total_ms"]["min"] <= entry["total_ms"]["p50"] <= entry["total_ms"]["max"]
        assert entry["total_p50_ms"] == entry["total_ms"]["p50"]
        assert 0 < entry["gemm_share"] < 1 and entry["gemm_ms"] > 0
        assert set(entry["thread_cpu_ms"]) == {"geometry", "network", "other", "total"}
    torch_entry = result["backends"]["torch"]
    assert "bf16 weights" in torch_entry["bf16"]["describe"]
    # the median of per-round ratios: the two precisions ran in the same rounds
    ratios = sorted(b["total"] / f["total"] for b, f in zip(torch_entry["bf16"]["runs"],
                                                           torch_entry["fp32"]["runs"],
                                                           strict=True))
    assert torch_entry["bf16_over_fp32"] == pytest.approx(sum(ratios) / 2)
    assert torch_entry["bf16"]["labels_equal_torch"] >= 0.95
    # the exported graph is fp32 only: its bf16 is refused, naming what it runs
    assert "supported: fp32" in result["backends"]["onnxruntime"]["bf16"]["skipped"]
    assert "bf16_over_fp32" not in result["backends"]["onnxruntime"]
    ort = result["backends"]["onnxruntime"]["fp32"]
    assert ort["features_max_rel_err_vs_torch"] <= 1e-4 and ort["labels_equal_torch"] > 0.99
    table = cli_table(result)
    assert "torch bf16" in table and "torch bf16 over fp32" in table


def cli_table(result: dict[str, object]) -> str:
    from clip2scene_ros.bench.predictor import format_table

    return format_table(result)


@pytest.mark.parametrize("given", ["auto", "fp32,fp32", "int8", ""])
def test_bench_precision_list_is_checked(given: str, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "predictor", "--bag", "b", "--precision", given])
    assert "--precision" in capsys.readouterr().err


def test_bench_precision_defaults_to_fp32() -> None:
    """fp32 only by default: bf16 on a CPU without bf16 matrix units is emulated, far slower."""
    args = cli.build_parser().parse_args(["bench", "predictor", "--bag", "b"])
    assert args.precision == ["fp32"]


class FakeTime:
    """A clock that moves only when told: the stage sums a test expects are then exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_clock_counts_outermost_calls_once_and_restores_what_it_wrapped() -> None:
    wall, cpu = FakeTime(), FakeTime()

    def spend(seconds: float) -> None:
        wall.now += seconds
        cpu.now += seconds / 2

    class Owner:
        def outer(self) -> int:
            spend(1.0)
            value = self.inner() + self.inner()  # nested: already inside a clocked call
            spend(1.0)
            return value

        def inner(self) -> int:
            spend(10.0)
            return 1

    owner, clock = Owner(), StageClock(wall=wall, cpu=cpu)
    with patched([(Owner, "outer"), (Owner, "inner"), (owner, "inner")], clock):
        assert owner.outer() == 2  # 1 + 10 + 10 + 1 = 22 s, its inner calls not again
        assert owner.inner() == 1  # on its own: an outermost call, 10 s
        assert "inner" in vars(owner)
    assert clock.calls == 2
    assert clock.take_ms() == (32_000.0, 16_000.0)  # double counting would read 52 s
    assert clock.take_ms() == (0.0, 0.0) and clock.calls == 0
    assert "inner" not in vars(owner) and Owner.outer.__name__ == "outer"


def test_every_geometry_function_is_found() -> None:
    """A renamed geometry function would silently drop out of both benches' geometry time."""
    assert len(geometry_targets()) == len(GEOMETRY)


def test_ort_gemm_share_is_of_the_measured_run_only() -> None:
    def node(ts: int, dur: int, op: str = "MatMul") -> dict[str, object]:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 10_000},  # warm-up
        node(100, 9_000),
        {"cat": "Session", "name": "model_run", "ts": 20_000, "dur": 4_000},  # measured
        node(20_100, 1_000), node(21_200, 500, "Gemm"), node(22_000, 1_500, "Gather"),
    ]
    gemm_ms, run_ms = ort_gemm_of_last_run(events)
    assert (gemm_ms, run_ms) == (1.5, 4.0)  # the warm-up's 9 ms of MatMul count nowhere
