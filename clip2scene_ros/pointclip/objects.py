"""Object instances from a labelled cloud, and the axis change into PointCLIP's frame.

**Clustering.** Points of the "thing" classes (cars, people, ...) are split into instances by
connected components on a voxel grid: two occupied voxels of the same class are connected when
they touch by a face, an edge or a corner (26-neighbourhood). The pass is vectorised in torch:
neighbour voxels are found by ``searchsorted`` on sorted voxel keys for the 13 "forward" offsets
(the other 13 are the same edges reversed), and components by min-label hooking with full pointer
jumping (a parallel union-find). "Stuff" classes (road, vegetation, ...) are never clustered, so
a car standing on the road stays separate from the car next to it. Components with fewer than
``min_points`` points are dropped as noise.

**Boxes.** Oriented in the ground plane: the yaw is the principal axis of the x, y scatter
(closed form of the 2×2 PCA), length and width are the extents along and across it (length >=
width, yaw in [−π/2, π/2) since a point set has no front), height from the z extent.

**Axis convention.** LiDAR frames are x forward, y left, **z up**. PointCLIP's view sets were
built for the ModelNet h5 files, which are **y up** (PointNet rotates them about y, "the up
direction"); raw ModelNet ``.off`` meshes are z up like LiDAR. :func:`lidar_to_pointclip` applies
the proper rotation ``(x, y, z) → (x, z, −y)`` (reference §1.3): up becomes +y, so V1/V2 views
0–3 circle the object at its own height and the last two look from the top and the bottom, as
on ModelNet. It can first turn the object by −yaw so that its length lies along x in every
frame (the views then see a car from its side, front, ... regardless of its heading).
Centring and unit-sphere scaling follow in the projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

#: The 13 neighbour offsets whose first non-zero component is positive: with their reverses
#: they make the 26-neighbourhood, and each undirected voxel edge is found exactly once.
_FORWARD_OFFSETS = tuple(
    (a, b, c)
    for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
    if (a, b, c) > (0, 0, 0)
)


@dataclass(frozen=True)
class OrientedBox:
    """A box standing on the ground plane: centre (x, y, z), size (length, width, height), yaw.

    ``yaw`` turns +x towards +y (counter-clockwise seen from above) onto the length axis.
    """

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float

    def corners(self) -> np.ndarray:
        """``[8, 3]`` corners: bottom face then top face, counter-clockwise from (+l, +w)."""
        half_l, half_w, half_h = (s / 2 for s in self.size)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        local = np.array([[half_l, half_w], [-half_l, half_w], [-half_l, -half_w],
                          [half_l, -half_w]])
        xy = local @ np.array([[c, s], [-s, c]]) + np.array(self.center[:2])
        bottom = np.column_stack([xy, np.full(4, self.center[2] - half_h)])
        top = np.column_stack([xy, np.full(4, self.center[2] + half_h)])
        return np.vstack([bottom, top])


@dataclass(frozen=True)
class ObjectInstance:
    """One clustered object: its class, its points' indices in the cloud, its points, its box."""

    class_index: int
    indices: np.ndarray  # [n] int64, into the clustered cloud
    points: np.ndarray  # [n, 3] float32, the same points (LiDAR frame)
    box: OrientedBox

    @property
    def num_points(self) -> int:
        return int(self.indices.shape[0])


def _as_tensor(values: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", dtype)
    # a copy when needed: torch refuses views with negative strides (e.g. ``a[::-1]``)
    return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype)


