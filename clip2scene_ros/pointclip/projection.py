"""PointCLIP multi-view depth images of point-cloud objects, batched in torch.

Two projections, both following the reference code (``shared/reference/pointclip.md`` §1):

* **V1** (PointCLIP, after SimpleView): every view rotates the cloud (``p · Rᵀ`` with
  ``R = Rx·Ry·Rz`` of the view's Euler angles), moves it ``distance`` in front of a pinhole
  camera with unit focal length (``z_cam = z + distance``) and splats each point onto exactly one
  pixel: ``row = ceil((x/z + 1)·R/2 − 0.5)``, ``col = ceil((y/z + 1)·R/2 − 0.5)`` (SimpleView's
  ``distribute`` with a 1×1 splat offsets by −0.5 before the ``ceil``, i.e. nearest pixel). A
  pixel holds the *harmonic mean* of the depths landing on it (``n / Σ 1/d``, the reference's
  ``scatter_add`` of 1/d weights); ``reduce="min"`` gives a z-buffer instead. Empty pixels are 0.
  Zero-shot renders 6 views at 128 px from 1.6, few-shot 10 views at 224 px from 1.4.
* **V2** ("realistic projection"): per view, orthographic and scale-invariant: the rotated cloud
  is re-centred on its bounding box, scaled by its largest extent to [−1, 1], shrunk by
  ``obj_ratio`` in x, y and scatter-maxed into a ``depth × resolution²`` grid whose value is the
  continuous depth bin; a 7×7 spatial max-pool densifies it (padding 2, so 112 → 110 px), a
  normalised 3×3 Gaussian (σ 3) smooths it, the max over depth squeezes it, and the image is
  divided by its maximum and inverted (white background, farther surfaces darker).

Images are laid out ``[row, col]`` with rows from the camera x and columns from the camera y,
as in both references. Inputs are expected in the PointCLIP frame (ModelNet-h5 convention:
**y up**); :func:`clip2scene_ros.pointclip.objects.lidar_to_pointclip` maps a z-up LiDAR object
into it. With y up, V1 views 0–3 circle the object about the vertical axis and views 4/5 look
from the top and the bottom.

Objects are a list of ``[N_i, 3]`` clouds of any size (one point included); they are packed into
one ``[P, 3]`` tensor with an object index, so all objects and views go through one scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

Projection = Literal["v1", "v2"]
#: A radius or extent below this is treated as a single point (normalised with scale 1).
_DEGENERATE = 1e-9
#: Points closer to the V1 camera than this are dropped (they would flip through x/z).
_MIN_DEPTH = 1e-6

_HALF_PI = math.pi / 2
_SIDES = tuple((k * _HALF_PI, 0.0, _HALF_PI) for k in range(4))
_TOP_BOTTOM = ((0.0, -_HALF_PI, _HALF_PI), (0.0, _HALF_PI, _HALF_PI))
_DIAGONALS_V1 = (
    (5 * math.pi / 4, -math.pi / 4, _HALF_PI),
    (5 * math.pi / 4, math.pi / 4, _HALF_PI),
    (7 * math.pi / 4, -math.pi / 4, _HALF_PI),
    (7 * math.pi / 4, math.pi / 4, _HALF_PI),
)
_DIAGONALS_V2 = tuple(((2 * k + 1) * math.pi / 4, 0.0, _HALF_PI) for k in range(4))


@dataclass(frozen=True)
class ViewSet:
    """Camera directions as Euler triples (x, y, z) in radians, plus per-set V1 settings.

    ``bias`` is V2's second rotation per view (applied after the first, "to reveal more
    surface"); ``distance`` and ``resolution`` are the V1 camera distance (``|TRANS|``) and render
    size of the reference configuration this set comes from.
    """

    name: str
    angles: tuple[tuple[float, float, float], ...]
    bias: tuple[tuple[float, float, float], ...] | None = None
    distance: float = 1.6
    resolution: int = 128

    def __post_init__(self) -> None:
        if not self.angles:
            raise ConfigError("views", f"view set {self.name!r} has no views")
        if self.bias is not None and len(self.bias) != len(self.angles):
            raise ConfigError("views", f"view set {self.name!r}: {len(self.bias)} bias rotations "
                              f"for {len(self.angles)} views")
        if not self.distance > 1.0:
            # a unit-sphere object must lie entirely in front of the camera
            raise ConfigError("distance", f"must be > 1 (unit-sphere objects), got "
                              f"{self.distance}")
        if self.resolution < 2:
            raise ConfigError("resolution", f"must be >= 2, got {self.resolution}")

    @property
    def num_views(self) -> int:
        return len(self.angles)

    def rotations(self, device: torch.device | str | None = None) -> Tensor:
        """``[M, 3, 3]`` matrices ``A`` with ``p_view = p @ A`` (row vectors), float32.

        ``A = R1ᵀ`` (V1) or ``R1ᵀ·R2ᵀ`` (V2 with its bias rotation), matching the references'
        ``matmul(points, euler2mat(angle).transpose(1, 2))``. Built in float64 so that the
        axis-aligned views come out with exact zeros and ones.
        """
        rot = euler_to_matrix(torch.tensor(self.angles, dtype=torch.float64)).transpose(1, 2)
        if self.bias is not None:
            bias = euler_to_matrix(torch.tensor(self.bias, dtype=torch.float64))
            rot = rot @ bias.transpose(1, 2)
        rot = torch.where(rot.abs() < 1e-12, torch.zeros_like(rot), rot)
        return rot.to(device=device, dtype=torch.float32)


#: The reference's view sets: V1 zero-shot (6 views, 1.6, 128 px), V1 few-shot (10 views: 4 side,
#: 4 diagonal, top/bottom; 1.4, 224 px) and V2 (4 diagonal sides, 4 axis sides, top/bottom, each
#: tilted by π/9, top/bottom by π/15).
VIEW_SETS: dict[str, ViewSet] = {
    "v1_zeroshot": ViewSet("v1_zeroshot", _SIDES + _TOP_BOTTOM, None, 1.6, 128),
    "v1_fewshot": ViewSet("v1_fewshot", _SIDES + _DIAGONALS_V1 + _TOP_BOTTOM, None, 1.4, 224),
    "v2": ViewSet("v2", _DIAGONALS_V2 + _SIDES + _TOP_BOTTOM,
                  ((0.0, math.pi / 9, 0.0),) * 8 + ((0.0, math.pi / 15, 0.0),) * 2, 1.5, 128),
}


@dataclass(frozen=True)
class V2Config:
    """Realistic-projection sizes (reference §1.2, ``zeroshot_cls/trainers/mv_utils_zs.py``)."""

    resolution: int = 112
    depth: int = 8
    depth_bias: float = 0.2
    obj_ratio: float = 0.8
    maxpool_xy: int = 7
    maxpool_pad_xy: int = 2
    gauss_xy: int = 3
    gauss_sigma: float = 3.0

    def __post_init__(self) -> None:
        if self.resolution < 4 or self.depth < 3:
            raise ConfigError("v2", f"resolution must be >= 4 and depth >= 3, got "
                              f"{self.resolution}, {self.depth}")
        if self.maxpool_xy < 1 or self.gauss_xy < 1 or self.gauss_xy % 2 == 0:
            raise ConfigError("v2", "max-pool size must be >= 1 and the Gaussian size odd")
        if not 0 < self.obj_ratio <= 1:
            raise ConfigError("obj_ratio", f"must be in (0, 1], got {self.obj_ratio}")

    @property
    def image_size(self) -> int:
        """Side of the squeezed image: the max-pool with padding 2 < 7 // 2 shrinks the grid."""
        return self.resolution + 2 * self.maxpool_pad_xy - self.maxpool_xy + 1

    def gaussian(self) -> Tensor:
        """The smoothing kernel, ``[k, k]``, normalised to sum 1 (bias 0 in the reference)."""
        xs = torch.arange(self.gauss_xy, dtype=torch.float64) - self.gauss_xy // 2
        g = torch.exp(-(xs**2) / (2 * self.gauss_sigma**2))
        kernel = g[:, None] * g[None, :]
        return (kernel / kernel.sum()).float()


