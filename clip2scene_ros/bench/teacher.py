"""``clip2scene bench teacher``: MaskCLIP throughput and the teacher cache's size per frame.

``images_per_s``: camera images through MaskCLIP per second (dense features, logits against a
16-class bank, upsampling to the image and argmax: what the cache does per image), with random
weights of ``model`` on this machine's CPU threads. Weights do not change the arithmetic, so the
rate holds for pretrained weights too.

``cache_bytes_per_frame``: bytes per frame of a cache (labels only) written for a few frames of
the sample drive. Its size depends on the number of pairs, not on the model, so a tiny random
model (``cache_model``) labels them; ``feature_bytes_per_frame`` adds what ``--features`` would
store for ``model``'s feature width (pairs × D × 2 bytes of float16).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import median_ms

#: Classes of the synthetic text bank (nuScenes has 16).
BENCH_CLASSES = 16


@torch.no_grad()
def bench_teacher(model: str = "ViT-B-16", images: int = 6, repeat: int = 3,
                  image_size: tuple[int, int] = (224, 416), cache_model: str = "tiny-vit",
                  cache_frames: int = 3, seed: int = 0) -> dict[str, Any]:
    """MaskCLIP images per second and cache bytes per frame (see the module doc)."""
    from ..sample.drive import write_sample_drive
    from ..teacher.clip_loader import load_clip
    from ..teacher.labeller import RANDOM_WEIGHTS_SEED
    from ..teacher.maskclip import MaskCLIP
    from ..teacher.run import run_teacher

    if images < 1 or repeat < 1 or cache_frames < 1:
        raise ConfigError("images" if images < 1 else "repeat" if repeat < 1 else "cache_frames",
                          "must be >= 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        clip, _ = load_clip(model, None)
    maskclip = MaskCLIP(clip)
    gen = torch.Generator().manual_seed(seed)
    batch = torch.rand(images, 3, *image_size, generator=gen)
    bank = F.normalize(torch.randn(BENCH_CLASSES, maskclip.embed_dim, generator=gen), dim=1)

    def step() -> None:
        logits = maskclip.logits(maskclip(batch), bank, image_size)
        maskclip.labels_and_confidence(logits)

    ms = median_ms(step, repeat, warmup=1)

    with tempfile.TemporaryDirectory(prefix="clip2scene_bench_teacher_") as tmp:
        bag = Path(tmp) / "drive"
        write_sample_drive(bag, frames=cache_frames, seed=seed)
        report = run_teacher(bag, "sample_drive", Path(tmp) / "cache", model=cache_model,
                             pretrained=None, image_size=image_size, prompts="single",
                             progress=False)
    frames = max(report.frames, 1)
    pairs_per_frame = report.pairs / frames
    return {
        "model": model,
        "image_size": list(image_size),
        "images": images,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        "ms_per_batch": ms,
        "images_per_s": images / (ms / 1e3),
        "cache_bytes_per_frame": report.bytes / frames,
        "cache_model": cache_model,
        "cache_frames": report.frames,
        "pairs_per_frame": pairs_per_frame,
        "feature_bytes_per_frame": pairs_per_frame * maskclip.embed_dim * 2,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
