"""The nuScenes keyframe bags: TF-chained extrinsics, the point–pixel figures, calibration YAML.

Figures from ../shared/data/README.md: 22,152 point–camera pairs over 20,206 distinct points at
depth > 1 m, per camera FRONT 3,067, FRONT_RIGHT 3,079, FRONT_LEFT 3,704, BACK 4,826,
BACK_LEFT 4,097, BACK_RIGHT 3,379; chaining the TFs reproduces ``lidar2cam`` within 2e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.bag.inspect import format_inspect, inspect_bag
from clip2scene_ros.bag.reader import BagReader, ReaderConfig
from clip2scene_ros.calibration import Calibration, CameraCalibration, save_calibration
from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.camera_model import CameraModel
from clip2scene_ros.geometry.correspondence import frame_pairs
from clip2scene_ros.geometry.transforms import invert_transform

PAIRS = {"CAM_FRONT": 3067, "CAM_FRONT_RIGHT": 3079, "CAM_FRONT_LEFT": 3704,
         "CAM_BACK": 4826, "CAM_BACK_LEFT": 4097, "CAM_BACK_RIGHT": 3379}
PAIRS_TOTAL = 22152
DISTINCT = 20206


def figures(frame: Frame) -> tuple[dict[str, int], int, int]:
    pairs = frame_pairs(frame, min_depth=1.0)
    counts = pairs.count_per_camera(len(frame.cameras)).tolist()
    per_cam = dict(zip([v.name for v in frame.cameras], counts, strict=True))
    return per_cam, pairs.num_pairs, int(pairs.distinct_points().size)


@pytest.fixture(scope="module")
def calib_json(nuscenes_dir: Path) -> dict:
    return json.loads((nuscenes_dir / "calib_and_boxes.json").read_text())


@pytest.fixture(scope="module", params=["bag_mcap", "bag_sqlite3"])
def read(request: pytest.FixtureRequest, nuscenes_dir: Path) -> tuple[BagReader, list[Frame]]:
    reader = BagReader(nuscenes_dir / request.param)
    return reader, list(reader)


def test_frames_from_tf_and_camera_info(read: tuple[BagReader, list[Frame]], calib_json: dict
                                        ) -> None:
    reader, frames = read
    assert len(frames) == 1 and not reader.skipped
    frame = frames[0]
    assert frame.num_points == 34688 and frame.frame_id == "LIDAR_TOP"
    assert frame.stamp_ns == 1532402927647950848
    assert sorted(v.name for v in frame.cameras) == sorted(PAIRS)
    for name, cam in calib_json["cameras"].items():
        view = frame.camera(name)
        assert view.image.shape == (900, 1600, 3)
        assert view.stamp_ns == pytest.approx(cam["timestamp_s"] * 1e9, abs=1e3)
        np.testing.assert_allclose(view.camera.K, cam["cam2img"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(view.lidar_to_camera, cam["lidar2cam"], rtol=0, atol=2e-5)
    # world <- LiDAR at the sweep = ego2global(t_lidar) . lidar2ego
    expected_pose = np.asarray(calib_json["ego2global_at_lidar"]) @ calib_json["lidar2ego"]
    np.testing.assert_allclose(frame.pose, expected_pose, rtol=0, atol=1e-4)


def test_the_figures(read: tuple[BagReader, list[Frame]]) -> None:
    per_cam, total, distinct = figures(read[1][0])
    assert per_cam == PAIRS
    assert total == PAIRS_TOTAL and distinct == DISTINCT


def _intrinsics(cam: dict) -> CameraModel:
    return CameraModel(width=1600, height=900, K=np.asarray(cam["cam2img"]))


@pytest.mark.parametrize("form", ["lidar2cam", "static_rig"])
def test_calibration_yaml_gives_the_figures(
    nuscenes_dir: Path, calib_json: dict, tmp_path: Path, form: str
) -> None:
    """``lidar2cam`` is already motion-compensated: read it with folding off. The static rig
    (``cam2ego``, ``lidar2ego``) needs the ego motion from /tf folded in to match it."""
    cams = {}
    for name, cam in calib_json["cameras"].items():
        if form == "lidar2cam":
            T = np.asarray(cam["lidar2cam"])
        else:
            T = invert_transform(np.asarray(cam["cam2ego"])) @ np.asarray(calib_json["lidar2ego"])
        cams[name] = CameraCalibration(name, T, _intrinsics(cam))
    path = save_calibration(Calibration(cams, "LIDAR_TOP"), tmp_path / "calib.yaml")
    config = ReaderConfig(calibration=path, fold_ego_motion=form == "static_rig")
    frame = next(iter(BagReader(nuscenes_dir / "bag_mcap", config)))
    for name, cam in calib_json["cameras"].items():
        np.testing.assert_allclose(frame.camera(name).lidar_to_camera, cam["lidar2cam"],
                                   rtol=0, atol=2e-5)
    per_cam, total, distinct = figures(frame)
    assert per_cam == PAIRS and total == PAIRS_TOTAL and distinct == DISTINCT


def test_inspect_report(nuscenes_dir: Path) -> None:
    report = inspect_bag(nuscenes_dir / "bag_sqlite3")
    json.dumps(report)  # JSON-able
    assert report["storage"] == "sqlite3" and report["message_count"] == 22
    assert report["duration_s"] == pytest.approx(0.0431, abs=1e-4)
    assert report["topics"]["/tf"] == {
        "type": "tf2_msgs/msg/TFMessage", "count": 7,
        "rate_hz": pytest.approx(6 / 0.043106816, rel=1e-6)}
    assert report["topics"]["/LIDAR_TOP"]["rate_hz"] is None  # one message: no rate
    assert report["topics"]["/CAM_FRONT/image/compressed"]["count"] == 1  # unused, still listed
    assert report["detected"]["lidar"] == "/LIDAR_TOP"
    assert report["detected"]["cameras"]["CAM_FRONT"]["image"] == "/CAM_FRONT/image_raw"
    assert report["pairs"] == PAIRS
    assert report["pairs_total"] == PAIRS_TOTAL and report["distinct_points"] == DISTINCT
    (frame,) = report["frames"]
    assert frame["num_points"] == 34688 and frame["pairs"] == PAIRS
    assert frame["offsets_ms"]["CAM_FRONT"] == pytest.approx(-35.491072)
    assert frame["offsets_ms"]["CAM_FRONT_LEFT"] == pytest.approx(-43.106816)
    assert report["problems"] == []
    text = format_inspect(report)
    assert "22152 pairs, 20206 distinct points" in text and "no problems found" in text
    assert "-35.5/3067" in text


def test_inspect_warns_on_bad_sync_and_calibration(nuscenes_dir: Path, tmp_path: Path) -> None:
    # A slop of 40 ms loses CAM_FRONT_LEFT (43 ms early); a calibration turning one camera
    # around leaves it with no pairs.
    flipped = np.diag([-1.0, 1.0, -1.0, 1.0])
    path = save_calibration(
        Calibration({"CAM_BACK": CameraCalibration("CAM_BACK", flipped)}), tmp_path / "c.yaml"
    )
    report = inspect_bag(nuscenes_dir / "bag_mcap", ReaderConfig(slop_s=0.04, calibration=path))
    assert "CAM_FRONT_LEFT" not in report["frames"][0]["cameras"]
    assert report["pairs"]["CAM_BACK"] == 0 and report["pairs"]["CAM_FRONT"] == 3067
    problems = "\n".join(report["problems"])
    assert "camera CAM_FRONT_LEFT: nearest image beyond the 40 ms slop in 1 of 1" in problems
    assert "camera CAM_BACK: 0 point-pixel pairs" in problems
    assert "WARNING   camera CAM_BACK: 0 point-pixel pairs" in format_inspect(report)
