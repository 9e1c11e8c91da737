"""The open-vocabulary head: cosine logits against a text bank, labels back onto the key frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip2scene_ros.codecs import UNKNOWN_LABEL
from clip2scene_ros.preprocess import PreparedCloud
from clip2scene_ros.runtime.labels import LOGIT_SCALE, scatter_to_key_frame, text_logits


def test_text_logits_are_scaled_cosines_and_scale_free() -> None:
    feats = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expected = LOGIT_SCALE * torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]])
    assert torch.allclose(text_logits(feats, bank), expected)
    assert torch.allclose(text_logits(5 * feats, bank), expected)
    with pytest.raises(ValueError, match="3 dims"):
        text_logits(torch.zeros(1, 3), bank)


def test_swapping_the_bank_swaps_the_labels() -> None:
    feats = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    a = text_logits(feats, torch.eye(2)).argmax(1)
    b = text_logits(feats, torch.eye(2).flip(0)).argmax(1)
    assert a.tolist() == [0, 1] and b.tolist() == [1, 0]


def test_labels_land_on_key_frame_points_only() -> None:
    # 4 key points (point 2 was filtered out), 2 points of a past sweep
    prepared = PreparedCloud(
        coords=np.zeros((5, 3), np.float32), feats=np.zeros((5, 1), np.float32),
        source=np.array([0, 1, 3, 4, 5]), sweep=np.array([0, 0, 0, 1, 1], np.uint8),
        key_points=4)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 1.0], [9.0, 0.0], [0.0, 9.0]])
    out = scatter_to_key_frame(prepared, logits)
    assert out.label.tolist() == [0, 1, UNKNOWN_LABEL, 0]
    assert out.label.dtype == np.uint16
    np.testing.assert_allclose(out.score, [1 / (1 + np.exp(-5)), 1 / (1 + np.exp(-5)), 0, 0.5],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="4 logits for 5"):
        scatter_to_key_frame(prepared, logits[:4])
