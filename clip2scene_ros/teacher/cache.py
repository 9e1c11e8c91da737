"""The teacher cache: MaskCLIP pseudo-labels of every point–pixel pair of a bag, computed once.

CLIP2Scene runs MaskCLIP on every training step; its images are frozen, so the labels can be
computed once per bag and read back for every epoch. For each frame, every camera image is
resized to ``image_size`` (224×416 as in CLIP2Scene), all cameras go through MaskCLIP in one
batch, the dense logits against the text bank are upsampled bilinearly to the resized image, and
each point–pixel pair takes the label (argmax: the text bank's row, i.e. the class index in
vocabulary order) and the confidence (max softmax at temperature 0.01) at its pixel.

On disk, a cache directory holds:

* ``shard-NNNNN.safetensors``: the tensors of a few frames, named ``f{frame}.points`` (int32 row
  of the point in the Frame), ``f{frame}.camera`` (uint8 position of the view in
  ``Frame.cameras``), ``f{frame}.label`` (uint16), ``f{frame}.confidence`` (float16) and, with
  ``store_features``, ``f{frame}.features`` ([P, D] float16, the L2-normalised MaskCLIP feature
  sampled bilinearly at the pixel centre exactly as the logits are).
* ``index.yaml`` (one part per rank, ``index-rank{r}-of-{W}.yaml``, when ``world_size > 1``):
  the format version, the teacher config, the bag's content key, the cache key and per frame its
  stamp, shard, pairs and skipped cameras with their reasons.

The cache key is a hash of the bag's content key (``bag_content_key``), the reader config and the
teacher config. **A directory belongs to one key**: running another bag or another teacher config
into it is refused with the fields that differ (pick a new ``--out``), never silently mixed. With
the same key, every shard listed in the index and matching its checksum is reused; a finished
cache is returned without opening the bag or loading CLIP. A shard is written before the index
that lists it (both atomically), so an interrupted run resumes from its last listed shard and ends
with byte-identical files. Random CLIP weights are drawn from a fixed seed for the same reason.

Nothing here unpickles: tensors are safetensors, the index is YAML read with ``safe_load``.
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
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..config import to_dict
from ..errors import ConfigError
from ..files import atomic_write_bytes, file_sha256
from ..frame import CameraView, Frame
from ..geometry.camera_model import CameraModel
from ..geometry.correspondence import PointPixelPairs, point_pixel_pairs
from ..geometry.projection import image_size as published_size

log = logging.getLogger(__name__)

CACHE_FORMAT = "clip2scene_teacher_cache"
CACHE_VERSION = 1
INDEX_NAME = "index.yaml"
DEFAULT_IMAGE_SIZE = (224, 416)
DEFAULT_FRAMES_PER_SHARD = 16
#: Seed of random CLIP weights: reruns and resumed runs must see the same "teacher".
RANDOM_WEIGHTS_SEED = 0
#: Softmax temperature of the confidence (CLIP's logit scale 100).
TEMPERATURE = 0.01
#: Bytes hashed at each end of a file for a cheap content key.
_EDGE_BYTES = 1 << 20
#: Skip warnings logged per reason before going quiet (all are still counted).
_LOG_LIMIT = 10

#: Why a camera of a frame has no labels. The first five come from the bag reader.
SKIP_REASONS = {
    "image_malformed": "image that cannot be decoded (e.g. an unsupported encoding)",
    "camera_unmatched": "no image of the camera within the sync slop",
    "no_camera_info": "no intrinsics (CameraInfo or calibration)",
    "no_extrinsics": "no usable LiDAR->camera transform",
    "image_size_mismatch": "image size differs from its intrinsics",
    "unsupported_image": "image is not (H, W, 3) uint8 RGB",
    "image_too_small": "image smaller than one MaskCLIP patch",
    "unsupported_camera_model": "the camera model cannot project points",
    "no_points": "no LiDAR point projects into the image",
}


# ---------------------------------------------------------------------------- keys


def _hash_json(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_edges_hash(path: Path) -> str:
    """sha256 of a file's size and its first and last MiB: cheap, and survives copies."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if size > 2 * _EDGE_BYTES:
            f.seek(size - _EDGE_BYTES)
            digest.update(f.read())
    return digest.hexdigest()


