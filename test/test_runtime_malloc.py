"""The node's glibc malloc settings: applied with mallopt, the environment wins, one place."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clip2scene_ros.runtime import malloc

ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


class FakeLibc:
    """Records every ``mallopt(param, value)``; returns ``result`` like glibc (1: accepted)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(malloc, "_libc", lambda: fake)
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    return fake


def test_applies_the_node_settings_with_glibcs_parameter_numbers(libc: FakeLibc) -> None:
    assert malloc.apply_node_malloc() == "node"
    # M_TRIM_THRESHOLD is -1 and M_MMAP_THRESHOLD -3 in glibc's malloc.h
    assert sorted(libc.calls) == [(-3, 134217728), (-1, 268435456)]
    assert malloc.describe("node", {}) == \
        "glibc malloc: node settings M_MMAP_THRESHOLD=134217728, M_TRIM_THRESHOLD=268435456"


def test_a_setting_from_the_environment_is_not_overridden(
        libc: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert malloc.apply_node_malloc() == "node"
    assert libc.calls == [(-1, 268435456)]  # only the trim threshold, the user's mmap one stays
    assert "MALLOC_MMAP_THRESHOLD_=131072, M_TRIM_THRESHOLD=268435456" in malloc.describe("node")
    libc.calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.trim_threshold=1")
    assert malloc.apply_node_malloc() == "node" and libc.calls == []
    assert "GLIBC_TUNABLES glibc.malloc.trim_threshold=1" in malloc.describe("node")
    # the benchmarks' explicit --malloc node applies both regardless
    assert malloc.apply_node_malloc(keep_env=False) == "node" and len(libc.calls) == 2
    from clip2scene_ros.bench import apply_malloc

    libc.calls.clear()
    assert apply_malloc("node") == "node" and len(libc.calls) == 2
    assert apply_malloc("default") == "default" and len(libc.calls) == 2


def test_default_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: None)
    assert malloc.apply_node_malloc() == "default"
    assert malloc.describe("default").startswith("glibc malloc: default settings")
    # a C library without mallopt (musl, macOS) or one that refuses a value
    monkeypatch.setattr(malloc, "_libc", lambda: object())
    assert malloc.apply_node_malloc() == "default"
    monkeypatch.setattr(malloc, "_libc", lambda: FakeLibc(result=0))
    assert malloc.apply_node_malloc() == "default"


# In a fresh process on glibc: "node", and an 8 MiB block, mmapped under glibc's default
# threshold (128 KiB), now comes from the heap (mallinfo2's hblks counts mmapped blocks).
SMOKE = """
import ctypes, ctypes.util
from clip2scene_ros.runtime.malloc import apply_node_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = Info
def mmapped():
    before = libc.mallinfo2().hblks
    libc.malloc(8 << 20)
    return libc.mallinfo2().hblks - before
print(mmapped(), apply_node_malloc(), mmapped())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applies_in_a_fresh_process_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["1", "node", "0"]


def test_the_core_module_stays_light() -> None:
    tree = ast.parse(Path(malloc.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert imported <= {"__future__", "ctypes", "os", "collections", "typing"}


def test_no_launch_file_or_subprocess_sets_them() -> None:
    """The values live in runtime/malloc.py only; the node applies them itself."""
    for path in [*(ROOT / "launch").glob("*.py"), *(ROOT / "clip2scene_ros").rglob("*.py")]:
        if path.name != "malloc.py":
            text = path.read_text()
            assert "MALLOC_MMAP_THRESHOLD_" not in text and "134217728" not in text, path


def test_run_node_applies_them_first_and_logs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both executables start through ``pipeline.run_node``: the settings go in before
    ``rclpy.init`` and the node (its Predictor) allocate, and the node logs them once."""
    rclpy = pytest.importorskip("rclpy")
    from clip2scene_ros.node import pipeline

    order: list[str] = []
    monkeypatch.setattr(malloc, "apply_node_malloc", lambda: order.append("malloc") or "node")
    real_init = rclpy.init
    monkeypatch.setattr(rclpy, "init", lambda **kw: order.append("init") or real_init(**kw))
    logged: list[str] = []

    class FakeNode:
        def get_logger(self) -> Any:
            return type("Logger", (), {"info": staticmethod(logged.append)})()

        def destroy_node(self) -> None:
            order.append("destroyed")

    def make_node() -> FakeNode:
        order.append("node")
        return FakeNode()

    assert pipeline.run_node(make_node, lambda node: 0, [], "test_malloc") == 0
    assert order == ["malloc", "init", "node", "destroyed"]
    assert logged == [malloc.describe("node")]
