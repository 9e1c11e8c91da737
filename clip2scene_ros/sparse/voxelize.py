"""Point <-> voxel operations of SPVCNN, as spvnas/CLIP2Scene define them (torchsparse 1.x).

* :func:`voxelize`: unique integer coordinates, mean of the features per voxel, and the
  point -> voxel inverse map.
* :func:`initial_voxelize` (spvnas ``initial_voxelize``): points scaled by ``init_res /
  after_res``, ``floor`` to voxel coordinates, mean per voxel; voxels get stride 1.
* :func:`point_to_voxel` (spvnas ``point_to_voxel``): each point goes to the voxel
  ``floor(p / s) * s`` of a stride-``s`` tensor; that voxel's features become the mean of its
  points' features (points without a voxel are left out; voxels without points get zeros).
* :func:`voxel_to_point` (spvnas ``voxel_to_point``, torchsparse ``calc_ti_weights`` +
  ``spdevoxelize``): trilinear interpolation from the 8 lattice corners ``floor(p / s) * s +
  {0, s}^3``, corner order x slowest / z fastest (``k = 4 bx + 2 by + bz``). A voxel's feature
  sits at its integer coordinate, the *minimum corner* of the cell, not its centre. The weight of
  corner ``b`` is the product over axes of ``(pc - p)`` for ``b = 0`` and ``(p - pf)`` for
  ``b = 1`` (``pf = floor(p / s) * s``, ``pc = pf + s``), divided by ``s^3``; corners without a
  voxel get weight 0 and the weights are then **renormalised** by ``sum + 1e-8`` exactly as
  ``calc_ti_weights`` does. At stride 1 with integer point coordinates this is nearest-voxel.

The input voxelisation's mean uses ``index_add_`` plus a count (``torch_scatter`` is sdist-only
on PyPI). ``point_to_voxel`` sums through a CSR matrix built once per stride
(:func:`pool_matrix`) and ``voxel_to_point`` through the corner index and weights
(:func:`interp_bags`), each as one ``embedding_bag`` sum (see :func:`.kmap.csr_mm`): one pass
and one output allocation instead of a gather, multiply and add per corner, differentiable by
autograd. The exported graph uses the planned gathers of :mod:`.plan` instead.
"""

from __future__ import annotations

import torch

from .keys import KeyTable, coord_bounds, pack_keys, raise_if_out_of_range, unpack_keys
from .kmap import csr_matrix, csr_mm, kernel_offset_rows, kernel_offsets, stable_row_sort
from .tensor import (
    PointTensor,
    SparseCache,
    SparseTensor,
    Triple,
    check_point_shapes,
    raise_non_finite,
)

#: calc_ti_weights adds this to the weight sum before renormalising.
RENORM_EPS = 1e-8


