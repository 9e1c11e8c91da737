"""Bad arguments, bags and data files reach the command line as their layer's error: one line
naming the argument, file or bag, and exit status 2 (no traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.cli import main as cli
from clip2scene_ros.codecs import encode_pointcloud2
from clip2scene_ros.codecs.messages import rosbags_factory

XYZ = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m")


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line, which must fail with status 2 and one line on stderr."""
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def unlabelled_bag(path: Path) -> Path:
    """A bag with two LiDAR sweeps and no label cloud topic."""
    cloud = np.zeros(50, XYZ)
    cloud["x"] = np.linspace(2, 20, 50)
    f = rosbags_factory()
    with BagWriter(path) as bag:
        for k in (1, 2):
            stamp = k * 100_000_000
            bag.write("/points", encode_pointcloud2(cloud, stamp_ns=stamp, frame_id="lidar",
                                                    factory=f), stamp)
    return path


@pytest.mark.parametrize(("option", "value", "line"), [
    ("--frames", "0", "frames: must be a positive integer, got 0"),
    ("--seed", "-1", "seed: must be a non-negative integer, got -1"),
])
def test_sample_arguments_are_config_errors(option: str, value: str, line: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    got = one_error_line(["sample", "--out", str(tmp_path / "drive"), option, value], capsys)
    assert got == f"clip2scene sample: error: {line}"
    assert not (tmp_path / "drive").exists()


@pytest.mark.parametrize("kind", ["ros1", "file", "corrupt"])
def test_a_bag_that_cannot_be_opened_is_a_bag_error(kind: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "ros1":
        bag = tmp_path / "drive.bag"
        bag.write_bytes(b"#ROSBAG V2.0\n")
        cause = "a ROS 1 bag; convert it with `rosbags-convert` first"
    elif kind == "file":
        bag = tmp_path / "drive.mcap"
        bag.write_bytes(b"")
        cause = "a file; give the rosbag2 directory (with metadata.yaml)"
    else:
        bag = unlabelled_bag(tmp_path / "drive")
        (bag / "drive.mcap").write_bytes(b"not an mcap file")
        cause = ""
    got = one_error_line(["inspect", "--bag", str(bag)], capsys)
    assert got.startswith(f"clip2scene inspect: error: bags: cannot read bag {bag}: "), got
    assert got.endswith(cause), got
    if kind == "corrupt":  # names the storage file that cannot be opened
        assert f"opening {bag / 'drive.mcap'} (16 bytes): " in got, got


def test_eval_of_a_bag_without_labels_names_the_bag(bundle: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bag = unlabelled_bag(tmp_path / "drive")
    got = one_error_line(["eval", "--model", str(bundle), "--bag", str(bag), "--vocab",
                          "semantickitti", "--json", str(tmp_path / "r.json")], capsys)
    assert got == (f"clip2scene eval: error: bags: cannot read bag {bag}: its topics: no label "
                   "cloud topic (a PointCloud2 with a `label` field)")


def kitti_scan(folder: Path, points: int = 200, labels: int = 200) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    scan, label = folder / "000000.bin", folder / "000000.label"
    rng.uniform(-10, 10, (points, 4)).astype(np.float32).tofile(scan)
    np.full(labels, 40, np.uint32).tofile(label)
    return scan, label


def test_eval_kitti_arguments_and_files_are_named(bundle: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scan, label = kitti_scan(tmp_path)
    common = ["eval", "--model", str(bundle), "--vocab", "semantickitti", "--json",
              str(tmp_path / "r.json")]
    got = one_error_line([*common, "--kitti-bin", str(scan), str(scan), "--kitti-label",
                          str(label)], capsys)
    assert got == "clip2scene eval: error: kitti_label: 2 .bin files but 1 .label files"
    got = one_error_line([*common, "--kitti-bin", str(scan), "--kitti-label", str(label),
                          "--max-frames", "0"], capsys)
    assert got == "clip2scene eval: error: max_frames: must be >= 1, got 0"

    short = tmp_path / "short.label"
    np.zeros(10, np.uint32).tofile(short)
    got = one_error_line([*common, "--kitti-bin", str(scan), "--kitti-label", str(short)], capsys)
    assert got == ("clip2scene eval: error: kitti_label: 10 labels for a scan of 200 points "
                   f"(in {short})")

    cut = tmp_path / "cut.bin"
    cut.write_bytes(scan.read_bytes()[:-4])  # one float short of whole points
    got = one_error_line([*common, "--kitti-bin", str(cut), "--kitti-label", str(label)], capsys)
    assert got == ("clip2scene eval: error: scan: 799 floats is not a whole number of 4-float "
                   f"points (in {cut})")


@pytest.mark.parametrize(("argv", "line"), [
    (["fuzz", "--cases", "1", "--types", "pointcloud2,laserscan"],
     "clip2scene fuzz: error: types: unknown message types ['laserscan']"),
    (["bench", "teacher", "--images", "0"],
     "clip2scene bench: error: images: must be >= 1"),
])
def test_tool_arguments_are_one_line(argv: list[str], line: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert one_error_line(argv, capsys).startswith(line)


def test_soak_arguments_are_one_line(
        bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rclpy", reason="the soak drives the node over rclpy")
    bag = unlabelled_bag(tmp_path / "bag")
    got = one_error_line(["soak", "--bag", str(bag), "--model", str(bundle), "--frames", "10",
                          "--window", "0", "--out", str(tmp_path / "s")], capsys)
    assert got.endswith("window: must be >= 1, got 0")
    got = one_error_line(["soak", "--bag", str(bag), "--model", str(bundle), "--frames", "10",
                          "--warmup", "10", "--out", str(tmp_path / "s")], capsys)
    assert "warmup: must be in [0, frames), got 10 of 10" in got
