"""``run_teacher``: label a bag (or any frames) into a teacher cache directory, resumably.

A directory belongs to one cache key (see :mod:`clip2scene_ros.teacher.cache`). A shard is
written before the index part that lists it (both atomically), so an interrupted run resumes from
its last listed shard and ends with byte-identical files; ``world_size`` ranks each write their
own index part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import to_dict
from ..errors import ConfigError
from ..files import atomic_write_bytes, file_sha256
from ..frame import Frame
from .labeller import (
    DEFAULT_FRAMES_PER_SHARD,
    DEFAULT_IMAGE_SIZE,
    SKIP_REASONS,
    FrameResult,
    Labeller,
    MaskCLIPLabeller,
    TeacherConfig,
    TextSource,
    check_image_size,
    checked_bank,
    seeded_clip,
    text_source,
    weights_key,
)
from .store import (
    CACHE_FORMAT,
    CACHE_VERSION,
    bag_content_key,
    differences,
    dump_yaml,
    hash_json,
    index_name,
    parts_complete,
    read_parts,
    shard_name,
    shard_verified,
)

log = logging.getLogger(__name__)

#: Skip warnings logged per reason before going quiet (all are still counted).
_LOG_LIMIT = 10


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK/WORLD_SIZE, else a single process."""
    try:
        r = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
        w = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    except ValueError as exc:
        raise ConfigError("rank", f"RANK/WORLD_SIZE must be integers ({exc})") from exc
    if w < 1 or not 0 <= r < w:
        raise ConfigError("rank", f"need 0 <= rank < world_size, got rank {r}, world_size {w}")
    return r, w


@dataclass
class TeacherReport:
    """What one rank's ``run_teacher`` did (counts over the frames of its index part)."""

    out: Path
    cache_key: str
    rank: int
    world_size: int
    frames: int = 0
    computed: int = 0
    reused: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    missing_frames: list[int] = field(default_factory=list)
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = False

    def summary(self) -> str:
        rank = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        lines = [
            f"teacher cache {self.out}{rank}: key {self.cache_key[:16]}, "
            f"{'complete' if self.complete else 'INCOMPLETE'}",
            f"  frames: {self.frames} ({self.computed} computed, {self.reused} reused) in "
            f"{self.shards} shards, {self.bytes / 1e6:.2f} MB, {self.seconds:.1f} s",
            f"  pairs: {self.pairs}"
            + (f" ({self.pairs / self.frames:.0f} per frame)" if self.frames else ""),
        ]
        if self.skipped:
            lines.append("  skipped cameras: " + ", ".join(
                f"{reason} {count}" for reason, count in sorted(self.skipped.items())))
        if self.missing_frames:
            lines.append(f"  frames the reader dropped: {len(self.missing_frames)}")
        return "\n".join(lines)


@dataclass
class _Item:
    """One frame from a source, with the cameras the reader dropped (name, reason)."""

    frame: Frame
    dropped: list[tuple[str, str]]


def _bag_items(bag: Path, reader_config: Any, need_labels: bool = False
               ) -> tuple[Callable[[], Iterator[_Item]], list[int]]:
    """The bag's frames with the reader's per-camera skip reasons, and the planned indices."""
    from ..bag.reader import BagReader

    reader = BagReader(bag, reader_config)
    if need_labels and reader.index.topics.labels is None:
        raise ConfigError("bag", "has no ground-truth label topic; the simulated teacher "
                          "degrades ground truth, so it needs a labelled bag", str(bag))
    planned = [p.index for p in reader.index.plans]

    def items() -> Iterator[_Item]:
        for frame in reader.frames():
            yield _Item(frame, list(frame.skipped_cameras))

    return items, planned


