"""Launch files and the RViz config: built where launch is installed, checked statically here."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

from clip2scene_ros.node_params import NodeParams

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "clip2scene.launch.py"
REPLAY = ROOT / "launch" / "replay.launch.py"


@pytest.mark.parametrize("path", [LAUNCH, REPLAY], ids=lambda p: p.name)
def test_launch_files_build_a_description_where_launch_is_installed(path: Path) -> None:
    pytest.importorskip("launch_ros", reason="launch/launch_ros come with a ROS install only")
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generate_launch_description().entities


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
