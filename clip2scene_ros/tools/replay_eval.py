"""``clip2scene replay-eval``: the node in its own process, fed by a bag replay, scored.

What a vehicle would see, end to end: the node runs as a separate process on simulated time,
``clip2scene replay`` publishes the bag (clouds, images, ``/clock``) over DDS, and this process
records every labelled cloud the node publishes (to an mcap bag) and scores it against the
bag's ground truth by header stamp. A bag without ground truth (no label topic, as most
recordings) is replayed all the same: mIoU is null, and the report still shows the predictions
from above and over a camera image. Latency is measured outside the node, from the moment a
cloud is published to the moment its labelled cloud arrives (both DDS hops included); frames
that never come back (dropped as stale by the node's depth-1 mailbox, or lost by DDS) count as
dropped.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import PointCloud2

from ..bag.reader import BagReader
from ..bag.writer import BagWriter
from ..codecs import decode_pointcloud2
from ..errors import MessageError
from ..frame import Frame
from ..health import latency_summary
from ..models.bundle import load_bundle
from .replay import replay

OUTPUT_TOPIC = "/clip2scene_node/output/labels"
POINTCLOUD2 = "sensor_msgs/msg/PointCloud2"
TRANSPORTS_ENV = "FASTDDS_BUILTIN_TRANSPORTS"


def cdr_stamp_ns(raw: bytes | memoryview) -> int:
    """Header stamp of a serialized message that starts with ``std_msgs/Header`` (no decode)."""
    little = raw[1] & 1  # CDR encapsulation: 0x0001 little-endian, 0x0000 big-endian
    sec, nanosec = struct.unpack_from("<iI" if little else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def _ground_truth(bag: Path) -> tuple[str, dict[int, Frame], Frame | None]:
    """The LiDAR topic, the labelled frames by stamp (images dropped) and one frame with
    cameras for the report's overlay."""
    reader = BagReader(bag)
    frames: dict[int, Frame] = {}
    with_camera = None
    for frame in reader.frames():
        if frame.labels is None:
            continue
        if with_camera is None and frame.cameras:
            with_camera = frame
        frames[frame.stamp_ns] = replace(frame, cameras=())
    return reader.topics.lidar, frames, with_camera


def _decode_output(raw: bytes, index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(N, 3)`` points and ``(N,)`` labels of a labelled cloud; None (and one line on stderr)
    if it does not decode."""
    try:
        cloud = decode_pointcloud2(deserialize_message(raw, PointCloud2))
        xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float32)
        return xyz, np.asarray(cloud["label"], np.int64)
    except (MessageError, ValueError) as exc:  # ValueError: a cloud without those fields
        print(f"replay-eval: output {index} does not decode ({exc})", file=sys.stderr)
        return None


def _prediction_sample(bag: Path, received: list[tuple[int, bytes]]
                       ) -> tuple[Frame, np.ndarray, int] | None:
    """The figures' frame for a bag without ground truth, its predicted labels (the model's
    class indices) and its position among the outputs: the first frame of the bag that has a
    camera and came back from the node (read again, images and all), else the first labelled
    cloud's own points; None when nothing came back that decodes."""
    outputs: dict[int, int] = {}
    for index, (_, raw) in enumerate(received):
        outputs.setdefault(cdr_stamp_ns(raw), index)
    for frame in BagReader(bag).frames():
        if frame.cameras and frame.stamp_ns in outputs:
            index = outputs[frame.stamp_ns]
            decoded = _decode_output(received[index][1], index)
            if decoded is not None and decoded[1].shape[0] == frame.num_points:
                return frame, decoded[1], index  # point for point, as when scoring
    for index, (_, raw) in enumerate(received):
        decoded = _decode_output(raw, index)
        if decoded is not None:
            xyz, labels = decoded
            finite = np.isfinite(xyz).all(axis=1)
            return Frame(cdr_stamp_ns(raw), "", xyz[finite]), labels[finite], index
    return None


