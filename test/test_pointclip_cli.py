"""clip2scene pointclip eval/train over a folder of object files and over the labelled object
crops of a sample drive (tiny random CLIP)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.cli import main as cli
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.pointclip.data import class_of, load_objects
from clip2scene_ros.pointclip.things import thing_classes
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

MODELNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "modelnet"
VOCAB = load_vocabulary(builtin_vocabulary("modelnet40"))


def _folder(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("chair_0001", "chair_0002", "toilet_0001", "toilet_0002", "mystery_0001"):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(300, 3)).astype(np.float32))
    (tmp_path / "sofa").mkdir()
    np.savetxt(tmp_path / "sofa" / "a.txt", rng.normal(size=(50, 4)))
    return tmp_path


def test_classes_come_from_names_and_folders(tmp_path: Path) -> None:
    assert VOCAB.names[class_of(Path("x/chair_0001.off"), VOCAB)] == "chair"
    assert VOCAB.names[class_of(Path("night_stand/train/night_stand_0007.off"), VOCAB)] == \
        "night stand"
    assert class_of(Path("mystery_0001.npy"), VOCAB) is None
    objects = load_objects(_folder(tmp_path), VOCAB, points=128)
    assert len(objects) == 6 and all(o.points.shape[1] == 3 for o in objects)
    by_name = {o.path.name: o for o in objects}
    assert VOCAB.names[by_name["a.txt"].label] == "sofa" and by_name["a.txt"].points.shape == (
        50, 3)


def test_eval_and_train_with_random_weights(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    out = tmp_path / "eval.json"
    assert cli(["pointclip", "eval", "--data", str(data), "--model", "tiny-vit",
                "--json", str(out), "--points", "128"]) == 0
    result = json.loads(out.read_text())
    assert result["objects"] == 6 and result["labelled"] == 5
    assert result["accuracy"] is None and "random" in result["accuracy_note"]
    assert all(r["predicted"] in VOCAB.names for r in result["results"])
    assert cli(["pointclip", "train", "--data", str(data), "--model", "tiny-vit", "--out",
                str(tmp_path / "bundle"), "--shots", "2", "--epochs", "3",
                "--points", "128"]) == 0
    assert cli(["pointclip", "eval", "--data", str(data), "--model", "tiny-vit", "--json",
                str(out), "--adapter", str(tmp_path / "bundle"), "--points", "128"]) == 0
    assert json.loads(out.read_text())["views"] == "v1_fewshot"


@pytest.mark.skipif(not MODELNET.is_dir(), reason="../shared/data/modelnet is absent")
def test_eval_on_the_modelnet_meshes(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert cli(["pointclip", "eval", "--data", str(MODELNET), "--model", "tiny-vit",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["objects"] == 4 and result["labelled"] == 4


# -- a user's own folder: notes beside the meshes, labels.csv -------------------------------------
TETRAHEDRON = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
README = "ModelNet40 meshes, Princeton 2015\nsee https://modelnet.cs.princeton.edu\n"


def _users_folder(root: Path) -> Path:
    """Meshes and points with the files a downloaded dataset carries beside them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in ("toilet_0009.off", "mystery.off", "bathtub_0001.off"):
        (root / name).write_text(TETRAHEDRON)
    (root / "scans").mkdir()
    np.save(root / "scans" / "scan_a.npy", rng.normal(size=(40, 3)).astype(np.float32))
    np.savetxt(root / "scans" / "scan_b.csv", rng.normal(size=(30, 3)), delimiter=",",
               header="x,y,z", comments="")
    (root / "README.txt").write_text(README)
    (root / "notes.csv").write_text("author,year\nPrinceton,2015\n")
    (root / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "labels.csv").write_text(
        "file,label\ntoilet_0009.off,chair\nscans/scan_a.npy,Night_Stand\n\n"
        "scans/scan_b.csv,sofa\n")
    return root


