"""Vectorised ray casting against a ``Scene`` (numpy; shared by the LiDAR and the cameras).

Rays come in *bundles*: small groups that are close in origin and direction (4x4 pixels, 4
lasers x 4 firings), grouped again into coarser levels (16x16, 64x64 pixels). Culling works on
bundles, not rays: each bundle is bounded by a cone (mean origin, axis, half-angle, origin
spread, time span) and tested against the bounding box of each primitive, level by level down
the hierarchy. Only the (ray, primitive) pairs of the bundles that pass are intersected
exactly, in chunks so memory stays bounded. Moving primitives are handled exactly by
intersecting each ray with the primitive where it is at the ray's own time. The terrain is
solved analytically for every ray.

No library does this: ray tracers with a Python API (e.g. Open3D's RaycastingScene, trimesh's
embree) are large native dependencies, handle triangles rather than analytic quadrics, and know
nothing of per-ray times for moving objects; the whole caster is a few hundred lines of numpy.

The caster is one piece (ray setup, per-primitive solvers, nearest hit): it is longer than
500 lines because splitting the solvers from the loop that shares their buffers would only add
indirection.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scene import CURB_HEIGHT, ROAD_HALF_WIDTH, SIDEWALK_OUTER, CullTable, Scene, Shape

GROUND = -1  # the terrain: road, raised sidewalks and their curbs, the ground beyond
MISS = -2
#: Nearest accepted hit distance: keeps secondary rays from re-hitting their own surface.
MIN_DISTANCE = 1e-4
#: Upper bound on (ray, primitive) pairs intersected at once (memory ~ 200 B per pair).
PAIR_CHUNK = 1 << 19
#: Slack (m) added to culling boxes against float32 rounding in the bundle test.
CULL_SLACK = 0.01


@dataclass(frozen=True)
class Hits:
    """Nearest hit of each ray.

    ``distance`` is along the (unit) ray direction, ``inf`` for a miss; ``prim`` is the primitive
    index, ``GROUND`` for the terrain (see ``terrain_hits``) or ``MISS``. ``rest`` is the hit
    point on the object at drive time 0 (texture coordinates), ``local``/``local_normal`` are in
    the primitive's frame (equal to world for the terrain). Missed rays have NaN points and
    zero normals.
    """

    distance: np.ndarray
    prim: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    rest: np.ndarray
    local: np.ndarray
    local_normal: np.ndarray


@dataclass(frozen=True)
class _Cones:
    """Bounds of ray groups: every ray starts within ``spread`` of ``origin``, points within
    ``half`` (radians) of ``axis`` and has a time within ``t_half`` of ``t_mid``."""

    origin: np.ndarray  # (B, 3)
    axis: np.ndarray  # (B, 3) unit
    half: np.ndarray  # (B,)
    spread: np.ndarray  # (B,)
    t_mid: np.ndarray  # (B,)
    t_half: np.ndarray  # (B,)
    weight: np.ndarray  # (B,) number of rays
    extra: np.ndarray  # (B,) extra reach: how far origins were slid back along the rays

    def take(self, index: np.ndarray) -> _Cones:
        return _Cones(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def table(self) -> _Cones:
        """float32 fields shaped (B, 1[, 3]) to broadcast against (P,) primitives."""
        return _Cones(*(getattr(self, f).astype(np.float32)[:, None]
                        for f in self.__dataclass_fields__))  # fmt: skip


def _groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, counts) of equal keys, stable."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    return order, starts, np.diff(np.r_[starts, len(order)])


def _unit(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``v`` normalised (x axis where a row is ~0) and the row norms."""
    norm = np.linalg.norm(v, axis=1)
    unit = np.where((norm > 1e-9)[:, None], v / np.maximum(norm, 1e-12)[:, None], [1.0, 0, 0])
    return unit, norm