def run_teacher(
    bag: Path | str,
    vocab: str | Path,
    out: Path | str,
    *,
    reader_config: Any = None,
    **options: Any,
) -> TeacherReport:
    """Label every point–pixel pair of ``bag`` with MaskCLIP into the cache directory ``out``.

    Args:
        bag: rosbag2 directory.
        vocab: vocabulary YAML or built-in name (encoded with the teacher's CLIP and the
            vocabulary's prompt set, or ``prompts``), or a prebuilt text bank ``FILE``.
        out: cache directory (created; one cache key per directory, see the module doc).
        reader_config: a ``ReaderConfig`` for the bag (topics, slop, calibration).
        options: the teacher's settings (keywords of ``_run``, checked there):
            ``model``, ``pretrained``: open_clip model and weights (tag, file, or None for
            seeded random); ``image_size``: (H, W) every camera image is resized to;
            ``store_features``: also store the [P, D] float16 dense feature of every pair;
            ``rank``, ``world_size``: this process's share, frames with ``index % world_size ==
            rank`` (default: torchrun's RANK/WORLD_SIZE); ``batch_cameras``: most images per
            MaskCLIP call; ``prompts``: prompt set of the bank (default: the vocabulary's);
            ``device``, ``progress``; ``frames_per_shard``: frames per shard (the unit of
            resume).
    """
    from ..bag.reader import ReaderConfig

    bag = Path(bag)
    reader_config = reader_config or ReaderConfig()
    reader_key = to_dict(reader_config)
    if reader_config.calibration is not None:
        reader_key["calibration"] = file_sha256(reader_config.calibration)
    source_key = {"bag": bag_content_key(bag), "reader": reader_key}

    def items() -> tuple[Iterator[_Item], list[int]]:
        make, planned = _bag_items(bag, reader_config,
                                   need_labels=options.get("simulate") is not None)
        return make(), planned

    return _run(items, source_key, vocab, Path(out), bag_path=str(bag), **options)


def run_teacher_on_frames(
    frames: Iterable[Frame],
    source_key: str,
    vocab: str | Path,
    out: Path | str,
    **kwargs: Any,
) -> TeacherReport:
    """``run_teacher`` over any iterable of Frames (tests, non-bag sources).

    ``source_key`` must name the frames' content (it replaces the bag's content key in the cache
    key); all frames count as planned, so a frame never seen is not reported missing.
    """
    frame_list = list(frames)

    def items() -> tuple[Iterator[_Item], list[int]]:
        return (_Item(f, []) for f in frame_list), [f.index for f in frame_list]

    return _run(items, {"frames": str(source_key)}, vocab, Path(out), **kwargs)


