"""Cameras in the node: the ROS-free camera sync, then the node in-process over rclpy (image and
CompressedImage subscriptions, CameraInfo, the LiDAR-only fallback in time and in diagnostics,
the overlay and legend for subscribers only) and the lifecycle variant's transitions.

What happens to a synced set inside a frame (intrinsics, extrinsics, bad images, fusion, the
overlay's drawing) is the frame processor's, tested without rclpy in
``test_runtime_frame_processor.py``."""

from __future__ import annotations

import importlib.util
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from clip2scene_ros.bag.sync import SyncedSet
from clip2scene_ros.node.camera_sync import CameraSync, message_filters_available

HAS_RCLPY = importlib.util.find_spec("rclpy") is not None
needs_ros = pytest.mark.skipif(not HAS_RCLPY, reason="rclpy (ROS 2 wheels) is not installed")

S = 1_000_000_000  # ns per second
ENGINES = ["builtin", pytest.param("message_filters", marks=pytest.mark.skipif(
    not message_filters_available(), reason="message_filters (ROS 2 package) is not installed"))]


# --- the ROS-free sync ------------------------------------------------------------------------
def _sync(engine: str, cameras: tuple[str, ...] = ("front",), **kwargs: Any) -> CameraSync[str]:
    return CameraSync(list(cameras), kwargs.pop("slop_s", 0.05), kwargs.pop("timeout_s", 0.1),
                      engine=engine, **kwargs)  # type: ignore[arg-type]


def _names(sets: list[SyncedSet[str]]) -> list[tuple[str, dict[str, str], tuple[str, ...]]]:
    return [(s.reference, {k: m for k, (_, m) in s.matches.items()}, s.missing) for s in sets]


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_pairs_within_the_slop_only(engine: str) -> None:
    sync = _sync(engine)
    assert sync.engine_name == engine
    assert sync.add_image("front", 10 * S + 30_000_000, "img_a", now_ns=0) == []
    out = sync.add_cloud(10 * S, "cloud_a", now_ns=0)  # image 30 ms after: within 50 ms
    out += sync.poll(now_ns=S)
    assert _names(out) == [("cloud_a", {"front": "img_a"}, ())]
    out = sync.add_cloud(11 * S, "cloud_b", now_ns=2 * S)
    out += sync.add_image("front", 11 * S + 80_000_000, "img_b", now_ns=2 * S)  # 80 ms: too far
    out += sync.poll(now_ns=3 * S)
    assert _names(out) == [("cloud_b", {}, ("front",))]


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_timeout_goes_lidar_only_and_a_late_image_changes_nothing(engine: str) -> None:
    sync = _sync(engine, timeout_s=0.1)
    assert sync.add_cloud(5 * S, "cloud", now_ns=1000 * S) == []
    assert sync.poll(now_ns=1000 * S + 99_000_000) == []  # still waiting
    out = sync.poll(now_ns=1000 * S + 100_000_000)
    assert _names(out) == [("cloud", {}, ("front",))]  # LiDAR-only after the timeout
    # the late image of that stamp arrives: the cloud is gone, nothing is emitted twice
    assert sync.add_image("front", 5 * S, "late", now_ns=1000 * S + 200_000_000) == []
    assert sync.poll(now_ns=1001 * S) == []
    # and it serves the next cloud only if that one is within the slop of it
    out = sync.add_cloud(5 * S + 20_000_000, "next", now_ns=1001 * S) + sync.poll(1002 * S)
    assert _names(out) == [("next", {"front": "late"}, ())]


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_partial_sets_name_the_missing_camera(engine: str) -> None:
    sync = _sync(engine, cameras=("front", "back"))
    out = sync.add_image("front", 7 * S, "f", now_ns=0) + sync.add_cloud(7 * S, "c", now_ns=0)
    out += sync.poll(now_ns=S)  # "back" never sends
    assert _names(out) == [("c", {"front": "f"}, ("back",))]


