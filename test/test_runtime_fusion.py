"""Camera fusion maths on constructed inputs: p = (1 - w)·p3d + w·mean(p2d), exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip2scene_ros.codecs import UNKNOWN_LABEL
from clip2scene_ros.geometry.correspondence import PointPixelPairs
from clip2scene_ros.preprocess import PreparedCloud
from clip2scene_ros.runtime.fusion import (
    TEMPERATURE,
    fuse_prediction,
    fuse_probabilities,
    key_point_probabilities,
)
from clip2scene_ros.runtime.labels import LOGIT_SCALE, scatter_to_key_frame, text_logits
from clip2scene_ros.runtime.predictor import Prediction


def test_fuse_probabilities_is_the_weighted_sum_of_the_mean_over_cameras() -> None:
    # binary fractions: every product and sum below is exact in float32
    p3d = torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])
    p2d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    fused, in_view = fuse_probabilities(p3d, p2d, np.array([0, 0, 2]), 0.5)
    expected = torch.tensor([[0.375, 0.375, 0.25], [0.0, 1.0, 0.0], [0.75, 0.125, 0.125]])
    assert torch.equal(fused, expected)
    assert in_view.tolist() == [True, False, True]
    # a point p3d is undefined for is never fused
    fused, in_view = fuse_probabilities(p3d, p2d, np.array([0, 0, 2]), 0.5,
                                        seen=np.array([True, True, False]))
    assert in_view.tolist() == [True, False, False] and torch.equal(fused[2], p3d[2])
    with pytest.raises(ValueError, match="weight"):
        fuse_probabilities(p3d, p2d, np.array([0, 0, 2]), 1.5)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _scene() -> tuple[Prediction, torch.Tensor, list[torch.Tensor], PointPixelPairs]:
    """Four key points (point 1 never reached the network) plus one past-sweep point, three
    classes, two cameras: camera 0 is 4x4 with a 2x2 logit grid, camera 1 is 2x2 with 2x2."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[1.0, 0.02], [0.03, 1.0], [1.0, 0.1], [0.5, 0.5]])
    prepared = PreparedCloud(coords=np.zeros((4, 3), np.float32),
                             feats=np.zeros((4, 1), np.float32),
                             source=np.array([0, 2, 3, 0]), sweep=np.array([0, 0, 0, 1], np.uint8),
                             key_points=4)
    labels = scatter_to_key_frame(prepared, text_logits(features, bank))
    prediction = Prediction(labels, prepared, {}, features, text_logits(features, bank))
    cam0 = torch.zeros(3, 2, 2)
    cam0[:, 0, 0] = torch.tensor([0.0, 0.0, 0.05])  # point 0: class 2 leads by 5 (scaled)
    cam0[:, 1, 1] = torch.tensor([0.02, 0.0, 0.0])  # point 3 (pixel 3.5, 3.5 -> cell 1, 1)
    cam1 = torch.zeros(3, 2, 2)
    cam1[:, 1, 1] = torch.tensor([0.0, 0.01, 0.04])  # point 0 again
    pairs = PointPixelPairs(
        point_index=np.array([0, 3, 0], np.int64),
        camera_index=np.array([0, 0, 1], np.int32),
        uv=np.array([[0.5, 1.5], [3.5, 3.5], [1.2, 1.7]], np.float32),
        pixel=np.array([[0, 1], [3, 3], [1, 1]], np.int32),
        depth=np.ones(3, np.float32))
    return prediction, bank, [cam0, cam1], pairs


def test_fuse_prediction_matches_the_formula_and_keeps_points_out_of_view() -> None:
    prediction, bank, cams, pairs = _scene()
    w = 0.6
    fused = fuse_prediction(prediction, cams, pairs, [(4, 4), (2, 2)], w)
    assert fused.in_view.tolist() == [True, False, False, True]

    # the formula, in float64 numpy, from the raw inputs
    f = prediction.features.double().numpy()
    b = bank.double().numpy()
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                                keepdims=True)).T
    p3d = np.zeros((4, 3))
    p3d[[0, 2, 3]] = _softmax(LOGIT_SCALE * cos[:3])
    c0, c1 = (c.double().numpy() for c in cams)
    # camera 0: uv (0.5, 1.5) on a 4x4 image -> cell (col 0, row 0); (3.5, 3.5) -> (1, 1)
    p2d_0 = (_softmax(c0[:, 0, 0] / TEMPERATURE) + _softmax(c1[:, 1, 1] / TEMPERATURE)) / 2
    p2d_3 = _softmax(c0[:, 1, 1] / TEMPERATURE)
    expected = p3d.copy()
    expected[0] = (1 - w) * p3d[0] + w * p2d_0
    expected[3] = (1 - w) * p3d[3] + w * p2d_3
    seen = [0, 2, 3]
    assert fused.labels.label[seen].tolist() == expected[seen].argmax(axis=1).tolist()
    np.testing.assert_allclose(fused.labels.score[seen], expected[seen].max(axis=1), atol=1e-6)
    assert fused.labels.label[1] == UNKNOWN_LABEL and fused.labels.score[1] == 0.0
    # the image changed point 0's label; the point out of view is the network's, bit for bit
    assert prediction.labels.label[0] == 0 and fused.labels.label[0] == 2
    assert fused.labels.label[2] == prediction.labels.label[2]
    assert fused.labels.score[2] == prediction.labels.score[2]


def test_weight_zero_is_the_network_and_weight_one_the_image() -> None:
    prediction, _, cams, pairs = _scene()
    none = fuse_prediction(prediction, cams, pairs, [(4, 4), (2, 2)], 0.0)
    assert np.array_equal(none.labels.label, prediction.labels.label)
    assert np.array_equal(none.labels.score, prediction.labels.score)
    image = fuse_prediction(prediction, cams, pairs, [(4, 4), (2, 2)], 1.0)
    assert image.labels.label[0] == 2 and image.labels.label[3] == 0
    # no pairs at all: the prediction unchanged
    empty = PointPixelPairs(np.zeros(0, np.int64), np.zeros(0, np.int32),
                            np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int32),
                            np.zeros(0, np.float32))
    alone = fuse_prediction(prediction, [], empty, [], 0.5)
    assert np.array_equal(alone.labels.label, prediction.labels.label)
    assert not alone.in_view.any()


def test_key_point_probabilities_are_the_predictors() -> None:
    prediction, _, _, _ = _scene()
    probs, seen = key_point_probabilities(prediction)
    assert seen.tolist() == [True, False, True, True]
    best, index = probs[torch.from_numpy(seen)].max(dim=1)
    assert index.numpy().tolist() == prediction.labels.label[seen].tolist()
    assert np.array_equal(best.numpy(), prediction.labels.score[seen])
