"""Launch files and the RViz config: built where launch is installed, checked statically here."""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import yaml

from clip2scene_ros.node_params import NodeParams

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "clip2scene.launch.py"
REPLAY = ROOT / "launch" / "replay.launch.py"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [LAUNCH, REPLAY], ids=lambda p: p.name)
def test_launch_files_build_a_description_where_launch_is_installed(path: Path) -> None:
    pytest.importorskip("launch_ros", reason="launch/launch_ros come with a ROS install only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        description = load(path).generate_launch_description()
    assert description.entities
    assert not [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    declared = {a.name: a for a in description.get_launch_arguments()}
    if path == REPLAY:
        assert {"bag", "model", "player", "use_sim_time", "delay", "wait_timeout"} <= set(declared)
        assert declared["player"].choices == ["ros2bag", "clip2scene"]


def constants(path: Path) -> tuple[ast.Module, set[str]]:
    """The parsed launch file and every string constant in it."""
    tree = ast.parse(path.read_text())
    return tree, {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str)}


def test_launch_file_names_what_exists() -> None:
    tree, strings = constants(LAUNCH)
    # the executable is a console script of setup.py
    assert "clip2scene_node" in strings
    assert "clip2scene_node = clip2scene_ros.node.node:main" in (ROOT / "setup.py").read_text()
    # every file it finds in the package share exists in config/
    assert {"clip2scene.yaml", "clip2scene.rviz"} <= strings
    for name in ("clip2scene.yaml", "clip2scene.rviz"):
        assert (ROOT / "config" / name).is_file()
    # every node parameter it sets is a parameter of the node (or ROS's use_sim_time)
    keys = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys
            if isinstance(k, ast.Constant)}
    assert keys - {"use_sim_time"} <= {f for f in NodeParams.__dataclass_fields__}
    for arg in ("model", "params_file", "lidar_topic", "use_sim_time", "build_only",
                "log_level", "rviz"):
        assert arg in strings
    # Fast DDS's transports are set here; the glibc malloc settings are the node's own
    # (runtime/malloc.py: a plain `ros2 run` gets them too), so none here would override them
    assert "FASTDDS_BUILTIN_TRANSPORTS" in strings
    assert not [s for s in strings if s.startswith("MALLOC_")]


def test_rviz_config_shows_the_node_outputs() -> None:
    rviz = yaml.safe_load((ROOT / "config" / "clip2scene.rviz").read_text())
    displays = {d["Name"]: d for d in rviz["Visualization Manager"]["Displays"]}
    labels = displays["Labels"]
    assert labels["Topic"]["Value"] == "/clip2scene_node/output/labels"
    assert labels["Color Transformer"] == "RGB8"
    assert labels["Topic"]["Reliability Policy"] == "Reliable" == \
        {"reliable": "Reliable"}[NodeParams().output_reliability]
    assert displays["Legend"]["Topic"]["Value"] == "/clip2scene_node/output/legend"


def test_replay_launch_names_what_exists() -> None:
    tree, strings = constants(REPLAY)
    assert "clip2scene.launch.py" in strings and LAUNCH.is_file()
    # the arguments it hands to clip2scene.launch.py are arguments that file declares
    declares = [n for n in ast.walk(constants(LAUNCH)[0]) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "DeclareLaunchArgument"]
    node_args = {call.args[0].value for call in declares}
    handed = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys
              if isinstance(k, ast.Constant)}
    assert handed <= node_args
    # both players exist: `clip2scene replay` is a subcommand of our console script
    assert {"replay", "clip2scene", "--clock"} <= strings
    from clip2scene_ros.cli import build_parser

    assert build_parser().parse_args(["replay", "--bag", "x"]).func.__name__ == "cmd_replay"


#: Deprecated on Jazzy and later (EqualsSubstitution replaces them, which Humble lacks).
DEPRECATED = {"LaunchConfigurationEquals", "LaunchConfigurationNotEquals"}


def names(path: Path) -> set[str]:
    """Every name and attribute the launch file uses (imports included)."""
    tree = ast.parse(path.read_text())
    found = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    found |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return found


@pytest.mark.parametrize("path", [LAUNCH, REPLAY], ids=lambda p: p.name)
def test_launch_files_use_nothing_deprecated(path: Path) -> None:
    assert not names(path) & DEPRECATED


def keyword_calls(path: Path, function: str) -> list[dict[str, ast.expr]]:
    return [{k.arg: k.value for k in n.keywords if k.arg} for n in ast.walk(ast.parse(
        path.read_text())) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == function]


