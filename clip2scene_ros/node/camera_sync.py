"""Pair each LiDAR cloud with the nearest image of every camera, online (ROS-free core).

The node hands every cloud and every image to a :class:`CameraSync` with its header stamp and
the steady-clock time it arrived; the sync hands back :class:`~clip2scene_ros.bag.sync.SyncedSet`
s: a cloud with the image of each camera nearest to it within the slop, and the cameras that had
none (``missing``). A cloud waits at most ``timeout_s`` (steady clock, so a paused bag or a
stopped sim clock cannot stall it) for its images; then it goes on with the cameras it has, and
with none it is labelled LiDAR-only. That fallback is the node's job: message_filters has no drop
callback (reference §2.3, ros2/ros2 #1313).

Two engines do the matching, behind one small interface (``add_reference``/``add``/``poll``/
``flush``):

* ``message_filters``: ``message_filters.ApproximateTimeSynchronizer`` (where the ROS package is
  installed), fed through ``SimpleFilter`` inputs as message_filters' own tests do. It emits a
  cloud only with *all* cameras, each message used once, when the stamps of the whole set lie
  within the slop of each other; so a cloud it does not complete in time is completed here, on
  timeout, from a short buffer of recent images per camera (partial sets, an image serving two
  sweeps).
* ``builtin``: our :class:`~clip2scene_ros.bag.sync.ApproximateTimeSync` (pure Python; the same
  rule the bag reader uses offline, so training and the vehicle pair sensors alike).

``engine="auto"`` takes message_filters when it imports, else the builtin one.

A stamp that jumps back by more than ``jump_back_s`` (a bag played in a loop, a restarted sim)
or forward by more than ``jump_forward_s`` (a bag or sim skipped ahead, a clock fixed by NTP or
PTP) flushes the pending clouds with what they have and clears every buffer: images of the old
timeline must never pair with clouds of the new one. ``jumps`` counts them by direction.
"""

from __future__ import annotations

import importlib
import itertools
from collections import Counter, deque
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..bag.sync import ApproximateTimeSync, SyncedSet

T = TypeVar("T")
Engine = Literal["auto", "builtin", "message_filters"]
ENGINES: tuple[str, ...] = ("auto", "builtin", "message_filters")


class SyncEngine(Protocol[T]):
    """What :class:`CameraSync` needs of a matcher (``ApproximateTimeSync`` has exactly this)."""

    def add_reference(self, stamp_ns: int, msg: T, now_ns: int | None = None
                      ) -> list[SyncedSet[T]]: ...

    def add(self, key: str, stamp_ns: int, msg: T) -> list[SyncedSet[T]]: ...

    def poll(self, now_ns: int) -> list[SyncedSet[T]]: ...

    def flush(self) -> list[SyncedSet[T]]: ...


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


