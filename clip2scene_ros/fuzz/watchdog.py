"""Per-case time limit and memory measurement for the fuzz harness.

Time: ``setitimer``/SIGALRM raises :class:`CaseTimeout` in the main thread at the limit, which
stops any case looping in Python for one syscall per case. It cannot stop a C call that never
returns, so faulthandler's watchdog thread dumps every thread's stack and ends the process at
``hard_limit_s`` (a hung nightly run fails loudly instead of stalling). A case that returns after
its limit (a long C call) counts as a hang as well. A thread-based timeout cannot stop the case
at all, and a subprocess per case would cost milliseconds each. Off the main thread only the
measured duration counts.

Memory: writing ``5`` to ``/proc/self/clear_refs`` resets the process's peak RSS (VmHWM), so
each case's peak above its starting RSS is measured exactly, Pillow's and libjpeg's own
allocations included (tracemalloc sees only Python's). Where that file is not writable, growth
of ``ru_maxrss`` over the run's previous peak is the (weaker) measure.
"""

from __future__ import annotations

import contextlib
import faulthandler
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
#: faulthandler's watchdog is re-armed at most this often (arming costs ~0.2 ms).
REARM_S = 1.0


class CaseTimeout(BaseException):
    """A case overran its time limit (a BaseException, so ``except Exception`` in the code under
    test cannot swallow it)."""


@dataclass
class CaseStats:
    limit_s: float = 0.0
    seconds: float = 0.0
    rss_growth_mb: float = 0.0
    timed_out: bool = False


def _status_kb(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _max_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _dump_file() -> Any:
    """A stream faulthandler can write to (it needs a file descriptor; pytest's capture of
    sys.stderr has none), or None."""
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        return stream
    return None


class Watchdog:
    """Use as a context manager around a run, and :meth:`case` around each case."""

    def __init__(self, limit_s: float, hard_limit_s: float | None = None) -> None:
        self.limit_s = float(limit_s)
        self.hard_limit_s = float(hard_limit_s or max(60.0, 10 * self.limit_s))
        self._signals = threading.current_thread() is threading.main_thread()
        self._clear_refs = self._try_clear_refs()
        self._old_handler: Any = None
        self._old_timer = (0.0, 0.0)
        self._entered = 0.0
        self._armed_at = float("-inf")
        self._dump_to = _dump_file()

    @staticmethod
    def _try_clear_refs() -> bool:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return STATUS.exists()

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        raise CaseTimeout("case ran past its time limit")

    def __enter__(self) -> Watchdog:
        self._entered = time.monotonic()
        if self._signals:
            # keep whatever alarm was set (pytest-timeout's) and put it back afterwards
            self._old_timer = signal.getitimer(signal.ITIMER_REAL)
            self._old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old_handler)
            remaining, interval = self._old_timer
            if remaining > 0:
                left = remaining - (time.monotonic() - self._entered)
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), interval)

    @contextlib.contextmanager
    def case(self, limit_s: float | None = None) -> Iterator[CaseStats]:
        """Time and measure one case (``limit_s``: this case's limit, default the watchdog's);
        a timeout ends the block and sets ``timed_out``."""
        limit = self.limit_s if limit_s is None else float(limit_s)
        stats = CaseStats(limit_s=limit)
        now = time.monotonic()
        if self._dump_to is not None and now - self._armed_at > REARM_S:
            faulthandler.dump_traceback_later(self.hard_limit_s, exit=True, file=self._dump_to)
            self._armed_at = now
        if self._clear_refs:
            CLEAR_REFS.write_text("5")
            start_kb = _status_kb("VmRSS:")
        else:
            start_kb = _max_rss_kb()
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, limit)
        start = time.perf_counter()
        try:
            yield stats
        except CaseTimeout:
            stats.timed_out = True
        finally:
            if self._signals:
                signal.setitimer(signal.ITIMER_REAL, 0)
            stats.seconds = time.perf_counter() - start
            stats.timed_out = stats.timed_out or stats.seconds > limit
            peak_kb = _status_kb("VmHWM:") if self._clear_refs else _max_rss_kb()
            stats.rss_growth_mb = max(0, peak_kb - start_kb) / 1024
