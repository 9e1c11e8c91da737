"""The node's own handling of a message: its :class:`Pipeline`, in-process, without DDS.

The Pipeline is built as ``clip2scene_node`` builds it (a tiny model bundle, one camera ``cam``
with extrinsics from a calibration file, intrinsics from CameraInfo). Each fuzz message is first
serialized to CDR and deserialized as the rclpy message a subscription would hand the callback.
The publishers are recorders reporting one subscriber (that is what makes ``_process`` label a
frame and decode the image for the overlay). There is no worker thread: after each message the
driver does what the worker loop does (poll the sync as if ``camera_timeout_s`` had passed, take
the mailbox, ``_process``), but lets exceptions through, so one the worker would swallow as a
"failed" frame is a crash here.

After every case a good set (CameraInfo, image, cloud) must be processed with the camera used:
a bad message must be counted, by kind, in ``Health`` and must not stop the next good one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..codecs import encode_image, encode_pointcloud2, model_to_camera_info
from ..codecs.messages import RclpyFactory, rosbags_factory, stamp_to_ns
from ..geometry.camera_model import CameraModel
from .common import Case
from .images import CAMERA_SIZE

CAMERA = "cam"
KINDS = {"pointcloud2": "PointCloud2", "image": "Image", "compressed_image": "CompressedImage",
         "camera_info": "CameraInfo"}
LIDAR_TO_CAMERA = [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 1.0]]
#: Good messages are stamped from here on, one second apart: after every fuzzed "now" stamp
#: (<= 1.8e9 s), so they never pair with a fuzzed image by accident.
FIRST_STAMP_NS = 1_850_000_000 * 10**9
CLOUD = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                  "offsets": [0, 4, 8, 12], "itemsize": 16})


class _Recorder:
    """A publisher with one subscriber that keeps only a count."""

    def __init__(self) -> None:
        self.count = 0

    def get_subscription_count(self) -> int:
        return 1

    def publish(self, msg: Any) -> None:
        self.count += 1


@dataclass(frozen=True)
class NodeOutcome:
    """``verdict``: counted, processed, used, stored, size_mismatch or not_decoded; ``problem``:
    a broken expectation (a bad message not counted, a good one dropped), else None."""

    verdict: str
    problem: str | None = None
    recovery_ticks: int = 1


def _tiny_bundle(workdir: Path) -> Path:
    from ..models.spvcnn import save_random_bundle

    return save_random_bundle(workdir / "bundle", palette=((10, 20, 30), (200, 0, 0)))


class NodeDriver:
    """A Pipeline fed message by message; :meth:`run` handles one fuzz case."""

    def __init__(self, workdir: Path, domain_id: int = 87) -> None:
        import rclpy
        import torch
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

        from ..config import load_config
        from ..node.pipeline import Pipeline
        from ..node_params import NodeParams

        # One intra-op thread: the clouds are tiny, and on a busy machine torch's extra threads
        # only spin-wait (as in test/conftest.py); restored by close().
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._deserialize = deserialize_message
        self._classes = {"sensor_msgs/msg/PointCloud2": PointCloud2,
                         "sensor_msgs/msg/Image": Image,
                         "sensor_msgs/msg/CompressedImage": CompressedImage,
                         "sensor_msgs/msg/CameraInfo": CameraInfo}
        calibration = workdir / "calibration.yaml"
        calibration.write_text(yaml.safe_dump({"cameras": {CAMERA: {
            "lidar_to_camera": LIDAR_TO_CAMERA}}}))
        params = load_config(NodeParams, {
            "model_path": str(_tiny_bundle(workdir)), "device": "cpu",
            "camera_topics": [f"/{CAMERA}/image_raw"], "calibration_file": str(calibration),
            "publish_overlay": True, "publish_legend": False, "publish_latency": False,
            "log_throttle_s": 3600.0})  # one warning per kind, not one per case
        self.context = rclpy.context.Context()
        rclpy.init(args=[], context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("clip2scene_fuzz", context=self.context,
                                      enable_rosout=False, start_parameter_services=False)
        self.pipeline = Pipeline(self.node, params)
        self.pipeline.output = _Recorder()
        self.pipeline.overlay = _Recorder()
        self.factory = RclpyFactory()
        width, height = CAMERA_SIZE
        K = np.array([[20.0, 0.0, width / 2], [0.0, 20.0, height / 2], [0.0, 0.0, 1.0]])
        self.good_info = model_to_camera_info(CameraModel(width=width, height=height, K=K),
                                              stamp_ns=1, frame_id="cam_optical",
                                              factory=self.factory)
        self.stamp_ns = FIRST_STAMP_NS
        self.rng = np.random.default_rng(0)
        for _ in range(3):  # warm up: first frames allocate the model's buffers
            self.recover()

    def close(self) -> None:
        import rclpy
        import torch

        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        torch.set_num_threads(self._threads)

    # --- messages ---------------------------------------------------------------------------
    def to_rclpy(self, case: Case) -> Any:
        """The case's message as a subscription delivers it: CDR, then the rclpy class."""
        raw = rosbags_factory().typestore.serialize_cdr(case.msg, case.type_name)
        return self._deserialize(bytes(raw), self._classes[case.type_name])

    def _cloud(self, stamp_ns: int) -> Any:
        cloud = np.zeros(50, CLOUD)
        cloud["x"] = self.rng.uniform(2.0, 20.0, 50)  # ahead of the camera
        cloud["y"] = self.rng.uniform(-2.0, 2.0, 50)
        cloud["z"] = self.rng.uniform(-1.0, 1.0, 50)
        cloud["intensity"] = self.rng.uniform(0.0, 100.0, 50)
        return encode_pointcloud2(cloud, stamp_ns=stamp_ns, frame_id="lidar",
                                  factory=self.factory)

    def _image(self, stamp_ns: int) -> Any:
        width, height = CAMERA_SIZE
        rgb = self.rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return encode_image(rgb, "rgb8", stamp_ns=stamp_ns, frame_id="cam_optical",
                            factory=self.factory)

    # --- the worker's part ------------------------------------------------------------------
    def _drain(self) -> None:
        """What the worker loop does once ``camera_timeout_s`` has passed, exceptions let out."""
        p = self.pipeline
        with p._sync_lock:
            timed_out = p.sync.poll(time.monotonic_ns() + p.sync.timeout_ns + 1)
        p._deliver(timed_out)
        with p._lock:
            item, p._slot = p._slot, None
            p._wake.clear()
        if item is not None:
            p._process(item)

    def _counts(self, kind: str) -> tuple[int, int]:
        health = self.pipeline.health
        return health.bad[kind], health.frames["processed"]

    def _tick(self, cloud_stamp_ns: int | None = None, image: bool = True) -> None:
        """One good sweep: an image (if ``image``) and a cloud of one stamp, then the worker."""
        self.stamp_ns += 10**9
        stamp = self.stamp_ns if cloud_stamp_ns is None else cloud_stamp_ns
        if image:
            self.pipeline.on_image(CAMERA, self._image(stamp))
        self.pipeline.on_cloud(self._cloud(stamp))
        self._drain()

    def recover(self) -> tuple[str | None, int]:
        """Good CameraInfo, image and cloud: (problem or None, ticks until the camera was used).

        A second tick is allowed: after a jump in time the sync resets on the new timeline's
        first cloud, which costs that cloud an image that arrived just before it.
        """
        self.pipeline.on_camera_info(CAMERA, self.good_info)
        for tick in (1, 2):
            _, before = self._counts("PointCloud2")
            self._tick()
            if self._counts("PointCloud2")[1] != before + 1:
                return f"a good cloud was not processed (tick {tick})", tick
            if self.pipeline.camera_state.get(CAMERA) == "ok":
                return None, tick
        return f"camera not used after recovery: {self.pipeline.camera_state.get(CAMERA)}", 2

    # --- one case ---------------------------------------------------------------------------
    def run(self, type_key: str, case: Case, codec_verdict: str) -> NodeOutcome:
        """Hand the case to the node; ``codec_verdict`` (accepted/rejected) is what to expect."""
        msg = self.to_rclpy(case)
        kind = KINDS[type_key]
        bad0, done0 = self._counts(kind)
        rejected = codec_verdict == "rejected"
        stamp = stamp_to_ns(msg.header.stamp)
        if type_key == "pointcloud2":
            self.pipeline.on_cloud(msg)
            self._drain()
            verdict = "counted" if rejected or stamp <= 0 else "processed"
            problem = self._expect(kind, bad0, done0, bad=int(verdict == "counted"),
                                   done=int(verdict == "processed"))
        elif type_key == "camera_info":
            self.pipeline.on_camera_info(CAMERA, msg)
            verdict = "counted" if rejected else "stored"
            problem = self._expect(kind, bad0, done0, bad=int(rejected), done=0)
            if not rejected and self.pipeline.camera_models[CAMERA].width != msg.width:
                problem = problem or "an accepted CameraInfo was not stored"
            self._tick()  # a frame with whatever model the node now holds
            problem = problem or self._expect(kind, bad0, done0, bad=int(rejected), done=1)
        else:
            verdict, problem = self._image_case(kind, msg, stamp, rejected, bad0, done0)
        recovery, ticks = self.recover()
        return NodeOutcome(verdict, problem or recovery, ticks)

    def _image_case(self, kind: str, msg: Any, stamp: int, rejected: bool, bad0: int,
                    done0: int) -> tuple[str, str | None]:
        self.pipeline.on_image(CAMERA, msg)
        if stamp <= 0:
            self._tick(image=False)
            return "counted", self._expect(kind, bad0, done0, bad=1, done=1)
        self._tick(cloud_stamp_ns=stamp, image=False)  # the cloud this image belongs to
        state = self.pipeline.camera_state.get(CAMERA, "")
        if state == "ok":
            verdict, consistent = "used", not rejected
        elif state.startswith("image malformed"):
            verdict, consistent = "counted", rejected
        elif state.startswith("image is"):
            verdict, consistent = "size_mismatch", not rejected
        else:  # not paired with the cloud: never decoded, so nothing to count
            verdict, consistent = "not_decoded", True
        problem = None if consistent else f"codec says {'rejected' if rejected else 'accepted'}" \
            f" but the node's camera state is {state!r}"
        return verdict, problem or self._expect(kind, bad0, done0, bad=int(verdict == "counted"),
                                                done=1)

    def _expect(self, kind: str, bad0: int, done0: int, *, bad: int, done: int) -> str | None:
        bad_now, done_now = self._counts(kind)
        if (bad_now - bad0, done_now - done0) == (bad, done):
            return None
        return (f"Health counted {bad_now - bad0} bad {kind} and {done_now - done0} processed "
                f"frames; expected {bad} and {done}")
