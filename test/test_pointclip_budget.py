"""The objects pass's time budget: batches planned from measured costs, with the tail reserved."""

from __future__ import annotations

import numpy as np

from clip2scene_ros.pointclip.budget import BatchCost, Smoothed, classify_within_budget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(passes: int, budget_s: float, *, fixed_s: float, per_object_s: float,
             jitter: float, tail_s: float, slow: tuple[int, int, float] = (0, 0, 1.0),
             objects: int = 40, batch_size: int = 8, seed: int = 0) -> np.ndarray:
    """Pass durations (s) of a node-like loop: clustering, batches within the budget, a tail.
    A batch of n costs ``(fixed + n * per_object) * U(1 - jitter, 1 + jitter)``; passes in
    ``[slow[0], slow[1])`` run ``slow[2]`` times slower (a busy machine)."""
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    cost = BatchCost(fixed_s + per_object_s)  # the warm-up: one object, timed once
    durations = []
    for i in range(passes):
        factor = slow[2] if slow[0] <= i < slow[1] else 1.0
        start = clock.now
        clock.now += 0.02 * factor  # clustering

        def batch(begin: int, end: int, factor: float = factor) -> int:
            clock.now += (fixed_s + (end - begin) * per_object_s) * factor * rng.uniform(
                1 - jitter, 1 + jitter)
            return end - begin

        done = sum(classify_within_budget(objects, batch_size, batch, cost, budget_s, start,
                                          clock))
        assert done <= objects
        tail_start = clock.now
        clock.now += tail_s * factor * rng.uniform(1 - jitter, 1 + jitter)
        cost.tail_ran(clock.now - tail_start)
        durations.append(clock.now - start)
    return np.asarray(durations)


def test_passes_stay_within_the_budget_and_use_it() -> None:
    """Node-like costs (10.6 ms per object as measured, a fixed cost per batch that makes
    small last batches dearer, ±15 % jitter, a 5 ms tail): after the first passes settle, no
    pass overruns 200 ms, and most of the budget is used."""
    d = simulate(300, 0.2, fixed_s=0.004, per_object_s=0.0106, jitter=0.15, tail_s=0.005)
    settled = d[10:]
    assert settled.max() <= 0.2, np.sort(settled)[-5:]
    assert settled.mean() >= 0.85 * 0.2, settled.mean()  # not over-cautious either


def test_a_slow_down_costs_at_most_a_few_overruns() -> None:
    """The machine turns 2x slower for 50 passes: the deviation widens at once, so at most the
    first couple of slow passes overrun, and the budget holds again afterwards."""
    d = simulate(200, 0.2, fixed_s=0.004, per_object_s=0.0106, jitter=0.1, tail_s=0.005,
                 slow=(100, 150, 2.0))
    over = np.flatnonzero(d > 0.2)
    assert all(100 <= i < 103 for i in over), over
    assert d[150 + 5:].max() <= 0.2


def test_fits_reserves_the_tail_and_plans_high() -> None:
    cost = BatchCost(0.01, tail_s=0.02)  # planning figures: 0.03 per object, 0.06 tail
    assert cost.per_object.high == 0.01 + 4 * 0.005 and cost.tail.high == 0.02 + 4 * 0.01
    assert cost.fits(0.06, 8) == 0  # the tail alone takes what is left
    assert cost.fits(0.16, 8) == 3  # floor(0.1 / 0.03)
    assert cost.fits(1.0, 8) == 8 and cost.fits(1.0, 0) == 0
    cost.batch_ran(4, 0.08)  # 20 ms per object: slower than believed
    assert cost.per_object.mean > 0.01 and cost.per_object.dev > 0.005
    cost.batch_ran(0, 1.0)  # an empty batch teaches nothing
    assert cost.per_object.mean == 0.01 + 0.125 * 0.01


def test_smoothed_follows_a_steady_value() -> None:
    s = Smoothed(1.0, 0.5)
    for _ in range(100):
        s.update(3.0)
    assert abs(s.mean - 3.0) < 1e-4 and s.dev < 1e-4


def test_batches_run_in_order_and_stop_when_nothing_fits() -> None:
    clock = FakeClock()
    seen: list[tuple[int, int]] = []

    def batch(begin: int, end: int) -> tuple[int, int]:
        seen.append((begin, end))
        clock.now += 0.01 * (end - begin)
        return begin, end

    cost = BatchCost(0.01)
    cost.per_object.dev = 0.0  # exact costs: the plan is the truth
    out = classify_within_budget(10, 4, batch, cost, 0.065, 0.0, clock)
    assert out == seen == [(0, 4), (4, 6)]  # 6 objects of 10 ms fit 65 ms; 7 would not
    assert clock.now <= 0.065
