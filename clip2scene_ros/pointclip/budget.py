"""Classifying objects within a time budget: how many fit, learnt from the batches run so far.

A pass (clustering, PointCLIP over the objects in batches, then the ensemble and the markers) has
``budget_s`` from its start. Before each batch the scheduler asks :class:`BatchCost` how many
objects still fit; a batch is started only if its *estimated* cost plus the reserve for the
pass's tail (what runs after the last batch) fits in what is left, so a pass stops before the
batch that would overrun instead of after it.

The estimate follows the measured batches the way TCP follows round-trip times (RFC 6298): a
smoothed cost per object ``mean`` and a smoothed deviation ``dev``, and a batch of n objects is
planned at ``n * (mean + DEV_FACTOR * dev)``. A batch that ran slow (a small last batch pays the
same fixed cost per batch over fewer objects; the machine is busy) widens ``dev``, so the next
passes leave more room. The tail is tracked the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Weight of the newest measurement in the smoothed mean (RFC 6298's alpha) and deviation (beta).
MEAN_GAIN = 0.125
DEV_GAIN = 0.25
#: Deviations added to the mean when planning (RFC 6298's K). In the simulation of
#: test_pointclip_budget (node-like costs, ±5-30 % jitter, 200 ms) 4 gave no overrun at a mean
#: pass of 184-188 ms; 2 used 190 ms but overran in up to 1.4 % of the passes.
DEV_FACTOR = 4.0


@dataclass
class Smoothed:
    """A smoothed measurement and its smoothed absolute deviation."""

    mean: float
    dev: float

    def update(self, value: float) -> None:
        self.dev += DEV_GAIN * (abs(value - self.mean) - self.dev)
        self.mean += MEAN_GAIN * (value - self.mean)

    @property
    def high(self) -> float:
        """The planning figure: mean plus :data:`DEV_FACTOR` deviations."""
        return self.mean + DEV_FACTOR * self.dev


class BatchCost:
    """Seconds per object of a batch and seconds of the pass's tail, as measured so far."""

    def __init__(self, s_per_object: float, tail_s: float = 0.0) -> None:
        # a first deviation of half the figure: the warm-up's single measurement is a guess
        self.per_object = Smoothed(s_per_object, s_per_object / 2)
        self.tail = Smoothed(tail_s, tail_s / 2)

    def fits(self, left_s: float, most: int) -> int:
        """How many objects (≤ ``most``) can start with ``left_s`` seconds left in the pass."""
        room = left_s - self.tail.high
        if room <= 0 or most <= 0:
            return 0
        return min(most, math.floor(room / max(self.per_object.high, 1e-9)))

    def batch_ran(self, objects: int, seconds: float) -> None:
        if objects > 0:
            self.per_object.update(seconds / objects)

    def tail_ran(self, seconds: float) -> None:
        self.tail.update(seconds)


def classify_within_budget(count: int, batch_size: int, classify: Callable[[int, int], T],
                           cost: BatchCost, budget_s: float, start: float,
                           clock: Callable[[], float] = time.perf_counter) -> list[T]:
    """``classify(begin, end)`` over ``[0, count)`` in batches of at most ``batch_size``, in
    order, while they fit the budget (``budget_s`` from ``start`` on ``clock``); the results of
    the batches that ran. ``cost`` learns from every batch."""
    results: list[T] = []
    done = 0
    while done < count:
        n = cost.fits(budget_s - (clock() - start), min(batch_size, count - done))
        if n < 1:
            break
        t0 = clock()
        results.append(classify(done, done + n))
        cost.batch_ran(n, clock() - t0)
        done += n
    return results
