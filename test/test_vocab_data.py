"""The shipped vocabularies and prompt-template sets: counts, names, ids and templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.errors import ConfigError
from clip2scene_ros.teacher.prompts import load_prompts
from clip2scene_ros.vocabulary import Vocabulary, builtin_vocabulary, load_vocabulary

DATASETS = {"nuscenes": 16, "semantickitti": 19, "scannet": 20, "cityscapes": 19}
SHIPPED = [*DATASETS, "custom_example", "sample_drive"]

# docs/reference §1.6, label-id order, underscores literal
NUSCENES = ["barrier", "bicycle", "bus", "car", "construction vehicle", "motorcycle",
            "pedestrian", "traffic_cone", "trailer", "truck", "driveable surface", "other_flat",
            "sidewalk", "terrain", "manmade", "vegetation"]
SEMANTICKITTI = ["car", "bicycle", "motorcycle", "truck", "other vehicle", "person", "bicyclist",
                 "motorcyclist", "road", "parking", "sidewalk", "other ground", "building",
                 "fence", "vegetation", "trunk", "terrain", "pole", "traffic sign"]
SCANNET = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
           "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain",
           "toilet", "sink", "bathtub", "other furniture"]
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
              "bus", "train", "motorcycle", "bicycle"]
SCENE_TEMPLATES = ("there is a {} in the scene.", "there is the {} in the scene.",
                   "this is a {} in the scene.", "this is the {} in the scene.",
                   "this is one {} in the scene.")


def vocab(name: str) -> Vocabulary:
    return load_vocabulary(builtin_vocabulary(name))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_vocabulary_loads_and_validates(name: str) -> None:
    v = vocab(name)
    v.validate()
    assert v.name == name
    colors = [c.color for c in v.classes]
    assert len(set(colors)) == len(colors), "classes must be told apart by colour"
    if name != "sample_drive":
        assert v.prompts == "maskclip_85"
        assert load_prompts(v.prompts)


@pytest.mark.parametrize(("name", "count"), DATASETS.items())
def test_dataset_class_counts_and_ids(name: str, count: int) -> None:
    v = vocab(name)
    assert len(v.classes) == count
    assert all(c.ids for c in v.classes), "every benchmark class maps some label ids"


@pytest.mark.parametrize(("name", "names"), [("nuscenes", NUSCENES),
                                             ("semantickitti", SEMANTICKITTI),
                                             ("scannet", SCANNET), ("cityscapes", CITYSCAPES)])
def test_class_names_match_the_reference(name: str, names: list[str]) -> None:
    assert vocab(name).names == names


def test_nuscenes_ids_are_the_16_class_ids() -> None:
    v = vocab("nuscenes")
    assert [c.ids for c in v.classes] == [(i,) for i in range(1, 17)]
    assert v.ignore_ids == (0,)
    assert v.map_labels(np.arange(17)).tolist() == [-1, *range(16)]


def test_semantickitti_maps_raw_ids_like_the_learning_map() -> None:
    v = vocab("semantickitti")
    table = v.label_map()
    car, road, other = v.names.index("car"), v.names.index("road"), v.names.index("other vehicle")
    assert table[10] == car and table[252] == car  # moving car folds into car
    assert table[258] == v.names.index("truck")
    assert table[254] == v.names.index("person")
    assert table[253] == v.names.index("bicyclist")
    assert table[255] == v.names.index("motorcyclist")
    assert [table[i] for i in (13, 16, 20, 256, 257, 259)] == [other] * 6
    assert table[60] == road  # lane marking is road in the official learning map
    for ignored in (0, 1, 52, 99):
        assert table[ignored] == -1
    # the .label files carry the instance id in the upper 16 bits; only the lower half maps
    raw = np.array([10 | (7 << 16), 252 | (3 << 16), 99], dtype=np.uint32) & 0xFFFF
    assert v.map_labels(raw).tolist() == [car, car, -1]
    mapped = {i for c in v.classes for i in c.ids}
    assert len(mapped) == sum(len(c.ids) for c in v.classes)
    assert not mapped & set(v.ignore_ids)


def test_scannet_and_cityscapes_ids() -> None:
    scannet = vocab("scannet")
    assert [c.ids[0] for c in scannet.classes] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16,
                                                   24, 28, 33, 34, 36, 39]
    assert scannet.label_map()[40] == -1
    city = vocab("cityscapes")
    assert [c.ids[0] for c in city.classes] == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                26, 27, 28, 31, 32, 33]
    assert city.map_labels(np.array([0, 7, 33, 34])).tolist() == [-1, 0, 18, -1]


def test_custom_example_is_open_vocabulary() -> None:
    v = vocab("custom_example")
    assert len(v.classes) == 6 and all(c.synonyms and not c.ids for c in v.classes)
    assert "traffic cone" in v.names


def test_maskclip_85_templates() -> None:
    templates = load_prompts("maskclip_85")
    assert len(templates) == 85 and len(set(templates)) == 85
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[-5:] == SCENE_TEMPLATES
    assert templates[0] == "a bad photo of a {}." and templates[79] == "a tattoo of the {}."


def test_maskclip_80_are_clips_imagenet_templates() -> None:
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    reference = tuple(f("{}") for f in metadata.OPENAI_IMAGENET_TEMPLATES)
    assert load_prompts("maskclip_85")[:80] == reference


def test_single_template_and_paths(tmp_path: Path) -> None:
    assert load_prompts("single") == ("a photo of a {}.",)
    listed = tmp_path / "mine.yaml"
    listed.write_text('- "a {} on the road."\n- "a blurry {}."\n')
    assert load_prompts(listed) == ("a {} on the road.", "a blurry {}.")
    assert load_prompts(str(listed)) == load_prompts(listed)


@pytest.mark.parametrize("bad", ['["a photo of a car."]', '["a {} and a {}."]', '["a {0}."]',
                                 '["a {name}."]', "[]", "templates: [3]", "{templates: 3}"])
def test_bad_templates_are_refused(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError):
        load_prompts(path)


def test_unknown_prompt_set() -> None:
    with pytest.raises(ConfigError, match="maskclip_85"):
        load_prompts("no_such_set")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts("/nonexistent/prompts.yaml")
