"""The synthetic sample drive: a procedural street, a moving vehicle, its sensors, a rosbag2.

``write_sample_drive`` records what the vehicle's sensors see while it drives down the street
of ``build_scene(seed)``:

=================================  ===================================  ==========================
topic                              type                                 when
=================================  ===================================  ==========================
``/velodyne_points``               sensor_msgs/PointCloud2 (velodyne    every sweep (10 Hz),
                                   XYZIRT layout, frame ``velodyne``)   stamped mid-sweep
``/velodyne_labels``               sensor_msgs/PointCloud2 (``label``   same stamp, width and
                                   uint16, ids of sample_drive.yaml)    point order as the sweep
``/camera_front/image_raw``        sensor_msgs/Image rgb8               at the sweep stamp
``/camera_front/camera_info``      sensor_msgs/CameraInfo (plumb_bob)   with each image
``/camera_left/image/compressed``  sensor_msgs/CompressedImage jpeg     a quarter sweep earlier
``/camera_left/camera_info``       sensor_msgs/CameraInfo (plumb_bob)   with each image
``/tf_static``                     tf2_msgs/TFMessage (latched)         once: base_link ->
                                                                        velodyne, camera optics
``/tf``                            tf2_msgs/TFMessage map -> base_link  every 25 ms from the
                                                                        first sweep's start to
                                                                        the last one's end
=================================  ===================================  ==========================

The /tf samples include every LiDAR and camera stamp and every sweep boundary, so a consumer can
interpolate the pose of any firing inside a sweep. Everything is a function of ``seed``: the
same seed gives byte-identical message payloads (frames are generated in parallel threads, each
with its own random streams, and written in order).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..codecs import (
    encode_compressed_image,
    encode_image,
    encode_pointcloud2,
    model_to_camera_info,
)
from ..codecs.messages import MessageFactory, make_header, rosbags_factory
from ..errors import ConfigError
from ..geometry.transforms import matrix_to_quaternion
from .camera import SampleCamera, front_camera, left_camera, render
from .lidar import HDL32E, LABEL_DTYPE, LidarModel, scan
from .scene import EgoPath, Scene, build_scene

POINTS_TOPIC = "/velodyne_points"
LABELS_TOPIC = "/velodyne_labels"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"
MAP_FRAME = "map"
BASE_FRAME = "base_link"
LIDAR_FRAME = "velodyne"

#: Drive time 0 (the first sweep's start): 2023-11-14T22:13:20Z.
START_NS = 1_700_000_000 * 1_000_000_000
#: Period of the /tf samples.
TF_PERIOD_NS = 25_000_000
#: Street beyond the vehicle's last position: the LiDAR's range plus a margin.
STREET_AHEAD_M = 90.0
STORAGES = ("mcap", "sqlite3")


def _transform(translation: Sequence[float], yaw_deg: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    y = np.deg2rad(yaw_deg)
    T[:2, :2] = [[np.cos(y), -np.sin(y)], [np.sin(y), np.cos(y)]]
    T[:3, 3] = translation
    return T


@dataclass(frozen=True, eq=False)
class SampleRig:
    """The vehicle's sensors. The LiDAR sits on the roof, yawed by a realistic 0.6° mounting
    error, so a consumer that ignores the extrinsic rotation gets visibly wrong projections."""

    lidar: LidarModel = HDL32E
    lidar_extrinsic: np.ndarray = field(default_factory=lambda: _transform((1.2, 0.0, 1.9), 0.6))
    cameras: tuple[SampleCamera, ...] = field(default_factory=lambda: (front_camera(),
                                                                       left_camera()))

    def __post_init__(self) -> None:
        half = self.lidar.period / 2
        for cam in self.cameras:
            if not -half <= cam.time_offset_s < half:
                raise ValueError(f"camera {cam.name}: time_offset_s must lie within the sweep "
                                 f"(±{half} s), got {cam.time_offset_s}")  # fmt: skip
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")


def small_rig(azimuth_steps: int = 240, front: tuple[int, int] = (96, 54),
              left: tuple[int, int] | None = (80, 45)) -> SampleRig:
    """A fast rig for tests and quick runs: fewer LiDAR columns and small (width, height)
    cameras (``left=None``: the front camera only)."""
    cameras = (front_camera(*front),) + ((left_camera(*left),) if left else ())
    return SampleRig(lidar=LidarModel(azimuth_steps=azimuth_steps), cameras=cameras)


def camera_topics(camera: SampleCamera) -> tuple[str, str]:
    """(image topic, camera_info topic) of a rig camera."""
    image = f"/{camera.name}/image/compressed" if camera.compressed else f"/{camera.name}/image_raw"
    return image, f"/{camera.name}/camera_info"


@dataclass(frozen=True)
class SampleDriveInfo:
    """What ``write_sample_drive`` wrote."""

    path: Path
    frames: int
    seed: int
    storage: str
    topics: dict[str, int]  # messages per topic
    duration_s: float  # drive time covered by the sweeps
    seconds: float  # wall time taken to generate and write
    points_per_frame: tuple[int, float, int]  # min, mean, max

    def summary(self) -> str:
        lo, mean, hi = self.points_per_frame
        lines = [
            f"wrote {self.path} ({self.storage}, seed {self.seed}): {self.frames} frames, "
            f"{self.duration_s:.1f} s of driving, in {self.seconds:.1f} s",
            f"points per sweep: min {lo}, mean {mean:.0f}, max {hi}",
        ]
        lines += [f"  {topic}: {count} messages" for topic, count in self.topics.items()]
        return "\n".join(lines)


def lidar_stamp_ns(frame: int, lidar: LidarModel = HDL32E) -> int:
    """Header stamp of sweep ``frame``: mid-sweep, sweeps back to back from ``START_NS``."""
    period = round(lidar.period * 1e9)
    return START_NS + period // 2 + frame * period


def drive_time(stamp_ns: int) -> float:
    """Seconds since the first sweep's start (the scene's and the ego path's clock)."""
    return (stamp_ns - START_NS) / 1e9