def _run(
    items: Callable[[], tuple[Iterator[_Item], list[int]]],
    source_key: dict[str, Any],
    vocab: str | Path,
    out: Path,
    *,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
    store_features: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "cpu",
    batch_cameras: int = 6,
    progress: bool = True,
    prompts: str | Path | None = None,
    frames_per_shard: int = DEFAULT_FRAMES_PER_SHARD,
    bag_path: str | None = None,
    simulate: str | Path | None = None,
) -> TeacherReport:
    started = time.perf_counter()
    rank, world = _rank_world(rank, world_size)
    if frames_per_shard < 1:
        raise ConfigError("frames_per_shard", f"must be >= 1, got {frames_per_shard}")
    # cheap errors before any work; a simulated teacher takes any bank (it runs no CLIP)
    text = _cached(text_source(vocab, None if simulate is not None else model, prompts),
                   vocab, model, pretrained, prompts, device)
    cfg = TeacherConfig(
        model=model, pretrained=pretrained if pretrained is not None else "random",
        weights=weights_key(pretrained), image_size=check_image_size(image_size),
        store_features=bool(store_features), vocabulary=text.vocabulary, classes=text.classes,
        prompts=text.prompts, text=text.fingerprint, frames_per_shard=int(frames_per_shard),
    )
    teacher_key = to_dict(cfg)
    make_labeller: Callable[[], Labeller]
    if simulate is None:
        def make_labeller() -> Labeller:
            return MaskCLIPLabeller(cfg, text, pretrained, device, batch_cameras)
    else:
        cfg, teacher_key, make_labeller = _simulated(simulate, cfg, text, source_key,
                                                     pretrained, device)
    keyed = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": source_key,
             "teacher": teacher_key}
    cache_key = hash_json(keyed)
    report = TeacherReport(out=out, cache_key=cache_key, rank=rank, world_size=world)

    out.mkdir(parents=True, exist_ok=True)
    parts = read_parts(out)
    for name, part in parts.items():
        if part.get("cache_key") != cache_key:
            old = {"source": part.get("source"), "teacher": part.get("teacher")}
            diffs = differences(old, {"source": source_key, "teacher": keyed["teacher"]})
            raise ConfigError("out", f"{out} holds a teacher cache for another bag or teacher "
                              f"config ({name}: {'; '.join(diffs[:4]) or 'key differs'}); "
                              "write this one to a new --out (or delete the old cache)")
    own_name = index_name(rank, world)
    own = parts.get(own_name)
    worlds = {int(p["layout"]["world_size"]) for p in parts.values()}
    if worlds - {world}:
        if parts_complete(parts):
            # Finished by a run with another world size: it is the same cache, nothing to do.
            return _report_from_parts(report, parts, out, started)
        raise ConfigError("world_size", f"{out} holds an unfinished cache written with "
                          f"world_size {sorted(worlds)}; resume it with that world size")
    if own is not None and own.get("complete") \
            and all(shard_verified(out, s) for s in own["shards"]):
        return _report_from_parts(report, {own_name: own}, out, started)

    reusable: dict[str, dict[str, Any]] = {}
    frames_of: dict[str, list[dict[str, Any]]] = {}
    if own is not None:
        entries: dict[str, list[dict[str, Any]]] = {}
        for f in own.get("frames", []):
            entries.setdefault(f["shard"], []).append(f)
        for shard in own.get("shards", []):
            if shard_verified(out, shard):
                reusable[shard["name"]] = shard
                frames_of[shard["name"]] = entries.get(shard["name"], [])

    state = _RunState(out, own_name, rank, world, cache_key, keyed, cfg, bag_path)
    state.bank_sha256 = ((own or {}).get("teacher_extra") or {}).get("bank_sha256")
    teacher: Labeller | None = None
    stream, planned = items()
    mine = [i for i in planned if i % world == rank]
    from tqdm import tqdm

    bar = tqdm(total=len(mine), desc=f"teacher r{rank}" if world > 1 else "teacher",
               unit="frame", disable=not progress)
    pending: list[tuple[Frame, FrameResult | None, list[tuple[str, str]]]] = []
    chunk = 0
    seen: list[int] = []

    def flush() -> None:
        nonlocal chunk
        if not pending:
            return
        name = shard_name(chunk * world + rank)
        if name in reusable:
            listed = [int(f["index"]) for f in frames_of[name]]
            if listed != [f.index for f, _, _ in pending]:
                raise _mismatch(out, name, listed, [f.index for f, _, _ in pending])
            state.add_reused(reusable[name], frames_of[name])
            report.reused += len(pending)
        else:
            state.add_computed(name, pending)
            report.computed += len(pending)
        state.write(complete=False)
        pending.clear()
        chunk += 1

    for item in stream:
        frame = item.frame
        if frame.index % world != rank:
            continue
        seen.append(frame.index)
        name = shard_name(chunk * world + rank)
        if name in reusable:
            # A finished shard: the frame is only checked against the index, not recomputed.
            listed = [int(f["index"]) for f in frames_of[name]]
            if len(pending) >= len(listed) or listed[len(pending)] != frame.index:
                raise _mismatch(out, name, listed, [*(f.index for f, _, _ in pending),
                                                    frame.index])
            pending.append((frame, None, item.dropped))
        else:
            if teacher is None:
                teacher = make_labeller()
                state.bank_sha256 = teacher.bank_sha256
            pending.append((frame, teacher.label(frame), item.dropped))
        bar.update(1)
        if len(pending) == cfg.frames_per_shard:
            flush()
    flush()
    bar.close()
    state.missing = sorted(set(mine) - set(seen))
    state.write(complete=True)
    return _report_from_parts(report, {own_name: state.part()}, out, started)


