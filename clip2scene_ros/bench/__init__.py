"""Benchmarks that print JSON; each compares against a baseline measured in the same run."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runtime.malloc import apply_node_malloc


def median_ms(func: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median wall time of ``func`` in milliseconds over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        func()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def interleaved_ms(funcs: dict[str, Callable[[], object]], repeat: int, warmup: int = 1
                   ) -> dict[str, list[float]]:
    """Wall times (ms) of each of ``funcs`` over ``repeat`` rounds, every function once per
    round, after ``warmup`` rounds. On a shared machine whose speed drifts by tens of percent
    from minute to minute, a ratio of two functions is only meaningful when they are timed
    side by side like this, not in one block after the other."""
    for _ in range(warmup):
        for func in funcs.values():
            func()
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(max(1, repeat)):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def sgemm_gflops(repeat: int = 5, n: int = 2048) -> float:
    """torch's fp32 GEMM rate (GFLOP/s) with the current threads: the machine's baseline,
    measured in the same run as what it is compared with."""
    run, flops = gemm_probe(n)
    return flops / (median_ms(run, repeat, warmup=1) * 1e-3) / 1e9


def gemm_probe(n: int = 2048, dtype: Any = None) -> tuple[Callable[[], object], float]:
    """One ``n`` x ``n`` GEMM in fp32 (or ``dtype``) and its FLOPs: the machine's GEMM baseline,
    to be timed in the same rounds as what it is compared with."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def apply_malloc(choice: str) -> str:
    """A benchmark's ``--malloc``: ``node`` applies the node's glibc settings
    (:func:`~clip2scene_ros.runtime.malloc.apply_node_malloc`, over any the environment sets:
    the flag is the explicit choice), ``default`` leaves glibc's; returns what is in effect.
    ValueError for anything else."""
    if choice not in ("node", "default"):
        raise ValueError(f"malloc must be 'node' or 'default', got {choice!r}")
    return apply_node_malloc(keep_env=False) if choice == "node" else "default"


def print_report(report: dict[str, Any], json_path: Path | None) -> None:
    """A benchmark's JSON on stdout, and in ``json_path`` too when given."""
    text = json.dumps(report, indent=1)
    if json_path is not None:
        json_path.write_text(text + "\n")
    sys.stdout.write(text + "\n")
