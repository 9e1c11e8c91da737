"""`clip2scene bench transport`: labelled clouds between two processes over DDS, counted."""

from __future__ import annotations

import importlib.util

import pytest

from clip2scene_ros.tools.transport_bench import labelled_cloud, run_setting

pytestmark = pytest.mark.skipif(importlib.util.find_spec("rclpy") is None,
                                reason="rclpy (ROS 2 wheels) is not installed")


def test_large_data_delivers_every_100k_point_cloud_across_processes() -> None:
    result = run_setting("LARGE_DATA", "reliable", points=100_000, rate=10.0, messages=8,
                         domain=171)
    assert result["matched"] and result["sent"] == 8
    assert result["received"] == 8 and result["loss"] == 0.0
    # x, y, z, intensity, label, score, rgb: what the node publishes for 100k points
    assert result["bytes"] >= 100_000 * 26
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"] < 5000


def test_labelled_cloud_is_the_node_output_layout() -> None:
    arrays = labelled_cloud(5)
    assert arrays["xyz"].shape == (5, 3) and arrays["label"].dtype.name == "uint16"
    assert arrays["rgb"].shape == (5, 3) and arrays["score"].dtype.name == "float32"
