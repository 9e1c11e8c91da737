"""Training augmentation: the cloud's rotation, flips and scale, and the images' crops and flips.

* **Cloud.** ``p' = s · F · R_z(θ) · p`` on the merged keyframe-frame coordinates: θ ~
  U(rotation_range), F flips x and y with probability ``flip_x`` / ``flip_y``, s ~ U(scale_range)
  (:func:`cloud_transforms`). One draw for the whole sample, or one per sweep (the code's layout,
  where each sweep is a separate sub-cloud). All four numbers are drawn every time, so switching
  one augmentation off leaves the others' values unchanged.
* **Images.** Per camera a random resized crop (area ``scale``, aspect ``ratio`` = w/h,
  torchvision's algorithm, :func:`random_resized_crop_params`, drawn from a numpy Generator)
  resized to the output size and a horizontal flip with probability ``hflip`` (:func:`draw_crop`).
  :class:`CropFlip` remaps pixel coordinates exactly (pixel-edge convention, as the bilinear
  ``align_corners=False`` resize preserves); points outside the crop are dropped. A crop is
  redrawn up to ``attempts`` times until more than ``min_pairs`` pairs or more than ``min_kept``
  of them survive (the code retries forever; we keep the best draw). Images are resized as the
  teacher resizes them (bilinear, antialiased), so a crop looks as the teacher saw it.

Every draw comes from the Generator it is given, never from a global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clip2scene_ros.teacher.labeller import resize_images

__all__ = ["CropFlip", "cloud_transforms", "draw_crop", "random_resized_crop_params",
           "rotation_z"]


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


def rotation_z(theta: float) -> np.ndarray:
    """[3, 3] rotation by ``theta`` radians about z."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def cloud_transforms(sweeps: int, rng: np.random.Generator, *, per_sweep: bool,
                     rotation_range: tuple[float, float], flip_x: float, flip_y: float,
                     scale_range: tuple[float, float]) -> np.ndarray:
    """[S, 3, 3] ``scale · flip · R_z`` per sweep (all equal unless ``per_sweep``)."""
    out = np.tile(np.eye(3), (sweeps, 1, 1))
    draws = sweeps if per_sweep else 1
    for s in range(draws):
        # Always draw all four numbers, so switching one augmentation off leaves the others'
        # values unchanged.
        theta = rng.uniform(*rotation_range)
        fx, fy = rng.random() < flip_x, rng.random() < flip_y
        scale = rng.uniform(*scale_range)
        flip = np.diag([-1.0 if fx else 1.0, -1.0 if fy else 1.0, 1.0])
        out[s] = scale * flip @ rotation_z(theta)
    if draws == 1:
        out[:] = out[0]
    return out


def draw_crop(height: int, width: int, uv: np.ndarray, rng: np.random.Generator, *,
              out: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
              attempts: int, min_pairs: int, min_kept: float, hflip: float) -> CropFlip:
    """The crop of a ``height × width`` image whose projected points are ``uv`` (see the
    module doc): the first draw keeping more than ``min_pairs`` points or the fraction
    ``min_kept`` of them, else the draw keeping the most; then the flip."""
    total = len(uv)
    best: tuple[int, tuple[int, int, int, int]] | None = None
    for _ in range(attempts):
        box = random_resized_crop_params(height, width, scale, ratio, rng)
        survived = int(CropFlip(*box, out).apply(uv)[2].sum())
        if best is None or survived > best[0]:
            best = (survived, box)
        if total == 0 or survived > min_pairs or survived / total > min_kept:
            break
    assert best is not None
    flip = bool(rng.random() < hflip)
    return CropFlip(*best[1], out, flip)
