"""Encoders write a large payload once: into the storage the message keeps, for both message
kinds (rclpy's ``data`` setter copies any value it does not keep as it is)."""

from __future__ import annotations

import array

import numpy as np
import pytest

from clip2scene_ros.codecs import decode_pointcloud2, encode_labelled_cloud, unpack_rgb
from clip2scene_ros.codecs.messages import (
    RclpyFactory,
    make_with_data,
    new_byte_array,
    rosbags_factory,
)

FACTORIES = [rosbags_factory(), RclpyFactory()]


def test_rclpy_message_keeps_the_array_it_is_given() -> None:
    payload, view = new_byte_array(RclpyFactory(), 24)
    assert isinstance(payload, array.array) and payload.typecode == "B"
    view[:] = np.arange(24, dtype=np.uint8)  # the view writes the array's own memory
    assert payload.tobytes() == bytes(range(24))
    msg = make_with_data(RclpyFactory(), "sensor_msgs/msg/PointCloud2", payload, height=1,
                         width=2, point_step=12, row_step=24)
    assert msg.data is payload  # not a copy made by the setter or by the codec


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.flavour)
def test_labelled_cloud_is_written_into_the_message_payload(factory: object) -> None:
    rng = np.random.default_rng(0)
    n = 1000
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    intensity = rng.uniform(0, 255, n).astype(np.float32)
    label = rng.integers(0, 16, n).astype(np.uint16)
    score = rng.uniform(0, 1, n).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    msg = encode_labelled_cloud(xyz, intensity, label, score, rgb, stamp_ns=3, frame_id="l",
                                factory=factory)  # type: ignore[arg-type]
    cloud = decode_pointcloud2(msg)
    # decoding views the message's own bytes: the points are there, nowhere else
    assert np.shares_memory(cloud, np.frombuffer(msg.data, dtype=np.uint8))
    np.testing.assert_array_equal(np.stack([cloud[a] for a in "xyz"], 1), xyz)
    np.testing.assert_array_equal(cloud["intensity"], intensity)
    np.testing.assert_array_equal(cloud["label"], label)
    np.testing.assert_array_equal(cloud["score"], score)
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), rgb)
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(n, 28)
    assert not rows[:, 18:20].any()  # the padding after label is zeros, never stale memory
