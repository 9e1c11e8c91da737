"""Teacher cache on a 3-frame sample drive with the tiny random open_clip ViT (no downloads)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from clip2scene_ros.bag import reader as reader_module
from clip2scene_ros.bag.reader import BagReader
from clip2scene_ros.cli import main
from clip2scene_ros.errors import ConfigError, MessageError
from clip2scene_ros.geometry.camera_model import CameraModel
from clip2scene_ros.geometry.correspondence import frame_pairs
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.teacher import labeller as labeller_module
from clip2scene_ros.teacher import run as run_module
from clip2scene_ros.teacher import store as store_module
from clip2scene_ros.teacher.cache import TeacherCache
from clip2scene_ros.teacher.clip_loader import load_clip
from clip2scene_ros.teacher.labeller import RANDOM_WEIGHTS_SEED
from clip2scene_ros.teacher.maskclip import MaskCLIP
from clip2scene_ros.teacher.prompts import load_prompts
from clip2scene_ros.teacher.run import run_teacher, run_teacher_on_frames
from clip2scene_ros.teacher.text_bank import encode_text_bank, resolve_vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:CLIP tiny-vit has random weights")

SIZE = (64, 128)
#: Shared by every run that should hit the same cache key (fast: one template per name).
KW = {"model": "tiny-vit", "image_size": SIZE, "prompts": "single", "frames_per_shard": 2,
      "store_features": True, "progress": False}


@pytest.fixture(scope="session")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rig = small_rig()
    path = tmp_path_factory.mktemp("teacher") / "drive"
    write_sample_drive(path, frames=3, seed=0, rig=rig)
    return path


@pytest.fixture(scope="module")
def cache_a(drive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "a"
    report = run_teacher(drive, "sample_drive", out, **KW)
    assert report.complete and report.frames == 3 and report.computed == 3
    return out


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_labels_equal_direct_maskclip(drive: Path, cache_a: Path) -> None:
    frame = next(iter(BagReader(drive)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        clip, tokenizer = load_clip("tiny-vit", None)
    maskclip = MaskCLIP(clip)
    bank = encode_text_bank(clip, tokenizer, resolve_vocabulary("sample_drive"),
                            load_prompts("single"))
    images = torch.cat([
        F.interpolate(torch.tensor(v.image, dtype=torch.float32).permute(2, 0, 1)[None] / 255,
                      size=SIZE, mode="bilinear", align_corners=False, antialias=True)
        for v in frame.cameras])
    with torch.no_grad():
        features = maskclip(images)
        labels, conf = maskclip.labels_and_confidence(maskclip.logits(features, bank, SIZE))
        dense = F.normalize(F.interpolate(features, size=SIZE, mode="bilinear",
                                          align_corners=False), dim=1)
    pairs = frame_pairs(frame)
    cam = pairs.camera_index
    h0 = np.array([frame.cameras[c].image.shape[0] for c in cam])
    w0 = np.array([frame.cameras[c].image.shape[1] for c in cam])
    col = np.floor(pairs.uv[:, 0].astype(np.float64) * SIZE[1] / w0).astype(np.int64)
    row = np.floor(pairs.uv[:, 1].astype(np.float64) * SIZE[0] / h0).astype(np.int64)

    got = TeacherCache(cache_a).frame(frame.index)
    assert got.stamp_ns == frame.stamp_ns and got.camera_names == ("camera_front", "camera_left")
    assert got.points.dtype == np.int32 and got.camera.dtype == np.uint8
    assert got.label.dtype == np.uint16 and got.confidence.dtype == np.float16
    np.testing.assert_array_equal(got.points, pairs.point_index)
    np.testing.assert_array_equal(got.camera, cam)
    np.testing.assert_array_equal(got.label, labels.numpy()[cam, row, col])
    np.testing.assert_array_equal(got.confidence, conf.numpy()[cam, row, col].astype(np.float16))
    assert got.features is not None and got.features.shape == (pairs.num_pairs, 32)
    expected = dense.permute(0, 2, 3, 1).numpy()[cam, row, col]
    np.testing.assert_allclose(got.features.astype(np.float32), expected, atol=2e-3)


def test_rerun_computes_nothing(drive: Path, cache_a: Path, monkeypatch) -> None:
    before = _files(cache_a)
    calls = {"forward": 0, "load": 0}
    forward = MaskCLIP.forward

    def counting_forward(self: MaskCLIP, images: torch.Tensor) -> torch.Tensor:
        calls["forward"] += 1
        return forward(self, images)

    monkeypatch.setattr(MaskCLIP, "forward", counting_forward)
    monkeypatch.setattr(run_module, "MaskCLIPLabeller", lambda *a: calls.__setitem__("load", 1))
    report = run_teacher(drive, "sample_drive", cache_a, **KW)
    assert calls == {"forward": 0, "load": 0}
    assert (report.computed, report.reused, report.frames, report.complete) == (0, 3, 3, True)
    assert _files(cache_a) == before


def test_other_teacher_config_is_refused(drive: Path, cache_a: Path) -> None:
    with pytest.raises(ConfigError, match=r"image_size.*new --out"):
        run_teacher(drive, "sample_drive", cache_a, **{**KW, "image_size": (32, 64)})
    assert main(["teacher", "--bag", str(drive), "--vocab", "sample_drive", "--out",
                 str(cache_a), "--model", "tiny-vit", "--quiet"]) == 2


def test_interrupted_run_resumes_to_identical_files(drive: Path, cache_a: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    label_frame = labeller_module.label_frame
    calls = []

    def failing(frame, *args):
        calls.append(frame.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while labelling the second shard
        return label_frame(frame, *args)

    monkeypatch.setattr(labeller_module, "label_frame", failing)
    with pytest.raises(KeyboardInterrupt):
        run_teacher(drive, "sample_drive", tmp_path, **KW)
    partial = TeacherCache(tmp_path)
    assert not partial.complete and partial.indices == [0, 1]

    calls.clear()
    report = run_teacher(drive, "sample_drive", tmp_path, **KW)
    assert calls == [2] and (report.computed, report.reused) == (1, 2)
    assert _files(tmp_path) == _files(cache_a)


def test_two_ranks_write_disjoint_frames_and_merge(drive: Path, cache_a: Path,
                                                   tmp_path: Path) -> None:
    r0 = run_teacher(drive, "sample_drive", tmp_path, **KW, rank=0, world_size=2)
    assert r0.frames == 2 and not r0.complete and not TeacherCache(tmp_path).complete
    r1 = run_teacher(drive, "sample_drive", tmp_path, **KW, rank=1, world_size=2)
    assert r1.frames == 1 and r1.complete
    parts = sorted(p.name for p in tmp_path.glob("index*.yaml"))
    assert parts == ["index-rank000-of-002.yaml", "index-rank001-of-002.yaml"]
    shards = {p: set(store_module.load_yaml(tmp_path / p)["shards"][0]["frames"])
              for p in parts}
    assert shards[parts[0]] == {0, 2} and shards[parts[1]] == {1}
    merged, single = TeacherCache(tmp_path), TeacherCache(cache_a)
    assert merged.complete and len(merged) == 3 and merged.indices == [0, 1, 2]
    for i in merged.indices:
        a, b = merged.frame(i), single.frame(i)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.points, b.points)


def test_bad_cameras_are_skipped_and_counted(drive: Path, tmp_path: Path, caplog) -> None:
    frames = list(BagReader(drive))
    f0, f1, f2 = frames
    front, left = f0.cameras
    tiny = CameraModel(width=12, height=10, K=np.array([[10.0, 0, 6], [0, 10.0, 5], [0, 0, 1]]))
    away = front.lidar_to_camera.copy()
    away[2, 3] -= 1000.0  # every point is behind the camera
    frames = [
        dataclasses.replace(f0, cameras=(
            dataclasses.replace(front, image=np.zeros((54, 96), np.uint16)), left)),
        dataclasses.replace(f1, cameras=(f1.cameras[0], dataclasses.replace(
            f1.cameras[1], camera=None), dataclasses.replace(
                front, name="cam_tiny", camera=tiny, image=np.zeros((10, 12, 3), np.uint8)))),
        dataclasses.replace(f2, cameras=(
            dataclasses.replace(f2.cameras[0], lidar_to_camera=None),
            dataclasses.replace(f2.cameras[1], lidar_to_camera=away))),
    ]
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.teacher.cache"):
        report = run_teacher_on_frames(frames, "edited", "sample_drive", tmp_path, **KW)
    assert report.complete and report.frames == 3
    assert report.skipped == {"unsupported_image": 1, "no_camera_info": 1, "image_too_small": 1,
                              "no_extrinsics": 1, "no_points": 1}
    assert "frame 1 " in caplog.text and "camera cam_tiny skipped: image_too_small" in caplog.text
    cache = TeacherCache(tmp_path)
    assert cache.skipped == report.skipped
    assert cache.frame(0).skipped == (("camera_front", "unsupported_image"),)
    assert set(cache.frame(0).camera.tolist()) == {1}  # the left camera is still labelled
    assert cache.frame(2).points.size == 0 and cache.frame(2).features.shape == (0, 32)
    index = store_module.load_yaml(tmp_path / "index.yaml")
    assert index["skipped"] == report.skipped


def test_camera_dropped_by_the_reader_is_named(drive: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    decode = reader_module.image_to_rgb8

    def no_jpeg(msg):
        if hasattr(msg, "format"):
            raise MessageError("CompressedImage", "format", "unsupported")
        return decode(msg)

    monkeypatch.setattr(reader_module, "image_to_rgb8", no_jpeg)
    report = run_teacher(drive, "sample_drive", tmp_path, **KW)
    assert report.skipped == {"image_malformed": 3}
    labels = TeacherCache(tmp_path).frame(1)
    assert labels.skipped == (("camera_left", "image_malformed"),)
    assert labels.camera_names == ("camera_front",) and labels.points.size > 0


def test_cli_teacher_and_bench(drive: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    assert main(["teacher", "--bag", str(drive), "--vocab", "sample_drive", "--out", str(out),
                 "--model", "tiny-vit", "--image-size", "64", "128", "--quiet"]) == 0
    assert "3 computed" in capsys.readouterr().out and len(TeacherCache(out)) == 3

    from clip2scene_ros.bench.teacher import bench_teacher

    result = bench_teacher(model="tiny-vit", images=1, repeat=1, image_size=SIZE,
                           cache_frames=1)
    for key in ("images_per_s", "cache_bytes_per_frame", "model", "image_size", "threads"):
        assert key in result
    assert result["images_per_s"] > 0 and result["cache_bytes_per_frame"] > 0
    json.dumps(result)
