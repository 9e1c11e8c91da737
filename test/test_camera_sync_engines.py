"""The camera sync's engines by layer: the ROS-free core in ``runtime`` runs the builtin
engine only, and the node's subclass adds message_filters (``auto`` takes it where it
imports)."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from clip2scene_ros.node.camera_sync import CameraSync as NodeCameraSync
from clip2scene_ros.runtime.camera_sync import CameraSync


def fake_message_filters() -> ModuleType:
    """Just enough of message_filters for the engine to be built."""
    module = ModuleType("message_filters")

    class SimpleFilter:
        def signalMessage(self, msg: Any) -> None:
            pass

    def synchronizer(inputs: list[Any], queue_size: int, slop: float) -> Any:
        return SimpleNamespace(registerCallback=lambda callback: None)

    module.SimpleFilter = SimpleFilter  # type: ignore[attr-defined]
    module.ApproximateTimeSynchronizer = synchronizer  # type: ignore[attr-defined]
    return module


def test_the_core_runs_the_builtin_engine_even_where_message_filters_imports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "message_filters", fake_message_filters())
    assert CameraSync(["front"], 0.05, 0.1).engine_name == "builtin"
    with pytest.raises(ValueError, match=r"clip2scene_ros\.node\.camera_sync\.CameraSync"):
        CameraSync(["front"], 0.05, 0.1, engine="message_filters")


def test_the_node_takes_message_filters_where_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rclpy", reason="the message_filters engine stamps with rclpy's Time")
    monkeypatch.setitem(sys.modules, "message_filters", fake_message_filters())
    sync: NodeCameraSync[str] = NodeCameraSync(["front"], 0.05, 0.1)
    assert sync.engine_name == "message_filters"
    assert type(sync._engine).__name__ == "MessageFiltersSync"
    sync.reset()  # a reset builds the same engine again
    assert type(sync._engine).__name__ == "MessageFiltersSync"
    assert NodeCameraSync(["front"], 0.05, 0.1, engine="builtin").engine_name == "builtin"


def test_the_node_falls_back_to_builtin_without_message_filters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "message_filters", None)  # import fails
    assert NodeCameraSync(["front"], 0.05, 0.1).engine_name == "builtin"
    with pytest.raises(ValueError, match="message_filters does not import here"):
        NodeCameraSync(["front"], 0.05, 0.1, engine="message_filters")
