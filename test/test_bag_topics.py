"""Topic auto-detection by message type, and explicit topics checked against the bag."""

from __future__ import annotations

import pytest

from clip2scene_ros.bag.topics import (
    CameraTopics,
    camera_name,
    detect_topics,
    image_namespace,
)
from clip2scene_ros.errors import ConfigError

PC2 = "sensor_msgs/msg/PointCloud2"
IMG = "sensor_msgs/msg/Image"
CIMG = "sensor_msgs/msg/CompressedImage"
INFO = "sensor_msgs/msg/CameraInfo"
TF = "tf2_msgs/msg/TFMessage"
ODOM = "nav_msgs/msg/Odometry"

NUSCENES = {
    "/LIDAR_TOP": PC2,
    "/tf": TF,
    "/tf_static": TF,
    "/CAM_FRONT/image/compressed": CIMG,
    "/CAM_FRONT/image_raw": IMG,
    "/CAM_FRONT/camera_info": INFO,
    "/CAM_BACK/image/compressed": CIMG,
    "/CAM_BACK/camera_info": INFO,
}


def test_namespaces_and_names() -> None:
    assert image_namespace("/CAM_FRONT/image/compressed") == "/CAM_FRONT"
    assert image_namespace("/camera/left/image_rect_color") == "/camera/left"
    assert image_namespace("/camera_front/image_raw") == "/camera_front"
    assert image_namespace("/image") == "/image"
    assert camera_name("/CAM_FRONT") == "CAM_FRONT"
    assert camera_name("/camera/left") == "camera_left"


def test_detects_nuscenes_layout() -> None:
    topics = detect_topics(NUSCENES)
    assert topics.lidar == "/LIDAR_TOP" and topics.labels is None
    assert topics.tf == "/tf" and topics.tf_static == "/tf_static" and topics.odometry is None
    assert topics.cameras == (
        CameraTopics("CAM_BACK", "/CAM_BACK/image/compressed", "/CAM_BACK/camera_info"),
        # two image topics in one namespace: the raw Image wins, the other is reported unused
        CameraTopics("CAM_FRONT", "/CAM_FRONT/image_raw", "/CAM_FRONT/camera_info"),
    )
    assert topics.unused_images == ("/CAM_FRONT/image/compressed",)
    assert topics.as_dict()["cameras"]["CAM_BACK"]["info"] == "/CAM_BACK/camera_info"


def test_detects_labels_odometry_and_cameras_without_info() -> None:
    topics = detect_topics({
        "/velodyne_points": PC2,
        "/velodyne_labels": PC2,
        "/camera_left/image/compressed": CIMG,
        "/camera/depth/image_raw": IMG,
        "/odom": ODOM,
    })
    assert topics.lidar == "/velodyne_points" and topics.labels == "/velodyne_labels"
    assert topics.odometry == "/odom" and topics.tf is None
    assert topics.cameras == (CameraTopics("camera_left", "/camera_left/image/compressed"),)


def test_ambiguities_name_the_setting() -> None:
    two = {"/a/points": PC2, "/b/points": PC2}
    with pytest.raises(ConfigError, match=r"lidar_topic: several PointCloud2 topics"):
        detect_topics(two)
    assert detect_topics(two, lidar_topic="/b/points").lidar == "/b/points"
    with pytest.raises(ConfigError, match="lidar_topic: no PointCloud2"):
        detect_topics({"/labels": PC2, "/img": IMG})
    with pytest.raises(ConfigError, match="odometry_topic: several"):
        detect_topics({"/p": PC2, "/odom": ODOM, "/odom2": ODOM})


def test_explicit_topics_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"lidar_topic: topic '/nope' is not in the bag"):
        detect_topics(NUSCENES, lidar_topic="/nope")
    with pytest.raises(ConfigError, match=r"cameras\[0\].image_topic: .*CameraInfo.*expected"):
        detect_topics(NUSCENES, cameras=[CameraTopics("f", "/CAM_FRONT/camera_info")])
    with pytest.raises(ConfigError, match="camera names must be unique"):
        detect_topics(NUSCENES, cameras=[CameraTopics("f", "/CAM_FRONT/image_raw"),
                                         CameraTopics("f", "/CAM_BACK/image/compressed")])
    lidar_only = detect_topics(NUSCENES, cameras=[])
    assert lidar_only.cameras == () and len(lidar_only.unused_images) == 3
