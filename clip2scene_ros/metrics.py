"""Segmentation metrics: a confusion matrix with per-class IoU, mIoU and accuracy.

Shared by offline evaluation, the trainer's validation, replay evaluation and the teacher's own
quality report, so every figure of the package is computed one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["UNLABELLED_COLUMN", "ConfusionMatrix", "nan_to_none"]

#: Name of the confusion matrix's last column: points the network gave no label.
UNLABELLED_COLUMN = "<unlabelled>"


class ConfusionMatrix:
    """Accumulates ``(prediction, target)`` pairs of class indices into a confusion matrix.

    ``counts[t, p]`` is the number of points of true class ``t`` predicted as ``p``; the extra
    column ``counts[t, C]`` holds points whose prediction is not a class index at all (e.g.
    ``UNKNOWN_LABEL``), which count as wrong. Targets equal to ``ignore_index`` are skipped.

    Matrices of disjoint shards add up (``a + b``, or ``sum(shards)``) to the matrix of the
    whole, since every statistic is derived from the integer counts.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (0..{num_classes - 1})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one batch; ``pred`` and ``target`` are integer arrays of the same shape."""
        pred = np.asarray(pred).reshape(-1)
        target = np.asarray(target).reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"pred has {pred.size} values, target {target.size}")
        if pred.dtype.kind not in "ui" or target.dtype.kind not in "ui":
            raise ValueError(f"labels must be integers, got {pred.dtype} and {target.dtype}")
        # int64 first: uint16 UNKNOWN_LABEL and a negative ignore_index must compare correctly
        pred = pred.astype(np.int64, copy=False)
        target = target.astype(np.int64, copy=False)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        c = self.num_classes
        if target.size and (int(target.min()) < 0 or int(target.max()) >= c):
            # a target outside the classes is a label-mapping bug, never silently ignored
            bad = target[(target < 0) | (target >= c)][0]
            raise ValueError(f"target {int(bad)} is neither a class index (0..{c - 1}) nor "
                             f"ignore_index {self.ignore_index}")
        column = np.where((pred >= 0) & (pred < c), pred, c)
        flat = np.bincount(target * (c + 1) + column, minlength=c * (c + 1))
        self.counts += flat.reshape(c, c + 1)

    @property
    def matrix(self) -> np.ndarray:
        """``(C, C)`` counts between classes (the unlabelled column left out)."""
        return self.counts[:, : self.num_classes]

    @property
    def total(self) -> int:
        """Evaluated (not ignored) points, including the unlabelled ones."""
        return int(self.counts.sum())

    @property
    def unlabelled(self) -> int:
        return int(self.counts[:, -1].sum())

    def iou(self) -> np.ndarray:
        """``(C,)`` float64 ``TP / (TP + FP + FN)``; NaN for a class absent from target and pred.

        An unlabelled point is a false negative of its true class and no class's false positive.
        """
        tp = np.diag(self.matrix).astype(np.float64)
        fp = self.matrix.sum(axis=0) - tp
        fn = self.counts.sum(axis=1) - tp
        union = tp + fp + fn
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes present in the target or the prediction (NaN when none).

        Classes absent from both are left out (their IoU is undefined, not 0): a scene without
        trains must not lower the score. A class predicted but never true has IoU 0 and counts,
        so false alarms of rare classes are penalised. This is the ``nanmean`` convention of
        mmdetection3d's ``seg_eval``; the official SemanticKITTI script instead averages all
        classes, which agrees whenever every class occurs in the evaluated split.
        """
        iou = self.iou()
        if np.isnan(iou).all():
            return float("nan")
        return float(np.nanmean(iou))

    def accuracy(self) -> float:
        """Overall point accuracy (unlabelled points are wrong); NaN with no evaluated points."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {self.num_classes}-class matrix (ignore {self.ignore_index}) "
                f"with a {other.num_classes}-class one (ignore {other.ignore_index})"
            )
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.counts = self.counts + other.counts
        return out

    def __radd__(self, other: object) -> ConfusionMatrix:
        # lets the builtin sum() start from 0 over a list of shard matrices
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-ready metrics; undefined values (NaN) become ``None`` (JSON ``null``)."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        return {
            "miou": nan_to_none(self.miou()),
            "accuracy": nan_to_none(self.accuracy()),
            "per_class_iou": {name: nan_to_none(float(v))
                              for name, v in zip(class_names, self.iou(), strict=True)},
            "points": self.total,
            "unlabelled_points": self.unlabelled,
            "class_names": list(class_names),
            "confusion": self.counts.tolist(),
            "confusion_columns": [*class_names, UNLABELLED_COLUMN],
            "ignore_index": self.ignore_index,
        }


def nan_to_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
