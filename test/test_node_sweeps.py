"""A multi-sweep model in the node: past sweeps are moved by tf2 ego poses (``world_frame``),
looked up through the node's tf2 buffer and reported in diagnostics.

The history and pose gating themselves (a missing pose labels the key frame alone and WARNs,
the history restarts on clock jumps) are the frame processor's, tested without rclpy in
``test_runtime_frame_processor.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_node_cameras import Rig, _params, fake_tf2, needs_ros

S = 1_000_000_000
SPEED_M_PER_S = 10.0  # the fake odometry: x grows with the stamp


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m3", sweeps=3)


#: odom ← lidar: a translation of x = speed × stamp (the car drives along x).
_ODOM_TF2 = fake_tf2(lambda target, source, stamp_ns: (SPEED_M_PER_S * stamp_ns / S, 0.0, 0.0)
                     if (target, source) == ("odom", "lidar") else None)


def _spy(node: Any) -> list[list[Any]]:
    """Record the frames each predict call gets."""
    calls: list[list[Any]] = []
    predict = node.predictor.predict

    def recording(frames: list[Any]) -> Any:
        calls.append(list(frames))
        return predict(frames)

    node.predictor.predict = recording
    return calls


def _values(rig: Rig) -> dict[str, str]:
    return {kv.key: kv.value for kv in rig.last_status().values}


@needs_ros
def test_past_sweeps_are_merged_with_their_tf2_ego_poses(
        ros: Any, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clip2scene_ros.node.node import Clip2SceneNode

    monkeypatch.setitem(sys.modules, "tf2_ros", _ODOM_TF2)
    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_params(bundle)))
    calls = _spy(rig.node)
    try:
        assert rig.node.pipeline._tf_buffer is not None  # no cameras: tf2 for the poses alone
        rig.connect(rig.cloud_pub)
        assert rig.spin(lambda: len(calls) >= 4, every=lambda: rig.tick(camera=False))
        frames = calls[-1]
        assert len(frames) == 3  # the key frame and two past sweeps, newest first
        stamps = [f.stamp_ns for f in frames]
        assert stamps[0] > stamps[1] > stamps[2]
        for f in frames:
            assert f.pose is not None
            assert f.pose[0, 3] == pytest.approx(SPEED_M_PER_S * f.stamp_ns / S)
        assert not frames[1].cameras and rig.node.pipeline.sweep_state == "3 of 3"
        assert rig.spin(lambda: _values(rig).get("sweeps") == "3 of 3")
    finally:
        rig.close()


def test_an_empty_world_frame_is_a_valid_choice() -> None:
    from clip2scene_ros.node_params import NodeParams

    params = NodeParams(model_path="m", world_frame="")
    params.validate()
    assert NodeParams().world_frame == "odom" and np.isfinite(SPEED_M_PER_S)
