"""Training checkpoints: the file format, writing, reading and resuming.

A run keeps its checkpoints in ``run_dir/checkpoints/`` (:data:`CHECKPOINT_DIR`):
:data:`LAST` every ``checkpoint_every`` optimizer steps and at each epoch end (the former one
kept as :data:`PREVIOUS`), and :data:`BEST` when the validation metric improves. One
safetensors file holds every tensor (model, optimizer state, RNG states as uint8/int64, the
epoch's sample order) and, in its metadata under :data:`META_KEY`, a JSON document with the
scalar rest (optimizer hyper-parameters, scheduler, S3, GradScaler, python ``random`` state,
epoch, step within the epoch, config). Nothing is pickled; each file is written atomically
(temporary sibling + rename), so a crash leaves the last good file, and a write that fails (full
disk, I/O error) leaves ``last`` and ``previous`` as they were. The metadata also carries a
SHA-256 of the tensors (:func:`tensor_digest`), checked on load, so a file damaged after writing
(intact size and header, altered bytes) is refused like a truncated one; files without it (the
previous release) load unchecked. Resuming restores all of it, and a run interrupted after any
step ends bit-identical (CPU) to an uninterrupted one. Under DDP every rank's RNG state is
gathered into rank 0's file; a rank without its own state (other world size) keeps its seeded
RNGs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip2scene_ros.config import to_dict
from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.files import atomic_write_bytes
from clip2scene_ros.training.config import TrainConfig
from clip2scene_ros.training.distributed import Dist
from clip2scene_ros.training.losses import SwitchableSelfTraining

log = logging.getLogger(__name__)

__all__ = [
    "BEST",
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST",
    "META_KEY",
    "PREVIOUS",
    "checkpoint_bytes",
    "find_checkpoint",
    "json_safe",
    "load_checkpoint",
    "restore_checkpoint",
    "tensor_digest",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "clip2scene_train_checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.safetensors"
PREVIOUS = "previous.safetensors"
BEST = "best.safetensors"
META_KEY = "clip2scene"
#: Config keys that do not change the training trajectory (no warning when they differ on resume).
_NEUTRAL_KEYS = ("run_dir", "num_workers", "device", "progress", "tensorboard", "log_every",
                 "export_onnx", "checkpoint_every", "epochs", "validation", "skip_bad",
                 "distributed_timeout_s")


# ------------------------------------------------------------------------------------ state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch, CUDA, numpy key) and JSON scalars."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    # The legacy global numpy RNG on purpose: our code draws from Generators, but third-party
    # code (augmentation libraries, user hooks) may use the global one, so it is checkpointed.
    name, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
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


def _gather_rng(dist_state: Dist) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
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


def json_safe(value: Any) -> Any:
    """Scheduler/optimizer scalars as plain JSON (tensors of one value become numbers)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value



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


