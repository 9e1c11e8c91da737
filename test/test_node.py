"""clip2scene_node in-process over rclpy: labels out with the input header, bad messages counted
and reported, invalid parameters refused by name."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from clip2scene_ros.codecs import UNKNOWN_LABEL, decode_pointcloud2, encode_pointcloud2  # noqa: E402
from clip2scene_ros.codecs.messages import RclpyFactory  # noqa: E402
from clip2scene_ros.errors import ConfigError  # noqa: E402
from clip2scene_ros.node.node import Clip2SceneNode  # noqa: E402

CLOUD = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                  "offsets": [0, 4, 8, 12], "itemsize": 16})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m",
                              palette=((10, 20, 30), (200, 0, 0)))


def spin_until(executor: SingleThreadedExecutor, done: Callable[[], bool], timeout: float = 20.0,
               every: Callable[[], object] | None = None) -> bool:
    """Spin until ``done()``; ``every`` runs once a second (re-publishing on a lossy QoS)."""
    end = time.monotonic() + timeout
    next_call = time.monotonic()
    while time.monotonic() < end and not done():
        if every is not None and time.monotonic() >= next_call:
            every()
            next_call += 1.0
        executor.spin_once(timeout_sec=0.05)
    return done()


@contextlib.contextmanager
def wired_node(ros: Any, bundle: Path, *params: Parameter
               ) -> Iterator[tuple[Clip2SceneNode, Any, list[PointCloud2], list[DiagnosticArray],
                               SingleThreadedExecutor]]:
    """The node on /in plus a peer that publishes there and records labels and diagnostics."""
    node = Clip2SceneNode(context=ros, parameter_overrides=[
        Parameter("model_path", value=str(bundle)), Parameter("lidar_topic", value="/in"),
        *params])
    peer = rclpy.create_node("peer", context=ros)
    outputs: list[PointCloud2] = []
    diagnostics: list[DiagnosticArray] = []
    peer.create_subscription(PointCloud2, "/clip2scene_node/output/labels", outputs.append, 10)
    peer.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    pub = peer.create_publisher(PointCloud2, "/in", qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=ros)
    executor.add_node(node)
    executor.add_node(peer)
    try:
        yield node, pub, outputs, diagnostics, executor
    finally:
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()


def cloud_msg(n: int, stamp_s: int, nan_rows: tuple[int, ...] = ()) -> PointCloud2:
    rng = np.random.default_rng(stamp_s)
    cloud = np.zeros(n, CLOUD)
    for axis in "xyz":
        cloud[axis] = rng.uniform(-10, 10, n)
    cloud["intensity"] = rng.uniform(0, 100, n)
    cloud["x"][list(nan_rows)] = np.nan
    return encode_pointcloud2(cloud, stamp_ns=stamp_s * 1_000_000_000, frame_id="velodyne",
                              factory=RclpyFactory())


def test_labels_every_point_with_the_input_header(ros: Any, bundle: Path) -> None:
    with wired_node(ros, bundle, Parameter("diagnostics_period_s", value=0.2)) as (
            node, pub, outputs, diagnostics, executor):
        assert spin_until(executor, lambda: pub.get_subscription_count() > 0
                          and node.output.get_subscription_count() > 0)
        sent = cloud_msg(500, 5, nan_rows=(3,))
        assert spin_until(executor, lambda: bool(outputs), every=lambda: pub.publish(sent))
        out = outputs[0]
        assert out.header.stamp == sent.header.stamp and out.header.frame_id == "velodyne"
        labelled = decode_pointcloud2(out)
        assert labelled.dtype.names == ("x", "y", "z", "intensity", "label", "score", "rgb")
        assert labelled.size == 500 and labelled["label"][3] == UNKNOWN_LABEL
        others = np.delete(labelled["label"], 3)
        assert set(others.tolist()) <= {0, 1}

        bad = cloud_msg(10, 6)
        bad.data = bad.data[:-5]  # truncated payload
        assert spin_until(executor, lambda: node.health.bad["PointCloud2"] >= 1,
                          every=lambda: pub.publish(bad))
        assert spin_until(executor, lambda: any(
            s.level == DiagnosticStatus.WARN and "PointCloud2" in s.message
            for d in diagnostics for s in d.status))
        count = len(outputs)
        more = cloud_msg(50, 7)
        assert spin_until(executor, lambda: len(outputs) > count,
                          every=lambda: pub.publish(more))  # still running


def test_start_up_objects_are_frozen_out_of_the_cyclic_gc_while_running(ros: Any,
                                                                        bundle: Path) -> None:
    """Running, the objects alive at start-up are out of the full collections' walk (they
    cost a 340 ms pause mid-frame with CLIP loaded); closed, they are the collector's again."""
    import gc

    with wired_node(ros, bundle) as (node, *_):
        assert gc.get_freeze_count() > 10_000  # torch, rclpy, the model
        node.pipeline.close()
        assert gc.get_freeze_count() == 0


