"""The ROS-free frame processor: camera views and why each camera is left out, lazy image
decoding, sweep history and pose gating, fusion in view only, the labelled cloud's arrays and
colours, the overlay, bad input counting and the diagnostics it reports. Plain pytest: decoded
arrays in, arrays out."""

from __future__ import annotations

import importlib.util
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from clip2scene_ros.codecs import UNKNOWN_LABEL, encode_image, image_to_rgb8
from clip2scene_ros.codecs.messages import rosbags_factory
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.geometry.camera_model import CameraModel
from clip2scene_ros.node_params import load_node_params
from clip2scene_ros.runtime.camera_views import CameraImage
from clip2scene_ros.runtime.colouring import (
    UNKNOWN_GREY,
    draw_overlay,
    label_colours,
    labelled_cloud,
    overlay_image,
)
from clip2scene_ros.runtime.frame_processor import FrameProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = 1_000_000_000
WIDTH, HEIGHT = 96, 64
CLOUD = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                  "offsets": [0, 4, 8, 12], "itemsize": 16})
#: LiDAR (x forward, y left, z up) -> camera optical frame (z forward, x right, y down)
LIDAR_TO_CAMERA = [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 1.0]]
PALETTE = ((10, 20, 30), (200, 0, 0), (0, 200, 0))
LOG = logging.getLogger("test_frame_processor")
SPEED_M_PER_S = 10.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m", name="three",
                              classes=("road", "car", "tree"), clip_dim=32, palette=PALETTE)


@pytest.fixture(scope="module")
def bundle3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b3") / "m3", sweeps=3)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.yaml"
    path.write_text(yaml.safe_dump({"cameras": {"cam": {"lidar_to_camera": LIDAR_TO_CAMERA}}}))
    return path


def camera_model() -> CameraModel:
    K = np.array([[40.0, 0.0, WIDTH / 2], [0.0, 40.0, HEIGHT / 2], [0.0, 0.0, 1.0]])
    return CameraModel(width=WIDTH, height=HEIGHT, K=K)


def cloud(stamp_ns: int, n: int = 600, nan: int = 0) -> np.ndarray:
    rng = np.random.default_rng(stamp_ns % 1000)
    out = np.zeros(n, CLOUD)
    out["x"] = rng.uniform(-5, 20, n)  # most points ahead, where the camera looks
    out["y"] = rng.uniform(-10, 10, n)
    out["z"] = rng.uniform(-3, 3, n)
    out["intensity"] = rng.uniform(0, 100, n)
    out["x"][:nan] = np.nan
    return out


def image(stamp_ns: int, encoding: str = "rgb8", size: tuple[int, int] = (WIDTH, HEIGHT)
          ) -> CameraImage:
    """A synced image as the node hands it over: decoded by the codec only when read."""
    rgb = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    msg = encode_image(rgb, "rgb8", stamp_ns=stamp_ns, frame_id="cam_optical",
                       factory=rosbags_factory())
    msg.encoding = encoding
    return CameraImage(stamp_ns, "cam_optical", partial(image_to_rgb8, msg))


def processor(bundle: Path, calibration: Path | None = None, *, cameras: bool = True,
              tf_available: bool = False, **extra: Any) -> FrameProcessor:
    values: dict[str, Any] = {"model_path": str(bundle), "device": "cpu", **extra}
    if cameras:
        values["camera_topics"] = ["/cam/image_raw"]
        if calibration is not None:
            values["calibration_file"] = str(calibration)
    return FrameProcessor(load_node_params(values), LOG, tf_available=tf_available)


def spy(proc: FrameProcessor) -> list[list[Any]]:
    """Record the frames each predict call gets."""
    calls: list[list[Any]] = []
    predict = proc.predictor.predict

    def recording(frames: list[Any]) -> Any:
        calls.append(list(frames))
        return predict(frames)

    proc.predictor.predict = recording  # type: ignore[method-assign]
    return calls


# --- colouring --------------------------------------------------------------------------------
def test_labelled_cloud_keeps_every_input_point_and_colours_unknown_grey() -> None:
    raw = cloud(5, n=10, nan=2)
    kept = np.arange(2, 10)
    label = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.uint16)
    score = np.linspace(0.5, 0.9, 8, dtype=np.float32)
    out = labelled_cloud(raw, kept, label, score, np.asarray(PALETTE, np.uint8))
    assert out.label.shape == (10,) and out.label.dtype == np.uint16
    assert (out.label[:2] == UNKNOWN_LABEL).all() and (out.score[:2] == 0).all()
    assert np.array_equal(out.label[2:], label) and np.array_equal(out.score[2:], score)
    assert (out.rgb[:2] == UNKNOWN_GREY).all()
    assert out.rgb[2:].tolist() == [list(PALETTE[c]) for c in label]
    assert np.isnan(out.xyz[:2, 0]).all() and np.array_equal(out.intensity, raw["intensity"])
    no_intensity = labelled_cloud(raw[["x", "y", "z"]], kept, label, score,
                                  np.asarray(PALETTE, np.uint8))
    assert no_intensity.intensity is None
    assert label_colours(np.array([7], np.uint16), np.asarray(PALETTE, np.uint8)).tolist() == \
        [[UNKNOWN_GREY] * 3]