# ------------------------------------------------------------------------------------- files


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the tensors in sorted key order: each one's name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        # one JSON line per tensor (JSON has no raw newline); its byte count follows from it
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
        if tensor.dtype == torch.bool:  # not every torch version views bool as uint8
            tensor = tensor.to(torch.uint8)
        raw: np.ndarray = tensor.reshape(-1).view(torch.uint8).numpy()  # 0-dim too, no copy
        digest.update(raw.data)
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of a checkpoint file; a truncated, damaged or foreign file raises
    IntegrityError naming it (safetensors checks that the header's tensors fit in the file, the
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
        raise IntegrityError("checkpoint", f"{path} is truncated or corrupt and cannot be read "
                             f"({type(exc).__name__}: {str(exc)[:200]}); resume from "
                             f"{PREVIOUS} or {BEST} next to it, or start a new run",
                             str(path)) from None
    try:
        state = json.loads(metadata[META_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise IntegrityError("checkpoint", f"{path} is not a clip2scene training checkpoint "
                             f"({exc})", str(path)) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise IntegrityError("checkpoint", f"{path} has format {state.get('format')!r}",
                             str(path))
    if state.get("version") != CHECKPOINT_VERSION:
        raise IntegrityError("checkpoint", f"{path} has version {state.get('version')!r}; this "
                             f"release reads {CHECKPOINT_VERSION}", str(path))
    # files of the previous release have no checksum: they load unchecked
    if "sha256" in state and tensor_digest(tensors) != state["sha256"]:
        raise IntegrityError("checkpoint", f"{path} does not match the SHA-256 checksum written "
                             f"with it (its content was damaged after writing); resume from "
                             f"{PREVIOUS} or {BEST} next to it, or start a new run", str(path))
    return tensors, state


def find_checkpoint(checkpoints: str | Path
                    ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint in a ``checkpoints`` folder: ``last``, else ``previous``
    (a damaged ``last`` is logged as a warning naming the problem, then skipped); None when
    there is none, IntegrityError when none is readable."""
    checkpoints = Path(checkpoints)
    errors = []
    for name in (LAST, PREVIOUS):
        path = checkpoints / name
        if not path.is_file():
            continue
        try:
            return (path, *load_checkpoint(path))
        except IntegrityError as exc:
            errors.append(str(exc))
            log.warning("train: %s", exc)
    if errors:
        raise IntegrityError("checkpoint", "no readable checkpoint in "
                             f"{checkpoints}: " + " | ".join(errors))
    return None


# ---------------------------------------------------------------------------- write and resume


def checkpoint_bytes(dist_state: Dist, config: TrainConfig, *, net: nn.Module,
                     optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     s3: SwitchableSelfTraining | None, scaler: torch.amp.GradScaler | None,
                     order: np.ndarray | None, epoch: int, step_in_epoch: int, global_step: int,
                     steps_per_epoch: int, per_step: int, best: dict[str, Any] | None,
                     validation: dict[str, Any] | None, losses: Mapping[str, float],
                     skipped: Mapping[str, str]) -> bytes | None:
    """The full training state as one checkpoint file's bytes (a collective under DDP: every
    rank calls it; the bytes come back on rank 0, None elsewhere).

    ``order`` is the sample order of ``epoch`` (None once the last epoch is done); the counters
    and records are the trainer's at the moment of the call.
    """
    from safetensors.torch import save

    rngs = _gather_rng(dist_state)
    if not dist_state.main:
        return None
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v for k, v in net.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    rng_meta = {}
    for rank, (rng_t, rng_s) in enumerate(rngs):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rng_t.items()})
        rng_meta[str(rank)] = rng_s
    if order is not None:
        tensors["data.order"] = torch.from_numpy(order)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "epoch": epoch, "step_in_epoch": step_in_epoch,
        "global_step": global_step, "steps_per_epoch": steps_per_epoch,
        "per_step": per_step, "world_size": dist_state.world,
        "optimizer": json_safe(opt_meta), "scheduler": json_safe(scheduler.state_dict()),
        "s3": s3.state_dict() if s3 is not None else None,
        "scaler": json_safe(scaler.state_dict()) if scaler is not None else None,
        "rng": rng_meta, "best": best, "validation": validation,
        "losses": losses, "skipped": skipped, "config": to_dict(config),
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sha256": tensor_digest(tensors),
    }
    return save(tensors, metadata={META_KEY: json.dumps(state)})


def write_checkpoint(checkpoints: Path, data: bytes, *, global_step: int, best: bool = False
                     ) -> None:
    """Write ``data`` as ``LAST`` in ``checkpoints`` (the former one becomes ``PREVIOUS``), and
    as ``BEST`` too when ``best``.

    An OSError (full disk, I/O error) leaves ``last`` and ``previous`` as they were and says so,
    naming the step (``global_step``) whose checkpoint was lost.
    """
    last = checkpoints / LAST
    fresh = checkpoints / f".{LAST}.new"
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        # the new state goes fully to disk before any good file moves: a full disk or
        # an I/O error here leaves `last` and `previous` exactly as they were
        atomic_write_bytes(fresh, data)
    except OSError as exc:
        why = getattr(exc.__cause__, "strerror", None) or exc.strerror or str(exc)
        text = (f"checkpoint of step {global_step} not written to {last} ({why}); "
                f"{checkpoints} still holds the checkpoints written before it, and "
                "running again resumes from them")
        raise (OSError(exc.errno, text) if exc.errno is not None else OSError(text)
               ) from exc
    if last.exists():
        # keep the former good file: a damaged `last` (disk, copy) still leaves a resume
        last.replace(checkpoints / PREVIOUS)
    fresh.replace(last)
    if best:
        atomic_write_bytes(checkpoints / BEST, data)


def restore_checkpoint(tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], *,
                       config: TrainConfig, per_step: int, rank: int, net: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler,
                       s3: SwitchableSelfTraining | None,
                       scaler: torch.amp.GradScaler | None) -> None:
    """Load a checkpoint's model, optimizer, scheduler, S3, GradScaler and this rank's RNG
    states (the counters and records of ``state`` are the caller's to take).

    A checkpoint written inside an epoch needs the same micro-batches per step (``per_step`` =
    grad_accumulation × world size), else ConfigError; a config that differs in keys that
    change the trajectory is logged as a warning.
    """
    old_per_step = int(state["per_step"])
    if state["step_in_epoch"] and old_per_step != per_step:
        raise ConfigError("grad_accumulation", f"the checkpoint stopped inside an epoch "
                          f"with {old_per_step} micro-batches per step (grad_accumulation "
                          f"× world size); resume with the same product, currently "
                          f"{per_step}")
    differs = _config_differences(state.get("config", {}), to_dict(config))
    if differs:
        log.warning("train: resuming with a config that differs in %s", ", ".join(differs))
    model_state = {k[len("model."):]: v for k, v in tensors.items()
                   if k.startswith("model.")}
    net.load_state_dict(model_state)
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if s3 is not None and state.get("s3"):
        s3.load_state_dict(state["s3"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    prefix = f"rng.{rank}."
    rng_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rng_scalars = state.get("rng", {}).get(str(rank))
    if rng_tensors and rng_scalars:
        _set_rng_state(rng_tensors, rng_scalars)
    else:
        log.warning("train: the checkpoint has no RNG state for rank %d (other world "
                    "size); continuing with seeded RNGs", rank)
