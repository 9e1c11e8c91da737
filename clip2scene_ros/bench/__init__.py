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
