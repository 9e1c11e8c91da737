"""PointCLIP objects in the node, in-process over rclpy with a tiny random CLIP: boxes and texts
for subscribers only, the on-demand service, diagnostics and the refusals at start-up. The pass
itself (clusters, the time budget, the ensemble) is tested without rclpy in
``test_pointclip_objects.py``.

The segmentation labels come from the cloud's intensity (class index × 10) instead of the random
network, so the clusters are known: two cars and a pedestrian on a road.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clip2scene_ros.errors import ConfigError
from clip2scene_ros.node_params import load_node_params

HAS_RCLPY = importlib.util.find_spec("rclpy") is not None
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_ros = pytest.mark.skipif(not (HAS_RCLPY and HAS_OPEN_CLIP),
                               reason="rclpy (ROS 2 wheels) or open_clip is not installed")

CLOUD = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                  "offsets": [0, 4, 8, 12], "itemsize": 16})
CLASSES = ("road", "car", "pedestrian")
OBJECTS = "/clip2scene_node/output/objects"
LABELS = "/clip2scene_node/output/labels"
S = 1_000_000_000

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny clouds, a busy machine


# --- parameters (no ROS needed) -----------------------------------------------------------------
@pytest.mark.parametrize(("params", "key"), [
    ({"publish_objects": True}, "clip_pretrained"),  # no CLIP weights: refused like fusion
    ({"publish_objects": True, "clip_pretrained": "random", "objects_topic": ""},
     "objects_topic"),
    ({"objects_mode": "sometimes"}, "objects_mode"),
    ({"objects_budget_ms": -1.0}, "objects_budget_ms"),
    ({"objects_ensemble_weight": -0.5}, "objects_ensemble_weight"),
    ({"objects_classes": "car"}, "objects_classes"),
])
def test_object_parameters_are_checked_by_name(params: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_params(params)
    assert info.value.key == key
    if key == "clip_pretrained":
        assert "publish_objects" in str(info.value) and "/path/to/weights" in str(info.value)


# --- the node -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m", name="street", classes=CLASSES,
                              clip_dim=32,
                              palette=((128, 64, 128), (0, 0, 142), (220, 20, 60)))


def intensity_predictor(params: Any) -> Any:
    """The bundle's Predictor with labels (and their logits) read from the intensity."""
    from clip2scene_ros.runtime.labels import PointLabels, text_logits
    from clip2scene_ros.runtime.predictor import Predictor

    class IntensityPredictor(Predictor):
        def predict(self, frames: Any) -> Any:
            result = super().predict(frames)
            label = np.rint(frames[0].intensity / 10).astype(np.int64)
            source = torch.from_numpy(label[result.prepared.source])  # one sweep: frame rows
            features = self.text_bank[source]  # each point its class's text embedding
            return replace(result, features=features,
                           logits=text_logits(features, self.text_bank).float(),
                           labels=PointLabels(label.astype(np.uint16),
                                              np.full(label.size, 0.75, np.float32)))

    return IntensityPredictor(params.model_path, backend="torch", device="cpu")


def _blob(rng: np.random.Generator, center: tuple[float, float], size: tuple[float, float, float],
          n: int, cls: int) -> np.ndarray:
    pts = np.zeros(n, CLOUD)
    for axis, c, s in (("x", center[0], size[0]), ("y", center[1], size[1]), ("z", 0.0, size[2])):
        pts[axis] = c + rng.uniform(-s / 2, s / 2, n) if axis != "z" else rng.uniform(0, s, n)
    pts["intensity"] = 10.0 * cls
    return pts


def _street(stamp_ns: int) -> Any:
    from clip2scene_ros.codecs import encode_pointcloud2
    from clip2scene_ros.codecs.messages import RclpyFactory

    rng = np.random.default_rng(stamp_ns % 1000)
    road = np.zeros(800, CLOUD)
    road["x"], road["y"] = rng.uniform(-20, 20, 800), rng.uniform(-8, 8, 800)
    road["z"] = -0.3  # below the objects: road points never touch them
    cloud = np.concatenate([road, _blob(rng, (10.0, 2.0), (4.2, 1.8, 1.5), 600, 1),
                            _blob(rng, (-12.0, -3.0), (4.0, 1.8, 1.4), 450, 1),
                            _blob(rng, (5.0, -4.0), (0.6, 0.6, 1.7), 80, 2)])
    return encode_pointcloud2(cloud, stamp_ns=stamp_ns, frame_id="lidar",
                              factory=RclpyFactory())


