"""One training sample and the batch the network and the losses read.

:class:`Sample` is one prepared keyframe: rows ``[N]`` are points of the prepared cloud (the
network input, augmented, in voxel units), rows ``[M]`` its point–pixel pairs (always keyframe
points), with the teacher's labels and features where a cache gives them.

:func:`collate` (the DataLoader's ``collate_fn``) concatenates samples in order. ``batch`` is the
sample position, or ``b + B · sweep`` when the samples' sweeps were augmented independently (the
code's layout: every sweep its own sub-cloud, since S differently rotated copies overlaid in one
cloud mean nothing). Pairs name global point rows and global image rows; SSR cell ids are made
unique across the batch. ``PointTensor(batch["feats"], batch["coords"], batch["batch"])`` is the
network input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Sample", "collate"]


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
