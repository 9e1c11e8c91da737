"""Run N generated cases per message type through the codecs and the node; count the outcomes.

Per case and type: **rejected** (the codec raised :class:`~clip2scene_ros.errors.MessageError`,
the one error it documents), **accepted** (decoded, and the result passed the checks of
:mod:`.targets`), **crash** (any other exception, or an accepted result that breaks a check),
**hang** (the case ran past the time limit) or **oversized** (the case's peak resident memory
grew by more than ``max_case_rss_mb``: a size taken from a header rather than the buffer).

A share of the cases (``node_cases`` per type, spread evenly) also goes through the node's own
Pipeline (:mod:`.node`); its crashes, hangs and broken expectations add to the type's counts.
Cases come from hypothesis strategies driven by ``@given`` with a fixed seed, so a run is
reproducible; no database, no shrinking (every outcome is caught and counted instead).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.strategies import SearchStrategy

from ..errors import ConfigError, MessageError
from .camera_info import camera_info_cases
from .clouds import pointcloud2_cases
from .common import Case
from .images import compressed_image_cases, image_cases
from .targets import CHECKS
from .watchdog import CaseStats, CaseTimeout, Watchdog

STRATEGIES: dict[str, Callable[[], SearchStrategy[Case]]] = {
    "pointcloud2": pointcloud2_cases,
    "image": image_cases,
    "compressed_image": compressed_image_cases,
    "camera_info": camera_info_cases,
}
TYPES = tuple(STRATEGIES)
#: Failures kept in the report per type (the counts cover all of them).
KEEP_FAILURES = 5


@dataclass
class TypeReport:
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    oversized: int = 0
    rejected: int = 0
    accepted: int = 0
    max_case_rss_growth_mb: float = 0.0
    max_case_seconds: float = 0.0
    seconds: float = 0.0
    node: Counter[str] = field(default_factory=Counter)
    rejected_fields: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.crashes + self.hangs + self.oversized

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "crashes": self.crashes, "hangs": self.hangs,
            "rejected": self.rejected, "accepted": self.accepted,
            "oversized_allocations": self.oversized,
            "max_case_rss_growth_mb": round(self.max_case_rss_growth_mb, 1),
            "max_case_seconds": round(self.max_case_seconds, 3),
            "seconds": round(self.seconds, 1),
            "node": dict(sorted(self.node.items())),
            "rejected_fields": dict(self.rejected_fields.most_common(25)),
            "warnings": dict(self.warnings.most_common(10)),
            "failures": self.failures,
        }


def summarize(msg: Any) -> dict[str, Any]:
    """The message's fields, short: scalars as they are, arrays and lists by size (plus the
    first bytes of ``data``), so a failure can be rebuilt from the report."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        if f.name.startswith("_") or f.name.isupper():  # rosbags' type name and constants
            continue
        value = getattr(msg, f.name)
        if f.name == "data":
            raw = bytes(np.asarray(value, dtype=np.uint8)[:48])
            out["data"] = f"{len(value)} bytes, starting {raw.hex()}"
        elif isinstance(value, np.ndarray):
            out[f.name] = value.tolist() if value.size <= 12 else f"array of {value.size}"
        elif isinstance(value, list):
            out[f.name] = [summarize(v) if dataclasses.is_dataclass(v) else v
                           for v in value[:8]] + ([f"... {len(value)} in all"]
                                                  if len(value) > 8 else [])
        elif dataclasses.is_dataclass(value):
            out[f.name] = summarize(value)
        else:
            out[f.name] = value
    return out


