"""Approximate-time matching of sensor stamps: the nearest message within a slop.

Two forms of one rule (for each reference stamp, i.e. each LiDAR sweep, take each camera's
message with the nearest stamp, if it lies within ``slop``; a camera without one is left out):

* ``match_nearest``: vectorised over whole stamp arrays, for a bag whose stamps are all known.
* ``ApproximateTimeSync``: incremental, for live topics (the node); it emits a set as soon as
  every camera's nearest message is decided, or after a timeout with the cameras it has.

Pure Python/numpy; ``message_filters`` is not needed (and not installable without ROS). Unlike
``message_filters.ApproximateTimeSynchronizer`` the reference topic is fixed and a camera message
may serve two consecutive sweeps (a 12 Hz camera against a 20 Hz LiDAR), which is what
point–pixel pairing wants.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class NearestMatch:
    """Result of ``match_nearest`` for R reference stamps.

    Attributes:
        index: (R,) int64 candidate index matched within the slop, -1 where none is.
        nearest: (R,) int64 index of the nearest candidate regardless of slop (-1: no candidates).
        offset_ns: (R,) float64 ``candidate - reference`` of the nearest candidate (NaN: none).
    """

    index: np.ndarray
    nearest: np.ndarray
    offset_ns: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        return self.index >= 0


def match_nearest(reference_ns: Any, candidate_ns: Any, slop_ns: int) -> NearestMatch:
    """For each reference stamp, the candidate with the nearest stamp, kept if within ``slop_ns``.

    Candidates need not be sorted; on a tie the earlier candidate wins. Indices refer to the
    order of ``candidate_ns``.
    """
    if slop_ns < 0:
        raise ConfigError("slop_ns", f"slop must be >= 0, got {slop_ns} ns")
    ref = np.asarray(reference_ns, dtype=np.int64).reshape(-1)
    cand = np.asarray(candidate_ns, dtype=np.int64).reshape(-1)
    if cand.size == 0:
        none = np.full(ref.shape, -1, dtype=np.int64)
        return NearestMatch(none, none.copy(), np.full(ref.shape, np.nan))
    order = np.argsort(cand, kind="stable")
    sorted_c = cand[order]
    right = np.searchsorted(sorted_c, ref, side="left").clip(0, cand.size - 1)
    left = (right - 1).clip(0, cand.size - 1)
    d_left = np.abs(ref - sorted_c[left])
    d_right = np.abs(sorted_c[right] - ref)
    pick = np.where(d_left <= d_right, left, right)
    nearest = order[pick]
    offset = (cand[nearest] - ref).astype(np.float64)
    index = np.where(np.abs(offset) <= slop_ns, nearest, -1)
    return NearestMatch(index.astype(np.int64), nearest.astype(np.int64), offset)


@dataclass(frozen=True)
class SyncedSet(Generic[T]):
    """One reference message with the secondary messages matched to it.

    Attributes:
        stamp_ns: the reference stamp.
        reference: the reference message (e.g. the PointCloud2).
        matches: key -> (stamp_ns, message) for each secondary matched within the slop.
        missing: the keys with no message within the slop (LiDAR-only when all are missing).
    """

    stamp_ns: int
    reference: T
    matches: dict[str, tuple[int, T]]
    missing: tuple[str, ...]


@dataclass(order=True)
class _Item(Generic[T]):
    stamp_ns: int
    seq: int
    msg: Any = field(compare=False)


class ApproximateTimeSync(Generic[T]):
    """Incremental nearest-stamp synchroniser of one reference stream and N secondary streams.

    A pending reference is emitted once, for every key, a message at or after its stamp has
    arrived (so nothing nearer can still come, given each stream arrives in stamp order), or
    when ``poll(now)`` finds it older than ``timeout_ns`` (the LiDAR-only fallback when a camera
    is late or dead). At most ``queue_size`` references wait; older ones are dropped and counted
    in ``dropped``.

    Args:
        keys: names of the secondary streams (camera names).
        slop_ns: the largest ``|secondary - reference|`` stamp difference accepted.
        timeout_ns: wall/clock time a reference may wait for its secondaries (None: forever).
        queue_size: most references waiting at once.
    """

    def __init__(
        self,
        keys: Sequence[str],
        slop_ns: int,
        *,
        timeout_ns: int | None = None,
        queue_size: int = 10,
    ) -> None:
        if slop_ns < 0:
            raise ConfigError("slop_ns", f"slop must be >= 0, got {slop_ns} ns")
        if queue_size < 1:
            raise ConfigError("queue_size", f"must be >= 1, got {queue_size}")
        if len(set(keys)) != len(keys):
            raise ConfigError("keys", f"secondary keys must be unique, got {list(keys)}")
        self.keys = tuple(keys)
        self.slop_ns = int(slop_ns)
        self.timeout_ns = timeout_ns
        self.queue_size = queue_size
        self.dropped = 0
        self._seq = 0
        self._pending: deque[tuple[_Item[T], int]] = deque()  # (reference, arrival time)
        self._buffers: dict[str, list[_Item[T]]] = {k: [] for k in self.keys}
        self._latest: dict[str, int | None] = dict.fromkeys(self.keys)
        self._last_reference: int | None = None

    def _item(self, stamp_ns: int, msg: T) -> _Item[T]:
        self._seq += 1
        return _Item(int(stamp_ns), self._seq, msg)

    def add_reference(self, stamp_ns: int, msg: T, now_ns: int | None = None) -> list[SyncedSet[T]]:
        """Queue a reference message; returns the sets that became complete."""
        self._pending.append((self._item(stamp_ns, msg), stamp_ns if now_ns is None else now_ns))
        self._last_reference = max(int(stamp_ns), self._last_reference or int(stamp_ns))
        while len(self._pending) > self.queue_size:
            self._pending.popleft()
            self.dropped += 1
        return self._emit(now_ns=None)

    def add(self, key: str, stamp_ns: int, msg: T) -> list[SyncedSet[T]]:
        """Add a secondary message; returns the sets that became complete."""
        if key not in self._buffers:
            raise KeyError(f"unknown sync key {key!r}; keys are {list(self.keys)}")
        insort(self._buffers[key], self._item(stamp_ns, msg))
        latest = self._latest[key]
        self._latest[key] = int(stamp_ns) if latest is None else max(latest, int(stamp_ns))
        return self._emit(now_ns=None)

    def poll(self, now_ns: int) -> list[SyncedSet[T]]:
        """Emit the references that waited longer than ``timeout_ns`` with what they have."""
        return self._emit(now_ns=now_ns)

    def flush(self) -> list[SyncedSet[T]]:
        """Emit every pending reference with what it has (end of a stream)."""
        out = [self._complete(ref) for ref, _ in self._pending]
        self._pending.clear()
        return out

    def _decided(self, stamp_ns: int) -> bool:
        return all(latest is not None and latest >= stamp_ns for latest in self._latest.values())

    def _emit(self, now_ns: int | None) -> list[SyncedSet[T]]:
        out = []
        while self._pending:
            ref, arrival = self._pending[0]
            timed_out = (
                now_ns is not None
                and self.timeout_ns is not None
                and now_ns - arrival >= self.timeout_ns
            )
            if not (timed_out or self._decided(ref.stamp_ns)):
                break
            self._pending.popleft()
            out.append(self._complete(ref))
        self._prune()
        return out

    def _complete(self, ref: _Item[T]) -> SyncedSet[T]:
        matches: dict[str, tuple[int, T]] = {}
        missing = []
        for key, buf in self._buffers.items():
            best = min(
                buf, key=lambda it: (abs(it.stamp_ns - ref.stamp_ns), it.stamp_ns), default=None
            )
            if best is not None and abs(best.stamp_ns - ref.stamp_ns) <= self.slop_ns:
                matches[key] = (best.stamp_ns, best.msg)
            else:
                missing.append(key)
        return SyncedSet(ref.stamp_ns, ref.msg, matches, tuple(missing))

    def _prune(self) -> None:
        """Drop secondaries too old to match any reference still to come or still pending."""
        if self._pending:
            horizon = self._pending[0][0].stamp_ns - self.slop_ns
        elif self._last_reference is not None:
            horizon = self._last_reference - self.slop_ns
        else:
            return
        for key, buf in self._buffers.items():
            keep = [it for it in buf if it.stamp_ns >= horizon]
            # A buffer bounded by the reference queue: streams far ahead cannot grow it forever.
            self._buffers[key] = keep[-4 * self.queue_size * max(1, len(self.keys)) :]
