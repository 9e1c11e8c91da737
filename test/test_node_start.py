"""Start-up of both executables as ``ros2 run`` and ``ros2 launch`` meet it: a parameter of the
wrong type is one clear line and status 2, and so is each layer's error (configuration, bundle
integrity, bag) raised while the node is built: one FATAL line; a stop signal that arrives
before rclpy's handlers are in place (while the modules load, or while ``rclpy.init`` runs) is a
normal stop: status 0, no traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

MODULES = {"node": "clip2scene_ros.node.node",
           "lifecycle": "clip2scene_ros.node.lifecycle_node"}
#: Logged by the executables once the node is built, just before they spin.
READY = "glibc malloc:"
#: Runs an executable as its console script does (``sys.argv[0]`` is the script's name) and
#: sends itself a signal at a chosen point of the start-up: while torch (the first heavy module)
#: is being imported, or just before ``rclpy.init``.
SIGNALLED_START = """
import importlib.abc, os, signal, sys

sig, phase, kind = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
sys.argv = [{"node": "clip2scene_node", "lifecycle": "clip2scene_lifecycle_node"}[kind],
            *sys.argv[4:]]


class SignalOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), sig)
        return None


if phase == "import":
    sys.meta_path.insert(0, SignalOnImport())
else:
    import rclpy

    init = rclpy.init

    def signalled_init(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return init(*args, **kwargs)

    rclpy.init = signalled_init
if kind == "node":
    from clip2scene_ros.node.node import main
else:
    from clip2scene_ros.node.lifecycle_node import main
print("signalled in " + phase, flush=True)
sys.exit(main())
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m")


def default_stop_signals() -> None:
    """In the child: SIGINT and SIGTERM at their defaults. A suite started in the background by
    a shell without job control hands its children an ignored SIGINT, which Python keeps."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def environment() -> dict[str, str]:
    """This module's own ROS domain: no other test sees these nodes."""
    domain = 60 + zlib.crc32(__name__.encode()) % 40
    return {**os.environ, "ROS_DOMAIN_ID": str(domain), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize(("kind", "given", "name"), [
    ("node", "max_points:=abc", "max_points"),
    ("node", "lidar_topic:=5", "lidar_topic"),
    ("lifecycle", "sweeps:=1.5", "sweeps"),
])
def test_parameter_of_the_wrong_type_is_one_line_and_status_2(kind: str, given: str,
                                                               name: str) -> None:
    done = subprocess.run([sys.executable, "-m", MODULES[kind], "--ros-args", "-p", given],
                          capture_output=True, text=True, timeout=120, env=environment())
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out and "AttributeError" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert "[FATAL]" in lines[0] and f"'{name}'" in lines[0], lines[0]
    value = given.split(":=")[1]
    assert f"'{value}'" in lines[0], lines[0]  # what was given, and what type it must be
    assert "expecting type" in lines[0], lines[0]


#: Calls ``run_node`` as the executables do, with a node whose construction raises the layer
#: error named by the first argument (as a bundle, a bag or the configuration refuses start-up).
REFUSED_START = """
import sys

from clip2scene_ros.errors import BagError, ConfigError, IntegrityError
from clip2scene_ros.node.pipeline import run_node

ERRORS = {
    "config": ConfigError("sweeps", "must be >= 1, got 0", "params.yaml"),
    "integrity": IntegrityError("sha256", "model.safetensors does not match", "m/model.yaml"),
    "bag": BagError("/data/drive", "opening drive_0.mcap", "the footer is gone"),
}


def make_node():
    raise ERRORS[sys.argv[1]]


sys.exit(run_node(make_node, lambda node: None, sys.argv[2:], "clip2scene_node"))
"""
REFUSALS = {
    "config": "sweeps: must be >= 1, got 0 (in params.yaml)",
    "integrity": "sha256: model.safetensors does not match (in m/model.yaml)",
    "bag": "bags: cannot read bag /data/drive: opening drive_0.mcap: the footer is gone",
}


def assert_one_fatal_line(done: subprocess.CompletedProcess[str]) -> str:
    """Status 2 and one FATAL line; anything else is an INFO line (the paths the node was
    given). Returns the FATAL line."""
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("[FATAL]")]
    assert len(fatal) == 1 and "[clip2scene_node]" in fatal[0], out
    assert all(line.startswith("[INFO]") for line in lines if line not in fatal), out
    return fatal[0]


@pytest.mark.parametrize("layer", sorted(REFUSALS))
def test_a_layer_error_while_starting_is_one_fatal_line_and_status_2(layer: str) -> None:
    done = subprocess.run([sys.executable, "-c", REFUSED_START, layer, "--ros-args"],
                          capture_output=True, text=True, timeout=120, env=environment())
    assert assert_one_fatal_line(done).endswith(f": {REFUSALS[layer]}")
    assert len((done.stdout + done.stderr).strip().splitlines()) == 1  # nothing else at all


@pytest.mark.parametrize("damage", ["bad_parameter", "cut_weights", "unknown_version"])
def test_refused_start_of_the_node_executable_is_one_fatal_line(damage: str, bundle: Path,
                                                               tmp_path: Path) -> None:
    """The real causes: a parameter out of range (ConfigError), a bundle cut short or of an
    unknown version (IntegrityError)."""
    import shutil

    model = shutil.copytree(bundle, tmp_path / "m")
    params = ["-p", f"model_path:={model}", "-p", "lidar_topic:=/start_test/points"]
    if damage == "bad_parameter":
        params += ["-p", "backend:=tflite"]
        expected = "backend: must be one of"
    elif damage == "cut_weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        expected = "model.safetensors: is "
    else:
        spec = model / "model.yaml"
        text, found = re.subn(r"^bundle_version: \d+$", "bundle_version: 999",
                              spec.read_text(), count=1, flags=re.MULTILINE)
        assert found == 1, text
        spec.write_text(text)
        expected = "bundle_version: 999 is not supported"
    done = subprocess.run([sys.executable, "-m", MODULES["node"], "--ros-args", *params],
                          capture_output=True, text=True, timeout=120, env=environment())
    line = assert_one_fatal_line(done)
    assert expected in line, line


def assert_stopped_cleanly(done: subprocess.CompletedProcess[str]) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"exit status {done.returncode}: {out}"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "[ERROR]" not in out and "[FATAL]" not in out, out
    assert READY not in out, f"the node was built after the stop: {out}"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("kind", "phase"), [
    ("node", "import"), ("node", "init"),
    ("lifecycle", "import"), ("lifecycle", "init")])