def test_builtin_sync_emits_as_soon_as_every_camera_has_passed_the_cloud() -> None:
    sync = _sync("builtin", cameras=("front", "back"))
    assert sync.add_cloud(7 * S, "c", now_ns=0) == []
    assert sync.add_image("front", 7 * S + 10_000_000, "f", now_ns=0) == []  # back undecided
    out = sync.add_image("back", 7 * S - 20_000_000, "b0", now_ns=0)
    assert out == []  # back's image is before the cloud: a nearer one may still come
    out = sync.add_image("back", 7 * S + 90_000_000, "b1", now_ns=0)
    assert _names(out) == [("c", {"front": "f", "back": "b0"}, ())]  # b0 is the nearer


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_clock_jump_backwards_clears_the_state(engine: str) -> None:
    sync = _sync(engine, timeout_s=10.0)
    out = sync.add_image("front", 100 * S, "old_img", now_ns=0)
    out += sync.add_cloud(100 * S, "old", now_ns=0)
    assert _names(out) == [("old", {"front": "old_img"}, ())]
    assert sync.add_cloud(100 * S + 100_000_000, "waiting", now_ns=0) == []
    # the bag loops: an image from the start; the waiting cloud is flushed with what it has
    out = sync.add_image("front", 2 * S, "new_img", now_ns=1)
    assert _names(out) == [("waiting", {}, ("front",))] and sync.resets == 1
    out = sync.add_cloud(2 * S + 10_000_000, "new", now_ns=2) + sync.poll(now_ns=20 * S)
    assert _names(out) == [("new", {"front": "new_img"}, ())]
    # a cloud jumping back resets too; an image of the old timeline never pairs with the new
    sync.add_image("front", 3 * S, "x", now_ns=20 * S)
    out = sync.add_cloud(S // 2, "looped", now_ns=20 * S) + sync.poll(now_ns=40 * S)
    assert sync.resets == 2
    assert _names(out)[-1] == ("looped", {}, ("front",))


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_one_cloud_with_a_wild_stamp_costs_the_next_cloud_nothing(engine: str) -> None:
    """A cloud stamped an hour ahead, then the stream goes on: the image that came just before
    the next good cloud still pairs with it (only the cloud stream jumped)."""
    sync = _sync(engine, timeout_s=10.0)
    out = sync.add_image("front", 100 * S, "i0", now_ns=0) + sync.add_cloud(100 * S, "c0", 0)
    assert _names(out) == [("c0", {"front": "i0"}, ())]
    out = sync.add_cloud(3700 * S, "wild", now_ns=1) + sync.poll(now_ns=20 * S)
    assert sync.jumps["forward"] == 1 and _names(out) == [("wild", {}, ("front",))]
    out = sync.add_image("front", 100 * S + 100_000_000, "i1", now_ns=21 * S)
    out += sync.add_cloud(100 * S + 100_000_000, "c1", now_ns=21 * S)
    assert sync.jumps["back"] == 1 and sync.resets == 2
    assert _names(out) == [("c1", {"front": "i1"}, ())]


def test_sync_without_cameras_and_bad_input() -> None:
    sync: CameraSync[str] = CameraSync([], 0.05, 0.1, engine="builtin")
    assert _names(sync.add_cloud(S, "c", now_ns=0)) == [("c", {}, ())]  # straight through
    with pytest.raises(KeyError, match="unknown camera"):
        _sync("builtin").add_image("side", S, "i", now_ns=0)
    with pytest.raises(ValueError, match="unique"):
        CameraSync(["a", "a"], 0.05, 0.1)
    if not message_filters_available():
        with pytest.raises(ValueError, match="message_filters"):
            CameraSync(["a"], 0.05, 0.1, engine="message_filters")
        assert CameraSync(["a"], 0.05, 0.1).engine_name == "builtin"
    # a camera running while the LiDAR is silent keeps only a short buffer
    sync = _sync("builtin", buffer_size=3)
    for i in range(100):
        sync.add_image("front", S + i * 10_000_000, f"i{i}", now_ns=0)
    out = sync.add_cloud(S + 990_000_000, "c", now_ns=0) + sync.poll(now_ns=S)
    assert _names(out) == [("c", {"front": "i99"}, ())]
    assert len(sync._early["front"]) == 0


# --- the node ---------------------------------------------------------------------------------
CLOUD = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                  "offsets": [0, 4, 8, 12], "itemsize": 16})
WIDTH, HEIGHT = 96, 64
#: LiDAR (x forward, y left, z up) -> camera optical frame (z forward, x right, y down)
LIDAR_TO_CAMERA = [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 1.0]]
OUTPUT = "/clip2scene_node/output/labels"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    # clip_dim 32: tiny-vit's embedding size, for fusion
    return save_random_bundle(tmp_path_factory.mktemp("b") / "m", name="three",
                              classes=("road", "car", "tree"), clip_dim=32,
                              palette=((10, 20, 30), (200, 0, 0), (0, 200, 0)))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.yaml"
    path.write_text(yaml.safe_dump({"cameras": {"cam": {"lidar_to_camera": LIDAR_TO_CAMERA}}}))
    return path


