"""Benchmarks that print JSON; each compares against a baseline measured in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable


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


def sgemm_gflops(repeat: int = 5, n: int = 2048) -> float:
    """torch's fp32 GEMM rate (GFLOP/s) with the current threads: the machine's baseline,
    measured in the same run as what it is compared with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = median_ms(lambda: torch.mm(a, b), repeat, warmup=1)
    return 2.0 * n**3 / (ms * 1e-3) / 1e9
