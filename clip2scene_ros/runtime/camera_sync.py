"""Pair each LiDAR cloud with the nearest image of every camera, online (ROS-free).

The node hands every cloud and every image to a :class:`CameraSync` with its header stamp and
the steady-clock time it arrived; the sync hands back :class:`~clip2scene_ros.bag.sync.SyncedSet`
s: a cloud with the image of each camera nearest to it within the slop, and the cameras that had
none (``missing``). A cloud waits at most ``timeout_s`` (steady clock, so a paused bag or a
stopped sim clock cannot stall it) for its images; then it goes on with the cameras it has, and
with none it is labelled LiDAR-only. That fallback is the node's job: message_filters has no drop
callback (reference §2.3, ros2/ros2 #1313).

An engine does the matching behind one small interface (:class:`SyncEngine`:
``add_reference``/``add``/``poll``/``flush``). The one here is ``builtin``: our
:class:`~clip2scene_ros.bag.sync.ApproximateTimeSync` (pure Python; the same rule the bag reader
uses offline, so training and the vehicle pair sensors alike). The node's
:class:`clip2scene_ros.node.camera_sync.CameraSync` adds ``message_filters`` (its
``ApproximateTimeSynchronizer``, which needs a ROS 2 install); there ``engine="auto"`` takes it
where it imports. Here ``auto`` is the builtin engine.

A stamp that jumps back by more than ``jump_back_s`` (a bag played in a loop, a restarted sim)
or forward by more than ``jump_forward_s`` (a bag or sim skipped ahead, a clock fixed by NTP or
PTP) flushes the pending clouds with what they have and clears every buffer: images of the old
timeline must never pair with clouds of the new one. ``jumps`` counts them by direction.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import Generic, Literal, Protocol, TypeVar

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


class CameraSync(Generic[T]):
    """Clouds paired with the nearest image per camera; see the module docstring.

    Args:
        cameras: camera names (unique); none: every cloud comes straight back, LiDAR-only.
        slop_s: largest ``|image stamp - cloud stamp|`` paired.
        timeout_s: steady-clock time a cloud waits for its images.
        engine: ``auto`` or ``builtin`` (``message_filters``: the node's subclass).
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
        self.engine_name: str = self._choose_engine(engine)
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

    def _choose_engine(self, engine: str) -> str:
        """The engine that runs for ``engine`` (a subclass may offer more than the builtin)."""
        if engine == "message_filters":
            raise ValueError("engine 'message_filters' needs ROS 2: it is offered by "
                             "clip2scene_ros.node.camera_sync.CameraSync; use auto or builtin")
        return "builtin"

    def _new_engine(self) -> SyncEngine[T]:
        """A fresh engine of ``engine_name`` (at start and on every reset)."""
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
