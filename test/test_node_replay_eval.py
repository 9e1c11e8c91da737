"""clip2scene replay-eval: the node in its own process on a replayed bag, scored end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from clip2scene_ros.cli import main as cli
from clip2scene_ros.models.spvcnn import save_random_bundle
from clip2scene_ros.sample.drive import write_sample_drive
from clip2scene_ros.tools.replay_eval import cdr_stamp_ns
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary


def test_cdr_stamp_without_decoding() -> None:
    from rclpy.serialization import serialize_message
    from std_msgs.msg import Header

    msg = Header()
    msg.stamp.sec, msg.stamp.nanosec, msg.frame_id = 12, 345, "x"
    assert cdr_stamp_ns(serialize_message(msg)) == 12_000_000_345


@pytest.fixture(scope="module")
def drive_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("replay_eval")
    bag = tmp_path / "drive"
    write_sample_drive(bag, frames=3, seed=1)
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    model = save_random_bundle(tmp_path / "model", name="sample_drive", classes=vocab.names,
                               palette=[tuple(c) for c in vocab.palette.tolist()], cr=0.125,
                               blocks=1, voxel_size=0.5)
    return bag, model


def test_replay_eval_scores_the_node_process(drive_and_model: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    bag, model = drive_and_model
    out = tmp_path / "result.json"
    assert cli(["replay-eval", "--bag", str(bag), "--model", str(model), "--json", str(out),
                "--report", str(tmp_path / "report"), "--rate", "0.3",
                "--param", "device:=cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["frames_in"] == 3 and result["frames_out"] == 3 - result["dropped"]
    assert result["frames_scored"] + result["dropped"] >= 3 - 1  # at most one lost
    assert result["frames_scored"] >= 1 and 0.0 <= result["miou"] <= 1.0
    assert result["latency_ms"]["p50"] > 0 and result["latency_ms"]["max"] >= \
        result["latency_ms"]["p50"]
    assert Path(result["output_bag"]).is_dir()
    assert any(p.endswith("bev.png") for p in result["report"])


@pytest.fixture(scope="module")
def unlabelled(drive_and_model: tuple[Path, Path], bag_without: Any) -> Path:
    """A copy of the drive without its ground-truth label topic, as a user's own recording."""
    from clip2scene_ros.sample.drive import LABELS_TOPIC

    drive = drive_and_model[0]
    return bag_without(drive, drive.parent / "unlabelled", LABELS_TOPIC)


def test_replay_eval_without_ground_truth_still_draws_the_predictions(
        drive_and_model: tuple[Path, Path], unlabelled: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, model = drive_and_model
    out, report = tmp_path / "result.json", tmp_path / "report"
    assert cli(["replay-eval", "--bag", str(unlabelled), "--model", str(model), "--json",
                str(out), "--report", str(report), "--rate", "0.3",
                "--param", "device:=cpu"]) == 0
    printed = capsys.readouterr().out
    assert '"miou": null' in out.read_text()
    result = json.loads(out.read_text())
    assert result["miou"] is None and result["frames_scored"] == 0
    assert result["frames_in"] == 3 and result["frames_out"] >= 1
    assert result["latency_ms"]["p50"] > 0
    assert "mIoU n/a (no ground truth)" in printed
    figures = [report / "bev.png", report / "camera_overlay.png"]
    assert sorted(result["report"]) == sorted(str(p) for p in figures)
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert str(figure) in printed, printed
    assert not (report / "per_class_iou.png").exists()  # nothing to score
