"""Vocabulary files: validation, palette and dataset-id mapping."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.config import load_config
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.vocabulary import (
    Vocabulary,
    builtin_vocabulary,
    known_thing_names,
    load_vocabulary,
)


def test_sample_drive_vocabulary() -> None:
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    assert vocab.names[:3] == ["road", "sidewalk", "building"]
    assert len(vocab.names) == 8
    assert vocab.palette.shape == (8, 3)
    assert vocab.palette.dtype == np.uint8
    mapped = vocab.map_labels(np.array([0, 1, 5, 8, 9, 70000]))
    assert mapped.tolist() == [-1, 0, 4, 7, -1, -1]


def test_unknown_builtin_lists_the_shipped_ones() -> None:
    with pytest.raises(FileNotFoundError, match="sample_drive"):
        builtin_vocabulary("no_such_vocab")


@pytest.mark.parametrize(
    ("classes", "key"),
    [
        ([], "classes"),
        ([{"name": "a", "color": [0, 0, 0]}, {"name": "a", "color": [1, 1, 1]}], "classes"),
        ([{"name": "a", "color": [0, 0, 300]}], "classes[0].color"),
        ([{"name": "a", "color": [0, 0]}], "classes[0].color"),
        (
            [{"name": "a", "color": [0, 0, 0], "ids": [1]}, {"name": "b", "color": [0, 0, 0],
                                                              "ids": [1]}],
            "classes[1].ids",
        ),
    ],
)
def test_invalid_vocabularies(classes: list, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Vocabulary, {"name": "v", "classes": classes})
    assert info.value.key == key


def test_thing_flags_of_the_shipped_vocabularies() -> None:
    drive = load_vocabulary(builtin_vocabulary("sample_drive"))
    assert drive.thing_names == ("car", "pedestrian", "pole", "traffic sign")
    nuscenes = load_vocabulary(builtin_vocabulary("nuscenes"))
    assert "traffic_cone" in nuscenes.thing_names and "manmade" not in nuscenes.thing_names
    assert load_vocabulary(builtin_vocabulary("scannet")).thing_names == ()
    known = known_thing_names()
    assert {"car", "pedestrian", "person", "traffic cone", "traffic light", "cyclist",
            "other vehicle", "construction barrier", "vehicle"} <= known
    assert not {"road", "vegetation", "building", "manmade"} & known


def test_the_bundle_spec_carries_the_thing_flags() -> None:
    from clip2scene_ros.models.bundle import VocabularySpec
    from clip2scene_ros.teacher.text_bank import vocabulary_spec

    spec = vocabulary_spec(load_vocabulary(builtin_vocabulary("sample_drive")))
    assert spec.things == ("car", "pedestrian", "pole", "traffic sign")
    old = {"name": "old", "classes": ["road", "car"], "palette": [[0, 0, 0], [1, 1, 1]]}
    assert load_config(VocabularySpec, old).things == ()  # written before the flag
    with pytest.raises(ConfigError) as info:
        load_config(VocabularySpec, {**old, "things": ["tree"]})
    assert info.value.key == "things"