def _ray_cones(o: np.ndarray, d: np.ndarray, t: np.ndarray, starts: np.ndarray,
               counts: np.ndarray, parallel: bool) -> _Cones:  # fmt: skip
    """Cones of consecutive runs of rays (already grouped).

    With ``parallel`` rays (one direction: shadow rays towards the sun), the origins of a run
    are first slid back along the direction onto the plane of the rearmost one, so the spread
    measures only the sideways scatter of the rays: a bundle of hit points at different depths
    stays tight. Sliding back only lengthens a ray, so culling stays conservative as long as
    the reach grows by the slide (``extra``).
    """
    extra = np.zeros(len(starts))
    if parallel:
        along = o @ d[0]
        slide = along - np.repeat(np.minimum.reduceat(along, starts), counts)
        o = o - slide[:, None] * d[0]
        extra = np.maximum.reduceat(slide, starts)
    mean_o = np.add.reduceat(o, starts, axis=0) / counts[:, None]
    axis, _ = _unit(np.add.reduceat(d, starts, axis=0))
    cos_dev = np.einsum("ij,ij->i", d, np.repeat(axis, counts, axis=0))
    half = np.arccos(np.clip(np.minimum.reduceat(cos_dev, starts), -1.0, 1.0))
    dev = np.linalg.norm(o - np.repeat(mean_o, counts, axis=0), axis=1)
    t_min, t_max = np.minimum.reduceat(t, starts), np.maximum.reduceat(t, starts)
    return _Cones(mean_o, axis, half, np.maximum.reduceat(dev, starts), (t_min + t_max) / 2,
                  (t_max - t_min) / 2, counts.astype(np.float64), extra)  # fmt: skip


def _merge_cones(c: _Cones, starts: np.ndarray, counts: np.ndarray) -> _Cones:
    """Cones bounding consecutive runs of cones."""
    w = c.weight[:, None]
    weight = np.add.reduceat(c.weight, starts)
    origin = np.add.reduceat(c.origin * w, starts, axis=0) / weight[:, None]
    spread = np.maximum.reduceat(
        np.linalg.norm(c.origin - np.repeat(origin, counts, axis=0), axis=1) + c.spread, starts)
    axis, norm = _unit(np.add.reduceat(c.axis * w, starts, axis=0))
    cos_dev = np.einsum("ij,ij->i", c.axis, np.repeat(axis, counts, axis=0))
    half = np.minimum(np.pi, np.maximum.reduceat(np.arccos(np.clip(cos_dev, -1, 1)) + c.half,
                                                 starts))  # fmt: skip
    half[norm < 1e-6 * weight] = np.pi  # rays all around (a whole LiDAR sweep)
    t_lo = np.minimum.reduceat(c.t_mid - c.t_half, starts)
    t_hi = np.maximum.reduceat(c.t_mid + c.t_half, starts)
    return _Cones(origin, axis, half, spread, (t_lo + t_hi) / 2, (t_hi - t_lo) / 2, weight,
                  np.maximum.reduceat(c.extra, starts))  # fmt: skip


#: Cones wider than this (radians) are culled by range only.
WIDE_CONE = 1.0


