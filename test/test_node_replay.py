"""clip2scene replay: a bag's messages over rclpy in order, with /clock, looping and pacing."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, PointCloud2  # noqa: E402

from clip2scene_ros.codecs import decode_pointcloud2  # noqa: E402
from clip2scene_ros.codecs.messages import stamp_to_ns  # noqa: E402
from clip2scene_ros.node.replay import replay  # noqa: E402
from clip2scene_ros.sample.drive import write_sample_drive  # noqa: E402


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "drive"
    write_sample_drive(path, frames=3, seed=0)
    return path


def test_replay_publishes_every_cloud_in_order_with_clock(bag: Path) -> None:
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=78)
    listener = rclpy.create_node("listener", context=context)
    clouds: list[PointCloud2] = []
    infos: list[CameraInfo] = []
    clock: list[int] = []
    listener.create_subscription(PointCloud2, "/velodyne_points", clouds.append,
                                 qos_profile_sensor_data)
    listener.create_subscription(CameraInfo, "/camera_front/camera_info", infos.append, 50)
    listener.create_subscription(Clock, "/clock", lambda m: clock.append(stamp_to_ns(m.clock)),
                                 100)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    done = threading.Event()
    spinner = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.02)
                                               for _ in iter(done.is_set, True)], daemon=True)
    spinner.start()
    try:
        time.sleep(1.0)  # discovery before the first message
        start = time.monotonic()
        report: Any = replay(bag, rate=4.0, loop=True, max_loops=2, context=context)
        wall = time.monotonic() - start
        time.sleep(0.5)
    finally:
        done.set()
        spinner.join(2)
        executor.shutdown()
        listener.destroy_node()
        rclpy.shutdown(context=context)
    assert report.loops == 2 and report.per_topic["/velodyne_points"] == 6
    assert wall >= 2 * report.bag_s / 4.0 * 0.9  # paced at 4x, not as fast as possible
    assert len(clouds) == 6  # every cloud arrives (1 MB+ clouds over loopback)
    stamps = [stamp_to_ns(c.header.stamp) for c in clouds]
    assert stamps[:3] == sorted(stamps[:3]) and stamps[3:] == stamps[:3]  # looped
    assert decode_pointcloud2(clouds[0]).size > 40_000
    assert infos and clock and min(clock) > 0
    assert any(b < a for a, b in itertools.pairwise(clock))  # the loop jumps back
