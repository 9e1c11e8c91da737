"""Calibration YAML: both extrinsic forms, intrinsics, exact round trip, errors naming keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.calibration import (
    Calibration,
    CameraCalibration,
    load_calibration,
    save_calibration,
)
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.geometry.camera_model import CameraModel
from clip2scene_ros.geometry.transforms import invert_transform, make_transform

Q_OPTICAL = [-0.5, 0.5, -0.5, 0.5]  # x-forward body -> z-forward optical
T_LIDAR_CAM = make_transform([0.1, -0.2, 0.3], Q_OPTICAL)
K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]


def matrix_entry() -> dict:
    return {
        "lidar_to_camera": invert_transform(T_LIDAR_CAM).tolist(),
        "intrinsics": {"width": 640, "height": 480, "K": K, "D": [0.1, -0.05, 0, 0, 0.01],
                       "distortion_model": "plumb_bob"},
    }


def test_matrix_form_with_intrinsics() -> None:
    cal = load_calibration({"cameras": {"front": matrix_entry()}})
    cam = cal["front"]
    np.testing.assert_allclose(cam.lidar_to_camera, invert_transform(T_LIDAR_CAM))
    assert cam.camera is not None and cam.camera.distortion_model == "plumb_bob"
    np.testing.assert_array_equal(cam.camera.K, K)
    assert cam.camera.width == 640 and "front" in cal and "back" not in cal
    with pytest.raises(KeyError, match="no camera 'back'"):
        cal["back"]


def test_parent_child_form_both_directions() -> None:
    pose = {"translation": [0.1, -0.2, 0.3], "rotation": Q_OPTICAL}
    cal = load_calibration(
        {"cameras": {"a": {"parent_frame": "lidar", "child_frame": "cam_a", **pose}}}
    )
    np.testing.assert_allclose(cal["a"].lidar_to_camera, invert_transform(T_LIDAR_CAM))
    assert cal["a"].frame_id == "cam_a" and cal["a"].camera is None
    # The same numbers with the camera as parent: the pose is already LiDAR -> camera.
    cal = load_calibration(
        {"lidar_frame": "lidar",
         "cameras": {"b": {"parent_frame": "cam_b", "child_frame": "lidar", **pose}}}
    )
    np.testing.assert_allclose(cal["b"].lidar_to_camera, T_LIDAR_CAM)
    with pytest.raises(ConfigError, match=r"cameras\.c\.parent_frame.*LiDAR frame 'lidar'"):
        load_calibration({"lidar_frame": "lidar",
                          "cameras": {"c": {"parent_frame": "x", "child_frame": "y", **pose}}})


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({}, "cameras.f.lidar_to_camera: is required"),
        ({"lidar_to_camera": np.eye(3).tolist()}, "cameras.f.lidar_to_camera: must be a 4x4"),
        ({"lidar_to_camera": (2 * np.eye(4)).tolist()}, "cameras.f.lidar_to_camera: last row"),
        ({"lidar_to_camera": np.diag([2.0, 1, 1, 1]).tolist()}, "not a rotation"),
        ({"lidar_to_camera": np.eye(4).tolist(), "parent_frame": "l"},
         "cameras.f.parent_frame: give either"),
        ({"parent_frame": "l", "child_frame": "c", "translation": [0, 0, 0]},
         "cameras.f.rotation: is required"),
        ({"parent_frame": "l", "child_frame": "c", "translation": [0, 0],
          "rotation": [0, 0, 0, 1]}, "cameras.f.translation: must be"),
        ({"parent_frame": "l", "child_frame": "c", "translation": [0, 0, 0],
          "rotation": [0, 0, 0, 0]}, "cameras.f.rotation: .*zero norm"),
        ({"lidar_to_camera": np.eye(4).tolist(), "intrinsics": {"width": 4, "height": 3,
                                                                "K": [[1, 0], [0, 1]]}},
         r"cameras.f.intrinsics(\.K)?: .*must be a 3x3"),
        ({"lidar_to_camera": np.eye(4).tolist(), "intrinsics": {"width": 4, "height": 3, "K": K,
                                                                "distortion_model": "fancy"}},
         r"cameras.f.intrinsics(\.distortion_model)?: .*fancy"),
        ({"lidar_to_camera": np.eye(4).tolist(), "intrinsics": {
            "width": 4, "height": 3, "K": K, "D": [1, 2], "distortion_model": "plumb_bob"}},
         r"cameras.f.intrinsics(\.D)?: .*D has 2 coefficients"),
        ({"lidar_to_camera": np.eye(4).tolist(), "extrinsic": 1}, "cameras.f.extrinsic: unknown"),
    ],
)
def test_errors_name_the_key(entry: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_calibration({"cameras": {"f": entry}})


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=4)
    T = make_transform(rng.normal(size=3), q / np.linalg.norm(q))
    model = CameraModel(width=640, height=480, K=np.array(K), D=np.array([0.1, 0.2, 0, 0, 0.3]),
                        distortion_model="plumb_bob")
    cal = Calibration({"front": CameraCalibration("front", T, model),
                       "side": CameraCalibration("side", np.eye(4))}, lidar_frame="lidar")
    path = save_calibration(cal, tmp_path / "sub" / "calib.yaml")
    back = load_calibration(path)
    assert back.lidar_frame == "lidar" and set(back.cameras) == {"front", "side"}
    np.testing.assert_array_equal(back["front"].lidar_to_camera, T)  # bit-exact
    assert back["front"].camera is not None and back["side"].camera is None
    np.testing.assert_array_equal(back["front"].camera.D, model.D)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "calib.yaml"
    path.write_text("cameras:\n  front:\n    lidar_to_camera: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cameras.front.lidar_to_camera.*calib.yaml"):
        load_calibration(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(tmp_path / "missing.yaml")
