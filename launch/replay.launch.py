"""Replay a recorded drive through clip2scene_node on simulated time (and RViz, optionally).

    ros2 launch clip2scene_ros replay.launch.py bag:=/path/to/drive model:=/path/to/bundle \
        lidar_topic:=/velodyne_points rate:=1.0 rviz:=true

``player:=ros2bag`` (default) plays with ``ros2 bag play --clock``; ``player:=clip2scene`` uses
``clip2scene replay``, which needs no rosbag2 install.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import LaunchConfigurationEquals
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare

PACKAGE = "clip2scene_ros"


def generate_launch_description() -> LaunchDescription:
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
        DeclareLaunchArgument("player", default_value="ros2bag",
                              description="ros2bag (ros2 bag play) or clip2scene (replay)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz"),
    ]
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch",
                                                            "clip2scene.launch.py"])),
        launch_arguments={
            "model": LaunchConfiguration("model"),
            "params_file": LaunchConfiguration("params_file"),
            "lidar_topic": LaunchConfiguration("lidar_topic"),
            "use_sim_time": "true",
            "rviz": LaunchConfiguration("rviz"),
        }.items(),
    )
    bag, rate = LaunchConfiguration("bag"), LaunchConfiguration("rate")
    players = [
        ExecuteProcess(cmd=["ros2", "bag", "play", bag, "--clock", "--rate", rate],
                       output="screen",
                       condition=LaunchConfigurationEquals("player", "ros2bag")),
        ExecuteProcess(cmd=["clip2scene", "replay", "--bag", bag, "--rate", rate],
                       output="screen",
                       condition=LaunchConfigurationEquals("player", "clip2scene")),
    ]
    return LaunchDescription([*args, node, *players])
