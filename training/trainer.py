"""The training loop: CLIP2Scene distillation and label-efficient fine-tuning, resumable, DDP.

``train(config)`` runs a :class:`~.config.TrainConfig` and returns a :class:`TrainReport`; the
trained network leaves as a model bundle in ``run_dir/bundle`` (the one format the node loads).

**A step.** A micro-batch of ``batch_size`` samples goes through SPVCNN; its point features are
mapped by ``point_mapping_global`` (SCR, inference, S3) and, when a loss reads them,
``point_mapping_local`` (SSR); ``logits`` are scaled cosines against the text bank
(``text_logits``, the runtime head) or, with ``model.head: classifier``, the linear
``classifier``. S3 replaces the targets per its schedule; ``build_loss`` gives the loss, whose
gradient (divided by ``grad_accumulation``) accumulates over ``grad_accumulation`` micro-batches
before one SGD step. The learning rate follows the cosine schedule once per epoch (``interval:
epoch``, the code's ``CosineAnnealingLR(T_max=epochs)``) or once per optimizer step.

**Data order.** Epoch ``e``'s sample order is a permutation drawn from ``(seed, e)`` only; it is
cut into micro-batches of ``batch_size`` (an incomplete last one is dropped) and optimizer step
``s`` consumes micro-batches ``s·A·W … s·A·W + A·W - 1`` (A = grad_accumulation, W = world
size): rank ``r`` takes slot ``a`` = micro-batch ``s·A·W + a·W + r``. Leftover micro-batches
that do not fill a step are dropped. Samples depend only on (seed, epoch, index), so neither the
worker count nor the rank that reads them changes a batch.

**Distributed.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (gloo
on CPU, nccl on GPU), the model is wrapped in DDP (``find_unused_parameters`` when a head is not
read by the loss), and only rank 0 writes checkpoints, logs and the bundle, with barriers around
checkpoint writes. DDP averages gradients, so W ranks with accumulation A compute exactly the
step of one process with accumulation A·W over the same micro-batches. BatchNorm normalises each
micro-batch with its own statistics in both; its *running* statistics would differ (each rank
sees only its shards, and torch's ``SyncBatchNorm`` rejects CPU tensors and plain tensors are
not our ``SparseTensor`` anyway), so :class:`_SequentialBatchNormStats` gathers every rank's
per-micro-batch update and applies them in the single-process order. Hence *a DDP run equals a
single-process run with accumulation A·W*, parameters and buffers alike (to float rounding),
and a checkpoint can be resumed at an epoch boundary with another world size. A rank that hangs
(rather than dies, which ``torchrun`` sees at once) leaves the others waiting in a collective
for ``distributed_timeout_s`` (torch's 30 minutes by default; lower it to fail such a run sooner).

**Checkpoints** (``run_dir/checkpoints/``): ``last.safetensors`` every ``checkpoint_every``
optimizer steps and at each epoch end (the former one kept as ``previous.safetensors``), and
``best.safetensors`` when the validation metric improves. One safetensors file holds every
tensor (model, optimizer state, RNG states as uint8/int64, the epoch's sample order) and, in its
metadata, a JSON document with the scalar rest (optimizer hyper-parameters, scheduler, S3,
GradScaler, python ``random`` state, epoch, step within the epoch, config). Nothing is pickled;
each file is written atomically (temporary sibling + rename), so a crash leaves the last good
file. The metadata also carries a SHA-256 of the tensors (:func:`tensor_digest`), checked on
load, so a file damaged after writing (intact size and header, altered bytes) is refused like a
truncated one. Resuming restores all of it, and a run interrupted after any step ends
bit-identical (CPU) to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import subprocess
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip2scene_ros.config import to_dict
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.files import atomic_write_bytes
from clip2scene_ros.metrics import ConfusionMatrix
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    load_bundle,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.runtime.labels import text_logits
from clip2scene_ros.sparse.tensor import PointTensor, thread_workspace
from clip2scene_ros.training.config import TrainConfig
from clip2scene_ros.training.dataset import BagSceneDataset, DatasetConfig, collate
from clip2scene_ros.training.losses import CompositeLoss, SwitchableSelfTraining, build_loss

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "StepInfo",
    "TrainReport",
    "epoch_order",
    "find_checkpoint",
    "fold_classifier",
    "load_checkpoint",
    "tensor_digest",
    "train",
]

CHECKPOINT_FORMAT = "clip2scene_train_checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.safetensors"
PREVIOUS = "previous.safetensors"
BEST = "best.safetensors"
META_KEY = "clip2scene"
#: Domain tag of the epoch-order seed, so it never coincides with a dataset sample's seed.
_ORDER_TAG = 0x6F72646572
_PPKT_TAG = 0x70706B74
#: Config keys that do not change the training trajectory (no warning when they differ on resume).
_NEUTRAL_KEYS = ("run_dir", "num_workers", "device", "progress", "tensorboard", "log_every",
                 "export_onnx", "checkpoint_every", "epochs", "validation", "skip_bad",
                 "distributed_timeout_s")

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


# ---------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
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


def _resolve_device(request: str, local_rank: int) -> torch.device:
    if request == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(request)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{request!r} requested but no CUDA device is available")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", local_rank)
    return device


def _init_distributed(request: str, timeout_s: float) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return _Dist(), device
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=dt.timedelta(seconds=timeout_s))
        owns = True
    state = _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                  owns_group=owns)
    return state, device


# ------------------------------------------------------------------------------------ data order


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of ``epoch``: a function of ``(seed, epoch)`` only (int64)."""
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ORDER_TAG, epoch]))
    return rng.permutation(size).astype(np.int64)


