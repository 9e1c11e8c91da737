"""``clip2scene bench transport``: cross-process delivery of labelled clouds over DDS.

The node's output (x, y, z, intensity, label, score, rgb; 100k points is ~2.6 MB) is published
by one process at a fixed rate and counted by another, over loopback, for each Fast DDS
transport setting and output reliability. Loss is ``1 - received / sent``; latency is receive
wall time minus the publisher's wall time carried in the header stamp (both processes share the
host clock). Each setting runs in fresh processes on its own ROS domain: Fast DDS reads
``FASTDDS_BUILTIN_TRANSPORTS`` once, when a process creates its first participant.

    python -m clip2scene_ros.tools.transport_bench sub|pub ...   (the two ends; the bench runs them)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..health import latency_summary

TOPIC = "/bench/labels"
TRANSPORTS_ENV = "FASTDDS_BUILTIN_TRANSPORTS"
#: Transport settings compared: Fast DDS's default (UDP + shared memory) and LARGE_DATA, the
#: one the README documents for the node.
TRANSPORTS = ("DEFAULT", "LARGE_DATA")
RELIABILITIES = ("reliable", "best_effort")
#: Target (docs/benchmarks.md): at most 1 % loss at 10 Hz with the documented settings.
TARGET_LOSS = 0.01


def labelled_cloud(points: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a labelled cloud as the node publishes it."""
    rng = np.random.default_rng(seed)
    return {"xyz": rng.uniform(-50, 50, (points, 3)).astype(np.float32),
            "intensity": rng.uniform(0, 255, points).astype(np.float32),
            "label": rng.integers(0, 16, points).astype(np.uint16),
            "score": rng.uniform(0, 1, points).astype(np.float32),
            "rgb": rng.integers(0, 256, (points, 3)).astype(np.uint8)}


def _init(domain: int) -> tuple[Any, Any]:
    import rclpy
    from rclpy.node import Node

    context = rclpy.context.Context()
    rclpy.init(args=[], context=context, domain_id=domain)
    return context, Node(f"bench_transport_{os.getpid()}", context=context)


def _publish(args: argparse.Namespace) -> dict[str, Any]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2

    from ..codecs import encode_labelled_cloud
    from ..codecs.messages import RclpyFactory
    from ..node.pipeline import qos

    context, node = _init(args.domain)
    pub = node.create_publisher(PointCloud2, TOPIC, qos(args.reliability, 1))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    matched = pub.get_subscription_count() > 0
    arrays = labelled_cloud(args.points)
    factory = RclpyFactory()
    msg = encode_labelled_cloud(**arrays, stamp_ns=1, frame_id="lidar", factory=factory)
    time.sleep(1.0)  # let the subscriber's side of discovery settle before the first sample
    period, start, sent, late = 1.0 / args.rate, time.monotonic(), 0, 0
    for i in range(args.messages if matched else 0):
        wait = start + i * period - time.monotonic()
        if wait > 0:
            executor.spin_once(timeout_sec=wait)
        else:
            late += 1
        now = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
        msg.header.frame_id = str(i)
        pub.publish(msg)
        sent += 1
    elapsed = time.monotonic() - start
    time.sleep(1.0)  # reliable samples still in flight get their repairs
    node.destroy_node()
    rclpy.shutdown(context=context)
    return {"matched": matched, "sent": sent, "late_publishes": late,
            "achieved_rate_hz": sent / elapsed if elapsed > 0 else 0.0,
            "bytes": len(msg.data)}


def _subscribe(args: argparse.Namespace) -> dict[str, Any]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2

    from ..node.pipeline import qos

    context, node = _init(args.domain)
    seen: set[int] = set()
    latency: list[float] = []
    last = [time.monotonic()]

    def on_cloud(msg: PointCloud2) -> None:
        arrived = time.time_ns()
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        seen.add(int(msg.header.frame_id))
        latency.append((arrived - stamp) * 1e-6)
        last[0] = time.monotonic()

    node.create_subscription(PointCloud2, TOPIC, on_cloud, qos(args.reliability, 1))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    Path(args.ready).touch()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and (not seen or time.monotonic() - last[0] < args.idle):
        executor.spin_once(timeout_sec=0.05)
        if len(seen) >= args.messages:
            break
    node.destroy_node()
    rclpy.shutdown(context=context)
    return {"received": len(seen), "latency_ms": latency_summary(latency) if latency else {}}


def run_setting(transport: str, reliability: str, *, points: int, rate: float, messages: int,
                domain: int) -> dict[str, Any]:
    """One transport × reliability setting: a subscriber and a publisher process."""
    env = {k: v for k, v in os.environ.items() if k != TRANSPORTS_ENV}
    if transport != "DEFAULT":
        env[TRANSPORTS_ENV] = transport
    common = ["--domain", str(domain), "--reliability", reliability,
              "--messages", str(messages)]
    module = [sys.executable, "-m", __name__]
    timeout = messages / rate + 60
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        sub = subprocess.Popen([*module, "sub", *common, "--ready", str(ready),
                                "--timeout", str(timeout)], env=env, stdout=subprocess.PIPE)
        try:
            while not ready.exists() and sub.poll() is None:
                time.sleep(0.05)
            pub = subprocess.run([*module, "pub", *common, "--points", str(points),
                                  "--rate", str(rate)], env=env, capture_output=True,
                                 timeout=timeout, check=True)
            out, _ = sub.communicate(timeout=timeout)
        finally:
            if sub.poll() is None:
                sub.kill()
    sent = json.loads(pub.stdout)
    received = json.loads(out)
    loss = 1.0 - received["received"] / sent["sent"] if sent["sent"] else 1.0
    return {"transport": transport, "reliability": reliability, **sent, **received,
            "loss": loss}


def bench_transport(points: int = 100_000, rate: float = 10.0, messages: int = 200,
                    transports: tuple[str, ...] = TRANSPORTS,
                    reliabilities: tuple[str, ...] = RELIABILITIES) -> dict[str, Any]:
    """Loss and latency per setting, side by side in one run."""
    settings = [run_setting(t, r, points=points, rate=rate, messages=messages,
                            domain=150 + i)
                for i, (t, r) in enumerate((t, r) for t in transports for r in reliabilities)]
    documented = [s for s in settings if s["transport"] == "LARGE_DATA"]
    return {"points": points, "rate_hz": rate, "messages": messages,
            "machine": platform.machine(), "cpus": os.cpu_count(), "settings": settings,
            "target_loss": TARGET_LOSS,
            "documented_meets_target": bool(documented) and all(
                s["loss"] <= TARGET_LOSS for s in documented)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=("pub", "sub"))
    parser.add_argument("--domain", type=int, required=True)
    parser.add_argument("--reliability", choices=RELIABILITIES, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--ready", default="")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--idle", type=float, default=3.0,
                        help="sub: stop this long after the last message")
    args = parser.parse_args(argv)
    result = _publish(args) if args.role == "pub" else _subscribe(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
