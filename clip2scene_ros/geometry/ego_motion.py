"""Ego motion: a pose stream, sweep compensation, multi-sweep merging and sweep selection.

Poses are world←body (``p_world = pose @ p_body``). A point measured in the body (LiDAR) frame
at time ``s`` is moved into the body frame at time ``d`` by ``inv(pose_d) @ pose_s``; for a
static world point this puts every sweep's observation at the same place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..frame import Frame
from .transforms import interpolate_transform, invert_transform, transform_points


def _format_ns(stamp_ns: int) -> str:
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return f"{stamp_ns} ns ({sec}.{nsec:09d} s)"


class PoseStream:
    """Timestamped world←body poses, interpolated in between (lerp + slerp).

    Args:
        stamps_ns: (T,) strictly increasing integer stamps in nanoseconds.
        poses: (T, 4, 4) world←body transforms at those stamps.
    """

    def __init__(self, stamps_ns: Any, poses: Any) -> None:
        stamps = np.asarray(stamps_ns)
        if stamps.ndim != 1 or stamps.size == 0:
            raise ValueError(f"PoseStream stamps_ns must be non-empty 1-D, got {stamps.shape}")
        if not np.issubdtype(stamps.dtype, np.integer):
            raise ValueError(f"PoseStream stamps_ns must be integer ns, got {stamps.dtype}")
        stamps = stamps.astype(np.int64)
        if np.any(np.diff(stamps) <= 0):
            bad = int(np.flatnonzero(np.diff(stamps) <= 0)[0])
            raise ValueError(
                f"PoseStream stamps_ns must be strictly increasing; stamp[{bad + 1}] = "
                f"{int(stamps[bad + 1])} follows {int(stamps[bad])}"
            )
        mats = np.asarray(poses, dtype=np.float64)
        if mats.shape != (stamps.size, 4, 4):
            raise ValueError(f"PoseStream poses must be ({stamps.size}, 4, 4), got {mats.shape}")
        if not np.all(np.isfinite(mats)):
            raise ValueError("PoseStream poses have non-finite values")
        self.stamps_ns = stamps
        self.poses = mats
        self.stamps_ns.setflags(write=False)
        self.poses.setflags(write=False)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, Any]]) -> PoseStream:
        """From ``(stamp_ns, pose)`` pairs in any order (e.g. as TF messages arrive)."""
        items = sorted(((int(s), np.asarray(p, dtype=np.float64)) for s, p in pairs),
                       key=lambda item: item[0])  # fmt: skip
        if not items:
            raise ValueError("PoseStream.from_pairs needs at least one (stamp_ns, pose) pair")
        return cls(
            np.array([s for s, _ in items], dtype=np.int64), np.stack([p for _, p in items])
        )

    def __len__(self) -> int:
        return int(self.stamps_ns.size)

    def at(self, stamp_ns: int, *, max_extrapolation_ns: int = 0) -> np.ndarray:
        """World←body pose at ``stamp_ns``.

        Between two stamps the neighbouring poses are interpolated; up to
        ``max_extrapolation_ns`` outside the covered range the first/last two poses are
        extrapolated (a single pose is held constant). Further out raises ValueError.
        """
        stamp = int(stamp_ns)
        first, last = int(self.stamps_ns[0]), int(self.stamps_ns[-1])
        if stamp < first - max_extrapolation_ns or stamp > last + max_extrapolation_ns:
            raise ValueError(
                f"no pose at {_format_ns(stamp)}: the stream covers {_format_ns(first)} .. "
                f"{_format_ns(last)} (max extrapolation {max_extrapolation_ns} ns)"
            )
        n = len(self)
        i = int(np.searchsorted(self.stamps_ns, stamp, side="left"))
        if i < n and int(self.stamps_ns[i]) == stamp:
            exact: np.ndarray = self.poses[i].copy()
            return exact
        if n == 1:
            held: np.ndarray = self.poses[0].copy()
            return held
        # Interpolate inside; extrapolate with the nearest segment outside.
        i = min(max(i, 1), n - 1)
        s0, s1 = int(self.stamps_ns[i - 1]), int(self.stamps_ns[i])
        # Integer differences first: epoch nanoseconds exceed float64's exact integer range.
        alpha = (stamp - s0) / (s1 - s0)
        return interpolate_transform(self.poses[i - 1], self.poses[i], alpha)


def relative_transform(pose_src: Any, pose_dst: Any) -> np.ndarray:
    """Body frame at src time → body frame at dst time: ``inv(pose_dst) @ pose_src``."""
    return invert_transform(pose_dst) @ np.asarray(pose_src, dtype=np.float64)


def compensate_sweep(xyz: Any, pose_src: Any, pose_dst: Any) -> np.ndarray:
    """Points measured in the body frame at src time, expressed in the body frame at dst time."""
    return transform_points(relative_transform(pose_src, pose_dst), xyz)


def merge_sweeps(
    frames: Sequence[Frame], key: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge several sweeps into ``frames[key]``'s LiDAR frame using each ``Frame.pose``.

    Returns ``xyz`` (N, 3) float32, ``sweep`` (N,) uint8 index into ``frames`` and ``dt`` (N,)
    float32 seconds ``key stamp - sweep stamp`` (positive for past sweeps), in frame order.
    """
    if len(frames) == 0:
        raise ValueError("merge_sweeps needs at least one frame")
    if len(frames) > 256:
        raise ValueError(f"merge_sweeps takes at most 256 frames (uint8 index), got {len(frames)}")
    if not -len(frames) <= key < len(frames):
        raise ValueError(f"merge_sweeps key {key} is out of range for {len(frames)} frames")
    key %= len(frames)
    for i, frame in enumerate(frames):
        if frame.pose is None:
            raise ValueError(
                f"merge_sweeps: frames[{i}] (stamp {_format_ns(frame.stamp_ns)}) has no pose; "
                "multi-sweep merging needs odometry (world<-lidar) for every sweep"
            )
    key_pose = frames[key].pose
    key_stamp = int(frames[key].stamp_ns)
    xyz = np.concatenate(
        [
            frame.xyz.astype(np.float32, copy=False)
            if i == key
            else transform_points(relative_transform(frame.pose, key_pose), frame.xyz).astype(
                np.float32, copy=False
            )
            for i, frame in enumerate(frames)
        ]
    )
    counts = [frame.num_points for frame in frames]
    sweep = np.repeat(np.arange(len(frames), dtype=np.uint8), counts)
    seconds = np.array([(key_stamp - int(f.stamp_ns)) * 1e-9 for f in frames], dtype=np.float32)
    dt = np.repeat(seconds, counts)
    return xyz, sweep, dt


