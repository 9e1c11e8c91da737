"""Simulated MaskCLIP teacher on a 3-frame sample drive: ground truth degraded as specified.

One file because every test reads the same 3-frame drive and spec fixtures: spec errors, the
noise model, determinism, the cache format and the quality report of the one simulated teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("open_clip")


from clip2scene_ros.bag.reader import BagReader
from clip2scene_ros.cli import main
from clip2scene_ros.config import load_config
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.geometry.correspondence import point_pixel_pairs
from clip2scene_ros.sample.drive import LABELS_TOPIC, small_rig, write_sample_drive
from clip2scene_ros.teacher import cache as cache_module
from clip2scene_ros.teacher import simulated as simulated_module
from clip2scene_ros.teacher.cache import TeacherCache
from clip2scene_ros.teacher.labeller import scale_pixels
from clip2scene_ros.teacher.quality import teacher_quality
from clip2scene_ros.teacher.run import run_teacher, run_teacher_on_frames
from clip2scene_ros.teacher.simulated import (
    ConfusionSpec,
    ResolvedSpec,
    SimulationSpec,
    load_spec,
    patch_labels,
    resolve,
    resolve_spec_path,
)
from clip2scene_ros.teacher.text_bank import (
    build_text_bank,
    load_text_bank,
    resolve_vocabulary,
)
from clip2scene_ros.vocabulary import config_dir

pytestmark = pytest.mark.filterwarnings("ignore:CLIP tiny-vit has random weights")

#: Keywords of every run that should hit the cache key of the shipped spec with features.
SIM = {"simulate": "maskclip_like", "store_features": True, "frames_per_shard": 1,
       "progress": False}
CLASSES = ("road", "sidewalk", "building", "vegetation", "car", "pedestrian", "pole",
           "traffic sign")
ROAD, SIDEWALK, BUILDING, VEGETATION, CAR, PEDESTRIAN = range(6)
CACHE_LOGGER = "clip2scene_ros.teacher.cache"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simulated")


@pytest.fixture(scope="module")
def drive(root: Path) -> Path:
    path = root / "drive"
    write_sample_drive(path, frames=3, seed=0, rig=small_rig())
    return path


@pytest.fixture(scope="module")
def unlabelled(root: Path, drive: Path, bag_without: Any) -> Path:
    """A copy of the drive without its ground-truth label topic."""
    return bag_without(drive, root / "unlabelled", LABELS_TOPIC)


@pytest.fixture(scope="module")
def bank(root: Path, one_torch_thread: None) -> Path:
    path = root / "bank"
    build_text_bank("sample_drive", model="tiny-vit", pretrained="random", out=path,
                    prompts="single")
    return path


@pytest.fixture(scope="module")
def rows(bank: Path) -> np.ndarray:
    """The bank's [C, D] rows as float32."""
    return load_text_bank(bank)[0].numpy().astype(np.float32)


@pytest.fixture(scope="module")
def sim_cache(root: Path, drive: Path, bank: Path) -> Path:
    out = root / "sim"
    report = run_teacher(drive, str(bank), out, **SIM)
    assert report.complete and (report.frames, report.computed, report.shards) == (3, 3, 3)
    return out


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(resolve_spec_path("maskclip_like").read_text())


def _spec_dict(**fields: Any) -> dict[str, Any]:
    """The shipped spec with top-level fields replaced (mappings are merged one level deep)."""
    data = _shipped()
    for key, value in fields.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def _write_spec(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(_spec_dict(**fields)))
    return path


def _truth(frame: Any) -> np.ndarray:
    return resolve_vocabulary("sample_drive").map_labels(frame.labels)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- patch labels

#: (col, row) pixels of a 32x32 image cut into 2x2 patches of 16x16, and each pair's class.
PIXELS = np.array([
    [1, 1], [15, 15], [8, 3],            # patch 0: road, road, sidewalk
    [16, 0], [31, 15], [20, 5], [25, 9],  # patch 1: building, sidewalk, unlabelled x2 (a tie)
    [0, 16], [15, 31],                    # patch 2: unlabelled only
    [16, 16], [31, 31], [20, 20],         # patch 3: car, car, vegetation
])
TRUTH = np.array([ROAD, ROAD, SIDEWALK, BUILDING, SIDEWALK, -1, -1, -1, -1, CAR, CAR,
                  VEGETATION])
