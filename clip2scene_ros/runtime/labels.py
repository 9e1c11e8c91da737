"""Point features → labels and scores against a text bank (the open-vocabulary head).

The student's point features live in CLIP's text space, so labelling is a cosine similarity with
the text bank's rows; swapping the bank swaps the vocabulary without touching the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..codecs.pointcloud2 import UNKNOWN_LABEL
from ..preprocess import PreparedCloud

#: CLIP's learned logit scale (100) turns cosines into logits whose softmax is meaningful; the
#: same constant MaskCLIP and zero-shot CLIP use.
LOGIT_SCALE = 100.0


def text_logits(features: torch.Tensor, text_bank: torch.Tensor,
                logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """``[N, C]`` scaled cosine similarities of point features ``[N, D]`` with ``[C, D]``."""
    if features.shape[-1] != text_bank.shape[-1]:
        raise ValueError(f"features have {features.shape[-1]} dims, the text bank "
                         f"{text_bank.shape[-1]}")
    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    bank = torch.nn.functional.normalize(text_bank.to(feats), dim=-1)
    return logit_scale * feats @ bank.T


@dataclass(frozen=True)
class PointLabels:
    """Per point of the key frame (in Frame order): class index (or UNKNOWN_LABEL) and score."""

    label: np.ndarray  # (N,) uint16
    score: np.ndarray  # (N,) float32 softmax probability of the label; 0 where unknown


def scatter_to_key_frame(prepared: PreparedCloud, logits: torch.Tensor) -> PointLabels:
    """Labels for every key-frame point; points the network did not see are UNKNOWN_LABEL."""
    n = prepared.key_points
    label = np.full(n, UNKNOWN_LABEL, dtype=np.uint16)
    score = np.zeros(n, dtype=np.float32)
    if logits.shape[0] != prepared.num_points:
        raise ValueError(f"{logits.shape[0]} logits for {prepared.num_points} prepared points")
    if logits.shape[1] >= UNKNOWN_LABEL:
        raise ValueError(f"{logits.shape[1]} classes do not fit the uint16 label field")
    key = prepared.sweep == 0
    if key.any():
        probs = torch.softmax(logits[torch.from_numpy(key)].float(), dim=1)
        best, index = probs.max(dim=1)
        rows = prepared.source[key]
        label[rows] = index.cpu().numpy().astype(np.uint16)
        score[rows] = best.cpu().numpy()
    return PointLabels(label, score)