def bag_content_key(bag: Path) -> str:
    """A key of a rosbag2 directory's content, without reading the whole bag.

    sha256 over ``metadata.yaml`` (message counts, durations, file list) and, for every other
    file, its name, size and first and last MiB. Unlike mtimes it survives copying the bag; bags
    are never edited in place, so a same-size change in the middle of a file is not a concern.
    """
    bag = Path(bag)
    meta = bag / "metadata.yaml"
    if not meta.is_file():
        raise FileNotFoundError(f"{bag} is not a rosbag2 directory: it has no metadata.yaml")
    digest = hashlib.sha256(b"metadata.yaml\0" + meta.read_bytes())
    for path in sorted(bag.iterdir()):
        if path.is_file() and path.name != "metadata.yaml" and not path.name.startswith("."):
            digest.update(f"\0{path.name}\0{_file_edges_hash(path)}".encode())
    return digest.hexdigest()


def _weights_key(pretrained: str | None) -> str:
    """Weights in the key: a tag as written, a file by content (not by where it lies)."""
    if pretrained is None or pretrained.strip().lower() in ("random", "none", ""):
        return f"random(seed={RANDOM_WEIGHTS_SEED})"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"file:{_file_edges_hash(path)}"
    return f"tag:{pretrained}"


# ---------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextSource:
    """Where the text bank comes from: a vocabulary to encode, or a prebuilt bank file.

    ``fingerprint`` names the bank's content without computing it: the class names, synonyms and
    templates (encoded with the teacher's own CLIP), or the bank file's checksum.
    """

    vocabulary: str
    classes: tuple[str, ...]
    prompts: str | None
    fingerprint: str
    encode: Callable[[torch.nn.Module, Any], torch.Tensor]


def text_source(vocab: str | Path, model: str | None,
                prompts: str | Path | None = None) -> TextSource:
    """A vocabulary file or built-in name, or a bank ``FILE`` (``FILE.safetensors`` + yaml).

    A bank must have been encoded with ``model``, unless ``model`` is None (any bank).
    """
    from .prompts import DEFAULT_PROMPTS, load_prompts, prompts_name
    from .text_bank import bank_paths, encode_text_bank, load_text_bank, resolve_vocabulary

    tensor_path, yaml_path = bank_paths(vocab)
    if tensor_path.is_file() and yaml_path.is_file():
        bank, spec, provenance = load_text_bank(vocab)
        bank_model = str(provenance.get("model", ""))
        if model is not None and bank_model.replace("/", "-") != model.replace("/", "-"):
            raise ConfigError("vocab", f"the text bank was encoded with {bank_model or '?'}, "
                              f"but the teacher is {model}; rebuild it with `clip2scene vocab "
                              f"build --model {model}` or pass the vocabulary", str(yaml_path))
        if prompts is not None:
            raise ConfigError("prompts", "a prebuilt text bank already fixes its prompts")
        checksum = file_sha256(tensor_path)
        return TextSource(spec.name, tuple(spec.classes), spec.prompts, f"bank:{checksum}",
                          lambda _clip, _tokenizer: bank)
    vocabulary = resolve_vocabulary(vocab)
    prompt_set = prompts or vocabulary.prompts or DEFAULT_PROMPTS
    templates = load_prompts(prompt_set)
    names = [[c.name, *c.synonyms] for c in vocabulary.classes]
    return TextSource(
        vocabulary.name, tuple(vocabulary.names), prompts_name(prompt_set),
        "encode:" + _hash_json({"names": names, "templates": list(templates)}),
        lambda clip, tokenizer: encode_text_bank(clip, tokenizer, vocabulary, templates),
    )


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that changes the cached numbers (all of it goes into the cache key)."""

    model: str
    pretrained: str
    weights: str
    image_size: tuple[int, int]
    store_features: bool
    vocabulary: str
    classes: tuple[str, ...]
    prompts: str | None
    text: str
    min_depth: float = 1.0
    temperature: float = TEMPERATURE
    frames_per_shard: int = DEFAULT_FRAMES_PER_SHARD


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError("image_size", f"must be two positive ints (H, W), got {image_size}")
    return size[0], size[1]


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


def index_name(rank: int, world_size: int) -> str:
    return INDEX_NAME if world_size == 1 else f"index-rank{rank:03d}-of-{world_size:03d}.yaml"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"


# ---------------------------------------------------------------------------- report


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


# ---------------------------------------------------------------------------- index


def _dump_yaml(data: Any) -> bytes:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: fast on long indexes
    text = yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=None)
    return text.encode("utf-8")


def _load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a safe loader: no objects


def _read_parts(out: Path) -> dict[str, dict[str, Any]]:
    """Every index part in ``out`` by file name, format- and version-checked."""
    parts = {}
    for path in sorted(out.glob("index*.yaml")):
        data = _load_yaml(path)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ConfigError("format", f"not a teacher cache index (expected {CACHE_FORMAT})",
                              str(path))
        version = data.get("version")
        if not isinstance(version, int) or version > CACHE_VERSION or version < 1:
            raise ConfigError("version", f"teacher cache version {version!r} is not supported "
                              f"(this clip2scene_ros reads version {CACHE_VERSION}); recompute "
                              "the cache into a new --out, or upgrade clip2scene_ros", str(path))
        parts[path.name] = data
    return parts


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _verified(out: Path, shard: dict[str, Any]) -> bool:
    path = out / str(shard.get("name", ""))
    try:
        return path.stat().st_size == shard.get("bytes") and file_sha256(path) == shard["sha256"]
    except (OSError, KeyError):
        return False


def _parts_complete(parts: dict[str, dict[str, Any]]) -> bool:
    sizes = {int(p["layout"]["world_size"]) for p in parts.values()}
    if len(sizes) != 1:
        return False
    world = sizes.pop()
    ranks = {int(p["layout"]["rank"]) for p in parts.values() if p.get("complete")}
    return ranks == set(range(world))


# ---------------------------------------------------------------------------- labelling


class _Teacher:
    """MaskCLIP and the text bank, loaded on first use (a finished cache never needs them)."""

    def __init__(self, cfg: TeacherConfig, text: TextSource, pretrained: str | None,
                 device: str, batch_cameras: int) -> None:
        from .maskclip import MaskCLIP

        clip, tokenizer = _seeded_clip(cfg.model, pretrained, device)
        self.cfg = cfg
        self.maskclip = MaskCLIP(clip).to(device)
        self.bank = _checked_bank(text.encode(clip, tokenizer), cfg).to(device)
        self.bank_sha256: str | None = hashlib.sha256(
            self.bank.cpu().numpy().tobytes()).hexdigest()
        self.device = device
        self.batch_cameras = max(1, int(batch_cameras))
        ph, pw = self.maskclip.patch_size
        h, w = cfg.image_size
        if h % ph or w % pw:
            raise ConfigError("image_size", f"{h}x{w} must be a multiple of {cfg.model}'s "
                              f"{ph}x{pw} patch (e.g. 224 416)")

    def label(self, frame: Frame) -> FrameResult:
        return _label_frame(frame, self, self.cfg)


def _seeded_clip(model: str, pretrained: str | None, device: str) -> tuple[Any, Any]:
    """CLIP and its tokenizer; random weights come from a fixed seed without touching the
    caller's RNG state, so reruns and resumed runs see the same teacher."""
    from .clip_loader import load_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return load_clip(model, pretrained, device=device)