class CameraSync(Generic[T]):
    """Clouds paired with the nearest image per camera; see the module docstring.

    Args:
        cameras: camera names (unique); none: every cloud comes straight back, LiDAR-only.
        slop_s: largest ``|image stamp - cloud stamp|`` paired.
        timeout_s: steady-clock time a cloud waits for its images.
        engine: ``auto``, ``builtin`` or ``message_filters``.
        queue_size: clouds waiting at once (older ones are dropped, counted in ``dropped``).
        buffer_size: images per camera kept while no cloud has arrived yet (and, with
            message_filters, for partial sets).
        jump_back_s: a stamp this much older than its stream's newest resets the sync.
        jump_forward_s: a stamp this much newer than its stream's newest resets it too (a few
            seconds of sensor silence are normal; an hour is another timeline).
    """

    def __init__(self, cameras: Sequence[str], slop_s: float, timeout_s: float, *,
                 engine: Engine = "auto", queue_size: int = 5, buffer_size: int = 8,
                 jump_back_s: float = 1.0, jump_forward_s: float = 60.0) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if slop_s < 0 or timeout_s < 0 or jump_back_s < 0 or jump_forward_s < 0:
            raise ValueError(f"slop_s, timeout_s, jump_back_s and jump_forward_s must be >= 0, "
                             f"got {slop_s}, {timeout_s}, {jump_back_s}, {jump_forward_s}")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"camera names must be unique, got {list(cameras)}")
        if engine == "message_filters" and not message_filters_available():
            raise ValueError("engine 'message_filters' requested but message_filters does not "
                             "import here (it comes with a ROS 2 install); use auto or builtin")
        if engine == "auto":
            engine = "message_filters" if message_filters_available() else "builtin"
        self.engine_name: str = engine
        self.cameras = tuple(cameras)
        self.slop_ns = round(slop_s * 1e9)
        self.timeout_ns = round(timeout_s * 1e9)
        self.queue_size = queue_size
        self.buffer_size = max(1, buffer_size)
        self.jump_back_ns = round(jump_back_s * 1e9)
        self.jump_forward_ns = round(jump_forward_s * 1e9)
        self.resets = 0
        self.jumps: Counter[str] = Counter()  # "back" / "forward": stamp jumps that reset
        self.last_jump = ""  # the latest jump, in words (for a log line)
        self._dropped_before = 0
        self._engine = self._new_engine()
        self._seen_cloud = False
        # Images before the first cloud: the builtin engine only prunes against clouds, so a
        # camera running while the LiDAR is silent would otherwise grow its buffer forever.
        self._early: dict[str, deque[tuple[int, T]]] = {
            c: deque(maxlen=self.buffer_size) for c in self.cameras}
        self._last_cloud: int | None = None
        self._last_image: dict[str, int] = {}
        self._latest: dict[str, tuple[int, T]] = {}  # each camera's newest image

    def _new_engine(self) -> SyncEngine[T]:
        if self.engine_name == "message_filters":
            return MessageFiltersSync(self.cameras, self.slop_ns, timeout_ns=self.timeout_ns,
                                      queue_size=self.queue_size, buffer_size=self.buffer_size)
        return ApproximateTimeSync(self.cameras, self.slop_ns, timeout_ns=self.timeout_ns,
                                   queue_size=self.queue_size)

    @property
    def dropped(self) -> int:
        """Clouds pushed out of the waiting queue by newer ones (never paired or labelled)."""
        engine_dropped = int(getattr(self._engine, "dropped", 0))
        return self._dropped_before + engine_dropped

    def reset(self) -> list[SyncedSet[T]]:
        """Emit the waiting clouds with what they have, then forget every message."""
        out = self._engine.flush()
        self._dropped_before = self.dropped
        self._engine = self._new_engine()
        self._seen_cloud = False
        for early in self._early.values():
            early.clear()
        self._last_cloud = None
        self._last_image.clear()
        self._latest.clear()
        self.resets += 1
        return out

    def _jumped(self, stamp_ns: int, newest: int | None, stream: str) -> bool:
        if newest is None:
            return False
        if stamp_ns < newest - self.jump_back_ns:
            direction = "back"
        elif stamp_ns > newest + self.jump_forward_ns:
            direction = "forward"
        else:
            return False
        self.jumps[direction] += 1
        self.last_jump = (f"{stream} stamp jumped {direction} by "
                          f"{abs(stamp_ns - newest) / 1e9:.3f} s")
        return True

    def add_cloud(self, stamp_ns: int, msg: T, now_ns: int) -> list[SyncedSet[T]]:
        """Queue a cloud (``now_ns``: steady-clock arrival); returns the sets now complete."""
        stamp_ns = int(stamp_ns)
        out: list[SyncedSet[T]] = []
        if self._jumped(stamp_ns, self._last_cloud, "cloud"):
            # Only the cloud stream jumped (e.g. one cloud with a bad stamp before this one):
            # images already on this cloud's timeline are kept, not thrown out with the reset.
            kept = [(c, im) for c, im in self._latest.items()
                    if abs(im[0] - stamp_ns) <= self.jump_back_ns]
            out = self.reset()
            for camera, (image_stamp, image) in kept:
                self._early[camera].append((image_stamp, image))
                self._last_image[camera] = image_stamp
                self._latest[camera] = (image_stamp, image)
        self._last_cloud = stamp_ns if self._last_cloud is None else max(self._last_cloud,
                                                                         stamp_ns)
        if not self._seen_cloud:
            self._seen_cloud = True
            for camera, early in self._early.items():
                for image_stamp, image in early:
                    out += self._engine.add(camera, image_stamp, image)
                early.clear()
        out += self._engine.add_reference(stamp_ns, msg, now_ns)
        return out + self._engine.poll(now_ns)

    def add_image(self, camera: str, stamp_ns: int, msg: T, now_ns: int) -> list[SyncedSet[T]]:
        """Add one camera's image; returns the sets now complete."""
        if camera not in self._early:
            raise KeyError(f"unknown camera {camera!r}; cameras are {list(self.cameras)}")
        stamp_ns = int(stamp_ns)
        out = (self.reset() if self._jumped(stamp_ns, self._last_image.get(camera),
                                            f"camera {camera}") else [])
        self._last_image[camera] = max(self._last_image.get(camera, stamp_ns), stamp_ns)
        if stamp_ns >= self._latest.get(camera, (stamp_ns, msg))[0]:
            self._latest[camera] = (stamp_ns, msg)
        if not self._seen_cloud:
            self._early[camera].append((stamp_ns, msg))
            return out
        out += self._engine.add(camera, stamp_ns, msg)
        return out + self._engine.poll(now_ns)

    def poll(self, now_ns: int) -> list[SyncedSet[T]]:
        """The clouds that waited ``timeout_s`` for their images, with the cameras they have."""
        return self._engine.poll(now_ns)
