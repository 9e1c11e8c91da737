"""The training loop: CLIP2Scene distillation and label-efficient fine-tuning, resumable, DDP.

``train(config)`` runs a :class:`~clip2scene_ros.training.config.TrainConfig` and returns a
:class:`TrainReport`; the trained network leaves as a model bundle in ``run_dir/bundle`` (the one
format the node loads; :mod:`~clip2scene_ros.training.export`).

**A step.** A micro-batch of ``batch_size`` samples goes through the
:class:`~clip2scene_ros.training.student.Student` (SPVCNN and the heads the loss reads). S3
replaces the targets per its schedule; ``build_loss`` gives the loss, whose gradient (divided by
``grad_accumulation``) accumulates over ``grad_accumulation`` micro-batches before one SGD step.
The learning rate follows the schedule once per epoch or once per optimizer step
(:mod:`~clip2scene_ros.training.student`). After each epoch the validation set, when there is
one, is scored every ``validation.every_epochs`` epochs and after the last one
(:mod:`~clip2scene_ros.training.validate`).

**Data order** (:mod:`~clip2scene_ros.training.order`): epoch ``e``'s sample order is drawn
from ``(seed, e)`` only and cut into micro-batches, A·W of them per optimizer step (A =
grad_accumulation, W = world size), each rank taking its slots; samples depend only on (seed,
epoch, index), so neither the worker count nor the rank that reads them changes a batch.

**Distributed** under ``torchrun``: a DDP run equals a single-process run with accumulation A·W,
parameters and buffers alike (:mod:`~clip2scene_ros.training.distributed`). **Checkpoints**
(``run_dir/checkpoints/``) hold the whole training state; a run interrupted after any step and
resumed ends bit-identical (CPU) to an uninterrupted one
(:mod:`~clip2scene_ros.training.checkpoint`).

The loop is the one class that owns the run's state (model, optimizer, scheduler, S3, RNG,
counters); everything it delegates (checkpoint, export, validation, student, order,
distributed) lives in its own module, which leaves ~500 lines here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.precision import cpu_has_fast_bf16
from clip2scene_ros.training.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    PREVIOUS,
    checkpoint_bytes,
    find_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from clip2scene_ros.training.config import TrainConfig
from clip2scene_ros.training.dataset import BagSceneDataset
from clip2scene_ros.training.dataset_config import DatasetConfig
from clip2scene_ros.training.distributed import (
    SequentialBatchNormStats,
    batch_to_device,
    init_distributed,
    mean_over_ranks,
)
from clip2scene_ros.training.export import export_run
from clip2scene_ros.training.losses import SwitchableSelfTraining, build_loss
from clip2scene_ros.training.order import (
    derived_seed,
    epoch_order,
    rank_micro_batches,
    steps_per_epoch,
)
from clip2scene_ros.training.sample import collate
from clip2scene_ros.training.student import (
    Student,
    build_network,
    build_optimizer,
    build_scheduler,
    check_classes,
    loss_inputs,
    required_outputs,
    run_text_bank,
)
from clip2scene_ros.training.validate import validate

log = logging.getLogger(__name__)

__all__ = ["StepInfo", "TrainReport", "train"]

_tensorboard_warned = False


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepInfo:
    """What a ``callback`` sees after every optimizer step (on every rank)."""

    epoch: int
    step_in_epoch: int  # optimizer steps done in this epoch
    steps_per_epoch: int
    global_step: int  # optimizer steps done in the run
    losses: dict[str, float]
    lr: float
    rank: int


@dataclass
class TrainReport:
    """The outcome of :func:`train` (``model`` is the trained network, unwrapped)."""

    run_dir: Path
    bundle: Path | None
    epochs: int
    global_step: int
    steps_per_epoch: int
    world_size: int
    resumed_from: dict[str, int] | None
    losses: dict[str, float]
    validation: dict[str, Any] | None
    best: dict[str, Any] | None
    onnx: dict[str, Any] | None
    model: SPVCNN = field(repr=False)
    #: what ``skip_bad`` left out, ``{bag path or "PATH frame N": reason}`` (bags of the training
    #: and validation sets, and the keyframes this rank's batches replaced, resumes included)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items()) or "no steps"
        lines = [f"trained {self.epochs} epochs, {self.global_step} steps "
                 f"({self.steps_per_epoch}/epoch, world {self.world_size}): {losses}"]
        if self.resumed_from:
            lines.append(f"resumed from epoch {self.resumed_from['epoch']} step "
                         f"{self.resumed_from['step_in_epoch']}")
        if self.validation:
            lines.append("validation " + ", ".join(
                f"{k} {v:.4f}" for k, v in self.validation.items() if isinstance(v, float)))
        if self.best:
            lines.append(f"best {self.best['metric']} {self.best['value']:.4f} "
                         f"(epoch {self.best['epoch']})")
        if self.skipped:
            bags = sum(" frame " not in k for k in self.skipped)
            lines.append(f"skipped {bags} unreadable bag(s) and "
                         f"{len(self.skipped) - bags} unreadable keyframe(s):")
            lines += [f"  {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        if self.bundle:
            lines.append(f"bundle -> {self.bundle}")
        return "\n".join(lines)

# ----------------------------------------------------------------------------------- the trainer


class _Trainer:
    def __init__(self, config: TrainConfig, resume: bool | None,
                 callback: Callable[[StepInfo], None] | None) -> None:
        self.config = config
        self.callback = callback
        self.resume_request = resume
        self.dist, self.device = init_distributed(config.device, config.distributed_timeout_s)
        self.run_dir = Path(config.run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.writer: Any = None
        self.started = dt.datetime.now(dt.timezone.utc)

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.config
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)  # noqa: NPY002 (the global one, checkpointed)
        torch.manual_seed(cfg.seed)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self.bank, self.vocab, self.bank_provenance = run_text_bank(cfg, self.dist)
        self.bank_device = self.bank.to(self.device)
        bundle_input = None
        if cfg.model.init_from is not None and cfg.model.input is None:
            from clip2scene_ros.models.bundle import load_spec

            bundle_input = load_spec(cfg.model.init_from).input
        self.dataset_config: DatasetConfig = cfg.dataset_config(bundle_input)
        self.dataset = BagSceneDataset(self.dataset_config)
        check_classes(cfg, self.dataset, self.vocab)
        val_cfg = cfg.validation_dataset_config(self.dataset_config)
        self.val_dataset = BagSceneDataset(val_cfg) if val_cfg is not None else None
        if self.val_dataset is not None:
            check_classes(cfg, self.val_dataset, self.vocab)
        self.input_spec = self.dataset.input_spec
        self.skipped: dict[str, str] = dict(self.dataset.bad)
        if self.val_dataset is not None:
            self.skipped.update(self.val_dataset.bad)

        self.per_step = cfg.grad_accumulation * self.dist.world
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.batch_size, self.per_step)
        if self.steps_per_epoch < 1:
            raise ConfigError("batch_size", f"{len(self.dataset)} training samples do not fill "
                              f"one optimizer step of batch_size {cfg.batch_size} × "
                              f"grad_accumulation {cfg.grad_accumulation} × world "
                              f"{self.dist.world}")

        self.loss = build_loss(cfg.loss)
        self.net, self.arch = build_network(cfg, self.input_spec, len(self.vocab.classes))
        if self.bank.shape[1] != self.arch.clip_dim:
            raise ConfigError("model.architecture.clip_dim", f"is {self.arch.clip_dim}, the text "
                              f"bank's rows have {self.bank.shape[1]} dims (its CLIP model's)")
        self.net.to(self.device)
        outputs = required_outputs(cfg, self.loss)
        self.val_outputs = frozenset({"class_logits" if cfg.model.head == "classifier"
                                      else "global_feats"})
        self.student = Student(self.net, outputs)
        self.optimizer = build_optimizer(cfg, self.net)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.s3 = (SwitchableSelfTraining(cfg.s3.start_epoch, cfg.s3.probability, cfg.s3.per,
                                          seed=cfg.seed, rest_threshold=cfg.s3.rest_threshold,
                                          min_confidence=cfg.s3.min_confidence)
                   if cfg.s3.enabled else None)
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16
                       else None)

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] | None = None
        self.last_val: dict[str, Any] | None = None
        self.losses: dict[str, float] = {}
        self.resumed_from: dict[str, int] | None = None
        self.resume_order: np.ndarray | None = None
        self._maybe_resume()

        self.model: nn.Module = self.student
        if self.dist.active:
            unused = {"global_feats": "point_mapping_global", "local_feats":
                      "point_mapping_local", "class_logits": "classifier"}
            present = {k for k in unused if k != "class_logits" or self.net.classifier is not None}
            self.bn_sync = SequentialBatchNormStats(self.net, self.dist.world)
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=bool(present - outputs),
                broadcast_buffers=False)  # buffers are merged by SequentialBatchNormStats
        if self.dist.main:
            self.writer = _summary_writer(self.run_dir / "tensorboard") if cfg.tensorboard \
                else None
        log.info("train: %d samples, %d steps/epoch × %d epochs, world %d, device %s",
                 len(self.dataset), self.steps_per_epoch, cfg.epochs, self.dist.world,
                 self.device)

    def _maybe_resume(self) -> None:
        found = find_checkpoint(self.ckpt_dir) if self.resume_request is not False else None
        if found is None:
            if self.resume_request is True:
                raise ConfigError("resume", f"no checkpoint in {self.ckpt_dir} to resume from")
            if self.dist.main and self.ckpt_dir.is_dir():
                stale = [p for p in (self.ckpt_dir / n for n in (LAST, PREVIOUS, BEST))
                         if p.exists()]
                if stale:
                    log.warning("train: starting over in %s; removing %s", self.run_dir,
                                ", ".join(p.name for p in stale))
                    for p in stale:
                        p.unlink()
            self.dist.barrier()
            return
        path, tensors, state = found
        self._restore(tensors, state)
        log.info("train: resumed from %s (epoch %d, step %d)", path, self.epoch,
                 self.step_in_epoch)

    def _restore(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        restore_checkpoint(tensors, state, config=self.config, per_step=self.per_step,
                           rank=self.dist.rank, net=self.net, optimizer=self.optimizer,
                           scheduler=self.scheduler, s3=self.s3, scaler=self.scaler)
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best = state.get("best")
        self.skipped = {**(state.get("skipped") or {}), **self.skipped}
        self.last_val = state.get("validation")
        self.losses = state.get("losses", {})
        self.resumed_from = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                             "global_step": self.global_step}
        if "data.order" in tensors:
            self.resume_order = tensors["data.order"].numpy().astype(np.int64)

    def save_checkpoint(self, best: bool = False) -> None:
        """Write the training state (a collective under DDP; rank 0 writes the files)."""
        self.dist.barrier()  # every rank has finished the step being saved
        data = checkpoint_bytes(
            self.dist, self.config, net=self.net, optimizer=self.optimizer,
            scheduler=self.scheduler, s3=self.s3, scaler=self.scaler,
            order=self._order(self.epoch) if self.epoch < self.config.epochs else None,
            epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
            steps_per_epoch=self.steps_per_epoch, per_step=self.per_step, best=self.best,
            validation=self.last_val, losses=self.losses, skipped=self.skipped)
        if data is not None:
            write_checkpoint(self.ckpt_dir, data, global_step=self.global_step, best=best)
        self.dist.barrier()  # nobody reads or moves on before the file is complete

    # ---------------------------------------------------------------- the loop

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.dataset), self.config.seed, epoch, self.config.shuffle)

    def _loader(self, epoch: int, order: np.ndarray, start_step: int
                ) -> Iterator[dict[str, Any]]:
        cfg = self.config
        mine = rank_micro_batches(order, cfg.batch_size, start_step=start_step,
                                  steps=self.steps_per_epoch,
                                  accumulation=cfg.grad_accumulation, world=self.dist.world,
                                  rank=self.dist.rank)
        self.dataset.set_epoch(epoch)  # before the iterator (and its workers) exist
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=mine, collate_fn=collate, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # a private generator: DataLoader seeds its workers from it instead of consuming
            # the global torch RNG, which is checkpointed
            generator=torch.Generator().manual_seed(derived_seed(cfg.seed, epoch)))
        return iter(loader)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        cfg = self.config
        accum = cfg.grad_accumulation
        sums: dict[str, float] = {}
        self.model.train()
        for a in range(accum):
            batch = batch_to_device(next(batches), self.device)
            self.skipped.update(batch.get("replaced", ()))
            micro_index = (self.global_step * accum + a) * self.dist.world + self.dist.rank
            sync = contextlib.nullcontext()
            if self.dist.active and a < accum - 1:
                sync = self.model.no_sync()  # type: ignore[operator]
            with sync:
                if self.dist.active:
                    self.bn_sync.start_micro()
                with self._autocast():
                    out = self.model(batch["feats"], batch["coords"], batch["batch"])
                # losses in float32: 100-scaled cosine logits lose whole units in float16
                out = {k: v.float() for k, v in out.items()}
                total, parts = self.loss(loss_inputs(
                    cfg, self.loss, batch, out, bank=self.bank_device, s3=self.s3,
                    epoch=self.epoch, micro_index=micro_index))
                if not torch.isfinite(total) and self.scaler is None:
                    raise FloatingPointError(
                        f"non-finite loss at epoch {self.epoch} step {self.step_in_epoch}: "
                        + ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items()))
                scaled = total / accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
                if self.dist.active:
                    # after backward: BatchNorm's backward reads the buffers it was given
                    self.bn_sync.end_micro()
            for name, value in {"total": total.detach(), **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value) / accum
        if self.dist.active:
            self.bn_sync.merge()
        clip = cfg.optimizer.clip_grad_norm
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip is not None:
                nn.utils.clip_grad_norm_(self.net.parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.scheduler.interval == "step":
            self.scheduler.step()
        # logged values are means over the ranks
        return mean_over_ranks(sums, self.dist, self.device)

    def run(self) -> TrainReport:
        cfg = self.config
        from tqdm import tqdm

        while self.epoch < cfg.epochs:
            order = self._order(self.epoch)
            if self.resume_order is not None and not np.array_equal(order, self.resume_order):
                if self.step_in_epoch:  # the steps done would not be those of this order
                    raise ConfigError("dataset", "the training set or seed changed since the "
                                      "checkpoint was written inside this epoch: the sample "
                                      "order differs; resume from an epoch boundary or start "
                                      "over")
                log.warning("train: the sample order of epoch %d differs from the checkpoint's "
                            "(dataset or seed changed); using the new one", self.epoch)
            self.resume_order = None
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step",
                       disable=not (self.dist.main and cfg.progress), leave=False)
            try:
                batches = self._loader(self.epoch, order, self.step_in_epoch)
                while self.step_in_epoch < self.steps_per_epoch:
                    self.losses = self._train_step(batches)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    lr = float(self.optimizer.param_groups[0]["lr"])
                    bar.update(1)
                    if self.global_step % cfg.log_every == 0 or \
                            self.step_in_epoch == self.steps_per_epoch:
                        bar.set_postfix(loss=f"{self.losses['total']:.4f}", lr=f"{lr:.3g}")
                        self._scalars({f"loss/{k}": v for k, v in self.losses.items()}
                                      | {"lr": lr})
                    if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                            and self.step_in_epoch < self.steps_per_epoch):
                        self.save_checkpoint()
                    if self.callback is not None:
                        self.callback(StepInfo(self.epoch, self.step_in_epoch,
                                               self.steps_per_epoch, self.global_step,
                                               dict(self.losses), lr, self.dist.rank))
            finally:
                bar.close()
            self._end_epoch()
        return self._finish()

    def _end_epoch(self) -> None:
        cfg = self.config
        if cfg.scheduler.interval == "epoch":
            self.scheduler.step()
        improved = False
        val = cfg.validation
        if val is not None and self.val_dataset is not None and (
                (self.epoch + 1) % val.every_epochs == 0 or self.epoch + 1 == cfg.epochs):
            self.last_val = validate(
                self.student, self.val_dataset, val, dist_state=self.dist, device=self.device,
                classes=self.vocab.classes, outputs=self.val_outputs, bank=self.bank_device,
                num_workers=cfg.num_workers, autocast=self._autocast, skipped=self.skipped)
            value = self.last_val.get(val.metric)
            self._scalars({f"val/{k}": v for k, v in self.last_val.items()
                           if isinstance(v, float)})
            if value is None or not math.isfinite(value):
                log.warning("train: validation %s undefined at epoch %d (no labelled points?)",
                            val.metric, self.epoch + 1)
            elif self.best is None or value > self.best["value"]:
                self.best = {"metric": val.metric, "value": value, "epoch": self.epoch + 1}
                improved = True
            if self.dist.main:
                log.info("train: epoch %d validation %s", self.epoch + 1, self.last_val)
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_checkpoint(best=improved)

    def _scalars(self, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, self.global_step)

    # ---------------------------------------------------------------- the end

    def _finish(self) -> TrainReport:
        bundle_path = None
        onnx = None
        if self.dist.main:
            bundle_path, onnx = export_run(
                self.run_dir, self.config, self.net, arch=self.arch, input_spec=self.input_spec,
                vocab=self.vocab, bank=self.bank, bank_provenance=self.bank_provenance,
                started=self.started, record={
                    "epochs": self.epoch, "global_step": self.global_step,
                    "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world,
                    "samples": len(self.dataset), "skipped": dict(self.skipped),
                    "final_losses": {k: float(v) for k, v in self.losses.items()},
                    "validation": self.last_val, "best": self.best})
        self.dist.barrier()
        return TrainReport(run_dir=self.run_dir, bundle=bundle_path, epochs=self.epoch,
                           global_step=self.global_step, steps_per_epoch=self.steps_per_epoch,
                           world_size=self.dist.world, resumed_from=self.resumed_from,
                           losses=dict(self.losses), validation=self.last_val, best=self.best,
                           onnx=onnx, model=self.net, skipped=dict(self.skipped))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The run's autocast dtype (None: float32), see ``TrainConfig.amp``. On a CPU without
    bf16 matrix units ``auto`` stays float32, said once; ``bfloat16`` runs there with a
    warning (it is emulated, slower than float32); float16 autocast is CUDA's."""
    if not config.amp:
        return None
    asked = config.amp_dtype
    if device.type == "cuda":
        return torch.float16 if asked == "auto" else getattr(torch, asked)
    if asked == "float16":
        raise ConfigError("amp_dtype", f"float16 autocast runs on CUDA; on {device.type} amp "
                          "runs bfloat16 (amp_dtype: auto or bfloat16)")
    fast = cpu_has_fast_bf16()
    if asked == "auto" and not fast:
        log.info("train: amp is on but this %s has no bf16 matrix units (AMX, AVX512-BF16), "
                 "where bf16 is emulated and slower: training runs fp32 (amp_dtype: bfloat16 "
                 "runs it anyway)", device.type)
        return None
    if not fast:
        log.warning("train: bfloat16 autocast on a %s without bf16 matrix units (AMX, "
                    "AVX512-BF16): emulated, slower than fp32", device.type)
    return torch.bfloat16


def _summary_writer(path: Path) -> Any:
    """A TensorBoard writer, or None (with one warning per process) when it is not installed:
    the node's install stays lean, tensorboard comes with the ``train`` extra."""
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _tensorboard_warned:
            _tensorboard_warned = True
            warnings.warn("tensorboard is not installed: no TensorBoard logs (pip install "
                          "'clip2scene_ros[train]')", UserWarning, stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(path))


def train(config: TrainConfig, *, resume: bool | None = None,
          callback: Callable[[StepInfo], None] | None = None) -> TrainReport:
    """Run ``config``; see the module doc.

    Args:
        config: the run (``load_train_config``).
        resume: None (default) continues from ``run_dir/checkpoints`` when a checkpoint is
            there; True requires one; False starts over (removing old checkpoints).
        callback: called on every rank after every optimizer step (and after that step's
            checkpoint); an exception it raises stops training there.
    """
    trainer = _Trainer(config, resume, callback)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
