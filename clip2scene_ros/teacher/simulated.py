"""A simulated MaskCLIP teacher: ground-truth point labels degraded as MaskCLIP degrades them.

It lets the distillation that follows the teacher (SCR, SSR, S3, sweeps) be measured without
CLIP weights, with a teacher whose errors are defined here. It writes exactly the cache the
MaskCLIP teacher writes (``teacher/cache.py``), so the trainer cannot tell the two apart; the
cache index records the spec under ``teacher.simulated`` and every reader logs once that the
labels were simulated from ground truth.

The noise model (``SimulationSpec``, fields of ``config/teachers/*.yaml``):

* **resolution**: each camera image, resized to ``image_size`` (224×416), is cut into
  ``patch_size`` patches (ViT-B/16: a 14×26 grid). Every pair in a patch takes the patch's
  majority ground-truth class over the frame's labelled pairs in it (ties: the lowest class
  index); a patch without a labelled pair labels nothing, so its pairs are left out. Boundaries
  bleed, and thin things vanish where they do not dominate a patch.
* **confusion**: each (frame, camera, patch) label is replaced, with ``confusion.probability``,
  by a class drawn uniformly from its ``confusion.sets`` entry (a class without one is kept).
* **confidence**: pairs of kept patches draw from Beta(``confidence.kept``), those of replaced
  ones from Beta(``confidence.replaced``).
* **features**: the L2-normalised sum of the label's text-bank row and Gaussian noise whose
  expected norm is ``features.noise_norm``.

Random draws come from a generator seeded by the bag's content key, the spec and the frame
index, so a rerun, or a resumed run, writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from math import exp, lgamma, sqrt
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import load_config, to_dict
from ..errors import ConfigError
from ..frame import Frame
from ..vocabulary import Vocabulary, config_dir, names_a_file

if TYPE_CHECKING:
    from .labeller import FrameResult

log = logging.getLogger(__name__)

#: Where the shipped specs live; a bare name resolves to ``config/teachers/NAME.yaml``.
SPEC_DIR = "teachers"


@dataclass(frozen=True)
class ConfusionSpec:
    """Which class a replaced patch label may become, and how often."""

    probability: float = 0.35
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError("probability", f"must lie in [0, 1], got {self.probability}")


@dataclass(frozen=True)
class ConfidenceSpec:
    """Beta(a, b) parameters of the confidence of kept and of replaced labels."""

    kept: tuple[float, float] = (4.0, 2.0)
    replaced: tuple[float, float] = (2.0, 2.0)

    def validate(self) -> None:
        for name in ("kept", "replaced"):
            a, b = getattr(self, name)
            if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
                raise ConfigError(name, f"Beta parameters must be positive, got {[a, b]}")


@dataclass(frozen=True)
class FeatureSpec:
    """The dense feature of a pair: its label's text row plus noise of this expected norm."""

    noise_norm: float = 0.5

    def validate(self) -> None:
        if not (self.noise_norm >= 0 and np.isfinite(self.noise_norm)):
            raise ConfigError("noise_norm", f"must be a finite value >= 0, got {self.noise_norm}")


