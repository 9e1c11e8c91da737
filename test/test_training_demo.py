"""`make demo`'s pipeline end to end on tiny drives: train, export, evaluate, node replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from clip2scene_ros.training.demo import run_demo


def test_demo_pipeline_on_tiny_drives(tmp_path: Path) -> None:
    summary = run_demo(tmp_path, train_frames=4, heldout_frames=3, replay_rate=0.3, overrides=[
        "epochs=1", "dataset.label_fraction=0.5", "model.architecture.cr=0.125",
        "model.input.voxel_size=0.5", "validation.max_samples=2", "checkpoint_every=0"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["train"]["steps"] == 1 and summary["train"]["onnx"] is not None
    assert (Path(summary["bundle"]) / "model.onnx").is_file()
    assert 0.0 <= summary["eval"]["miou"] <= 1.0 and summary["eval"]["frames"] == 3
    replay = summary["replay_eval"]
    assert replay["frames_in"] == 3 and replay["frames_out"] + replay["dropped"] == 3
    assert (tmp_path / "eval" / "bev.png").is_file() and "skipped" in summary["distillation"]