class _TypeRun:
    """The cases of one message type: codec level always, node level every ``stride``-th."""

    def __init__(self, type_key: str, watchdog: Watchdog, max_case_rss_mb: float,
                 node: Any, node_cases: int, stride: int) -> None:
        self.type_key = type_key
        self.check = CHECKS[type_key]
        self.watchdog = watchdog
        self.max_case_rss_mb = max_case_rss_mb
        self.node = node
        self.node_cases = node_cases
        self.stride = stride
        # a node case labels up to three frames with the model: a hang is far beyond that
        self.node_limit_s = max(10.0, 5 * watchdog.limit_s)
        self.report = TypeReport()

    def _fail(self, what: str, level: str, case: Case, error: str, trace: str = "") -> None:
        if len(self.report.failures) < KEEP_FAILURES:
            self.report.failures.append({"what": what, "level": level, "case": case.describe(),
                                         "error": error[:500], "traceback": trace[-1500:],
                                         "message": summarize(case.msg)})

    def _measured(self, stats: CaseStats, level: str, case: Case) -> bool:
        """Count a hang or an oversized case; True if the case was one."""
        r = self.report
        r.max_case_rss_growth_mb = max(r.max_case_rss_growth_mb, stats.rss_growth_mb)
        r.max_case_seconds = max(r.max_case_seconds, stats.seconds)
        if stats.timed_out:
            r.hangs += 1
            self._fail("hang", level, case, f"ran {stats.seconds:.2f} s (limit "
                       f"{stats.limit_s} s)")
            return True
        if stats.rss_growth_mb > self.max_case_rss_mb:
            r.oversized += 1
            self._fail("oversized", level, case, f"peak RSS grew {stats.rss_growth_mb:.0f} MB "
                       f"(limit {self.max_case_rss_mb} MB)")
            return True
        return False

    def __call__(self, case: Case) -> None:
        r = self.report
        verdict = self._codec(case)
        r.cases += 1
        if verdict in ("accepted", "rejected") and self.node is not None \
                and r.node["cases"] < self.node_cases and (r.cases - 1) % self.stride == 0:
            self._node(case, verdict)

    def _codec(self, case: Case) -> str:
        r = self.report
        verdict = "hang"
        try:
            with self.watchdog.case() as stats, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    self.check(case.msg)
                    verdict = "accepted"
                except MessageError as exc:
                    verdict = "rejected"
                    r.rejected_fields[f"{exc.kind}.{exc.field}"] += 1
                except Exception as exc:
                    verdict = "crash"
                    r.crashes += 1
                    self._fail("crash", "codec", case, f"{type(exc).__name__}: {exc}",
                               traceback.format_exc())
            for w in caught:
                r.warnings[f"{w.category.__name__}: {str(w.message)[:80]}"] += 1
        except CaseTimeout:  # the alarm fired just as the case ended
            stats = CaseStats(self.watchdog.limit_s, self.watchdog.limit_s, timed_out=True)
        if self._measured(stats, "codec", case):
            return "hang" if stats.timed_out else "oversized"
        if verdict in ("accepted", "rejected"):
            setattr(r, verdict, getattr(r, verdict) + 1)
        return verdict

    def _node(self, case: Case, codec_verdict: str) -> None:
        node = self.report.node
        node["cases"] += 1
        outcome = None
        try:
            with self.watchdog.case(self.node_limit_s) as stats, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # counted at the codec level already
                try:
                    outcome = self.node.run(self.type_key, case, codec_verdict)
                except Exception as exc:
                    self.report.crashes += 1
                    node["crashes"] += 1
                    self._fail("crash", "node", case, f"{type(exc).__name__}: {exc}",
                               traceback.format_exc())
        except CaseTimeout:
            stats = CaseStats(self.node_limit_s, self.node_limit_s, timed_out=True)
        if self._measured(stats, "node", case):
            node["hangs" if stats.timed_out else "oversized"] += 1
            return
        if outcome is None:
            return
        node[outcome.verdict] += 1
        if outcome.recovery_ticks > 1:
            node["recovered_on_second_set"] += 1
        if outcome.problem:
            self.report.crashes += 1
            node["broken_expectations"] += 1
            self._fail("broken expectation", "node", case, outcome.problem)


def _drive(strategy: SearchStrategy[Case], cases: int, seed: int,
           on_case: Callable[[Case], None]) -> None:
    """Generate exactly ``cases`` examples (hypothesis may stop early; rerun with seed + 1)."""
    done = 0
    for round_ in range(1000):
        if done >= cases:
            return
        want = cases - done

        @settings(max_examples=want, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @hypothesis_seed(seed * 1000 + round_)
        @given(strategy)
        def run(case: Case) -> None:
            nonlocal done
            if done < cases:
                on_case(case)
                done += 1

        run()
    raise RuntimeError(f"hypothesis produced {done} of {cases} cases")


def run_fuzz(
    cases: int,
    types: Sequence[str] = TYPES,
    *,
    seed: int = 0,
    node_cases: int | None = None,
    time_limit_s: float = 2.0,
    max_case_rss_mb: float = 64.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The fuzz report: per type counts, failures kept, and the totals.

    ``node_cases`` per type go through the node too (default: a fortieth of ``cases``, at
    least 10; each labels up to three frames with the model, a codec case takes milliseconds);
    0 skips the node, as does a missing rclpy (the report says why). ``time_limit_s`` bounds a
    codec case; a node case gets ``max(10, 5 * time_limit_s)``.
    """
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        raise ConfigError("types", f"unknown message types {unknown}; types are {list(TYPES)}")
    if node_cases is None:
        node_cases = min(cases, max(10, cases // 40))
    start = time.monotonic()
    reports: dict[str, TypeReport] = {}
    with tempfile.TemporaryDirectory(prefix="clip2scene-fuzz-") as tmp:
        node, node_note = _node_driver(Path(tmp), node_cases)
        try:
            with Watchdog(time_limit_s) as watchdog:
                for type_key in types:
                    stride = max(1, cases // max(1, node_cases))
                    run = _TypeRun(type_key, watchdog, max_case_rss_mb, node, node_cases, stride)
                    t0 = time.monotonic()
                    _drive(STRATEGIES[type_key](), cases, seed, run)
                    run.report.seconds = time.monotonic() - t0
                    reports[type_key] = run.report
                    if progress is not None:
                        progress(f"{type_key}: {_line(run.report)}")
        finally:
            if node is not None:
                node.close()
    failed = sum(r.failed for r in reports.values())
    return {
        "ok": failed == 0,
        "seed": seed,
        "time_limit_s": time_limit_s,
        "max_case_rss_mb": max_case_rss_mb,
        "node": node_note,
        "seconds": round(time.monotonic() - start, 1),
        "types": {k: r.to_json() for k, r in reports.items()},
    }


def _line(r: TypeReport) -> str:
    return (f"{r.cases} cases, {r.crashes} crashes, {r.hangs} hangs, {r.oversized} oversized, "
            f"{r.rejected} rejected, {r.accepted} accepted, node {r.node['cases']} cases "
            f"({r.seconds:.0f} s)")


def _node_driver(workdir: Path, node_cases: int) -> tuple[Any, str]:
    """The node driver, or None and why not."""
    if node_cases <= 0:
        return None, "skipped: node_cases is 0"
    if importlib.util.find_spec("rclpy") is None:
        return None, "skipped: rclpy (ROS 2 Python) is not installed"
    from .node import NodeDriver

    return NodeDriver(workdir), f"{node_cases} cases per type through the Pipeline"