def _cached(text: TextSource, vocab: str | Path, model: str, pretrained: str | None,
            prompts: str | Path | None, device: str) -> TextSource:
    """``text`` whose bank comes from the bank cache (``text_bank.cached_text_bank``) when it is
    encoded from a vocabulary: the key is computed from the teacher's own CLIP, so a cached bank
    is used only for the weights it was encoded with; once a run has remembered those weights'
    text-tower checksum, later runs find the bank without the text tower. A prebuilt bank file
    is used as it is."""
    if not text.fingerprint.startswith("encode:"):
        return text
    from .clip_loader import weights_identity
    from .prompts import DEFAULT_PROMPTS, load_prompts
    from .text_bank import cached_bank_without_text_tower, cached_text_bank, resolve_vocabulary

    vocabulary = resolve_vocabulary(vocab)
    templates = load_prompts(prompts or vocabulary.prompts or DEFAULT_PROMPTS)

    def encode(clip: Any, tokenizer: Any) -> Any:
        # the labellers load ``clip`` with seeded_clip(model, pretrained)
        return cached_text_bank(clip, tokenizer, vocabulary, templates, model_name=model,
                                pretrained=pretrained, prompts=text.prompts,
                                weights=weights_identity(model, pretrained))

    def without_text_tower() -> Any:
        return cached_bank_without_text_tower(weights_identity(model, pretrained), vocabulary,
                                              templates, model_name=model,
                                              pretrained=pretrained, device=device)

    return dataclasses.replace(text, encode=encode, without_text_tower=without_text_tower)


def _simulated(spec_path: str | Path, cfg: TeacherConfig, text: TextSource,
               source_key: dict[str, Any], pretrained: str | None, device: str
               ) -> tuple[TeacherConfig, dict[str, Any], Callable[[], Labeller]]:
    """The simulated teacher's config, cache-key entry and labeller (teacher/simulated.py).

    The spec fixes the image size and pair depth; the key records the whole spec under
    ``simulated``, which is how readers know the labels came from ground truth.
    """
    from .simulated import SimulatedTeacher, load_spec, resolve, resolve_spec_path

    path = resolve_spec_path(spec_path)
    resolved = resolve(load_spec(path), str(path))
    if tuple(text.classes) != resolved.classes:
        raise ConfigError("vocab", f"the text source's classes {list(text.classes)} differ from "
                          f"the spec's vocabulary {resolved.vocabulary.name!r} "
                          f"({list(resolved.classes)})", str(path))
    spec = resolved.spec
    cfg = dataclasses.replace(cfg, image_size=spec.image_size, min_depth=spec.min_depth)
    key = to_dict(cfg)
    if not cfg.store_features or text.fingerprint.startswith("bank:"):
        # no CLIP runs: without features no bank is read, and a bank file is keyed by content
        key.update(model=None, pretrained=None, weights=None)
    # the label ids decide which class a point is, so an edited vocabulary is another teacher
    key["simulated"] = {"spec": to_dict(spec), "fingerprint": spec.fingerprint(),
                        "label_map": resolved.vocabulary.label_map().tolist()}
    content_key = str(source_key.get("bag") or source_key.get("frames"))

    def make() -> Labeller:
        bank = None
        if cfg.store_features:
            bank = text.without_text_tower()
            if bank is None:
                bank = text.encode(*seeded_clip(cfg.model, pretrained, device))
            bank = checked_bank(bank, cfg)
        return SimulatedTeacher(resolved, content_key, bank, cfg.store_features)

    return cfg, key, make


def _mismatch(out: Path, name: str, listed: list[int], got: list[int]) -> ConfigError:
    # The cache key covers the bag's content, so this means files were edited by hand.
    return ConfigError("out", f"{out / name} holds frames {listed} but the source now gives "
                       f"{got} there; delete the cache directory and rerun")