def test_a_users_folder_with_notes_and_labels_csv(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder = _users_folder(tmp_path / "mine")
    with caplog.at_level("WARNING", logger="clip2scene_ros.pointclip.data"):
        objects = load_objects(folder, VOCAB, points=64)
    labels = {str(o.path.relative_to(folder)): None if o.label is None else VOCAB.names[o.label]
              for o in objects}
    assert labels == {
        "toilet_0009.off": "chair",        # labels.csv comes before the file name
        "scans/scan_a.npy": "night stand",  # any case, underscores as spaces
        "scans/scan_b.csv": "sofa",         # a csv of points with a header row
        "bathtub_0001.off": "bathtub",      # not listed: the file-name rule
        "mystery.off": None,
    }
    assert [o.points.shape for o in objects if o.path.suffix == ".csv"] == [(30, 3)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "skipped 3 files" in lines[0]
    for name in ("README.txt", "notes.csv", "preview.png"):
        assert name in lines[0]

    # the command of the report: eval over that folder runs
    out = tmp_path / "eval.json"
    assert cli(["pointclip", "eval", "--data", str(folder), "--model", "tiny-vit",
                "--json", str(out), "--points", "64"]) == 0
    result = json.loads(out.read_text())
    assert result["objects"] == 5 and result["labelled"] == 4


def test_labels_csv_without_header_and_its_errors(tmp_path: Path) -> None:
    folder = tmp_path / "objects"
    folder.mkdir()
    (folder / "a.off").write_text(TETRAHEDRON)
    labels = folder / "labels.csv"
    labels.write_text("a.off, lamp\n")
    assert [VOCAB.names[o.label] for o in load_objects(folder, VOCAB, points=16)] == ["lamp"]

    labels.write_text("file,label\na.off,lamp\na.off,spaceship\n")
    with pytest.raises(ConfigError, match=r"labels\.csv row 3") as info:
        load_objects(folder, VOCAB, points=16)
    assert "spaceship" in str(info.value) and str(labels) in str(info.value)

    labels.write_text("a.off,lamp\ngone.off,chair\n")
    with pytest.raises(ConfigError, match=r"labels\.csv row 2") as info:
        load_objects(folder, VOCAB, points=16)
    assert str(folder / "gone.off") in str(info.value) and "does not exist" in str(info.value)

    for row, reason in (("a.off", "two columns"), ("a.off,lamp\na.off,chair", "already listed"),
                        ("../a.off,lamp", "not a path inside")):
        labels.write_text(row + "\n")
        with pytest.raises(ConfigError, match=reason):
            load_objects(folder, VOCAB, points=16)


def test_every_load_error_names_the_file(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    for name, content in (("broken.off", "OFF\n3 1 0\n0 0 0\n1 0\n"), ("empty.ply", ""),
                          ("cloud.xyz", "a b c\n"), ("cloud.pts", "1 2\n3 4\n"),
                          ("cloud.npy", "not numpy")):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        path = folder / name
        path.write_text(content)
        with pytest.raises(ConfigError) as info:
            load_objects(folder, VOCAB, points=16)
        assert str(path) in str(info.value), (name, str(info.value))

    # text that is not points only is left out; a folder of nothing else says so
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(8):
        (folder / f"note_{i}.txt").write_text(f"note {i}: the chairs are in row {i}\n")
    with caplog.at_level("WARNING", logger="clip2scene_ros.pointclip.data"), \
            pytest.raises(ConfigError, match=r"no object files.*skipped 8") as info:
        load_objects(folder, VOCAB, points=16)
    assert str(folder) in str(info.value)
    [line] = [r.getMessage() for r in caplog.records]
    assert "skipped 8 files" in line and "note_4.txt" in line and "and 3 more" in line
    assert "note_5.txt" not in line


@pytest.mark.skipif(not MODELNET.is_dir(), reason="../shared/data/modelnet is absent")
def test_modelnet_meshes_beside_a_readme_and_labels_csv(tmp_path: Path) -> None:
    folder = tmp_path / "modelnet"
    folder.mkdir()
    for mesh in sorted(MODELNET.glob("*.off")):
        (folder / mesh.name).symlink_to(mesh)
    (folder / "README.txt").write_text(README)
    (folder / "labels.csv").write_text("chair_0002.off,stool\n")
    objects = {o.path.name: o for o in load_objects(folder, VOCAB, points=256)}
    assert set(objects) == {m.name for m in MODELNET.glob("*.off")}
    assert VOCAB.names[objects["chair_0002.off"].label] == "stool"
    assert VOCAB.names[objects["chair_0001.off"].label] == "chair"
    assert all(o.points.shape == (256, 3) for o in objects.values())


# -- crops of a labelled bag ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.sample.drive import small_rig, write_sample_drive

    path = tmp_path_factory.mktemp("drive") / "bag"
    write_sample_drive(path, frames=2, seed=0, rig=small_rig(left=None))
    return path


def test_thing_classes_by_flag_name_synonym_or_list() -> None:
    drive_vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    assert [drive_vocab.names[i] for i in thing_classes(drive_vocab.names)] == [
        "car", "pedestrian", "pole", "traffic sign"]
    nuscenes = load_vocabulary(builtin_vocabulary("nuscenes")).names
    assert "traffic_cone" in [nuscenes[i] for i in thing_classes(nuscenes)]
    assert thing_classes(["ground", "auto"], synonyms=[(), ("car",)]) == [1]
    # the vocabulary's thing flags win over names; unflagged vocabularies fall back to names
    assert thing_classes(drive_vocab.names, things=drive_vocab.thing_names) == [4, 5, 6, 7]
    assert thing_classes(["car", "tree"], things=["tree"]) == [1]
    assert thing_classes(drive_vocab.names, ["Traffic_Sign", "car"]) == [4, 7]
    with pytest.raises(ConfigError) as info:
        thing_classes(drive_vocab.names, ["tree"], key="objects_classes")
    assert info.value.key == "objects_classes" and "tree" in str(info.value)


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_on_the_crops_of_a_sample_drive(drive: Path, tmp_path: Path) -> None:
    out = tmp_path / "crops.json"
    assert cli(["pointclip", "eval", "--bag", str(drive), "--vocab", "sample_drive",
                "--model", "tiny-vit", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["frames"] == result["labelled_frames"] == 2
    assert result["objects"] == len(result["results"]) >= 4
    assert result["accuracy"] is None and "random" in result["accuracy_note"]
    assert result["classes"] == ["car", "pedestrian", "pole", "traffic sign"]
    assert sum(c["objects"] for c in result["per_class"].values()) == result["objects"]
    assert sum(c["predicted"] for c in result["per_class"].values()) == result["objects"]
    assert all(c["correct"] is None for c in result["per_class"].values())
    assert result["per_class"]["car"]["objects"] >= 2  # the street's parked cars
    row = result["results"][0]
    assert row["points"] >= 10 and len(row["box"]["size"]) == 3 and row["label"] in \
        result["classes"]
    timing = result["timing_ms"]
    assert timing["classify_per_object"] > 0 and timing["cluster_per_frame"] > 0

    # only some classes, and a sweep cap
    assert cli(["pointclip", "eval", "--bag", str(drive), "--vocab", "sample_drive", "--model",
                "tiny-vit", "--json", str(out), "--classes", "car", "pedestrian",
                "--max-frames", "1"]) == 0
    capped = json.loads(out.read_text())
    assert capped["classes"] == ["car", "pedestrian"] and capped["labelled_frames"] == 1
    assert {r["label"] for r in capped["results"]} <= {"car", "pedestrian"}


@pytest.mark.usefixtures("one_torch_thread")
def test_crop_accuracy_with_a_weights_file(drive: Path, tmp_path: Path) -> None:
    """A weights file counts as real weights: the accuracy is then computed (here of a random
    tiny CLIP saved to disk, so its value means nothing, only its bookkeeping is checked)."""
    from safetensors.torch import save_file

    from clip2scene_ros.pointclip.crops import evaluate_crops
    from clip2scene_ros.teacher.clip_loader import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip, _ = load_clip("tiny-vit", None)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    result = evaluate_crops(drive, vocab="sample_drive", model="tiny-vit",
                            pretrained=str(weights), max_frames=1)
    rows = result["results"]
    assert result["pretrained"] == str(weights) and result["accuracy_note"] is None
    assert result["accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"]
                                                        for r in rows]))
    assert sum(c["correct"] for c in result["per_class"].values()) == round(
        result["accuracy"] * len(rows))


def test_crop_eval_errors(drive: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["pointclip", "eval", "--bag", str(drive), "--model", "tiny-vit"]) == 2
    assert "--vocab" in capsys.readouterr().err
    assert cli(["pointclip", "eval", "--bag", str(drive), "--vocab", "sample_drive",
                "--model", "tiny-vit", "--classes", "tree"]) == 2
    assert "tree" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --data and --bag exclude each other
        cli(["pointclip", "eval", "--bag", str(drive), "--data", str(tmp_path)])