def _union_find(num: int, src: Tensor, dst: Tensor) -> Tensor:
    """Component root (its smallest member) of each of ``num`` nodes joined by edges src–dst.

    Each round hooks every root to the smallest root it shares an edge with (roots only ever
    point to smaller indices, so no cycle can form), then jumps pointers until every node points
    at a root. Rounds end when no edge joins two roots; a few suffice on real clouds.
    """
    parent = torch.arange(num, device=src.device)
    while src.numel():
        a, b = parent[src], parent[dst]
        differ = a != b
        if not bool(differ.any()):
            break
        a, b = a[differ], b[differ]
        src, dst = src[differ], dst[differ]  # settled edges stay settled
        parent.scatter_reduce_(0, torch.maximum(a, b), torch.minimum(a, b), reduce="amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return parent


def voxel_components(points: Tensor | np.ndarray, voxel_size: float,
                     groups: Tensor | np.ndarray | None = None) -> np.ndarray:
    """Connected-component id per point (0, 1, ... in order of first point), 26-connectivity.

    Args:
        points: ``[N, >= 3]`` coordinates.
        voxel_size: grid cell edge; points in touching cells are connected.
        groups: optional ``[N]`` integer labels; points of different groups never connect.
    """
    if not voxel_size > 0:
        raise ConfigError("voxel_size", f"must be > 0, got {voxel_size}")
    pts = _as_tensor(points, torch.float64)
    if pts.dim() != 2 or pts.shape[1] < 3:
        raise ConfigError("points", f"must be [N, >= 3], got {tuple(pts.shape)}")
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not torch.isfinite(pts[:, :3]).all():
        raise ConfigError("points", "contain NaN or Inf")
    coords = torch.floor(pts[:, :3] / voxel_size).long()
    # a one-cell margin on every side: neighbour keys can then never wrap into another row
    coords = coords - coords.amin(dim=0) + 1
    dims = coords.amax(dim=0) + 2
    if groups is None:
        group = torch.zeros(n, dtype=torch.long)
    else:
        group = torch.unique(_as_tensor(groups, torch.long), return_inverse=True)[1]
        if group.shape != (n,):
            raise ConfigError("groups", f"must have one label per point ({n})")
    dx, dy, dz = (int(d) for d in dims)
    if (int(group.max()) + 1) * dx * dy * dz >= 2**62:
        raise ConfigError("voxel_size", f"{voxel_size} is too small for the cloud's extent")
    key = ((group * dx + coords[:, 0]) * dy + coords[:, 1]) * dz + coords[:, 2]
    voxels, point_voxel = torch.unique(key, return_inverse=True)  # sorted keys
    src_parts, dst_parts = [], []
    for ox, oy, oz in _FORWARD_OFFSETS:
        target = voxels + (ox * dy + oy) * dz + oz
        pos = torch.searchsorted(voxels, target).clamp_max(voxels.numel() - 1)
        hit = voxels[pos] == target
        src_parts.append(torch.nonzero(hit)[:, 0])
        dst_parts.append(pos[hit])
    root = _union_find(voxels.numel(), torch.cat(src_parts), torch.cat(dst_parts))
    point_root = root[point_voxel]
    # renumber components by their first point so ids are stable and follow the cloud's order
    first = torch.full((voxels.numel(),), n, dtype=torch.long)
    first.scatter_reduce_(0, point_root, torch.arange(n), reduce="amin")
    used = torch.unique(point_root)
    component = torch.full((voxels.numel(),), -1, dtype=torch.long)
    component[used[torch.argsort(first[used])]] = torch.arange(used.numel())
    return component[point_root].numpy()


def oriented_box(points: Tensor | np.ndarray) -> OrientedBox:
    """Ground-plane oriented box of ``[n >= 1, >= 3]`` points (PCA yaw over x, y)."""
    pts = np.asarray(points, dtype=np.float64)[:, :3]
    if pts.shape[0] == 0:
        raise ConfigError("points", "an empty object has no box")
    xy = pts[:, :2] - pts[:, :2].mean(axis=0)
    cxx, cyy = float((xy[:, 0] ** 2).mean()), float((xy[:, 1] ** 2).mean())
    cxy = float((xy[:, 0] * xy[:, 1]).mean())
    # principal direction of [[cxx, cxy], [cxy, cyy]]; atan2(0, 0) = 0 for a point or a disc
    yaw = 0.5 * math.atan2(2 * cxy, cxx - cyy)
    c, s = math.cos(yaw), math.sin(yaw)
    along, across = xy @ np.array([c, s]), xy @ np.array([-s, c])
    length, width = float(np.ptp(along)), float(np.ptp(across))
    mid_along = float(along.max() + along.min()) / 2
    mid_across = float(across.max() + across.min()) / 2
    if width > length:  # the widest scatter need not be the longest extent (e.g. an L shape)
        length, width = width, length
        yaw += math.pi / 2
    yaw = (yaw + math.pi / 2) % math.pi - math.pi / 2
    mean_xy = pts[:, :2].mean(axis=0)
    cx = mean_xy[0] + mid_along * c - mid_across * s
    cy = mean_xy[1] + mid_along * s + mid_across * c
    z_lo, z_hi = float(pts[:, 2].min()), float(pts[:, 2].max())
    return OrientedBox(center=(float(cx), float(cy), (z_lo + z_hi) / 2),
                       size=(length, width, z_hi - z_lo), yaw=float(yaw))


def cluster_objects(points: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                    thing_classes: Sequence[int], voxel_size: float = 0.25,
                    min_points: int = 10) -> list[ObjectInstance]:
    """Instances of the ``thing_classes`` in a labelled cloud, ordered by first point index.

    Args:
        points: ``[N, >= 3]`` LiDAR points (extra columns ignored).
        labels: ``[N]`` class index per point (negative = unlabelled, never clustered).
        thing_classes: class indices to cluster; every other class is stuff and ignored.
        voxel_size: grid cell in metres; objects closer than about one cell merge.
        min_points: smaller components are dropped as noise.
    """
    if min_points < 1:
        raise ConfigError("min_points", f"must be >= 1, got {min_points}")
    pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points)
    lab = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if pts.ndim != 2 or pts.shape[1] < 3 or lab.shape != (pts.shape[0],):
        raise ConfigError("labels", f"need points [N, >= 3] and labels [N], got "
                          f"{pts.shape} and {lab.shape}")
    things = np.asarray(sorted({int(c) for c in thing_classes}), dtype=np.int64)
    selected = np.nonzero(np.isin(lab, things))[0]
    if selected.size == 0:
        return []
    comp = voxel_components(pts[selected], voxel_size, groups=lab[selected])
    sizes = np.bincount(comp)
    order = np.argsort(comp, kind="stable")  # points grouped by component, in cloud order
    starts = np.concatenate([[0], np.cumsum(sizes)])
    objects = []
    for k in np.nonzero(sizes >= min_points)[0]:
        idx = selected[order[starts[k]:starts[k + 1]]].astype(np.int64)
        obj_pts = pts[idx, :3].astype(np.float32)
        objects.append(ObjectInstance(int(lab[idx[0]]), idx, obj_pts, oriented_box(obj_pts)))
    return objects


