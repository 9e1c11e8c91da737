"""The sample drive bag: topics, message layouts, alignment, /tf, determinism, refusals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from clip2scene_ros.codecs import decode_pointcloud2
from clip2scene_ros.geometry.transforms import transform_from_msg
from clip2scene_ros.sample.camera import front_camera
from clip2scene_ros.sample.drive import (
    START_NS,
    SampleRig,
    drive_time,
    lidar_stamp_ns,
    small_rig,
    write_sample_drive,
)
from clip2scene_ros.sample.scene import NUM_LABELS, EgoPath

FRAMES = 3
FLOAT32, UINT16 = 7, 4  # sensor_msgs/PointField datatypes


def read_all(bag: Path) -> dict[str, list[tuple[int, object, bytes]]]:
    """topic -> [(bag timestamp, message, raw CDR)] in bag order."""
    out: dict[str, list[tuple[int, object, bytes]]] = {}
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for conn, stamp, raw in reader.messages():
            out.setdefault(conn.topic, []).append(
                (stamp, reader.deserialize(raw, conn.msgtype), bytes(raw)))
    return out


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> tuple[Path, object, dict]:
    out = tmp_path_factory.mktemp("sample") / "drive"
    info = write_sample_drive(out, frames=FRAMES, seed=1, rig=small_rig())
    return out, info, read_all(out)


def test_topics_types_and_counts(drive) -> None:
    out, info, messages = drive
    assert (out / "metadata.yaml").is_file() and list(out.glob("*.mcap"))
    counts = {topic: len(msgs) for topic, msgs in messages.items()}
    assert counts == {
        "/tf_static": 1, "/tf": 4 * FRAMES + 1,
        "/velodyne_points": FRAMES, "/velodyne_labels": FRAMES,
        "/camera_front/image_raw": FRAMES, "/camera_front/camera_info": FRAMES,
        "/camera_left/image/compressed": FRAMES, "/camera_left/camera_info": FRAMES,
    }  # fmt: skip
    assert info.topics == counts and info.frames == FRAMES and info.seed == 1
    assert info.points_per_frame[0] > 1000
    text = info.summary()
    assert "/velodyne_points: 3 messages" in text and str(out) in text
    stamps = [s for msgs in messages.values() for s, _, _ in msgs]
    assert min(stamps) == START_NS


def test_cloud_has_the_velodyne_layout_and_labels_align(drive) -> None:
    _, _, messages = drive
    for (stamp, cloud, _), (label_stamp, labels, _) in zip(
            messages["/velodyne_points"], messages["/velodyne_labels"], strict=True):
        fields = [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields]
        assert fields == [("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1),
                          ("intensity", 12, FLOAT32, 1), ("ring", 16, UINT16, 1),
                          ("time", 18, FLOAT32, 1)]  # fmt: skip
        assert cloud.point_step == 22 and cloud.height == 1 and cloud.is_dense
        assert cloud.row_step == 22 * cloud.width and not cloud.is_bigendian
        assert cloud.header.frame_id == labels.header.frame_id == "velodyne"
        assert [(f.name, f.offset, f.datatype) for f in labels.fields] == [("label", 0, UINT16)]
        assert labels.point_step == 2
        assert (labels.width, labels.height) == (cloud.width, cloud.height)
        assert stamp == label_stamp
        assert cloud.header.stamp.sec * 10**9 + cloud.header.stamp.nanosec == stamp
        points = decode_pointcloud2(cloud)
        label = decode_pointcloud2(labels)["label"]
        assert len(points) == len(label) == cloud.width
        assert label.max() < NUM_LABELS
        t = points["time"]
        assert t.min() >= -0.0501 and t.max() < 0.05 and np.all(points["ring"] < 32)


def test_cameras_and_their_calibration(drive) -> None:
    _, _, messages = drive
    for image_topic, info_topic, size in (
            ("/camera_front/image_raw", "/camera_front/camera_info", (96, 54)),
            ("/camera_left/image/compressed", "/camera_left/camera_info", (80, 45))):
        for (stamp, image, _), (info_stamp, info, _) in zip(
                messages[image_topic], messages[info_topic], strict=True):
            assert stamp == info_stamp
            assert image.header.frame_id == info.header.frame_id == \
                image_topic.split("/")[1] + "_optical"
            assert info.distortion_model == "plumb_bob" and len(info.d) == 5
            assert np.count_nonzero(info.d) == 4  # k1 k2 t1 t2 set, k3 = 0
            assert (info.width, info.height) == size
            if image_topic.endswith("compressed"):
                assert image.format.lower().startswith("jpeg") or "jpeg" in image.format
                assert Image.open(io.BytesIO(bytes(image.data))).size == size
            else:
                assert image.encoding == "rgb8" and (image.width, image.height) == size
                assert image.step == 3 * image.width and len(image.data) == 3 * 96 * 54
    # The front camera fires at the sweep stamp, the left one a quarter turn earlier.
    sweeps = [s for s, _, _ in messages["/velodyne_points"]]
    assert [s for s, _, _ in messages["/camera_front/image_raw"]] == sweeps
    assert [s for s, _, _ in messages["/camera_left/image/compressed"]] == [
        s - 25_000_000 for s in sweeps]


def test_tf_static_and_ego_poses(drive) -> None:
    _, _, messages = drive
    (_, static, _), = messages["/tf_static"]
    frames = {(t.header.frame_id, t.child_frame_id): transform_from_msg(t)
              for t in static.transforms}  # fmt: skip
    assert set(frames) == {("base_link", "velodyne"), ("base_link", "camera_front_optical"),
                           ("base_link", "camera_left_optical")}  # fmt: skip
    front = frames[("base_link", "camera_front_optical")]
    # Optical convention: z forward (along base x), x right (-y), y down (-z).
    assert front[:3, 2] @ [1, 0, 0] > 0.99 and front[:3, 0] @ [0, -1, 0] > 0.99
    assert front[:3, 1] @ [0, 0, -1] > 0.99
    left = frames[("base_link", "camera_left_optical")]
    assert left[:3, 2] @ [0, 1, 0] > 0.99
    assert frames[("base_link", "velodyne")][2, 3] > 1.5  # on the roof

    path = EgoPath()
    tf_stamps = []
    for stamp, msg, _ in messages["/tf"]:
        (t,) = msg.transforms
        assert (t.header.frame_id, t.child_frame_id) == ("map", "base_link")
        np.testing.assert_allclose(transform_from_msg(t), path(drive_time(stamp)), atol=1e-9)
        tf_stamps.append(stamp)
    assert tf_stamps == sorted(tf_stamps)
    assert np.all(np.diff(tf_stamps) == 25_000_000)
    period = 100_000_000
    assert tf_stamps[0] == START_NS and tf_stamps[-1] == START_NS + FRAMES * period
    sensor_stamps = {s for topic, msgs in messages.items() if topic != "/tf_static"
                     for s, _, _ in msgs}  # fmt: skip
    assert sensor_stamps <= set(tf_stamps)
    assert [s for s, _, _ in messages["/velodyne_points"]] == [lidar_stamp_ns(k)
                                                              for k in range(FRAMES)]


def test_same_seed_same_bytes_other_seed_other_bytes(drive, tmp_path) -> None:
    _, _, messages = drive
    again = read_all(write_sample_drive(tmp_path / "again", frames=FRAMES, seed=1,
                                        rig=small_rig(), workers=1).path)  # fmt: skip
    for topic, msgs in messages.items():
        assert [raw for _, _, raw in msgs] == [raw for _, _, raw in again[topic]], topic
        assert [s for s, _, _ in msgs] == [s for s, _, _ in again[topic]], topic
    other = read_all(write_sample_drive(tmp_path / "other", frames=1, seed=2,
                                        rig=small_rig()).path)  # fmt: skip
    for topic in ("/velodyne_points", "/velodyne_labels", "/camera_front/image_raw"):
        assert other[topic][0][2] != messages[topic][0][2], topic


def test_refuses_to_overwrite_and_bad_arguments(tmp_path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_sample_drive(full, frames=1, rig=small_rig())
    assert (full / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_sample_drive(a_file, frames=1, rig=small_rig())
    for kwargs, match in (({"frames": 0}, "frames"), ({"seed": -3}, "seed"),
                          ({"storage": "rosbag1"}, "storage"), ({"workers": 0}, "workers")):
        with pytest.raises(ValueError, match=match):
            write_sample_drive(tmp_path / "bad", rig=small_rig(), **kwargs)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="time_offset_s"):
        cam = front_camera(32, 18)
        object.__setattr__(cam, "time_offset_s", 0.2)
        SampleRig(cameras=(cam,))


def test_empty_directory_and_sqlite3(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    info = write_sample_drive(empty, frames=1, seed=0, storage="sqlite3", rig=small_rig())
    assert list(empty.glob("*.db3")) and info.storage == "sqlite3"
    assert read_all(empty)["/velodyne_points"][0][1].point_step == 22
