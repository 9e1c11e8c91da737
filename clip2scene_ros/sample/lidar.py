"""A rotating 32-beam LiDAR (Velodyne HDL-32E geometry) scanning the sample street.

What it models, and how it lands in the cloud:

* 32 lasers from -30.67° to +10.67° in the HDL-32E's interleaved firing order; ``ring`` is the
  laser's rank by elevation (0 = lowest), as the velodyne driver reports it.
* The head spins clockwise seen from above (as Velodynes do) at 10 Hz. A sweep starts facing
  backwards, so the cut is behind the vehicle; the header stamp is the moment the beams face
  forwards (mid-sweep), and ``time`` (float32 seconds relative to the stamp) runs from -0.05 to
  +0.05. Lasers of one firing are 1.152 µs apart.
* The vehicle moves during the sweep: each ray is cast from the sensor pose at its own firing
  time and each point is expressed in the sensor frame *at that time* (the motion distortion a
  real driver's output has; ``/tf`` lets a consumer undo it).
* Range noise (Gaussian, 1.5 cm), intensity = reflectivity x (incidence-weighted) cosine with a
  range falloff plus noise, quantised to 0..255 like the HDL-32E's 8-bit intensity, and
  dropouts: 1 % at random, glass swallowing returns, grazing incidence and weak far returns.
* Returns closer than 0.9 m or farther than 80 m are dropped. The cloud is *unorganised*
  (height 1, no NaN rows, ``is_dense``), ordered firing by firing as the driver emits points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .raycast import nearest_hits
from .scene import Scene, surface

#: The velodyne_pointcloud XYZIRT layout: packed, point_step 22.
VELODYNE_DTYPE = np.dtype({
    "names": ["x", "y", "z", "intensity", "ring", "time"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 18],
    "itemsize": 22,
})  # fmt: skip
#: The ground-truth label cloud: one uint16 ``label`` per point, same order as the LiDAR cloud.
LABEL_DTYPE = np.dtype({"names": ["label"], "formats": ["<u2"], "offsets": [0], "itemsize": 2})

#: HDL-32E vertical angles in firing order (two interleaved banks, 4/3° apart).
HDL32E_ELEVATIONS_DEG = tuple(
    float(v) for pair in zip(np.linspace(-30.67, -10.67, 16), np.linspace(-9.33, 10.67, 16),
                             strict=True) for v in pair
)  # fmt: skip


@dataclass(frozen=True)
class LidarModel:
    """Sensor parameters; ``azimuth_steps`` firings per revolution (1808 on an HDL-32E)."""

    elevations_deg: tuple[float, ...] = HDL32E_ELEVATIONS_DEG
    azimuth_steps: int = 1808
    rate_hz: float = 10.0
    firing_interval_s: float = 1.152e-6
    min_range: float = 0.9
    max_range: float = 80.0
    range_noise: float = 0.015
    random_dropout: float = 0.01

    def __post_init__(self) -> None:
        if len(self.elevations_deg) == 0 or len(self.elevations_deg) > 128:
            raise ValueError(f"LidarModel needs 1..128 lasers, got {len(self.elevations_deg)}")
        if not 16 <= self.azimuth_steps <= 10000:
            raise ValueError(f"LidarModel.azimuth_steps must be in 16..10000, got "
                             f"{self.azimuth_steps}")  # fmt: skip
        if not 0 < self.rate_hz <= 50:
            raise ValueError(f"LidarModel.rate_hz must be in (0, 50], got {self.rate_hz}")
        if not 0 <= self.min_range < self.max_range:
            raise ValueError(f"LidarModel needs 0 <= min_range < max_range, got "
                             f"{self.min_range}, {self.max_range}")  # fmt: skip
        if self.range_noise < 0 or not 0 <= self.random_dropout < 1:
            raise ValueError("LidarModel.range_noise must be >= 0 and random_dropout in [0, 1)")

    @property
    def num_lasers(self) -> int:
        return len(self.elevations_deg)

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz

    @property
    def rings(self) -> np.ndarray:
        """(L,) ring of each laser in firing order: its rank by elevation."""
        return np.argsort(np.argsort(self.elevations_deg, kind="stable")).astype(np.uint16)

    def firing(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit directions (N, 3) in the sensor frame, times (N,) relative to the stamp and
        laser index (N,), for all N = azimuth_steps x lasers rays of one sweep, firing-major."""
        steps, lasers = self.azimuth_steps, self.num_lasers
        j = np.arange(steps)
        yaw = np.pi - 2 * np.pi * j / steps  # clockwise from the back; 0 (forward) mid-sweep
        elev = np.deg2rad(np.asarray(self.elevations_deg))
        ce, se = np.cos(elev), np.sin(elev)
        d = np.stack([np.cos(yaw)[:, None] * ce[None], np.sin(yaw)[:, None] * ce[None],
                      np.broadcast_to(se, (steps, lasers))], axis=-1).reshape(-1, 3)  # fmt: skip
        t = (-self.period / 2 + self.period * j / steps)[:, None] + (
            self.firing_interval_s * np.arange(lasers))[None]  # fmt: skip
        laser = np.broadcast_to(np.arange(lasers), (steps, lasers)).reshape(-1)
        return d, t.reshape(-1), laser