def test_stop_signal_before_rclpy_handlers_is_a_clean_stop(kind: str, phase: str, sig: str,
                                                          bundle: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SIGNALLED_START, sig, phase, kind, "--ros-args",
                           "-p", f"model_path:={bundle}", "-p", "lidar_topic:=/start_test/points"],
                          capture_output=True, text=True, timeout=120, env=environment(),
                          preexec_fn=default_stop_signals)
    if phase == "init":  # the modules loaded; the signal came just before rclpy.init
        assert f"signalled in {phase}" in done.stdout, done.stdout + done.stderr
    assert_stopped_cleanly(done)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_soon_after_start_is_a_clean_stop(sig: str, bundle: Path, tmp_path: Path) -> None:
    """As ``ros2 launch`` stopped right after starting the node: the signal lands while the
    node's modules load (seconds), wherever exactly it lands."""
    err = tmp_path / "stderr.txt"
    with err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", MODULES["node"], "--ros-args", "-p", f"model_path:={bundle}",
             "-p", "lidar_topic:=/start_test/points"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=environment(),
            preexec_fn=default_stop_signals)
        time.sleep(0.3)
        assert process.poll() is None, err.read_text()
        process.send_signal(getattr(signal, sig))
        code = process.wait(timeout=60)
    assert_stopped_cleanly(subprocess.CompletedProcess([], code, "", err.read_text()))