def test_replay_players_are_resolved_not_taken_from_path() -> None:
    """`clip2scene` is found in the package's lib folder (colcon puts it off PATH), `ros2` on
    PATH (with a clear error if it is missing), and the node gets the launch argument
    use_sim_time rather than a fixed value."""
    (in_package,) = keyword_calls(REPLAY, "ExecutableInPackage")
    assert ast.literal_eval(in_package["executable"]) == "clip2scene"
    assert isinstance(in_package["package"], ast.Name) and in_package["package"].id == "PACKAGE"
    assert load(REPLAY).PACKAGE == "clip2scene_ros"
    assert "clip2scene = clip2scene_ros.cli:main" in (ROOT / "setup.py").read_text()
    replay = load(REPLAY)
    assert replay.ros2_executable(lambda name: f"/opt/ros/kilted/bin/{name}") == \
        "/opt/ros/kilted/bin/ros2"
    with pytest.raises(RuntimeError, match="player:=ros2bag needs `ros2` with rosbag2 on PATH"):
        replay.ros2_executable(lambda name: None)
    # no process is started by a bare name
    for call in keyword_calls(REPLAY, "ExecuteProcess"):
        first = call["cmd"].elts[0] if isinstance(call["cmd"], ast.List) else None
        assert not isinstance(first, ast.Constant), ast.dump(call["cmd"])
    tree = ast.parse(REPLAY.read_text())
    (handed,) = [n for n in ast.walk(tree) if isinstance(n, ast.Dict)
                 and any(isinstance(k, ast.Constant) and k.value == "use_sim_time" for k in n.keys)]
    value = handed.values[[k.value for k in handed.keys].index("use_sim_time")]
    assert ast.unparse(value) == "LaunchConfiguration('use_sim_time')"


@pytest.fixture(scope="module")
def replay() -> ModuleType:
    """replay.launch.py imports launch only inside its functions: its pure parts load here."""
    return load(REPLAY)


@pytest.mark.parametrize("sim_time", [True, False])
def test_clip2scene_player_arguments_are_a_valid_replay_command(replay: ModuleType,
                                                                sim_time: bool) -> None:
    from clip2scene_ros.cli import build_parser

    args = replay.player_arguments("clip2scene", "/bags/drive", "0.5", 1.5, sim_time, "/points")
    parsed = build_parser().parse_args(args)
    assert parsed.func.__name__ == "cmd_replay"
    assert (parsed.bag, parsed.rate, parsed.no_clock) == ("/bags/drive", 0.5, not sim_time)
    assert parsed.wait_for == ["/points"]  # its own process sees the node before playing
    # `clip2scene replay` has no delay of its own: the launch starts it that much later
    assert replay.player_delay_before_start("clip2scene", 1.5) == 1.5


@pytest.mark.parametrize("sim_time", [True, False])
def test_ros2bag_player_arguments(replay: ModuleType, sim_time: bool) -> None:
    args = replay.player_arguments("ros2bag", "/bags/drive", "2.0", 1.5, sim_time, "/points")
    assert args[:3] == ["bag", "play", "/bags/drive"]
    assert args[args.index("--rate") + 1] == "2.0"
    # `ros2 bag play --delay` sleeps after making its publishers (so they are matched first)
    assert args[args.index("--delay") + 1] == "1.5"
    assert replay.player_delay_before_start("ros2bag", 1.5) == 0.0
    assert ("--clock" in args) == sim_time


def test_replay_launch_arguments_are_checked(replay: ModuleType) -> None:
    with pytest.raises(ValueError, match="player:=rosbag"):
        replay.player_arguments("rosbag", "b", "1.0", 0.0, True, "/points")
    assert [replay.flag("x", v) for v in ("true", "True", "1", "false", "0")] == \
        [True, True, True, False, False]
    with pytest.raises(ValueError, match="use_sim_time:=yes: expected true or false"):
        replay.flag("use_sim_time", "yes")
    assert replay.seconds("delay", "2.5") == 2.5 and replay.seconds("delay", "0") == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ValueError, match=f"delay:={bad}: expected seconds >= 0"):
            replay.seconds("delay", bad)


def test_replay_waits_for_the_node_subscription_not_any(replay: ModuleType) -> None:
    """The node is the one clip2scene.launch.py starts; a recorder or RViz on the topic does not
    count."""
    _, strings = constants(LAUNCH)
    assert replay.NODE_NAME == "clip2scene_node" and replay.NODE_NAME in strings
    assert not replay.node_subscribed([])
    assert not replay.node_subscribed([SimpleNamespace(node_name="rosbag2_recorder")])
    assert replay.node_subscribed([SimpleNamespace(node_name="rviz2"),
                                   SimpleNamespace(node_name="clip2scene_node")])


def test_input_reliability_is_the_parameter_files_unless_given() -> None:
    """clip2scene.launch.py leaves the parameter file's input QoS alone by default; the replay
    launch asks for a reliable reader, which a large cloud needs on a busy CPU."""
    import typing

    from clip2scene_ros.node_params import Reliability

    node_launch = load(LAUNCH)
    assert node_launch.parameter_overrides("") == {}
    assert node_launch.parameter_overrides("reliable") == {"input_reliability": "reliable"}
    assert set(node_launch.RELIABILITIES) == set(typing.get_args(Reliability))
    with pytest.raises(ValueError, match="input_reliability:=lossy: expected one of"):
        node_launch.parameter_overrides("lossy")
    def default(path: Path, name: str) -> object:
        (call,) = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                   and getattr(n.func, "id", "") == "DeclareLaunchArgument"
                   and ast.literal_eval(n.args[0]) == name]
        return ast.literal_eval({k.arg: k.value for k in call.keywords}["default_value"])

    assert default(REPLAY, "input_reliability") == "reliable"
    assert default(LAUNCH, "input_reliability") == ""