def view_set(views: str | ViewSet) -> ViewSet:
    if isinstance(views, ViewSet):
        return views
    if views not in VIEW_SETS:
        raise ConfigError("views", f"unknown view set {views!r}; choose from {sorted(VIEW_SETS)}")
    return VIEW_SETS[views]


def euler_to_matrix(angles: Tensor) -> Tensor:
    """``[M, 3]`` Euler triples (x, y, z) to ``[M, 3, 3]`` matrices ``Rx·Ry·Rz`` (SfmLearner's)."""
    x, y, z = angles.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    return rx @ ry @ rz


def pack_objects(objects: Sequence[Tensor | np.ndarray], device: torch.device | str | None = None
                 ) -> tuple[Tensor, Tensor, int]:
    """``(points [P, 3] float32, object index [P] int64, number of objects)``.

    Extra columns (intensity, ...) are ignored; every object needs at least one point.
    """
    if len(objects) == 0:
        raise ConfigError("objects", "no objects to project")
    parts: list[Tensor] = []
    for i, obj in enumerate(objects):
        t = torch.as_tensor(obj)
        if t.dim() != 2 or t.shape[1] < 3 or t.shape[0] < 1:
            raise ConfigError(f"objects[{i}]", f"must be an [N >= 1, >= 3] array of points, "
                              f"got shape {tuple(t.shape)}")
        parts.append(t[:, :3].to(device=device, dtype=torch.float32))
    if device is None:
        device = parts[0].device
    parts = [p.to(device) for p in parts]
    counts = torch.tensor([p.shape[0] for p in parts], device=device)
    index = torch.repeat_interleave(torch.arange(len(parts), device=device), counts)
    points = torch.cat(parts)
    if not torch.isfinite(points).all():
        raise ConfigError("objects", "points contain NaN or Inf")
    return points, index, len(parts)


