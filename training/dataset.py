"""Training samples from rosbags: keyframes, sweeps, augmentation, teacher labels and pairs.

One :class:`BagSceneDataset` item is one *keyframe* of a bag, prepared as CLIP2Scene's dataloader
does (reference ``clip2scene.md`` §1.7, §3.3), as a :class:`~clip2scene_ros.training.sample.
Sample`, configured by a :class:`~clip2scene_ros.training.dataset_config.DatasetConfig`:

* **Sweeps.** The keyframe plus ``sweeps - 1`` sweeps drawn at random from the ``sweep_window``
  sweeps before it (the most recent ones with ``random_sweeps=False``), moved into the keyframe's
  LiDAR frame by ego motion (``merge_sweeps``). With ``require_full_sweeps`` (default) keyframes
  with fewer past sweeps (the first ``sweeps - 1`` of a bag) are not indexed; without it they
  come with the sweeps there are. A past sweep without a pose cannot be merged and is left out.
* **Cloud augmentation** (:mod:`~clip2scene_ros.training.augmentation`): rotation about z,
  flips and scale on the merged keyframe-frame coordinates, one draw for the whole sample or one
  per sweep (``per_sweep_augmentation``, the code's layout: :func:`~clip2scene_ros.training.
  sample.collate` then gives every sweep its own batch index). The augmented sweeps go through
  :func:`~clip2scene_ros.preprocess.prepare_frames`, THE one preprocessing path (DESIGN rule 4),
  so features, scaling and filtering equal the node's.
* **Images and pairs** (:mod:`~clip2scene_ros.training.pairs`): per camera of the keyframe a
  random resized crop (``crop_scale``, ``crop_ratio``, ``crop_attempts``, ``min_pairs``,
  ``min_kept``) resized to ``crop_size`` and a horizontal flip (``hflip``); the pairs' pixel
  coordinates follow exactly and pairs outside the crop are dropped. Without augmentation the
  whole image is resized (the code's validation transform).
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
BagError` naming the bag and where it broke: the storage file, and the topic,
message position and log time of the last message read, as far as they can be found
(:mod:`clip2scene_ros.bag.read_errors`). With ``skip_bad`` such a bag is left out when the
dataset is built, and an unreadable keyframe is replaced by the next readable one in item order
(wrapping around; the augmentation still drawn from the item's own seed), a rule that depends on
the data only, so every worker, rank and resumed run makes the same choice. Every skip is logged
once per bag, recorded in :attr:`BagSceneDataset.bad` and carried by the sample
(``Sample.replaced``), so the trainer can report it whichever worker read it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clip2scene_ros.bag.read_errors import READ_ERRORS, locate_read_error
from clip2scene_ros.bag.reader import BagReader, ReaderConfig
from clip2scene_ros.errors import BagError, ConfigError, IntegrityError
from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.ego_motion import merge_sweeps, select_sweeps
from clip2scene_ros.models.bundle import InputSpec, load_spec
from clip2scene_ros.preprocess import PreparedCloud, prepare_frames
from clip2scene_ros.teacher.cache import TeacherCache
from clip2scene_ros.teacher.store import bag_content_key
from clip2scene_ros.training.augmentation import CropFlip, cloud_transforms, draw_crop
from clip2scene_ros.training.dataset_config import DatasetConfig, fraction_step
from clip2scene_ros.training.losses import grid_cells
from clip2scene_ros.training.pairs import best_pair_per_point, keyframe_pairs
from clip2scene_ros.training.sample import Sample
from clip2scene_ros.vocabulary import Vocabulary, builtin_vocabulary, load_vocabulary, names_a_file

__all__ = ["BagSceneDataset"]

log = logging.getLogger(__name__)


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
                raise BagError(str(config.bags[b]), f"LiDAR topic {reader.index.topics.lidar}",
                               "its stamps are not strictly increasing; sweeps cannot be ordered")
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
        except (ConfigError, BagError, IntegrityError):
            raise  # topics, calibration: the configuration, not the bag
        except Exception as exc:
            found = locate_read_error(reader.path, self._typestore())
            if found is None and not isinstance(exc, READ_ERRORS):
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
        except (ConfigError, BagError, IntegrityError):
            raise
        except Exception as exc:
            # where in the bag: re-read the span of log times this keyframe's messages lie in
            needs = [key for p in positions for key in plans[p].needs(index.topics)]
            times = [int(index.log_ns[t][i]) for t, i in needs if t in index.log_ns]
            start = min(times) if times else None
            first = ({t: int(np.searchsorted(v, start, "left")) for t, v in index.log_ns.items()}
                     if start is not None else None)
            found = locate_read_error(reader.path, self._typestore(), start=start,
                                       stop=max(times) + 1 if times else None, first=first)
            if found is None and not isinstance(exc, READ_ERRORS):
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
                raise IntegrityError("teacher_caches", f"{self._caches[bag].path}: frame "
                                     f"{frame_index} has stamp {teacher.stamp_ns}, the bag "
                                     f"{key.stamp_ns}")
        # The teacher's own pair rule (its min_depth), so pairs join the cache one to one.
        min_depth = cfg.min_depth
        if self._caches:
            min_depth = float(self._caches[bag].teacher.get("min_depth", min_depth))
        pairs = keyframe_pairs(key, cloud, teacher, min_depth, rng_images, draw=self._crop,
                               crop_size=cfg.crop_size, return_images=cfg.return_images)

        labels = np.full(n, -1, np.int64)
        confidence = np.zeros(n, np.float32)
        pixel_feats = None
        if pairs["all_feats"] is not None:
            pixel_feats = np.zeros((n, pairs["all_feats"].shape[1]), np.float32)
        if cfg.label_source == "teacher":
            which = "kept" if cfg.crop_labels else "all"
            rows, best = best_pair_per_point(pairs[f"{which}_point"], pairs[f"{which}_label"],
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
        if not cfg.augment:
            return np.tile(np.eye(3), (sweeps, 1, 1))
        return cloud_transforms(sweeps, rng, per_sweep=cfg.per_sweep_augmentation,
                                rotation_range=cfg.rotation_range, flip_x=cfg.flip_x,
                                flip_y=cfg.flip_y, scale_range=cfg.scale_range)

    def _ground_truth(self, frames: Sequence[Frame], cloud: PreparedCloud) -> np.ndarray | None:
        if self.vocabulary is None or all(f.labels is None for f in frames):
            return None
        # A sweep without labels reads "unlabelled" (-1) rather than hiding the others'.
        ids = np.concatenate([f.labels.astype(np.int64) if f.labels is not None
                              else np.full(f.num_points, -1, np.int64) for f in frames])
        return self.vocabulary.map_labels(ids[cloud.source]).astype(np.int64)

    def _crop(self, height: int, width: int, uv: np.ndarray, rng: np.random.Generator
              ) -> CropFlip:
        cfg = self.config
        if not cfg.augment:
            return CropFlip(0, 0, height, width, cfg.crop_size, False)
        return draw_crop(height, width, uv, rng, out=cfg.crop_size, scale=cfg.crop_scale,
                         ratio=cfg.crop_ratio, attempts=cfg.crop_attempts,
                         min_pairs=cfg.min_pairs, min_kept=cfg.min_kept, hflip=cfg.hflip)
