"""Replay a recorded drive through clip2scene_node on simulated time (and RViz, optionally).

    ros2 launch clip2scene_ros replay.launch.py bag:=/path/to/drive model:=/path/to/bundle \
        lidar_topic:=/velodyne_points rate:=1.0 rviz:=true

The player starts once clip2scene_node has subscribed to ``lidar_topic`` (loading the model takes
seconds; a short bag would otherwise be over before then), after ``delay`` more seconds so that
the player's own publishers are matched first. ``player:=ros2bag`` (default) plays with
``ros2 bag play``, found on PATH; ``player:=clip2scene`` with ``clip2scene replay`` from this
package's ``lib/clip2scene_ros`` (no rosbag2 install needed). ``use_sim_time:=true`` (default)
puts the node on ``/clock`` and has the player publish it. The node reads the bag's clouds
reliably (``input_reliability:=reliable``, the default here): a best-effort reader can lose a
cloud of a megabyte or more to a busy CPU, and a replay should label every cloud.

Checked against launch 1.0.7 / launch_ros 0.19.8 (Humble) and launch 3.7.1 / launch_ros 0.28.0
(Jazzy and later): no deprecated substitution or condition is used. The launch modules are
imported inside the functions that need them, so the pure parts below are tested without them.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

PACKAGE = "clip2scene_ros"
#: The name clip2scene.launch.py gives the node, whose subscription the player waits for.
NODE_NAME = "clip2scene_node"
PLAYERS = ("ros2bag", "clip2scene")
#: Seconds between two looks for the node's subscription.
POLL_S = 0.2


def flag(name: str, value: str) -> bool:
    """A launch argument read as a boolean, as ``IfCondition`` reads one."""
    text = value.strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(f"{name}:={value}: expected true or false")


def seconds(name: str, value: str) -> float:
    """A launch argument read as a finite, non-negative number of seconds."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name}:={value}: expected seconds >= 0")
    return number


def player_arguments(player: str, bag: str, rate: str, delay: float,
                     sim_time: bool, topic: str) -> list[str]:
    """The player's arguments after its executable (``ros2``, or this package's ``clip2scene``).

    ``ros2 bag play`` sleeps ``delay`` itself, after creating its publishers; ``clip2scene
    replay`` is started ``delay`` later instead (see :func:`player_delay_before_start`), waits
    until it sees a subscriber on ``topic`` and, at the end, for the node's acknowledgements.
    """
    if player == "ros2bag":
        return ["bag", "play", bag, "--rate", rate, "--delay", f"{delay:g}",
                *(["--clock"] if sim_time else [])]
    if player == "clip2scene":
        # the player's own process discovers the node before the first (maybe only) cloud
        return ["replay", "--bag", bag, "--rate", rate, "--wait-for", topic,
                *([] if sim_time else ["--no-clock"])]
    raise ValueError(f"player:={player}: expected one of {', '.join(PLAYERS)}")


def player_delay_before_start(player: str, delay: float) -> float:
    """Seconds from the node's subscription to starting the player process."""
    return 0.0 if player == "ros2bag" else delay


def node_subscribed(endpoints: Iterable[Any], node_name: str = NODE_NAME) -> bool:
    """Whether one of a topic's subscription endpoints (``TopicEndpointInfo``) is the node's."""
    return any(endpoint.node_name == node_name for endpoint in endpoints)