def test_overlay_draws_squares_nearest_on_top_and_skips_unknown_labels() -> None:
    from clip2scene_ros.geometry.correspondence import PointPixelPairs

    blank = np.zeros((10, 10, 3), np.uint8)
    pixel = np.array([[5, 5], [5, 5], [0, 0]])
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    drawn = overlay_image(blank, pixel, colors, depth=np.array([2.0, 1.0, 3.0]))
    assert drawn[5, 5].tolist() == [0, 255, 0]  # the nearer point shows
    assert drawn[4, 6].tolist() == [0, 255, 0] and drawn[1, 1].tolist() == [0, 0, 255]
    assert drawn[3, 3].tolist() == [0, 0, 0] and not blank.any()  # 3x3 squares; input kept
    pairs = PointPixelPairs(point_index=np.array([0, 1]), camera_index=np.zeros(2, np.int32),
                            uv=np.array([[2.5, 2.5], [7.5, 7.5]], np.float32),
                            pixel=np.array([[2, 2], [7, 7]], np.int32),
                            depth=np.ones(2, np.float32))
    label = np.array([1, UNKNOWN_LABEL], np.uint16)
    out = draw_overlay(blank, pairs, label, np.asarray(PALETTE, np.uint8))
    assert out[2, 2].tolist() == list(PALETTE[1]) and not out[7, 7].any()


# --- cameras ----------------------------------------------------------------------------------
def test_camera_used_only_with_image_intrinsics_and_extrinsics(bundle: Path,
                                                               calibration: Path) -> None:
    proc = processor(bundle, calibration)
    stamp = 100 * S
    out = proc.label(cloud(stamp), stamp, "lidar", {"cam": image(stamp)}, overlay=True)
    assert out is not None and not out.frame.cameras and out.overlay is None
    assert proc.camera_state == {"cam": "no CameraInfo on /cam/camera_info yet"}
    proc.rig.set_intrinsics("cam", camera_model())
    out = proc.label(cloud(stamp + S), stamp + S, "lidar", {})
    assert out is not None and "no image within 0.05 s" in proc.camera_state["cam"]
    assert proc.health.frames["lidar_only"] == 2 and proc.health.frames["with_cameras"] == 0
    out = proc.label(cloud(stamp + 2 * S), stamp + 2 * S, "lidar", {"cam": image(stamp)},
                     overlay=True)
    assert out is not None and proc.camera_state == {"cam": "ok"}
    assert [v.name for v in out.frame.cameras] == ["cam"] and out.pairs is not None
    _, _, values = proc.diagnostics(0.0, sync="builtin")
    assert values["camera_cam"] == "ok" and values["sync"] == "builtin"
    assert values["fusion"] == "off" and proc.health.frames["with_cameras"] == 1


def test_overlay_of_the_first_camera_in_label_colours(bundle: Path, calibration: Path) -> None:
    proc = processor(bundle, calibration)
    proc.rig.set_intrinsics("cam", camera_model())
    out = proc.label(cloud(7 * S), 7 * S, "lidar", {"cam": image(6 * S)}, overlay=True)
    assert out is not None and out.overlay is not None and proc.work["overlay"] == 1
    assert out.overlay.image.shape == (HEIGHT, WIDTH, 3)
    assert (out.overlay.stamp_ns, out.overlay.frame_id) == (6 * S, "cam_optical")
    colours = {tuple(c) for c in out.overlay.image.reshape(-1, 3).tolist()}
    assert colours & set(PALETTE)
    assert out.cloud is not None and out.cloud.label.shape == (600,)
    assert proc.label(cloud(8 * S), 8 * S, "lidar", {"cam": image(8 * S)},
                      cloud_out=False).cloud is None  # type: ignore[union-attr]


