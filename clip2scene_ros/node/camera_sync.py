"""The node's camera sync: the ROS-free :class:`~clip2scene_ros.runtime.camera_sync.CameraSync`
plus the ``message_filters`` engine, which needs a ROS 2 install.

``message_filters``: ``message_filters.ApproximateTimeSynchronizer`` (where the ROS package is
installed), fed through ``SimpleFilter`` inputs as message_filters' own tests do. It emits a
cloud only with *all* cameras, each message used once, when the stamps of the whole set lie
within the slop of each other; so a cloud it does not complete in time is completed here, on
timeout, from a short buffer of recent images per camera (partial sets, an image serving two
sweeps).

``engine="auto"`` takes message_filters when it imports, else the builtin engine.
"""

from __future__ import annotations

import importlib
import itertools
from collections import deque
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

from ..bag.sync import SyncedSet
from ..runtime import camera_sync
from ..runtime.camera_sync import ENGINES, Engine, SyncEngine

__all__ = ["ENGINES", "CameraSync", "Engine", "MessageFiltersSync", "message_filters_available"]

T = TypeVar("T")


def message_filters_available() -> bool:
    """Whether ``message_filters`` (the ROS 2 package, not pip-installable) imports here."""
    try:
        importlib.import_module("message_filters")
    except ImportError:
        return False
    return True


class _Stamped:
    """A message as message_filters sees it: something with ``header.stamp``.

    The stamp is an ``rclpy.time.Time`` (message_filters takes anything with ``nanoseconds``
    as is), so the wrapped message may be any object; ``seq`` tells two clouds with one stamp
    apart.
    """

    __slots__ = ("header", "msg", "seq", "stamp_ns")

    def __init__(self, seq: int, stamp_ns: int, msg: Any, time_cls: Any) -> None:
        self.seq = seq
        self.stamp_ns = int(stamp_ns)
        self.msg = msg
        self.header = SimpleNamespace(stamp=time_cls(nanoseconds=int(stamp_ns)))


class MessageFiltersSync(Generic[T]):
    """The ``message_filters.ApproximateTimeSynchronizer`` engine, with a timeout fallback.

    Args:
        keys: camera names, in the order of the synchronizer's inputs after the cloud.
        slop_ns: the synchronizer's slop (it bounds the spread of the whole set).
        timeout_ns: steady-clock time a cloud waits for a complete set.
        queue_size: messages per input the synchronizer keeps.
        buffer_size: recent images per camera kept for the partial sets of timed-out clouds.
    """

    name = "message_filters"

    def __init__(self, keys: Sequence[str], slop_ns: int, *, timeout_ns: int, queue_size: int = 5,
                 buffer_size: int = 8) -> None:
        import message_filters
        from rclpy.time import Time

        self.keys = tuple(keys)
        self.slop_ns = int(slop_ns)
        self.timeout_ns = int(timeout_ns)
        self._time = Time
        self._seq = itertools.count()
        self._inputs = [message_filters.SimpleFilter() for _ in range(len(self.keys) + 1)]
        self._sync = message_filters.ApproximateTimeSynchronizer(self._inputs, queue_size,
                                                                 self.slop_ns * 1e-9)
        self._sync.registerCallback(self._on_set)
        self._pending: dict[int, tuple[_Stamped, int]] = {}  # seq -> (cloud, arrival); ordered
        self._recent: dict[str, deque[tuple[int, T]]] = {
            k: deque(maxlen=max(1, buffer_size)) for k in self.keys}
        self._ready: list[SyncedSet[T]] = []

    def _on_set(self, cloud: _Stamped, *images: _Stamped) -> None:
        if self._pending.pop(cloud.seq, None) is None:
            return  # completed after it timed out: it already went on without this set
        matches = {k: (img.stamp_ns, img.msg) for k, img in zip(self.keys, images, strict=True)}
        self._ready.append(SyncedSet(cloud.stamp_ns, cloud.msg, matches, ()))

    def _take(self) -> list[SyncedSet[T]]:
        out, self._ready = self._ready, []
        return out

    def _partial(self, cloud: _Stamped) -> SyncedSet[T]:
        """The cloud with each camera's nearest buffered image within the slop (ties: earlier)."""
        matches: dict[str, tuple[int, T]] = {}
        missing = []
        for key, recent in self._recent.items():
            best = min(recent, key=lambda item: (abs(item[0] - cloud.stamp_ns), item[0]),
                       default=None)
            if best is not None and abs(best[0] - cloud.stamp_ns) <= self.slop_ns:
                matches[key] = best
            else:
                missing.append(key)
        return SyncedSet(cloud.stamp_ns, cloud.msg, matches, tuple(missing))

    def add_reference(self, stamp_ns: int, msg: T, now_ns: int | None = None
                      ) -> list[SyncedSet[T]]:
        cloud = _Stamped(next(self._seq), stamp_ns, msg, self._time)
        self._pending[cloud.seq] = (cloud, int(stamp_ns if now_ns is None else now_ns))
        self._inputs[0].signalMessage(cloud)
        return self._take()

    def add(self, key: str, stamp_ns: int, msg: T) -> list[SyncedSet[T]]:
        if key not in self._recent:
            raise KeyError(f"unknown sync key {key!r}; keys are {list(self.keys)}")
        self._recent[key].append((int(stamp_ns), msg))
        self._inputs[1 + self.keys.index(key)].signalMessage(
            _Stamped(next(self._seq), stamp_ns, msg, self._time))
        return self._take()

    def poll(self, now_ns: int) -> list[SyncedSet[T]]:
        out = self._take()
        for seq, (cloud, arrival) in list(self._pending.items()):
            if now_ns - arrival >= self.timeout_ns:
                del self._pending[seq]
                out.append(self._partial(cloud))
        return out

    def flush(self) -> list[SyncedSet[T]]:
        out = self._take() + [self._partial(cloud) for cloud, _ in self._pending.values()]
        self._pending.clear()
        return out


class CameraSync(camera_sync.CameraSync[T]):
    """:class:`clip2scene_ros.runtime.camera_sync.CameraSync` with the ``message_filters``
    engine as well (``auto`` takes it where it imports); arguments as there."""

    def _choose_engine(self, engine: str) -> str:
        available = message_filters_available()
        if engine == "message_filters" and not available:
            raise ValueError("engine 'message_filters' requested but message_filters does not "
                             "import here (it comes with a ROS 2 install); use auto or builtin")
        if engine == "auto":
            return "message_filters" if available else "builtin"
        return engine

    def _new_engine(self) -> SyncEngine[T]:
        if self.engine_name == "message_filters":
            return MessageFiltersSync(self.cameras, self.slop_ns, timeout_ns=self.timeout_ns,
                                      queue_size=self.queue_size, buffer_size=self.buffer_size)
        return super()._new_engine()