def _cone_meets_boxes(c: _Cones, b: CullTable, max_distance: float) -> np.ndarray:
    """May a ray of cone c hit the primitive in bounding box b? Never a false negative.

    A ray i of the cone that hits the box at distance s passes within ``spread + s * half`` of
    the cone's axis ray at the same distance (origins within ``spread``, directions within
    ``half``: the chord is shorter than the arc), so the axis ray hits the box grown by that
    much on every side; s is at most the distance to the box centre plus the box's radius.
    Moving boxes grow by ``speed * t_half``. Arguments broadcast: cone fields shaped (B, 1)
    against (P,) boxes give a (B, P) table; equal lengths give an element-wise test.
    """
    wx = c.origin[..., 0] - (b.center[..., 0] + c.t_mid * b.velocity[..., 0])
    wy = c.origin[..., 1] - (b.center[..., 1] + c.t_mid * b.velocity[..., 1])
    wz = c.origin[..., 2] - (b.center[..., 2] + c.t_mid * b.velocity[..., 2])
    dist = np.sqrt(wx * wx + wy * wy + wz * wz)
    grow = (c.spread + CULL_SLACK + b.speed * c.t_half
            + (dist + c.spread + b.radius) * c.half)  # fmt: skip
    cs, sn = b.cos_yaw, b.sin_yaw
    ax, ay, az = c.axis[..., 0], c.axis[..., 1], c.axis[..., 2]
    near, far = -np.inf, np.inf
    for o, d, h in ((cs * wx + sn * wy, cs * ax + sn * ay, b.half[..., 0]),
                    (cs * wy - sn * wx, cs * ay - sn * ax, b.half[..., 1]),
                    (wz, az, b.half[..., 2])):  # fmt: skip
        inv = 1.0 / np.where(d == 0, np.float32(1e-30), d)
        t1, t2 = (-(h + grow) - o) * inv, ((h + grow) - o) * inv
        near = np.maximum(near, np.minimum(t1, t2))
        far = np.minimum(far, np.maximum(t1, t2))
    hit = (near <= far) & (far >= 0) & (near <= max_distance + c.extra + grow)
    reach = dist - b.radius - c.spread - b.speed * c.t_half <= max_distance + c.extra
    return np.where(c.half > WIDE_CONE, reach, hit)


