"""clip2scene pointclip eval/train over a folder of object files (tiny random CLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.cli import main as cli
from clip2scene_ros.pointclip.data import class_of, load_objects
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
