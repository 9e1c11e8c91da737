"""Training samples from rosbags: keyframes, sweeps, augmentation, teacher labels and pairs.

One :class:`BagSceneDataset` item is one *keyframe* of a bag, prepared as CLIP2Scene's dataloader
does (reference ``clip2scene.md`` §1.7, §3.3):

* **Sweeps.** The keyframe plus ``sweeps - 1`` sweeps drawn at random from the ``sweep_window``
  sweeps before it (the most recent ones with ``random_sweeps=False``), moved into the keyframe's
  LiDAR frame by ego motion (``merge_sweeps``). With ``require_full_sweeps`` (default) keyframes
  with fewer past sweeps (the first ``sweeps - 1`` of a bag) are not indexed; without it they
  come with the sweeps there are. A past sweep without a pose cannot be merged and is left out.
* **Cloud augmentation.** ``p' = s · F · R_z(θ) · p`` on the merged keyframe-frame coordinates:
  θ ~ U(rotation_range), F flips x and y with probability ``flip_x`` / ``flip_y``, s ~
  U(scale_range). One draw for the whole sample, or one per sweep (``per_sweep_augmentation``, the
  code's layout, where each sweep is a separate sub-cloud: :func:`collate` then gives every sweep
  its own batch index, since S differently rotated copies overlaid in one cloud mean nothing).
  The augmented sweeps go through :func:`~clip2scene_ros.preprocess.prepare_frames`, THE one
  preprocessing path (DESIGN rule 4), so features, scaling and filtering equal the node's.
* **Images.** Per camera of the keyframe a random resized crop (area ``crop_scale``, aspect
  ``crop_ratio`` = w/h, torchvision's algorithm) resized to ``crop_size`` and a horizontal flip
  (``hflip``). The pairs' pixel coordinates are remapped exactly (pixel-edge convention, as the
  bilinear ``align_corners=False`` resize preserves); pairs outside the crop are dropped. A crop
  is redrawn up to ``crop_attempts`` times until more than ``min_pairs`` pairs or more than
  ``min_kept`` of them survive (the code retries forever; we keep the best draw). Without
  augmentation the whole image is resized (the code's validation transform).
* **Labels.** ``label_source="teacher"``: each paired key-frame point takes the MaskCLIP label of
  its most confident surviving pair from the teacher cache (``-1`` elsewhere, including every
  past-sweep point: the cache labels the keyframe's pairs only). ``"ground_truth"``: the
  recording's labels mapped to class indices by ``vocabulary``. ``"none"``: all ``-1``.
* **SSR cells** (``grid_cells``) come from the merged sweeps *before* augmentation, as the code's
  ``inverse_indexes_merged``: per-sweep rotations would otherwise scatter one physical cell.

Randomness comes from ``SeedSequence([seed, epoch, index])`` split into independent streams
(sweeps, cloud, images, subsampling), so a sample depends only on those three numbers: it is the
same in any worker, in any order, after a resume (call :meth:`BagSceneDataset.set_epoch` before
each epoch's iterator is created; persistent workers keep the epoch they were started with).

Reading cost: ``BagReader.frames`` streams its bag from the start on every call, so an item reads
its bag once (one call for the keyframe and its window, decoding the window's images too, rather
than one pass per sweep). Split very long recordings into several bags.

**Unreadable bags.** A bag that cannot be opened or indexed (truncated or corrupt storage file),
or a keyframe whose messages cannot be read or decoded, raises :class:`~clip2scene_ros.errors.
BagError` (a ``ConfigError``) naming the bag and where it broke: the storage file, and the topic,
message position and log time of the last message read, as far as they can be found. With
``skip_bad`` such a bag is left out when the dataset is built, and an unreadable keyframe is
replaced by the next readable one in item order (wrapping around; the augmentation still drawn
from the item's own seed), a rule that depends on the data only, so every worker, rank and
resumed run makes the same choice. Every skip is logged once per bag, recorded in
:attr:`BagSceneDataset.bad` and carried by the sample (``Sample.replaced``), so the trainer can
report it whichever worker read it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError
from rosbags.typesys import Stores, get_typestore
from torch.utils.data import Dataset

from clip2scene_ros.bag.reader import BagReader, ReaderConfig
from clip2scene_ros.errors import BagError, ConfigError
from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.correspondence import PointPixelPairs, point_pixel_pairs
from clip2scene_ros.geometry.ego_motion import merge_sweeps, select_sweeps
from clip2scene_ros.models.bundle import InputSpec, load_spec
from clip2scene_ros.preprocess import PreparedCloud, prepare_frames
from clip2scene_ros.teacher.cache import TeacherCache, TeacherLabels
from clip2scene_ros.teacher.labeller import resize_images
from clip2scene_ros.teacher.store import bag_content_key
from clip2scene_ros.training.losses import grid_cells
from clip2scene_ros.vocabulary import Vocabulary, builtin_vocabulary, load_vocabulary, names_a_file

__all__ = [
    "BagSceneDataset",
    "CropFlip",
    "DatasetConfig",
    "Sample",
    "collate",
    "fraction_step",
    "random_resized_crop_params",
]

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------ images


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: np.random.Generator,
                               attempts: int = 10) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``.

    Area ~ U(scale) · H · W and aspect (w / h) log-uniform in ``ratio``; after ``attempts``
    misfits the largest centred crop with the aspect clamped into ``ratio``. Written with a numpy
    Generator (torchvision draws from torch's global RNG, which would break reproducibility).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, max(1, round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropFlip:
    """A crop box of the original image, resized to ``out`` (H, W), optionally mirrored.

    Pixel ``i`` spans ``[i, i + 1)``; continuous ``x`` in the original maps to
    ``(x - left) · W_out / w`` (mirrored: ``W_out - that``), which is what a bilinear
    ``align_corners=False`` resize of the crop does to the image.
    """

    top: int
    left: int
    height: int
    width: int
    out: tuple[int, int]
    flip: bool = False

    def apply(self, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(uv_out [M', 2] float32, pixel_out [M', 2] int64 (col, row), keep [M] bool)``."""
        x = uv[:, 0].astype(np.float64) - self.left
        y = uv[:, 1].astype(np.float64) - self.top
        keep = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
        out_h, out_w = self.out
        u = x[keep] * (out_w / self.width)
        v = y[keep] * (out_h / self.height)
        col = np.clip(np.floor(u), 0, out_w - 1).astype(np.int64)
        row = np.clip(np.floor(v), 0, out_h - 1).astype(np.int64)
        if self.flip:
            # The mirrored image puts column c at W-1-c; continuous u goes to W-u.
            u = out_w - u
            col = out_w - 1 - col
        uv_out = np.stack([u, v], axis=1).astype(np.float32)
        return uv_out, np.stack([col, row], axis=1), keep

    def image(self, image: np.ndarray) -> torch.Tensor:
        """``(H0, W0, 3)`` uint8 → ``[3, H_out, W_out]`` float32 in [0, 1]."""
        crop = image[self.top:self.top + self.height, self.left:self.left + self.width]
        # the teacher's resize (bilinear, antialiased), so the crop looks as the teacher saw it
        out = resize_images([crop], self.out)[0]
        return out.flip(-1) if self.flip else out

    def as_row(self) -> list[int]:
        return [self.top, self.left, self.height, self.width, int(self.flip)]


