"""``clip2scene replay``: play a rosbag2 through rclpy with ``/clock`` (``ros2 bag play --clock``).

ros2cli and rosbag2_py are not installable everywhere (not here, for one), so replay reads the bag
with rosbags and publishes the recorded CDR bytes unchanged (rclpy publishes serialized
messages), paced by the bag's log times divided by ``rate``. Latched topics (``/tf_static``, or
any recorded with transient-local durability) are republished with that durability so late
subscribers get them. Looping restarts the bag, which makes ``/clock`` jump back, exactly as
``ros2 bag play --loop`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
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

    def summary(self) -> str:
        text = (f"replayed {self.messages} messages ({self.loops} pass(es), {self.bag_s:.1f} s "
                f"of bag in {self.wall_s:.1f} s)")
        if self.unplayable:
            text += f"; not played (message package missing): {sorted(self.unplayable)}"
        return text


def _latched(conn: Any) -> bool:
    profiles = conn.ext.offered_qos_profiles if hasattr(conn, "ext") else []
    text = str(profiles)
    return conn.topic == "/tf_static" or "transient_local" in text.lower() or (
        "durability: 1" in text)


def replay(bag: str | Path, *, rate: float = 1.0, loop: bool = False, clock: bool = True,
           topics: Sequence[str] | None = None, remap: dict[str, str] | None = None,
           context: Any = None, max_loops: int | None = None,
           stop: Callable[[], bool] | None = None,
           on_publish: Callable[[str, bytes], None] | None = None,
           wait_for: Sequence[str] = (), wait_timeout_s: float = 30.0) -> ReplayReport:
    """Publish ``bag``'s messages in log-time order at ``rate`` (``<= 0``: as fast as possible).

    ``topics`` limits what is played; ``remap`` renames topics; ``stop`` is polled between
    messages (the caller's way to end a loop); ``on_publish(topic, raw)`` runs right after each
    message goes out (replay-eval times the node with it); playing starts once every topic in
    ``wait_for`` has a matched subscriber (or after ``wait_timeout_s``), so that the first
    messages are not published into the void. Needs an initialised rclpy ``context``.
    """
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
            report.bag_s = (reader.end_time - reader.start_time) * 1e-9
            deadline = time.monotonic() + wait_timeout_s
            while time.monotonic() < deadline and not all(
                    publishers[t].get_subscription_count() for t in wait_for if t in publishers):
                time.sleep(0.05)
            while True:
                first_log: int | None = None
                pass_start = time.monotonic()
                for conn, log_ns, raw in reader.messages(connections=conns):
                    if stop is not None and stop():
                        return report
                    first_log = log_ns if first_log is None else first_log
                    if rate > 0:
                        due = pass_start + (log_ns - first_log) * 1e-9 / rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    if clock_pub is not None:
                        clock_pub.publish(Clock(clock=make_stamp(factory, log_ns)))
                    publishers[conn.topic].publish(bytes(raw))  # recorded CDR, unchanged
                    if on_publish is not None:
                        on_publish(conn.topic, raw)
                    report.messages += 1
                    report.per_topic[conn.topic] = report.per_topic.get(conn.topic, 0) + 1
                report.loops += 1
                if not loop or (max_loops is not None and report.loops >= max_loops):
                    return report
    finally:
        report.wall_s = time.monotonic() - start_wall
        node.destroy_node()


def main_replay(bag: str, rate: float, loop: bool, clock: bool) -> ReplayReport:
    """Run :func:`replay` in its own rclpy context (the ``clip2scene replay`` command)."""
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        return replay(bag, rate=rate, loop=loop, clock=clock, context=context)
    except KeyboardInterrupt:
        return ReplayReport()
    finally:
        rclpy.shutdown(context=context)