def _micro_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    count = len(order) // batch_size
    return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(count)]


def _steps_per_epoch(size: int, batch_size: int, per_step: int) -> int:
    return (size // batch_size) // per_step


def _derived_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


# ------------------------------------------------------------------------------------ the model


class _Student(nn.Module):
    """SPVCNN plus the heads the loss reads, as one module for DDP.

    Only the requested outputs are computed, so a head the loss does not read has no gradient
    (DDP then needs ``find_unused_parameters``).
    """

    def __init__(self, net: SPVCNN, outputs: frozenset[str], device_type: str) -> None:
        super().__init__()
        self.net = net
        self.outputs = outputs
        self.device_type = device_type

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, batch: torch.Tensor,
                outputs: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        outputs = self.outputs if outputs is None else outputs
        # The sparse engine has float32 kernels only (its convolutions check dtypes and
        # scatter into float32 buffers), so under AMP the backbone is a float32 island and
        # only the dense heads run in reduced precision.
        with torch.autocast(self.device_type, enabled=False):
            features = self.net(PointTensor(feats.float(), coords, batch))
        out: dict[str, torch.Tensor] = {}
        if "global_feats" in outputs:
            out["global_feats"] = self.net.point_mapping_global(features)
        if "local_feats" in outputs:
            out["local_feats"] = self.net.point_mapping_local(features)
        if "class_logits" in outputs:
            assert self.net.classifier is not None
            out["class_logits"] = self.net.classifier(features)
        return out


def _required_outputs(config: TrainConfig, loss: CompositeLoss) -> frozenset[str]:
    keys = {key for term in loss.terms for key in term.inputs.values()}
    outputs = set()
    if keys & {"global_feats", "pair_point_feats"}:
        outputs.add("global_feats")
    if "local_feats" in keys:
        outputs.add("local_feats")
    if config.model.head == "classifier":
        outputs.add("class_logits")
    elif keys & {"logits", "paired_logits"} or config.s3.enabled:
        outputs.add("global_feats")
    return frozenset(outputs)


class _SequentialBatchNormStats:
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
        self.momentum = torch.cat([torch.full((2 * m.num_features,), float(m.momentum),
                                              dtype=torch.float64) for m in self.norms])
        self.before: torch.Tensor | None = None
        self.deltas: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for m in self.norms
                          for t in (m.running_mean, m.running_var)])  # type: ignore[misc]

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


# ------------------------------------------------------------------------------------ text bank