def test_invalid_parameters_stop_start_up_naming_them(ros: Any, bundle: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Clip2SceneNode(context=ros, parameter_overrides=[
            Parameter("model_path", value=str(bundle)), Parameter("fusion_weight", value=2.0)])
    assert info.value.key == "fusion_weight"
    with pytest.raises(ConfigError, match="model_path"):
        Clip2SceneNode(context=ros)


def test_node_executable_exits_2_with_what_to_do() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "clip2scene_ros.node.node", "--ros-args", "-p",
                           "backend:=tflite"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "backend: must be one of" in done.stderr + done.stdout


def test_vocabulary_parameter_swaps_labels_at_run_time(ros: Any, bundle: Path,
                                                       tmp_path: Path) -> None:
    from clip2scene_ros.teacher.text_bank import save_text_bank
    from clip2scene_ros.vocabulary import Vocabulary, VocabularyClass

    names = ("tree", "bus", "sky", "cone")
    vocab = Vocabulary("four", tuple(VocabularyClass(n, (i, i, i)) for i, n in enumerate(names)))
    bank = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    path = save_text_bank(tmp_path / "four", bank, vocab, {"model": "test"})
    with wired_node(ros, bundle) as (node, pub, outputs, _, executor):
        result = node.set_parameters([Parameter("vocabulary", value=str(path))])[0]
        assert result.successful and node.predictor.vocabulary.name == "four"
        bad = node.set_parameters([Parameter("vocabulary", value=str(tmp_path / "none"))])[0]
        assert not bad.successful and "none" in bad.reason
        assert node.predictor.vocabulary.name == "four"  # a bad file changes nothing
        assert node.health.bad["vocabulary"] == 1  # and is counted (diagnostics WARN)
        frozen = node.set_parameters([Parameter("lidar_topic", value="/other")])[0]
        assert not frozen.successful  # read-only after start-up
        assert spin_until(executor, lambda: pub.get_subscription_count() > 0
                          and node.output.get_subscription_count() > 0)
        sent = cloud_msg(2000, 8)
        assert spin_until(executor, lambda: bool(outputs), every=lambda: pub.publish(sent))
        labels = decode_pointcloud2(outputs[-1])["label"]
        assert labels.max() <= 3 and len(set(labels.tolist()) - {0, 1}) > 0  # the new classes


def test_missing_vocabulary_file_at_start_up_keeps_the_node_running(ros: Any, bundle: Path,
                                                                    tmp_path: Path) -> None:
    node = Clip2SceneNode(context=ros, parameter_overrides=[
        Parameter("model_path", value=str(bundle)),
        Parameter("vocabulary", value=str(tmp_path / "missing"))])
    try:
        assert node.predictor.vocabulary.name == "two"  # the bundle's own
        assert node.health.bad["vocabulary"] == 1
        assert node.health.status(0.0).level == "WARN"
    finally:
        node.destroy_node()


def _without_xyz(stamp_s: int) -> PointCloud2:
    cloud = np.zeros(20, np.dtype({"names": ["a", "intensity"], "formats": ["<f4"] * 2,
                                    "offsets": [0, 4], "itemsize": 8}))
    return encode_pointcloud2(cloud, stamp_ns=stamp_s * 1_000_000_000, frame_id="velodyne",
                              factory=RclpyFactory())


def _zero_stamp(stamp_s: int) -> PointCloud2:
    msg = cloud_msg(30, stamp_s)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 0, 0
    return msg


def _bad_point_step(stamp_s: int) -> PointCloud2:
    msg = cloud_msg(30, stamp_s)
    msg.point_step = 3  # smaller than the fields it declares
    return msg


@pytest.mark.parametrize("make_bad", [_without_xyz, _zero_stamp, _bad_point_step],
                         ids=["no_xyz", "zero_stamp", "bad_point_step"])
def test_bad_clouds_are_counted_and_the_node_goes_on(ros: Any, bundle: Path,
                                                     make_bad: Callable[[int], PointCloud2]
                                                     ) -> None:
    with wired_node(ros, bundle) as (node, pub, outputs, _, executor):
        assert spin_until(executor, lambda: pub.get_subscription_count() > 0
                          and node.output.get_subscription_count() > 0)
        bad = make_bad(20)
        assert spin_until(executor, lambda: node.health.bad["PointCloud2"] >= 1,
                          every=lambda: pub.publish(bad))
        assert node.health.status(time.monotonic()).level in ("WARN", "ERROR")
        later = cloud_msg(40, 30)  # and then a good one, and a backwards one (bag loop)
        assert spin_until(executor, lambda: len(outputs) >= 1, every=lambda: pub.publish(later))
        earlier = cloud_msg(40, 25)
        count = len(outputs)
        assert spin_until(executor, lambda: len(outputs) > count,
                          every=lambda: pub.publish(earlier))
