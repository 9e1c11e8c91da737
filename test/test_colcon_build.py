"""``colcon build`` of this package as a user with a ROS 2 install runs it: a copy of the package
in a fresh workspace, built plain and with ``--symlink-install`` (both at once), then used the
way ``ros2 run`` and ``ros2 launch`` use it, after sourcing ``install/setup.sh``.

colcon and ament_index_python come from PyPI (requirements-dev.txt); the test skips, saying so,
where they are not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("colcon_core", reason="colcon is not installed (requirements-dev.txt)")
pytest.importorskip("colcon_ros", reason="colcon-ros (ament_python builds) is not installed")
pytest.importorskip("ament_index_python", reason="ament_index_python is not installed")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "clip2scene_ros"
#: What a build of the package reads: its manifest, setup files, the index marker, the share
#: data and the Python packages (training/ is clip2scene_ros.training).
PARTS = ("package.xml", "setup.py", "setup.cfg", "resource", "launch", "config", PACKAGE,
         "training")
EXECUTABLES = ("clip2scene", "clip2scene_node", "clip2scene_lifecycle_node")
MODES = {"plain": [], "symlink": ["--symlink-install"]}
#: The variables a sourced workspace sets; taken out of this process's environment first.
WORKSPACE_VARIABLES = ("AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH", "CMAKE_PREFIX_PATH",
                       "PYTHONPATH")
COLCON = "import sys; from colcon_core.command import main; sys.exit(main())"


def clean_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WORKSPACE_VARIABLES}
    # no user defaults (~/.colcon) change the build; the nodes keep to a domain of their own
    env["COLCON_HOME"] = str(home)
    env["ROS_DOMAIN_ID"] = str(60 + zlib.crc32(__name__.encode()) % 40)
    return env


def copy_package(workspace: Path) -> None:
    target = workspace / "src" / PACKAGE
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, target / part, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, target / part)


def sourced_environment(workspace: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment after ``. install/setup.sh``, as a user's shell has it."""
    done = subprocess.run(["sh", "-c", ". ./install/setup.sh && env -0"], cwd=workspace,
                          env=env, capture_output=True, timeout=60, check=True)
    pairs = (item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    """Both workspaces built at once: each mode's workspace and its sourced environment."""
    started = {}
    for mode, flags in MODES.items():
        workspace = tmp_path_factory.mktemp(f"ws_{mode}")
        copy_package(workspace)
        env = clean_environment(workspace / "colcon_home")
        log = (workspace / "colcon.txt").open("wb")
        process = subprocess.Popen([sys.executable, "-c", COLCON, "build", "--base-paths", "src",
                                    *flags], cwd=workspace, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        started[mode] = (workspace, env, process, log)
    built = {}
    begin = time.monotonic()
    for mode, (workspace, env, process, log) in started.items():
        code = process.wait(timeout=max(1.0, 180 - (time.monotonic() - begin)))
        log.close()
        assert code == 0, f"colcon build ({mode}) exited {code}:\n" + \
            (workspace / "colcon.txt").read_text(errors="replace")[-4000:]
        built[mode] = (workspace, sourced_environment(workspace, env))
    return built


def prefix(workspace: Path) -> Path:
    return workspace / "install" / PACKAGE


@pytest.mark.parametrize("mode", list(MODES))
def test_install_tree_has_the_index_marker_manifest_data_and_executables(
        mode: str, workspaces: dict[str, tuple[Path, dict[str, str]]]) -> None:
    workspace, _ = workspaces[mode]
    installed = prefix(workspace)
    assert (installed / "share" / "ament_index" / "resource_index" / "packages"
            / PACKAGE).is_file()
    share = installed / "share" / PACKAGE
    assert (share / "package.xml").read_text() == (ROOT / "package.xml").read_text()
    # every launch and config file, under the names the launch files look for
    for folder in ("launch", "config"):
        wanted = {p.relative_to(ROOT) for p in (ROOT / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
        there = {p.relative_to(share) for p in (share / folder).rglob("*") if p.is_file()}
        assert wanted and wanted <= there, sorted(map(str, wanted - there))
    # `ros2 run` looks for executables in lib/<package>, not on PATH
    for name in EXECUTABLES:
        script = installed / "lib" / PACKAGE / name
        assert script.is_file() and os.access(script, os.X_OK), script


@pytest.mark.parametrize("mode", list(MODES))
def test_sourced_workspace_finds_the_package_and_imports_the_built_copy(
        mode: str, workspaces: dict[str, tuple[Path, dict[str, str]]]) -> None:
    workspace, env = workspaces[mode]
    probe = ("from ament_index_python.packages import get_package_share_directory\n"
             "import clip2scene_ros, clip2scene_ros.training\n"
             f"print(get_package_share_directory('{PACKAGE}'))\n"
             "print(clip2scene_ros.__file__)\n"
             "print(clip2scene_ros.training.__file__)\n")
    # run from the workspace, as a user does (from here, the repository would be on sys.path)
    done = subprocess.run([sys.executable, "-c", probe], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    share, package, training = done.stdout.splitlines()
    assert Path(share) == prefix(workspace) / "share" / PACKAGE
    # the workspace's copy, not the repository the tests run from
    assert Path(package).is_relative_to(workspace), package
    assert Path(training).is_relative_to(workspace), training


@pytest.mark.parametrize("mode", list(MODES))
def test_installed_node_without_a_model_says_so_in_one_line_and_exits_2(
        mode: str, workspaces: dict[str, tuple[Path, dict[str, str]]]) -> None:
    workspace, env = workspaces[mode]
    done = subprocess.run([str(prefix(workspace) / "lib" / PACKAGE / "clip2scene_node")],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    refusals = [line for line in out.splitlines() if "[FATAL]" in line or "[ERROR]" in line]
    assert len(refusals) == 1 and "model_path" in refusals[0], out


@pytest.mark.parametrize("mode", list(MODES))
def test_installed_cli_eval_help(mode: str,
                                 workspaces: dict[str, tuple[Path, dict[str, str]]]) -> None:
    workspace, env = workspaces[mode]
    done = subprocess.run([str(prefix(workspace) / "lib" / PACKAGE / "clip2scene"), "eval",
                           "--help"], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: clip2scene eval"), done.stdout
    assert "--model" in done.stdout