@dataclass(frozen=True)
class SimulationSpec:
    """A simulated teacher (see the module doc for each field's meaning)."""

    name: str
    vocabulary: str
    image_size: tuple[int, int] = (224, 416)
    patch_size: tuple[int, int] = (16, 16)
    min_depth: float = 1.0
    confusion: ConfusionSpec = field(default_factory=ConfusionSpec)
    confidence: ConfidenceSpec = field(default_factory=ConfidenceSpec)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    description: str = ""

    def validate(self) -> None:
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ConfigError(name, f"must be two positive ints (H, W), got {list(value)}")
        (h, w), (ph, pw) = self.image_size, self.patch_size
        if h % ph or w % pw:
            raise ConfigError("image_size", f"{h}x{w} must be a multiple of the {ph}x{pw} patch")
        if not self.min_depth >= 0:
            raise ConfigError("min_depth", f"must be >= 0, got {self.min_depth}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns of a resized image (14×26 for ViT-B/16 at 224×416)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    def fingerprint(self) -> str:
        text = json.dumps(to_dict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_spec_path(spec: str | Path) -> Path:
    """A spec file, or the name of one shipped in ``config/teachers/``."""
    path = Path(spec)
    if path.is_file():
        return path
    if names_a_file(path):
        raise ConfigError("simulate", f"teacher spec file {str(spec)!r} does not exist")
    shipped = config_dir() / SPEC_DIR / f"{spec}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in (config_dir() / SPEC_DIR).glob("*.yaml"))
        raise ConfigError("simulate", f"no teacher spec {str(spec)!r}; shipped ones: {names}")
    return shipped


def load_spec(spec: str | Path) -> SimulationSpec:
    return load_config(SimulationSpec, resolve_spec_path(spec))


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec checked against its vocabulary: class sets as indices, label ids as a table."""

    spec: SimulationSpec
    vocabulary: Vocabulary
    confusion: tuple[tuple[int, ...], ...]  # per class index, the classes it may become
    source: str

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.vocabulary.names)


def resolve(spec: SimulationSpec, source: str = "") -> ResolvedSpec:
    """Check the spec (values, and class names against its vocabulary); errors name the field."""
    from .text_bank import resolve_vocabulary

    spec.validate()
    for name in ("confusion", "confidence", "features"):
        try:
            getattr(spec, name).validate()
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc.key}", exc.reason, source or None) from None

    try:
        vocabulary = resolve_vocabulary(spec.vocabulary)
    except ConfigError as exc:
        raise ConfigError("vocabulary", exc.reason, source or None) from None
    index = {name: i for i, name in enumerate(vocabulary.names)}
    sets: list[tuple[int, ...]] = [() for _ in vocabulary.names]
    for name, targets in spec.confusion.sets.items():
        if name not in index:
            raise ConfigError(f"confusion.sets.{name}", f"class {name!r} is not in the "
                              f"vocabulary {vocabulary.name!r} ({vocabulary.names})",
                              source or None)
        for target in targets:
            if target not in index:
                raise ConfigError(f"confusion.sets.{name}", f"class {target!r} is not in the "
                                  f"vocabulary {vocabulary.name!r} ({vocabulary.names})",
                                  source or None)
        sets[index[name]] = tuple(index[t] for t in targets)
    return ResolvedSpec(spec, vocabulary, tuple(sets), source)


def frame_seed(content_key: str, spec_fingerprint: str, frame_index: int) -> int:
    """The seed of one frame's draws: bag content, spec and frame, nothing else."""
    digest = hashlib.sha256(f"{content_key}\0{spec_fingerprint}\0{frame_index}".encode())
    return int.from_bytes(digest.digest()[:8], "little")


@dataclass
class PatchLabels:
    """One camera's simulated labels: per pair, and which patch labels were replaced."""

    keep: np.ndarray  # (M,) bool: the pair's patch has a label
    label: np.ndarray  # (K,) int64 class of each kept pair
    replaced: np.ndarray  # (K,) bool: the kept pair's patch label was confused


def patch_labels(pixels: np.ndarray, truth: np.ndarray, resolved: ResolvedSpec,
                 rng: np.random.Generator) -> PatchLabels:
    """Majority class per patch, then confusion, for one camera's pairs.

    ``pixels`` is (M, 2) (col, row) in the resized image, ``truth`` (M,) the class index of each
    pair's point (-1: unlabelled). One uniform and one set position are drawn for every patch of
    the grid in row-major order, used or not, so a patch's draw does not depend on the others.
    """
    rows, cols = resolved.spec.grid
    ph, pw = resolved.spec.patch_size
    classes = len(resolved.vocabulary.classes)
    patch = (pixels[:, 1] // ph) * cols + pixels[:, 0] // pw
    labelled = truth >= 0
    counts = np.bincount(patch[labelled] * classes + truth[labelled],
                         minlength=rows * cols * classes).reshape(rows * cols, classes)
    majority = np.where(counts.any(axis=1), counts.argmax(axis=1), -1)  # argmax: lowest on ties
    flip = rng.random(rows * cols) < resolved.spec.confusion.probability
    pick = rng.random(rows * cols)
    replaced = np.zeros(rows * cols, bool)
    label = majority.copy()
    for p in np.flatnonzero(flip & (majority >= 0)):
        targets = resolved.confusion[int(majority[p])]
        if targets:
            label[p] = targets[min(int(pick[p] * len(targets)), len(targets) - 1)]
            replaced[p] = True
    per_pair = label[patch]
    keep = per_pair >= 0
    return PatchLabels(keep, per_pair[keep], replaced[patch[keep]])


class SimulatedTeacher:
    """Labels frames for the teacher cache from their ground truth (see the module doc).

    ``bank`` ([C, D] unit rows, vocabulary order) is needed only for features.
    """

    def __init__(self, resolved: ResolvedSpec, content_key: str, bank: torch.Tensor | None,
                 store_features: bool) -> None:
        if store_features and bank is None:
            raise ConfigError("features", "the simulated teacher needs a text bank for features")
        self.resolved = resolved
        self.content_key = content_key
        self.fingerprint = resolved.spec.fingerprint()
        self.store_features = store_features
        self.bank = None if bank is None else bank.detach().to("cpu", torch.float32).numpy()
        self.bank_sha256 = (None if self.bank is None
                            else hashlib.sha256(self.bank.tobytes()).hexdigest())

    def truth(self, frame: Frame) -> np.ndarray:
        """(N,) class index of each point (-1 where unlabelled); refuses a frame without labels."""
        if frame.labels is None:
            raise ConfigError("bag", f"frame {frame.index} (stamp {frame.stamp_ns}) has no "
                              "ground-truth labels: the simulated teacher degrades ground truth, "
                              "so it needs a labelled bag")
        return self.resolved.vocabulary.map_labels(frame.labels)

    def label(self, frame: Frame) -> FrameResult:
        """The frame's cache tensors and skipped cameras, as the MaskCLIP teacher gives them."""
        from .labeller import frame_result, scale_pixels, view_pairs

        spec = self.resolved.spec
        if len(frame.cameras) > 255:  # the cache stores camera positions as uint8
            raise ValueError(f"frame {frame.index} has {len(frame.cameras)} cameras; at most 255")
        truth = self.truth(frame)
        rng = np.random.default_rng(frame_seed(self.content_key, self.fingerprint, frame.index))
        skipped: list[tuple[str, str]] = []
        points, cams, labels, confs, feats = [], [], [], [], []
        for c, view in enumerate(frame.cameras):
            # Every camera consumes its draws, so one camera's problem leaves the others' alone.
            cam_rng = np.random.default_rng(rng.integers(0, 2**63))
            pairs, reason = view_pairs(frame, view, spec.patch_size, spec.min_depth)
            if pairs is None:
                skipped.append((view.name, reason))
                continue
            px = scale_pixels(pairs.uv, view.image.shape[:2], spec.image_size)
            sim = patch_labels(px, truth[pairs.point_index], self.resolved, cam_rng)
            a, b = np.where(sim.replaced[:, None], spec.confidence.replaced,
                            spec.confidence.kept).T
            conf = cam_rng.beta(a, b) if sim.label.size else np.zeros(0)
            points.append(pairs.point_index[sim.keep].astype(np.int32))
            cams.append(np.full(sim.label.size, c, np.uint8))
            labels.append(sim.label.astype(np.uint16))
            confs.append(conf.astype(np.float16))
            if self.store_features:
                feats.append(self._features(sim.label, cam_rng))
        dim = 0 if self.bank is None else int(self.bank.shape[1])
        return frame_result(frame.index, points, cams, labels, confs,
                            feats if self.store_features else None, dim, skipped)

    def _features(self, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        assert self.bank is not None
        dim = self.bank.shape[1]
        # E|g| for g ~ N(0, s^2 I_D) is s * sqrt(2) * Gamma((D+1)/2) / Gamma(D/2) ~ s * sqrt(D);
        # the exact constant keeps the expected norm at noise_norm for small D too.
        chi_mean = sqrt(2.0) * exp(lgamma((dim + 1) / 2) - lgamma(dim / 2))
        sigma = self.resolved.spec.features.noise_norm / chi_mean
        out = self.bank[label] + rng.normal(0.0, sigma, (label.size, dim))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float16)
