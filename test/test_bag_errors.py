"""Bad input: missing bags and bad configs fail clearly; bad messages are skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from clip2scene_ros.bag.reader import SKIP_REASONS, BagReader, ReaderConfig
from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.codecs import (
    encode_compressed_image,
    encode_image,
    encode_pointcloud2,
    model_to_camera_info,
)
from clip2scene_ros.codecs.messages import rosbags_factory
from clip2scene_ros.config import load_config
from clip2scene_ros.errors import BagError, ConfigError
from clip2scene_ros.geometry.camera_model import CameraModel

MODEL = CameraModel(width=16, height=8, K=np.array([[10.0, 0, 8], [0, 10.0, 4], [0, 0, 1]]))


def test_missing_or_wrong_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"bag .*nowhere does not exist"):
        BagReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a rosbag2 directory: it has no metadata"):
        BagReader(tmp_path / "empty")
    (tmp_path / "drive.bag").write_bytes(b"#ROSBAG V2.0\n")
    with pytest.raises(BagError, match="ROS 1 bag; convert it") as info:
        BagReader(tmp_path / "drive.bag")
    assert info.value.bag == str(tmp_path / "drive.bag")
    (tmp_path / "x.mcap").write_bytes(b"")
    with pytest.raises(BagError, match="give the rosbag2 directory"):
        BagReader(tmp_path / "x.mcap")


def test_config_errors_name_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="slop_s: must be >= 0"):
        load_config(ReaderConfig, {"slop_s": -0.1})
    with pytest.raises(ConfigError, match="typestore: must be one of"):
        load_config(ReaderConfig, {"typestore": "ros2_rolling"})
    with pytest.raises(ConfigError, match="slop: unknown key"):
        load_config(ReaderConfig, {"slop": 0.1})
    cfg = load_config(ReaderConfig, {"lidar_topic": "/points", "calibration": "c.yaml",
                                     "cameras": [{"name": "f", "image_topic": "/f/image_raw"}]})
    assert cfg.calibration == Path("c.yaml") and cfg.cameras[0].info_topic is None
    path = tmp_path / "bag"
    f = rosbags_factory()
    cloud = np.zeros(1, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))
    with BagWriter(path) as bag:
        bag.write("/points", encode_pointcloud2(cloud, stamp_ns=1, frame_id="l", factory=f), 1)
    with pytest.raises(ConfigError, match="lidar_topic: topic '/lidar' is not in the bag"):
        BagReader(path, ReaderConfig(lidar_topic="/lidar")).index  # noqa: B018


def test_bad_messages_are_skipped_and_counted(tmp_path: Path) -> None:
    """One good sweep; each camera is broken in its own way; the labels lack a `label` field."""
    f = rosbags_factory()
    s = 10**9
    cloud = np.zeros(4, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))
    cloud["x"] = [5, 6, 7, 8]
    rgb = np.zeros((8, 16, 3), np.uint8)
    path = tmp_path / "bag"
    with BagWriter(path, storage="sqlite3") as bag:
        bag.write("/points", encode_pointcloud2(cloud, stamp_ns=s, frame_id="lidar", factory=f), s)
        bag.write("/points_labels",
                  encode_pointcloud2(cloud, stamp_ns=s, frame_id="lidar", factory=f), s)
        # jpeg: corrupt bytes
        bad_jpeg = encode_compressed_image(rgb, "jpeg", stamp_ns=s, frame_id="lidar", factory=f)
        bad_jpeg.data = np.frombuffer(b"not a jpeg at all", np.uint8)
        bag.write("/jpeg/image/compressed", bad_jpeg, s)
        bag.write("/jpeg/camera_info",
                  model_to_camera_info(MODEL, stamp_ns=s, frame_id="lidar", factory=f), s)
        # small: image smaller than its CameraInfo says
        bag.write("/small/image_raw",
                  encode_image(rgb[:4, :8], "rgb8", stamp_ns=s, frame_id="lidar", factory=f), s)
        bag.write("/small/camera_info",
                  model_to_camera_info(MODEL, stamp_ns=s, frame_id="lidar", factory=f), s)
        # noinfo: CameraInfo whose D does not fit its distortion model
        info = model_to_camera_info(MODEL, stamp_ns=s, frame_id="lidar", factory=f)
        info.distortion_model = "plumb_bob"
        info.d = np.array([0.1, 0.2])
        bag.write("/noinfo/image_raw",
                  encode_image(rgb, "rgb8", stamp_ns=s, frame_id="lidar", factory=f), s)
        bag.write("/noinfo/camera_info", info, s)
        # notf: a camera frame that no transform reaches
        bag.write("/notf/image_raw",
                  encode_image(rgb, "rgb8", stamp_ns=s, frame_id="nowhere", factory=f), s)
        bag.write("/notf/camera_info",
                  model_to_camera_info(MODEL, stamp_ns=s, frame_id="nowhere", factory=f), s)
        # good: frame_id "lidar", identity extrinsic
        bag.write("/good/image_raw",
                  encode_image(rgb, "rgb8", stamp_ns=s, frame_id="lidar", factory=f), s)
        bag.write("/good/camera_info",
                  model_to_camera_info(MODEL, stamp_ns=s, frame_id="lidar", factory=f), s)
    reader = BagReader(path)
    frames = list(reader)
    assert len(frames) == 1 and frames[0].num_points == 4
    assert [v.name for v in frames[0].cameras] == ["good"]
    np.testing.assert_array_equal(frames[0].camera("good").lidar_to_camera, np.eye(4))
    assert frames[0].labels is None and frames[0].pose is None
    assert dict(reader.skipped) == {
        "image_malformed": 1,
        "image_size_mismatch": 1,
        "camera_info_malformed": 1,
        "no_camera_info": 1,
        "no_extrinsics": 1,
        "labels_malformed": 1,
    }
    assert set(reader.skipped) <= set(SKIP_REASONS)


def test_undeserializable_messages_are_skipped(tmp_path: Path) -> None:
    """Truncated CDR (a cut-off recording): the cloud's frame and the image are dropped."""
    f = rosbags_factory()
    store = get_typestore(Stores.ROS2_HUMBLE)
    cloud = np.zeros(2, np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))
    cloud["x"] = [3, 4]
    rgb = np.zeros((8, 16, 3), np.uint8)
    path = tmp_path / "bag"
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as bag:
        pc = bag.add_connection("/points", "sensor_msgs/msg/PointCloud2", typestore=store)
        im = bag.add_connection("/cam/image_raw", "sensor_msgs/msg/Image", typestore=store)
        ci = bag.add_connection("/cam/camera_info", "sensor_msgs/msg/CameraInfo", typestore=store)
        for k, s in enumerate([10**9, 2 * 10**9]):
            raw = bytes(store.serialize_cdr(encode_pointcloud2(
                cloud, stamp_ns=s, frame_id="cam", factory=f), "sensor_msgs/msg/PointCloud2"))
            bag.write(pc, s, raw[:40] if k == 0 else raw)
            raw = bytes(store.serialize_cdr(encode_image(
                rgb, "rgb8", stamp_ns=s, frame_id="cam", factory=f), "sensor_msgs/msg/Image"))
            bag.write(im, s, raw[:30] if k == 1 else raw)
        info = model_to_camera_info(MODEL, stamp_ns=0, frame_id="cam", factory=f)
        bag.write(ci, 0, bytes(store.serialize_cdr(info, "sensor_msgs/msg/CameraInfo")))
    reader = BagReader(path)
    frames = list(reader)
    assert [(fr.index, len(fr.cameras)) for fr in frames] == [(1, 0)]
    assert reader.skipped == {"cloud_malformed": 1, "header_malformed": 1, "camera_unmatched": 1}
