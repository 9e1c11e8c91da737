"""The dataflow bench measures the rule on the paths the rule decides: inference's csr_conv
(forward) and training's pair_conv (forward+backward), each against implicit GEMM."""

from __future__ import annotations

from typing import Any

import pytest

import clip2scene_ros.bench.sparse_dataflow as bench


def test_the_forward_is_inference_and_the_backward_training(
        monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    calls: dict[str, int] = {"csr_conv": 0, "pair_conv": 0}

    def counted(name: str) -> Any:
        real = getattr(bench, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(bench, name, counted(name))
    report = bench.run(scan=None, channels=(4,), synthetic_side=6, occupancies=(0.3,),
                       repeat=2, backward=True)
    case = report["cases"][0]
    assert case["gather_scatter_ms"] > 0 and case["gather_scatter_fwd_bwd_ms"] > 0
    assert calls["csr_conv"] == 2 + 2  # warm-up rounds, then one per round
    assert calls["pair_conv"] == 1 + 2
    assert report["threads"] == 1  # the JSON says how many threads it ran on


def case(fill: float, gs: float, ig: float) -> dict[str, float]:
    return {"fill": fill, "gather_scatter_ms": gs, "implicit_gemm_ms": ig}


def test_the_rule_needs_every_case_at_and_above_its_fill() -> None:
    cases = [case(0.2, 1.0, 5.0), case(0.7, 1.0, 0.9), case(0.86, 1.0, 0.9),
             case(0.86, 1.0, 1.1), case(0.95, 2.0, 1.0)]
    # at 0.86 implicit GEMM wins one width and loses another: not a win at that fill
    assert bench._fit_rule(cases)["implicit_gemm_min_fill"] == 0.95
    cases[3] = case(0.86, 1.0, 0.95)
    assert bench._fit_rule(cases)["implicit_gemm_min_fill"] == 0.7
    assert bench._fit_rule([case(0.9, 1.0, 2.0)])["implicit_gemm_min_fill"] == 1.01
