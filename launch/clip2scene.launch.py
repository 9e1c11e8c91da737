"""Launch clip2scene_node (and optionally RViz) on a vehicle or a bag replay.

    ros2 launch clip2scene_ros clip2scene.launch.py model:=/path/to/bundle \
        lidar_topic:=/velodyne_points use_sim_time:=true rviz:=true

``input_reliability`` left empty keeps the parameter file's value (best effort for live
sensors); replay.launch.py sets it to ``reliable``. The launch modules are imported inside the
functions that need them, so the pure parts below are tested without them.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "clip2scene_ros"
RELIABILITIES = ("best_effort", "reliable")


def parameter_overrides(input_reliability: str) -> dict[str, str]:
    """The node parameters set from launch arguments only when given (an empty argument leaves
    the parameter file's value in force)."""
    if not input_reliability:
        return {}
    if input_reliability not in RELIABILITIES:
        raise ValueError(f"input_reliability:={input_reliability}: expected one of "
                         f"{', '.join(RELIABILITIES)} (or empty: the parameter file's)")
    return {"input_reliability": input_reliability}


def generate_launch_description() -> Any:
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
    from launch.conditions import IfCondition
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.actions import Node
    from launch_ros.substitutions import FindPackageShare

    share = FindPackageShare(PACKAGE)
    args = [
        DeclareLaunchArgument("model", description="model bundle directory"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config",
                                                                  "clip2scene.yaml"]),
                              description="node parameter YAML"),
        DeclareLaunchArgument("lidar_topic", default_value="/points",
                              description="PointCloud2 input topic"),
        DeclareLaunchArgument("input_reliability", default_value="",
                              description="best_effort or reliable; empty: params_file's"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay)"),
        DeclareLaunchArgument("build_only", default_value="false",
                              description="build the TensorRT engine and exit"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="node log level"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz"),
    ]

    def node(context: Any) -> list[Any]:
        overrides = parameter_overrides(LaunchConfiguration("input_reliability").perform(context))
        return [Node(
            package=PACKAGE,
            executable="clip2scene_node",
            name="clip2scene_node",
            output="screen",
            parameters=[
                LaunchConfiguration("params_file"),
                {
                    "model_path": LaunchConfiguration("model"),
                    "lidar_topic": LaunchConfiguration("lidar_topic"),
                    "use_sim_time": LaunchConfiguration("use_sim_time"),
                    "build_only": LaunchConfiguration("build_only"),
                    **overrides,
                },
            ],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        )]

    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "clip2scene.rviz"])],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    # Let Fast DDS carry clouds of 1 MB and more without dropping most of them. The glibc
    # malloc settings are the node's own (clip2scene_ros/runtime/malloc.py), so `ros2 run` gets
    # them too; MALLOC_*_THRESHOLD_ set here or in the shell would override them.
    env = [SetEnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")]
    return LaunchDescription([*args, *env, OpaqueFunction(function=node), rviz])