HDL32E = LidarModel()


@dataclass(frozen=True)
class Scan:
    """One sweep: the Velodyne-layout cloud and the ground-truth label of each point."""

    cloud: np.ndarray  # (N,) VELODYNE_DTYPE
    labels: np.ndarray  # (N,) uint16


Pose = np.ndarray | Callable[[np.ndarray], np.ndarray]


def _sensor_poses(pose: Pose, extrinsic: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``map <- sensor`` at each time: a trajectory of ``base_link`` or one fixed pose."""
    if callable(pose):
        base = np.asarray(pose(times), dtype=np.float64)
        if base.shape != (*times.shape, 4, 4):
            raise ValueError(f"the pose function must return {(*times.shape, 4, 4)} transforms, "
                             f"got {base.shape}")  # fmt: skip
    else:
        fixed = np.asarray(pose, dtype=np.float64)
        if fixed.shape != (4, 4):
            raise ValueError(f"pose must be a (4, 4) transform or a function of time, got "
                             f"{fixed.shape}")  # fmt: skip
        base = np.broadcast_to(fixed, (*times.shape, 4, 4))
    return base @ np.asarray(extrinsic, dtype=np.float64)


def scan(scene: Scene, pose: Pose, *, stamp_s: float = 0.0, model: LidarModel = HDL32E,
         extrinsic: Any = None, rng: np.random.Generator | None = None) -> Scan:  # fmt: skip
    """Sweep of ``model`` mounted at ``extrinsic`` (``base_link <- sensor``, default identity).

    ``pose`` is ``map <- base_link``: a (4, 4) array (a vehicle standing still) or a function of
    drive times (n,) -> (n, 4, 4), e.g. ``EgoPath``, in which case every firing uses the pose at
    its own time. ``stamp_s`` is the sweep's header stamp in drive seconds. Without ``rng`` the
    scan is noise-free (exact ranges, no random dropouts; physical dropouts still apply).
    """
    extrinsic = np.eye(4) if extrinsic is None else np.asarray(extrinsic, dtype=np.float64)
    if extrinsic.shape != (4, 4):
        raise ValueError(f"extrinsic must be (4, 4), got {extrinsic.shape}")
    d_sensor, t_rel, laser = model.firing()
    times = stamp_s + t_rel
    steps = model.azimuth_steps
    # Poses per firing (lasers of one firing share the pose; they are microseconds apart).
    column_t = times.reshape(steps, -1)[:, 0]
    sensor = _sensor_poses(pose, extrinsic, column_t)
    rot = np.repeat(sensor[:, :3, :3], model.num_lasers, axis=0)
    origins = np.repeat(sensor[:, :3, 3], model.num_lasers, axis=0)
    directions = np.einsum("nij,nj->ni", rot, d_sensor)
    # Culling: bundles of 4 lasers adjacent in elevation x 4 firings, in groups of 8 x 16,
    # in groups of all lasers x 64 firings.
    ring = model.rings[laser].astype(np.int64)
    column = np.repeat(np.arange(steps), model.num_lasers)
    bundle = (ring // 4) * (steps // 4 + 1) + column // 4
    group = (ring // 8) * (steps // 16 + 1) + column // 16
    hits = nearest_hits(scene, origins, directions, times, bundle, (group, column // 64),
                        max_distance=model.max_range)  # fmt: skip
    surf = surface(scene, hits.prim, hits.rest, hits.local, hits.local_normal)

    dist = hits.distance
    cos_inc = np.abs(np.einsum("ij,ij->i", np.nan_to_num(hits.normal), directions))
    hit = np.isfinite(dist)
    # Weak returns: reflectivity x cosine against a range-squared falloff, soft threshold.
    with np.errstate(divide="ignore", invalid="ignore"):
        signal = surf.reflectivity * cos_inc * (30.0 / np.maximum(dist, 30.0)) ** 2
    p_keep = np.clip(signal / 0.012, 0.0, 1.0) * np.clip(cos_inc / 0.06, 0.0, 1.0)
    p_keep *= 1.0 - surf.absorption
    measured = dist.copy()
    if rng is None:
        keep = hit & (p_keep >= 0.5)
        noise_i = np.zeros(len(dist))
    else:
        keep = hit & (rng.random(len(dist)) < p_keep * (1 - model.random_dropout))
        measured = measured + rng.normal(0.0, model.range_noise, len(dist))
        noise_i = rng.normal(0.0, 2.0, len(dist))
    keep &= (measured >= model.min_range) & (measured <= model.max_range)

    idx = np.flatnonzero(keep)
    falloff = 1.0 - 0.35 * np.clip(measured[idx] / model.max_range, 0, 1)
    intensity = 255.0 * surf.reflectivity[idx] * (0.3 + 0.7 * cos_inc[idx]) * falloff
    intensity = np.clip(np.round(intensity + noise_i[idx]), 0, 255)

    cloud = np.zeros(len(idx), dtype=VELODYNE_DTYPE)
    xyz = d_sensor[idx] * measured[idx, None]
    cloud["x"], cloud["y"], cloud["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    cloud["intensity"] = intensity
    cloud["ring"] = model.rings[laser[idx]]
    cloud["time"] = t_rel[idx]
    return Scan(cloud=cloud, labels=surf.label[idx].copy())
