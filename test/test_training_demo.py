"""`make demo`'s pipeline end to end on tiny drives: teacher, distillation, export, evaluation,
the node on a replay; and the MaskCLIP teacher it uses when given CLIP weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip", reason="open_clip_torch is not installed")


def test_demo_pipeline_on_tiny_drives(tmp_path: Path) -> None:
    pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")
    from clip2scene_ros.tools.demo import run_demo

    out = tmp_path / "report"
    summary = run_demo(out, work=tmp_path / "work", train_frames=4, heldout_frames=3,
                       replay_rate=0.3, overrides=[
        "epochs=1", "model.architecture.cr=0.125", "model.input.voxel_size=0.5",
        "checkpoint_every=0"])
    assert json.loads((out / "report.json").read_text()) == summary
    # the replay-eval keys head the report; the node ran the bundle copied into model/
    assert list(summary)[:5] == ["miou", "frames_in", "frames_out", "dropped", "latency_ms"]
    assert summary["frames_in"] == 3 and summary["frames_out"] + summary["dropped"] == 3
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert summary["model"] == str(out / "model") and summary["replay_eval"]["model"] == str(
        out / "model")
    # annotation-free: the simulated teacher taught it, and is named beside its score
    assert summary["teacher"] == "simulated:maskclip_like"
    assert summary["train"]["config"].endswith("sample_drive_distill.yaml")
    assert 0.0 < summary["teacher_miou"] < 1.0
    # the headline's teacher score is the held-out drive's, as the detailed section gives it
    assert summary["teacher_miou"] == summary["teacher_detail"]["heldout"]["teacher_miou"]
    evaluation = summary["eval"]
    assert 0.0 <= evaluation["miou"] <= 1.0 and evaluation["frames"] == 3
    # in view + out of view partition the scored points
    assert evaluation["in_view"]["points"] + evaluation["out_of_view"]["points"] == \
        evaluation["points"]
    assert summary["miou_in_view"] == evaluation["in_view"]["miou"]
    assert summary["miou_out_of_view"] == evaluation["out_of_view"]["miou"]
    # two independent computations of one number: the node's published clouds scored by
    # replay-eval, and the offline Predictor pass over the same bag
    if summary["dropped"] == 0:
        assert summary["miou"] == pytest.approx(evaluation["miou"], abs=1e-9)
    assert summary["train"]["steps"] >= 1 and summary["train"]["onnx"] is not None
    assert (out / "model" / "model.onnx").is_file() and (out / "model" / "model.yaml").is_file()
    for picture in ("eval/bev.png", "eval/per_class_iou.png", "replay/bev.png",
                    "replay/camera_overlay.png"):
        assert (out / picture).is_file(), picture
    assert not (out / "drive_train").exists() and (tmp_path / "work" / "drive_train").is_dir()


def test_demo_teacher_with_clip_weights_is_maskclip(tmp_path: Path) -> None:
    """``--pretrained FILE`` makes MaskCLIP label the drives (here a tiny CLIP's weights file)."""
    from safetensors.torch import save_file

    from clip2scene_ros.sample.drive import small_rig, write_sample_drive
    from clip2scene_ros.teacher.cache import TeacherCache
    from clip2scene_ros.teacher.clip_loader import load_clip
    from clip2scene_ros.tools.demo import _teacher

    clip, _ = load_clip("tiny-vit", None)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    train_bag, heldout = tmp_path / "train", tmp_path / "heldout"
    write_sample_drive(train_bag, frames=2, seed=0, rig=small_rig())
    write_sample_drive(heldout, frames=2, seed=1, rig=small_rig())
    bank, cache, quality = _teacher(tmp_path / "work", train_bag, heldout, str(weights),
                                    "tiny-vit")
    assert quality["teacher"] == "maskclip:tiny-vit" and quality["simulated"] is False
    teacher = TeacherCache(cache)
    assert teacher.simulated is None and teacher.teacher["store_features"]
    assert teacher.teacher["weights"].startswith("file:")
    assert torch.isfinite(torch.tensor(quality["teacher_accuracy"]))
    assert bank.name == "bank_clip"
