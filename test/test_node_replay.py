"""clip2scene replay: a bag's messages over rclpy in order, with /clock, looping and pacing."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, PointCloud2  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from clip2scene_ros.bag.writer import BagWriter  # noqa: E402
from clip2scene_ros.cli import build_parser  # noqa: E402
from clip2scene_ros.codecs import decode_pointcloud2  # noqa: E402
from clip2scene_ros.codecs.messages import rosbags_factory, stamp_to_ns  # noqa: E402
from clip2scene_ros.sample.drive import write_sample_drive  # noqa: E402
from clip2scene_ros.tools.replay import replay  # noqa: E402


@contextlib.contextmanager
def _spinning(node: Any, context: Any) -> Iterator[None]:
    """Spin ``node`` in a background thread for the duration; destroy it afterwards."""
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    done = threading.Event()
    spinner = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.02)
                                               for _ in iter(done.is_set, True)], daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join(2)
        executor.shutdown()
        node.destroy_node()


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
    try:
        with _spinning(listener, context):
            time.sleep(1.0)  # discovery before the first message
            start = time.monotonic()
            report: Any = replay(bag, rate=4.0, loop=True, max_loops=2, context=context)
            wall = time.monotonic() - start
            time.sleep(0.5)
    finally:
        rclpy.shutdown(context=context)
    assert report.loops == 2 and report.per_topic["/velodyne_points"] == 6
    assert wall >= 2 * report.bag_s / 4.0 * 0.9  # paced at 4x, not as fast as possible
    assert len(clouds) == 6  # every cloud arrives (1 MB+ clouds over loopback)
    stamps = [stamp_to_ns(c.header.stamp) for c in clouds]
    assert stamps[:3] == sorted(stamps[:3]) and stamps[3:] == stamps[:3]  # looped
    assert decode_pointcloud2(clouds[0]).size > 40_000
    assert infos and clock and min(clock) > 0
    assert any(b < a for a, b in itertools.pairwise(clock))  # the loop jumps back


def test_replay_ticks_clock_between_messages(tmp_path: Path, ros: Any) -> None:
    first, last = 1_700_000_000_000_000_000, 1_700_000_000_500_000_000  # 0.5 s apart
    with BagWriter(tmp_path / "two") as bag_:
        for i, stamp in enumerate((first, last)):
            bag_.write("/chatter", rosbags_factory()("std_msgs/msg/String")(data=str(i)), stamp)
    listener = rclpy.create_node("clock_listener", context=ros)
    chatter: list[str] = []
    clock: list[int] = []
    listener.create_subscription(String, "/chatter", lambda m: chatter.append(m.data), 10)
    listener.create_subscription(Clock, "/clock", lambda m: clock.append(stamp_to_ns(m.clock)),
                                 100)
    with _spinning(listener, ros):
        replay(tmp_path / "two", rate=1.0, clock_hz=20.0, context=ros, wait_for=["/chatter"],
               wait_timeout_s=5.0)
        time.sleep(0.3)
        paced = list(clock)
        replay(tmp_path / "two", rate=0, clock_hz=20.0, context=ros, wait_for=["/chatter"],
               wait_timeout_s=5.0)
        time.sleep(0.3)
        unpaced = clock[len(paced):]
    assert chatter == ["0", "1", "0", "1"]
    assert sum(first < t < last for t in paced) >= 5  # 20 Hz over 0.5 s: ~9 interpolated ticks
    assert paced == sorted(paced) and max(paced) == last and min(paced) >= first
    # as fast as possible: one tick per message, as before (the first may beat /clock discovery)
    assert unpaced in ([first, last], [last])


def test_replay_cli_refuses_a_clock_rate_that_is_not_positive() -> None:
    for hz in ("0", "-5", "nan", "inf", "fast"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["replay", "--bag", "x", "--clock-hz", hz])
        assert exc.value.code == 2
    assert build_parser().parse_args(["replay", "--bag", "x"]).clock_hz == 40.0
    assert build_parser().parse_args(["replay", "--bag", "x", "--clock-hz", "10"]).clock_hz == 10
    with pytest.raises(ValueError, match="clock_hz"):
        replay("x", clock_hz=0)


def test_a_fresh_player_process_delivers_every_cloud(bag: Path) -> None:
    """`clip2scene replay --wait-for` in its own process, as replay.launch.py starts it: it
    waits to see the subscriber, and before exiting for its acknowledgements, so no cloud of a
    short bag is lost to discovery or to the player ending mid-message."""
    import os
    import subprocess
    import sys

    from rclpy.qos import QoSProfile, ReliabilityPolicy

    domain = 79
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain)
    listener = rclpy.create_node("listener", context=context)
    clouds: list[PointCloud2] = []
    listener.create_subscription(PointCloud2, "/velodyne_points", clouds.append,
                                 QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain)}
    try:
        with _spinning(listener, context):
            done = subprocess.run(
                [sys.executable, "-m", "clip2scene_ros.cli", "replay", "--bag", str(bag),
                 "--rate", "0", "--no-clock", "--wait-for", "/velodyne_points"],
                env=env, capture_output=True, text=True, timeout=120)
            deadline = time.monotonic() + 5.0
            while len(clouds) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        rclpy.shutdown(context=context)
    assert done.returncode == 0, done.stderr
    assert "not acknowledged" not in done.stdout
    assert len(clouds) == 3


def test_the_first_stop_signal_stops_the_player_and_later_ones_are_ignored() -> None:
    """Ctrl-C under `ros2 launch` reaches the player twice (the terminal signals the process
    group, and launch forwards it): the second must not kill the stopping player."""
    import signal

    from clip2scene_ros.tools.replay import _stop_once

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            _stop_once(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_waiting_player_stops_cleanly_on_two_sigints(bag: Path) -> None:
    """The player waiting for a subscriber that never comes, then Ctrl-C as a terminal under
    `ros2 launch` delivers it: status 0, its summary, no traceback."""
    import os
    import signal
    import subprocess
    import sys

    domain = 80
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain)
    watcher = rclpy.create_node("watcher", context=context)
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain)}
    # a shell without job control hands its children an ignored SIGINT: start from the default
    player = subprocess.Popen(
        [sys.executable, "-m", "clip2scene_ros.cli", "replay", "--bag", str(bag),
         "--wait-for", "/velodyne_points", "--wait-timeout", "120"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while "clip2scene_replay" not in watcher.get_node_names() and \
                time.monotonic() < deadline and player.poll() is None:
            time.sleep(0.1)
        assert "clip2scene_replay" in watcher.get_node_names()
        time.sleep(0.5)  # inside the wait for a subscriber, which nothing here is
        player.send_signal(signal.SIGINT)
        time.sleep(0.05)
        player.send_signal(signal.SIGINT)
        out, err = player.communicate(timeout=30)
    finally:
        if player.poll() is None:
            player.kill()
        watcher.destroy_node()
        rclpy.shutdown(context=context)
    assert player.returncode == 0, err
    assert "Traceback" not in err
    assert "replayed 0 messages" in out


def test_tool_processes_never_read_their_command_line_as_ros_arguments() -> None:
    """`clip2scene replay-eval --param device:=cpu` once had rcl take its own argument for a
    (deprecated) remap rule: every rclpy.init outside the node passes ``args=[]``."""
    import ast

    package = Path(__file__).resolve().parent.parent / "clip2scene_ros"
    calls = []
    for path in [*package.glob("tools/*.py"), *package.glob("fuzz/*.py"),
                 *package.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "rclpy.init":
                calls.append((path.name, {k.arg: ast.unparse(k.value) for k in node.keywords}))
    assert len(calls) >= 4
    assert all(kw.get("args") == "[]" for _, kw in calls), calls