def generate_launch_description() -> Any:
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    share = FindPackageShare(PACKAGE)
    args = [
        DeclareLaunchArgument("bag", description="rosbag2 directory to replay"),
        DeclareLaunchArgument("model", description="model bundle directory"),
        DeclareLaunchArgument("lidar_topic", default_value="/points",
                              description="PointCloud2 topic in the bag"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config",
                                                                  "clip2scene.yaml"]),
                              description="node parameter YAML"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("player", default_value="ros2bag", choices=list(PLAYERS),
                              description="ros2bag (ros2 bag play) or clip2scene (replay)"),
        DeclareLaunchArgument("input_reliability", default_value="reliable",
                              description="the node's input QoS (reliable: no cloud is lost; "
                              "empty: params_file's)"),
        DeclareLaunchArgument("use_sim_time", default_value="true",
                              description="the node on /clock, published by the player"),
        DeclareLaunchArgument("delay", default_value="1.0",
                              description="seconds from the node's subscription to playing"),
        DeclareLaunchArgument("wait_timeout", default_value="300",
                              description="seconds to wait for the node's subscription "
                              "(0: no limit); then the launch stops"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz"),
    ]
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch",
                                                            "clip2scene.launch.py"])),
        launch_arguments={
            "model": LaunchConfiguration("model"),
            "params_file": LaunchConfiguration("params_file"),
            "lidar_topic": LaunchConfiguration("lidar_topic"),
            "input_reliability": LaunchConfiguration("input_reliability"),
            "use_sim_time": LaunchConfiguration("use_sim_time"),
            "rviz": LaunchConfiguration("rviz"),
        }.items(),
    )
    wait = OpaqueFunction(function=play_once_subscribed, args=[None])
    return LaunchDescription([*args, node, wait])


def play_once_subscribed(context: Any, started: float | None) -> list[Any]:
    """Start the player if the node has subscribed to its input; otherwise look again in
    ``POLL_S`` (a timer, so launch goes on meanwhile), or give up after ``wait_timeout``."""
    from launch.actions import EmitEvent, LogInfo, OpaqueFunction, TimerAction
    from launch.events import Shutdown
    from launch.substitutions import LaunchConfiguration
    from launch_ros.ros_adapters import get_ros_node

    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    topic = value("lidar_topic")
    timeout = seconds("wait_timeout", value("wait_timeout"))
    now = time.monotonic()
    started = now if started is None else started
    if node_subscribed(get_ros_node(context).get_subscriptions_info_by_topic(topic)):
        player = value("player")
        delay = seconds("delay", value("delay"))
        start = [player_process(player, value("bag"), value("rate"), delay,
                                flag("use_sim_time", value("use_sim_time")), topic)]
        wait_s = player_delay_before_start(player, delay)
        note = LogInfo(msg=f"{NODE_NAME} subscribed to {topic} after {now - started:.1f} s: "
                       f"playing {value('bag')} with {player} in {delay:g} s")
        return [note, TimerAction(period=wait_s, actions=start) if wait_s > 0 else start[0]]
    if timeout > 0 and now - started > timeout:
        reason = (f"{NODE_NAME} has not subscribed to {topic} after {timeout:g} s "
                  "(see its log above): not playing")
        return [LogInfo(msg=reason), EmitEvent(event=Shutdown(reason=reason))]
    again = OpaqueFunction(function=play_once_subscribed, args=[started])
    return [TimerAction(period=POLL_S, actions=[again])]


def ros2_executable(which: Callable[[str], str | None] = shutil.which) -> str:
    """``ros2`` on PATH, or an error that says what to do (launch's own FindExecutable names a
    substitution object instead of the program)."""
    found = which("ros2")
    if found is None:
        raise RuntimeError("player:=ros2bag needs `ros2` with rosbag2 on PATH (source the ROS 2 "
                           "setup file), or use player:=clip2scene")
    return found


def player_process(player: str, bag: str, rate: str, delay: float, sim_time: bool,
                   topic: str) -> Any:
    """The player, its executable resolved: ``ros2`` on PATH, ``clip2scene`` in this package's
    ``lib`` folder (where colcon installs it, off PATH)."""
    from launch.actions import ExecuteProcess
    from launch_ros.substitutions import ExecutableInPackage

    executable = (ros2_executable() if player == "ros2bag"
                  else ExecutableInPackage(executable="clip2scene", package=PACKAGE))
    arguments = player_arguments(player, bag, rate, delay, sim_time, topic)
    return ExecuteProcess(cmd=[executable, *arguments], output="screen")