#: Patch 2's pairs are dropped; every other pair takes its patch's majority.
KEEP = np.array([True] * 7 + [False] * 2 + [True] * 3)
MAJORITY = np.array([ROAD] * 3 + [SIDEWALK] * 4 + [CAR] * 3)
SETS = {"road": ("sidewalk", "building"), "car": ("pedestrian",)}


def _hand(probability: float, sets: dict[str, tuple[str, ...]] | None = None) -> ResolvedSpec:
    return resolve(SimulationSpec(
        name="hand", vocabulary="sample_drive", image_size=(32, 32), patch_size=(16, 16),
        confusion=ConfusionSpec(probability=probability, sets=SETS if sets is None else sets)))


def test_resolve_maps_sets_to_class_indices() -> None:
    resolved = _hand(0.5)
    assert resolved.classes == CLASSES and resolved.spec.grid == (2, 2)
    assert resolved.confusion == ((SIDEWALK, BUILDING), (), (), (), (PEDESTRIAN,), (), (), ())


def test_patch_majority_ties_and_unlabelled_patches() -> None:
    resolved = _hand(0.0)  # probability 0: the sets are never used
    for seed in range(20):
        got = patch_labels(PIXELS, TRUTH, resolved, np.random.default_rng(seed))
        np.testing.assert_array_equal(got.keep, KEEP)
        np.testing.assert_array_equal(got.label, MAJORITY)
        assert not got.replaced.any() and got.replaced.shape == (10,)
    # The order of the pairs does not matter (the tie too), only the counts.
    order = np.random.default_rng(3).permutation(len(TRUTH))
    got = patch_labels(PIXELS[order], TRUTH[order], resolved, np.random.default_rng(0))
    np.testing.assert_array_equal(got.keep, KEEP[order])
    per_pair = np.full(len(TRUTH), -1)
    per_pair[KEEP] = MAJORITY
    np.testing.assert_array_equal(got.label, per_pair[order][KEEP[order]])


def test_non_square_patches_group_by_height_and_width() -> None:
    resolved = resolve(SimulationSpec(name="wide", vocabulary="sample_drive",
                                      image_size=(32, 64), patch_size=(16, 32),
                                      confusion=ConfusionSpec(probability=0.0)))
    assert resolved.spec.grid == (2, 2)
    pixels = np.array([[0, 0], [31, 15], [16, 8], [32, 0], [5, 16], [63, 31]])
    truth = np.array([ROAD, ROAD, SIDEWALK, CAR, BUILDING, -1])
    got = patch_labels(pixels, truth, resolved, np.random.default_rng(0))
    np.testing.assert_array_equal(got.keep, [True] * 5 + [False])
    np.testing.assert_array_equal(got.label, [ROAD, ROAD, ROAD, CAR, BUILDING])


def test_all_unlabelled_drops_every_pair() -> None:
    got = patch_labels(PIXELS, np.full(len(PIXELS), -1), _hand(1.0), np.random.default_rng(0))
    assert not got.keep.any() and got.label.size == 0 and got.replaced.size == 0


def test_probability_one_replaces_within_the_sets() -> None:
    resolved = _hand(1.0)
    road_became = []
    for seed in range(200):
        got = patch_labels(PIXELS, TRUTH, resolved, np.random.default_rng(seed))
        np.testing.assert_array_equal(got.keep, KEEP)
        road, sidewalk, car = got.label[:3], got.label[3:7], got.label[7:]
        assert len(set(road.tolist())) == 1 and road[0] in (SIDEWALK, BUILDING)
        road_became.append(int(road[0]))
        np.testing.assert_array_equal(sidewalk, [SIDEWALK] * 4)  # no set: kept
        np.testing.assert_array_equal(car, [PEDESTRIAN] * 3)
        np.testing.assert_array_equal(got.replaced, [True] * 3 + [False] * 4 + [True] * 3)
    # Uniform over the set: each of the two targets about half the time (binomial sd 7).
    assert 70 < road_became.count(SIDEWALK) < 130
    assert road_became.count(SIDEWALK) + road_became.count(BUILDING) == 200