def scatter_mean(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of the rows of ``src [N, C]`` per target ``index [N]`` (-1: ignored): ``[size, C]``.

    Target rows that receive nothing are zero.
    """
    valid = index >= 0
    if not bool(valid.all()):
        src, index = src[valid], index[valid]
    return _mean_rows(src, index, size)


def _mean_rows(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`scatter_mean` of an ``index`` without -1 (reads nothing back to find out)."""
    total = src.new_zeros(size, src.shape[1]).index_add_(0, index, src)
    counts = torch.bincount(index, minlength=size).clamp_(min=1)
    return total / counts.unsqueeze(1).to(src.dtype)


def voxelize(
    coords: torch.Tensor, feats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique voxels of integer ``coords [N, 4]`` and the mean ``feats`` per voxel.

    Returns ``(voxel_coords [M, 4], voxel_feats [M, C], inverse [N])`` with voxels sorted by
    (batch, x, y, z) and ``voxel_coords[inverse] == coords``. Coordinates outside the key range
    raise ValueError naming the limit.
    """
    voxel_coords, voxel_feats, inverse, _ = _voxelize(coords, feats)
    return voxel_coords, voxel_feats, inverse


def _voxelize(coords: torch.Tensor, feats: torch.Tensor, check: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`voxelize` and the voxels' (strictly increasing) keys; ``check=False`` for
    coordinates whose range the caller has checked."""
    if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"feats must have shape [{coords.shape[0]}, C] to match coords, got {list(feats.shape)}"
        )
    keys = pack_keys(coords, check=check)
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    voxel_coords = unpack_keys(unique_keys).to(coords.dtype)
    # every row has a voxel: the mean needs no -1 filter
    return (voxel_coords, _mean_rows(feats, inverse, unique_keys.numel()), inverse,
            unique_keys)


def _floor_to_stride(coords: torch.Tensor, stride: Triple) -> torch.Tensor:
    """int64 ``floor(p / s) * s`` per axis (spvnas: ``floor(z.C / s).int() * s``)."""
    s = torch.tensor(stride, dtype=coords.dtype, device=coords.device)
    si = torch.tensor(stride, dtype=torch.int64, device=coords.device)
    return torch.floor(coords / s).to(torch.int64) * si


def _with_batch(batch: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    return torch.cat([batch.to(torch.int64).unsqueeze(-1), spatial], dim=-1)


def initial_voxelize(
    z: PointTensor, init_res: float = 1.0, after_res: float = 1.0
) -> tuple[SparseTensor, PointTensor]:
    """spvnas ``initial_voxelize``: stride-1 voxels of ``z`` and ``z`` rescaled to voxel units.

    Point coordinates become ``coords * init_res / after_res``; voxel ``floor`` of those
    coordinates; voxel features are the mean of their points' features. The returned point
    tensor carries the point -> voxel map of stride 1 in its (new) cache.
    """
    plan = z.cache.plan
    if plan is not None:  # planned pass: z.coords are already the plan's voxel units
        if init_res != after_res:
            raise ValueError("a planned pass needs init_res == after_res (rescale before planning)")
        cache = SparseCache(plan=plan)
        feats = plan.pool_mean(z.feats, (1, 1, 1))
        return SparseTensor(feats, plan.coords[(1, 1, 1)], 1, cache, check=False), z
    coords = z.coords
    if init_res != after_res:
        coords = (coords * init_res) / after_res
    check_point_shapes(z.feats, coords, z.batch)
    points = PointTensor(z.feats, coords, z.batch, check=False)
    int_coords = _with_batch(z.batch, torch.floor(coords).to(torch.int64))
    _check_frame(coords, int_coords)
    voxel_coords, voxel_feats, inverse, keys = _voxelize(int_coords, z.feats, check=False)
    counts = torch.bincount(inverse, minlength=voxel_coords.shape[0])
    points.cache.voxel_index[(1, 1, 1)] = (inverse, counts)
    points.cache.voxel_coords[(1, 1, 1)] = voxel_coords
    points.cache.covered[(1, 1, 1)] = True  # every point is in its own voxel
    cache = SparseCache()
    # sorted and unique by construction: the stride's table needs no sort and no checks
    cache.tables[(1, 1, 1)] = KeyTable(voxel_coords, sorted_keys=keys)
    return SparseTensor(voxel_feats, voxel_coords, 1, cache, check=False), points


def _check_frame(coords: torch.Tensor, int_coords: torch.Tensor) -> None:
    """The input checks of a frame, with one host read for all: finite point coordinates
    (:class:`PointTensor`'s check, first) and voxel coordinates inside the key range
    (:func:`.keys.check_coords`')."""
    if coords.shape[0] == 0:
        return
    finite = torch.isfinite(coords).all(dim=1)
    bounds = coord_bounds(int_coords).reshape(-1)
    read = torch.cat([finite.all().to(torch.int64).reshape(1), bounds]).tolist()
    if not read[0]:
        raise_non_finite(finite)
    raise_if_out_of_range(read[1:5], read[5:9])


def point_voxel_index(x: SparseTensor, z: PointTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N], counts [M])``: voxel row of each point of ``z`` in ``x`` (-1: none); cached."""
    cached = z.cache.voxel_index.get(x.stride)
    if cached is not None and cached[1].shape[0] == len(x):
        return cached
    index = _index_through_parents(x, z)
    if index is None:
        query = pack_keys(_with_batch(z.batch, _floor_to_stride(z.coords, x.stride)))
        index = x.key_table().find(query)
        counts = torch.bincount(index[index >= 0], minlength=len(x))
        z.cache.covered.pop(x.stride, None)  # not known: read when asked (_covered)
    else:
        counts = torch.bincount(index, minlength=len(x))
        z.cache.covered[x.stride] = True  # through total maps from a covered stride
    z.cache.voxel_index[x.stride] = (index, counts)
    z.cache.voxel_coords[x.stride] = x.coords
    return index, counts


def _index_through_parents(x: SparseTensor, z: PointTensor) -> torch.Tensor | None:
    """The points' voxel rows in ``x`` read through the pooling maps (k2 s2) that made ``x``'s
    coordinates from a finer stride whose rows the points already know: a gather per stride
    instead of a search. Equal to the search: the cell of ``floor(p / s)`` at stride ``2 s``
    is ``floor(p / 2 s)``, and stride-``2 s`` voxels are the pooling map's outputs. Strides of
    powers of two only: there the search's float ``p / s`` is exact too. None when ``x``'s
    cache holds no such chain, or when some point has no voxel at the finer stride."""
    if any(s & (s - 1) for s in x.stride):
        return None
    cache, chain = z.cache, []
    coords, stride = x.coords, x.stride
    while cache.voxel_coords.get(stride) is not coords:
        if any(s % 2 for s in stride):
            return None
        finer = (stride[0] // 2, stride[1] // 2, stride[2] // 2)
        kmap = x.cache.kmaps.get((finer, (2, 2, 2), (2, 2, 2), (1, 1, 1)))
        if kmap is None or kmap.parents is None or kmap.out_coords is not coords:
            return None
        chain.append(kmap.parents)
        coords, stride = kmap.in_coords, finer
    index = cache.voxel_index[stride][0]
    if not chain or index.shape[0] != len(z) or not _covered(z, stride):
        return None
    for parents in reversed(chain):
        index = parents.index_select(0, index)
    return index


def _covered(z: PointTensor, stride: Triple) -> bool:
    """Whether every point of ``z`` has a voxel in ``z.cache.voxel_index[stride]``: known, or
    read back once and remembered."""
    known = z.cache.covered.get(stride)
    if known is None:
        known = z.cache.covered[stride] = bool((z.cache.voxel_index[stride][0] >= 0).all())
    return known


def point_to_voxel(x: SparseTensor, z: PointTensor) -> SparseTensor:
    """spvnas ``point_to_voxel``: ``x``'s voxels with the mean features of their points in ``z``."""
    if z.cache.plan is not None:
        feats = z.cache.plan.pool_mean(z.feats, x.stride)
        return SparseTensor(feats, x.coords, x.stride, x.cache, check=False)
    feats = csr_mm(pool_matrix(x, z), z.feats)
    return SparseTensor(feats, x.coords, x.stride, x.cache, check=False)


def pool_matrix(x: SparseTensor, z: PointTensor) -> torch.Tensor:
    """``[M, N]`` CSR matrix whose product with point features is the mean per voxel; cached."""
    cached = z.cache.pool.get(x.stride)
    if cached is not None and cached.shape[0] == len(x):
        return cached
    index, counts = point_voxel_index(x, z)
    valid = torch.nonzero(index >= 0).squeeze(1)
    rows, order = stable_row_sort(index[valid], len(x))
    crow = torch.zeros(len(x) + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.cumsum(counts, 0)
    values = 1.0 / counts.clamp(min=1).to(z.coords.dtype)[rows]
    matrix = csr_matrix(crow, valid[order], values, (len(x), len(z)))
    z.cache.pool[x.stride] = matrix
    return matrix


def trilinear_weights(coords: torch.Tensor, index: torch.Tensor, stride: Triple) -> torch.Tensor:
    """torchsparse ``calc_ti_weights``: ``[N, 8]`` corner weights (see the module docstring)."""
    s = torch.tensor(stride, dtype=coords.dtype, device=coords.device)[:, None]
    c = coords.t()  # [3, N]: every op below runs along N (an inner size of 2 or 8 is slow)
    pf = torch.floor(c / s) * s
    pc = pf + s
    f = torch.stack([pc - c, c - pf], dim=1)  # [3, 2, N]: per axis, corner bit 0 and bit 1
    # corner k = 4 bx + 2 by + bz (x slowest), each weight multiplied x * y * z
    weights = ((f[0][:, None] * f[1][None]).reshape(4, 1, -1) * f[2][None]).reshape(8, -1)
    volume = stride[0] * stride[1] * stride[2]
    if volume != 1:
        weights = weights / volume
    weights = weights.masked_fill(index.t() < 0, 0.0)
    return (weights / (weights.sum(dim=0, keepdim=True) + RENORM_EPS)).t().contiguous()


def trilinear_index(x: SparseTensor, z: PointTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, 8]``, ``weights [N, 8])``: lattice corners of every point; cached per stride.

    A point's corners are its cell ``floor(p / s) * s`` plus ``{0, s}^3``. Where that cell is a
    voxel of ``x`` (always, for the strides SPVCNN devoxelises at), the other seven corners are
    the cell's own neighbours: they are looked up once per voxel and gathered per point, which
    is fewer searches than points (several points share a cell). Other points search directly.
    """
    cached = z.cache.interp.get(x.stride)
    if cached is not None and cached[2] == len(x):
        return cached[0], cached[1]
    corners = kernel_offsets(2, x.stride, device=z.coords.device)  # {0, s}^3, calc_ti order
    corner_rows = kernel_offset_rows(2, x.stride)
    cell, _ = point_voxel_index(x, z)  # corner 0: the point's own cell
    table = x.key_table()
    # Every voxel's 8 corners as one contiguous [M, 8] row each (corner 0: the voxel itself),
    # so that a point's corners are one row gather: transposing per voxel is cheaper than per
    # point (fewer rows), and torch's transposing copies are slow at an inner size of 8.
    voxel_corners = _corners_from_submanifold_map(x)
    if voxel_corners is None:
        voxel_corners = torch.empty(len(x), 8, dtype=torch.int64, device=z.coords.device)
        voxel_corners[:, 0] = torch.arange(len(x), device=z.coords.device)
        voxel_corners[:, 1:] = table.find_offsets(x.coords, corners[1:], check=False,
                                                  own=True, rows=corner_rows[1:])
    if _covered(z, x.stride):
        index = voxel_corners.index_select(0, cell)
    else:
        own = cell >= 0
        index = torch.empty(len(z), 8, dtype=torch.int64, device=z.coords.device)
        rows = torch.nonzero(own).squeeze(1)
        index[rows] = voxel_corners.index_select(0, cell.index_select(0, rows))
        rest = torch.nonzero(~own).squeeze(1)
        base = _with_batch(z.batch[rest], _floor_to_stride(z.coords[rest], x.stride))
        # cells point_voxel_index has just range-checked
        index[rest] = table.find_offsets(base, corners, check=False, rows=corner_rows)
    weights = trilinear_weights(z.coords, index, x.stride)
    z.cache.interp[x.stride] = (index, weights, len(x))
    return index, weights


#: The 3x3x3 offset (torchsparse order, x fastest: ``9 (dz + 1) + 3 (dy + 1) + (dx + 1)``) of
#: each trilinear corner ``4 bx + 2 by + bz`` (x slowest), both in units of the stride.
_CORNER_COLUMNS = tuple(9 * (bz + 1) + 3 * (by + 1) + (bx + 1)
                        for bx in (0, 1) for by in (0, 1) for bz in (0, 1))


def _corners_from_submanifold_map(x: SparseTensor) -> torch.Tensor | None:
    """``[M, 8]`` corner rows of every voxel of ``x`` read off the 3x3x3 submanifold map of its
    cache at its stride (a network has built it: SPVCNN devoxelises after convolutions at the
    same stride), whose offsets ``{-s, 0, s}^3`` include the corners ``{0, s}^3``: the same
    rows a search would find, without searching. None when there is no such map."""
    kmap = x.cache.kmaps.get((x.stride, (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    if kmap is None or kmap.in_coords is not x.coords:
        return None
    columns = torch.tensor(_CORNER_COLUMNS, device=x.coords.device)
    # out_in_map is the [M, 27] view of a contiguous [27, M]: pick 8 rows of that, transpose
    picked: torch.Tensor = kmap.out_in_map.t().index_select(0, columns).t().contiguous()
    return picked


def interp_bags(x: SparseTensor, z: PointTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, 8], weights [N, 8])`` for an ``embedding_bag`` devoxelisation: the
    trilinear corners with a missing corner's index set to 0, its weight being 0; cached."""
    index, weights = trilinear_index(x, z)
    cached = z.cache.interp_bags.get(x.stride)
    if cached is None or cached[0] is not index:  # none yet, or the corners were rebuilt
        cached = z.cache.interp_bags[x.stride] = (index, index.clamp(min=0))
    return cached[1], weights


def devoxelize(feats: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_k weights[i, k] * feats[index[i, k]]``, index -1 reading zeros.

    Loops over the corners (not points) so that only ``[N, C]`` is live at a time.
    """
    safe = torch.where(index < 0, torch.full_like(index, feats.shape[0]), index)
    return devoxelize_padded(feats, safe, weights)


def devoxelize_padded(feats: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
    """:func:`devoxelize` with missing corners already set to ``len(feats)`` (a zero row)."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])], dim=0)
    out = padded.index_select(0, index[:, 0]) * weights[:, :1]
    for k in range(1, index.shape[1]):
        out = out + padded.index_select(0, index[:, k]) * weights[:, k : k + 1]
    return out


def voxel_to_point(x: SparseTensor, z: PointTensor, nearest: bool = False) -> PointTensor:
    """spvnas ``voxel_to_point``: trilinear devoxelisation of ``x`` onto the points of ``z``.

    ``nearest`` keeps only corner 0 (the point's own cell) with its renormalised trilinear
    weight, as spvnas does (``weights[:, 1:] = 0``).
    """
    plan = z.cache.plan
    if plan is not None:
        index, weights = plan.interp(x.stride)
        if nearest:
            index, weights = index[:, :1], weights[:, :1]
        return z.replace_feats(devoxelize_padded(x.feats, index, weights.to(x.feats.dtype)))
    if not nearest:
        # one weighted sum of 8 rows per point (missing corners: row 0 with weight 0)
        index, weights = interp_bags(x, z)
        return z.replace_feats(torch.nn.functional.embedding_bag(
            index, x.feats, mode="sum", per_sample_weights=weights.to(x.feats.dtype)))
    index, weights = trilinear_index(x, z)
    weights = weights.to(x.feats.dtype)
    if nearest:
        weights = torch.cat([weights[:, :1], weights.new_zeros(weights.shape[0], 7)], dim=1)
        index = torch.cat([index[:, :1], index.new_full((index.shape[0], 7), -1)], dim=1)
    return z.replace_feats(devoxelize(x.feats, index, weights))