def _sparse_level(child: _Cones, runs: tuple[np.ndarray, np.ndarray], pair_parent: np.ndarray,
                  pair_prim: np.ndarray, boxes: CullTable, max_distance: float
                  ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every child of a parent x every candidate primitive of the parent, element-wise.

    ``runs`` = (first child, number of children) of each parent; pairs come sorted by parent
    then primitive, and the surviving (child, primitive) pairs come out sorted the same way.
    """
    first, count = runs
    n_cand = np.bincount(pair_parent, minlength=len(first))
    cand_start = np.cumsum(n_cand) - n_cand
    # The children of parents that have candidates, and each child's parent.
    active = np.flatnonzero(n_cand)
    nchild = count[active]
    parent = np.repeat(active, nchild)
    children = np.arange(int(nchild.sum())) + np.repeat(first[active] - (np.cumsum(nchild)
                                                                          - nchild), nchild)
    # Each child repeated once per candidate of its parent, with those candidates.
    n = n_cand[parent]
    c = np.repeat(children, n)
    m = pair_prim[np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n - cand_start[parent], n)]
    ok = _cone_meets_boxes(child.take(c), boxes.take(m), max_distance)
    return c[ok], m[ok]


def _candidate_pairs(scene: Scene, fine: _Cones, keys: list[np.ndarray], max_distance: float
                     ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(fine bundle, primitive) pairs that survive culling, grouped by bundle.

    ``keys`` give each fine bundle its group at each coarser level (nested, finest first).
    Culling runs top-down: the union of all rays against every primitive (drops what is out
    of range or behind a camera), the coarsest groups against what is left (a dense table),
    then at each finer level every child against its parent's candidates, so the work follows
    the number of candidates rather than bundles x primitives.
    """
    boxes = scene.cull_table
    n = len(fine.weight)
    # Order fine bundles so that every group at every level is a contiguous run.
    perm = np.lexsort((np.arange(n), *keys)) if keys else np.arange(n)
    boundary = np.zeros(n, dtype=bool)
    boundary[0] = True
    bounds = []
    for k in reversed(keys):  # coarse to fine: a group boundary is one at every finer level
        kk = k[perm]
        boundary[1:] |= kk[1:] != kk[:-1]
        bounds.append(np.flatnonzero(boundary))
    bounds = [np.arange(n), *reversed(bounds)]  # fine positions where each level's groups start
    cones, runs = [fine.take(perm)], []
    for level in range(1, len(bounds)):
        first = np.searchsorted(bounds[level - 1], bounds[level])
        count = np.diff(np.r_[first, len(bounds[level - 1])])
        cones.append(_merge_cones(cones[-1], first, count))
        runs.append((first, count))
    top = cones[-1]
    everything = _merge_cones(top, np.zeros(1, np.int64), np.array([len(top.weight)]))
    idx = np.flatnonzero(_cone_meets_boxes(everything.table(), boxes, max_distance)[0])
    if idx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ok = _cone_meets_boxes(top.table(), boxes.take(idx), max_distance)
    pair_c, pair_m = np.nonzero(ok)
    pair_m = idx[pair_m]
    f32 = [_Cones(*(getattr(c, k).astype(np.float32) for k in c.__dataclass_fields__))
           for c in cones]  # fmt: skip
    for level in range(len(runs) - 1, -1, -1):
        pair_c, pair_m = _sparse_level(f32[level], runs[level], pair_c, pair_m, boxes,
                                       max_distance)  # fmt: skip
    return perm[pair_c], pair_m


def _expand(order: np.ndarray, starts: np.ndarray, counts: np.ndarray, pair_b: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Ray indices of the (bundle, primitive) pairs, one run per pair, and the run lengths."""
    n = counts[pair_b]
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n - starts[pair_b], n)
    return order[offset], n


Columns = tuple[np.ndarray, np.ndarray, np.ndarray]


def _to_local(tables: tuple[np.ndarray, ...], prim: np.ndarray, o: np.ndarray, d: np.ndarray,
              t: np.ndarray) -> tuple[Columns, Columns]:  # fmt: skip
    """Ray origins/directions in each primitive's frame at the ray's time, as x, y, z columns
    (separate 1-D arrays: numpy is much faster on them than on the columns of an (n, 3)).
    ``tables`` = ``Scene.tables`` (center, velocity, half, cos yaw, sin yaw)."""
    center, velocity, _, cos_yaw, sin_yaw = tables
    c, s = cos_yaw[prim], sin_yaw[prim]
    center, velocity = center[prim], velocity[prim]
    qx = o[:, 0] - center[:, 0] - velocity[:, 0] * t
    qy = o[:, 1] - center[:, 1] - velocity[:, 1] * t
    qz = o[:, 2] - center[:, 2] - velocity[:, 2] * t
    dx, dy = d[:, 0], d[:, 1]
    return (c * qx + s * qy, c * qy - s * qx, qz), (c * dx + s * dy, c * dy - s * dx, d[:, 2])


def _slab(o: np.ndarray, d: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / np.where(d == 0.0, np.float32(1e-30), d)
    t1, t2 = (-h - o) * inv, (h - o) * inv
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _intersect_box(o: Columns, d: Columns, h: Columns) -> np.ndarray:
    (n0, f0), (n1, f1), (n2, f2) = (_slab(o[k], d[k], h[k]) for k in range(3))
    near = np.maximum(np.maximum(n0, n1), n2)
    far = np.minimum(np.minimum(f0, f1), f2)
    return np.where((near <= far) & (near > MIN_DISTANCE), near, np.inf)


def _intersect_cylinder(o: Columns, d: Columns, h: Columns) -> np.ndarray:
    """Capped cylinder with its axis along local z, radius ``h[0]``, half height ``h[2]``."""
    (ox, oy, oz), (dx, dy, dz), radius, half = o, d, h[0], h[2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - radius * radius
    disc = b * b - a * c
    side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    z = oz + side * dz
    side = np.where((disc >= 0) & (a > 1e-12) & (np.abs(z) <= half) & (side > MIN_DISTANCE),
                    side, np.inf)  # fmt: skip
    cap = (np.where(oz > 0, half, -half) - oz) / dz
    x, y = ox + cap * dx, oy + cap * dy
    cap_ok = (np.abs(oz) > half) & (cap > MIN_DISTANCE) & (x * x + y * y <= radius * radius)
    return np.minimum(side, np.where(cap_ok, cap, np.inf))


def _intersect_ellipsoid(o: Columns, d: Columns, h: Columns) -> np.ndarray:
    os = [o[k] / h[k] for k in range(3)]
    ds = [d[k] / h[k] for k in range(3)]
    a = ds[0] * ds[0] + ds[1] * ds[1] + ds[2] * ds[2]
    b = os[0] * ds[0] + os[1] * ds[1] + os[2] * ds[2]
    c = os[0] * os[0] + os[1] * os[1] + os[2] * os[2] - 1.0
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > MIN_DISTANCE), t, np.inf)


@np.errstate(all="ignore")  # rays parallel to a face or an axis divide by zero: inf is right
def _intersect(shape: int, o: Columns, d: Columns, half: np.ndarray) -> np.ndarray:
    """Distance along each ray to its primitive (local frame), ``inf`` where it misses."""
    h = (half[:, 0], half[:, 1], half[:, 2])
    if shape == Shape.BOX:
        return _intersect_box(o, d, h)
    if shape == Shape.CYLINDER:
        return _intersect_cylinder(o, d, h)
    if shape == Shape.WHEEL:  # a cylinder along y: swap y and z
        return _intersect_cylinder((o[0], o[2], o[1]), (d[0], d[2], d[1]), (h[0], h[2], h[1]))
    return _intersect_ellipsoid(o, d, h)


def _local_normal(shape: np.ndarray, p: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Outward unit normals at local hit points ``p`` of primitives of half extents ``h``."""
    n = np.zeros_like(p)
    rows = np.arange(len(p))
    box = shape == Shape.BOX
    if box.any():
        q = np.abs(p[box]) / h[box]
        ax = np.argmax(q, axis=1)
        nb = np.zeros((int(box.sum()), 3))
        nb[np.arange(len(ax)), ax] = np.sign(p[box][np.arange(len(ax)), ax])
        n[box] = nb
    for kind, (ra, rb, ax) in ((Shape.CYLINDER, (0, 1, 2)), (Shape.WHEEL, (0, 2, 1))):
        sel = rows[shape == kind]
        if sel.size == 0:
            continue
        pc, hc = p[sel], h[sel]
        radial = np.hypot(pc[:, ra], pc[:, rb]) / hc[:, ra]
        along = np.abs(pc[:, ax]) / hc[:, ax]
        cap = along > radial
        nc = np.zeros((len(sel), 3))
        nc[:, ra] = np.where(cap, 0.0, pc[:, ra])
        nc[:, rb] = np.where(cap, 0.0, pc[:, rb])
        nc[:, ax] = np.where(cap, np.sign(pc[:, ax]), 0.0)
        n[sel] = nc
    ell = shape == Shape.ELLIPSOID
    if ell.any():
        n[ell] = p[ell] / h[ell] ** 2
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def _object_hits(scene: Scene, origins: np.ndarray, directions: np.ndarray, times: np.ndarray,
                 bundle: np.ndarray, groups: Sequence[np.ndarray], max_distance: float,
                 parallel: bool = False, cull: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """All (ray, primitive, distance) hits with a primitive closer than ``max_distance``."""
    order, starts, counts = _groups(bundle)
    if cull:
        fine = _ray_cones(origins[order], directions[order], times[order], starts, counts,
                          parallel)  # fmt: skip
        keys = [np.asarray(g)[order[starts]] for g in groups]
        pair_b, pair_m = _candidate_pairs(scene, fine, keys, max_distance)
    else:  # every bundle against every primitive: the reference the culling must match
        pair_b, pair_m = (a.ravel() for a in np.meshgrid(np.arange(len(starts)),
                                                          np.arange(scene.num_primitives),
                                                          indexing="ij"))  # fmt: skip
    rays_out, prims_out, dist_out = [], [], []
    # float32 from here: ranges stay below a few hundred metres, where it is exact to ~20 µm,
    # and it halves the memory traffic of the (ray, primitive) rows.
    o32, d32, t32 = (a.astype(np.float32) for a in (origins, directions, times))
    tables = scene.tables32
    shape_of_pair = scene.shape[pair_m]
    for kind in np.unique(shape_of_pair):
        sel = np.flatnonzero(shape_of_pair == kind)
        kb, km = pair_b[sel], pair_m[sel]
        # Chunk the pairs so the expanded (ray, primitive) rows stay under PAIR_CHUNK.
        cum = np.cumsum(counts[kb])
        bounds = np.searchsorted(cum, np.arange(PAIR_CHUNK, int(cum[-1]), PAIR_CHUNK))
        edges = np.unique(np.r_[0, bounds, len(kb)])
        for lo, hi in itertools.pairwise(edges):
            r, n = _expand(order, starts, counts, kb[lo:hi])
            m = np.repeat(km[lo:hi], n)
            lo_, ld = _to_local(tables, m, o32[r], d32[r], t32[r])
            dist = _intersect(int(kind), lo_, ld, tables[2][m])
            hit = dist < max_distance
            rays_out.append(r[hit])
            prims_out.append(m[hit])
            dist_out.append(dist[hit].astype(np.float64))
    if not rays_out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rays_out), np.concatenate(prims_out), np.concatenate(dist_out)


def _check_rays(origins: np.ndarray, directions: np.ndarray, times: np.ndarray,
                bundle: np.ndarray, groups: Sequence[np.ndarray]) -> None:  # fmt: skip
    n = len(origins)
    if origins.shape != (n, 3) or directions.shape != (n, 3):
        raise ValueError(f"origins and directions must be (N, 3), got {origins.shape} and "
                         f"{directions.shape}")  # fmt: skip
    if times.shape != (n,) or bundle.shape != (n,):
        raise ValueError(f"times and bundle must be ({n},), got {times.shape} and {bundle.shape}")
    for i, g in enumerate(groups):
        if np.shape(g) != (n,):
            raise ValueError(f"groups[{i}] must be ({n},), got {np.shape(g)}")
    if n and not np.allclose(np.linalg.norm(directions, axis=1), 1.0, atol=1e-6):
        raise ValueError("ray directions must be unit vectors")


def terrain_hits(origins: np.ndarray, directions: np.ndarray, max_distance: float
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Distance to the terrain along each ray (``inf`` if none) and whether the hit is on a
    vertical face (a curb) rather than a horizontal surface.

    The terrain is the street's cross-section extruded along x: ground at z = 0, sidewalks
    raised to ``CURB_HEIGHT`` for ``ROAD_HALF_WIDTH <= |y| <= SIDEWALK_OUTER``, with vertical
    faces at both edges. Solved analytically for every ray, like a ground plane: sidewalks as
    boxes would be long, flat primitives whose culling spheres cover half of every image.
    """
    oy, oz = origins[:, 1], origins[:, 2]  # the terrain does not change along x
    dy, dz = directions[:, 1], directions[:, 2]
    best = np.full(len(origins), np.inf)
    face = np.zeros(len(origins), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for height in (0.0, CURB_HEIGHT):
            t = (height - oz) / dz
            ay = np.abs(oy + t * dy)
            raised = (ay >= ROAD_HALF_WIDTH) & (ay <= SIDEWALK_OUTER)
            ok = (t > MIN_DISTANCE) & (raised if height > 0 else ~raised)
            closer = ok & (t < best)
            best[closer] = t[closer]
        for edge in (-SIDEWALK_OUTER, -ROAD_HALF_WIDTH, ROAD_HALF_WIDTH, SIDEWALK_OUTER):
            t = (edge - oy) / dy
            z = oz + t * dz
            closer = (t > MIN_DISTANCE) & (z >= 0.0) & (z <= CURB_HEIGHT) & (t < best)
            best[closer] = t[closer]
            face |= closer  # faces are tested last, so a face hit is never undercut
    best[best >= max_distance] = np.inf
    return best, face & np.isfinite(best)


def _bundle_ids(bundle: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) // 16 if bundle is None else np.asarray(bundle)


def nearest_hits(scene: Scene, origins: np.ndarray, directions: np.ndarray, times: np.ndarray,
                 bundle: np.ndarray | None = None, groups: Sequence[np.ndarray] = (), *,
                 max_distance: float, cull: bool = True) -> Hits:  # fmt: skip
    """Nearest hit of each ray (unit ``directions``) at drive ``times``, terrain included.

    ``bundle`` (N,) groups rays that are close in origin and direction (e.g. 4x4 pixels; by
    default runs of 16 consecutive rays) and each of ``groups`` (N,) groups the previous
    level's groups (e.g. 16x16, then 64x64 pixels; nested). Grouping only affects speed, never
    the result; ``cull=False`` tests every ray against every primitive (slow; a reference).
    """
    origins = np.asarray(origins, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    bundle = _bundle_ids(bundle, len(origins))
    _check_rays(origins, directions, times, bundle, groups)
    n = len(origins)
    prim = np.full(n, MISS, dtype=np.int64)
    best, y_face = terrain_hits(origins, directions, max_distance)
    prim[np.isfinite(best)] = GROUND
    if n:
        ray, m, dist = _object_hits(scene, origins, directions, times, bundle, groups,
                                    max_distance, cull=cull)  # fmt: skip
        np.minimum.at(best, ray, dist)
        win = dist == best[ray]
        prim[ray[win]] = m[win]

    point = origins + np.where(prim == MISS, 0.0, best)[:, None] * directions
    point[prim == MISS] = np.nan
    normal = np.zeros((n, 3))
    local = point.copy()
    local_normal = np.zeros((n, 3))
    rest = point.copy()
    g = prim == GROUND
    up = g & ~y_face
    normal[up, 2] = local_normal[up, 2] = 1.0
    side = g & y_face  # curb faces look back at the ray
    normal[side, 1] = local_normal[side, 1] = -np.sign(directions[side, 1])
    obj = np.flatnonzero(prim >= 0)
    if obj.size:
        m = prim[obj]
        lo, ld = _to_local(scene.tables, m, origins[obj], directions[obj], times[obj])
        lp = np.stack(lo, axis=1) + best[obj, None] * np.stack(ld, axis=1)
        ln = _local_normal(scene.shape[m], lp, scene.half[m])
        c, s = scene.tables[3][m], scene.tables[4][m]
        normal[obj] = np.stack([c * ln[:, 0] - s * ln[:, 1], s * ln[:, 0] + c * ln[:, 1],
                                ln[:, 2]], axis=1)  # fmt: skip
        local[obj], local_normal[obj] = lp, ln
        rest[obj] = point[obj] - scene.velocity[m] * times[obj, None]
    return Hits(best, prim, point, normal, rest, local, local_normal)


def occluded(scene: Scene, origins: np.ndarray, direction: np.ndarray, times: np.ndarray,
             bundle: np.ndarray | None = None, groups: Sequence[np.ndarray] = (), *,
             max_distance: float, cull: bool = True) -> np.ndarray:  # fmt: skip
    """(N,) bool: does a primitive lie within ``max_distance`` on the rays from ``origins``
    along one unit ``direction`` (shadow rays towards a directional light)? The terrain never
    occludes (these rays go up). Bundles and groups as for ``nearest_hits``."""
    origins = np.asarray(origins, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64)
    if direction.shape != (3,):
        raise ValueError(f"direction must be one (3,) vector, got shape {direction.shape}")
    directions = np.broadcast_to(direction, origins.shape)
    times = np.asarray(times, dtype=np.float64)
    bundle = _bundle_ids(bundle, len(origins))
    _check_rays(origins, directions, times, bundle, groups)
    out = np.zeros(len(origins), dtype=bool)
    if len(origins):
        ray, _, _ = _object_hits(scene, origins, directions, times, bundle, groups,
                                 max_distance, parallel=True, cull=cull)  # fmt: skip
        out[ray] = True
    return out
