"""Read a rosbag2 recording (mcap or sqlite3) as a lazy stream of ``Frame``.

Two passes over the bag, so that memory stays bounded by the sync window, not the bag:

1. **Index.** Reads the small things in full (``/tf_static``, ``/tf``, odometry, CameraInfo) and
   only the header stamps of the big ones (clouds, images, labels; deserializing a rosbags
   message is zero-copy, nothing is decoded). From these it plans every frame: for each LiDAR
   sweep, each camera's nearest image within the slop and the label cloud with the same stamp.
2. **Stream.** Reads the bag again, keeps the raw bytes of exactly the planned messages until
   their frame is complete, decodes the frame through the codecs and hands it out.

Extrinsics come from the TF tree (``lidar_to_camera = T_cam<-lidar`` at the two stamps through
the world frame, so the ego motion between the LiDAR and camera stamps is folded in where
``/tf`` or odometry gives the pose at both), or from a calibration YAML. A bad message never
stops the stream: the frame (malformed cloud) or the camera (malformed image, no intrinsics, no
transform) is left out and counted in ``BagReader.skipped`` by reason.

Reading, frame assembly and the skip accounting share the index built on open; they stay in
one module (~700 lines) so that each frame's path through the bag reads top to bottom.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.typesys import Stores, get_typestore

from ..calibration import Calibration, load_calibration
from ..codecs import camera_info_to_model, decode_pointcloud2, image_to_rgb8, lidar_points
from ..codecs.messages import WRITE_STORE, stamp_to_ns
from ..errors import BagError, ConfigError
from ..frame import CameraView, Frame
from ..geometry.camera_model import CameraModel
from ..geometry.projection import image_size
from ..geometry.transforms import transform_from_msg
from ..tf_tree import TfTree
from .read_errors import storage_files
from .sync import match_nearest
from .topics import CameraTopics, DetectedTopics, detect_topics

#: Reasons counted in ``BagReader.skipped``: what was left out, and why.
SKIP_REASONS = {
    "cloud_malformed": "LiDAR message that cannot be decoded: its frame is skipped",
    "image_malformed": "image that cannot be decoded: the camera is left out of its frame",
    "camera_info_malformed": "CameraInfo that cannot be decoded: ignored",
    "header_malformed": "image or label message whose header cannot be read: ignored",
    "camera_unmatched": "no image of the camera within the slop: left out of the frame",
    "no_camera_info": "no intrinsics (CameraInfo or calibration): the camera is left out",
    "no_extrinsics": "no LiDAR->camera transform (TF or calibration): the camera is left out",
    "image_size_mismatch": "image size differs from its intrinsics: the camera is left out",
    "tf_malformed": "TF message with an invalid transform: that message is ignored",
    "odometry_malformed": "Odometry message that cannot be read: ignored",
    "labels_malformed": "label cloud without a usable `label` field: the frame has no labels",
    "labels_unmatched": "no label cloud with the sweep's stamp: the frame has no labels",
}

_NS = 1_000_000_000

#: Raw messages held by pass 2: (topic, position in topic) -> (message type, CDR bytes).
Buffer = dict[tuple[str, int], tuple[str, bytes]]


@dataclass(frozen=True)
class ReaderConfig:
    """How to read a bag into frames (every topic ``None`` is auto-detected).

    Attributes:
        lidar_topic: the PointCloud2 topic of the sweeps.
        label_topic: a PointCloud2 topic with a ``label`` field per point, same stamp and point
            order as the sweep (ground truth; optional).
        cameras: the cameras to use; ``[]`` for LiDAR-only.
        odometry_topic: ``nav_msgs/Odometry`` used for ego poses when ``/tf`` has none.
        tf_topic / tf_static_topic: the TF topics.
        calibration: a calibration YAML (``clip2scene_ros.calibration``); its extrinsics and
            intrinsics replace TF and CameraInfo for the cameras it names.
        slop_s: largest |image stamp - sweep stamp| for an image to join a sweep.
        fold_ego_motion: fold the ego motion between the sweep and image stamps into
            ``lidar_to_camera`` when poses are known at both.
        world_frame: the fixed frame of the ego poses (default: the root of the LiDAR's tree).
        tf_tolerance_s: how far a lookup may fall outside the recorded /tf samples.
        typestore: rosbags type store for bags that embed no message definitions.
    """

    lidar_topic: str | None = None
    label_topic: str | None = None
    cameras: list[CameraTopics] | None = None
    odometry_topic: str | None = None
    tf_topic: str = "/tf"
    tf_static_topic: str = "/tf_static"
    calibration: Path | None = None
    slop_s: float = 0.05
    fold_ego_motion: bool = True
    world_frame: str | None = None
    tf_tolerance_s: float = 0.0
    typestore: str = WRITE_STORE

    def validate(self) -> None:
        if not self.slop_s >= 0:
            raise ConfigError("slop_s", f"must be >= 0, got {self.slop_s}")
        if not self.tf_tolerance_s >= 0:
            raise ConfigError("tf_tolerance_s", f"must be >= 0, got {self.tf_tolerance_s}")
        stores = [s.value for s in Stores]
        if self.typestore not in stores:
            raise ConfigError("typestore", f"must be one of {stores}, got {self.typestore!r}")

    @property
    def slop_ns(self) -> int:
        return round(self.slop_s * _NS)


@dataclass
class CameraIndex:
    """Pass-1 record of one camera: image stamps and the distinct CameraInfos over time."""

    topics: CameraTopics
    stamps: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # of those images in their topic
    info_stamps: list[int] = field(default_factory=list)
    infos: list[CameraModel] = field(default_factory=list)

    def add_info(self, stamp_ns: int, model: CameraModel) -> None:
        self.info_stamps.append(stamp_ns)
        self.infos.append(model)

    def finish(self) -> None:
        """Sort the infos by stamp and keep only changes (drivers repeat one info per image)."""
        order = sorted(range(len(self.infos)), key=self.info_stamps.__getitem__)
        stamps: list[int] = []
        infos: list[CameraModel] = []
        for i in order:
            if not infos or _model_key(infos[-1]) != _model_key(self.infos[i]):
                stamps.append(self.info_stamps[i])
                infos.append(self.infos[i])
        self.info_stamps, self.infos = stamps, infos

    def info_at(self, stamp_ns: int) -> CameraModel | None:
        """The CameraInfo in force at ``stamp_ns``: the latest before it, else the first."""
        if not self.infos:
            return None
        i = int(np.searchsorted(np.asarray(self.info_stamps), stamp_ns, side="right")) - 1
        return self.infos[max(i, 0)]


def _model_key(m: CameraModel) -> tuple[Any, ...]:
    # P is typed optional for construction only: CameraModel stores [K | 0] for a None P
    arrays = (m.K.tobytes(), m.D.tobytes(), m.R.tobytes(), np.asarray(m.P).tobytes())
    return (m.width, m.height, m.distortion_model, *arrays, m.binning_x, m.binning_y, m.roi)


@dataclass(frozen=True)
class FramePlan:
    """What pass 2 must gather for one sweep: message positions within their topics."""

    index: int  # position of the sweep in the LiDAR topic
    stamp_ns: int
    cameras: dict[str, int]  # camera name -> position in its image topic
    offsets_ns: dict[str, float]  # camera name -> nearest image stamp - sweep stamp (any slop)
    label: int | None  # position in the label topic

    def needs(self, topics: DetectedTopics) -> list[tuple[str, int]]:
        by_name = {c.name: c.image_topic for c in topics.cameras}
        out = [(topics.lidar, self.index)]
        out += [(by_name[name], i) for name, i in self.cameras.items()]
        if self.label is not None and topics.labels is not None:
            out.append((topics.labels, self.label))
        return out


@dataclass
class BagIndex:
    """Everything pass 1 learns about a bag."""

    storage: str
    start_ns: int
    end_ns: int
    topic_types: dict[str, str]
    topic_counts: dict[str, int]
    topics: DetectedTopics
    lidar_frame: str
    tf: TfTree
    world_frame: str | None  # None: no ego poses
    cameras: dict[str, CameraIndex]
    plans: list[FramePlan]
    lidar_stamps: np.ndarray
    first_last_ns: dict[str, tuple[int, int]]  # log time of first and last message per topic
    #: log time of every message of the used topics, by position (lets pass 2 seek)
    log_ns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


def _bag_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    if path.is_file():
        if path.suffix == ".bag":
            raise BagError(str(path), "opening it",
                           "a ROS 1 bag; convert it with `rosbags-convert` first")
        raise BagError(str(path), "opening it",
                       "a file; give the rosbag2 directory (with metadata.yaml)")
    if not (path / "metadata.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a rosbag2 directory: it has no metadata.yaml")
    return path


class BagReader:
    """A rosbag2 bag as a lazy stream of ``Frame``; iterate it (more than once if you like).

    Attributes:
        skipped: how many messages/cameras were left out, by reason (see ``SKIP_REASONS``),
            while indexing and in the latest pass over the frames.
        warnings: counts of non-fatal events, e.g. ``ego_motion_not_folded`` (a camera whose
            stamp has no pose; its static extrinsic is used) and ``no_pose``.
    """

    def __init__(self, path: Path | str, config: ReaderConfig | None = None) -> None:
        self.path = _bag_dir(Path(path))
        self.config = config or ReaderConfig()
        self.calibration: Calibration | None = (
            None if self.config.calibration is None else load_calibration(self.config.calibration)
        )
        self.skipped: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self._index: BagIndex | None = None
        self._index_counts: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        self._typestore = get_typestore(Stores(self.config.typestore))

    # ------------------------------------------------------------------ pass 1

    @contextmanager
    def _opened(self) -> Iterator[AnyReader]:
        try:
            reader = AnyReader([self.path], default_typestore=self._typestore)
            reader.open()
        except AnyReaderError as exc:
            raise BagError(str(self.path), f"opening {storage_files(self.path)}",
                           str(exc)) from exc
        try:
            yield reader
        finally:
            reader.close()

    def _ensure_index(self, reader: AnyReader) -> BagIndex:
        if self._index is None:
            self._index = self._build_index(reader)
            self._index_counts = (Counter(self.skipped), Counter(self.warnings))
        return self._index

    @property
    def index(self) -> BagIndex:
        """What the first pass learnt (read on first use; opening the bag costs ~0.1 s)."""
        if self._index is None:
            with self._opened() as reader:
                self._ensure_index(reader)
        assert self._index is not None
        return self._index

    @property
    def topics(self) -> DetectedTopics:
        return self.index.topics

    def _detect(self, topic_types: dict[str, str]) -> DetectedTopics:
        cfg = self.config
        return detect_topics(
            topic_types,
            lidar_topic=cfg.lidar_topic,
            label_topic=cfg.label_topic,
            cameras=cfg.cameras,
            odometry_topic=cfg.odometry_topic,
            tf_topic=cfg.tf_topic,
            tf_static_topic=cfg.tf_static_topic,
        )

    def _used_topics(self, topics: DetectedTopics) -> set[str]:
        used = {topics.lidar, topics.labels, topics.tf, topics.tf_static, topics.odometry}
        for cam in topics.cameras:
            used |= {cam.image_topic, cam.info_topic}
        return {t for t in used if t is not None}

    def _build_index(self, reader: AnyReader) -> BagIndex:
        meta = yaml.safe_load((self.path / "metadata.yaml").read_text(encoding="utf-8")) or {}
        storage = str(meta.get("rosbag2_bagfile_information", {}).get("storage_identifier", "?"))
        tf = TfTree(tolerance_ns=round(self.config.tf_tolerance_s * _NS))
        topic_types = {c.topic: c.msgtype for c in reader.connections}
        topic_counts: Counter[str] = Counter()
        for c in reader.connections:
            topic_counts[c.topic] += c.msgcount
        topics = self._detect(topic_types)
        used = self._used_topics(topics)
        conns = [c for c in reader.connections if c.topic in used]
        info_of = {c.info_topic: c.name for c in topics.cameras if c.info_topic}
        image_of = {c.image_topic: c.name for c in topics.cameras}
        cameras = {c.name: CameraIndex(c) for c in topics.cameras}
        lidar_stamps: list[int] = []
        lidar_pos: list[int] = []
        lidar_frame = ""
        label_stamps: list[int] = []
        label_pos: list[int] = []
        odometry: list[tuple[str, str, int, np.ndarray]] = []
        first_last: dict[str, tuple[int, int]] = {}
        seen: Counter[str] = Counter()
        log_times: dict[str, list[int]] = {}
        for conn, log_ns, raw in reader.messages(connections=conns):
            topic = conn.topic
            pos = seen[topic]
            seen[topic] += 1
            log_times.setdefault(topic, []).append(log_ns)
            first = first_last.get(topic, (log_ns, log_ns))[0]
            first_last[topic] = (first, log_ns)
            msg: Any
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except AnyReaderError:
                msg = None
            if topic == topics.lidar:
                if msg is None:
                    self.skipped["cloud_malformed"] += 1
                    continue
                lidar_stamps.append(stamp_to_ns(msg.header.stamp))
                lidar_pos.append(pos)
                lidar_frame = lidar_frame or str(msg.header.frame_id)
            elif topic in image_of or topic == topics.labels:
                if msg is None:
                    self.skipped["header_malformed"] += 1
                    continue
                if topic == topics.labels:
                    label_stamps.append(stamp_to_ns(msg.header.stamp))
                    label_pos.append(pos)
                else:
                    cam = cameras[image_of[topic]]
                    cam.stamps.append(stamp_to_ns(msg.header.stamp))
                    cam.positions.append(pos)
            elif topic in info_of:
                self._index_info(cameras[info_of[topic]], msg)
            elif topic in (topics.tf, topics.tf_static):
                self._index_tf(tf, msg, static=topic == topics.tf_static)
            elif topic == topics.odometry:
                self._index_odometry(odometry, msg)
        start_ns, end_ns = reader.start_time, reader.end_time
        cal = self.calibration
        if cal is not None and cal.lidar_frame and lidar_frame and cal.lidar_frame != lidar_frame:
            raise ConfigError(
                "lidar_frame",
                f"the calibration is for LiDAR frame {cal.lidar_frame!r} but {topics.lidar} is "
                f"in frame {lidar_frame!r}",
                str(self.config.calibration),
            )
        for cam in cameras.values():
            cam.finish()
        world = self._add_odometry(tf, lidar_frame, odometry)
        stamps = np.asarray(lidar_stamps, dtype=np.int64)
        labels = (np.asarray(label_stamps, np.int64), label_pos) if topics.labels else None
        plans = self._plan(stamps, lidar_pos, cameras, labels)
        return BagIndex(
            storage=storage,
            start_ns=int(start_ns) if topic_counts else 0,
            end_ns=int(end_ns) if topic_counts else 0,
            topic_types=topic_types,
            topic_counts=dict(topic_counts),
            topics=topics,
            lidar_frame=lidar_frame,
            tf=tf,
            world_frame=world,
            cameras=cameras,
            plans=plans,
            lidar_stamps=stamps,
            first_last_ns=first_last,
            log_ns={t: np.asarray(v, np.int64) for t, v in log_times.items()},
        )

    def _index_info(self, cam: CameraIndex, msg: Any) -> None:
        if msg is None:
            self.skipped["camera_info_malformed"] += 1
            return
        try:
            cam.add_info(stamp_to_ns(msg.header.stamp), camera_info_to_model(msg))
        except ValueError:
            self.skipped["camera_info_malformed"] += 1

    def _index_tf(self, tf: TfTree, msg: Any, *, static: bool) -> None:
        if msg is None:
            self.skipped["tf_malformed"] += 1
            return
        try:
            tf.add_message(msg, static=static)
        except ValueError:
            self.skipped["tf_malformed"] += 1

    def _index_odometry(self, out: list[tuple[str, str, int, np.ndarray]], msg: Any) -> None:
        try:
            if msg is None:
                raise ValueError("undecodable")
            parent, child = str(msg.header.frame_id), str(msg.child_frame_id)
            out.append((parent, child, stamp_to_ns(msg.header.stamp), transform_from_msg(msg.pose)))
        except (ValueError, AttributeError):
            self.skipped["odometry_malformed"] += 1

    def _add_odometry(
        self, tf: TfTree, lidar_frame: str, odometry: list[tuple[str, str, int, np.ndarray]]
    ) -> str | None:
        """Use odometry as the pose source when /tf gives the LiDAR no moving parent.

        Returns the world frame of the ego poses, or None when there are none.
        """
        def moving(frame: str) -> bool:
            return bool(frame) and not tf.is_static(frame)

        if odometry and not moving(lidar_frame):
            try:
                for parent, child, stamp, T in odometry:
                    tf.add_transform(parent, child, T, stamp)
            except ValueError:
                self.warnings["odometry_conflict"] += 1
        world = self.config.world_frame or (tf.root(lidar_frame) if lidar_frame else None)
        if world is None or not moving(lidar_frame):
            return self.config.world_frame
        return world

    def _plan(
        self,
        lidar_stamps: np.ndarray,
        lidar_pos: list[int],
        cameras: dict[str, CameraIndex],
        labels: tuple[np.ndarray, list[int]] | None,
    ) -> list[FramePlan]:
        slop = self.config.slop_ns
        matches = {
            name: match_nearest(lidar_stamps, np.asarray(cam.stamps, np.int64), slop)
            for name, cam in cameras.items()
        }
        label_match = None if labels is None else match_nearest(lidar_stamps, labels[0], 0)
        plans = []
        for k, (stamp, pos) in enumerate(zip(lidar_stamps.tolist(), lidar_pos, strict=True)):
            cams = {
                name: cameras[name].positions[int(m.index[k])]
                for name, m in matches.items()
                if m.index[k] >= 0
            }
            offsets = {
                name: float(m.offset_ns[k]) for name, m in matches.items() if m.nearest[k] >= 0
            }
            label = None
            if label_match is not None and labels is not None and label_match.index[k] >= 0:
                label = labels[1][int(label_match.index[k])]
            plans.append(FramePlan(pos, stamp, cams, offsets, label))
        return plans

    def topic_spans(self) -> dict[str, tuple[int, int]]:
        """Log time of the first and last message of every topic (for rates).

        The index has them for the topics it reads; the others cost one pass over just them.
        """
        spans = dict(self.index.first_last_ns)
        with self._opened() as reader:
            rest = [c for c in reader.connections if c.topic not in spans]
            if rest:
                for conn, log_ns, _ in reader.messages(connections=rest):
                    spans[conn.topic] = (spans.get(conn.topic, (log_ns, log_ns))[0], log_ns)
        return spans

    # ------------------------------------------------------------------ pass 2

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def __len__(self) -> int:
        """Number of sweeps planned (frames whose cloud turns out malformed are skipped)."""
        return len(self.index.plans)

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[Frame]:
        """Frames whose LiDAR message position in its topic is in ``[start, stop)``."""
        with self._opened() as reader:
            index = self._ensure_index(reader)
            # Counts describe the bag's index plus the latest pass over it.
            self.skipped, self.warnings = (Counter(c) for c in self._index_counts)
            end = stop if stop is not None else float("inf")
            plans = [p for p in index.plans if start <= p.index < end]
            if plans:
                yield from self._stream(reader, index, plans)

    def _stream(self, reader: AnyReader, index: BagIndex, plans: list[FramePlan]
                ) -> Iterator[Frame]:
        """Pass 2: hold the raw bytes of planned messages until their frame is complete."""
        topics = index.topics
        refs: Counter[tuple[str, int]] = Counter()
        for plan in plans:
            refs.update(plan.needs(topics))
        read = {topic for topic, _ in refs}
        buffer: Buffer = {}
        # Read the same connections as pass 1 so per-topic positions line up exactly, and only
        # the span of log times the plans need (a few sweeps of a long bag read a few seconds):
        # a topic's first position in the span is the count of its messages logged before it.
        used = self._used_topics(topics)
        conns = [c for c in reader.connections if c.topic in used]
        times = [int(index.log_ns[t][i]) for t, i in refs if t in index.log_ns]
        start = min(times) if times and len(times) == len(refs) else None
        stop = max(times) + 1 if start is not None else None
        seen: Counter[str] = Counter(
            {t: int(np.searchsorted(v, start, "left")) for t, v in index.log_ns.items()}
            if start is not None else {})
        nxt = 0
        for conn, _, raw in reader.messages(connections=conns, start=start, stop=stop):
            topic = conn.topic
            key = (topic, seen[topic])
            seen[topic] += 1
            if topic not in read or key not in refs:
                continue
            buffer[key] = (conn.msgtype, raw)
            while nxt < len(plans) and all(k in buffer for k in plans[nxt].needs(topics)):
                frame = self._build(reader, plans[nxt], buffer)
                self._release(plans[nxt], refs, buffer)
                nxt += 1
                if frame is not None:
                    yield frame
            if nxt == len(plans):
                return
        # Anything still waiting lost a message between the passes: build with what is here.
        while nxt < len(plans):
            frame = self._build(reader, plans[nxt], buffer)
            self._release(plans[nxt], refs, buffer)
            nxt += 1
            if frame is not None:
                yield frame

    def _release(self, plan: FramePlan, refs: Counter[tuple[str, int]], buffer: Buffer) -> None:
        for key in plan.needs(self.index.topics):
            refs[key] -= 1
            if refs[key] <= 0:
                del refs[key]
                buffer.pop(key, None)

    def _decode(self, reader: AnyReader, item: tuple[str, bytes] | None) -> Any:
        if item is None:
            raise ValueError("message missing from the bag")
        try:
            return reader.deserialize(item[1], item[0])
        except AnyReaderError as exc:
            raise ValueError(str(exc)) from exc

    def _build(self, reader: AnyReader, plan: FramePlan, buffer: Buffer) -> Frame | None:
        topics = self.index.topics
        try:
            msg = self._decode(reader, buffer.get((topics.lidar, plan.index)))
            cloud = decode_pointcloud2(msg)
            points = lidar_points(cloud, stamp_ns=plan.stamp_ns)
            lidar_frame = str(msg.header.frame_id)
        except ValueError:
            self.skipped["cloud_malformed"] += 1
            return None
        labels = None
        if topics.labels is not None:
            labels = self._labels(reader, plan, buffer, cloud, points.index)
        views = []
        skipped: list[tuple[str, str]] = []
        for cam in topics.cameras:
            if cam.name not in plan.cameras:
                view: CameraView | str = "camera_unmatched"
            else:
                key = (cam.image_topic, plan.cameras[cam.name])
                view = self._camera_view(reader, cam, buffer.get(key), plan.stamp_ns,
                                         lidar_frame)
            if isinstance(view, str):
                self.skipped[view] += 1
                skipped.append((cam.name, view))
            else:
                views.append(view)
        return Frame(
            stamp_ns=plan.stamp_ns,
            frame_id=lidar_frame,
            xyz=points.xyz,
            intensity=points.intensity,
            ring=points.ring,
            time=points.time,
            labels=labels,
            cameras=tuple(views),
            pose=self._pose(lidar_frame, plan.stamp_ns),
            index=plan.index,
            skipped_cameras=tuple(skipped),
        )

    def _labels(
        self,
        reader: AnyReader,
        plan: FramePlan,
        buffer: Buffer,
        cloud: np.ndarray,
        kept: np.ndarray,
    ) -> np.ndarray | None:
        if plan.label is None:
            self.skipped["labels_unmatched"] += 1
            return None
        assert self.index.topics.labels is not None
        try:
            msg = self._decode(reader, buffer.get((self.index.topics.labels, plan.label)))
            label_cloud = decode_pointcloud2(msg)
            names = label_cloud.dtype.names or ()
            if "label" not in names:
                raise ValueError(f"label cloud has no `label` field (fields: {list(names)})")
            values = label_cloud["label"].reshape(-1)
            if values.size != cloud.size:
                raise ValueError(f"label cloud has {values.size} points, the sweep {cloud.size}")
            if values.dtype.kind not in "ui":
                raise ValueError(f"labels must be integers, got {values.dtype}")
            if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
                raise ValueError("labels must lie in [0, 65535]")
        except ValueError:
            self.skipped["labels_malformed"] += 1
            return None
        return values[kept].astype(np.uint16)

    def _camera_view(
        self,
        reader: AnyReader,
        cam: CameraTopics,
        item: tuple[str, bytes] | None,
        lidar_stamp: int,
        lidar_frame: str,
    ) -> CameraView | str:
        try:
            msg = self._decode(reader, item)
            image = image_to_rgb8(msg)
            stamp = stamp_to_ns(msg.header.stamp)
            frame_id = str(msg.header.frame_id)
        except ValueError:
            return "image_malformed"
        calib = None
        if self.calibration is not None and cam.name in self.calibration:
            calib = self.calibration[cam.name]
        model = calib.camera if calib is not None and calib.camera is not None else None
        if model is None:
            model = self.index.cameras[cam.name].info_at(stamp)
        if model is None:
            return "no_camera_info"
        if image_size(model) != (image.shape[1], image.shape[0]):
            return "image_size_mismatch"
        T: np.ndarray | None
        if calib is not None:
            T = self._fold(calib.lidar_to_camera, lidar_frame, lidar_stamp, stamp)
        else:
            T = self._tf_extrinsic(frame_id, lidar_frame, stamp, lidar_stamp)
        if T is None:
            return "no_extrinsics"
        return CameraView(cam.name, image, model, T, stamp, frame_id)

    def _fold(self, T_cam_lidar: np.ndarray, lidar_frame: str, lidar_stamp: int, cam_stamp: int
              ) -> np.ndarray:
        """Static rig extrinsic with the LiDAR's motion from the sweep to the image stamp."""
        world = self.index.world_frame
        if not self.config.fold_ego_motion or world is None or cam_stamp == lidar_stamp:
            return T_cam_lidar
        tf = self.index.tf
        try:
            motion = tf.lookup_full(lidar_frame, cam_stamp, lidar_frame, lidar_stamp, world)
        except LookupError:
            self.warnings["ego_motion_not_folded"] += 1
            return T_cam_lidar
        return T_cam_lidar @ motion

    def _tf_extrinsic(self, cam_frame: str, lidar_frame: str, cam_stamp: int, lidar_stamp: int
                      ) -> np.ndarray | None:
        tf = self.index.tf
        world = self.index.world_frame
        if self.config.fold_ego_motion and world is not None:
            try:
                return tf.lookup_full(cam_frame, cam_stamp, lidar_frame, lidar_stamp, world)
            except LookupError:
                self.warnings["ego_motion_not_folded"] += 1
        try:
            return tf.lookup(cam_frame, lidar_frame, lidar_stamp)
        except LookupError:
            return None

    def _pose(self, lidar_frame: str, stamp: int) -> np.ndarray | None:
        world = self.index.world_frame
        if world is None:
            return None
        try:
            return self.index.tf.lookup(world, lidar_frame, stamp)
        except LookupError:
            self.warnings["no_pose"] += 1
            return None


def read_frames(path: Path | str, config: ReaderConfig | None = None) -> Iterator[Frame]:
    """The frames of a bag, lazily (see ``BagReader``)."""
    return iter(BagReader(path, config))
