"""``Predictor``: Frames in, per-point labels, scores and features out, behind one interface.

The node, offline evaluation and replay all go through it, so a model behaves the same
everywhere: preprocessing from the bundle's InputSpec, a backend (:mod:`.backends`) for the
network, then the text bank.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import ConfigError
from ..frame import Frame
from ..models.bundle import Bundle, VocabularySpec, load_bundle
from ..models.spvcnn import build_model
from ..precision import DEFAULT_PRECISION
from ..precision import check_precision as check_name
from ..preprocess import PreparedCloud, prepare_frames
from .backends import (
    BACKENDS,
    Backend,
    OnnxRuntimeBackend,
    TorchBackend,
    TrunkBackend,
    available,
    check_precision,
)
from .device_io import count_host_reads
from .labels import LOGIT_SCALE, PointLabels, scatter_to_key_frame, text_logits

log = logging.getLogger(__name__)


class _Deferred:
    """A value computed on first read (see :class:`_OnFirstRead`)."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute


class _OnFirstRead:
    """Dataclass field descriptor: stores what ``__init__`` gets; a :class:`_Deferred` is
    computed on the first read and the result kept (``dataclasses.replace`` still works)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_value_{name}"

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return None  # the field's default
        value = obj.__dict__[self.slot]
        if isinstance(value, _Deferred):
            value = value.compute()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True)
class Prediction:
    labels: PointLabels
    prepared: PreparedCloud
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: ``[N, clip_dim]`` text-space features of the prepared points (``prepared`` order). With
    #: the torch backend they are computed on first read: labelling does not need them (see
    #: :class:`TextHead`), and the ``[N, feature_dim] x [feature_dim, clip_dim]`` projection
    #: (8.5 GFLOP for the 34,688-point nuScenes keyframe at cr 0.5 and 512 dims, over 100 ms
    #: of one core) is then paid only by a frame that is fused or cropped.
    features: torch.Tensor | None = field(  # type: ignore[assignment]
        default=_OnFirstRead(), repr=False, compare=False)
    #: ``[N, C]`` float32 CPU logits of the prepared points over the text bank: what ``labels``
    #: are the argmax and softmax of. Fusion and the object ensemble start from them, so they
    #: need neither the features nor their projection.
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: Host reads of device values (each a host <-> device sync on a GPU) while the network and
    #: the labels ran, when the Predictor counts them (``count_syncs``); else None.
    host_syncs: int | None = None


def cosine_logits(features: torch.Tensor, text_bank: torch.Tensor,
                  logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """:func:`~.labels.text_logits` without normalising ``[N, D]`` copies of the features:
    ``scale * (f @ normalize(bank).T) / max(|f|, 1e-12)`` (equal up to float rounding)."""
    feats = features.float()
    bank = torch.nn.functional.normalize(text_bank.to(feats), dim=-1)
    norm = torch.linalg.vector_norm(feats, dim=1).clamp_min_(1e-12)
    return (feats @ bank.T).mul_((logit_scale / norm).unsqueeze(1))


class TextHead:
    """``text_logits(linear(x), bank)`` without ``linear(x)``: labels from the trunk features.

    With ``y = W x + b`` (``W [D, F]``, the ``point_mapping_global`` of SPVCNN: D = 512 > F =
    feature_dim), the logits are ``scale * (y . n_c) / |y|`` for the normalised bank rows
    ``n_c``. The numerators are ``x . (W^T n_c) + b . n_c``, an ``[F, C]`` product. For ``|y|``,
    ``W = Q R`` (reduced QR, ``Q [D, F]`` orthonormal) gives ``|y|^2 = |R x + Q^T b|^2 +
    |b - Q Q^T b|^2``: an ``[F, F]`` product instead of ``[F, D]``, and as well conditioned as
    computing ``y`` (an orthogonal change of basis, no Gram-matrix cancellation). ``R`` is
    upper triangular, so a column block ``x[a:b]`` only reaches ``(R x)[:b]``: each block's
    product is cut to those columns (for SPVCNN's blocks of 128, 64 and 48 at cr 0.5, 70 % of
    the full ``[F, F]`` product). When ``D <= F`` the head computes ``y`` itself (``R = W``).
    The matrices are made in float64 once per model and text bank.

    ``x`` may come as column blocks (SPVCNN's three point features): the products are summed
    block by block, :data:`CHUNK_ROWS` rows at a time into one small buffer, so neither the
    ``[N, F]`` concatenation nor an ``[N, F]`` product is ever allocated.
    """

    #: Rows per chunk: a 2,048 x 240 float buffer (2 MB) stays in cache between its GEMMs and
    #: its norm. Measured (one thread, nuScenes keyframe sizes): 80 ms for chunks of 2,048
    #: rows, 109 ms for the whole [N, 240] at once plus the concatenation.
    CHUNK_ROWS = 2048

    def __init__(self, linear: torch.nn.Linear, logit_scale: float = LOGIT_SCALE) -> None:
        weight = linear.weight.detach().double()  # [D, F]
        bias = (linear.bias.detach().double() if linear.bias is not None
                else weight.new_zeros(weight.shape[0]))
        d, f = weight.shape
        if d > f:
            q, r = torch.linalg.qr(weight)  # reduced: q [D, F], r [F, F]
            proj, offset = r, q.T @ bias
            rest = float((bias - q @ offset).square().sum())
        else:
            proj, offset, rest = weight, bias, 0.0
        self.weight, self.bias = weight, bias
        self.proj_t = proj.T.contiguous()  # [F, k]; lower triangular when d > f
        self.triangular = d > f
        self.offset = offset
        self.rest = rest
        self.logit_scale = logit_scale
        self._key: tuple[Any, ...] | None = None
        self._mats: tuple[Any, ...] = ()

    def _matrices(self, text_bank: torch.Tensor, widths: tuple[int, ...],
                  device: torch.device) -> tuple[Any, ...]:
        """Per block: its rows of ``R^T`` and of ``A = W^T n^T``; and both offsets (float32)."""
        if self._key is None or self._key[0] is not text_bank or self._key[1:] != (widths, device):
            bank = torch.nn.functional.normalize(text_bank.detach().double().cpu(), dim=-1)
            as32: dict[str, Any] = {"device": device, "dtype": torch.float32}
            numer = (bank @ self.weight).T  # [F, C]
            bounds = [0, *itertools.accumulate(widths)]
            k = self.proj_t.shape[1]
            self._mats = (
                # rows a:b of R^T are zero beyond column b (R is upper triangular)
                [self.proj_t[a:b, : (b if self.triangular else k)].contiguous().to(**as32)
                 for a, b in itertools.pairwise(bounds)],
                [numer[a:b].contiguous().to(**as32) for a, b in itertools.pairwise(bounds)],
                self.offset.to(**as32), (bank @ self.bias).to(**as32))
            self._key = (text_bank, widths, device)
        return self._mats

    def logits(self, trunk: torch.Tensor | Sequence[torch.Tensor], text_bank: torch.Tensor
               ) -> torch.Tensor:
        """``[N, C]`` logits of trunk features ``[N, F]`` (or its column blocks); equal to
        ``text_logits(linear(trunk), text_bank)`` up to float rounding."""
        blocks = [trunk] if isinstance(trunk, torch.Tensor) else list(trunk)
        blocks = [b.float() for b in blocks]
        widths = tuple(int(b.shape[1]) for b in blocks)
        if sum(widths) != self.proj_t.shape[0]:
            raise ValueError(f"trunk features have {sum(widths)} columns, the head takes "
                             f"{self.proj_t.shape[0]}")
        projs, numers, offset, numer_offset = self._matrices(text_bank, widths,
                                                             blocks[0].device)
        n = blocks[0].shape[0]
        norm = blocks[0].new_empty(n)
        logits = blocks[0].new_empty(n, numer_offset.shape[0])
        buffer = blocks[0].new_empty(min(n, self.CHUNK_ROWS), offset.shape[0])
        for start in range(0, n, self.CHUNK_ROWS):
            rows = slice(start, min(n, start + self.CHUNK_ROWS))
            u, num = buffer[: rows.stop - start], logits[rows]
            # two GEMM chains, not one over [R^T | A]: MKL is markedly slower at odd widths.
            # The last block's product spans every column of u, so it goes first.
            torch.addmm(offset, blocks[-1][rows], projs[-1], out=u)
            torch.addmm(numer_offset, blocks[-1][rows], numers[-1], out=num)
            for block, proj, numer in zip(blocks[:-1], projs[:-1], numers[:-1], strict=True):
                u[:, : proj.shape[1]].addmm_(block[rows], proj)
                num.addmm_(block[rows], numer)
            torch.linalg.vector_norm(u, dim=1, out=norm[rows])
        if self.rest:
            norm = norm.square_().add_(self.rest).sqrt_()
        scale = norm.clamp_min_(1e-12).reciprocal_().mul_(self.logit_scale)
        return logits.mul_(scale.unsqueeze(1))


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU. A CUDA device this machine lacks stops
    with one ConfigError naming it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{device!r} requested but this machine has no CUDA "
                              "device (torch.cuda.is_available() is False)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{device!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


def choose_backend(bundle: Bundle, device: torch.device) -> tuple[str, str]:
    """``auto``'s choice and why: TensorRT on a GPU when it and the ONNX are there, else torch.

    On CPU the eager torch engine is faster than onnxruntime over the planned graph (its
    gather-scatter dataflow skips the empty neighbour slots the exported implicit GEMM reads).
    """
    if device.type == "cuda" and bundle.onnx_path is not None and available("tensorrt"):
        return "tensorrt", "a CUDA device, tensorrt and the bundle's model.onnx are present"
    if device.type == "cuda":
        return "torch", "tensorrt or model.onnx is missing"
    return "torch", "on CPU the eager engine is the fastest backend"


def make_backend(name: str, bundle: Bundle, device: torch.device, *, precision: str = "fp32",
                 engine_cache: str | Path | None = None,
                 profile: tuple[int, int, int] | None = None) -> Backend:
    if name == "torch":
        return TorchBackend(build_model(bundle), device, precision)
    if not available(name):
        raise ConfigError("backend", f"{name!r} is not installed here; use auto or torch")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle, device, precision=precision, cache_dir=engine_cache,
                           profile=profile)


class Predictor:
    """Labels every point of a key frame (plus its past sweeps, when the bundle uses them).

    Args:
        bundle: the model bundle (or a path to one).
        backend: ``auto`` or one of :data:`~.backends.BACKENDS`; ``auto`` logs its choice once.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        sweeps / max_points: override the bundle's preprocessing when > 0 (sweeps can only be
            lowered: a model trained on 3 sweeps can run on 1 when poses are missing).
        precision / engine_cache: ``auto``, ``fp32``, ``bf16`` or ``fp16``
            (:func:`~.backends.check_precision`: what each backend runs where; ``auto`` is bf16
            on a CPU with bf16 matrix units, fp16 on CUDA, else fp32) and the TensorRT cache
            folder (None or empty:
            :func:`~.engine_cache.engine_cache_dir`'s default, ``<bundle>/engines``).
        profile: TensorRT (min, opt, max) points, 0 for the bundle's value (its ``engine``
            section); None: the bundle's.
        count_syncs: count the host reads of device values per frame
            (:attr:`Prediction.host_syncs`, :func:`~.device_io.count_host_reads`).
    """

    def __init__(self, bundle: Bundle | str | Path, *, backend: str = "auto",
                 device: str = "auto", sweeps: int = 0, max_points: int = 0,
                 precision: str = DEFAULT_PRECISION, engine_cache: str | Path | None = None,
                 profile: tuple[int, int, int] | None = None, count_syncs: bool = False
                 ) -> None:
        if backend not in ("auto", *BACKENDS):
            raise ConfigError("backend", f"must be one of {['auto', *BACKENDS]}, got {backend!r}")
        self.device = resolve_device(device)  # before the bundle: a wrong device says so first
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        check_name(precision)  # a bad name fails before the bundle is read
        self.count_syncs = count_syncs
        spec = self.bundle.spec.input
        if sweeps > spec.sweeps:
            raise ConfigError("sweeps", f"{sweeps} > the {spec.sweeps} the model was trained on")
        if max_points > spec.max_points:
            raise ConfigError("max_points", f"{max_points} > the bundle's {spec.max_points} "
                              "(its exported graph is sized for that)")
        self.input_spec = replace(spec, sweeps=sweeps or spec.sweeps,
                                  max_points=max_points or spec.max_points)
        reason = "requested"
        if backend == "auto":
            backend, reason = choose_backend(self.bundle, self.device)
        self.backend_name = backend
        #: the resolved precision: fp32, bf16 or fp16
        self.precision = check_precision(precision, backend, self.device)
        self.profile = self._profile(profile)
        self.backend = make_backend(backend, self.bundle, self.device, precision=self.precision,
                                    engine_cache=engine_cache, profile=self.profile)
        self.text_bank = self.bundle.text_bank.to(self.device)
        self.vocabulary = self.bundle.spec.vocabulary
        head = getattr(self.backend, "head", None)
        self.text_head = TextHead(head) if head is not None else None
        self._warned: set[str] = set()
        log.info("predictor: backend %s (%s), %s, %d classes (%s)", self.backend.describe(),
                 reason, self.precision, len(self.vocabulary.classes), self.vocabulary.name)

    def _profile(self, given: tuple[int, int, int] | None) -> tuple[int, int, int]:
        """The engine's (min, opt, max) points: ``given``'s non-zero values over the bundle's."""
        base = self.bundle.spec.engine.profile(self.input_spec.max_points)
        if given is None:
            return base
        low, opt, high = (g or b for g, b in zip(given, base, strict=True))
        if high > self.input_spec.max_points:
            raise ConfigError("engine_max_points", f"{high} > max_points "
                              f"{self.input_spec.max_points} (no cloud sends more)")
        if not 1 <= low <= opt <= high:
            raise ConfigError("engine_opt_points", f"the profile needs 1 <= min <= opt <= max, "
                              f"got {low}/{opt}/{high}")
        return low, opt, high

    @property
    def sweeps(self) -> int:
        return self.input_spec.sweeps

    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.vocabulary.palette, dtype=np.uint8).reshape(-1, 3)

    def set_vocabulary(self, text_bank: torch.Tensor, vocabulary: VocabularySpec) -> None:
        """Label with another text bank from the next frame on (open vocabulary)."""
        self.bundle = self.bundle.with_text_bank(text_bank, vocabulary)
        self.text_bank = self.bundle.text_bank.to(self.device)
        self.vocabulary = vocabulary

    @torch.inference_mode()
    def predict(self, frames: Sequence[Frame]) -> Prediction:
        """Labels for ``frames[0]``'s points; ``frames[1:]`` are its past sweeps, newest first."""
        t0 = time.perf_counter()
        prepared = prepare_frames(frames[: self.input_spec.sweeps], self.input_spec)
        fit = getattr(self.backend, "fit", None)
        if fit is not None and prepared.num_points:  # a backend with a shape profile
            prepared = fit(prepared)
        self._warn_dropped(prepared)
        t1 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            reads = (stack.enter_context(count_host_reads(self.device)) if self.count_syncs
                     else None)
            features, logits = self._network(prepared)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            logits = logits.float().cpu()
        labels = scatter_to_key_frame(prepared, logits)
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                   "postprocess": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}
        # a _Deferred is computed on first read (Prediction.features is an _OnFirstRead)
        return Prediction(labels, prepared, timings, cast(torch.Tensor, features), logits,
                          None if reads is None else reads.total)

    def _network(self, prepared: PreparedCloud) -> tuple[torch.Tensor | _Deferred, torch.Tensor]:
        """(features or their deferred projection, logits on the device)."""
        features: torch.Tensor | _Deferred
        if prepared.num_points == 0:  # defined result: every key point UNKNOWN_LABEL
            features = torch.zeros(0, self.text_bank.shape[1], device=self.device)
            logits = text_logits(features, self.text_bank)
        elif self.text_head is not None:  # labels from the trunk; features only when read
            backend = cast(TrunkBackend, self.backend)  # it has a head: see __init__
            trunk = backend.trunk_features(prepared)
            logits = self.text_head.logits(trunk, self.text_bank)
            features = _Deferred(_projection(backend.head, trunk))
        else:
            features = self.backend.features(prepared)
            logits = cosine_logits(features, self.text_bank)
        return features, logits

    def _warn_dropped(self, prepared: PreparedCloud) -> None:
        """One warning per reason the first time points are dropped; counts go per frame."""
        for reason, count in prepared.dropped.items():
            if count and reason not in self._warned:
                self._warned.add(reason)
                log.warning("predictor: dropped %d points (%s); further drops are counted in "
                            "Prediction.prepared.dropped without a warning", count, reason)


def _projection(head: torch.nn.Module, trunk: Sequence[torch.Tensor]
                ) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        with torch.inference_mode():
            return head(torch.cat(list(trunk), dim=1))
    return compute