def _camera_model() -> Any:
    from clip2scene_ros.geometry.camera_model import CameraModel

    K = np.array([[40.0, 0.0, WIDTH / 2], [0.0, 40.0, HEIGHT / 2], [0.0, 0.0, 1.0]])
    return CameraModel(width=WIDTH, height=HEIGHT, K=K)


def _cloud(stamp_ns: int, n: int = 600) -> Any:
    from clip2scene_ros.codecs import encode_pointcloud2
    from clip2scene_ros.codecs.messages import RclpyFactory

    rng = np.random.default_rng(stamp_ns % 1000)
    cloud = np.zeros(n, CLOUD)
    cloud["x"] = rng.uniform(-5, 20, n)  # most points ahead, where the camera looks
    cloud["y"] = rng.uniform(-10, 10, n)
    cloud["z"] = rng.uniform(-3, 3, n)
    cloud["intensity"] = rng.uniform(0, 100, n)
    return encode_pointcloud2(cloud, stamp_ns=stamp_ns, frame_id="lidar", factory=RclpyFactory())


def _image(stamp_ns: int, compressed: bool) -> Any:
    from clip2scene_ros.codecs import encode_compressed_image, encode_image
    from clip2scene_ros.codecs.messages import RclpyFactory

    rgb = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    if compressed:
        return encode_compressed_image(rgb, "png", stamp_ns=stamp_ns, frame_id="cam_optical",
                                       factory=RclpyFactory())
    return encode_image(rgb, "rgb8", stamp_ns=stamp_ns, frame_id="cam_optical",
                        factory=RclpyFactory())


class Rig:
    """A node (built by ``make``) and a peer publishing a camera rig at a fixed stamp step."""

    def __init__(self, ros: Any, node: Any, image_topic: str = "/cam/image_raw",
                 outputs: bool = True) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

        from clip2scene_ros.codecs import model_to_camera_info
        from clip2scene_ros.codecs.messages import RclpyFactory

        self.node = node
        self.peer = rclpy.create_node("peer", context=ros)
        self.compressed = image_topic.endswith("/compressed")
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = self.peer.create_publisher(PointCloud2, "/in", reliable)
        self.image_pub = self.peer.create_publisher(
            CompressedImage if self.compressed else Image, image_topic, reliable)
        self.info_pub = self.peer.create_publisher(CameraInfo, "/cam/camera_info", reliable)
        self.info = model_to_camera_info(_camera_model(), stamp_ns=1, frame_id="cam_optical",
                                         factory=RclpyFactory())
        self.outputs: list[Any] = []
        self.arrived: dict[int, float] = {}
        self.sent: dict[int, float] = {}
        self.diagnostics: list[Any] = []
        if outputs:
            self.peer.create_subscription(PointCloud2, OUTPUT, self._on_output, 10)
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append,
                                      10)
        self.executor = SingleThreadedExecutor(context=ros)
        self.executor.add_node(node)
        self.executor.add_node(self.peer)
        self.stamp = 100 * S

    def _on_output(self, msg: Any) -> None:
        from clip2scene_ros.codecs.messages import stamp_to_ns

        self.outputs.append(msg)
        self.arrived[stamp_to_ns(msg.header.stamp)] = time.monotonic()

    def spin(self, done: Callable[[], bool], timeout: float = 20.0,
             every: Callable[[], object] | None = None, period: float = 0.25) -> bool:
        end = time.monotonic() + timeout
        next_call = time.monotonic()
        while time.monotonic() < end and not done():
            if every is not None and time.monotonic() >= next_call:
                every()
                next_call += period
            self.executor.spin_once(timeout_sec=0.02)
        return done()

    def connect(self, *pubs: Any) -> None:
        pubs = pubs or (self.cloud_pub, self.image_pub, self.info_pub)
        assert self.spin(lambda: all(p.get_subscription_count() > 0 for p in pubs))

    def tick(self, camera: bool = True) -> None:
        """One sweep: CameraInfo and the image (if ``camera``), then the cloud, one stamp."""
        self.stamp += 100_000_000
        if camera:
            self.info_pub.publish(self.info)
            self.image_pub.publish(_image(self.stamp, self.compressed))
        self.sent[self.stamp] = time.monotonic()
        self.cloud_pub.publish(_cloud(self.stamp))

    def wait_for_camera_info(self) -> None:
        pipeline = self.node.pipeline
        assert self.spin(lambda: "cam" in pipeline.camera_models,
                         every=lambda: self.info_pub.publish(self.info))

    def last_status(self) -> Any:
        from diagnostic_msgs.msg import DiagnosticStatus

        return self.diagnostics[-1].status[0] if self.diagnostics else DiagnosticStatus()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()