def instance_ids(num_points: int, objects: Sequence[ObjectInstance]) -> np.ndarray:
    """``[N]`` object index per point of the clustered cloud, −1 for points in no object."""
    ids = np.full(num_points, -1, dtype=np.int64)
    for i, obj in enumerate(objects):
        ids[obj.indices] = i
    return ids


def lidar_to_pointclip(points: Tensor | np.ndarray, yaw: float | None = None,
                       up: str = "z") -> Tensor:
    """``[n, 3]`` float32 points in PointCLIP's y-up frame (not yet centred or scaled).

    Args:
        points: ``[n, >= 3]`` points of one object.
        yaw: if given (e.g. ``box.yaw``), first turn the object by −yaw about the up axis so
            that its length lies along x.
        up: ``"z"`` for LiDAR / raw ModelNet (remapped ``(x, y, z) → (x, z, −y)``), ``"y"`` for
            clouds already in the ModelNet-h5 convention (kept as they are).
    """
    if up not in ("z", "y"):
        raise ConfigError("up_axis", f"must be 'z' or 'y', got {up!r}")
    p = (points if isinstance(points, Tensor) else torch.as_tensor(np.ascontiguousarray(points)))
    p = p[:, :3].to(torch.float32)
    if up == "y":
        # turning about y: express the object z-up first so one code path does the yaw
        p = torch.stack([p[:, 0], -p[:, 2], p[:, 1]], dim=1)
    if yaw is not None and yaw != 0.0:
        c, s = math.cos(yaw), math.sin(yaw)
        p = torch.stack([c * p[:, 0] + s * p[:, 1], -s * p[:, 0] + c * p[:, 1], p[:, 2]], dim=1)
    return torch.stack([p[:, 0], p[:, 2], -p[:, 1]], dim=1)
