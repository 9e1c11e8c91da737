"""``python -m clip2scene_ros.bench.precision_agreement``: bf16 labels against fp32's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.bench import precision_agreement
from clip2scene_ros.codecs import encode_pointcloud2
from clip2scene_ros.codecs.messages import rosbags_factory
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.spvcnn import save_random_bundle
from clip2scene_ros.runtime.predictor import Predictor


def cloud(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = np.zeros(n, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                   ("intensity", "<f4")]))
    points["x"], points["y"] = rng.uniform(-15, 15, n), rng.uniform(-15, 15, n)
    points["z"], points["intensity"] = rng.uniform(-2, 2, n), rng.uniform(0, 1, n)
    return points


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_bundle(tmp_path_factory.mktemp("b") / "model", cr=0.25, clip_dim=8,
                              classes=("a", "b", "c", "d"), voxel_size=0.3)


def test_agreement_counts_points_and_frames(bundle: Path) -> None:
    frames = [Frame(stamp_ns=i, frame_id="lidar", xyz=np.stack([c["x"], c["y"], c["z"]], 1),
                    intensity=c["intensity"]) for i, c in enumerate(cloud(n, n) for n in
                                                                    (1200, 900, 700))]
    fp32 = Predictor(bundle, device="cpu", precision="fp32")
    same = precision_agreement.agreement(fp32, fp32, frames)
    assert same["frames"] == 3 and same["points"] == 2800
    assert same["labels_equal"] == same["worst_frame_labels_equal"] == 1.0
    assert same["features_max_rel_err"] == 0.0 and same["met"] is True
    bf16 = Predictor(bundle, device="cpu", precision="bf16")
    result = precision_agreement.agreement(fp32, bf16, frames, max_frames=2)
    assert result["frames"] == 2 and result["points"] == 2100
    assert 0.95 <= result["labels_equal"] <= 1.0 and result["worst_frame_labels_equal"] <= 1.0
    assert 0 < result["features_max_rel_err"] <= 3e-2
    assert result["met"] == (result["labels_equal"] >= precision_agreement.MIN_AGREEMENT)


def test_main_on_a_bag_writes_the_json(bundle: Path, tmp_path: Path) -> None:
    bag = tmp_path / "bag"
    with BagWriter(bag) as writer:
        for i in range(2):
            stamp = (i + 1) * 10**9
            writer.write("/points", encode_pointcloud2(cloud(800, i), stamp_ns=stamp,
                                                       frame_id="lidar",
                                                       factory=rosbags_factory()), stamp)
    out = tmp_path / "agree.json"
    assert precision_agreement.main(["--model", str(bundle), "--bag", str(bag),
                                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16"
    entry = result["bags"][str(bag)]
    assert entry["frames"] == 2 and entry["points"] == 1600 and entry["gate"] == 0.995