# ------------------------------------------------------------------------------------ sample


@dataclass
class Sample:
    """One prepared keyframe. Rows ``[N]`` are points of the prepared cloud, ``[M]`` pairs.

    Attributes:
        index / epoch: the dataset item and epoch it was drawn for (its seed).
        bag / frame_index / stamp_ns: the keyframe (bag position in the config, ``Frame.index``).
        sweep_frames: ``Frame.index`` of each merged sweep, keyframe first (sweep id order).
        coords: [N, 3] float32 augmented coordinates in voxel units (``PreparedCloud.coords``).
        feats: [N, F] float32 network input features.
        source: [N] int64 row in the merged sweeps (``< key_points``: the key Frame's row).
        sweep: [N] uint8 sweep id (0 = keyframe).
        key_points: points of the key Frame.
        xyz_raw: [N, 3] float32 merged coordinates before augmentation (keyframe LiDAR frame).
        point_transforms: [S, 3, 3] float64 augmentation of each sweep: ``coords · voxel =
            xyz_raw @ A[sweep].T``.
        labels: [N] int64 training targets (see ``DatasetConfig.label_source``), -1 = none.
        confidence: [N] float32 confidence of ``labels`` (teacher softmax; 1 for ground truth).
        gt_labels: [N] int64 ground truth as class indices (-1 = unlabelled), or None.
        cell_index: [N] int64 SSR cell (dense ids within the sample), -1 for none.
        pixel_feats: [N, D] float32 teacher feature of the point's label pair (0 elsewhere), or
            None when the cache stores no features.
        pair_point: [M] int64 row of the pair's point in this sample (always a keyframe point).
        pair_camera: [M] int64 camera position in ``camera_names``.
        pair_uv: [M, 2] float32 continuous (u, v) in the augmented image.
        pair_pixel: [M, 2] int64 (col, row) in the augmented image.
        pair_label / pair_confidence: [M] teacher label (-1 if none) and confidence.
        pair_feats: [M, D] float32 teacher features, or None.
        camera_names: the keyframe's cameras.
        crops: [C, 5] int64 ``(top, left, height, width, flip)`` per camera, in original pixels.
        image_sizes: [C, 2] int64 original (H, W).
        images: [C, 3, H, W] float32 in [0, 1], or None (``return_images=False``).
        sweeps_independent: sweeps were augmented independently (collate splits them).
        dropped: points ``prepare_frames`` removed, by reason.
        replaced: ``(keyframe, reason)`` of the unreadable keyframes this sample stands in for
            (``skip_bad``; the keyframe named as in ``BagSceneDataset.bad``).
    """

    index: int
    epoch: int
    bag: int
    frame_index: int
    stamp_ns: int
    sweep_frames: tuple[int, ...]
    coords: np.ndarray
    feats: np.ndarray
    source: np.ndarray
    sweep: np.ndarray
    key_points: int
    xyz_raw: np.ndarray
    point_transforms: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    gt_labels: np.ndarray | None
    cell_index: np.ndarray
    pixel_feats: np.ndarray | None
    pair_point: np.ndarray
    pair_camera: np.ndarray
    pair_uv: np.ndarray
    pair_pixel: np.ndarray
    pair_label: np.ndarray
    pair_confidence: np.ndarray
    pair_feats: np.ndarray | None
    camera_names: tuple[str, ...]
    crops: np.ndarray
    image_sizes: np.ndarray
    images: torch.Tensor | None
    sweeps_independent: bool = False
    dropped: dict[str, int] = field(default_factory=dict)
    replaced: tuple[tuple[str, str], ...] = ()

    @property
    def num_points(self) -> int:
        return int(self.coords.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.pair_point.shape[0])


