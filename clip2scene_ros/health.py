"""What the node knows about its own health: counters, throttled logging, latency, diagnostics.

ROS-free so every rule is unit-tested; the node turns :meth:`Health.status` into a
``diagnostic_msgs/DiagnosticArray`` and asks :meth:`Health.should_log` before each log line.
Levels follow Autoware's perception nodes: WARN when bad messages arrived or frames were dropped
in the last period, or processing took longer than ``warn_processing_ms``; ERROR when no frame
was produced for ``error_silence_s`` while clouds kept coming.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Level = Literal["OK", "WARN", "ERROR"]
STAGES = ("preprocess", "inference", "postprocess", "total", "pipeline")


def latency_summary(values: Iterable[float]) -> dict[str, float]:
    """p50, p95, p99 and max of latencies (ms); ``values`` must not be empty."""
    arr = np.fromiter(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(arr.max())}


@dataclass(frozen=True)
class Status:
    level: Level
    message: str
    values: dict[str, str]


@dataclass
class Health:
    """Counters and recent latencies of one node (times in seconds of any monotonic clock)."""

    log_throttle_s: float = 5.0
    warn_processing_ms: float = 200.0
    error_silence_s: float = 1.0
    window: int = 200
    bad: Counter[str] = field(default_factory=Counter)
    frames: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, deque[float]] = field(default_factory=dict)
    dropped_points: Counter[str] = field(default_factory=Counter)
    _last_log: dict[str, float] = field(default_factory=dict)
    _suppressed: Counter[str] = field(default_factory=Counter)
    _period_start: Counter[str] = field(default_factory=Counter)
    _last_output_s: float | None = None
    _last_input_s: float | None = None

    def bad_message(self, kind: str) -> None:
        """Count a rejected message of ``kind`` (e.g. ``"PointCloud2"``, ``"Image"``)."""
        self.bad[kind] += 1

    def should_log(self, kind: str, now_s: float) -> tuple[bool, int]:
        """Whether to log about ``kind`` now, and how many lines were suppressed since the last."""
        last = self._last_log.get(kind)
        if last is not None and now_s - last < self.log_throttle_s:
            self._suppressed[kind] += 1
            return False, 0
        self._last_log[kind] = now_s
        suppressed = self._suppressed.pop(kind, 0)
        return True, suppressed

    def points_dropped(self, reason: str, count: int) -> None:
        """Count input points the preprocessing dropped (``non_finite``, ``out_of_range``...)."""
        if count:
            self.dropped_points[reason] += count

    def frame(self, event: str, now_s: float) -> None:
        """Count a frame event: ``received``, ``processed``, ``dropped_stale``, ``lidar_only``."""
        self.frames[event] += 1
        if event == "received":
            self._last_input_s = now_s
        elif event == "processed":
            self._last_output_s = now_s

    def latency(self, stage: str, ms: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown latency stage {stage!r}; stages are {STAGES}")
        self.latency_ms.setdefault(stage, deque(maxlen=self.window)).append(float(ms))

    def percentiles(self, stage: str) -> dict[str, float]:
        values = self.latency_ms.get(stage)
        return latency_summary(values) if values else {}

    def status(self, now_s: float) -> Status:
        """The diagnostic level and key values; starts a new counting period for WARN rules."""
        problems: list[str] = []
        level: Level = "OK"
        new_bad = {k: v - self._period_start[f"bad:{k}"] for k, v in self.bad.items()}
        new_bad = {k: v for k, v in new_bad.items() if v > 0}
        dropped = self.frames["dropped_stale"] - self._period_start["dropped_stale"]
        if new_bad:
            problems.append("bad messages: " + ", ".join(f"{k} {v}" for k, v in
                                                         sorted(new_bad.items())))
        if dropped > 0:
            problems.append(f"{dropped} stale frames dropped")
        recent = self.latency_ms.get("total")
        if recent and recent[-1] > self.warn_processing_ms:
            problems.append(f"processing {recent[-1]:.0f} ms > {self.warn_processing_ms:.0f} ms")
        if problems:
            level = "WARN"
        last_out = self._last_output_s
        silent = (self._last_input_s is not None
                  and now_s - self._last_input_s <= self.error_silence_s
                  and (last_out is None or now_s - last_out > self.error_silence_s))
        if silent:
            level = "ERROR"
            problems.insert(0, f"no labelled cloud for more than {self.error_silence_s:.1f} s "
                            "while clouds arrive")
        for key, value in self.bad.items():
            self._period_start[f"bad:{key}"] = value
        self._period_start["dropped_stale"] = self.frames["dropped_stale"]
        values = {f"frames_{k}": str(v) for k, v in sorted(self.frames.items())}
        values.update({f"bad_{k}": str(v) for k, v in sorted(self.bad.items())})
        values.update({f"points_dropped_{k}": str(v)
                       for k, v in sorted(self.dropped_points.items())})
        for stage in STAGES:
            for name, ms in self.percentiles(stage).items():
                values[f"{stage}_ms_{name}"] = f"{ms:.2f}"
        return Status(level, "; ".join(problems) or "ok", values)
