"""A normal stop: SIGINT (Ctrl-C) and SIGTERM (``ros2 launch`` stopping its processes) end both
executables with status 0 and no traceback, their publishers, subscriptions, timers and
services destroyed, so a launch file never reports "process has died" on a stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

#: Logged by the executables once the node is built, just before they spin.
READY = "glibc malloc:"
MODULES = {"node": "clip2scene_ros.node.node",
           "lifecycle": "clip2scene_ros.node.lifecycle_node"}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
#: What stops a node: Ctrl-C or ``kill``, a SIGTERM from ``ros2 launch`` (or systemd), Ctrl-C
#: on ``ros2 launch`` (the terminal signals the whole process group and launch passes the SIGINT
#: on, so the node gets a second one while it cleans up) and SIGINT to a node started as a
#: background job of a script (SIGINT ignored at start: no KeyboardInterrupt, only rclpy's
#: handler sees it).
STOPS = {"SIGINT": ["SIGINT"], "SIGTERM": ["SIGTERM"], "ctrl-c-on-launch": ["SIGINT", "SIGINT"],
         "SIGINT-background-job": ["SIGINT"]}
#: Runs an executable's main (``run_node``) but keeps the node, to report what is left of it.
KEEPING_THE_NODE = """
import json, sys
from clip2scene_ros.node import lifecycle_node, node
from clip2scene_ros.node.pipeline import run_node
kind = sys.argv[1]
cls, build_only, name = {
    "node": (node.Clip2SceneNode, node._build_only, "clip2scene_node"),
    "lifecycle": (lifecycle_node.Clip2SceneLifecycleNode, lifecycle_node._build_only,
                  "clip2scene_lifecycle_node")}[kind]
made = []
status = run_node(lambda: made.append(cls()) or made[0], build_only, None, name)
n = made[0]
left = {"publishers": len(list(n.publishers)), "subscriptions": len(list(n.subscriptions)),
        "timers": len(list(n.timers)), "services": len(list(n.services)),
        "pipeline_publishers": len(n.pipeline._publishers) if n.pipeline is not None else 0,
        "ok": __import__("rclpy").ok()}
print("left " + json.dumps(left), flush=True)
sys.exit(status)
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m")


class Running:
    """A node process with its stdout and stderr in files (no pipe to fill up)."""

    def __init__(self, command: list[str], folder: Path, domain: int,
                 sigint_ignored: bool = False) -> None:
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "PYTHONUNBUFFERED": "1"}
        # what a non-interactive shell does to a job it starts in the background
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env,
                                            preexec_fn=ignore)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_until_up(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while READY not in self.stderr():
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.stderr()}"
            assert time.monotonic() < end, f"not up after {timeout} s: {self.stderr()}"
            time.sleep(0.05)

    def stop(self, *signums: int, gap_s: float = 0.05) -> int:
        """Send ``signums`` ``gap_s`` apart (while it runs); its exit status."""
        for i, signum in enumerate(signums):
            if i:
                time.sleep(gap_s)
            if self.process.poll() is None:
                self.process.send_signal(signum)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for proc in started:
        proc.kill()


def own_domain() -> int:
    """The ``ros`` fixture's domain for this module (no test elsewhere sees these nodes)."""
    return 60 + zlib.crc32(__name__.encode()) % 40


def assert_clean(proc: Running, code: int) -> None:
    err = proc.stderr()
    assert code == 0, f"exit status {code}: {err}"
    assert "Traceback" not in err and "ExternalShutdownException" not in err, err
    assert "[ERROR]" not in err and "[FATAL]" not in err, err


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("executable", list(MODULES))
def test_executable_stops_cleanly_on_a_signal(executable: str, stop: str, bundle: Path,
                                              tmp_path: Path, running: list[Running]) -> None:
    proc = Running([sys.executable, "-m", MODULES[executable], "--ros-args",
                    "-p", f"model_path:={bundle}", "-p", "lidar_topic:=/stop_test/points"],
                   tmp_path, own_domain(), sigint_ignored=stop == "SIGINT-background-job")
    running.append(proc)
    proc.wait_until_up()
    assert_clean(proc, proc.stop(*(SIGNALS[sig] for sig in STOPS[stop])))


@pytest.mark.parametrize(("kind", "sig"), [("node", "SIGTERM"), ("lifecycle", "SIGINT")])
def test_running_node_is_destroyed_on_a_signal(kind: str, sig: str, ros: Any, bundle: Path,
                                               tmp_path: Path, running: list[Running]) -> None:
    """The node spinning with its inputs and outputs open (the lifecycle node configured and
    activated) and publishing diagnostics; after the signal nothing of it is left and rclpy is
    shut down."""
    proc = Running([sys.executable, "-c", KEEPING_THE_NODE, kind, "--ros-args",
                    "-p", f"model_path:={bundle}", "-p", "lidar_topic:=/stop_test/points",
                    "-p", "diagnostics_period_s:=0.2"], tmp_path, ros.get_domain_id())
    running.append(proc)
    peer = rclpy.create_node("stop_test_peer", context=ros)
    executor = SingleThreadedExecutor(context=ros)
    executor.add_node(peer)
    diagnostics: list[DiagnosticArray] = []
    peer.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    try:
        proc.wait_until_up()
        if kind == "lifecycle":
            client = peer.create_client(ChangeState, "/clip2scene_node/change_state")
            assert client.wait_for_service(timeout_sec=30), proc.stderr()
            for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                future = client.call_async(ChangeState.Request(
                    transition=Transition(id=transition)))
                executor.spin_until_future_complete(future, timeout_sec=60)
                assert future.done() and future.result().success, proc.stderr()
        end = time.monotonic() + 30
        while not diagnostics and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        assert diagnostics, f"no diagnostics from the running node: {proc.stderr()}"
        code = proc.stop(SIGNALS[sig])
    finally:
        executor.shutdown()
        peer.destroy_node()
    assert_clean(proc, code)
    (line,) = [x for x in proc.stdout().splitlines() if x.startswith("left ")]
    left = json.loads(line.removeprefix("left "))
    assert left == {"publishers": 0, "subscriptions": 0, "timers": 0, "services": 0,
                    "pipeline_publishers": 0, "ok": False}, left