def _start_node(model: Path, lidar: str, domain: int, log: Path, params: dict[str, str],
                extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # no MALLOC_* here: the node applies its glibc malloc settings itself (runtime/malloc.py)
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), TRANSPORTS_ENV: "LARGE_DATA",
           **(extra_env or {})}
    settings = {"model_path": str(model), "lidar_topic": lidar, "use_sim_time": "true", **params}
    cmd = [sys.executable, "-m", "clip2scene_ros.node.node", "--ros-args"]
    for key, value in settings.items():
        cmd += ["-p", f"{key}:={value}"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


class NodeProcess:
    """``clip2scene_node`` in its own process and a listener node in this one, on a private
    ROS domain (replay-eval and soak share it).

    Subscribe with :meth:`subscribe_output` (or anything else on :attr:`listener`), then
    :meth:`start` spins the listener in a thread and waits for the node to come up;
    :meth:`close` (or leaving the ``with``) stops the node with SIGINT and shuts the listener's
    context down. :attr:`diagnostics` holds the node's latest diagnostic values; ``env`` adds
    to the node process's environment.
    """

    def __init__(self, model: Path, lidar: str, log: Path, params: dict[str, str],
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        domain = random.Random().randrange(100, 200)  # keep clear of other ROS graphs on the host
        self.process = _start_node(model, lidar, domain, log, params, env)
        self.diagnostics: dict[str, str] = {}
        self.on_diagnostics: Callable[[dict[str, str]], None] | None = None
        # Both ends must use the same Fast DDS transports: a LARGE_DATA participant (TCP + SHM
        # for unicast) and a default one (UDP) see each other's multicast but never complete
        # discovery. The participant is created with the first node, so the variable stays set
        # until then.
        previous = os.environ.get(TRANSPORTS_ENV)
        os.environ[TRANSPORTS_ENV] = "LARGE_DATA"
        self.context = rclpy.context.Context()
        try:
            rclpy.init(args=[], context=self.context, domain_id=domain)
            self.listener = Node("clip2scene_replay_eval", context=self.context)
        except BaseException:
            self._stop_node()
            if self.context.ok():
                rclpy.shutdown(context=self.context)
            raise
        finally:
            if previous is None:
                os.environ.pop(TRANSPORTS_ENV)
            else:
                os.environ[TRANSPORTS_ENV] = previous
        self.listener.create_subscription(DiagnosticArray, "/diagnostics", self._diagnostics, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.listener)
        self._done = threading.Event()
        self._spinner = threading.Thread(target=self._spin, daemon=True)

    def _diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith("clip2scene_node"):
                self.diagnostics.update({kv.key: kv.value for kv in status.values})
                if self.on_diagnostics is not None:
                    self.on_diagnostics(self.diagnostics)

    def _spin(self) -> None:
        while not self._done.is_set():
            self.executor.spin_once(timeout_sec=0.02)

    def subscribe_output(self, callback: Callable[[bytes], None]) -> None:
        """``callback(raw)`` for each labelled cloud (serialized: the caller decodes if needed)."""
        self.listener.create_subscription(
            PointCloud2, OUTPUT_TOPIC, callback,
            QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE), raw=True)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def start(self, timeout_s: float = 60.0) -> None:
        """Spin the listener; return once the node publishes its output (RuntimeError if not)."""
        self._spinner.start()
        deadline = time.monotonic() + timeout_s
        while not self.listener.count_publishers(OUTPUT_TOPIC):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"clip2scene_node did not come up (exit "
                                   f"{self.process.poll()}):\n{self.log_tail()}")
            time.sleep(0.1)
        time.sleep(1.0)  # let discovery settle both ways before the first cloud

    def _stop_node(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self._done.set()
        if self._spinner.is_alive():
            self._spinner.join(5)
        self._stop_node()
        self.executor.shutdown()
        self.listener.destroy_node()
        rclpy.shutdown(context=self.context)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay_eval(bag: str | Path, model: str | Path, *, vocab: str | Path | None = None,
                rate: float = 1.0, report_dir: str | Path | None = None,
                output_bag: str | Path | None = None, params: dict[str, str] | None = None,
                startup_timeout_s: float = 60.0, settle_s: float = 10.0) -> dict[str, Any]:
    """Replay ``bag`` through ``clip2scene_node`` running ``model``; returns the JSON result.

    With ``report_dir`` the figures are written there and their paths printed: the scored ones
    (:func:`~clip2scene_ros.figures.write_report`) when the bag has ground truth, else
    the predictions of one frame (preferably one with a camera) from above and over its image,
    in the model's own classes and colours.
    """
    from ..figures import EvalSample
    from ..metrics import ConfusionMatrix
    from ..training.evaluate import map_predictions, prediction_map

    bag, model = Path(bag), Path(model)
    bundle_vocab = load_bundle(model).spec.vocabulary
    lidar, truth, camera_frame = _ground_truth(bag)
    vocabulary = None
    if truth:  # without ground truth: latency and drops only (miou null)
        from ..teacher.text_bank import resolve_vocabulary

        vocabulary = resolve_vocabulary(vocab or bundle_vocab.name)
        table = prediction_map(bundle_vocab.classes, vocabulary)
    work = Path(report_dir) if report_dir is not None else bag.parent / f"{bag.name}-replay-eval"
    work.mkdir(parents=True, exist_ok=True)
    received: list[tuple[int, bytes]] = []
    sent: dict[int, int] = {}

    def on_output(raw: bytes) -> None:
        received.append((time.monotonic_ns(), raw))

    def on_publish(topic: str, raw: bytes) -> None:
        if topic == lidar:
            sent[cdr_stamp_ns(raw)] = time.monotonic_ns()

    with NodeProcess(model, lidar, work / "node.log", params or {}) as session:
        session.subscribe_output(on_output)
        session.start(startup_timeout_s)
        played = replay(bag, rate=rate, context=session.context, on_publish=on_publish,
                        wait_for=[lidar])
        end = time.monotonic() + settle_s
        while time.monotonic() < end and len(received) < len(sent):
            time.sleep(0.1)
        diagnostics = dict(session.diagnostics)

    matrix = ConfusionMatrix(len(vocabulary.classes)) if vocabulary is not None else None
    latencies: list[float] = []
    scored = 0
    sample = None
    out_bag = Path(output_bag) if output_bag is not None else work / "outputs"
    if out_bag.exists():
        raise FileExistsError(f"{out_bag} exists; choose another --output-bag")
    with BagWriter(out_bag) as writer:
        for wall_ns, raw in received:
            stamp = cdr_stamp_ns(raw)
            writer.write_raw(OUTPUT_TOPIC, POINTCLOUD2, raw, stamp)
            if stamp in sent:
                latencies.append((wall_ns - sent[stamp]) * 1e-6)
            frame = truth.get(stamp)
            if frame is None or frame.labels is None or matrix is None or vocabulary is None:
                continue  # (the truth holds labelled frames only)
            labels = decode_pointcloud2(deserialize_message(raw, PointCloud2))["label"]
            if labels.shape[0] != frame.num_points:
                continue  # the output is point for point the input: anything else is not ours
            pred = map_predictions(labels, table)
            target = vocabulary.map_labels(frame.labels)
            matrix.update(pred, target)
            scored += 1
            if camera_frame is not None and stamp == camera_frame.stamp_ns:
                sample = EvalSample(camera_frame, pred, target, scored - 1)
            elif sample is None:
                sample = EvalSample(frame, pred, target, scored - 1)
    result: dict[str, Any] = (matrix.to_dict(vocabulary.names) if matrix is not None and
                              vocabulary is not None else {"miou": None})
    result.update({
        "bag": str(bag), "model": str(model), "rate": rate,
        "vocabulary": vocabulary.name if vocabulary is not None else None,
        "frames": scored, "frames_in": len(sent), "frames_out": len(received),
        "frames_scored": scored, "dropped": len(sent) - len({cdr_stamp_ns(r)
                                                              for _, r in received}),
        "latency_ms": latency_summary(latencies) if latencies else dict.fromkeys(
            ("p50", "p95", "p99", "max")), "node_diagnostics": diagnostics,
        "replay": {"messages": played.messages, "wall_s": played.wall_s,
                   "unplayable": played.unplayable},
        "output_bag": str(out_bag), "node_log": str(work / "node.log"),
    })
    if report_dir is not None and vocabulary is not None:
        from ..figures import write_report

        result["report"] = [str(p) for p in write_report(work, result, vocabulary, sample)]
    elif report_dir is not None:  # no ground truth: the predictions of one frame
        from ..figures import write_prediction_report

        preview = _prediction_sample(bag, received)
        if preview is not None:
            frame, pred, index = preview
            result["report"] = [str(p) for p in write_prediction_report(
                work, frame, pred, np.asarray(bundle_vocab.palette), bundle_vocab.classes,
                index)]
    if result.get("report"):
        kind = "scored" if matrix is not None else "predictions only, no ground truth"
        print(f"replay-eval figures ({kind}): {', '.join(result['report'])}", flush=True)
    return result