def test_a_patch_draw_does_not_depend_on_the_other_patches() -> None:
    resolved = _hand(0.5)
    flipped = 0
    for seed in range(40):
        full = patch_labels(PIXELS, TRUTH, resolved, np.random.default_rng(seed))
        alone = patch_labels(PIXELS[:3], TRUTH[:3], resolved, np.random.default_rng(seed))
        np.testing.assert_array_equal(full.label[:3], alone.label)
        np.testing.assert_array_equal(full.replaced[:3], alone.replaced)
        flipped += int(alone.replaced[0])
    assert 5 < flipped < 35  # probability 0.5 really flips some and keeps some


# ---------------------------------------------------------------------------- spec errors


def test_shipped_spec_values() -> None:
    spec = load_spec("maskclip_like")
    assert (spec.name, spec.vocabulary, spec.grid) == ("maskclip_like", "sample_drive", (14, 26))
    assert spec.confusion.probability == 0.35 and spec.features.noise_norm == 0.5
    assert spec.confidence.kept == (4.0, 2.0) and spec.confidence.replaced == (2.0, 2.0)
    assert load_config(SimulationSpec, _shipped()) == spec


@pytest.mark.parametrize(("sets", "key"), [
    ({"tree": ("road",)}, "confusion.sets.tree"),
    ({"road": ("sidewalk", "tree")}, "confusion.sets.road"),
])
def test_unknown_confusion_classes_are_refused(sets: dict[str, tuple[str, ...]],
                                               key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _hand(0.5, sets)
    assert exc.value.key == key and "'tree'" in exc.value.reason


def test_unknown_confusion_class_in_a_file_names_the_file(drive: Path, tmp_path: Path) -> None:
    spec = _write_spec(tmp_path / "bad.yaml", confusion={"sets": {"car": ["bus"]}})
    with pytest.raises(ConfigError) as exc:
        run_teacher(drive, "sample_drive", tmp_path / "out", simulate=spec, progress=False)
    assert exc.value.key == "confusion.sets.car" and exc.value.source == str(spec)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fields", "key"), [
    ({"confusion": {"probability": 1.5}}, "confusion.probability"),
    ({"confusion": {"probability": -0.1}}, "confusion.probability"),
    ({"confidence": {"kept": [0, 2]}}, "confidence.kept"),
    ({"confidence": {"replaced": [2, -1]}}, "confidence.replaced"),
    ({"features": {"noise_norm": -0.5}}, "features.noise_norm"),
    ({"image_size": [224, 410]}, "image_size"),
    ({"patch_size": [0, 16]}, "patch_size"),
])
def test_bad_spec_values_name_the_field(fields: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(SimulationSpec, _spec_dict(**fields))
    assert exc.value.key == key


def test_cli_bad_spec_exits_2_with_one_line(drive: Path, tmp_path: Path, capsys) -> None:
    spec = _write_spec(tmp_path / "bad.yaml", confusion={"probability": 1.5})
    out = tmp_path / "out"
    assert main(["teacher", "--bag", str(drive), "--simulate", str(spec), "--out", str(out),
                 "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "confusion.probability" in lines[0] and str(spec) in lines[0]
    assert not out.exists()
    assert main(["teacher", "--bag", str(drive), "--simulate", str(tmp_path / "none.yaml"),
                 "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "simulate" in lines[0] and "none.yaml" in lines[0]


# ---------------------------------------------------------------------------- unlabelled input


def test_bag_without_labels_is_refused(unlabelled: Path, tmp_path: Path, capsys) -> None:
    assert BagReader(unlabelled).index.topics.labels is None
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as exc:
        run_teacher(unlabelled, "sample_drive", out, simulate="maskclip_like", progress=False)
    assert exc.value.key == "bag" and exc.value.source == str(unlabelled)
    assert not list(out.glob("*"))
    assert main(["teacher", "--bag", str(unlabelled), "--simulate", "maskclip_like", "--out",
                 str(tmp_path / "cli"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error: bag: has no ground-truth label topic" in lines[0]
    assert str(unlabelled) in lines[0]


def test_frames_without_labels_are_refused(drive: Path, tmp_path: Path) -> None:
    frames = [dataclasses.replace(f, labels=None) for f in BagReader(drive)]
    with pytest.raises(ConfigError) as exc:
        run_teacher_on_frames(frames, "no-labels", "sample_drive", tmp_path,
                              simulate="maskclip_like", progress=False)
    assert exc.value.key == "bag" and "frame 0 " in exc.value.reason
    assert not list(tmp_path.glob("shard-*"))


# ---------------------------------------------------------------------------- the cache


def _tensor_kinds(path: Path) -> dict[str, tuple[str, int]]:
    """Name -> (dtype, ndim) of every tensor of a shard."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        names = f.keys()
        return {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).ndim) for k in names}


def test_cache_reads_like_a_maskclip_cache(drive: Path, sim_cache: Path, tmp_path: Path,
                                           one_torch_thread: None, caplog) -> None:
    expected = {"points": ("int32", 1), "camera": ("uint8", 1), "label": ("uint16", 1),
                "confidence": ("float16", 1), "features": ("float16", 2)}
    frame = next(iter(BagReader(drive)))
    run_teacher_on_frames([frame], "first", "sample_drive", tmp_path, model="tiny-vit",
                          image_size=(64, 128), prompts="single", store_features=True,
                          progress=False)
    assert _tensor_kinds(tmp_path / "shard-00000.safetensors") == {
        f"f0.{k}": v for k, v in expected.items()}
    for i in range(3):
        assert _tensor_kinds(sim_cache / f"shard-{i:05d}.safetensors") == {
            f"f{i}.{k}": v for k, v in expected.items()}

    index = yaml.safe_load((sim_cache / "index.yaml").read_text())
    simulated = index["teacher"]["simulated"]
    assert simulated["spec"]["name"] == "maskclip_like"
    assert simulated["fingerprint"] == load_spec("maskclip_like").fingerprint()
    assert index["teacher"]["image_size"] == [224, 416] and index["complete"] is True

    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        maskclip = TeacherCache(tmp_path)
    assert maskclip.simulated is None and "SIMULATED" not in caplog.text
    cache = TeacherCache(sim_cache)
    assert cache.complete and cache.indices == [0, 1, 2] and cache.class_names == CLASSES
    assert cache.simulated is not None and cache.simulated["spec"]["name"] == "maskclip_like"
    for frame in BagReader(drive):
        got = cache.frame(frame.index)
        assert got.camera_names == ("camera_front", "camera_left") and got.skipped == ()
        assert got.points.dtype == np.int32 and got.camera.dtype == np.uint8
        assert got.label.dtype == np.uint16 and got.confidence.dtype == np.float16
        assert got.features is not None and got.features.dtype == np.float16
        assert got.features.shape == (got.points.size, 32) and got.points.size > 2000
        np.testing.assert_allclose(np.linalg.norm(got.features.astype(np.float32), axis=1), 1.0,
                                   atol=3e-3)
        assert got.points.max() < frame.num_points and set(got.camera.tolist()) == {0, 1}
        assert got.label.max() < len(CLASSES)
        assert got.confidence.min() >= 0 and got.confidence.max() <= 1


def test_reader_warns_once_per_cache_key(drive: Path, sim_cache: Path, tmp_path: Path,
                                         monkeypatch, caplog) -> None:
    monkeypatch.setattr(cache_module, "_SIMULATED_LOGGED", set())
    copy = tmp_path / "copy"
    shutil.copytree(sim_cache, copy)
    other = tmp_path / "other"
    run_teacher(drive, "sample_drive", other, simulate="maskclip_like", progress=False)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        TeacherCache(sim_cache)
        TeacherCache(sim_cache)
        TeacherCache(copy)  # the same cache key
        first = [r.getMessage() for r in caplog.records if "SIMULATED" in r.getMessage()]
        TeacherCache(other)
        TeacherCache(other)
    messages = [r for r in caplog.records if "SIMULATED" in r.getMessage()]
    assert len(first) == 1 and str(sim_cache) in first[0] and "maskclip_like" in first[0]
    assert len(messages) == 2 and all(r.levelno == logging.WARNING for r in messages)
    assert str(other) in messages[1].getMessage()


# ---------------------------------------------------------------------------- determinism


def test_rerun_into_another_directory_is_byte_identical(drive: Path, bank: Path,
                                                        sim_cache: Path, tmp_path: Path) -> None:
    report = run_teacher(drive, str(bank), tmp_path, **SIM)
    assert report.computed == 3
    assert _files(tmp_path) == _files(sim_cache)


def test_rerun_into_the_same_directory_labels_nothing(drive: Path, bank: Path, sim_cache: Path,
                                                       monkeypatch) -> None:
    before = _files(sim_cache)

    def no_labelling(self: Any, frame: Any) -> Any:
        raise AssertionError("a finished cache was labelled again")

    monkeypatch.setattr(simulated_module.SimulatedTeacher, "label", no_labelling)
    report = run_teacher(drive, str(bank), sim_cache, **SIM)
    assert (report.computed, report.reused, report.complete) == (0, 3, True)
    assert _files(sim_cache) == before


def test_interrupted_run_resumes_to_identical_files(drive: Path, bank: Path, sim_cache: Path,
                                                    tmp_path: Path, monkeypatch) -> None:
    label = simulated_module.SimulatedTeacher.label
    calls: list[int] = []
    interrupt = [True]

    def failing(self: Any, frame: Any) -> Any:
        calls.append(frame.index)
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt  # killed while labelling the second shard
        return label(self, frame)

    monkeypatch.setattr(simulated_module.SimulatedTeacher, "label", failing)
    with pytest.raises(KeyboardInterrupt):
        run_teacher(drive, str(bank), tmp_path, **SIM)
    partial = TeacherCache(tmp_path)
    assert not partial.complete and partial.indices == [0]

    calls.clear()
    interrupt[0] = False
    report = run_teacher(drive, str(bank), tmp_path, **SIM)
    assert calls == [1, 2] and (report.computed, report.reused) == (2, 1)
    assert _files(tmp_path) == _files(sim_cache)


def test_other_spec_into_the_same_directory_is_refused(drive: Path, bank: Path,
                                                       sim_cache: Path, tmp_path: Path) -> None:
    before = _files(sim_cache)
    spec = _write_spec(tmp_path / "p20.yaml", confusion={"probability": 0.2})
    with pytest.raises(ConfigError) as exc:
        run_teacher(drive, str(bank), sim_cache, **{**SIM, "simulate": spec})
    assert exc.value.key == "out"
    assert "teacher.simulated.spec.confusion.probability: 0.35 -> 0.2" in exc.value.reason
    assert _files(sim_cache) == before


# ---------------------------------------------------------------------------- labels and quality


#: The drive's label ids in another order: ids 1 and 2 merged, id 7 (pole) left unlabelled.
OTHER_VOCABULARY = {
    "name": "reordered",
    "ignore_ids": [0],
    "classes": [
        {"name": "sign", "color": [220, 220, 0], "ids": [8]},
        {"name": "person", "color": [220, 20, 60], "ids": [6]},
        {"name": "vehicle", "color": [0, 0, 142], "ids": [5]},
        {"name": "plants", "color": [107, 142, 35], "ids": [4]},
        {"name": "house", "color": [70, 70, 70], "ids": [3]},
        {"name": "ground", "color": [128, 64, 128], "ids": [1, 2]},
    ],
}


def test_one_pixel_patches_without_confusion_give_the_ground_truth(drive: Path,
                                                                   tmp_path: Path) -> None:
    vocab = tmp_path / "reordered.yaml"
    vocab.write_text(yaml.safe_dump(OTHER_VOCABULARY))
    size = (432, 768)  # large enough that no two pairs of the drive share a resized pixel
    spec = _write_spec(tmp_path / "exact.yaml", name="exact", vocabulary=str(vocab),
                       image_size=list(size), patch_size=[1, 1], min_depth=3.0,
                       confusion={"probability": 0.0, "sets": {}})
    out = tmp_path / "cache"
    with pytest.raises(ConfigError) as exc:  # the text source must have the spec's classes
        run_teacher(drive, "sample_drive", out, simulate=spec, progress=False)
    assert exc.value.key == "vocab"
    run_teacher(drive, str(vocab), out, simulate=spec, progress=False)
    vocabulary = resolve_vocabulary(vocab)
    cache = TeacherCache(out)
    assert cache.class_names == ("sign", "person", "vehicle", "plants", "house", "ground")
    total = near = 0
    raw_ids: list[np.ndarray] = []
    confidences = []
    for frame in BagReader(drive):
        truth = vocabulary.map_labels(frame.labels)
        points, cameras = [], []
        for c, view in enumerate(frame.cameras):
            pairs = point_pixel_pairs(frame.xyz, [(view.camera, view.lidar_to_camera)],
                                      min_depth=3.0)
            near += point_pixel_pairs(frame.xyz, [(view.camera, view.lidar_to_camera)],
                                      min_depth=1.0).num_pairs - pairs.num_pairs
            px = scale_pixels(pairs.uv, view.image.shape[:2], size)
            assert len(np.unique(px, axis=0)) == len(px), "two pairs share a pixel"
            labelled = truth[pairs.point_index] >= 0
            points.append(pairs.point_index[labelled])
            cameras.append(np.full(int(labelled.sum()), c))
            raw_ids.append(frame.labels[pairs.point_index])
        got = cache.frame(frame.index)
        np.testing.assert_array_equal(got.points, np.concatenate(points))
        np.testing.assert_array_equal(got.camera, np.concatenate(cameras))
        np.testing.assert_array_equal(got.label, truth[got.points])
        confidences.append(got.confidence.astype(np.float64))
        total += got.points.size
    ids = np.concatenate(raw_ids)
    # Pairs nearer than min_depth, pole pairs (unmapped) and both merged ids really occur.
    assert near > 100 and (ids == 7).sum() > 20 and (ids == 1).any() and (ids == 2).any()
    assert total > 6000
    # Nothing was replaced: every confidence is a Beta(4, 2) draw (mean 2/3, sd 0.178).
    conf = np.concatenate(confidences)
    assert abs(conf.mean() - 2 / 3) < 0.015 and abs(conf.std() - math.sqrt(8 / 252)) < 0.015

    quality = teacher_quality(out, drive)
    assert quality["teacher_miou"] == 1.0 and quality["teacher_accuracy"] == 1.0
    assert quality["teacher"] == "simulated:exact" and quality["simulated"] is True
    assert quality["pairs"] == quality["scored_pairs"] == total
    assert quality["per_class"] == dict.fromkeys(cache.class_names, 1.0)


def test_a_point_seen_twice_counts_twice(drive: Path, sim_cache: Path, tmp_path: Path) -> None:
    frames = [dataclasses.replace(f, cameras=(*f.cameras, dataclasses.replace(
        f.cameras[0], name="front_again"))) for f in BagReader(drive)]
    run_teacher_on_frames(frames, "front twice", "sample_drive", tmp_path,
                          simulate="maskclip_like", progress=False)
    once, twice = teacher_quality(sim_cache, drive), teacher_quality(tmp_path, drive)
    front = sum(int((TeacherCache(sim_cache).frame(i).camera == 0).sum()) for i in range(3))
    assert twice["pairs"] == once["pairs"] + front and front > 1000
    assert twice["paired_fraction"] == once["paired_fraction"]
    assert twice["scored_pairs"] > once["scored_pairs"]


def test_shipped_spec_confuses_a_third_of_the_patches(drive: Path, sim_cache: Path,
                                                      tmp_path: Path) -> None:
    clean_spec = _write_spec(tmp_path / "p0.yaml", confusion={"probability": 0.0})
    run_teacher(drive, "sample_drive", tmp_path / "p0", simulate=clean_spec, progress=False)
    clean, noisy = TeacherCache(tmp_path / "p0"), TeacherCache(sim_cache)
    sets = resolve(load_spec("maskclip_like")).confusion
    changed, confidence = [], []
    points = unique = 0
    for frame in BagReader(drive):
        a, b = clean.frame(frame.index), noisy.frame(frame.index)
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.camera, b.camera)
        for before, after in {(int(x), int(y)) for x, y in zip(a.label, b.label, strict=True)}:
            assert before == after or after in sets[before]
        changed.append(a.label != b.label)
        confidence.append(b.confidence.astype(np.float64))
        points += frame.num_points
        unique += np.unique(b.points).size
    flip, conf = np.concatenate(changed), np.concatenate(confidence)
    # Every class has a set that excludes itself, so a changed label is a replaced patch.
    assert 0.25 < flip.mean() < 0.45
    assert abs(conf[flip].mean() - 0.5) < 0.03  # Beta(2, 2)
    assert abs(conf[~flip].mean() - 2 / 3) < 0.03  # Beta(4, 2)

    quality = teacher_quality(sim_cache, drive)
    assert 0 < quality["teacher_miou"] < 1 and 0 < quality["teacher_accuracy"] < 1
    assert 0 < quality["paired_fraction"] < 1
    assert quality["paired_fraction"] == pytest.approx(unique / points)
    assert quality["teacher"] == "simulated:maskclip_like"


# ---------------------------------------------------------------------------- features


def test_noise_free_features_are_the_rows_of_the_cached_labels(drive: Path, bank: Path,
                                                                rows: np.ndarray,
                                                                tmp_path: Path) -> None:
    spec = _write_spec(tmp_path / "clean.yaml", features={"noise_norm": 0.0})
    run_teacher(drive, str(bank), tmp_path / "cache", simulate=spec, store_features=True,
                progress=False)
    cache = TeacherCache(tmp_path / "cache")
    confused = 0
    for frame in BagReader(drive):
        got = cache.frame(frame.index)
        assert got.features is not None
        features = got.features.astype(np.float32)
        np.testing.assert_allclose(features, rows[got.label], atol=2e-3)
        truth = _truth(frame)[got.points]
        wrong = (truth >= 0) & (truth != got.label)
        far = np.abs(features[wrong] - rows[truth[wrong]]).max(axis=1)
        assert (far > 1e-2).all()  # the feature is not the ground truth's row
        confused += int(wrong.sum())
    assert confused > 500


def test_feature_noise_has_the_spec_norm(drive: Path, sim_cache: Path, rows: np.ndarray) -> None:
    # Expected cosine of normalize(r + g) with r for a unit r and Gaussian g with E|g| = 0.5.
    dim = rows.shape[1]
    rng = np.random.default_rng(0)
    sigma = 0.5 / np.linalg.norm(rng.normal(size=(200_000, dim)), axis=1).mean()
    noisy = rng.normal(0.0, sigma, (200_000, dim))
    noisy[:, 0] += 1.0
    expected = float(np.mean(noisy[:, 0] / np.linalg.norm(noisy, axis=1)))
    assert abs(expected - 1 / math.sqrt(1.25)) < 0.01

    cache = TeacherCache(sim_cache)
    cos_label, cos_truth, similarity = [], [], []
    for frame in BagReader(drive):
        got = cache.frame(frame.index)
        assert got.features is not None
        features = _unit(got.features)
        label = got.label.astype(np.int64)
        truth = _truth(frame)[got.points]
        wrong = (truth >= 0) & (truth != label)
        cos = np.sum(features * rows[label], axis=1)
        cos_label.append(cos)
        cos_truth.append(np.stack([cos[wrong], np.sum(features[wrong] * rows[truth[wrong]],
                                                     axis=1)]))
        similarity.append(np.sum(rows[label[wrong]] * rows[truth[wrong]], axis=1))
    cos_all = np.concatenate(cos_label)
    assert abs(cos_all.mean() - expected) < 0.01  # noise norm 0.45 or 0.55 is off by > 0.015
    label_cos, truth_cos = np.concatenate(cos_truth, axis=1)
    sim = np.concatenate(similarity)
    assert label_cos.size > 500
    # The noise is isotropic, so E[cos(f, t)] = (r . t) E[cos(f, r)] for the noised row r: the
    # feature is centred on the cached label's row, not the ground truth's.
    gap = float(np.mean(label_cos - truth_cos))
    assert gap > 0
    assert gap == pytest.approx(expected * float(np.mean(1 - sim)), abs=3e-3)


# ---------------------------------------------------------------------------- CLI


def test_cli_simulate_writes_the_teacher_quality(drive: Path, sim_cache: Path, tmp_path: Path,
                                                 capsys) -> None:
    out, path = tmp_path / "cache", tmp_path / "quality.json"
    assert main(["teacher", "--bag", str(drive), "--simulate", "maskclip_like", "--out",
                 str(out), "--json", str(path), "--quiet"]) == 0
    assert "teacher mIoU" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert {"teacher_miou", "teacher_accuracy", "per_class", "paired_fraction"} <= set(data)
    assert data["simulated"] is True and data["teacher"] == "simulated:maskclip_like"
    assert tuple(data["per_class"]) == CLASSES
    assert 0 < data["teacher_miou"] < 1 and 0 < data["paired_fraction"] < 1
    assert data["cache"] == str(out) and data["cache_key"] == TeacherCache(out).cache_key
    # The labels do not depend on whether features are stored.
    with_features = teacher_quality(sim_cache, drive)
    for key in ("teacher_miou", "teacher_accuracy", "per_class", "paired_fraction", "pairs"):
        assert data[key] == with_features[key]
    assert TeacherCache(out).teacher["store_features"] is False


def test_cli_json_to_stdout_is_json(drive: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["teacher", "--bag", str(drive), "--simulate", "maskclip_like", "--out",
                 str(tmp_path / "c"), "--json", "-", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["simulated"] is True


def test_cli_json_with_a_text_bank(drive: Path, bank: Path, tmp_path: Path) -> None:
    """A MaskCLIP cache built from a bank file is scored through the bank's vocabulary."""
    assert main(["teacher", "--bag", str(drive), "--vocab", str(bank), "--model", "tiny-vit",
                 "--image-size", "64", "128", "--out", str(tmp_path / "c"),
                 "--json", str(tmp_path / "q.json"), "--quiet"]) == 0
    quality = json.loads((tmp_path / "q.json").read_text())
    assert quality["simulated"] is False and quality["teacher"] == "maskclip:tiny-vit"


def test_label_ids_are_part_of_the_cache_key(drive: Path, tmp_path: Path) -> None:
    """Editing a vocabulary's ids changes what the simulated teacher writes: not reused."""
    vocab = tmp_path / "v.yaml"
    data = yaml.safe_load((config_dir() / "vocabularies" / "sample_drive.yaml").read_text())
    vocab.write_text(yaml.safe_dump(data))
    spec = _write_spec(tmp_path / "s.yaml", vocabulary=str(vocab),
                       confusion={"probability": 0.0, "sets": {}})
    run_teacher(drive, str(vocab), tmp_path / "out", simulate=spec, progress=False)
    data["classes"][2]["ids"], data["classes"][3]["ids"] = [4], [3]  # building <-> vegetation
    vocab.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="label_map"):
        run_teacher(drive, str(vocab), tmp_path / "out", simulate=spec, progress=False)
