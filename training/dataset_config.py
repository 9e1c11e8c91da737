"""How keyframes of rosbags become training samples: :class:`DatasetConfig`, its fields and checks.

The ``dataset:`` section of a training config (and ``validation.dataset``) loads into a
:class:`DatasetConfig`; :meth:`DatasetConfig.validate` names the first field out of range as a
``ConfigError``. What each field does to a sample is described in
:mod:`~clip2scene_ros.training.dataset` (sweeps, labels, SSR cells, unreadable bags),
:mod:`~clip2scene_ros.training.augmentation` (cloud and image augmentation) and
:mod:`~clip2scene_ros.training.pairs` (point–pixel pairs and the teacher join).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clip2scene_ros.bag.reader import ReaderConfig
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.bundle import InputSpec

__all__ = ["DatasetConfig", "LabelSource", "fraction_step"]

LabelSource = Literal["teacher", "ground_truth", "none"]


@dataclass(frozen=True)
class DatasetConfig:
    """How keyframes of rosbags become training samples (loadable with ``load_config``).

    Attributes:
        bags: rosbag2 directories, in order (keyframes are indexed bag by bag).
        sweeps: sweeps per sample, keyframe included (CLIP2Scene: 3). Overrides the input spec's.
        sweep_window: past sweeps the extra ones are drawn from (CLIP2Scene: 10).
        random_sweeps: draw the past sweeps at random (training); False: the most recent ones.
        require_full_sweeps: index only keyframes with ``sweeps - 1`` past sweeps in the bag.
        input_spec / bundle: the network's preprocessing, given or read from a bundle's
            ``model.yaml`` (default: ``InputSpec()``); its ``sweeps`` is set to ``sweeps``.
        reader: how to read the bags (topics, calibration, slop).
        augment: master switch of every augmentation (False: evaluation).
        rotation_range: z-rotation angle range in radians.
        flip_x / flip_y: probability of mirroring x (y) coordinates.
        scale_range: isotropic scale range.
        per_sweep_augmentation: one cloud transform per sweep (the code) instead of per sample.
        crop_size: (H, W) of the augmented images (CLIP2Scene: 224×416).
        crop_scale: crop area as a fraction of the image.
        crop_ratio: crop aspect ratio (width / height).
        hflip: probability of flipping each image horizontally.
        min_pairs / min_kept: a crop is accepted when more than ``min_pairs`` pairs or more than
            the fraction ``min_kept`` of its camera's pairs survive.
        crop_attempts: crops drawn at most per camera (the best one is kept).
        crop_labels: teacher point labels only from pairs that survive the crop (the code, where
            MaskCLIP runs on the crop); False: from every pair of the full image.
        return_images: include the augmented images ([C, 3, H, W] float in [0, 1]).
        label_source: ``teacher`` | ``ground_truth`` | ``none`` (what ``labels`` holds).
        teacher_caches: one teacher cache directory per bag (required for ``teacher``; when
            given otherwise, pairs still carry the teacher's labels and features).
        vocabulary: vocabulary file or built-in name mapping ground-truth ids to classes
            (required for ``ground_truth``; with it every sample also has ``gt_labels``).
        label_fraction: keep 1 of every ``round(1 / label_fraction)`` keyframes (label-efficient
            fine-tuning: 0.01, 0.05, 0.1, 0.25, 1.0), deterministically from the first.
        min_depth: pairs need depth above this (metres); a teacher cache imposes its own.
        cell_size: SSR grid cell size in metres (the code: 0.1).
        seed: base seed of every random draw.
        skip_bad: leave out bags that cannot be read and replace keyframes that cannot be read
            by the next readable one (see the module doc) instead of raising ``BagError``.
    """

    bags: tuple[Path, ...]
    sweeps: int = 3
    sweep_window: int = 10
    random_sweeps: bool = True
    require_full_sweeps: bool = True
    input_spec: InputSpec | None = None
    bundle: Path | None = None
    reader: ReaderConfig | None = None
    augment: bool = True
    rotation_range: tuple[float, float] = (0.0, 2.0 * math.pi)
    flip_x: float = 0.5
    flip_y: float = 0.5
    scale_range: tuple[float, float] = (0.95, 1.05)
    per_sweep_augmentation: bool = False
    crop_size: tuple[int, int] = (224, 416)
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (14.0 / 9.0, 17.0 / 9.0)
    hflip: float = 0.5
    min_pairs: int = 1024
    min_kept: float = 0.75
    crop_attempts: int = 10
    crop_labels: bool = True
    return_images: bool = True
    label_source: LabelSource = "teacher"
    teacher_caches: tuple[Path, ...] = ()
    vocabulary: str | None = None
    label_fraction: float = 1.0
    min_depth: float = 1.0
    cell_size: float = 0.1
    seed: int = 0
    skip_bad: bool = False

    def __post_init__(self) -> None:
        # Accept any sequence of str/Path (the YAML loader and callers give lists).
        object.__setattr__(self, "bags", tuple(Path(b) for b in self.bags))
        object.__setattr__(self, "teacher_caches", tuple(Path(c) for c in self.teacher_caches))

    def validate(self) -> None:
        if not self.bags:
            raise ConfigError("bags", "must name at least one bag")
        if self.sweeps < 1:
            raise ConfigError("sweeps", f"must be >= 1, got {self.sweeps}")
        if self.sweep_window < self.sweeps - 1:
            raise ConfigError("sweep_window", f"must be >= sweeps - 1 = {self.sweeps - 1}, got "
                              f"{self.sweep_window}")
        if self.input_spec is not None and self.bundle is not None:
            raise ConfigError("input_spec", "give input_spec or bundle, not both")
        for name in ("flip_x", "flip_y", "hflip", "min_kept"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, f"must lie in [0, 1], got {value}")
        for name in ("rotation_range", "scale_range", "crop_scale", "crop_ratio"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(name, f"must be (low, high) with low <= high, got {(lo, hi)}")
        if not self.scale_range[0] > 0:
            raise ConfigError("scale_range", f"must be positive, got {self.scale_range}")
        if not (self.crop_scale[0] > 0 and self.crop_scale[1] <= 1.0):
            raise ConfigError("crop_scale", f"must lie in (0, 1], got {self.crop_scale}")
        if not self.crop_ratio[0] > 0:
            raise ConfigError("crop_ratio", f"must be positive, got {self.crop_ratio}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ConfigError("crop_size", f"must be two positive ints (H, W), got "
                              f"{self.crop_size}")
        if self.crop_attempts < 1:
            raise ConfigError("crop_attempts", f"must be >= 1, got {self.crop_attempts}")
        if self.min_pairs < 0:
            raise ConfigError("min_pairs", f"must be >= 0, got {self.min_pairs}")
        if self.label_source not in ("teacher", "ground_truth", "none"):
            raise ConfigError("label_source", f"must be teacher | ground_truth | none, got "
                              f"{self.label_source!r}")
        if self.label_source == "teacher" and not self.teacher_caches:
            raise ConfigError("teacher_caches", "label_source teacher needs one cache per bag")
        if self.teacher_caches and len(self.teacher_caches) != len(self.bags):
            raise ConfigError("teacher_caches", f"needs one cache per bag: {len(self.bags)} "
                              f"bags, {len(self.teacher_caches)} caches")
        if self.label_source == "ground_truth" and self.vocabulary is None:
            raise ConfigError("vocabulary", "label_source ground_truth needs a vocabulary")
        fraction_step(self.label_fraction)
        if not self.cell_size > 0:
            raise ConfigError("cell_size", f"must be > 0, got {self.cell_size}")
        if not math.isfinite(self.min_depth):
            raise ConfigError("min_depth", f"must be finite, got {self.min_depth}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")


def fraction_step(fraction: float) -> int:
    """Keep 1 keyframe of every ``round(1 / fraction)`` (the code's ``dataset_skip_step``)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("label_fraction", f"must lie in (0, 1], got {fraction}")
    return max(1, round(1.0 / fraction))
