"""clip2scene replay-eval: the node in its own process on a replayed bag, scored end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from clip2scene_ros.cli import main as cli
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.node.replay_eval import cdr_stamp_ns
from clip2scene_ros.sample.drive import write_sample_drive
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
    torch.manual_seed(0)
    arch = ArchitectureSpec(cr=0.125, clip_dim=8, blocks=1)
    spec = BundleSpec(arch, InputSpec(voxel_size=0.5, features=("intensity",)), VocabularySpec(
        "sample_drive", tuple(vocab.names), tuple(tuple(c) for c in vocab.palette.tolist())))
    model = save_bundle(tmp_path / "model", spec, SPVCNN(arch, in_channels=1).state_dict(),
                        torch.nn.functional.normalize(torch.randn(len(vocab.names), 8), dim=1))
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


def test_replay_eval_without_ground_truth_measures_latency_only(
        drive_and_model: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from clip2scene_ros.node import replay_eval as module

    bag, model = drive_and_model
    lidar, _, _ = module._ground_truth(bag)
    monkeypatch.setattr(module, "_ground_truth", lambda path: (lidar, {}, None))
    result = module.replay_eval(bag, model, rate=0.3, report_dir=tmp_path / "report",
                                params={"device": "cpu"})
    assert result["miou"] is None and result["frames_scored"] == 0
    assert result["frames_in"] == 3 and result["latency_ms"]["p50"] > 0
