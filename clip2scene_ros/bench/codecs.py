"""``clip2scene bench codecs``: PointCloud2 decode and encode on the node's hot path.

decode: a Velodyne-layout cloud (x, y, z, intensity float32, ring uint16, time float32; 22-byte
points, unaligned) to finite xyz float32, as the node does on every sweep.
encode: the node's labelled output (x, y, z, intensity, label, score, rgb) into a message.
Both run for rosbags messages (what bags hold) and, where rclpy is installed, for rclpy messages
(what the node subscribes to and publishes), and the targets are checked for each kind: the
keys without a suffix are rosbags', ``_rclpy`` ones rclpy's. The baseline is a plain ``memcpy``
of the same payload in the same run: the floor any codec must copy.
"""

from __future__ import annotations

import platform
from functools import partial
from typing import Any

import numpy as np

from ..codecs import (
    decode_pointcloud2,
    decode_xyz,
    encode_labelled_cloud,
    encode_pointcloud2,
    unpack_rgb,
)
from ..codecs.messages import MessageFactory, RclpyFactory, rosbags_factory
from . import median_ms

VELODYNE_DTYPE = np.dtype({
    "names": ["x", "y", "z", "intensity", "ring", "time"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 18],
    "itemsize": 22,
})

def _encode(xyz: np.ndarray, cloud: np.ndarray, label: np.ndarray, score: np.ndarray,
            rgb: np.ndarray, factory: MessageFactory) -> Any:
    return encode_labelled_cloud(xyz, cloud["intensity"], label, score, rgb, stamp_ns=1,
                                 frame_id="lidar", factory=factory)


#: Targets on the 2-core development machine (docs/benchmarks.md, "PointCloud2 codecs").
TARGETS_MS = {"decode_ms": 2.0, "encode_ms": 5.0}


def _factories() -> dict[str, MessageFactory]:
    factories: dict[str, MessageFactory] = {"rosbags": rosbags_factory()}
    try:
        import sensor_msgs.msg  # noqa: F401  (rclpy message classes present)

        factories["rclpy"] = RclpyFactory()
    except ImportError:
        pass
    return factories


def bench_codecs(points: int = 100_000, repeat: int = 50, seed: int = 0) -> dict[str, Any]:
    """Median times (ms) of decode and encode per message kind (see the module);
    ``meets_targets`` holds only when every kind measured meets :data:`TARGETS_MS`."""
    rng = np.random.default_rng(seed)
    cloud = np.zeros(points, dtype=VELODYNE_DTYPE)
    for axis in "xyz":
        cloud[axis] = rng.uniform(-50, 50, points)
    cloud["intensity"] = rng.uniform(0, 255, points)
    cloud["ring"] = rng.integers(0, 32, points)
    cloud["time"] = rng.uniform(0, 0.1, points)
    xyz = np.stack([cloud[a] for a in "xyz"], axis=1)
    label = rng.integers(0, 16, points).astype(np.uint16)
    score = rng.uniform(0, 1, points).astype(np.float32)
    rgb = rng.integers(0, 256, (points, 3)).astype(np.uint8)

    payload = np.ascontiguousarray(cloud).view(np.uint8)
    out = np.empty_like(payload)
    memcpy_ms = median_ms(lambda: np.copyto(out, payload), repeat)
    result: dict[str, Any] = {"points": points, "repeat": repeat,
                              "payload_bytes": int(payload.nbytes), "memcpy_ms": memcpy_ms}
    met: dict[str, bool] = {}
    for name, factory in _factories().items():
        msg = encode_pointcloud2(cloud, stamp_ns=1, frame_id="lidar", factory=factory)
        decoded = decode_xyz(msg)
        if not np.array_equal(decoded, xyz):
            raise RuntimeError("decode_xyz returned wrong points; benchmark aborted")
        labelled = decode_pointcloud2(_encode(xyz, cloud, label, score, rgb, factory))
        if not (np.array_equal(labelled["label"], label)
                and np.array_equal(labelled["x"], xyz[:, 0])
                and np.array_equal(unpack_rgb(labelled["rgb"]), rgb)):
            raise RuntimeError(f"encode_labelled_cloud wrote wrong points ({name} messages); "
                               "benchmark aborted")
        decode = median_ms(partial(decode_xyz, msg), repeat)
        encode = median_ms(partial(_encode, xyz, cloud, label, score, rgb, factory), repeat)
        suffix = "" if name == "rosbags" else f"_{name}"
        result[f"decode_ms{suffix}"] = decode
        result[f"encode_ms{suffix}"] = encode
        result[f"decode_vs_memcpy{suffix}"] = decode / memcpy_ms
        met[name] = all(result[f"{key}{suffix}"] <= limit for key, limit in TARGETS_MS.items())
    result["targets_ms"] = TARGETS_MS
    result["message_kinds"] = list(met)
    result["meets_targets_by_kind"] = met
    result["meets_targets"] = all(met.values())
    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "python": platform.python_version(), "numpy": np.__version__}
    return result