def _tf_message(factory: MessageFactory, stamp_ns: int,
                transforms: Sequence[tuple[str, str, np.ndarray]]) -> Any:  # fmt: skip
    """A TFMessage of (parent, child, 4x4 parent <- child) transforms."""
    tf = []
    for parent, child, T in transforms:
        q = matrix_to_quaternion(T[:3, :3])
        tf.append(factory("geometry_msgs/msg/TransformStamped")(
            header=make_header(factory, stamp_ns, parent),
            child_frame_id=child,
            transform=factory("geometry_msgs/msg/Transform")(
                translation=factory("geometry_msgs/msg/Vector3")(
                    x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                rotation=factory("geometry_msgs/msg/Quaternion")(
                    x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
            ),
        ))  # fmt: skip
    return factory("tf2_msgs/msg/TFMessage")(transforms=tf)


def static_transforms(rig: SampleRig) -> list[tuple[str, str, np.ndarray]]:
    """(parent, child, transform) of the rig's /tf_static."""
    out = [(BASE_FRAME, LIDAR_FRAME, rig.lidar_extrinsic)]
    out += [(BASE_FRAME, cam.frame_id, cam.extrinsic) for cam in rig.cameras]
    return out


def _tf_stamps(frame: int, frames: int, rig: SampleRig) -> list[int]:
    """/tf stamps in sweep ``frame``'s window [start, end) (the last window includes its end):
    the TF_PERIOD_NS grid plus the sweep's own and its cameras' stamps."""
    period = round(rig.lidar.period * 1e9)
    start = START_NS + frame * period
    end = start + period + (1 if frame == frames - 1 else 0)
    stamp = lidar_stamp_ns(frame, rig.lidar)
    grid = range(start + (-(start - START_NS)) % TF_PERIOD_NS, end, TF_PERIOD_NS)
    cams = [stamp + round(c.time_offset_s * 1e9) for c in rig.cameras]
    return sorted({*grid, stamp, *cams})


#: Write order of messages with equal stamps: poses first, then what they locate.
_PRIORITY = {TF_TOPIC: 0, POINTS_TOPIC: 3, LABELS_TOPIC: 4}


def frame_messages(scene: Scene, path: EgoPath, rig: SampleRig, frame: int, frames: int,
                   seed: int, factory: MessageFactory) -> list[tuple[int, str, Any]]:  # fmt: skip
    """All messages of sweep ``frame`` as (stamp_ns, topic, message), in write order."""
    stamp = lidar_stamp_ns(frame, rig.lidar)
    out: list[tuple[int, int, str, Any]] = []
    for tf_stamp in _tf_stamps(frame, frames, rig):
        pose = path(drive_time(tf_stamp))
        out.append((tf_stamp, 0, TF_TOPIC,
                    _tf_message(factory, tf_stamp, [(MAP_FRAME, BASE_FRAME, pose)])))  # fmt: skip

    rng = np.random.default_rng([seed, frame, 0])
    sweep = scan(scene, path, stamp_s=drive_time(stamp), model=rig.lidar,
                 extrinsic=rig.lidar_extrinsic, rng=rng)  # fmt: skip
    out.append((stamp, 3, POINTS_TOPIC, encode_pointcloud2(
        sweep.cloud, stamp_ns=stamp, frame_id=LIDAR_FRAME, factory=factory)))  # fmt: skip
    labels = np.zeros(len(sweep.labels), dtype=LABEL_DTYPE)
    labels["label"] = sweep.labels
    out.append((stamp, 4, LABELS_TOPIC, encode_pointcloud2(
        labels, stamp_ns=stamp, frame_id=LIDAR_FRAME, factory=factory)))  # fmt: skip

    for index, cam in enumerate(rig.cameras):
        cam_stamp = stamp + round(cam.time_offset_s * 1e9)
        t = drive_time(cam_stamp)
        image = render(scene, path(t), cam, time_s=t,
                       rng=np.random.default_rng([seed, frame, 1 + index])).rgb  # fmt: skip
        image_topic, info_topic = camera_topics(cam)
        if cam.compressed:
            msg = encode_compressed_image(image, "jpeg", quality=90, stamp_ns=cam_stamp,
                                          frame_id=cam.frame_id, factory=factory)  # fmt: skip
        else:
            msg = encode_image(image, "rgb8", stamp_ns=cam_stamp, frame_id=cam.frame_id,
                               factory=factory)  # fmt: skip
        info = model_to_camera_info(cam.model, stamp_ns=cam_stamp, frame_id=cam.frame_id,
                                    factory=factory)  # fmt: skip
        out.append((cam_stamp, 1, info_topic, info))
        out.append((cam_stamp, 2, image_topic, msg))
    out.sort(key=lambda m: (m[0], m[1]))
    return [(s, topic, msg) for s, _, topic, msg in out]


def _prepare_out(out: Path) -> None:
    """Refuse to touch an existing non-empty path; make room for rosbags (which wants to create
    the directory itself)."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; the sample drive is never "
                                  "written over existing files, choose another --out")  # fmt: skip
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)


def _in_order(jobs: Iterator[Any], submit: Any, window: int) -> Iterator[Any]:
    """Results of ``submit(job)`` in job order, at most ``window`` jobs in flight."""
    pending: deque[Future[Any]] = deque()
    for job in jobs:
        pending.append(submit(job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_sample_drive(out: Path, frames: int = 60, seed: int = 0, *, storage: str = "mcap",
                       rig: SampleRig | None = None, workers: int | None = None
                       ) -> SampleDriveInfo:  # fmt: skip
    """Generate the sample drive and write it as a rosbag2 directory ``out`` (see module doc).

    ``frames`` LiDAR sweeps at 10 Hz; ``seed`` picks the street. ``rig`` overrides the sensors
    (tests use smaller images and fewer firings); ``workers`` threads generate frames (default:
    up to 4, one per core). Raises FileExistsError if ``out`` exists and is not empty.
    """
    from ..bag.writer import BagWriter, Storage  # the bag layer pulls in rosbags' writer

    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ConfigError("frames", f"must be a positive integer, got {frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    if storage not in STORAGES:
        raise ConfigError("storage", f"must be one of {STORAGES}, got {storage!r}")
    frames, seed = int(frames), int(seed)
    rig = SampleRig() if rig is None else rig
    workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    started = time.perf_counter()

    path = EgoPath()
    end_x = float(path.state(frames * rig.lidar.period)[0])
    scene = build_scene(seed, x_max=max(140.0, end_x + STREET_AHEAD_M))
    _ = scene.cull_table, scene.tables, scene.tables32  # build the shared caches before threads
    factory = rosbags_factory()
    _prepare_out(out)

    points: list[int] = []
    checked = cast(Storage, storage)  # one of STORAGES, checked above
    with BagWriter(out, storage=checked) as bag, ThreadPoolExecutor(workers) as pool:
        first = START_NS
        bag.write(TF_STATIC_TOPIC, _tf_message(factory, first, static_transforms(rig)), first)

        def submit(k: int) -> Future[list[tuple[int, str, Any]]]:
            return pool.submit(frame_messages, scene, path, rig, k, frames, seed, factory)

        for messages in _in_order(iter(range(frames)), submit, window=2 * workers):
            for stamp, topic, msg in messages:
                bag.write(topic, msg, stamp)
                if topic == POINTS_TOPIC:
                    points.append(int(msg.width) * int(msg.height))
        counts = dict(bag.counts)

    return SampleDriveInfo(
        path=out, frames=frames, seed=seed, storage=storage, topics=counts,
        duration_s=frames * rig.lidar.period, seconds=time.perf_counter() - started,
        points_per_frame=(min(points), float(np.mean(points)), max(points)),
    )  # fmt: skip
