"""``clip2scene replay``: play a rosbag2 through rclpy with ``/clock`` (``ros2 bag play --clock``).

ros2cli and rosbag2_py are not installable everywhere (not here, for one), so replay reads the bag
with rosbags and publishes the recorded CDR bytes unchanged (rclpy publishes serialized
messages), paced by the bag's log times divided by ``rate``. ``/clock`` is also published at a
fixed rate between messages (default 40 Hz, as ``ros2 bag play --clock``). Latched topics
(``/tf_static``, or any recorded with transient-local durability) are republished with that
durability so late subscribers get them. Looping restarts the bag, which makes ``/clock`` jump
back, exactly as ``ros2 bag play --loop`` does.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosbags.highlevel import AnyReader
from rosgraph_msgs.msg import Clock

from ..codecs.messages import RclpyFactory, make_stamp


@dataclass
class ReplayReport:
    messages: int = 0
    loops: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    #: topics whose message package is not installed here (e.g. tf2_msgs on a pip-only setup)
    unplayable: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    bag_s: float = 0.0
    #: topics with a reliable message some subscriber had not acknowledged when the player ended
    unacknowledged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"replayed {self.messages} messages ({self.loops} pass(es), {self.bag_s:.1f} s "
                f"of bag in {self.wall_s:.1f} s)")
        if self.unplayable:
            text += f"; not played (message package missing): {sorted(self.unplayable)}"
        if self.unacknowledged:
            text += f"; not acknowledged by every subscriber: {self.unacknowledged}"
        return text


def _latched(conn: Any) -> bool:
    profiles = conn.ext.offered_qos_profiles if hasattr(conn, "ext") else []
    text = str(profiles)
    return conn.topic == "/tf_static" or "transient_local" in text.lower() or (
        "durability: 1" in text)


def _sleep_with_clock(due: float, *, log_ns: int, floor_ns: int, rate: float, period: float,
                      publish: Callable[[int], None]) -> None:
    """Sleep until ``due``, ticking /clock every ``period`` s so sim time flows between messages."""
    # first_log + (now - pass_start) * rate, rewritten with due = pass_start + (log_ns -
    # first_log) / rate; kept within [floor_ns, log_ns] (the previous and the next log time).
    tick = time.monotonic() + period
    while tick < due:
        time.sleep(max(0.0, tick - time.monotonic()))
        now = time.monotonic()
        publish(max(floor_ns, min(log_ns, log_ns - round((due - now) * rate * 1e9))))
        tick = max(tick + period, now)  # fell behind: skip the missed ticks, no burst
    time.sleep(max(0.0, due - time.monotonic()))


def replay(bag: str | Path, *, rate: float = 1.0, loop: bool = False, clock: bool = True,
           clock_hz: float = 40.0, topics: Sequence[str] | None = None,
           remap: dict[str, str] | None = None,
           context: Any = None, max_loops: int | None = None,
           stop: Callable[[], bool] | None = None,
           on_publish: Callable[[str, bytes], None] | None = None,
           wait_for: Sequence[str] = (), wait_timeout_s: float = 30.0,
           ack_timeout_s: float = 5.0) -> ReplayReport:
    """Publish ``bag``'s messages in log-time order at ``rate`` (``<= 0``: as fast as possible).

    ``topics`` limits what is played; ``remap`` renames topics; ``stop`` is polled between
    messages (the caller's way to end a loop); ``on_publish(topic, raw)`` runs right after each
    message goes out (replay-eval times the node with it); playing starts once every topic in
    ``wait_for`` has a matched subscriber (or after ``wait_timeout_s``), so that the first
    messages are not published into the void. At the end (not on ``stop``) it waits up to
    ``ack_timeout_s`` until every subscriber has acknowledged every reliable message: a large
    cloud goes out in fragments, and a player that exits at once loses the last message. With
    ``clock``, /clock also ticks every ``1 / clock_hz`` s of wall time while waiting for the next
    message (paced playback only). Needs an initialised rclpy ``context``.
    """
    if clock and not (clock_hz > 0 and math.isfinite(clock_hz)):
        raise ValueError(f"clock_hz must be > 0, got {clock_hz!r}")
    remap = remap or {}
    node = Node("clip2scene_replay", context=context)
    report = ReplayReport()
    start_wall = time.monotonic()
    try:
        with AnyReader([Path(bag)]) as reader:
            factory = RclpyFactory()
            publishers: dict[str, Any] = {}
            conns = []
            for conn in reader.connections:
                if topics is not None and conn.topic not in topics:
                    continue
                try:
                    msg_class = factory(conn.msgtype)
                except (ImportError, AttributeError):
                    report.unplayable[conn.topic] = conn.msgtype
                    continue
                conns.append(conn)
                if conn.topic in publishers:
                    continue
                latched = _latched(conn)
                qos = QoSProfile(
                    depth=1 if latched else 10, reliability=ReliabilityPolicy.RELIABLE,
                    durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                                else DurabilityPolicy.VOLATILE))
                publishers[conn.topic] = node.create_publisher(
                    msg_class, remap.get(conn.topic, conn.topic), qos)
            clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None

            def publish_clock(ns: int) -> None:
                if clock_pub is not None:
                    clock_pub.publish(Clock(clock=make_stamp(factory, ns)))

            report.bag_s = (reader.end_time - reader.start_time) * 1e-9
            deadline = time.monotonic() + wait_timeout_s
            while time.monotonic() < deadline and not all(
                    publishers[t].get_subscription_count() for t in wait_for if t in publishers):
                time.sleep(0.05)
            while True:
                first_log: int | None = None
                prev_log: int | None = None
                pass_start = time.monotonic()
                for conn, log_ns, raw in reader.messages(connections=conns):
                    if stop is not None and stop():
                        return report
                    first_log = log_ns if first_log is None else first_log
                    if rate > 0:
                        due = pass_start + (log_ns - first_log) * 1e-9 / rate
                        delay = due - time.monotonic()
                        if delay > 0 and clock_pub is not None and prev_log is not None:
                            _sleep_with_clock(due, log_ns=log_ns, floor_ns=prev_log, rate=rate,
                                              period=1.0 / clock_hz, publish=publish_clock)
                        elif delay > 0:
                            time.sleep(delay)
                    publish_clock(log_ns)
                    prev_log = log_ns
                    publishers[conn.topic].publish(bytes(raw))  # recorded CDR, unchanged
                    if on_publish is not None:
                        on_publish(conn.topic, raw)
                    report.messages += 1
                    report.per_topic[conn.topic] = report.per_topic.get(conn.topic, 0) + 1
                report.loops += 1
                if not loop or (max_loops is not None and report.loops >= max_loops):
                    report.unacknowledged = _await_acks(publishers, ack_timeout_s)
                    return report
    finally:
        report.wall_s = time.monotonic() - start_wall
        node.destroy_node()


def _await_acks(publishers: dict[str, Any], timeout_s: float) -> list[str]:
    """Wait until each publisher's subscribers acknowledged all it sent (best-effort ones
    return at once); the topics still unacknowledged after ``timeout_s`` in all."""
    deadline = time.monotonic() + max(timeout_s, 0.0)
    late = []
    for topic, pub in publishers.items():
        left = max(deadline - time.monotonic(), 0.0)
        if not pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
            late.append(topic)
    return late


def main_replay(bag: str, rate: float, loop: bool, clock: bool,
                clock_hz: float = 40.0, wait_for: Sequence[str] = (),
                wait_timeout_s: float = 30.0) -> ReplayReport:
    """Run :func:`replay` in its own rclpy context (the ``clip2scene replay`` command)."""
    context = rclpy.context.Context()
    rclpy.init(args=[], context=context)  # the command line is ours, not ROS arguments
    # Ctrl-C under `ros2 launch` reaches the player twice (the terminal signals the whole
    # process group and launch forwards it): the first one stops, later ones must not turn the
    # clean stop into a death by signal. Installed after rclpy's, which the player does not need.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _stop_once)
    try:
        return replay(bag, rate=rate, loop=loop, clock=clock, clock_hz=clock_hz,
                      context=context, wait_for=wait_for, wait_timeout_s=wait_timeout_s)
    except KeyboardInterrupt:
        return ReplayReport()
    finally:
        rclpy.shutdown(context=context)


def _stop_once(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM stops the player; any later one is ignored."""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt
