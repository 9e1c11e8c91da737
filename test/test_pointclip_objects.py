"""The PointCLIP object pass, ROS-free, with a tiny random CLIP: clusters largest first, texts and
colours, the time budget, the ensemble and its agreement, the refusals and a vocabulary swap.

The segmentation labels are given (two cars and a pedestrian on a road), so the clusters are
known; the network's logits favour each point's own class, so a large ensemble weight makes the
names known too.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.bundle import VocabularySpec

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                 reason="open_clip is not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

CLASSES = ("road", "car", "pedestrian")
PALETTE = ((128, 64, 128), (0, 0, 142), (220, 20, 60))
LOG = logging.getLogger("test_pointclip_objects")


class Labeller:
    """What the pass reads of a Predictor: vocabulary, palette, device, bundle."""

    def __init__(self, classes: tuple[str, ...] = CLASSES,
                 palette: tuple[tuple[int, int, int], ...] = PALETTE) -> None:
        self.vocabulary = VocabularySpec("street", classes, palette)
        self.device = torch.device("cpu")
        self.bundle = None

    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.vocabulary.palette, dtype=np.uint8).reshape(-1, 3)


def _blob(rng: np.random.Generator, center: tuple[float, float],
          size: tuple[float, float, float], n: int) -> np.ndarray:
    xyz = np.empty((n, 3), np.float32)
    xyz[:, 0] = center[0] + rng.uniform(-size[0] / 2, size[0] / 2, n)
    xyz[:, 1] = center[1] + rng.uniform(-size[1] / 2, size[1] / 2, n)
    xyz[:, 2] = rng.uniform(0, size[2], n)
    return xyz


def street() -> tuple[np.ndarray, np.ndarray]:
    """``xyz`` and labels: a road, a 600-point car at x = 10, a 450-point car, a pedestrian."""
    rng = np.random.default_rng(0)
    road = np.stack([rng.uniform(-20, 20, 800), rng.uniform(-8, 8, 800),
                     np.full(800, -0.3)], axis=1).astype(np.float32)
    parts = [(road, 0), (_blob(rng, (10.0, 2.0), (4.2, 1.8, 1.5), 600), 1),
             (_blob(rng, (-12.0, -3.0), (4.0, 1.8, 1.4), 450), 1),
             (_blob(rng, (5.0, -4.0), (0.6, 0.6, 1.7), 80), 2)]
    xyz = np.concatenate([p for p, _ in parts])
    label = np.concatenate([np.full(len(p), c, np.uint16) for p, c in parts])
    return xyz, label


def prediction(label: np.ndarray) -> SimpleNamespace:
    """Network logits favouring each point's class, over one sweep in frame order."""
    logits = torch.full((label.size, len(CLASSES)), -5.0)
    logits[torch.arange(label.size), torch.from_numpy(label.astype(np.int64))] = 5.0
    prepared = SimpleNamespace(sweep=np.zeros(label.size, np.int64),
                               source=np.arange(label.size))
    return SimpleNamespace(logits=logits, prepared=prepared)


def make_pass(labeller: Any = None, **settings: Any) -> Any:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    values = {"clip_model": "tiny-vit", "clip_pretrained": "random", "budget_ms": 60_000.0,
              **settings}
    torch.manual_seed(0)  # the random CLIP's weights
    return ObjectPass(ObjectSettings(**values), labeller or Labeller(), LOG)


@pytest.fixture(scope="module")
def clip() -> tuple[Any, Any]:
    from clip2scene_ros.pointclip.object_pass import load_objects_clip

    torch.manual_seed(0)
    return load_objects_clip("tiny-vit", "random", torch.device("cpu"), LOG)


def test_objects_largest_first_named_by_the_ensemble_and_delivered_inside_the_pass(
        clip: Any) -> None:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    objects = ObjectPass(ObjectSettings("tiny-vit", "random", 60_000.0, ensemble_weight=1e4),
                         Labeller(), LOG, clip)
    xyz, label = street()
    score = np.full(label.size, 0.75, np.float32)
    delivered: list[Any] = []
    done = objects.run(xyz, label, score, prediction(label), delivered.append)
    assert (done.objects, done.classified, done.skipped) == (3, 3, 0)
    assert delivered == [done.results]  # delivered once, inside the pass
    assert [r.text for r in done.results] == ["car p=1.00", "car p=1.00", "pedestrian p=1.00"]
    assert all(r.classified for r in done.results)
    assert done.results[0].color == PALETTE[1] and done.results[2].color == PALETTE[2]
    first = done.results[0].instance  # the 600-point car at x = 10, 4.2 m long
    assert first.num_points == 600 and 9.5 < first.box.center[0] < 10.5
    corners = first.box.corners()
    assert 7.5 < corners[:, 0].min() < 8.2 and 11.8 < corners[:, 0].max() < 12.5
    counts = objects.counts
    assert counts["compared"] == counts["classified"] == 3 and counts["passes"] == 1
    values = objects.diagnostics()
    assert values["objects_ensemble"] == "weight 10000.0" and values["objects_found"] == "3"
    agreed = re.fullmatch(r"(\d\.\d{3}) \((\d+) of (\d+) objects\)", values["objects_agreement"])
    assert agreed is not None and agreed[3] == "3"
    assert float(agreed[1]) == pytest.approx(int(agreed[2]) / 3, abs=1e-3)