def select_sweeps(
    stamps_ns: Any,
    key_index: int,
    num_sweeps: int = 3,
    window: int = 10,
    rng: np.random.Generator | int | None = None,
) -> list[int]:
    """Indices of the sweeps to merge for the keyframe ``key_index`` (CLIP2Scene's SSR input).

    The keyframe plus ``num_sweeps - 1`` of the ``window`` sweeps before it: the most recent
    ones when ``rng`` is None, a random choice without replacement otherwise (a Generator or a
    seed). The keyframe comes first, the others follow newest first. Near the start of a log
    fewer than ``num_sweeps`` indices come back.
    """
    stamps = np.asarray(stamps_ns)
    if stamps.ndim != 1:
        raise ValueError(f"stamps_ns must be 1-D, got shape {stamps.shape}")
    if np.any(np.diff(stamps.astype(np.int64)) <= 0):
        raise ValueError("stamps_ns must be strictly increasing")
    if not 0 <= key_index < stamps.size:
        raise ValueError(f"key_index {key_index} is out of range for {stamps.size} sweeps")
    if num_sweeps < 1:
        raise ValueError(f"num_sweeps must be >= 1, got {num_sweeps}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    candidates = np.arange(key_index - 1, max(key_index - window, 0) - 1, -1)  # newest first
    take = min(num_sweeps - 1, candidates.size)
    if rng is None:
        chosen = candidates[:take]
    else:
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        chosen = np.sort(generator.choice(candidates, size=take, replace=False))[::-1]
    return [int(key_index), *(int(i) for i in chosen)]