def test_images_are_decoded_only_when_read_and_a_bad_one_is_counted(
        bundle: Path, calibration: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = processor(bundle, calibration, log_throttle_s=60.0)
    proc.rig.set_intrinsics("cam", camera_model())
    decoded: list[int] = []

    def counting(stamp: int) -> CameraImage:
        bad = image(stamp, encoding="yuv9_planar")
        return CameraImage(stamp, bad.frame_id, lambda: decoded.append(1) or bad.decode())

    # no fusion, no overlay: the image is never decoded and the camera counts as used
    assert proc.label(cloud(S), S, "lidar", {"cam": counting(S)}) is not None
    assert not decoded and proc.camera_state == {"cam": "ok"} and not proc.health.bad
    with caplog.at_level(logging.WARNING):
        for i in (2, 3):
            out = proc.label(cloud(i * S), i * S, "lidar", {"cam": counting(i * S)},
                             overlay=True)
            assert out is not None and out.overlay is None
    assert len(decoded) == 2 and proc.health.bad["Image"] == 2
    assert proc.camera_state == {"cam": "image malformed (encoding)"}
    assert caplog.text.count("dropped a bad Image") == 1  # throttled
    out = proc.label(cloud(4 * S), 4 * S, "lidar", {"cam": image(4 * S, size=(48, 32))},
                     overlay=True)
    assert proc.camera_state["cam"] == "image is 48x32 but its intrinsics publish 96x64"


def test_without_extrinsics_the_cameras_are_unusable_and_fusion_is_refused(bundle: Path
                                                                            ) -> None:
    proc = processor(bundle)
    assert proc.unusable is not None and "tf2_ros is not installed" in proc.unusable
    proc.rig.set_intrinsics("cam", camera_model())
    assert proc.label(cloud(S), S, "lidar", {"cam": image(S)}) is not None
    assert proc.health.frames["lidar_only"] == 1
    level, message, _ = proc.diagnostics(0.0)
    assert level == "WARN" and "LiDAR-only" in message and "tf2_ros is not installed" in message
    with pytest.raises(ConfigError) as info:
        processor(bundle, fusion=True, clip_model="tiny-vit", clip_pretrained="random")
    assert info.value.key == "calibration_file"
    # with a lookup the extrinsics come from it (tf2); its reason when it has none
    proc = processor(bundle, tf_available=True)
    assert proc.unusable is None and proc.wants_lookup
    proc.rig.set_intrinsics("cam", camera_model())
    proc.lookup = lambda target, source, stamp, latest: f"no tf2 transform {source} -> {target}"
    proc.label(cloud(S), S, "lidar", {"cam": image(S)})
    assert proc.camera_state == {"cam": "no tf2 transform lidar -> cam_optical"}
    proc.lookup = lambda target, source, stamp, latest: np.array(LIDAR_TO_CAMERA)
    proc.label(cloud(2 * S), 2 * S, "lidar", {"cam": image(2 * S)})
    assert proc.camera_state == {"cam": "ok"}


def test_calibration_of_another_lidar_frame_is_not_used(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump({"lidar_frame": "velodyne", "cameras": {
        "cam": {"lidar_to_camera": LIDAR_TO_CAMERA}}}))
    proc = processor(bundle, path)
    proc.rig.set_intrinsics("cam", camera_model())
    proc.label(cloud(S), S, "lidar", {"cam": image(S)})
    assert "the cloud is in frame 'lidar'" in proc.camera_state["cam"]
    assert "calibrates 'velodyne'" in proc.camera_state["cam"]


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip is not installed")
def test_fusion_changes_labels_in_view_only(bundle: Path, calibration: Path) -> None:
    from clip2scene_ros.frame import Frame
    from clip2scene_ros.geometry.correspondence import point_pixel_pairs

    torch.manual_seed(0)  # the random CLIP's weights
    proc = processor(bundle, calibration, fusion=True, fusion_weight=0.9, clip_model="tiny-vit",
                     clip_pretrained="random")
    proc.rig.set_intrinsics("cam", camera_model())
    stamp = 100 * S
    out = proc.label(cloud(stamp), stamp, "lidar", {"cam": image(stamp)})
    assert out is not None and out.cloud is not None and proc.work["fusion"] == 1
    _, _, values = proc.diagnostics(0.0)
    assert values["fusion"] == "on (tiny-vit, weight 0.9)"
    fused = out.cloud.label
    frame = Frame(stamp_ns=stamp, frame_id="lidar", xyz=out.frame.xyz,
                  intensity=out.frame.intensity)
    alone = proc.predictor.predict([frame]).labels.label  # the 3D network alone
    pairs = point_pixel_pairs(frame.xyz, [(camera_model(), np.array(LIDAR_TO_CAMERA))],
                              min_depth=1.0)
    in_view = np.zeros(frame.num_points, bool)
    in_view[pairs.distinct_points()] = True
    assert 20 < in_view.sum() < frame.num_points - 20
    assert np.array_equal(fused[~in_view], alone[~in_view])
    assert (fused[in_view] != alone[in_view]).any()


# --- sweeps -----------------------------------------------------------------------------------
def odometry(target: str, source: str, stamp_ns: int, latest: bool) -> np.ndarray | str:
    """odom ← lidar: the car drives along x at SPEED_M_PER_S."""
    if (target, source) != ("odom", "lidar"):
        return f"no tf2 transform {source} -> {target}"
    pose = np.eye(4)
    pose[0, 3] = SPEED_M_PER_S * stamp_ns / S
    return pose


def test_past_sweeps_are_merged_with_their_ego_poses(bundle3: Path) -> None:
    proc = processor(bundle3, cameras=False, tf_available=True)
    assert proc.wants_lookup  # no cameras: the lookup for the poses alone
    proc.lookup = odometry
    calls = spy(proc)
    for i in range(4):
        stamp = 100 * S + i * S // 10
        assert proc.label(cloud(stamp), stamp, "lidar", {}) is not None
    frames = calls[-1]
    assert [len(c) for c in calls] == [1, 2, 3, 3]  # the key frame and past sweeps
    stamps = [f.stamp_ns for f in frames]
    assert stamps[0] > stamps[1] > stamps[2]
    for f in frames:
        assert f.pose is not None and f.pose[0, 3] == pytest.approx(SPEED_M_PER_S * f.stamp_ns / S)
    assert not frames[1].cameras and proc.sweep_state == "3 of 3"
    _, _, values = proc.diagnostics(0.0)
    assert values["sweeps"] == "3 of 3"


def test_the_history_restarts_when_the_clock_jumps(bundle3: Path) -> None:
    proc = processor(bundle3, cameras=False, tf_available=True)
    proc.lookup = odometry
    calls = spy(proc)
    for stamp in (100 * S, 101 * S, 50 * S, 51 * S, 51 * S, 52 * S, 52 * S + 61 * S):
        proc.label(cloud(stamp), stamp, "lidar", {})
    # back in time (a bag loop), the same stamp again, far ahead: each starts over
    assert [len(c) for c in calls] == [1, 2, 1, 2, 1, 2, 1]
    proc.reset()
    proc.label(cloud(200 * S), 200 * S, "lidar", {})
    assert len(calls[-1]) == 1


def test_without_ego_poses_the_key_frame_alone_is_labelled_and_said_so(
        bundle3: Path, caplog: pytest.LogCaptureFixture) -> None:
    for tf_available, extra, reason in ((False, {}, "tf2_ros is not installed"),
                                        (True, {"world_frame": "map"},
                                         "no tf2 transform lidar -> map"),
                                        (True, {"world_frame": ""}, "world_frame is empty")):
        proc = processor(bundle3, cameras=False, tf_available=tf_available, **extra)
        proc.lookup = odometry if tf_available else None
        calls = spy(proc)
        with caplog.at_level(logging.WARNING):
            for i in range(3):
                proc.label(cloud((10 + i) * S), (10 + i) * S, "lidar", {})
        assert all(len(frames) == 1 for frames in calls)  # labelled all the same
        assert proc.sweep_state.startswith("1 of 3: no ego pose") and reason in proc.sweep_state
        level, message, values = proc.diagnostics(0.0)
        assert level == "WARN" and "sweeps 1 of 3: no ego pose" in message
        assert reason in values["sweeps"]
        assert f"sweeps 1 of 3: no ego pose ({reason}); the key frame alone" in caplog.text


# --- bad input and bookkeeping ----------------------------------------------------------------
def test_malformed_clouds_are_counted_and_dropped(bundle: Path) -> None:
    proc = processor(bundle, cameras=False)
    assert proc.label(cloud(S), 0, "lidar", {}) is None
    assert proc.label(np.zeros(3, np.dtype([("a", "<f4")])), S, "lidar", {}) is None
    assert proc.health.bad["PointCloud2"] == 2 and proc.health.frames["processed"] == 0
    out = proc.label(cloud(S), S, "lidar", {})
    assert out is not None and set(out.timings_ms) >= {"inference", "total"}
    proc.done({**out.timings_ms, "pipeline_latency": 3.0}, 0.0)
    assert proc.health.frames["processed"] == 1
    assert proc.health.percentiles("pipeline")["max"] == 3.0


def test_a_bad_vocabulary_at_start_is_counted_and_the_bundle_labels(bundle: Path,
                                                                    tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    proc = processor(bundle, cameras=False, vocabulary=missing)
    assert proc.health.bad["vocabulary"] == 1 and proc.predictor.vocabulary.name == "three"
    _, _, values = proc.diagnostics(0.0)
    assert values["vocabulary"] == "three" and values["path_model_path"] == str(bundle)
