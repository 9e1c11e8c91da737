"""`make demo`'s pipeline end to end on tiny drives: train, export, evaluate, node replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from clip2scene_ros.training.demo import run_demo


def test_demo_pipeline_on_tiny_drives(tmp_path: Path) -> None:
    out = tmp_path / "report"
    summary = run_demo(out, work=tmp_path / "work", train_frames=4, heldout_frames=3,
                       replay_rate=0.3, overrides=[
        "epochs=1", "dataset.label_fraction=0.5", "model.architecture.cr=0.125",
        "model.input.voxel_size=0.5", "validation.max_samples=2", "checkpoint_every=0"])
    assert json.loads((out / "report.json").read_text()) == summary
    # the replay-eval keys head the report; the node ran the bundle copied into model/
    assert summary["frames_in"] == 3 and summary["frames_out"] + summary["dropped"] == 3
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert summary["miou"] == summary["replay_eval"]["miou"]
    assert summary["model"] == str(out / "model") and summary["replay_eval"]["model"] == str(
        out / "model")
    assert summary["train"]["steps"] == 1 and summary["train"]["onnx"] is not None
    assert (out / "model" / "model.onnx").is_file() and (out / "model" / "model.yaml").is_file()
    assert 0.0 <= summary["eval"]["miou"] <= 1.0 and summary["eval"]["frames"] == 3
    for picture in ("eval/bev.png", "eval/per_class_iou.png", "replay/bev.png",
                    "replay/camera_overlay.png"):
        assert (out / picture).is_file(), picture
    assert not (out / "drive_train").exists() and (tmp_path / "work" / "drive_train").is_dir()
    assert "skipped" in summary["distillation"]