def _report_from_parts(report: TeacherReport, parts: dict[str, dict[str, Any]], out: Path,
                       started: float) -> TeacherReport:
    skipped: Counter[str] = Counter()
    for part in parts.values():
        report.frames += len(part.get("frames", []))
        report.pairs += sum(int(f["pairs"]) for f in part.get("frames", []))
        report.shards += len(part.get("shards", []))
        report.bytes += sum(int(s["bytes"]) for s in part.get("shards", []))
        report.missing_frames += list(part.get("missing_frames", []))
        skipped.update(part.get("skipped", {}))
    if report.computed == 0:
        report.reused = report.frames
    report.skipped = dict(sorted(skipped.items()))
    report.complete = parts_complete(read_parts(out))
    report.seconds = time.perf_counter() - started
    return report


class _RunState:
    """One rank's index part as it grows, shard by shard."""

    def __init__(self, out: Path, name: str, rank: int, world: int, cache_key: str,
                 keyed: dict[str, Any], cfg: TeacherConfig, bag_path: str | None) -> None:
        self.out, self.name, self.rank, self.world = out, name, rank, world
        self.cache_key, self.keyed, self.cfg, self.bag_path = cache_key, keyed, cfg, bag_path
        self.shards: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.bank_sha256: str | None = None
        self.missing: list[int] = []
        self._logged: Counter[str] = Counter()

    def add_reused(self, shard: dict[str, Any], frames: list[dict[str, Any]]) -> None:
        self.shards.append(shard)
        self.frames += frames

    def add_computed(self, name: str,
                     pending: list[tuple[Frame, FrameResult | None, list[tuple[str, str]]]]
                     ) -> None:
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {}
        for frame, result, dropped in pending:
            assert result is not None
            tensors.update(result.tensors)
            skipped = [*dropped, *result.skipped]
            for camera, reason in skipped:
                self._warn(frame, camera, reason)
            self.frames.append({
                "index": int(frame.index), "stamp_ns": int(frame.stamp_ns), "shard": name,
                "pairs": result.pairs, "points": frame.num_points,
                "cameras": [v.name for v in frame.cameras],
                "skipped": [{"camera": c, "reason": r} for c, r in skipped],
            })
        # safetensors writes an array's raw buffer: a transposed (F-ordered) one would be
        # read back scrambled, so everything goes in C order.
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        # One metadata entry: safetensors keeps metadata in a hash map, so several keys would
        # come out in a random order and identical shards would differ byte-wise.
        meta = json.dumps({"version": CACHE_VERSION, "cache_key": self.cache_key},
                          sort_keys=True)
        data = save(tensors, metadata={CACHE_FORMAT: meta})
        atomic_write_bytes(self.out / name, data)
        self.shards.append({"name": name, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "frames": [int(f.index) for f, _, _ in pending]})

    def _warn(self, frame: Frame, camera: str, reason: str) -> None:
        self._logged[reason] += 1
        if self._logged[reason] <= _LOG_LIMIT:
            log.warning("teacher: frame %d (stamp %d), camera %s skipped: %s (%s)%s",
                        frame.index, frame.stamp_ns, camera, reason,
                        SKIP_REASONS.get(reason, reason),
                        "; further ones of this reason are counted, not logged"
                        if self._logged[reason] == _LOG_LIMIT else "")

    def part(self, complete: bool = False) -> dict[str, Any]:
        skipped: Counter[str] = Counter(s["reason"] for f in self.frames for s in f["skipped"])
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "cache_key": self.cache_key,
            "complete": complete,
            "layout": {"rank": self.rank, "world_size": self.world,
                       "frames_per_shard": self.cfg.frames_per_shard},
            "source": self.keyed["source"],
            "teacher": self.keyed["teacher"],
            "teacher_extra": {"bank_sha256": self.bank_sha256, "bag_path": self.bag_path},
            "skipped": dict(sorted(skipped.items())),
            "missing_frames": self.missing,
            "shards": self.shards,
            "frames": self.frames,
        }

    def write(self, complete: bool) -> None:
        # Called after the shard it lists is on disk: the index never names a missing shard.
        atomic_write_bytes(self.out / self.name, dump_yaml(self.part(complete)))