def test_zero_budget_leaves_every_object_to_the_segmentation(clip: Any) -> None:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    objects = ObjectPass(ObjectSettings("tiny-vit", "random", 0.0), Labeller(), LOG, clip)
    xyz, label = street()
    for _ in range(2):
        done = objects.run(xyz, label, np.full(label.size, 0.75, np.float32))
    assert [r.text for r in done.results] == [
        "car (3D) p=0.75", "car (3D) p=0.75", "pedestrian (3D) p=0.75"]
    assert not any(r.classified for r in done.results)
    assert [r.color for r in done.results] == [PALETTE[1], PALETTE[1], PALETTE[2]]
    assert objects.counts["classified"] == 0 and objects.counts["skipped"] == 6
    values = objects.diagnostics()
    assert values["objects_classified"] == "0" and values["objects_skipped_budget"] == "6"
    assert values["objects_agreement"] == "n/a"


def test_no_ensemble_without_logits_or_when_object_classes_are_not_labelling_classes(
        clip: Any, caplog: pytest.LogCaptureFixture) -> None:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    objects = ObjectPass(ObjectSettings("tiny-vit", "random", 60_000.0, ensemble_weight=2.0),
                         Labeller(), LOG, clip)
    xyz, label = street()
    with caplog.at_level(logging.WARNING):
        done = objects.run(xyz, label, np.ones(label.size, np.float32), prediction=None)
        objects.run(xyz, label, np.ones(label.size, np.float32), prediction=None)
    assert done.classified == 3 and objects.counts["compared"] == 0
    assert caplog.text.count("no ensemble") == 1  # warned once
    # an objects vocabulary with a class the segmentation lacks: the ensemble is off
    other = ObjectPass(ObjectSettings("tiny-vit", "random", 60_000.0, ensemble_weight=2.0,
                                      vocabulary="modelnet40"), Labeller(), LOG, clip)
    assert other.ensemble.startswith("off")


def test_refusals_name_the_parameter(clip: Any) -> None:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    with pytest.raises(ConfigError) as info:
        ObjectPass(ObjectSettings("tiny-vit", "random", classes=("tree",)), Labeller(), LOG, clip)
    assert info.value.key == "objects_classes"
    with pytest.raises(ConfigError) as info:
        ObjectPass(ObjectSettings("tiny-vit", "random", classes=("road",),
                                  vocabulary="no_such_vocab"), Labeller(), LOG, clip)
    assert info.value.key == "objects_vocabulary"
    with pytest.raises(ConfigError) as info:  # no object class in the vocabulary at all
        ObjectPass(ObjectSettings("tiny-vit", "random"),
                   Labeller(("road", "sky"), PALETTE[:2]), LOG, clip)
    assert info.value.key == "objects_classes"


def test_a_vocabulary_swap_without_objects_empties_the_pass_until_it_has_them(
        clip: Any, caplog: pytest.LogCaptureFixture) -> None:
    from clip2scene_ros.pointclip.object_pass import ObjectPass, ObjectSettings

    labeller = Labeller()
    objects = ObjectPass(ObjectSettings("tiny-vit", "random", 60_000.0,
                                        classes=("car", "pedestrian")), labeller, LOG, clip)
    xyz, label = street()
    score = np.ones(label.size, np.float32)
    labeller.vocabulary = VocabularySpec("bare", ("road", "sky", "wall"), PALETTE)
    with caplog.at_level(logging.ERROR):
        assert objects.run(xyz, label, score).objects == 0
    assert "no objects until the vocabulary has them" in caplog.text
    labeller.vocabulary = VocabularySpec("back", CLASSES, PALETTE)
    assert objects.run(xyz, label, score).objects == 3
