"""``python -m clip2scene_ros.bench.train_step``: fp32 and bf16-autocast training steps timed
in the same rounds, on a bag's first frame."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_bench_predictor import tiny_bag  # one LiDAR cloud in a bag

from clip2scene_ros.bench import median
from clip2scene_ros.bench import train_step as bench_module
from clip2scene_ros.sparse import conv as conv_module


@pytest.mark.parametrize("units", [False, True])
def test_train_step_json_times_both_precisions_in_the_same_rounds(
        tmp_path: Path, units: bool, monkeypatch: pytest.MonkeyPatch,
        one_torch_thread: None) -> None:
    monkeypatch.setattr(bench_module, "cpu_has_fast_bf16", lambda: units)
    monkeypatch.setattr(bench_module, "BF16_GEMM_SIZE", 128)
    seen: set[torch.dtype] = set()
    pair_conv = conv_module.pair_conv

    def spy(feats: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.add(feats.dtype)
        return pair_conv(feats, weight, *args)

    monkeypatch.setattr(conv_module, "pair_conv", spy)
    out = tmp_path / "step.json"
    assert bench_module.main(["--bag", str(tiny_bag(tmp_path / "bag", 1200)), "--repeat", "2",
                              "--cr", "0.125", "--voxel", "0.4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert seen == {torch.float32, torch.bfloat16}  # the trunk ran in both precisions
    assert result["points"] == 1200 and result["threads"] == 1 and result["repeat"] == 2
    rounds = result["rounds_ms"]
    assert set(rounds) == {"fp32", "bf16"} and all(len(v) == 2 for v in rounds.values())
    assert result["bf16_over_fp32"] == median([b / f for b, f in zip(rounds["bf16"],
                                                                    rounds["fp32"], strict=True)])
    assert result["fp32_step_ms"] == median(rounds["fp32"]) > 0
    fp32, bf16 = result["first_loss"]["fp32"], result["first_loss"]["bf16"]
    assert math.isfinite(fp32) and fp32 > 0 and bf16 == pytest.approx(fp32, rel=0.05)
    assert result["sgemm_gflops"] > 0 and result["bf16_peak_gflops"] > 0
    assert 0 < result["fp32_gemm_share"] < 1
    assert result["target_bf16_over_fp32"] == pytest.approx(1 / 1.6)
    if units:
        assert result["target_met"] == (result["bf16_over_fp32"] <= 1 / 1.6)
        assert result["target_note"] is None
    else:
        assert result["target_met"] is None and "emulated" in result["target_note"]


def test_train_step_refuses_zero_rounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        bench_module.bench_train_step(tmp_path / "none", repeat=0)