@pytest.fixture
def ros(ros: Any) -> Any:
    """The shared rclpy context; these tests need open_clip too."""
    if not HAS_OPEN_CLIP:
        pytest.skip("open_clip is not installed")
    return ros


class Rig:
    """The node with intensity labels, and a peer publishing street clouds and listening."""

    def __init__(self, ros: Any, bundle: Path, **params: Any) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from clip2scene_ros.node.node import Clip2SceneNode

        values = {"model_path": str(bundle), "lidar_topic": "/in", "input_reliability":
                  "reliable", "diagnostics_period_s": 0.2, "publish_legend": False,
                  "publish_objects": True, "clip_model": "tiny-vit", "clip_pretrained": "random",
                  "objects_budget_ms": 60_000.0, **params}
        torch.manual_seed(0)  # the random CLIP's weights
        self.node = Clip2SceneNode(intensity_predictor, context=ros, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        self.objects = self.node.pipeline.objects
        self.peer = rclpy.create_node("peer", context=ros)
        self.pub = self.peer.create_publisher(
            PointCloud2, "/in", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.labels: list[Any] = []
        self.markers: list[Any] = []
        self.diagnostics: list[Any] = []
        self.sent: set[int] = set()
        self.peer.create_subscription(PointCloud2, LABELS, self.labels.append, 10)
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append,
                                      10)
        self.executor = SingleThreadedExecutor(context=ros)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.stamp = 100 * S

    def listen_objects(self) -> None:
        from visualization_msgs.msg import MarkerArray

        from clip2scene_ros.node.pipeline import qos

        self.peer.create_subscription(MarkerArray, OBJECTS, self.markers.append,
                                      qos("reliable", 1))
        assert self.spin(lambda: self.objects.publisher.get_subscription_count() > 0)

    def tick(self) -> None:
        self.stamp += S // 10
        self.sent.add(self.stamp)
        self.pub.publish(_street(self.stamp))

    def spin(self, done: Callable[[], bool], timeout: float = 30.0, ticking: bool = False
             ) -> bool:
        end = time.monotonic() + timeout
        next_tick = time.monotonic()
        while time.monotonic() < end and not done():
            if ticking and time.monotonic() >= next_tick:
                self.tick()
                next_tick += 0.3
            self.executor.spin_once(timeout_sec=0.02)
        return done()

    def processed(self) -> int:
        return self.node.health.frames["processed"]

    def diagnostic_values(self) -> dict[str, str]:
        if not self.diagnostics:
            return {}
        return {kv.key: kv.value for kv in self.diagnostics[-1].status[0].values}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()


def _split(array: Any) -> tuple[Any, list[Any], list[Any]]:
    from clip2scene_ros.node.objects import BOX_NS, TEXT_NS

    first, *rest = array.markers
    return (first, [m for m in rest if m.ns == BOX_NS], [m for m in rest if m.ns == TEXT_NS])


@needs_ros
def test_boxes_and_texts_for_subscribers_only(ros: Any, bundle: Path) -> None:
    from visualization_msgs.msg import Marker

    from clip2scene_ros.codecs.messages import stamp_to_ns

    # a huge ensemble weight: the network's pooled classes decide, so the names are known
    rig = Rig(ros, bundle, objects_ensemble_weight=1e4)
    pipeline = rig.node.pipeline
    try:
        assert rig.spin(lambda: rig.pub.get_subscription_count() > 0)
        assert rig.spin(lambda: len(rig.labels) >= 2, ticking=True)
        assert pipeline.work["objects"] == 0 and rig.objects.counts["passes"] == 0  # nobody asked

        rig.listen_objects()
        assert rig.spin(lambda: bool(rig.markers), ticking=True)
        clear, boxes, texts = _split(rig.markers[-1])
        assert clear.action == Marker.DELETEALL
        assert clear.header.frame_id == "lidar" and stamp_to_ns(clear.header.stamp) in rig.sent
        assert len(boxes) == len(texts) == 3 and len(rig.markers[-1].markers) == 7
        assert [m.text for m in texts] == ["car p=1.00", "car p=1.00", "pedestrian p=1.00"]
        for box in boxes:
            assert box.type == Marker.LINE_LIST and len(box.points) == 24
            assert box.header == clear.header and box.lifetime.sec == 1
        # largest first: the 600-point car at x = 10, 4.2 m long
        xs = [p.x for p in boxes[0].points]
        assert 7.5 < min(xs) < 8.2 and 11.8 < max(xs) < 12.5
        assert texts[2].pose.position.z > 1.7  # above the pedestrian
        assert (texts[0].color.r, texts[0].color.b) == (0.0, pytest.approx(142 / 255))
        # the pass's counters reach the diagnostics (their meaning: test_pointclip_objects.py)
        assert rig.spin(lambda: int(rig.diagnostic_values().get("objects_classified", 0)) >= 3)
        values = rig.diagnostic_values()
        assert values["objects_ensemble"] == "weight 10000.0" and values["objects_mode"] == \
            "every_frame"
        assert re.fullmatch(r"\d\.\d{3} \(\d+ of \d+ objects\)", values["objects_agreement"])
    finally:
        rig.close()


def test_markers_of_objects_left_to_the_segmentation_are_half_transparent() -> None:
    if not HAS_RCLPY:
        pytest.skip("rclpy (ROS 2 wheels) is not installed")
    from std_msgs.msg import Header

    from clip2scene_ros.node.objects import object_markers
    from clip2scene_ros.pointclip.object_pass import ObjectResult
    from clip2scene_ros.pointclip.objects import ObjectInstance, oriented_box

    xyz = np.random.default_rng(0).uniform(0, 2, (20, 3))
    obj = ObjectInstance(1, np.arange(20), xyz.astype(np.float32), oriented_box(xyz))
    header = Header(frame_id="lidar")
    markers = object_markers(header, [ObjectResult(obj, "car p=0.90", (0, 0, 142), True),
                                      ObjectResult(obj, "car (3D) p=0.75", (0, 0, 142), False)],
                             lifetime_s=0)
    clear, *rest = markers.markers
    assert clear.header == header and len(rest) == 4
    assert [m.color.a for m in rest] == [1.0, 1.0, 0.5, 0.5]
    assert [m.text for m in rest if m.text] == ["car p=0.90", "car (3D) p=0.75"]
    assert all(m.lifetime.sec == 0 and m.header == header for m in rest)


@needs_ros
def test_on_demand_service_classifies_the_next_frame_once(ros: Any, bundle: Path) -> None:
    from std_srvs.srv import Trigger

    rig = Rig(ros, bundle, objects_mode="on_demand")
    try:
        rig.listen_objects()
        assert rig.spin(lambda: rig.processed() >= 2, ticking=True)  # labels flow...
        assert rig.objects.counts["passes"] == 0 and not rig.markers  # ...objects wait

        client = rig.peer.create_client(Trigger, "/clip2scene_node/classify_objects")
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(Trigger.Request())
        assert rig.spin(future.done)
        answer = future.result()
        assert answer.success and answer.message.startswith("scheduled") and OBJECTS in \
            answer.message

        assert rig.spin(lambda: bool(rig.markers), ticking=True)
        processed = rig.processed()
        assert rig.spin(lambda: rig.processed() >= processed + 3, ticking=True)
        assert rig.objects.counts["passes"] == 1 and len(rig.markers) == 1
        _, boxes, texts = _split(rig.markers[0])
        assert len(boxes) == 3 and boxes[0].lifetime.sec == 0  # kept until the next answer
        assert all(re.fullmatch(r"(car|pedestrian) p=[01]\.\d\d", m.text) for m in texts)
    finally:
        rig.close()


@needs_ros
def test_object_classes_must_be_in_the_vocabulary(ros: Any, bundle: Path) -> None:
    from rclpy.parameter import Parameter

    from clip2scene_ros.node.node import Clip2SceneNode

    base = {"model_path": str(bundle), "lidar_topic": "/in", "publish_objects": True,
            "clip_model": "tiny-vit", "clip_pretrained": "random"}
    for extra, key in (({"objects_classes": ["tree"]}, "objects_classes"),
                       ({"objects_classes": ["road"], "objects_vocabulary": "no_such_vocab"},
                        "objects_vocabulary")):
        with pytest.raises(ConfigError) as info:
            Clip2SceneNode(context=ros, parameter_overrides=[
                Parameter(k, value=v) for k, v in {**base, **extra}.items()])
        assert info.value.key == key
