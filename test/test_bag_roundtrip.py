"""Writer -> reader round trip on a tiny synthetic bag built here, for both storages.

The bag: a LiDAR moving forward at 10 m/s (/tf map->base_link), two cameras (raw Image and
JPEG CompressedImage) with CameraInfo, /tf_static for the rig, a parallel label cloud, a front
camera that stops publishing (LiDAR + one camera for the last sweep) and one malformed cloud.
Every number the reader produces is checked against transforms composed here independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.bag.reader import BagReader, ReaderConfig
from clip2scene_ros.bag.topics import CameraTopics
from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.calibration import Calibration, CameraCalibration, save_calibration
from clip2scene_ros.codecs import (
    encode_compressed_image,
    encode_image,
    encode_pointcloud2,
    model_to_camera_info,
)
from clip2scene_ros.codecs.messages import make_header, rosbags_factory
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.geometry.camera_model import CameraModel
from clip2scene_ros.geometry.transforms import (
    invert_transform,
    make_transform,
    matrix_to_quaternion,
)

T0 = 1_700_000_000 * 10**9
MS = 10**6
SPEED = 10.0  # m/s along map x
LIDAR_STAMPS = [T0 + k * 100 * MS for k in range(4)]
FRONT_STAMPS = [T0 + k * 100 * MS + 10 * MS for k in range(3)]  # stops before the last sweep
LEFT_STAMPS = [T0 + k * 100 * MS - 20 * MS for k in range(4)]
BAD_CLOUD_STAMP = T0 + 400 * MS

R_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # base <- optical
T_BASE_LIDAR = make_transform([1.0, 0.0, 1.8], [0.0, 0.0, 0.0, 1.0])
T_BASE_FRONT = make_transform([1.5, 0.0, 1.5], matrix_to_quaternion(R_OPTICAL))
YAW90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
T_BASE_LEFT = make_transform([1.2, 0.5, 1.5], matrix_to_quaternion(YAW90 @ R_OPTICAL))
MODEL = CameraModel(width=64, height=48, K=np.array([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]]))

CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"),
                        ("ring", "<u2"), ("time", "<f4")])


def ego(stamp: int) -> np.ndarray:
    """T_map<-base_link at ``stamp``."""
    return make_transform([SPEED * (stamp - T0) / 1e9, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])


def cloud(k: int) -> np.ndarray:
    g = np.stack(np.meshgrid(np.linspace(-3, 3, 5), np.linspace(-1, 1, 3)), -1).reshape(-1, 2)
    n = g.shape[0] + 3
    c = np.zeros(n, CLOUD_DTYPE)
    c["x"][: g.shape[0]] = 8.0 + k
    c["y"][: g.shape[0]] = g[:, 0]
    c["z"][: g.shape[0]] = g[:, 1]
    c[-3] = (np.nan, 0, 0, 0, 0, 0)  # dropped: not finite
    c[-2] = (-8.0, 0.0, 0.0, 1, 1, 0)  # behind the front camera, in the left one's back
    c[-1] = (0.0, 8.0, 0.0, 2, 2, 0)  # left of the car
    c["intensity"] = np.arange(n) + 10 * k
    c["ring"] = np.arange(n) % 4
    c["time"] = np.linspace(-0.05, 0.0, n)
    return c


def image(k: int, cam: int) -> np.ndarray:
    rng = np.random.default_rng(10 * k + cam)
    return np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), np.uint8), 8, 0), 8, 1)


def tf_message(f: object, items: list[tuple[str, str, int, np.ndarray]]) -> object:
    out = []
    for parent, child, stamp, T in items:
        q = matrix_to_quaternion(T)
        out.append(f("geometry_msgs/msg/TransformStamped")(
            header=make_header(f, stamp, parent),
            child_frame_id=child,
            transform=f("geometry_msgs/msg/Transform")(
                translation=f("geometry_msgs/msg/Vector3")(x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                rotation=f("geometry_msgs/msg/Quaternion")(x=q[0], y=q[1], z=q[2], w=q[3]),
            ),
        ))
    return f("tf2_msgs/msg/TFMessage")(transforms=out)


@dataclass
class Synthetic:
    path: Path
    storage: str


def write_bag(path: Path, storage: str, store: str, *, tf: bool = True, odom: bool = False
              ) -> Path:
    f = rosbags_factory(store)
    with BagWriter(path, storage=storage, store=store) as bag:
        bag.write("/tf_static", tf_message(f, [
            ("base_link", "velodyne", T0, T_BASE_LIDAR),
            ("base_link", "front_optical", T0, T_BASE_FRONT),
            ("base_link", "left_optical", T0, T_BASE_LEFT),
        ]), T0 - 100 * MS)
        bag.write("/camera_front/camera_info",
                  model_to_camera_info(MODEL, stamp_ns=T0 - 50 * MS, frame_id="front_optical",
                                       factory=f), T0 - 50 * MS)
        events: list[tuple[int, str, object]] = []
        for k, s in enumerate(LIDAR_STAMPS):
            events.append((s, "/velodyne_points", encode_pointcloud2(
                cloud(k), stamp_ns=s, frame_id="velodyne", factory=f)))
            labels = np.zeros(cloud(k).size, np.dtype([("label", "<u2")]))
            labels["label"] = np.arange(labels.size) + 100 * k
            events.append((s, "/velodyne_labels", encode_pointcloud2(
                labels, stamp_ns=s, frame_id="velodyne", factory=f)))
        bad = encode_pointcloud2(cloud(0), stamp_ns=BAD_CLOUD_STAMP, frame_id="velodyne",
                                 factory=f)
        bad.data = bad.data[: bad.data.size // 2]  # row_step * height no longer fits the data
        events.append((BAD_CLOUD_STAMP, "/velodyne_points", bad))
        for k, s in enumerate(FRONT_STAMPS):
            events.append((s, "/camera_front/image_raw", encode_image(
                image(k, 0), "rgb8", stamp_ns=s, frame_id="front_optical", factory=f)))
        for k, s in enumerate(LEFT_STAMPS):
            events.append((s, "/camera_left/image/compressed", encode_compressed_image(
                image(k, 1), "jpeg", quality=95, stamp_ns=s, frame_id="left_optical",
                factory=f)))
            events.append((s, "/camera_left/camera_info", model_to_camera_info(
                MODEL, stamp_ns=s, frame_id="left_optical", factory=f)))
        ego_stamps = range(T0 - 50 * MS, T0 + 450 * MS, 25 * MS)
        for s in ego_stamps:
            if tf:
                events.append((s, "/tf", tf_message(f, [("map", "base_link", s, ego(s))])))
            if odom:
                T = ego(s)
                q = matrix_to_quaternion(T)
                pose = f("geometry_msgs/msg/Pose")(
                    position=f("geometry_msgs/msg/Point")(x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                    orientation=f("geometry_msgs/msg/Quaternion")(x=q[0], y=q[1], z=q[2],
                                                                  w=q[3]))
                events.append((s, "/odom", f("nav_msgs/msg/Odometry")(
                    header=make_header(f, s, "odom"), child_frame_id="base_link",
                    pose=f("geometry_msgs/msg/PoseWithCovariance")(
                        pose=pose, covariance=np.zeros(36)),
                    twist=f("geometry_msgs/msg/TwistWithCovariance")(
                        twist=f("geometry_msgs/msg/Twist")(
                            linear=f("geometry_msgs/msg/Vector3")(x=SPEED, y=0.0, z=0.0),
                            angular=f("geometry_msgs/msg/Vector3")(x=0.0, y=0.0, z=0.0)),
                        covariance=np.zeros(36)))))
        # Log times a little after the stamps, as a recorder would see them.
        for s, topic, msg in sorted(events, key=lambda e: (e[0], e[1])):
            bag.write(topic, msg, s + 3 * MS)
    return path


def expected_extrinsic(T_base_cam: np.ndarray, cam_stamp: int, lidar_stamp: int) -> np.ndarray:
    return (invert_transform(T_base_cam) @ invert_transform(ego(cam_stamp)) @ ego(lidar_stamp)
            @ T_BASE_LIDAR)


@pytest.fixture(scope="module", params=[("mcap", "ros2_humble"), ("sqlite3", "ros2_jazzy")])
def bag(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage, store = request.param
    return write_bag(tmp_path_factory.mktemp(storage) / "bag", storage, store)


def test_round_trip_frames(bag: Path) -> None:
    reader = BagReader(bag)
    topics = reader.topics
    assert topics.lidar == "/velodyne_points" and topics.labels == "/velodyne_labels"
    assert [c.name for c in topics.cameras] == ["camera_front", "camera_left"]
    frames = list(reader)
    assert [f.index for f in frames] == [0, 1, 2, 3]  # the malformed 5th cloud is skipped
    assert reader.skipped["cloud_malformed"] == 1
    assert reader.skipped["camera_unmatched"] == 1  # front camera missing for the last sweep
    assert [[v.name for v in f.cameras] for f in frames] == [
        ["camera_front", "camera_left"]] * 3 + [["camera_left"]]
    for k, frame in enumerate(frames):
        c = cloud(k)
        finite = np.isfinite(c["x"])
        assert frame.stamp_ns == LIDAR_STAMPS[k] and frame.frame_id == "velodyne"
        np.testing.assert_array_equal(frame.xyz, np.stack([c["x"], c["y"], c["z"]], 1)[finite])
        np.testing.assert_array_equal(frame.intensity, c["intensity"][finite])
        np.testing.assert_array_equal(frame.ring, c["ring"][finite])
        np.testing.assert_allclose(frame.time, c["time"][finite])
        # Labels follow their points through the removal of the non-finite one.
        np.testing.assert_array_equal(frame.labels, (np.arange(c.size) + 100 * k)[finite])
        np.testing.assert_allclose(frame.pose, ego(LIDAR_STAMPS[k]) @ T_BASE_LIDAR, atol=1e-9)
        left = frame.camera("camera_left")
        assert left.stamp_ns == LEFT_STAMPS[k] and left.frame_id == "left_optical"
        np.testing.assert_allclose(left.lidar_to_camera,
                                   expected_extrinsic(T_BASE_LEFT, LEFT_STAMPS[k], LIDAR_STAMPS[k]),
                                   atol=1e-9)
        # JPEG (chroma subsampled): close to the original except at colour edges.
        assert np.median(np.abs(left.image.astype(int) - image(k, 1))) <= 4
        np.testing.assert_array_equal(left.camera.K, MODEL.K)
        if k < 3:
            front = frame.camera("camera_front")
            np.testing.assert_array_equal(front.image, image(k, 0))
            np.testing.assert_allclose(
                front.lidar_to_camera,
                expected_extrinsic(T_BASE_FRONT, FRONT_STAMPS[k], LIDAR_STAMPS[k]), atol=1e-9)
            # The ego motion really is folded in: 10 mm of travel between the stamps.
            static = invert_transform(T_BASE_FRONT) @ T_BASE_LIDAR
            assert abs(front.lidar_to_camera[2, 3] - static[2, 3] + 0.1) < 1e-9


def test_resume_and_reiterate(bag: Path) -> None:
    reader = BagReader(bag)
    assert len(reader) == 5  # planned sweeps, the malformed one included
    assert [f.index for f in reader.frames(start=2)] == [2, 3]
    assert [f.index for f in reader.frames(start=1, stop=2)] == [1]
    assert [f.index for f in reader] == [0, 1, 2, 3]
    assert reader.skipped["cloud_malformed"] == 1  # counts restart with each pass


def test_a_slice_seeks_and_equals_the_full_pass(bag: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    reader = BagReader(bag)
    full = {f.index: f for f in reader}
    spans: list[tuple[object, object]] = []
    from rosbags.highlevel import AnyReader

    messages = AnyReader.messages

    def spy(self: AnyReader, *args: object, **kwargs: object) -> object:
        spans.append((kwargs.get("start"), kwargs.get("stop")))
        return messages(self, *args, **kwargs)

    monkeypatch.setattr(AnyReader, "messages", spy)
    (one,) = reader.frames(start=3, stop=4)
    assert spans and spans[-1][0] is not None  # read from a log time, not the bag's start
    assert np.array_equal(one.xyz, full[3].xyz)
    assert [c.name for c in one.cameras] == [c.name for c in full[3].cameras]
    for a, b in zip(one.cameras, full[3].cameras, strict=True):
        assert np.array_equal(a.image, b.image) and a.stamp_ns == b.stamp_ns


def test_lidar_only_and_slop(bag: Path) -> None:
    frames = list(BagReader(bag, ReaderConfig(cameras=[])))
    assert len(frames) == 4 and all(f.cameras == () for f in frames)
    tight = BagReader(bag, ReaderConfig(slop_s=0.015))  # left camera is 20 ms early: dropped
    assert [[v.name for v in f.cameras] for f in tight] == [["camera_front"]] * 3 + [[]]
    assert tight.skipped["camera_unmatched"] == 5


def test_without_tf_uses_odometry_and_calibration(tmp_path: Path) -> None:
    path = write_bag(tmp_path / "odom", "mcap", "ros2_humble", tf=False, odom=True)
    # No /tf: the rig's static transforms still give extrinsics, odometry gives the poses.
    reader = BagReader(path)
    assert reader.topics.odometry == "/odom" and reader.index.world_frame == "odom"
    frames = list(reader)
    np.testing.assert_allclose(frames[1].pose, ego(LIDAR_STAMPS[1]) @ T_BASE_LIDAR, atol=1e-9)
    front = frames[0].camera("camera_front")
    np.testing.assert_allclose(
        front.lidar_to_camera, expected_extrinsic(T_BASE_FRONT, FRONT_STAMPS[0], LIDAR_STAMPS[0]),
        atol=1e-9)
    # A calibration file replaces TF and CameraInfo for the camera it names; the ego motion is
    # still folded in on top of its static extrinsic.
    other = CameraModel(width=64, height=48, K=np.array([[30.0, 0, 31], [0, 30.0, 23], [0, 0, 1]]))
    static = invert_transform(T_BASE_FRONT) @ T_BASE_LIDAR
    calib = save_calibration(
        Calibration({"camera_front": CameraCalibration("camera_front", static, other)}),
        tmp_path / "calib.yaml",
    )
    cfg = ReaderConfig(calibration=calib, cameras=[CameraTopics("camera_front",
                                                                "/camera_front/image_raw")])
    view = next(iter(BagReader(path, cfg))).camera("camera_front")
    np.testing.assert_array_equal(view.camera.K, other.K)
    np.testing.assert_allclose(view.lidar_to_camera, front.lidar_to_camera, atol=1e-9)
    unfolded = next(iter(BagReader(path, ReaderConfig(calibration=calib, fold_ego_motion=False))))
    np.testing.assert_allclose(unfolded.camera("camera_front").lidar_to_camera, static)
    assert unfolded.camera("camera_left").camera.K[0, 0] == 40.0  # not in the file: CameraInfo
    wrong = save_calibration(Calibration({}, lidar_frame="os_sensor"), tmp_path / "wrong.yaml")
    with pytest.raises(ConfigError, match=r"lidar_frame: .*'os_sensor' but /velodyne_points is in"):
        BagReader(path, ReaderConfig(calibration=wrong)).index  # noqa: B018
