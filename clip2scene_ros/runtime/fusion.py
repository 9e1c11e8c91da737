"""Camera fusion: MaskCLIP's per-pixel class probabilities blended into the 3D network's.

For every key-frame point that lands in a synced camera image::

    p = (1 - w) · p3d + w · p2d,    label = argmax p,    score = max p

``p3d`` is the softmax of the point's text-space logits (``Prediction.logits``, what
``Predictor`` labels with),
``p2d`` the softmax of MaskCLIP's logits at the point's pixel (temperature 0.01, CLIP's logit
scale, as the teacher cache uses), averaged over the cameras that see the point, and ``w`` the
``fusion_weight``. Points in no image keep ``p3d`` unchanged, so their labels and scores are
bit-for-bit those of the 3D network; points the network never saw (non-finite, out of range)
stay ``UNKNOWN_LABEL``.

Both probability sets come from one text bank, so the class indices agree and the run-time
vocabulary swap applies to both. ROS-free: the node calls :func:`fuse_prediction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..codecs.pointcloud2 import UNKNOWN_LABEL
from ..geometry.correspondence import PointPixelPairs
from .labels import PointLabels
from .predictor import Prediction

#: Softmax temperature of MaskCLIP's cosine logits (CLIP's logit scale 100; teacher cache's).
TEMPERATURE = 0.01


@dataclass(frozen=True)
class FusedLabels:
    """Fused labels of the key frame (Frame order) and which points a camera saw.

    Attributes:
        labels: label (uint16, ``UNKNOWN_LABEL`` where the network saw nothing) and score (the
            fused probability of the label; 0 where unknown).
        in_view: ``(N,)`` bool, points whose probabilities were fused with an image's.
    """

    labels: PointLabels
    in_view: np.ndarray


def key_point_probabilities(prediction: Prediction) -> tuple[torch.Tensor, np.ndarray]:
    """``[N, C]`` float32 CPU softmax of the key frame's points and ``(N,)`` bool "seen".

    Rows of points the network did not see are zero. The softmax is the one
    ``scatter_to_key_frame`` labels with, of the same logits, so argmax and max equal
    ``prediction.labels`` wherever nothing is fused.
    """
    prepared, logits = prediction.prepared, prediction.logits
    if logits is None:
        raise ValueError("the prediction carries no logits to fuse")
    if logits.shape[0] != prepared.num_points:
        raise ValueError(f"{logits.shape[0]} logits for {prepared.num_points} prepared points")
    n = prepared.key_points
    probs = torch.zeros(n, int(logits.shape[1]), dtype=torch.float32)
    seen = np.zeros(n, dtype=bool)
    key = prepared.sweep == 0
    if key.any():
        rows = torch.from_numpy(prepared.source[key])
        probs[rows] = torch.softmax(logits[torch.from_numpy(key)].float(), dim=1)
        seen[prepared.source[key]] = True
    return probs, seen


def pixel_probabilities(camera_logits: Sequence[torch.Tensor], pairs: PointPixelPairs,
                        image_sizes: Sequence[tuple[int, int]],
                        temperature: float = TEMPERATURE) -> torch.Tensor:
    """``[M, C]`` softmax of each pair's camera logits at its pixel.

    Args:
        camera_logits: per camera ``[C, h, w]`` logits (MaskCLIP's, on the image it was fed).
        pairs: point–pixel pairs in the published images (``camera_index`` into the lists).
        image_sizes: per camera ``(H, W)`` of the published image, which the logits grid
            covers; a pixel ``(col, row)`` maps to ``floor(u · w / W)``, ``floor(v · h / H)``.
        temperature: softmax temperature of the logits.
    """
    if len(camera_logits) != len(image_sizes):
        raise ValueError(f"{len(camera_logits)} logit maps for {len(image_sizes)} image sizes")
    classes = {int(t.shape[0]) for t in camera_logits}
    if len(classes) > 1:
        raise ValueError(f"camera logits disagree on the number of classes: {sorted(classes)}")
    c = classes.pop() if classes else 0
    out = torch.zeros(pairs.num_pairs, c, dtype=torch.float32)
    for cam, (logits, (height, width)) in enumerate(zip(camera_logits, image_sizes, strict=True)):
        select = np.flatnonzero(pairs.camera_index == cam)
        if select.size == 0:
            continue
        h, w = int(logits.shape[-2]), int(logits.shape[-1])
        uv = pairs.uv[select].astype(np.float64)
        col = np.clip(np.floor(uv[:, 0] * (w / width)).astype(np.int64), 0, w - 1)
        row = np.clip(np.floor(uv[:, 1] * (h / height)).astype(np.int64), 0, h - 1)
        # gather on the logits' device: only [C, M] values cross to the CPU, never the map
        device = logits.device
        at = logits.detach()[:, torch.from_numpy(row).to(device), torch.from_numpy(col).to(device)]
        out[torch.from_numpy(select)] = torch.softmax(at.float().cpu().T / temperature, dim=1)
    return out


def fuse_probabilities(p3d: torch.Tensor, p2d: torch.Tensor, point_index: np.ndarray,
                       weight: float, seen: np.ndarray | None = None
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """``(1 - w)·p3d + w·mean(p2d of the point's pairs)`` where a pair exists; else ``p3d``.

    Args:
        p3d: ``[N, C]`` per-point probabilities.
        p2d: ``[M, C]`` per-pair probabilities.
        point_index: ``(M,)`` point of each pair (a point seen by k cameras has k pairs).
        weight: ``w`` in [0, 1].
        seen: ``(N,)`` bool, points ``p3d`` is defined for (others are never fused); None: all.
    Returns:
        ``[N, C]`` fused probabilities and the ``(N,)`` bool mask of fused points.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    n, c = p3d.shape
    if p2d.shape != (len(point_index), c):
        raise ValueError(f"p2d {tuple(p2d.shape)} must be [{len(point_index)}, {c}]")
    index = torch.as_tensor(np.asarray(point_index, dtype=np.int64))
    total = torch.zeros(n, c, dtype=torch.float32).index_add_(0, index, p2d.float())
    count = torch.bincount(index, minlength=n)
    in_view = (count > 0).numpy()
    if seen is not None:
        in_view &= seen
    fused = p3d.float().clone()
    rows = torch.from_numpy(np.flatnonzero(in_view))
    mean_2d = total[rows] / count[rows, None].float()
    fused[rows] = (1.0 - weight) * fused[rows] + weight * mean_2d
    return fused, in_view


def fuse_prediction(prediction: Prediction,
                    camera_logits: Sequence[torch.Tensor], pairs: PointPixelPairs,
                    image_sizes: Sequence[tuple[int, int]], weight: float,
                    temperature: float = TEMPERATURE) -> FusedLabels:
    """The key frame's labels with the cameras' MaskCLIP probabilities fused in.

    The camera logits must come from the text bank the prediction was labelled with;
    ``camera_logits``, ``pairs`` and ``image_sizes`` are as in :func:`pixel_probabilities`.
    """
    p3d, seen = key_point_probabilities(prediction)
    if pairs.num_pairs == 0:  # no camera sees a point: nothing to fuse
        p2d = torch.zeros(0, p3d.shape[1])
    else:
        p2d = pixel_probabilities(camera_logits, pairs, image_sizes, temperature)
        if p2d.shape[1] != p3d.shape[1]:
            raise ValueError(f"camera logits have {p2d.shape[1]} classes, the prediction "
                             f"{p3d.shape[1]}")
    fused, in_view = fuse_probabilities(p3d, p2d, pairs.point_index, weight, seen)
    n = p3d.shape[0]
    label = np.full(n, UNKNOWN_LABEL, dtype=np.uint16)
    score = np.zeros(n, dtype=np.float32)
    if seen.any():
        rows = torch.from_numpy(np.flatnonzero(seen))
        best, index = fused[rows].max(dim=1)
        label[seen] = index.numpy().astype(np.uint16)
        score[seen] = best.numpy()
    return FusedLabels(PointLabels(label, score), in_view)
