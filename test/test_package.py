"""The repository is one ament_python package and one pip distribution."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import setuptools  # noqa: F401  (installs its distutils before run_setup imports it)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def distribution():
    from distutils.core import run_setup

    return run_setup(str(ROOT / "setup.py"), stop_after="init")


def test_package_xml() -> None:
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package"
    assert root.get("format") == "3"
    assert root.findtext("name") == "clip2scene_ros"
    assert root.find("export/build_type").text == "ament_python"
    exec_deps = [e.text for e in root.findall("exec_depend")]
    assert len(exec_deps) == len(set(exec_deps)), exec_deps
    for dep in ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs",
                "diagnostic_msgs", "tf2_ros_py", "message_filters", "python3-numpy",
                "python3-torch",
                # the launch files and their default player (launch/replay.launch.py)
                "launch", "launch_ros", "ros2launch", "ament_index_python", "rosbag2",
                # imported at run time: PIL (codecs/image.py), tqdm (teacher/run.py),
                # rosbags (bag/, replay) through its pip rosdep key
                "python3-pil", "python3-tqdm", "python3-rosbags-pip"):
        assert dep in exec_deps, dep
    # tf2_ros is the C++ package (the Python module is tf2_ros_py); cv_bridge and
    # sensor_msgs_py are never imported at run time
    for dep in ("tf2_ros", "cv_bridge", "sensor_msgs_py"):
        assert dep not in exec_deps, dep
    test_deps = {e.text for e in root.findall("test_depend")}
    assert {"python3-pytest", "sensor_msgs_py"} <= test_deps
    assert "cv_bridge" not in {e.text for e in root.iter() if e.tag.endswith("depend")}
    assert "safetensors" in (ROOT / "package.xml").read_text()  # where it comes from: pip


def test_package_xml_is_a_valid_format_3_manifest() -> None:
    """catkin_pkg (colcon-ros's parser, as rosdep and bloom read manifests) accepts it without a
    warning: REP 149's required fields, name and version patterns, known dependency tags."""
    package = pytest.importorskip("catkin_pkg.package", reason="catkin_pkg comes with colcon-ros")
    warnings: list[str] = []
    manifest = package.parse_package(str(ROOT / "package.xml"), warnings=warnings)
    manifest.validate(warnings=warnings)
    assert manifest.package_format == 3 and manifest.name == "clip2scene_ros"
    assert warnings == []
    broken = (ROOT / "package.xml").read_text().replace("<version>", "<version>v", 1)
    with pytest.raises(package.InvalidPackage, match="version"):
        package.parse_package_string(broken).validate()


def test_dropped_ros_packages_stay_unimported() -> None:
    """cv_bridge and sensor_msgs_py are not run-time dependencies: nothing installed imports
    them (only a test compares against sensor_msgs_py)."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("clip2scene_ros", "training", "launch")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"^\s*(import|from) (cv_bridge|sensor_msgs_py)\b", path.read_text(),
                     re.MULTILINE)
    ]
    assert offenders == []


def test_setup_metadata(distribution) -> None:
    assert distribution.get_name() == "clip2scene_ros"
    requires = distribution.install_requires
    assert not [r for r in requires if r.lower().startswith("ros-")], (
        "ROS wheels must stay in requirements-ros.txt, never install_requires"
    )
    installed = {dest: files for dest, files in distribution.data_files}
    assert installed["share/ament_index/resource_index/packages"] == ["resource/clip2scene_ros"]
    assert installed["share/clip2scene_ros"] == ["package.xml"]
    assert "config/vocabularies/sample_drive.yaml" in installed[
        "share/clip2scene_ros/config/vocabularies"]
    assert "launch/clip2scene.launch.py" in installed["share/clip2scene_ros/launch"]
    assert "config/clip2scene.rviz" in installed["share/clip2scene_ros/config"]
    scripts = distribution.entry_points["console_scripts"]
    assert "clip2scene = clip2scene_ros.cli:main" in scripts
    assert "clip2scene_node = clip2scene_ros.node.node:main" in scripts
    assert (ROOT / "resource" / "clip2scene_ros").is_file()
    # training/ at the root installs as clip2scene_ros.training, through a relative symlink that
    # `setup.py develop` (colcon --symlink-install) resolves as well as a wheel build does
    assert "clip2scene_ros.training" in distribution.packages
    link = ROOT / "clip2scene_ros" / "training"
    assert link.is_symlink() and link.readlink() == Path("../training")
    assert link.resolve() == (ROOT / "training").resolve()


def test_ros_wheels_requirements_are_separate() -> None:
    names = [line.split()[0] for line in (ROOT / "requirements-ros.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "ros-rclpy" in names and "ros-rmw-fastrtps-cpp" in names


def test_cli_help_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "clip2scene_ros.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("sample", "inspect", "bench"):
        assert command in out