# ------------------------------------------------------------------------------------ dataset


def _resolve_vocabulary(name_or_path: str) -> Vocabulary:
    path = Path(name_or_path)
    if not path.is_file():
        if names_a_file(path):
            raise ConfigError("vocabulary", f"vocabulary file {name_or_path!r} does not exist")
        try:
            path = builtin_vocabulary(name_or_path)
        except FileNotFoundError as exc:
            raise ConfigError("vocabulary", str(exc)) from exc
    return load_vocabulary(path)


def _rotation_z(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


#: Errors of reading a bag's storage. Anything else (a decompressor's own error, say) counts as
#: the bag's only when re-reading its raw messages fails too (_locate_read_error); otherwise it
#: is a bug and propagates.
_READ_ERRORS = (ValueError, OSError, EOFError, struct.error, AnyReaderError, ReaderError)


def _storage_files(bag: Path) -> str:
    """The bag's storage files and their sizes, for messages."""
    try:
        meta = yaml.safe_load((bag / "metadata.yaml").read_text(encoding="utf-8")) or {}
        names = [str(n) for n in meta["rosbag2_bagfile_information"]["relative_file_paths"]]
    except Exception:  # a message helper: any unreadable metadata
        names = sorted(p.name for p in bag.glob("*") if p.name != "metadata.yaml")
    parts = []
    for name in names:
        path = bag / name
        parts.append(f"{path} ({path.stat().st_size} bytes)" if path.is_file()
                     else f"{path} (missing)")
    return ", ".join(parts) or f"{bag} (no storage file)"


def _locate_read_error(bag: Path, typestore: str, *, start: int | None = None,
                       stop: int | None = None, first: Mapping[str, int] | None = None
                       ) -> tuple[str, str] | None:
    """``(where, cause)`` of the first failure reading ``bag``'s raw messages, or None.

    ``where`` is ``opening FILES`` when the storage cannot be opened, else the topic, position in
    the topic and log time of the last message read before it broke. Only log times in
    ``[start, stop)`` are read; ``first`` gives each topic's position at ``start`` (and limits
    the read to those topics).
    """
    files = _storage_files(bag)
    try:
        reader = AnyReader([bag], default_typestore=get_typestore(Stores(typestore)))
        reader.open()
    except Exception as exc:  # whatever the storage raises is the answer
        return f"opening {files}", f"{type(exc).__name__}: {exc}"
    seen: Counter[str] = Counter(first or {})
    last: tuple[str, int, int] | None = None
    try:
        conns = [c for c in reader.connections if first is None or c.topic in first]
        for conn, log_ns, _ in reader.messages(connections=conns, start=start, stop=stop):
            last = (conn.topic, seen[conn.topic], log_ns)
            seen[conn.topic] += 1
    except Exception as exc:
        after = (f"after message {last[1]} of topic {last[0]} (log time {last[2]} ns)"
                 if last is not None else "at its first message"
                 + (f" from log time {start} ns" if start is not None else ""))
        return f"reading {files} {after}", f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            reader.close()
    return None


class BagSceneDataset(Dataset[Sample]):
    """Keyframes of one or more bags as :class:`Sample` s (see the module doc).

    Attributes:
        keyframes: ``(bag position, Frame.index)`` of every item, in item order.
        input_spec: the effective preprocessing (its ``sweeps`` = ``config.sweeps``); write it
            into the bundle the trainer produces.
        skipped: keyframes left out of the index, by reason (``too_few_sweeps``,
            ``not_in_teacher_cache``, ``no_ground_truth``, ``label_fraction``), and
            ``unreadable_bag``: bags left out (``skip_bad``).
        bad: what ``skip_bad`` left out, ``{name: reason}``: a bag by its path, a keyframe as
            ``"PATH frame N"`` (keyframes as this process found them; see ``Sample.replaced``).
        vocabulary: the ground-truth vocabulary, or None.
    """

    def __init__(self, config: DatasetConfig) -> None:
        config.validate()
        self.config = config
        spec = config.input_spec
        if spec is None:
            spec = load_spec(config.bundle).input if config.bundle is not None else InputSpec()
        # The dataset decides how many sweeps it merges; prepare_frames would silently truncate
        # to the spec's count otherwise.
        self.input_spec = replace(spec, sweeps=config.sweeps)
        self.input_spec.validate()
        self.vocabulary = (None if config.vocabulary is None
                           else _resolve_vocabulary(config.vocabulary))
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self.bad: dict[str, str] = {}
        self._unreadable: dict[int, tuple[str, str]] = {}  # item -> (keyframe, reason)
        self._logged: set[int] = set()  # bags whose bad keyframes were logged
        # BagReader pickles with its index, so DataLoader workers do not re-index the bags.
        self._readers = [BagReader(bag, config.reader) for bag in config.bags]
        self._bad_bags: set[int] = set()
        for b in range(len(self._readers)):
            try:
                self._index_bag(b)
            except BagError as exc:
                if not config.skip_bad:
                    raise
                self._bad_bags.add(b)
                self.bad[str(config.bags[b])] = f"{exc.where}: {exc.cause}"
                self.skipped["unreadable_bag"] += 1
                log.warning("dataset: skipping bag %s (%s: %s)", config.bags[b], exc.where,
                            exc.cause)
        self._caches = [TeacherCache(c) for c in config.teacher_caches]
        self._check_caches()
        self._stamps: list[np.ndarray] = []
        candidates: list[tuple[int, int]] = []
        for b, reader in enumerate(self._readers):
            if b in self._bad_bags:
                self._stamps.append(np.zeros(0, np.int64))
                continue
            plans = reader.index.plans
            stamps = np.array([p.stamp_ns for p in plans], np.int64)
            if np.any(np.diff(stamps) <= 0):
                raise ConfigError("bags", f"{config.bags[b]}: LiDAR stamps are not strictly "
                                  "increasing; sweeps cannot be ordered")
            self._stamps.append(stamps)
            for k, plan in enumerate(plans):
                reason = self._ineligible(b, k, plan.index, plan.label is not None)
                if reason is None:
                    candidates.append((b, plan.index))
                else:
                    self.skipped[reason] += 1
        step = fraction_step(config.label_fraction)
        self.keyframes: list[tuple[int, int]] = candidates[::step]
        self.skipped["label_fraction"] = len(candidates) - len(self.keyframes)
        # Frame.index -> position among the bag's plans (they coincide unless a reader skips).
        self._position = [{} if b in self._bad_bags else
                          {p.index: k for k, p in enumerate(r.index.plans)}
                          for b, r in enumerate(self._readers)]

    def _typestore(self) -> str:
        return (self.config.reader or ReaderConfig()).typestore

    def _index_bag(self, b: int) -> None:
        """Index bag ``b`` (BagReader's first pass); BagError naming where it cannot be read."""
        reader = self._readers[b]
        try:
            reader.index  # noqa: B018 (reads the bag on first use)
        except ConfigError:
            raise  # topics, calibration: the configuration, not the bag
        except Exception as exc:
            found = _locate_read_error(reader.path, self._typestore())
            if found is None and not isinstance(exc, _READ_ERRORS):
                raise
            where, cause = found or ("indexing", f"{type(exc).__name__}: {exc}")
            raise BagError(str(self.config.bags[b]), where, cause) from exc

    def _check_caches(self) -> None:
        for b, cache in enumerate(self._caches):
            if b in self._bad_bags:
                continue
            bag_key = cache.source.get("bag")
            # A cache built from the bag records its content key; one from run_teacher_on_frames
            # has a caller-given key that cannot be checked.
            if bag_key is not None and bag_key != bag_content_key(self.config.bags[b]):
                raise ConfigError("teacher_caches", f"{cache.path} was computed from another bag "
                                  f"than {self.config.bags[b]}")
            if (self.config.label_source == "teacher" and self.vocabulary is not None
                    and tuple(self.vocabulary.names) != cache.class_names):
                raise ConfigError("vocabulary", f"the teacher cache {cache.path} labels classes "
                                  f"{list(cache.class_names)}, the vocabulary has "
                                  f"{self.vocabulary.names}: ground truth and teacher labels "
                                  "would index different classes")

    def _ineligible(self, bag: int, position: int, frame_index: int, has_gt: bool) -> str | None:
        cfg = self.config
        if cfg.require_full_sweeps and position < cfg.sweeps - 1:
            return "too_few_sweeps"
        if cfg.label_source == "teacher" and frame_index not in self._caches[bag]:
            return "not_in_teacher_cache"
        if cfg.label_source == "ground_truth" and not has_gt:
            return "no_ground_truth"
        return None

    def __len__(self) -> int:
        return len(self.keyframes)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch`` (call before creating the epoch's iterator)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    # -------------------------------------------------------------------------- reading

    def _frames(self, bag: int, frame_index: int, rng: np.random.Generator) -> list[Frame]:
        """The keyframe, then its past sweeps newest first (those that could be read)."""
        cfg = self.config
        k = self._position[bag][frame_index]
        stamps = self._stamps[bag]
        positions = select_sweeps(stamps, k, cfg.sweeps, cfg.sweep_window,
                                  rng=rng if cfg.random_sweeps else None)
        reader = self._readers[bag]
        index = reader.index
        plans = index.plans
        wanted = [plans[p].index for p in positions]
        lidar = index.topics.lidar
        log_ns = index.log_ns.get(lidar)
        at = f", log time {int(log_ns[frame_index])} ns" if log_ns is not None else ""
        keyframe = (f"keyframe {frame_index} (message {frame_index} of topic {lidar}, stamp "
                    f"{plans[k].stamp_ns} ns{at})")
        try:
            got = {f.index: f for f in reader.frames(min(wanted), frame_index + 1)
                   if f.index in wanted}
        except ConfigError:
            raise
        except Exception as exc:
            # where in the bag: re-read the span of log times this keyframe's messages lie in
            needs = [key for p in positions for key in plans[p].needs(index.topics)]
            times = [int(index.log_ns[t][i]) for t, i in needs if t in index.log_ns]
            start = min(times) if times else None
            first = ({t: int(np.searchsorted(v, start, "left")) for t, v in index.log_ns.items()}
                     if start is not None else None)
            found = _locate_read_error(reader.path, self._typestore(), start=start,
                                       stop=max(times) + 1 if times else None, first=first)
            if found is None and not isinstance(exc, _READ_ERRORS):
                raise
            where, cause = found or ("", f"{type(exc).__name__}: {exc}")
            raise BagError(str(cfg.bags[bag]), f"{keyframe}{', ' if where else ''}{where}",
                           cause) from exc
        if frame_index not in got:
            raise BagError(str(cfg.bags[bag]), keyframe, "its LiDAR message cannot be decoded "
                           f"(BagReader.skipped: {dict(reader.skipped)})")
        key = got[frame_index]
        frames = [key]
        if key.pose is not None:
            # merge_sweeps needs every pose; a sweep the reader dropped or without a pose is
            # left out rather than failing the sample.
            frames += [got[i] for i in wanted[1:] if i in got and got[i].pose is not None]
        return frames

    # -------------------------------------------------------------------------- item

    def keyframe_name(self, item: int) -> str:
        """``"PATH frame N"``: item ``item``'s keyframe as ``bad`` names it."""
        bag, frame_index = self.keyframes[item]
        return f"{self.config.bags[bag]} frame {frame_index}"

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} keyframes")
        replaced: list[tuple[str, str]] = []
        # skip_bad: the next readable keyframe in item order (a rule of the data alone, so every
        # worker, rank and resumed run picks the same one; the item's own seed draws it).
        for step in range(len(self)):
            item = (index + step) % len(self)
            if item in self._unreadable:
                replaced.append(self._unreadable[item])
                continue
            try:
                return self._sample(index, item, tuple(replaced))
            except BagError as exc:
                if not self.config.skip_bad:
                    raise
                entry = (self.keyframe_name(item), f"{exc.where}: {exc.cause}")
                self._unreadable[item] = entry
                self.bad[entry[0]] = entry[1]
                replaced.append(entry)
                bag = self.keyframes[item][0]
                if bag not in self._logged:
                    self._logged.add(bag)
                    log.warning("dataset: skipping unreadable keyframes of %s (first: %s; "
                                "further ones are not logged)", self.config.bags[bag], entry[1])
        raise BagError(str(self.config.bags[self.keyframes[index][0]]), "every keyframe",
                       "no keyframe of the dataset can be read (skip_bad)")

    def _sample(self, index: int, item: int, replaced: tuple[tuple[str, str], ...]) -> Sample:
        """Item ``index``'s sample (its seed) from the keyframe of item ``item``."""
        cfg = self.config
        bag, frame_index = self.keyframes[item]
        seq = np.random.SeedSequence([cfg.seed, self.epoch, index])
        # Independent streams: switching images off does not change the cloud's augmentation.
        rng_sweeps, rng_cloud, rng_images, rng_subsample = (
            np.random.default_rng(s) for s in seq.spawn(4))

        frames = self._frames(bag, frame_index, rng_sweeps)
        key = frames[0]
        if len(frames) > 1:
            raw, sweep_of_raw, _ = merge_sweeps(frames, key=0)
        else:
            raw = key.xyz.astype(np.float32, copy=False)
            sweep_of_raw = np.zeros(len(raw), np.uint8)
        transforms = self._cloud_transforms(len(frames), rng_cloud)
        augmented = np.empty_like(raw)
        for s in range(len(frames)):
            rows = sweep_of_raw == s
            augmented[rows] = (raw[rows].astype(np.float64) @ transforms[s].T).astype(np.float32)
        # Augment after ego-motion compensation (the code rotates each sweep in the keyframe's
        # frame), then hand prepare_frames sweeps already in that frame: identity poses make
        # its merge an exact no-op, and features/scaling/filtering stay the one shared path.
        counts = np.cumsum([0, *(f.num_points for f in frames)])
        moved = [replace(f, xyz=augmented[counts[s]:counts[s + 1]], pose=np.eye(4))
                 for s, f in enumerate(frames)]
        cloud = prepare_frames(moved, self.input_spec, rng=rng_subsample)

        n = cloud.num_points
        xyz_raw = raw[cloud.source]
        cells = grid_cells(torch.from_numpy(np.ascontiguousarray(xyz_raw)),
                           torch.zeros(n, dtype=torch.int64), cfg.cell_size).numpy()
        gt = self._ground_truth(frames, cloud)

        teacher = None
        if self._caches and frame_index in self._caches[bag]:
            teacher = self._caches[bag].frame(frame_index)
            if teacher.stamp_ns != key.stamp_ns:
                raise ConfigError("teacher_caches", f"{self._caches[bag].path}: frame "
                                  f"{frame_index} has stamp {teacher.stamp_ns}, the bag "
                                  f"{key.stamp_ns}")
        # The teacher's own pair rule (its min_depth), so pairs join the cache one to one.
        min_depth = cfg.min_depth
        if self._caches:
            min_depth = float(self._caches[bag].teacher.get("min_depth", min_depth))
        pairs = self._pairs(key, cloud, teacher, min_depth, rng_images)

        labels = np.full(n, -1, np.int64)
        confidence = np.zeros(n, np.float32)
        pixel_feats = None
        if pairs["all_feats"] is not None:
            pixel_feats = np.zeros((n, pairs["all_feats"].shape[1]), np.float32)
        if cfg.label_source == "teacher":
            which = "kept" if cfg.crop_labels else "all"
            rows, best = _best_pair_per_point(pairs[f"{which}_point"], pairs[f"{which}_label"],
                                              pairs[f"{which}_confidence"])
            labels[rows] = pairs[f"{which}_label"][best]
            confidence[rows] = pairs[f"{which}_confidence"][best]
            if pixel_feats is not None:
                pixel_feats[rows] = pairs[f"{which}_feats"][best]
        elif cfg.label_source == "ground_truth" and gt is not None:
            labels = gt.copy()
            confidence = (gt >= 0).astype(np.float32)

        return Sample(
            index=index, epoch=self.epoch, bag=bag, frame_index=frame_index,
            stamp_ns=key.stamp_ns, sweep_frames=tuple(f.index for f in frames),
            coords=cloud.coords, feats=cloud.feats, source=cloud.source, sweep=cloud.sweep,
            key_points=cloud.key_points, xyz_raw=xyz_raw, point_transforms=transforms,
            labels=labels, confidence=confidence, gt_labels=gt, cell_index=cells,
            pixel_feats=pixel_feats,
            pair_point=pairs["kept_point"], pair_camera=pairs["kept_camera"],
            pair_uv=pairs["uv"], pair_pixel=pairs["pixel"], pair_label=pairs["kept_label"],
            pair_confidence=pairs["kept_confidence"], pair_feats=pairs["kept_feats"],
            camera_names=tuple(v.name for v in key.cameras), crops=pairs["crops"],
            image_sizes=np.array([v.image.shape[:2] for v in key.cameras],
                                 np.int64).reshape(-1, 2),
            images=pairs["images"], sweeps_independent=cfg.per_sweep_augmentation,
            dropped=dict(cloud.dropped), replaced=replaced,
        )

    def _cloud_transforms(self, sweeps: int, rng: np.random.Generator) -> np.ndarray:
        """[S, 3, 3] ``scale · flip · R_z`` per sweep (all equal unless per sweep)."""
        cfg = self.config
        out = np.tile(np.eye(3), (sweeps, 1, 1))
        if not cfg.augment:
            return out
        draws = sweeps if cfg.per_sweep_augmentation else 1
        for s in range(draws):
            # Always draw all four numbers, so switching one augmentation off leaves the others'
            # values unchanged.
            theta = rng.uniform(*cfg.rotation_range)
            fx, fy = rng.random() < cfg.flip_x, rng.random() < cfg.flip_y
            scale = rng.uniform(*cfg.scale_range)
            flip = np.diag([-1.0 if fx else 1.0, -1.0 if fy else 1.0, 1.0])
            out[s] = scale * flip @ _rotation_z(theta)
        if draws == 1:
            out[:] = out[0]
        return out

    def _ground_truth(self, frames: Sequence[Frame], cloud: PreparedCloud) -> np.ndarray | None:
        if self.vocabulary is None or all(f.labels is None for f in frames):
            return None
        # A sweep without labels reads "unlabelled" (-1) rather than hiding the others'.
        ids = np.concatenate([f.labels.astype(np.int64) if f.labels is not None
                              else np.full(f.num_points, -1, np.int64) for f in frames])
        return self.vocabulary.map_labels(ids[cloud.source]).astype(np.int64)

    def _pairs(self, key: Frame, cloud: PreparedCloud, teacher: TeacherLabels | None,
               min_depth: float, rng: np.random.Generator) -> dict[str, Any]:
        """Key-frame point–pixel pairs on prepared rows, joined with the teacher, augmented."""
        cfg = self.config
        # Prepared row of each key-frame point (-1: dropped by prepare_frames).
        row_of = np.full(cloud.key_points, -1, np.int64)
        is_key = cloud.source < cloud.key_points
        row_of[cloud.source[is_key]] = np.flatnonzero(is_key)
        views = key.cameras
        if views:
            found: PointPixelPairs = point_pixel_pairs(
                key.xyz, [(v.camera, v.lidar_to_camera) for v in views], min_depth=min_depth)
            point, camera, uv = found.point_index, found.camera_index.astype(np.int64), found.uv
        else:
            point, camera = np.zeros(0, np.int64), np.zeros(0, np.int64)
            uv = np.zeros((0, 2), np.float32)
        rows = row_of[point]
        alive = rows >= 0
        rows, camera, key_point, uv = rows[alive], camera[alive], point[alive], uv[alive]
        label, conf, feats = _join_teacher(teacher, [v.name for v in views], camera, key_point,
                                           cloud.key_points)

        kept_idx: list[np.ndarray] = []
        uv_out: list[np.ndarray] = []
        px_out: list[np.ndarray] = []
        crops: list[list[int]] = []
        images: list[torch.Tensor] = []
        for c, view in enumerate(views):
            members = np.flatnonzero(camera == c)
            crop = self._crop(view.image.shape[0], view.image.shape[1], uv[members], rng)
            uv_c, px_c, keep = crop.apply(uv[members])
            kept_idx.append(members[keep])
            uv_out.append(uv_c)
            px_out.append(px_c)
            crops.append(crop.as_row())
            if cfg.return_images:
                images.append(crop.image(view.image))
        kept = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
        h, w = cfg.crop_size
        return {
            "all_point": rows, "all_label": label, "all_confidence": conf, "all_feats": feats,
            "kept_point": rows[kept], "kept_camera": camera[kept], "kept_label": label[kept],
            "kept_confidence": conf[kept],
            "kept_feats": None if feats is None else feats[kept],
            "uv": np.concatenate(uv_out) if uv_out else np.zeros((0, 2), np.float32),
            "pixel": np.concatenate(px_out) if px_out else np.zeros((0, 2), np.int64),
            "crops": np.array(crops, np.int64).reshape(-1, 5),
            "images": (torch.stack(images) if images else torch.zeros(0, 3, h, w))
            if cfg.return_images else None,
        }

    def _crop(self, height: int, width: int, uv: np.ndarray, rng: np.random.Generator
              ) -> CropFlip:
        cfg = self.config
        if not cfg.augment:
            return CropFlip(0, 0, height, width, cfg.crop_size, False)
        total = len(uv)
        best: tuple[int, tuple[int, int, int, int]] | None = None
        for _ in range(cfg.crop_attempts):
            box = random_resized_crop_params(height, width, cfg.crop_scale, cfg.crop_ratio, rng)
            survived = int(CropFlip(*box, cfg.crop_size).apply(uv)[2].sum())
            if best is None or survived > best[0]:
                best = (survived, box)
            if total == 0 or survived > cfg.min_pairs or survived / total > cfg.min_kept:
                break
        assert best is not None
        flip = bool(rng.random() < cfg.hflip)
        return CropFlip(*best[1], cfg.crop_size, flip)


def _join_teacher(teacher: TeacherLabels | None, camera_names: Sequence[str],
                  camera: np.ndarray, point: np.ndarray, key_points: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Teacher label, confidence and feature of each (camera, key point) pair; -1 if none.

    The cache stores its pairs by (position of the camera in the frame, point row) only, so the
    join goes through camera *names* (robust to a reader config with other cameras).
    """
    m = len(point)
    label = np.full(m, -1, np.int64)
    conf = np.zeros(m, np.float32)
    if teacher is None:
        return label, conf, None
    feats = None
    if teacher.features is not None:
        feats = np.zeros((m, teacher.features.shape[1]), np.float32)
    if teacher.points.size and int(teacher.points.max()) >= key_points:
        raise ConfigError("teacher_caches", f"frame {teacher.index}: the cache names point "
                          f"{int(teacher.points.max())}, the frame has {key_points}")
    position = {name: c for c, name in enumerate(camera_names)}
    # cache camera position -> position in this frame's cameras (-1: not in this frame)
    remap = np.array([position.get(name, -1) for name in teacher.camera_names] + [-1], np.int64)
    cache_cam = remap[teacher.camera.astype(np.int64)]
    valid = cache_cam >= 0
    keys = cache_cam[valid] * key_points + teacher.points[valid].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    want = camera * key_points + point
    pos = np.minimum(np.searchsorted(sorted_keys, want), max(len(sorted_keys) - 1, 0))
    hit = (sorted_keys[pos] == want) if len(sorted_keys) else np.zeros(m, bool)
    src = np.flatnonzero(valid)[order[pos[hit]]]
    label[hit] = teacher.label[src].astype(np.int64)
    conf[hit] = teacher.confidence[src].astype(np.float32)
    if feats is not None and teacher.features is not None:
        feats[hit] = teacher.features[src].astype(np.float32)
    return label, conf, feats


def _best_pair_per_point(rows: np.ndarray, label: np.ndarray, conf: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, pair index)`` of the most confident labelled pair of each point.

    A point seen by two cameras has two teacher labels; the more confident one wins (ties: the
    earlier camera).
    """
    labelled = np.flatnonzero(label >= 0)
    order = labelled[np.lexsort((-conf[labelled], rows[labelled]))]
    unique_rows, first = np.unique(rows[order], return_index=True)
    return unique_rows, order[first]


# ------------------------------------------------------------------------------------ collate


def _cat(arrays: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays)).to(dtype)


def collate(samples: Sequence[Sample], *, sweeps_as_batches: bool | None = None
            ) -> dict[str, Any]:
    """Batch samples for the sparse network and the losses (``collate_fn`` of a DataLoader).

    Points are concatenated in sample order (``offsets [B+1]``: sample b owns rows
    ``offsets[b]:offsets[b+1]``); ``batch`` is the sample position, or ``b + B · sweep`` with
    ``sweeps_as_batches`` (default: when the samples' sweeps were augmented independently), the
    code's one-sub-cloud-per-sweep layout; ``num_clouds`` is the number of batch ids.
    ``PointTensor(batch["feats"], batch["coords"], batch["batch"])`` is the network input.
    Pairs name global point rows (``pair_point``) and global images (``pair_image``, the row in
    ``images``); SSR ``cell_index`` values are unique across the batch (-1 stays -1).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if sweeps_as_batches is None:
        sweeps_as_batches = any(s.sweeps_independent for s in samples)
    b = len(samples)
    sizes = np.array([s.num_points for s in samples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cams = np.array([len(s.camera_names) for s in samples], np.int64)
    image_offsets = np.concatenate([[0], np.cumsum(cams)])
    pair_sizes = np.array([s.num_pairs for s in samples], np.int64)

    batch_ids = []
    for i, s in enumerate(samples):
        ids = np.full(s.num_points, i, np.int64)
        if sweeps_as_batches:
            ids = ids + b * s.sweep.astype(np.int64)
        batch_ids.append(ids)
    cells, next_cell = [], 0
    for s in samples:
        c = s.cell_index.astype(np.int64)
        cells.append(np.where(c >= 0, c + next_cell, -1))
        next_cell += int(c.max()) + 1 if c.size and c.max() >= 0 else 0

    out: dict[str, Any] = {
        "coords": _cat([s.coords for s in samples], torch.float32),
        "feats": _cat([s.feats for s in samples], torch.float32),
        "batch": torch.from_numpy(np.concatenate(batch_ids)),
        "offsets": torch.from_numpy(offsets),
        "num_clouds": (b * (1 + max(int(s.sweep.max()) if s.num_points else 0
                                    for s in samples)) if sweeps_as_batches else b),
        "source": _cat([s.source for s in samples], torch.int64),
        "sweep": _cat([s.sweep for s in samples], torch.int64),
        "xyz_raw": _cat([s.xyz_raw for s in samples], torch.float32),
        "labels": _cat([s.labels for s in samples], torch.int64),
        "confidence": _cat([s.confidence for s in samples], torch.float32),
        "cell_index": torch.from_numpy(np.concatenate(cells)),
        "pair_point": _cat([s.pair_point + offsets[i] for i, s in enumerate(samples)],
                           torch.int64),
        "pair_image": _cat([s.pair_camera + image_offsets[i] for i, s in enumerate(samples)],
                           torch.int64),
        "pair_pixel": _cat([s.pair_pixel for s in samples], torch.int64),
        "pair_uv": _cat([s.pair_uv for s in samples], torch.float32),
        "pair_label": _cat([s.pair_label for s in samples], torch.int64),
        "pair_confidence": _cat([s.pair_confidence for s in samples], torch.float32),
        "pair_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(pair_sizes)])),
        "image_offsets": torch.from_numpy(image_offsets),
        "camera_names": [s.camera_names for s in samples],
        "index": torch.tensor([s.index for s in samples], dtype=torch.int64),
        "epoch": torch.tensor([s.epoch for s in samples], dtype=torch.int64),
        "bag": torch.tensor([s.bag for s in samples], dtype=torch.int64),
        "frame_index": torch.tensor([s.frame_index for s in samples], dtype=torch.int64),
        "stamp_ns": torch.tensor([s.stamp_ns for s in samples], dtype=torch.int64),
        "replaced": [entry for s in samples for entry in s.replaced],
    }
    if any(s.gt_labels is not None for s in samples):
        out["gt_labels"] = _cat([s.gt_labels if s.gt_labels is not None
                                 else np.full(s.num_points, -1, np.int64) for s in samples],
                                torch.int64)
    if all(s.pixel_feats is not None for s in samples):
        out["pixel_feats"] = _cat([s.pixel_feats for s in samples if s.pixel_feats is not None],
                                  torch.float32)
    if all(s.pair_feats is not None for s in samples):
        out["pair_pixel_feats"] = _cat([s.pair_feats for s in samples
                                        if s.pair_feats is not None], torch.float32)
    if all(s.images is not None for s in samples):
        out["images"] = torch.cat([s.images for s in samples if s.images is not None])
    return out
