"""Distributed training: the process group under ``torchrun`` and BatchNorm statistics under DDP.

Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed` initialises the process group
(gloo on CPU, nccl on GPU; ``LOCAL_RANK`` picks the GPU) and the trainer wraps the model in DDP
(``find_unused_parameters`` when a head is not read by the loss); only rank 0 writes checkpoints,
logs and the bundle, with barriers around checkpoint writes. DDP averages gradients, so W ranks
with accumulation A compute exactly the step of one process with accumulation A·W over the same
micro-batches. BatchNorm normalises each micro-batch with its own statistics in both; its
*running* statistics would differ (each rank sees only its shards, and torch's ``SyncBatchNorm``
rejects CPU tensors and plain tensors are not our ``SparseTensor`` anyway), so
:class:`SequentialBatchNormStats` gathers every rank's per-micro-batch update and applies them in
the single-process order. Hence *a DDP run equals a single-process run with accumulation A·W*,
parameters and buffers alike (to float rounding), and a checkpoint can be resumed at an epoch
boundary with another world size. A rank that hangs (rather than dies, which ``torchrun`` sees at
once) leaves the others waiting in a collective for ``distributed_timeout_s`` (torch's 30 minutes
by default; lower it to fail such a run sooner).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clip2scene_ros.errors import ConfigError

__all__ = ["Dist", "SequentialBatchNormStats", "batch_to_device", "init_distributed",
           "mean_over_ranks", "resolve_device"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, and whether it made the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def resolve_device(request: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU when CUDA is there, else the CPU; ``cuda`` without an index:
    the GPU of ``local_rank`` (one per process); a CUDA request without CUDA raises ConfigError."""
    if request == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(request)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{request!r} requested but no CUDA device is available")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(request: str, timeout_s: float) -> tuple[Dist, torch.device]:
    """This process's :class:`Dist` and device; joins (and then owns) the process group when
    ``WORLD_SIZE > 1`` and none is initialised yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(), device
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=dt.timedelta(seconds=timeout_s))
        owns = True
    state = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                 owns_group=owns)
    return state, device


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on this rank's ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def mean_over_ranks(values: Mapping[str, float], dist_state: Dist, device: torch.device
                    ) -> dict[str, float]:
    """``values`` averaged over the ranks (a collective under DDP; as they are otherwise)."""
    if not dist_state.active:
        return dict(values)
    names = sorted(values)
    stacked = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return {n: float(v) / dist_state.world for n, v in zip(names, stacked, strict=True)}


class SequentialBatchNormStats:
    """BatchNorm running statistics under DDP as one process would have them.

    With accumulation A and W ranks, the single-process reference runs micro-batches ``k = a·W +
    r`` one after another, each updating ``running = (1 - μ) running + μ stat_k``. Each rank
    records its update ``d = μ stat`` per micro-batch (and restores the buffers, which a
    training-mode forward never reads), and at the optimizer step the ``A × W`` updates are
    gathered and applied in that order: ``running = (1 - μ)^{AW} running + Σ_k (1 - μ)^{AW-1-k}
    d_k`` (in float64). ``num_batches_tracked`` advances by A·W.
    """

    def __init__(self, model: nn.Module, world: int) -> None:
        self.world = world
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for m in self.norms:
            if m.momentum is None:
                raise ConfigError("model", "BatchNorm with momentum=None (cumulative average) "
                                  "is not supported under DDP")
        self.momentum = torch.cat([torch.full((2 * m.num_features,), float(m.momentum or 0.0),
                                              dtype=torch.float64) for m in self.norms])
        self.before: torch.Tensor | None = None
        self.deltas: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        # track_running_stats (checked in __init__): both buffers exist
        return torch.cat([t.reshape(-1) for m in self.norms
                          for t in (m.running_mean, m.running_var) if t is not None])

    def _write(self, flat: torch.Tensor) -> None:
        offset = 0
        for m in self.norms:
            for t in (m.running_mean, m.running_var):
                assert t is not None
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    @torch.no_grad()
    def start_micro(self) -> None:
        if self.before is None:
            self.before = self._flat().clone()

    @torch.no_grad()
    def end_micro(self) -> None:
        assert self.before is not None
        mu = self.momentum.to(self.before.device)
        after = self._flat().double()
        self.deltas.append(after - (1 - mu) * self.before.double())
        self._write(self.before)

    @torch.no_grad()
    def merge(self) -> None:
        assert self.before is not None
        local = torch.stack(self.deltas)  # [A, L] float64
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        updates = torch.stack(gathered, dim=1).reshape(-1, local.shape[1])  # k = a·W + r
        total = updates.shape[0]
        decay = 1 - self.momentum.to(local.device)
        merged = decay.pow(total) * self.before.double()
        for k in range(total):
            merged = merged + decay.pow(total - 1 - k) * updates[k]
        self._write(merged.to(self.before.dtype))
        for m in self.norms:
            assert m.num_batches_tracked is not None
            m.num_batches_tracked.add_(len(self.deltas) * (self.world - 1))
        self.before = None
        self.deltas = []