def _text_bank(config: TrainConfig, dist_state: _Dist
               ) -> tuple[torch.Tensor, VocabularySpec, dict[str, Any]]:
    from clip2scene_ros.teacher.text_bank import bank_paths, build_text_bank, load_text_bank

    cfg = config.text_bank
    if cfg.file is not None:
        return load_text_bank(cfg.file)
    assert cfg.vocabulary is not None
    target = config.run_dir / "text_bank"
    if dist_state.main and not bank_paths(target)[1].is_file():
        # Built once into the run directory, so a resumed run reads the very same rows.
        build_text_bank(cfg.vocabulary, model=cfg.model, pretrained=cfg.pretrained, out=target,
                        prompts=cfg.prompts, device=cfg.device)
    dist_state.barrier()
    bank, spec, provenance = load_text_bank(target)
    wanted = {"model": cfg.model, "pretrained": cfg.pretrained or "random"}
    found = {k: provenance.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError("text_bank", f"{target} was built with {found}, the config asks for "
                          f"{wanted}; delete it or use another run_dir")
    return bank, spec, provenance


def _check_classes(config: TrainConfig, dataset: BagSceneDataset, vocab: VocabularySpec) -> None:
    """Labels index the text bank's rows: the class lists must agree, in order."""
    from clip2scene_ros.teacher.cache import TeacherCache

    classes = list(vocab.classes)
    if dataset.vocabulary is not None and dataset.vocabulary.names != classes:
        raise ConfigError("dataset.vocabulary", f"classes {dataset.vocabulary.names} differ from "
                          f"the text bank's {classes}")
    needs = _needs_pixel_features(config.loss)
    if config.dataset.label_source == "teacher":
        for path in config.dataset.teacher_caches:
            cache = TeacherCache(path)
            names = list(cache.class_names)
            if names != classes:
                raise ConfigError("dataset.teacher_caches", f"{path} labels classes {names}, "
                                  f"the text bank has {classes}")
            if needs and not cache.teacher.get("store_features"):
                raise ConfigError("dataset.teacher_caches", f"{path} stores no pixel features, "
                                  f"but {needs} needs them: rebuild it with `clip2scene teacher "
                                  "--features` into a new --out")


def _needs_pixel_features(loss: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The loss term that reads the teacher's pixel features, if any (checked at start-up, as a
    paper-form SSR would otherwise quietly run point-only)."""
    ssr = loss.get("ssr")
    if ssr is not None and ssr.get("weight", 1.0) != 0 and ssr.get("form", "paper") == "paper":
        return "loss.ssr (form paper, Eq. 3's pixel term)"
    for name in ("kl", "ppkt"):
        if name in loss and loss[name].get("weight", 1.0) != 0:
            return f"loss.{name}"
    return None


# -------------------------------------------------------------------------------- the network


def _build_network(config: TrainConfig, input_spec: InputSpec, num_classes: int
                   ) -> tuple[SPVCNN, ArchitectureSpec]:
    init = load_bundle(config.model.init_from) if config.model.init_from is not None else None
    arch = config.model.architecture
    if init is not None:
        if arch is not None and arch != init.spec.architecture:
            raise ConfigError("model.architecture", f"differs from the init_from bundle's "
                              f"{to_dict(init.spec.architecture)}; leave it out")
        arch = init.spec.architecture
        if len(init.spec.input.features) != len(input_spec.features):
            raise ConfigError("model.input", f"{len(input_spec.features)} input features, the "
                              f"init_from bundle was trained on {len(init.spec.input.features)}")
    arch = arch or ArchitectureSpec()
    arch.validate()
    torch.manual_seed(config.seed)  # the same initial weights in every run and on every rank
    net = SPVCNN(arch, in_channels=len(input_spec.features),
                 num_classes=num_classes if config.model.head == "classifier" else 0)
    if init is not None:
        result = net.load_state_dict(init.state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("classifier.")]
        if missing or result.unexpected_keys:
            raise ConfigError("model.init_from", f"does not fit: missing {missing[:4]}, "
                              f"unexpected {result.unexpected_keys[:4]}")
    return net, arch


def _optimizer(config: TrainConfig, net: SPVCNN) -> torch.optim.SGD:
    opt = config.optimizer
    head = [p for n, p in net.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in net.named_parameters() if not n.startswith("classifier.")]
    groups: list[dict[str, Any]] = [{"params": body}]
    if head:
        groups.append({"params": head, "lr": opt.lr_head if opt.lr_head is not None else opt.lr})
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, dampening=opt.dampening,
                           weight_decay=opt.weight_decay, nesterov=opt.nesterov)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    sched = config.scheduler
    if sched.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    t_max = config.epochs if sched.interval == "epoch" else config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max),
                                                      eta_min=sched.eta_min)


# --------------------------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch, CUDA, numpy key) and JSON scalars."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    # The legacy global numpy RNG on purpose: our code draws from Generators, but third-party
    # code (augmentation libraries, user hooks) may use the global one, so it is checkpointed.
    name, key, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]  # noqa: NPY002
    tensors["numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"numpy": {"bit_generator": name, "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)},
               "python": [version, list(internal), gauss_next]}
    return tensors, scalars


def _set_rng_state(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        for index, state in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state, index)
    np_state = scalars["numpy"]
    np.random.set_state((np_state["bit_generator"],  # noqa: NPY002 (see _rng_state)
                         tensors["numpy"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _gather_rng(dist_state: _Dist) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Every rank's RNG state on every rank (rank order)."""
    mine = _rng_state()
    if not dist_state.active:
        return [mine]
    payload = ({k: v.cpu().numpy().tobytes() for k, v in mine[0].items()},
               {k: str(v.dtype) for k, v in mine[0].items()}, mine[1])
    out: list[Any] = [None] * dist_state.world
    dist.all_gather_object(out, payload)  # in-memory between our own processes, not a file
    result = []
    for raw, dtypes, scalars in out:
        tensors = {k: torch.frombuffer(bytearray(b), dtype=getattr(torch, dtypes[k].split(".")[-1]))
                   for k, b in raw.items()}
        result.append((tensors, scalars))
    return result


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state_scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                         ) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            index, name = key[len("optim.state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta["state_scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _json_safe(value: Any) -> Any:
    """Scheduler/optimizer scalars as plain JSON (tensors of one value become numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the tensors in sorted key order: each one's name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        # one JSON line per tensor (JSON has no raw newline); its byte count follows from it
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
        if tensor.dtype == torch.bool:  # not every torch version views bool as uint8
            tensor = tensor.to(torch.uint8)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # 0-dim too, no copy
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of a checkpoint file; a truncated, damaged or foreign file raises
    ConfigError naming it (safetensors checks that the header's tensors fit in the file, the
    SHA-256 written with the tensors, when there is one, that their bytes are unchanged)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError("checkpoint", f"{path} is truncated or corrupt and cannot be read "
                          f"({type(exc).__name__}: {str(exc)[:200]}); resume from "
                          f"{PREVIOUS} or {BEST} next to it, or start a new run",
                          str(path)) from None
    try:
        state = json.loads(metadata[META_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigError("checkpoint", f"{path} is not a clip2scene training checkpoint "
                          f"({exc})", str(path)) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError("checkpoint", f"{path} has format {state.get('format')!r}",
                          str(path))
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError("checkpoint", f"{path} has version {state.get('version')!r}; this "
                          f"release reads {CHECKPOINT_VERSION}", str(path))
    # files of the previous release have no checksum: they load unchecked
    if "sha256" in state and tensor_digest(tensors) != state["sha256"]:
        raise ConfigError("checkpoint", f"{path} does not match the SHA-256 checksum written "
                          f"with it (its content was damaged after writing); resume from "
                          f"{PREVIOUS} or {BEST} next to it, or start a new run", str(path))
    return tensors, state


def find_checkpoint(checkpoints: str | Path
                    ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint in a ``checkpoints`` folder: ``last``, else ``previous``
    (a damaged ``last`` is logged as a warning naming the problem, then skipped); None when
    there is none, ConfigError when none is readable."""
    checkpoints = Path(checkpoints)
    errors = []
    for name in (LAST, PREVIOUS):
        path = checkpoints / name
        if not path.is_file():
            continue
        try:
            return (path, *load_checkpoint(path))
        except ConfigError as exc:
            errors.append(str(exc))
            log.warning("train: %s", exc)
    if errors:
        raise ConfigError("checkpoint", "no readable checkpoint in "
                          f"{checkpoints}: " + " | ".join(errors))
    return None


# ----------------------------------------------------------------------------------- the trainer


class _Trainer:
    def __init__(self, config: TrainConfig, resume: bool | None,
                 callback: Callable[[StepInfo], None] | None) -> None:
        self.config = config
        self.callback = callback
        self.resume_request = resume
        self.dist, self.device = _init_distributed(config.device, config.distributed_timeout_s)
        self.run_dir = Path(config.run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.writer: Any = None
        self.started = dt.datetime.now(dt.timezone.utc)

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.config
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)  # noqa: NPY002 (the global one, see _rng_state)
        torch.manual_seed(cfg.seed)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self.bank, self.vocab, self.bank_provenance = _text_bank(cfg, self.dist)
        self.bank_device = self.bank.to(self.device)
        bundle_input = None
        if cfg.model.init_from is not None and cfg.model.input is None:
            from clip2scene_ros.models.bundle import load_spec

            bundle_input = load_spec(cfg.model.init_from).input
        self.dataset_config: DatasetConfig = cfg.dataset_config(bundle_input)
        self.dataset = BagSceneDataset(self.dataset_config)
        _check_classes(cfg, self.dataset, self.vocab)
        val_cfg = cfg.validation_dataset_config(self.dataset_config)
        self.val_dataset = BagSceneDataset(val_cfg) if val_cfg is not None else None
        if self.val_dataset is not None:
            _check_classes(cfg, self.val_dataset, self.vocab)
        self.input_spec = self.dataset.input_spec
        self.skipped: dict[str, str] = dict(self.dataset.bad)
        if self.val_dataset is not None:
            self.skipped.update(self.val_dataset.bad)

        self.per_step = cfg.grad_accumulation * self.dist.world
        self.steps_per_epoch = _steps_per_epoch(len(self.dataset), cfg.batch_size, self.per_step)
        if self.steps_per_epoch < 1:
            raise ConfigError("batch_size", f"{len(self.dataset)} training samples do not fill "
                              f"one optimizer step of batch_size {cfg.batch_size} × "
                              f"grad_accumulation {cfg.grad_accumulation} × world "
                              f"{self.dist.world}")

        self.loss = build_loss(cfg.loss)
        self.net, self.arch = _build_network(cfg, self.input_spec, len(self.vocab.classes))
        if self.bank.shape[1] != self.arch.clip_dim:
            raise ConfigError("model.architecture.clip_dim", f"is {self.arch.clip_dim}, the text "
                              f"bank's rows have {self.bank.shape[1]} dims (its CLIP model's)")
        self.net.to(self.device)
        outputs = _required_outputs(cfg, self.loss)
        self.val_outputs = frozenset({"class_logits" if cfg.model.head == "classifier"
                                      else "global_feats"})
        self.student = _Student(self.net, outputs, self.device.type)
        self.optimizer = _optimizer(cfg, self.net)
        self.scheduler = _scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.s3 = (SwitchableSelfTraining(cfg.s3.start_epoch, cfg.s3.probability, cfg.s3.per,
                                          seed=cfg.seed, rest_threshold=cfg.s3.rest_threshold)
                   if cfg.s3.enabled else None)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = (torch.amp.GradScaler("cuda") if self.use_amp
                       and self.amp_dtype == torch.float16 else None)

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
            self.bn_sync = _SequentialBatchNormStats(self.net, self.dist.world)
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=bool(present - outputs),
                broadcast_buffers=False)  # buffers are merged by _SequentialBatchNormStats
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
        cfg = self.config
        old_per_step = int(state["per_step"])
        if state["step_in_epoch"] and old_per_step != self.per_step:
            raise ConfigError("grad_accumulation", f"the checkpoint stopped inside an epoch "
                              f"with {old_per_step} micro-batches per step (grad_accumulation "
                              f"× world size); resume with the same product, currently "
                              f"{self.per_step}")
        differs = _config_differences(state.get("config", {}), to_dict(cfg))
        if differs:
            log.warning("train: resuming with a config that differs in %s", ", ".join(differs))
        model_state = {k[len("model."):]: v for k, v in tensors.items()
                       if k.startswith("model.")}
        self.net.load_state_dict(model_state)
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.s3 is not None and state.get("s3"):
            self.s3.load_state_dict(state["s3"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
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
        prefix = f"rng.{self.dist.rank}."
        rng_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        rng_scalars = state.get("rng", {}).get(str(self.dist.rank))
        if rng_tensors and rng_scalars:
            _set_rng_state(rng_tensors, rng_scalars)
        else:
            log.warning("train: the checkpoint has no RNG state for rank %d (other world "
                        "size); continuing with seeded RNGs", self.dist.rank)

    # ---------------------------------------------------------------- checkpoints

    def _checkpoint_bytes(self) -> bytes | None:
        """The full training state (collective under DDP; bytes on rank 0 only)."""
        from safetensors.torch import save

        rngs = _gather_rng(self.dist)
        if not self.dist.main:
            return None
        tensors: dict[str, torch.Tensor] = {
            f"model.{k}": v for k, v in self.net.state_dict().items()}
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        rng_meta = {}
        for rank, (rng_t, rng_s) in enumerate(rngs):
            tensors.update({f"rng.{rank}.{k}": v for k, v in rng_t.items()})
            rng_meta[str(rank)] = rng_s
        if self.epoch < self.config.epochs:
            tensors["data.order"] = torch.from_numpy(self._order(self.epoch))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
            "per_step": self.per_step, "world_size": self.dist.world,
            "optimizer": _json_safe(opt_meta), "scheduler": _json_safe(
                self.scheduler.state_dict()),
            "s3": self.s3.state_dict() if self.s3 is not None else None,
            "scaler": _json_safe(self.scaler.state_dict()) if self.scaler is not None else None,
            "rng": rng_meta, "best": self.best, "validation": self.last_val,
            "losses": self.losses, "skipped": self.skipped, "config": to_dict(self.config),
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sha256": tensor_digest(tensors),
        }
        return save(tensors, metadata={META_KEY: json.dumps(state)})

    def save_checkpoint(self, best: bool = False) -> None:
        self.dist.barrier()  # every rank has finished the step being saved
        data = self._checkpoint_bytes()
        if data is not None:
            last = self.ckpt_dir / LAST
            fresh = self.ckpt_dir / f".{LAST}.new"
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            try:
                # the new state goes fully to disk before any good file moves: a full disk or
                # an I/O error here leaves `last` and `previous` exactly as they were
                atomic_write_bytes(fresh, data)
            except OSError as exc:
                why = getattr(exc.__cause__, "strerror", None) or exc.strerror or str(exc)
                text = (f"checkpoint of step {self.global_step} not written to {last} ({why}); "
                        f"{self.ckpt_dir} still holds the checkpoints written before it, and "
                        "running again resumes from them")
                raise (OSError(exc.errno, text) if exc.errno is not None else OSError(text)
                       ) from exc
            if last.exists():
                # keep the former good file: a damaged `last` (disk, copy) still leaves a resume
                last.replace(self.ckpt_dir / PREVIOUS)
            fresh.replace(last)
            if best:
                atomic_write_bytes(self.ckpt_dir / BEST, data)
        self.dist.barrier()  # nobody reads or moves on before the file is complete

    # ---------------------------------------------------------------- the loop

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.dataset), self.config.seed, epoch, self.config.shuffle)

    def _loader(self, epoch: int, order: np.ndarray, start_step: int
                ) -> Iterator[dict[str, Any]]:
        cfg = self.config
        micro = _micro_batches(order, cfg.batch_size)
        mine = [micro[(s * cfg.grad_accumulation + a) * self.dist.world + self.dist.rank]
                for s in range(start_step, self.steps_per_epoch)
                for a in range(cfg.grad_accumulation)]
        self.dataset.set_epoch(epoch)  # before the iterator (and its workers) exist
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=mine, collate_fn=collate, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # a private generator: DataLoader seeds its workers from it instead of consuming
            # the global torch RNG, which is checkpointed
            generator=torch.Generator().manual_seed(_derived_seed(cfg.seed, epoch)))
        return iter(loader)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _loss_batch(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor],
                    micro_index: int) -> dict[str, Any]:
        cfg = self.config
        keys = {key for term in self.loss.terms for key in term.inputs.values()}
        bank = self.bank_device
        data: dict[str, Any] = {"text_bank": bank, "cell_index": batch["cell_index"], **out}
        for key in ("pixel_feats", "pair_pixel_feats"):
            if key in batch:
                data[key] = batch[key]
        teacher = batch["labels"]
        if cfg.model.head == "classifier":
            logits = out["class_logits"]
        elif "global_feats" in out:
            logits = text_logits(out["global_feats"], bank)
        else:
            logits = None
        if logits is not None:
            data["logits"] = logits
        labels = teacher
        if self.s3 is not None:
            assert logits is not None
            # the coin of micro-batch k is the same for any world size / accumulation split
            self.s3.step = micro_index
            labels = self.s3.targets(self.epoch, teacher, logits, teacher >= 0)
        data["labels"] = labels
        if keys & {"paired_logits", "teacher_logits"}:
            if "pixel_feats" not in batch:
                raise ConfigError("loss.kl", "the teacher cache stores no pixel features "
                                  "(run `clip2scene teacher --features`)")
            pixel = batch["pixel_feats"]
            rows = (teacher >= 0) & (pixel.abs().sum(1) > 0)
            assert logits is not None
            data["paired_logits"] = logits[rows]
            data["teacher_logits"] = text_logits(pixel[rows], bank)
        if "pair_point_feats" in keys:
            data["pair_point_feats"] = out["global_feats"][batch["pair_point"]]
        for term in self.loss.terms:
            generator = term.kwargs.get("generator")
            if isinstance(generator, torch.Generator):
                # per micro-batch, so resumes and world sizes draw the same pairs
                generator.manual_seed(_derived_seed(cfg.seed, _PPKT_TAG, micro_index))
        return data

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_amp:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        cfg = self.config
        accum = cfg.grad_accumulation
        sums: dict[str, float] = {}
        self.model.train()
        for a in range(accum):
            batch = self._to_device(next(batches))
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
                total, parts = self.loss(self._loss_batch(batch, out, micro_index))
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
        if self.dist.active:  # logged values are means over the ranks
            names = sorted(sums)
            values = torch.tensor([sums[n] for n in names], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(values)
            sums = {n: float(v) / self.dist.world for n, v in zip(names, values, strict=True)}
        return sums

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
            self.last_val = self._validate()
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

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        assert self.val_dataset is not None and self.config.validation is not None
        val = self.config.validation
        count = len(self.val_dataset)
        if val.max_samples:
            count = min(count, val.max_samples)
        mine = list(range(count))[self.dist.rank::self.dist.world]
        batches = [mine[i:i + val.batch_size] for i in range(0, len(mine), val.batch_size)]
        self.val_dataset.set_epoch(0)
        loader = torch.utils.data.DataLoader(self.val_dataset, batch_sampler=batches,
                                             collate_fn=collate,
                                             num_workers=self.config.num_workers,
                                             generator=torch.Generator().manual_seed(0))
        classes = len(self.vocab.classes)
        matrix = ConfusionMatrix(classes)
        was_training = self.net.training
        self.student.eval()
        try:
            for raw in loader:
                batch = self._to_device(raw)
                self.skipped.update(batch.get("replaced", ()))
                with self._autocast():
                    out = self.student(batch["feats"], batch["coords"], batch["batch"],
                                       outputs=self.val_outputs)
                if "class_logits" in out:
                    logits = out["class_logits"].float()
                else:
                    logits = text_logits(out["global_feats"].float(), self.bank_device)
                target = batch.get("gt_labels", batch["labels"])
                key = batch["sweep"] == 0  # the evaluation protocol scores the key frame
                matrix.update(logits.argmax(1)[key].cpu().numpy(), target[key].cpu().numpy())
        finally:
            self.student.train(was_training)
            # training passes run with autograd and never use it: free its high-water memory
            thread_workspace().release()
        if self.dist.active:
            counts = torch.from_numpy(matrix.counts).to(self.device)
            dist.all_reduce(counts)
            matrix.counts = counts.cpu().numpy()
        metrics = matrix.to_dict(list(self.vocab.classes))
        return {"miou": float("nan") if metrics["miou"] is None else metrics["miou"],
                "accuracy": float("nan") if metrics["accuracy"] is None
                else metrics["accuracy"], "points": metrics["points"],
                "per_class_iou": metrics["per_class_iou"]}

    def _scalars(self, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, self.global_step)

    # ---------------------------------------------------------------- the end

    def _finish(self) -> TrainReport:
        cfg = self.config
        bundle_path = None
        onnx = None
        if self.dist.main:
            bundle_path = self._write_bundle()
            if cfg.export_onnx:
                from clip2scene_ros.models.onnx_export import export_bundle

                onnx = export_bundle(bundle_path)
        self.dist.barrier()
        return TrainReport(run_dir=self.run_dir, bundle=bundle_path, epochs=self.epoch,
                           global_step=self.global_step, steps_per_epoch=self.steps_per_epoch,
                           world_size=self.dist.world, resumed_from=self.resumed_from,
                           losses=dict(self.losses), validation=self.last_val, best=self.best,
                           onnx=onnx, model=self.net, skipped=dict(self.skipped))

    def _write_bundle(self) -> Path:
        cfg = self.config
        state = {k: v for k, v in self.net.state_dict().items()
                 if not k.startswith("classifier.")}
        bank = self.bank
        bank_info = dict(self.bank_provenance)
        if cfg.model.head == "classifier":
            assert self.net.classifier is not None
            state, bank = fold_classifier(state, self.net.classifier[0], self.arch.clip_dim)
            bank_info = {**bank_info, "kind": "classifier",
                         "note": "closed vocabulary: the fine-tuned classifier folded into "
                                 "point_mapping_global with one-hot text rows"}
        provenance = {
            "trainer": "clip2scene_ros.training",
            "config": to_dict(cfg),
            "git": _git_commit(),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "epochs": self.epoch, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world,
            "samples": len(self.dataset), "skipped": dict(self.skipped),
            "final_losses": {k: float(v) for k, v in self.losses.items()},
            "validation": _json_safe(self.last_val), "best": self.best,
        }
        spec = BundleSpec(architecture=self.arch, input=self.input_spec, vocabulary=self.vocab,
                          text_bank=_json_safe(bank_info), provenance=_json_safe(provenance))
        path = save_bundle(self.run_dir / "bundle", spec, state, bank, overwrite=True)
        log.info("train: bundle written to %s", path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def fold_classifier(state: Mapping[str, torch.Tensor], classifier: nn.Linear, clip_dim: int
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``classifier`` head as ``point_mapping_global`` + a one-hot text bank.

    The bundle (and the node) label by ``argmax_c cos(g, t_c)``. With ``g = [W f + b; 0]`` and
    ``t_c = e_c`` that is ``argmax_c (W f + b)_c / |g|`` = the classifier's argmax (|g| > 0 is a
    per-point factor), so the fine-tuned closed-set model deploys unchanged; its softmax scores
    are the classifier's at a per-point temperature. Needs ``clip_dim >= classes``.
    """
    weight = classifier.weight.detach().cpu()
    bias = classifier.bias.detach().cpu()
    classes, features = weight.shape
    if classes > clip_dim:
        raise ConfigError("model.head", f"{classes} classes do not fold into {clip_dim} "
                          "text dimensions")
    out = dict(state)
    w = torch.zeros(clip_dim, features, dtype=weight.dtype)
    b = torch.zeros(clip_dim, dtype=bias.dtype)
    w[:classes] = weight
    b[:classes] = bias
    out["point_mapping_global.weight"] = w
    out["point_mapping_global.bias"] = b
    bank = torch.zeros(classes, clip_dim, dtype=torch.float32)
    bank[torch.arange(classes), torch.arange(classes)] = 1.0
    return out, bank


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
                        ) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if not prefix and key in _NEUTRAL_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _git_commit() -> dict[str, Any] | None:
    """The source checkout's commit (and whether it had local changes), when there is one."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


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