def _segment_reduce(values: Tensor, index: Tensor, groups: int, reduce: str) -> Tensor:
    """Per-group ``amin``/``amax``/``sum`` of ``[P, K]`` rows into ``[groups, K]``."""
    init = {"amin": math.inf, "amax": -math.inf, "sum": 0.0}[reduce]
    out = torch.full((groups, values.shape[1]), init, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index[:, None].expand_as(values), values, reduce=reduce,
                               include_self=True)


def normalize_unit_sphere(points: Tensor, index: Tensor, num_objects: int) -> Tensor:
    """Centre each object on its centroid and scale its farthest point to radius 1.

    This is what the ModelNet h5 files PointCLIP was built on already are (the reference code
    does not normalise). An object whose points all coincide keeps scale 1, so one or two equal
    points end up at the origin instead of becoming NaN.
    """
    sums = _segment_reduce(points, index, num_objects, "sum")
    counts = torch.bincount(index, minlength=num_objects).clamp_min(1).to(points.dtype)
    centred = points - (sums / counts[:, None])[index]
    radius = _segment_reduce(centred.norm(dim=1, keepdim=True), index, num_objects, "amax")[:, 0]
    radius = torch.where(radius > _DEGENERATE, radius, torch.ones_like(radius))
    return centred / radius[index, None]


def render_v1(objects: Sequence[Tensor | np.ndarray], views: str | ViewSet = "v1_zeroshot",
              resolution: int | None = None, distance: float | None = None,
              reduce: Literal["harmonic", "min"] = "harmonic", normalize: bool = True,
              device: torch.device | str | None = None) -> Tensor:
    """``[O, M, R, R]`` V1 depth maps (0 where empty); ``R``/distance default to the view set's.

    Args:
        objects: clouds in the PointCLIP frame (y up).
        reduce: ``"harmonic"`` (the reference: ``n / Σ 1/d`` over a pixel's points) or ``"min"``
            (nearest point, a z-buffer).
        normalize: centre and scale each object to the unit sphere first (the views assume it);
            off only for clouds that are already normalised, e.g. augmented training copies.
    """
    vs = view_set(views)
    res = vs.resolution if resolution is None else int(resolution)
    dist = vs.distance if distance is None else float(distance)
    if res < 2 or not dist > 0:
        raise ConfigError("resolution", f"resolution must be >= 2 and distance > 0, got {res}, "
                          f"{dist}")
    if reduce not in ("harmonic", "min"):
        raise ConfigError("reduce", f"must be 'harmonic' or 'min', got {reduce!r}")
    points, index, num = pack_objects(objects, device)
    if normalize:
        points = normalize_unit_sphere(points, index, num)
    rot = vs.rotations(points.device)
    m = rot.shape[0]
    cam = torch.einsum("pi,mij->mpj", points, rot)  # [M, P, 3]
    depth = cam[..., 2] + dist
    ok = depth > _MIN_DEPTH
    safe = torch.where(ok, depth, torch.ones_like(depth))
    row = torch.ceil((cam[..., 0] / safe + 1) * res / 2 - 0.5)
    col = torch.ceil((cam[..., 1] / safe + 1) * res / 2 - 0.5)
    ok &= (row >= 0) & (row <= res - 1) & (col >= 0) & (col <= res - 1)
    view = torch.arange(m, device=points.device)[:, None].expand_as(row)
    image = index[None, :].expand_as(row) * m + view  # which (object, view) image
    flat = ((image * res + row.long().clamp(0, res - 1)) * res + col.long().clamp(0, res - 1))[ok]
    d = depth[ok]
    size = num * m * res * res
    if reduce == "harmonic":
        inverse = torch.zeros(size, device=points.device).index_add_(0, flat, 1.0 / d)
        count = torch.zeros(size, device=points.device).index_add_(0, flat, torch.ones_like(d))
        out = torch.where(count > 0, count / inverse.clamp_min(1e-30), torch.zeros_like(count))
    else:
        out = torch.full((size,), math.inf, device=points.device)
        out.scatter_reduce_(0, flat, d, reduce="amin", include_self=True)
        out = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    return out.view(num, m, res, res)