def _checked_bank(bank: torch.Tensor, cfg: TeacherConfig) -> torch.Tensor:
    if bank.shape[0] != len(cfg.classes):
        raise ConfigError("vocab", f"text bank has {bank.shape[0]} rows for "
                          f"{len(cfg.classes)} classes")
    return bank.to(dtype=torch.float32)


def resize_images(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """``(H0, W0, 3)`` uint8 RGB images → ``[N, 3, H, W]`` float32 in [0, 1].

    Bilinear with antialiasing (``align_corners=False``), each image on its own since cameras
    differ in size; pixel ``x`` of the original maps to ``x * W / W0`` in the resized one.
    """
    out = []
    for image in images:
        # astype copies: bag images are read-only views of the message buffer
        t = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 255.0
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(t.clamp_(0.0, 1.0))
    return torch.cat(out) if out else torch.zeros(0, 3, *size)


def scale_pixels(uv: np.ndarray, source: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(M, 2) pixel (col, row) int64 in the resized image of continuous ``uv`` in the original.

    ``source`` and ``size`` are (H, W). Coordinates are pixel-edge based (pixel x covers
    [x, x+1)), which is what ``align_corners=False`` resizing preserves.
    """
    (h0, w0), (h, w) = source, size
    col = np.floor(uv[:, 0].astype(np.float64) * (w / w0)).astype(np.int64)
    row = np.floor(uv[:, 1].astype(np.float64) * (h / h0)).astype(np.int64)
    return np.stack([np.clip(col, 0, w - 1), np.clip(row, 0, h - 1)], axis=1)


def view_problem(view: CameraView, patch: tuple[int, int]) -> str | None:
    """The reason a camera view cannot be labelled, or None."""
    image = view.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        return "unsupported_image"
    if not isinstance(view.camera, CameraModel):
        return "no_camera_info"
    T = None if view.lidar_to_camera is None else np.asarray(view.lidar_to_camera)
    if T is None or T.shape != (4, 4) or not np.isfinite(T).all():
        return "no_extrinsics"
    if published_size(view.camera) != (image.shape[1], image.shape[0]):
        return "image_size_mismatch"
    if image.shape[0] < patch[0] or image.shape[1] < patch[1]:
        return "image_too_small"
    return None


def view_pairs(frame: Frame, view: CameraView, patch: tuple[int, int], min_depth: float
               ) -> tuple[PointPixelPairs | None, str]:
    """The point–pixel pairs of one camera view, or None and the reason it has none."""
    reason = view_problem(view, patch)
    if reason is not None:
        return None, reason
    try:
        pairs = point_pixel_pairs(frame.xyz, [(view.camera, view.lidar_to_camera)],
                                  min_depth=min_depth)
    except ValueError:
        return None, "unsupported_camera_model"
    return (pairs, "") if pairs.num_pairs else (None, "no_points")


@dataclass
class FrameResult:
    tensors: dict[str, np.ndarray]
    pairs: int
    skipped: list[tuple[str, str]]


@torch.no_grad()
def _label_frame(frame: Frame, teacher: _Teacher, cfg: TeacherConfig) -> FrameResult:
    """Labels (and features) of every pair of one frame; bad cameras are listed, not fatal."""
    size = cfg.image_size
    if len(frame.cameras) > 255:
        raise ValueError(f"frame {frame.index} has {len(frame.cameras)} cameras; at most 255")
    skipped: list[tuple[str, str]] = []
    used: list[tuple[int, CameraView, Any]] = []  # (position in frame.cameras, view, pairs)
    for c, view in enumerate(frame.cameras):
        pairs, reason = view_pairs(frame, view, teacher.maskclip.patch_size, cfg.min_depth)
        if pairs is None:
            skipped.append((view.name, reason))
            continue
        used.append((c, view, pairs))

    points, cams, labels, confs, feats = [], [], [], [], []
    for start in range(0, len(used), teacher.batch_cameras):
        batch = used[start:start + teacher.batch_cameras]
        images = resize_images([view.image for _, view, _ in batch], size).to(teacher.device)
        features = teacher.maskclip(images)
        logits = teacher.maskclip.logits(features, teacher.bank, size)
        label_map, conf_map = teacher.maskclip.labels_and_confidence(logits, cfg.temperature)
        label_map, conf_map = label_map.cpu().numpy(), conf_map.cpu().numpy()
        for k, (c, view, pairs) in enumerate(batch):
            px = scale_pixels(pairs.uv, view.image.shape[:2], size)
            points.append(pairs.point_index.astype(np.int32))
            cams.append(np.full(pairs.num_pairs, c, np.uint8))
            labels.append(label_map[k, px[:, 1], px[:, 0]].astype(np.uint16))
            confs.append(conf_map[k, px[:, 1], px[:, 0]].astype(np.float16))
            if cfg.store_features:
                feats.append(_sample_features(features[k:k + 1], px, size))
    return frame_result(frame.index, points, cams, labels, confs,
                        feats if cfg.store_features else None, int(teacher.bank.shape[1]),
                        skipped)


def frame_result(index: int, points: list[np.ndarray], cams: list[np.ndarray],
                 labels: list[np.ndarray], confs: list[np.ndarray],
                 feats: list[np.ndarray] | None, dim: int,
                 skipped: list[tuple[str, str]]) -> FrameResult:
    """One frame's cache tensors from per-camera parts (``feats`` None: no features stored)."""
    tensors = {
        f"f{index}.points": np.concatenate(points) if points else np.zeros(0, np.int32),
        f"f{index}.camera": np.concatenate(cams) if cams else np.zeros(0, np.uint8),
        f"f{index}.label": np.concatenate(labels) if labels else np.zeros(0, np.uint16),
        f"f{index}.confidence": np.concatenate(confs) if confs else np.zeros(0, np.float16),
    }
    if feats is not None:
        tensors[f"f{index}.features"] = (np.concatenate(feats) if feats
                                         else np.zeros((0, dim), np.float16))
    return FrameResult(tensors, int(tensors[f"f{index}.points"].size), skipped)


def _sample_features(features: torch.Tensor, px: np.ndarray, size: tuple[int, int]
                     ) -> np.ndarray:
    """[P, D] float16 unit features at pixel centres of the resized image.

    ``grid_sample`` (bilinear, ``align_corners=False``, border padding) at the centre of pixel x
    equals ``interpolate(size, bilinear, align_corners=False)`` read at x, without building the
    full-resolution [D, H, W] map (1.1 GB for six 224×416 ViT-B-16 images).
    """
    h, w = size
    t = torch.from_numpy(px).to(features.device, torch.float32)
    grid = torch.stack([2 * (t[:, 0] + 0.5) / w - 1, 2 * (t[:, 1] + 0.5) / h - 1], dim=1)
    sampled = F.grid_sample(features.float(), grid[None, None], mode="bilinear",
                            padding_mode="border", align_corners=False)[0, :, 0].T
    return F.normalize(sampled, dim=1).cpu().numpy().astype(np.float16)


# ---------------------------------------------------------------------------- run


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
    text = text_source(vocab, None if simulate is not None else model, prompts)
    cfg = TeacherConfig(
        model=model, pretrained=pretrained if pretrained is not None else "random",
        weights=_weights_key(pretrained), image_size=_check_image_size(image_size),
        store_features=bool(store_features), vocabulary=text.vocabulary, classes=text.classes,
        prompts=text.prompts, text=text.fingerprint, frames_per_shard=int(frames_per_shard),
    )
    teacher_key = to_dict(cfg)
    make_labeller: Callable[[], _Labeller]
    if simulate is None:
        def make_labeller() -> _Labeller:
            return _Teacher(cfg, text, pretrained, device, batch_cameras)
    else:
        cfg, teacher_key, make_labeller = _simulated(simulate, cfg, text, source_key,
                                                     pretrained, device)
    keyed = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": source_key,
             "teacher": teacher_key}
    cache_key = _hash_json(keyed)
    report = TeacherReport(out=out, cache_key=cache_key, rank=rank, world_size=world)

    out.mkdir(parents=True, exist_ok=True)
    parts = _read_parts(out)
    for name, part in parts.items():
        if part.get("cache_key") != cache_key:
            old = {"source": part.get("source"), "teacher": part.get("teacher")}
            diffs = _differences(old, {"source": source_key, "teacher": keyed["teacher"]})
            raise ConfigError("out", f"{out} holds a teacher cache for another bag or teacher "
                              f"config ({name}: {'; '.join(diffs[:4]) or 'key differs'}); "
                              "write this one to a new --out (or delete the old cache)")
    own_name = index_name(rank, world)
    own = parts.get(own_name)
    worlds = {int(p["layout"]["world_size"]) for p in parts.values()}
    if worlds - {world}:
        if _parts_complete(parts):
            # Finished by a run with another world size: it is the same cache, nothing to do.
            return _report_from_parts(report, parts, out, started)
        raise ConfigError("world_size", f"{out} holds an unfinished cache written with "
                          f"world_size {sorted(worlds)}; resume it with that world size")
    if own is not None and own.get("complete") and all(_verified(out, s) for s in own["shards"]):
        return _report_from_parts(report, {own_name: own}, out, started)

    reusable: dict[str, dict[str, Any]] = {}
    frames_of: dict[str, list[dict[str, Any]]] = {}
    if own is not None:
        entries: dict[str, list[dict[str, Any]]] = {}
        for f in own.get("frames", []):
            entries.setdefault(f["shard"], []).append(f)
        for shard in own.get("shards", []):
            if _verified(out, shard):
                reusable[shard["name"]] = shard
                frames_of[shard["name"]] = entries.get(shard["name"], [])

    state = _RunState(out, own_name, rank, world, cache_key, keyed, cfg, bag_path)
    state.bank_sha256 = ((own or {}).get("teacher_extra") or {}).get("bank_sha256")
    teacher: _Labeller | None = None
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


class _Labeller(Protocol):
    """What labels a frame for the cache: the MaskCLIP teacher or the simulated one."""

    bank_sha256: str | None

    def label(self, frame: Frame) -> FrameResult: ...


def _simulated(spec_path: str | Path, cfg: TeacherConfig, text: TextSource,
               source_key: dict[str, Any], pretrained: str | None, device: str
               ) -> tuple[TeacherConfig, dict[str, Any], Callable[[], _Labeller]]:
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

    def make() -> _Labeller:
        bank = None
        if cfg.store_features:
            clip, tokenizer = (None, None) if text.fingerprint.startswith("bank:") \
                else _seeded_clip(cfg.model, pretrained, device)
            bank = _checked_bank(text.encode(clip, tokenizer), cfg)
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
    report.complete = _parts_complete(_read_parts(out))
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
        atomic_write_bytes(self.out / self.name, _dump_yaml(self.part(complete)))


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TeacherLabels:
    """The cached teacher output of one frame.

    Attributes:
        index: the frame's ``Frame.index`` (position of its sweep in the LiDAR topic).
        stamp_ns: the sweep stamp.
        points: (P,) int32 row of each pair's point in the Frame's cloud.
        camera: (P,) uint8 position of the pair's view in ``Frame.cameras`` (``camera_names``).
        label: (P,) uint16 class index (row of the text bank, vocabulary order).
        confidence: (P,) float16 max softmax probability.
        features: (P, D) float16 unit MaskCLIP features, or None if not stored.
        camera_names: names of ``Frame.cameras`` in order.
        skipped: (camera, reason) of every camera without labels.
    """

    index: int
    stamp_ns: int
    points: np.ndarray
    camera: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None
    camera_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


#: Cache keys whose "simulated" warning was logged in this process (once each).
_SIMULATED_LOGGED: set[str] = set()


class TeacherCache:
    """Read a teacher cache directory, merging the index parts of every rank (no unpickling)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"teacher cache {self.path} does not exist")
        parts = _read_parts(self.path)
        if not parts:
            raise FileNotFoundError(f"{self.path} has no teacher cache index (index*.yaml)")
        keys = {p.get("cache_key") for p in parts.values()}
        if len(keys) != 1:
            raise ConfigError("cache_key", f"{self.path} mixes index parts of {len(keys)} caches")
        worlds = {int(p["layout"]["world_size"]) for p in parts.values()}
        if len(worlds) != 1:
            raise ConfigError("world_size", f"{self.path} mixes index parts of world sizes "
                              f"{sorted(worlds)}")
        first = next(iter(parts.values()))
        self.cache_key: str = str(first["cache_key"])
        self.teacher: dict[str, Any] = dict(first["teacher"])
        self.source: dict[str, Any] = dict(first["source"])
        self.world_size = worlds.pop()
        self.complete = _parts_complete(parts)
        self.class_names: tuple[str, ...] = tuple(self.teacher["classes"])
        self.simulated: dict[str, Any] | None = self.teacher.get("simulated")
        if self.simulated and self.cache_key not in _SIMULATED_LOGGED:
            _SIMULATED_LOGGED.add(self.cache_key)
            log.warning("teacher cache %s is SIMULATED from ground truth (spec %r): its labels "
                        "measure the distillation, not CLIP", self.path,
                        self.simulated.get("spec", {}).get("name"))
        self._entries: dict[int, dict[str, Any]] = {}
        self.skipped: Counter[str] = Counter()
        for name, part in parts.items():
            for entry in part.get("frames", []):
                i = int(entry["index"])
                if i in self._entries:
                    raise ConfigError("frames", f"frame {i} is in two index parts", name)
                self._entries[i] = entry
                self.skipped.update(s["reason"] for s in entry["skipped"])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: object) -> bool:
        return index in self._entries

    @property
    def indices(self) -> list[int]:
        """Frame indices in the cache, sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[TeacherLabels]:
        return (self.frame(i) for i in self.indices)

    def frame(self, index: int) -> TeacherLabels:
        """The labels of the frame whose ``Frame.index`` is ``index``."""
        from safetensors import safe_open

        entry = self._entries.get(int(index))
        if entry is None:
            raise KeyError(f"frame {index} is not in the teacher cache {self.path}")
        prefix = f"f{int(index)}."
        with safe_open(str(self.path / entry["shard"]), framework="np") as f:
            keys = set(f.keys())

            def get(name: str) -> np.ndarray | None:
                return f.get_tensor(prefix + name) if prefix + name in keys else None

            required = [get(n) for n in ("points", "camera", "label", "confidence")]
            features = get("features")
        arrays = [a for a in required if a is not None]
        if len(arrays) != len(required):
            raise ConfigError("shard", f"frame {index} lacks some of its tensors", entry["shard"])
        points, camera, label, confidence = arrays
        return TeacherLabels(
            index=int(index), stamp_ns=int(entry["stamp_ns"]), points=points, camera=camera,
            label=label, confidence=confidence, features=features,
            camera_names=tuple(entry["cameras"]),
            skipped=tuple((s["camera"], s["reason"]) for s in entry["skipped"]),
        )
