"""The one preprocessing path from Frames to network input (DESIGN rule 4).

Training, evaluation and the node all call :func:`prepare_frames`, so a model sees the same
sweeps, features, scaling and filtering offline and on the vehicle. The spec comes from the
model bundle (:class:`~clip2scene_ros.models.bundle.InputSpec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .frame import Frame
from .geometry.ego_motion import merge_sweeps
from .models.bundle import InputSpec
from .sparse.keys import COORD_MAX, COORD_MIN
from .sparse.tensor import PointTensor


@dataclass(frozen=True)
class PreparedCloud:
    """Network input of one sample, with the way back to the input points.

    Attributes:
        coords: ``(N, 3)`` float32 point coordinates in voxel units (metres / voxel size).
        feats: ``(N, F)`` float32 input features, scaled as the spec says.
        source: ``(N,)`` int64 row of each kept point in the merged sweeps (key sweep first, so
            rows ``< key_points`` are the key frame's own points in Frame order).
        sweep: ``(N,)`` uint8 sweep of each kept point (0 = the key frame).
        key_points: number of points of the key frame before filtering.
        dropped: points removed, by reason (``non_finite``: NaN/Inf coordinates or features,
            ``out_of_range``: beyond the sparse engine's key range, ``over_max_points``).
    """

    coords: np.ndarray
    feats: np.ndarray
    source: np.ndarray
    sweep: np.ndarray
    key_points: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.coords.shape[0])


def _channel(frame: Frame, name: str, dt: float) -> np.ndarray:
    """One non-coordinate input channel of a sweep; a channel the sensor lacks reads zeros."""
    n = frame.num_points
    if name == "time":  # seconds relative to the key frame's stamp (past sweeps negative)
        own = frame.time if frame.time is not None else np.zeros(n, np.float32)
        return own.astype(np.float32) - np.float32(dt)
    value = getattr(frame, name)
    return np.zeros(n, np.float32) if value is None else value.astype(np.float32)


def prepare_frames(
    frames: Sequence[Frame],
    spec: InputSpec,
    *,
    rng: np.random.Generator | None = None,
) -> PreparedCloud:
    """Merge ``frames`` (key frame first, then past sweeps) into one scaled network input.

    Past sweeps are moved into the key frame by ego motion (their poses are required when
    there is more than one). Points whose voxel coordinates fall outside the sparse engine's
    key range are dropped; above ``spec.max_points`` a random subset is kept (``rng``, or a
    deterministic stride when None, so the node is reproducible).
    """
    if not frames:
        raise ValueError("prepare_frames needs at least one frame")
    frames = list(frames)[: spec.sweeps]
    if len(frames) == 1:
        xyz = frames[0].xyz.astype(np.float32, copy=False)
        sweep = np.zeros(len(xyz), np.uint8)
        dts = np.zeros(1, np.float64)
    else:
        xyz, sweep, _ = merge_sweeps(frames, key=0)
        dts = np.array([(frames[0].stamp_ns - f.stamp_ns) * 1e-9 for f in frames])
    columns = []
    for name in spec.features:
        if name in ("x", "y", "z"):
            columns.append(xyz[:, "xyz".index(name)])
        else:
            columns.append(np.concatenate([_channel(f, name, dts[i])
                                           for i, f in enumerate(frames)]))
    feats = np.stack(columns, axis=1).astype(np.float32, copy=False)
    if spec.offset:
        feats = feats - np.asarray(spec.offset, np.float32)
    if spec.scale:
        feats = feats * np.asarray(spec.scale, np.float32)

    coords = xyz / np.float32(spec.voxel_size)
    # NaN/Inf anywhere in a point (a sensor's "no return", a corrupt field) drops the point
    finite = np.isfinite(coords).all(axis=1) & np.isfinite(feats).all(axis=1)
    # floor() of a coordinate must stay inside the engine's packed-key range
    with np.errstate(invalid="ignore"):
        inside = finite & np.all((coords >= COORD_MIN) & (coords < COORD_MAX), axis=1)
    source = np.flatnonzero(inside)
    dropped = {"non_finite": int(len(coords) - finite.sum()),
               "out_of_range": int(finite.sum() - len(source))}
    if len(source) > spec.max_points:
        if rng is None:
            keep = np.linspace(0, len(source) - 1, spec.max_points).round().astype(np.int64)
        else:
            keep = np.sort(rng.choice(len(source), spec.max_points, replace=False))
        dropped["over_max_points"] = int(len(source) - spec.max_points)
        source = source[keep]
    else:
        dropped["over_max_points"] = 0
    return PreparedCloud(
        coords=coords[source],
        feats=np.ascontiguousarray(feats[source]),
        source=source.astype(np.int64),
        sweep=sweep[source],
        key_points=frames[0].num_points,
        dropped=dropped,
    )


def to_point_tensor(clouds: Sequence[PreparedCloud], device: torch.device | str = "cpu"
                    ) -> PointTensor:
    """Batch prepared clouds into one :class:`PointTensor` (batch index = position in list)."""
    if not clouds:
        raise ValueError("to_point_tensor needs at least one cloud")
    coords = torch.from_numpy(np.concatenate([c.coords for c in clouds]))
    feats = torch.from_numpy(np.concatenate([c.feats for c in clouds]))
    batch = torch.cat([torch.full((c.num_points,), i, dtype=torch.int64)
                       for i, c in enumerate(clouds)])
    return PointTensor(feats.to(device), coords.to(device), batch.to(device))
