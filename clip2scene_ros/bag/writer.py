"""Write rosbag2 bags (mcap or sqlite3) from rosbags messages, no ROS install needed.

A thin context manager over ``rosbags.rosbag2.Writer``: connections are registered on the first
message of each topic (type taken from the message itself), and latched topics such as
``/tf_static`` are recorded with the transient-local QoS profile that
``tf2_ros.StaticTransformBroadcaster`` offers, so ``ros2 bag play`` re-publishes them latched and a
late-joining ``tf2`` listener still sees the static transforms.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from rosbags.interfaces import (
    Connection,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from ..codecs.messages import WRITE_STORE
from ..errors import ConfigError

Storage = Literal["mcap", "sqlite3"]

#: rmw's encoding of an infinite duration, as ``ros2 bag record`` writes it into metadata.
_INFINITE = QosTime(sec=2147483647, nsec=4294967295)

#: The QoS ``tf2_ros.StaticTransformBroadcaster`` offers on ``/tf_static``: reliable,
#: transient-local, keep-last 1. Recorded as the topic's offered profile, it makes the player
#: latch the topic.
LATCHED_QOS = Qos(
    history=QosHistory.KEEP_LAST,
    depth=1,
    reliability=QosReliability.RELIABLE,
    durability=QosDurability.TRANSIENT_LOCAL,
    deadline=_INFINITE,
    lifespan=_INFINITE,
    liveliness=QosLiveliness.AUTOMATIC,
    liveliness_lease_duration=_INFINITE,
    avoid_ros_namespace_conventions=False,
)

_PLUGINS: dict[str, StoragePlugin] = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}

#: rosbag2 metadata version written. 8 is what Humble-era tooling and the shared test bags use;
#: rosbags writes only 8 or 9.
BAG_VERSION: Literal[8, 9] = 8


class BagWriter:
    """Context manager writing rosbags messages to a new rosbag2 directory.

    Example::

        factory = rosbags_factory()
        with BagWriter(Path("drive"), storage="mcap") as bag:
            bag.write("/tf_static", tf_msg, stamp_ns)
            bag.write("/velodyne_points", cloud_msg, stamp_ns)

    Args:
        path: the bag directory to create; it must not exist (rosbag2 never overwrites).
        storage: ``"mcap"`` (default) or ``"sqlite3"``.
        store: the rosbags type store whose definitions the messages are serialized with.
        latched_topics: topics recorded with the transient-local (latched) QoS profile.
    """

    def __init__(
        self,
        path: Path | str,
        storage: Storage = "mcap",
        store: str = WRITE_STORE,
        *,
        latched_topics: Iterable[str] = ("/tf_static",),
    ) -> None:
        if storage not in _PLUGINS:
            raise ConfigError("storage", f"bag storage must be one of {sorted(_PLUGINS)}, got "
                              f"{storage!r}")
        self.path = Path(path)
        self.storage = storage
        self.typestore = get_typestore(Stores(store))
        self.latched_topics = frozenset(latched_topics)
        self._writer: Writer | None = None
        self._connections: dict[str, Connection] = {}
        self.counts: dict[str, int] = {}

    def open(self) -> BagWriter:
        if self._writer is not None:
            raise RuntimeError(f"bag {self.path} is already open")
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists already; a rosbag2 bag is never overwritten")
        writer = Writer(self.path, version=BAG_VERSION, storage_plugin=_PLUGINS[self.storage])
        writer.open()
        self._writer = writer
        return self

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> BagWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Close on errors too: what was written so far stays a readable bag.
        self.close()

    def connection(self, topic: str, msgtype: str) -> Connection:
        """The connection of ``topic``, registered on first use; one message type per topic."""
        if self._writer is None:
            raise RuntimeError(f"bag {self.path} is not open; use BagWriter as a context manager")
        conn = self._connections.get(topic)
        if conn is not None:
            if conn.msgtype != msgtype:
                raise ValueError(
                    f"topic {topic!r} carries {conn.msgtype}; cannot also write {msgtype} to it"
                )
            return conn
        if msgtype not in self.typestore.types:
            raise ValueError(f"message type {msgtype} is not in the bag's type store")
        qos = [LATCHED_QOS] if topic in self.latched_topics else []
        conn = self._writer.add_connection(
            topic, msgtype, typestore=self.typestore, offered_qos_profiles=qos
        )
        self._connections[topic] = conn
        self.counts[topic] = 0
        return conn

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        """Serialize ``msg`` (a rosbags message) to ``topic`` with bag timestamp ``stamp_ns``."""
        msgtype = getattr(msg, "__msgtype__", None)
        if not isinstance(msgtype, str):
            raise TypeError(
                f"cannot write {type(msg).__name__} to {topic!r}: BagWriter takes rosbags "
                "messages (build them with codecs.messages.rosbags_factory)"
            )
        conn = self.connection(topic, msgtype)
        self._write(conn, topic, self.typestore.serialize_cdr(msg, msgtype), stamp_ns)

    def write_raw(self, topic: str, msgtype: str, data: bytes, stamp_ns: int) -> None:
        """Write an already CDR-serialized message (e.g. what an rclpy raw subscription gets)."""
        self._write(self.connection(topic, msgtype), topic, data, stamp_ns)

    def _write(self, conn: Connection, topic: str, data: bytes | memoryview, stamp_ns: int
               ) -> None:
        if stamp_ns < 0:
            raise ValueError(f"bag timestamp for {topic!r} must be >= 0, got {stamp_ns}")
        assert self._writer is not None  # connection() checked it
        self._writer.write(conn, int(stamp_ns), data)
        self.counts[topic] += 1