def fake_tf2(translation: Callable[[str, str, int], tuple[float, float, float] | None]
             ) -> types.SimpleNamespace:
    """Just enough of ``tf2_ros`` for the node (the real one is not installable here):
    ``translation(target, source, stamp_ns)`` of a rotation-free transform, or None for no
    transform. Install it with ``monkeypatch.setitem(sys.modules, "tf2_ros", ...)``."""

    class TransformException(Exception):
        pass

    class Buffer:
        def lookup_transform(self, target: str, source: str, stamp: Any, timeout: Any = None
                             ) -> Any:
            from geometry_msgs.msg import TransformStamped

            xyz = translation(target, source, stamp.nanoseconds)
            if xyz is None:
                raise TransformException(f'"{source}" passed to lookupTransform does not exist')
            t = TransformStamped()
            t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = xyz
            t.transform.rotation.w = 1.0
            return t

    class TransformListener:
        def __init__(self, buffer: Any, node: Any) -> None:
            pass

        def unregister(self) -> None:
            pass

    return types.SimpleNamespace(TransformException=TransformException, Buffer=Buffer,
                                 TransformListener=TransformListener)


def _warn() -> bytes:
    from diagnostic_msgs.msg import DiagnosticStatus

    return DiagnosticStatus.WARN


def _params(bundle: Path, **extra: Any) -> list[Any]:
    from rclpy.parameter import Parameter

    values = {"model_path": str(bundle), "lidar_topic": "/in", "input_reliability": "reliable",
              "diagnostics_period_s": 0.2, **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


def _camera_params(bundle: Path, calibration: Path, topic: str = "/cam/image_raw",
                   **extra: Any) -> list[Any]:
    return _params(bundle, camera_topics=[topic], calibration_file=str(calibration),
                   sync_slop_s=0.05, camera_timeout_s=0.3, **extra)


@needs_ros
def test_camera_used_then_lidar_only_when_it_stops_then_used_again(
        ros: Any, bundle: Path, calibration: Path) -> None:
    from clip2scene_ros.node.node import Clip2SceneNode

    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_camera_params(
        bundle, calibration)))
    frames = rig.node.health.frames
    try:
        rig.connect()
        rig.wait_for_camera_info()
        assert rig.spin(lambda: frames["with_cameras"] >= 3, every=rig.tick)
        assert frames["lidar_only"] == 0 and rig.node.pipeline.camera_state == {"cam": "ok"}
        assert rig.spin(lambda: any(kv.key == "camera_cam" and kv.value == "ok"
                                    for kv in rig.last_status().values))
        assert "frames_lidar_only" not in {kv.key for kv in rig.last_status().values}

        # the camera stops: each cloud waits camera_timeout_s (0.3 s), then goes LiDAR-only
        count, stopped = len(rig.outputs), rig.stamp
        assert rig.spin(lambda: frames["lidar_only"] >= 3, every=lambda: rig.tick(camera=False))
        assert len(rig.outputs) > count  # labels keep coming
        waits = [rig.arrived[s] - rig.sent[s] for s in rig.arrived if s > stopped]
        assert waits and min(waits) >= 0.25 and max(waits) < 0.3 + 1.5
        assert "no image within" in rig.node.pipeline.camera_state["cam"]
        assert rig.spin(lambda: "LiDAR-only" in rig.last_status().message
                        and "camera cam missing" in rig.last_status().message
                        and {kv.key: kv.value for kv in rig.last_status().values}.get(
                            "frames_lidar_only") == str(frames["lidar_only"]))

        # the camera is back: its images are used again
        used = frames["with_cameras"]
        assert rig.spin(lambda: frames["with_cameras"] >= used + 2, every=rig.tick)
        assert rig.node.pipeline.camera_state == {"cam": "ok"}
    finally:
        rig.close()


@needs_ros
def test_compressed_image_topic(ros: Any, bundle: Path, calibration: Path) -> None:
    from clip2scene_ros.node.node import Clip2SceneNode

    topic = "/cam/image/compressed"
    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_camera_params(
        bundle, calibration, topic)), image_topic=topic)
    frames = rig.node.health.frames
    try:
        assert rig.node.pipeline.cameras[0].compressed
        rig.connect()
        rig.wait_for_camera_info()
        assert rig.spin(lambda: frames["with_cameras"] >= 2, every=rig.tick)
        assert frames["lidar_only"] == 0 and not rig.node.health.bad
    finally:
        rig.close()