def render_v2(objects: Sequence[Tensor | np.ndarray], views: str | ViewSet = "v2",
              config: V2Config | None = None, normalize: bool = True,
              device: torch.device | str | None = None) -> Tensor:
    """``[O, M, S, S]`` V2 grey images in [0, 1], background 1 (``S = config.image_size``, 110).

    ``normalize`` only conditions the numbers: every view re-normalises by its bounding box.
    """
    cfg = config or V2Config()
    vs = view_set(views)
    points, index, num = pack_objects(objects, device)
    if normalize:
        points = normalize_unit_sphere(points, index, num)
    rot = vs.rotations(points.device)
    m, res, depth = rot.shape[0], cfg.resolution, cfg.depth
    cam = torch.einsum("pi,mij->mpj", points, rot).reshape(-1, 3)  # view-major [M*P, 3]
    group = (index[None, :] * m + torch.arange(m, device=points.device)[:, None]).reshape(-1)
    groups = num * m
    lo = _segment_reduce(cam, group, groups, "amin")
    hi = _segment_reduce(cam, group, groups, "amax")
    centre = (lo + hi) / 2
    extent = (hi - lo).amax(dim=1)
    # one point (or coincident points) has no extent: scale 1 puts it at the image centre
    extent = torch.where(extent > _DEGENERATE, extent, torch.ones_like(extent))
    p = (cam - centre[group]) / extent[group, None] * 2
    x = torch.ceil((p[:, 0] * cfg.obj_ratio + 1) / 2 * res).clamp(1, res - 2).long()
    y = torch.ceil((p[:, 1] * cfg.obj_ratio + 1) / 2 * res).clamp(1, res - 2).long()
    z = ((p[:, 2] + 1) / 2 + cfg.depth_bias) / (1 + cfg.depth_bias) * (depth - 2)
    # the reference indexes with the unclipped bin and stores the clipped value; the clamp of
    # the index only guards against float round-off past the last bin
    z_bin = torch.ceil(z).long().clamp(0, depth - 1)
    z = z.clamp(1, depth - 2)
    flat = ((group * depth + z_bin) * res + x) * res + y  # grid [G, depth, x, y]
    grid = torch.zeros(groups * depth * res * res, device=points.device)
    grid.scatter_reduce_(0, flat, z, reduce="amax", include_self=True)
    grid = grid.view(groups * depth, 1, res, res)
    grid = F.max_pool2d(grid, cfg.maxpool_xy, stride=1, padding=cfg.maxpool_pad_xy)
    kernel = cfg.gaussian().to(grid.device)[None, None]
    grid = F.conv2d(grid, kernel, padding=cfg.gauss_xy // 2)
    side = grid.shape[-1]
    img = grid.view(groups, depth, side, side).amax(dim=1)
    peak = img.flatten(1).amax(dim=1).clamp_min(1e-12)
    img = 1 - img / peak[:, None, None]
    return img.view(num, m, side, side)


def to_clip_images(maps: Tensor, image_size: int) -> Tensor:
    """``[O, M, H, W]`` single-channel maps to ``[O, M, 3, S, S]`` CLIP input images.

    Bilinear with ``align_corners=True`` as both references resize; the three channels are the
    same map (depth has no colour). The references only ever upsample; when downsampling (a
    small CLIP input, e.g. 64 px) the filter is antialiased, because plain bilinear sampling
    would step over V1's one-pixel splats and drop sparse objects entirely.
    """
    o, m, h, w = maps.shape
    x = maps.reshape(o * m, 1, h, w)
    if (h, w) != (image_size, image_size):
        shrink = image_size < max(h, w)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=not shrink, antialias=shrink)
    return x.expand(-1, 3, -1, -1).reshape(o, m, 3, image_size, image_size)


def project(objects: Sequence[Tensor | np.ndarray], views: str | ViewSet = "v1_zeroshot",
            projection: Projection = "v1", image_size: int = 224, resolution: int | None = None,
            normalize: bool = True, v2: V2Config | None = None,
            device: torch.device | str | None = None) -> Tensor:
    """``[O, M, 3, image_size, image_size]`` images of the objects from every view.

    ``resolution`` is the V1 render size (default: the view set's, 128 zero-shot, 224 few-shot);
    V2 renders at ``v2.resolution``. Both are then resized to ``image_size``.
    """
    if image_size < 2:
        raise ConfigError("image_size", f"must be >= 2, got {image_size}")
    if projection == "v1":
        maps = render_v1(objects, views, resolution=resolution, normalize=normalize,
                         device=device)
    elif projection == "v2":
        maps = render_v2(objects, views, config=v2, normalize=normalize, device=device)
    else:
        raise ConfigError("projection", f"must be 'v1' or 'v2', got {projection!r}")
    return to_clip_images(maps, image_size)
