"""The data order of a training run: which samples each rank reads at each optimizer step.

Epoch ``e``'s sample order is a permutation drawn from ``(seed, e)`` only (:func:`epoch_order`);
it is cut into micro-batches of ``batch_size`` (an incomplete last one is dropped) and optimizer
step ``s`` consumes micro-batches ``s·A·W … s·A·W + A·W - 1`` (A = grad_accumulation, W = world
size): rank ``r`` takes slot ``a`` = micro-batch ``s·A·W + a·W + r`` (:func:`rank_micro_batches`).
Leftover micro-batches that do not fill a step are dropped. Samples depend only on (seed, epoch,
index), so neither the worker count nor the rank that reads them changes a batch; micro-batch
``k = (step·A + a)·W + r`` is the same ``k`` for any split of A·W into ranks and accumulation,
which is what per-micro-batch draws (S3's coin, PPKT's pairs) are seeded from.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derived_seed", "epoch_order", "micro_batches", "rank_micro_batches",
           "steps_per_epoch"]

#: Domain tag of the epoch-order seed, so it never coincides with a dataset sample's seed.
_ORDER_TAG = 0x6F72646572


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of ``epoch``: a function of ``(seed, epoch)`` only (int64)."""
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ORDER_TAG, epoch]))
    return rng.permutation(size).astype(np.int64)


def micro_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """``order`` cut into micro-batches of ``batch_size`` (an incomplete last one dropped)."""
    count = len(order) // batch_size
    return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(count)]


def rank_micro_batches(order: np.ndarray, batch_size: int, *, start_step: int, steps: int,
                       accumulation: int, world: int, rank: int) -> list[list[int]]:
    """The micro-batches ``rank`` reads for optimizer steps ``start_step … steps - 1``, in
    order (``accumulation`` per step)."""
    micro = micro_batches(order, batch_size)
    return [micro[(s * accumulation + a) * world + rank]
            for s in range(start_step, steps) for a in range(accumulation)]


def steps_per_epoch(size: int, batch_size: int, per_step: int) -> int:
    """Optimizer steps in an epoch of ``size`` samples, ``per_step`` micro-batches a step."""
    return (size // batch_size) // per_step


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed drawn from ``entropy`` (``SeedSequence``)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
