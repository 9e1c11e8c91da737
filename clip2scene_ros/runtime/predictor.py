"""``Predictor``: Frames in, per-point labels and scores out, behind one interface.

The node, offline evaluation and replay all go through it, so a model behaves the same
everywhere: preprocessing from the bundle's InputSpec, the network, then the text bank.
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
from ..models.spvcnn import SPVCNN
from ..preprocess import PreparedCloud, prepare_frames, to_point_tensor
from .labels import PointLabels, scatter_to_key_frame, text_logits

log = logging.getLogger(__name__)

#: Backends in the order ``auto`` prefers them where they are available.
BACKENDS = ("torch",)
PLANNED_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Prediction:
    labels: PointLabels
    prepared: PreparedCloud
    timings_ms: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} requested but no CUDA device is available")
    return torch.device(device)


def build_model(bundle: Bundle) -> SPVCNN:
    """The bundle's network with its weights; a key or shape mismatch names the keys."""
    spec = bundle.spec
    model = SPVCNN(spec.architecture, in_channels=len(spec.input.features))
    ours = model.state_dict()
    missing = sorted(set(ours) - set(bundle.state_dict))
    unexpected = sorted(set(bundle.state_dict) - set(ours))
    shapes = sorted(k for k in set(ours) & set(bundle.state_dict)
                    if ours[k].shape != bundle.state_dict[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError("model.safetensors", f"does not fit the architecture in model.yaml: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}, "
                          f"shape mismatch {shapes[:4]}", str(bundle.path))
    model.load_state_dict(bundle.state_dict)
    return model.eval()


class Predictor:
    """Labels every point of a key frame (plus its past sweeps, when the bundle uses them).

    Args:
        bundle: the model bundle (or a path to one).
        backend: ``auto`` or one of :data:`BACKENDS`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch backend).
        sweeps / max_points: override the bundle's preprocessing when > 0 (sweeps can only be
            lowered: a model trained on 3 sweeps can run on 1 when poses are missing).
    """

    def __init__(self, bundle: Bundle | str | Path, *, backend: str = "auto",
                 device: str = "auto", sweeps: int = 0, max_points: int = 0) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if backend in PLANNED_BACKENDS:
            raise ConfigError("backend", f"{backend!r} is not available in this release; "
                              f"use one of {['auto', *BACKENDS]}")
        if backend not in ("auto", *BACKENDS):
            raise ConfigError("backend", f"must be one of {['auto', *BACKENDS]}, got {backend!r}")
        self.backend = "torch"
        self.device = resolve_device(device)
        spec = self.bundle.spec.input
        if sweeps > spec.sweeps:
            raise ConfigError("sweeps", f"{sweeps} > the {spec.sweeps} the model was trained on")
        self.input_spec = replace(spec, sweeps=sweeps or spec.sweeps,
                                  max_points=max_points or spec.max_points)
        self.model = build_model(self.bundle).to(self.device)
        self.text_bank = self.bundle.text_bank.to(self.device)
        self.vocabulary = self.bundle.spec.vocabulary
        log.info("predictor: backend %s on %s, %d classes (%s)", self.backend, self.device,
                 len(self.vocabulary.classes), self.vocabulary.name)

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
        t1 = time.perf_counter()
        if prepared.num_points == 0:
            logits = torch.zeros(0, len(self.vocabulary.classes))
        else:
            z = to_point_tensor([prepared], self.device)
            logits = text_logits(self.model.text_features(z), self.text_bank)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        labels = scatter_to_key_frame(prepared, logits.cpu())
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                   "postprocess": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}
        return Prediction(labels, prepared, timings)
