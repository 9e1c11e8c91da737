"""What labels a frame for the teacher cache: the text source, the teacher config and
MaskCLIP on the camera images of a frame (the simulated teacher is in ``simulated.py``).

MaskCLIP runs on every camera image resized to ``image_size`` (224×416 as in CLIP2Scene), all
cameras of a frame in one batch; the dense logits against the text bank are upsampled bilinearly
to the resized image, and each point–pixel pair takes the label (argmax: the text bank's row,
i.e. the class index in vocabulary order) and the confidence (max softmax at temperature 0.01) at
its pixel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..files import file_sha256
from ..frame import CameraView, Frame
from ..geometry.camera_model import CameraModel
from ..geometry.correspondence import PointPixelPairs, point_pixel_pairs
from ..geometry.projection import image_size as published_size
from .clip_loader import RANDOM_WEIGHTS_SEED, seeded_clip, seeded_image_tower
from .store import file_edges_hash, hash_json

if TYPE_CHECKING:
    from .clip_loader import ClipModel

DEFAULT_IMAGE_SIZE = (224, 416)
DEFAULT_FRAMES_PER_SHARD = 16
#: Softmax temperature of the confidence (CLIP's logit scale 100).
TEMPERATURE = 0.01

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


def weights_key(pretrained: str | None) -> str:
    """Weights in the key: a tag as written, a file by content (not by where it lies)."""
    if pretrained is None or pretrained.strip().lower() in ("random", "none", ""):
        return f"random(seed={RANDOM_WEIGHTS_SEED})"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"file:{file_edges_hash(path)}"
    return f"tag:{pretrained}"


# ---------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextSource:
    """Where the text bank comes from: a vocabulary to encode, or a prebuilt bank file.

    ``fingerprint`` names the bank's content without computing it: the class names, synonyms and
    templates (encoded with the teacher's own CLIP), or the bank file's checksum. ``encode``
    takes the teacher's CLIP model and tokenizer (both None when the bank is a file).
    ``without_text_tower`` gives the bank where it is known without CLIP's text tower (a bank
    file, or a bank the bank cache holds for these weights), else None.
    """

    vocabulary: str
    classes: tuple[str, ...]
    prompts: str | None
    fingerprint: str
    encode: Callable[[ClipModel | None, Any], torch.Tensor]
    without_text_tower: Callable[[], torch.Tensor | None] = lambda: None


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
                          lambda _clip, _tokenizer: bank, lambda: bank)
    vocabulary = resolve_vocabulary(vocab)
    prompt_set = prompts or vocabulary.prompts or DEFAULT_PROMPTS
    templates = load_prompts(prompt_set)
    names = [[c.name, *c.synonyms] for c in vocabulary.classes]
    return TextSource(
        vocabulary.name, tuple(vocabulary.names), prompts_name(prompt_set),
        "encode:" + hash_json({"names": names, "templates": list(templates)}),
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


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError("image_size", f"must be two positive ints (H, W), got {image_size}")
    return size[0], size[1]


# ---------------------------------------------------------------------------- labelling


class MaskCLIPLabeller:
    """MaskCLIP and the text bank, loaded on first use (a finished cache never needs them).

    With the bank known without it (a bank file, or one the bank cache holds), only CLIP's
    image tower is built."""

    def __init__(self, cfg: TeacherConfig, text: TextSource, pretrained: str | None,
                 device: str, batch_cameras: int) -> None:
        from .maskclip import MaskCLIP

        bank = text.without_text_tower()
        image_tower = (seeded_image_tower(cfg.model, pretrained, device) if bank is not None
                       else None)
        if bank is None or image_tower is None:
            clip, tokenizer = seeded_clip(cfg.model, pretrained, device)
            image_tower = clip.visual
            bank = text.encode(clip, tokenizer) if bank is None else bank
        self.cfg = cfg
        self.maskclip = MaskCLIP(image_tower).to(device)
        self.bank = checked_bank(bank, cfg).to(device)
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
        return label_frame(frame, self, self.cfg)



def checked_bank(bank: torch.Tensor, cfg: TeacherConfig) -> torch.Tensor:
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
def label_frame(frame: Frame, teacher: MaskCLIPLabeller, cfg: TeacherConfig) -> FrameResult:
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
        labels_np, confs_np = label_map.cpu().numpy(), conf_map.cpu().numpy()
        for k, (c, view, pairs) in enumerate(batch):
            px = scale_pixels(pairs.uv, view.image.shape[:2], size)
            points.append(pairs.point_index.astype(np.int32))
            cams.append(np.full(pairs.num_pairs, c, np.uint8))
            labels.append(labels_np[k, px[:, 1], px[:, 0]].astype(np.uint16))
            confs.append(confs_np[k, px[:, 1], px[:, 0]].astype(np.float16))
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


class Labeller(Protocol):
    """What labels a frame for the cache: the MaskCLIP teacher or the simulated one."""

    bank_sha256: str | None

    def label(self, frame: Frame) -> FrameResult: ...
