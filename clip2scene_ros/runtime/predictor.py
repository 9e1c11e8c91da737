"""``Predictor``: Frames in, per-point labels, scores and features out, behind one interface.

The node, offline evaluation and replay all go through it, so a model behaves the same
everywhere: preprocessing from the bundle's InputSpec, a backend (:mod:`.backends`) for the
network, then the text bank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..frame import Frame
from ..models.bundle import Bundle, VocabularySpec, load_bundle
from ..models.spvcnn import build_model
from ..preprocess import PreparedCloud, prepare_frames
from .backends import (
    BACKENDS,
    PRECISIONS,
    Backend,
    OnnxRuntimeBackend,
    TorchBackend,
    available,
)
from .labels import PointLabels, scatter_to_key_frame, text_logits

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prediction:
    labels: PointLabels
    prepared: PreparedCloud
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: ``[N, clip_dim]`` text-space features of the prepared points (``prepared`` order).
    features: torch.Tensor | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} requested but no CUDA device is available")
    return torch.device(device)


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


def make_backend(name: str, bundle: Bundle, device: torch.device, *, precision: str = "fp16",
                 engine_cache: str | Path | None = None) -> Backend:
    if name == "torch":
        return TorchBackend(build_model(bundle), device)
    if not available(name):
        raise ConfigError("backend", f"{name!r} is not installed here; use auto or torch")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device)
    from .tensorrt_backend import DEFAULT_CACHE, TensorRTBackend

    return TensorRTBackend(bundle, device, precision=precision,
                           cache_dir=engine_cache or DEFAULT_CACHE)


class Predictor:
    """Labels every point of a key frame (plus its past sweeps, when the bundle uses them).

    Args:
        bundle: the model bundle (or a path to one).
        backend: ``auto`` or one of :data:`~.backends.BACKENDS`; ``auto`` logs its choice once.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        sweeps / max_points: override the bundle's preprocessing when > 0 (sweeps can only be
            lowered: a model trained on 3 sweeps can run on 1 when poses are missing).
        precision / engine_cache: TensorRT engine precision (fp32, fp16) and cache folder.
    """

    def __init__(self, bundle: Bundle | str | Path, *, backend: str = "auto",
                 device: str = "auto", sweeps: int = 0, max_points: int = 0,
                 precision: str = "fp16", engine_cache: str | Path | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if backend not in ("auto", *BACKENDS):
            raise ConfigError("backend", f"must be one of {['auto', *BACKENDS]}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
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
        self.backend = make_backend(backend, self.bundle, self.device, precision=precision,
                                    engine_cache=engine_cache)
        self.text_bank = self.bundle.text_bank.to(self.device)
        self.vocabulary = self.bundle.spec.vocabulary
        self._warned: set[str] = set()
        log.info("predictor: backend %s (%s), %d classes (%s)", self.backend.describe(),
                 reason, len(self.vocabulary.classes), self.vocabulary.name)

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
        self._warn_dropped(prepared)
        t1 = time.perf_counter()
        if prepared.num_points == 0:  # defined result: every key point UNKNOWN_LABEL
            features = torch.zeros(0, self.text_bank.shape[1], device=self.device)
        else:
            features = self.backend.features(prepared)
        logits = text_logits(features, self.text_bank)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        labels = scatter_to_key_frame(prepared, logits.cpu())
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                   "postprocess": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}
        return Prediction(labels, prepared, timings, features)

    def _warn_dropped(self, prepared: PreparedCloud) -> None:
        """One warning per reason the first time points are dropped; counts go per frame."""
        for reason, count in prepared.dropped.items():
            if count and reason not in self._warned:
                self._warned.add(reason)
                log.warning("predictor: dropped %d points (%s); further drops are counted in "
                            "Prediction.prepared.dropped without a warning", count, reason)