@needs_ros
def test_fusion_is_refused_without_clip_weights_naming_both_options(
        ros: Any, bundle: Path, calibration: Path) -> None:
    from clip2scene_ros.errors import ConfigError
    from clip2scene_ros.node.node import Clip2SceneNode

    with pytest.raises(ConfigError) as info:  # no weights: refused at start-up
        Clip2SceneNode(context=ros, parameter_overrides=_camera_params(
            bundle, calibration, fusion=True))
    assert info.value.key == "clip_pretrained" and "clip_model" in str(info.value)
    assert "pretrained tag" in str(info.value) and "/path/to/weights" in str(info.value)


@needs_ros
def test_overlay_and_legend_only_for_subscribers(ros: Any, bundle: Path,
                                                 calibration: Path) -> None:
    from sensor_msgs.msg import Image
    from visualization_msgs.msg import MarkerArray

    from clip2scene_ros.codecs import decode_image
    from clip2scene_ros.codecs.messages import stamp_to_ns
    from clip2scene_ros.node.node import Clip2SceneNode
    from clip2scene_ros.node.pipeline import qos

    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_camera_params(
        bundle, calibration, publish_overlay=True)))
    pipeline = rig.node.pipeline
    try:
        rig.connect()
        rig.wait_for_camera_info()
        assert rig.spin(lambda: rig.node.health.frames["with_cameras"] >= 2, every=rig.tick)
        assert pipeline.work["overlay"] == 0 and pipeline.work["legend"] == 0  # nobody asked

        overlays: list[Image] = []
        legends: list[MarkerArray] = []
        rig.peer.create_subscription(Image, "/clip2scene_node/output/overlay", overlays.append,
                                     qos("reliable", 1))
        rig.peer.create_subscription(MarkerArray, "/clip2scene_node/output/legend",
                                     legends.append, qos("reliable", 1, latched=True))
        assert rig.spin(lambda: bool(overlays) and bool(legends), every=rig.tick)
        image = overlays[-1]
        assert (image.width, image.height, image.encoding) == (WIDTH, HEIGHT, "rgb8")
        assert image.header.frame_id == "cam_optical" and stamp_to_ns(image.header.stamp) in \
            rig.sent
        drawn = decode_image(image)
        palette = rig.node.predictor.palette
        colours = {tuple(c) for c in drawn.reshape(-1, 3).tolist()}
        assert colours & {tuple(c) for c in palette.tolist()}  # points in label colours
        assert [m.text for m in legends[0].markers] == ["road", "car", "tree"]
        assert pipeline.work["overlay"] >= 1 and pipeline.work["legend"] == 1
    finally:
        rig.close()


@needs_ros
def test_lifecycle_transitions(ros: Any, bundle: Path) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from clip2scene_ros.node.lifecycle_node import Clip2SceneLifecycleNode

    ok = TransitionCallbackReturn.SUCCESS
    node = Clip2SceneLifecycleNode(context=ros, parameter_overrides=_params(
        bundle, model_path="/nonexistent/bundle"))
    rig = Rig(ros, node)
    try:
        assert rig.peer.count_publishers(OUTPUT) == 0
        # a bad bundle fails configure and leaves the node unconfigured; fixed, it configures
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.pipeline is None
        assert node.set_parameters([Parameter("model_path", value=str(bundle))])[0].successful
        assert node.trigger_configure() == ok and node.pipeline is not None
        assert rig.peer.count_publishers(OUTPUT) == 0 and rig.cloud_pub.get_subscription_count() \
            == 0  # configured, not active: no topics yet

        assert node.trigger_activate() == ok
        rig.connect(rig.cloud_pub)
        assert rig.spin(lambda: len(rig.outputs) >= 2, every=lambda: rig.tick(camera=False))

        assert node.trigger_deactivate() == ok
        count = len(rig.outputs)
        end = time.monotonic() + 1.5
        rig.spin(lambda: time.monotonic() > end, every=lambda: rig.tick(camera=False))
        assert len(rig.outputs) == count  # no labels while inactive
        assert rig.cloud_pub.get_subscription_count() == 0

        assert node.trigger_activate() == ok  # and back
        assert rig.spin(lambda: len(rig.outputs) > count, every=lambda: rig.tick(camera=False))
        assert node.trigger_deactivate() == ok
        assert node.trigger_cleanup() == ok and node.pipeline is None  # the model is dropped
        assert node.trigger_shutdown() == ok
    finally:
        rig.close()
