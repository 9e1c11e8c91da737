"""Geometry plans: every index a sparse network needs, computed before its feature pass.

A network on our engine does two kinds of work: *geometry* (voxelising, kernel maps, point <->
voxel maps; integer work that depends only on the coordinates) and *features* (gathers, GEMMs,
norms). A :class:`NetworkPlan` holds the geometry of one cloud as plain tensors. When a cache
carries a plan, the sparse ops (:func:`.conv.conv3d`, :func:`.voxelize.initial_voxelize`,
:func:`.voxelize.point_to_voxel`, :func:`.voxelize.voxel_to_point`) take their indices from it
and use only Gather, MatMul, ReduceSum and elementwise ops. That feature pass is what is
exported to ONNX, with the plan's tensors as graph inputs (kernel maps as inputs): the graph
needs no custom operator, no scatter and no data-dependent shapes, so TensorRT builds it as is.

Scatter-free means: a point -> voxel mean is a :class:`SegmentSum`, a short fixed sequence of
gathers that adds rows in chunks of :data:`CHUNK` per level, then divides by the counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kmap import get_kernel_map, get_transposed_map
from .tensor import PointCache, PointTensor, SparseCache, SparseTensor, Triple

#: Rows added per gather in a :class:`SegmentSum` level.
CHUNK = 8

#: A conv map's key: torchsparse's ``(tensor_stride, kernel_size, stride, dilation)`` of the
#: downsampling (or submanifold) map, and whether the transposed direction is meant.
ConvKey = tuple[Triple, Triple, Triple, Triple, bool]


def levels_for(max_points: int) -> int:
    """Chunk levels a :class:`SegmentSum` needs so that one voxel may hold ``max_points``."""
    return max(1, math.ceil(math.log(max(2, max_points)) / math.log(CHUNK)))


def _pad_row(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero row appended: the row that padded indices (``len(x)``) read."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)


@dataclass
class SegmentSum:
    """Per-segment row sums by gathers only (see the module docstring).

    Level ``l`` turns the rows of the previous level into ``cat(rows[pass_l], sum of chunk_l's
    rows)``: segments down to one row pass through, the others are summed :data:`CHUNK` rows at a
    time (index ``len(rows)`` reads a zero). ``final [M]`` puts one row per segment in segment
    order (empty segments read zero).
    """

    levels: list[tuple[torch.Tensor, torch.Tensor]]
    final: torch.Tensor

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats
        for pass_rows, chunks in self.levels:
            padded = _pad_row(x)
            # embedding == Gather with a 2-D index: [n, CHUNK, C] then ReduceSum.
            x = torch.cat([padded.index_select(0, pass_rows), F.embedding(chunks, padded).sum(1)])
        return _pad_row(x).index_select(0, self.final)

    def tensors(self) -> Iterator[torch.Tensor]:
        for pass_rows, chunks in self.levels:
            yield pass_rows
            yield chunks
        yield self.final


def segment_sum_plan(index: torch.Tensor, size: int, levels: int) -> SegmentSum:
    """The :class:`SegmentSum` adding row ``i`` into segment ``index[i]`` (-1: nowhere).

    ValueError when a segment holds more than ``CHUNK ** levels`` rows.
    """
    device = index.device
    keep = torch.nonzero(index >= 0).squeeze(1)
    seg, order = torch.sort(index[keep], stable=True)
    rows = keep[order]
    n_rows = index.numel()
    *chunks_per_level, too_many = _chunk_counts(seg, size, levels)
    if too_many:
        raise ValueError(f"a voxel holds more than {CHUNK ** levels} points; raise the plan's "
                         "max_points (levels) or lower the input's max_points")
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n_chunks in chunks_per_level:
        counts = torch.bincount(seg, minlength=size)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(seg.numel(), device=device) - start[seg]
        multi = counts[seg] > 1
        pass_rows, pass_seg = rows[~multi], seg[~multi]
        slot = rank[multi] % CHUNK
        is_new = slot == 0
        chunk_id = torch.cumsum(is_new, 0) - 1
        chunks = torch.full((n_chunks, CHUNK), n_rows, dtype=torch.int64, device=device)
        chunks[chunk_id, slot] = rows[multi]
        plan.append((pass_rows, chunks))
        new_seg = torch.cat([pass_seg, seg[multi][is_new]])
        seg, rows = torch.sort(new_seg, stable=True)
        n_rows = new_seg.numel()
    final = torch.full((size,), n_rows, dtype=torch.int64, device=device)
    final[seg] = rows
    return SegmentSum(plan, final)


def _chunk_counts(seg: torch.Tensor, size: int, levels: int) -> list[int]:
    """The chunks of each of ``levels`` levels of :func:`segment_sum_plan` for the (sorted)
    segment of every row, then 1 if a segment still holds more than one row after them, else
    0; in one host read. A segment of ``c`` rows makes ``ceil(c / CHUNK)`` chunks if ``c > 1``
    and leaves as many rows (one per chunk) to the next level; one row passes through."""
    c = torch.bincount(seg, minlength=size)
    found = []
    for _ in range(levels):
        multi = c > 1
        c = torch.where(multi, torch.div(c + CHUNK - 1, CHUNK, rounding_mode="floor"), c)
        found.append(torch.where(multi, c, 0).sum())
    found.append((c > 1).any().long())
    return [int(v) for v in torch.stack(found).tolist()]


@dataclass(frozen=True)
class PlanSchema:
    """Which maps a network reads: its conv maps, point -> voxel means and devoxelisations.

    It is a property of the architecture (e.g. :meth:`~clip2scene_ros.models.spvcnn.SPVCNN.
    plan_schema`); with ``levels`` it fixes the names and count of the ONNX graph's inputs.
    """

    convs: tuple[ConvKey, ...]
    pools: tuple[Triple, ...]
    interps: tuple[Triple, ...]
    levels: int

    def input_names(self) -> list[str]:
        """Graph input names of the plan's tensors, in :meth:`NetworkPlan.tensors` order."""
        names = [f"conv_{_name(key)}" for key in self.convs]
        for s in self.pools:
            for level in range(self.levels):
                names += [f"pool_s{s[0]}_l{level}_pass", f"pool_s{s[0]}_l{level}_chunks"]
            names += [f"pool_s{s[0]}_final", f"pool_s{s[0]}_counts"]
        for s in self.interps:
            names += [f"interp_s{s[0]}_index", f"interp_s{s[0]}_weights"]
        return names


def _name(key: ConvKey) -> str:
    stride, ks, st, _, transposed = key
    return f"{'t' if transposed else ''}s{stride[0]}_k{ks[0]}_st{st[0]}"


@dataclass
class NetworkPlan:
    """The geometry of one cloud for one :class:`PlanSchema` (see the module docstring).

    ``coords`` holds the voxel coordinates per stride (used for shapes and bookkeeping, never by
    the feature pass); ``used`` records which entries the feature pass read (for tests).
    """

    schema: PlanSchema
    coords: dict[Triple, torch.Tensor]
    convs: dict[ConvKey, torch.Tensor]
    pools: dict[Triple, tuple[SegmentSum, torch.Tensor]]
    interps: dict[Triple, tuple[torch.Tensor, torch.Tensor]]
    used: set[tuple[str, object]] = field(default_factory=set)

    def conv_map(self, key: ConvKey) -> torch.Tensor:
        """Padded ``out_in_map [N_out, K]`` (index ``N_in`` reads the appended zero row)."""
        self.used.add(("conv", key))
        try:
            return self.convs[key]
        except KeyError:
            raise KeyError(f"the plan has no conv map {key}; its schema lists "
                           f"{list(self.convs)}") from None

    def pool_mean(self, feats: torch.Tensor, stride: Triple) -> torch.Tensor:
        """Mean of the point features per voxel of ``stride`` (voxels without points: 0)."""
        self.used.add(("pool", stride))
        segment_sum, counts = self.pools[stride]
        return segment_sum(feats) / counts

    def interp(self, stride: Triple) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded trilinear corner index ``[N, 8]`` and weights ``[N, 8]`` at ``stride``."""
        self.used.add(("interp", stride))
        return self.interps[stride]

    def tensors(self) -> list[torch.Tensor]:
        """Every plan tensor in :meth:`PlanSchema.input_names` order."""
        out = [self.convs[key] for key in self.schema.convs]
        for s in self.schema.pools:
            segment_sum, counts = self.pools[s]
            out += [*segment_sum.tensors(), counts]
        for s in self.schema.interps:
            out += list(self.interps[s])
        return out

    @classmethod
    def from_tensors(cls, schema: PlanSchema, tensors: Iterable[torch.Tensor],
                     coords: dict[Triple, torch.Tensor] | None = None) -> NetworkPlan:
        """Inverse of :meth:`tensors` (what the exported graph sees as its inputs)."""
        it = iter(tensors)
        convs = {key: next(it) for key in schema.convs}
        pools = {}
        for s in schema.pools:
            levels = [(next(it), next(it)) for _ in range(schema.levels)]
            final = next(it)
            pools[s] = (SegmentSum(levels, final), next(it))
        interps = {s: (next(it), next(it)) for s in schema.interps}
        return cls(schema, dict(coords or {}), convs, pools, interps)


def planned_point_tensor(feats: torch.Tensor, plan: NetworkPlan) -> PointTensor:
    """The network input of a planned pass: point features whose ops read ``plan``.

    A planned pass never reads point coordinates or batch indices (the plan holds every index),
    so ``feats`` stands in for both: the ONNX trace then holds no op for them.
    """
    return PointTensor(feats, feats, feats, PointCache(plan=plan), check=False)


def build_plan(schema: PlanSchema, coords: torch.Tensor, batch: torch.Tensor) -> NetworkPlan:
    """The plan of the points ``coords [N, 3]`` (float, stride-1 voxel units) with ``batch``.

    Maps come from the engine's own functions (so a planned pass equals the eager one) and are
    built in stride order, each strided map creating the next stride's coordinates.
    """
    from .keys import KeyTable
    from .voxelize import _voxelize, point_voxel_index, trilinear_index

    int_coords = torch.cat([batch.to(torch.int64).unsqueeze(1),
                            torch.floor(coords).to(torch.int64)], dim=1)
    voxel_coords, _, inverse, keys = _voxelize(int_coords,
                                               coords.new_zeros(coords.shape[0], 0))
    cache = SparseCache()
    # unique's keys: the stride's table needs no sort and no checks
    cache.tables[(1, 1, 1)] = KeyTable(voxel_coords, sorted_keys=keys)
    # range-checked by _voxelize
    base = SparseTensor(coords.new_zeros(voxel_coords.shape[0], 1), voxel_coords, 1, cache,
                        check=False)
    convs: dict[ConvKey, torch.Tensor] = {}
    for key in sorted(schema.convs, key=lambda k: (k[0], k[4])):
        stride, ks, st, dil, transposed = key
        x = SparseTensor(base.feats.new_zeros(cache.coords[stride].shape[0], 1),
                         cache.coords[stride], stride, cache, check=False)
        if transposed:
            coarse = (stride[0] * st[0], stride[1] * st[1], stride[2] * st[2])
            xc = SparseTensor(x.feats.new_zeros(cache.coords[coarse].shape[0], 1),
                              cache.coords[coarse], coarse, cache, check=False)
            convs[key] = get_transposed_map(xc, ks, st, dil).padded_out_in_map()
        else:
            convs[key] = get_kernel_map(x, ks, st, dil).padded_out_in_map()
    points = PointTensor(coords.new_zeros(coords.shape[0], 0), coords, batch, check=False)
    # every point's stride-1 voxel, as initial_voxelize records it: the coarser strides' rows
    # are then read through the pooling maps instead of searched
    points.cache.voxel_index[(1, 1, 1)] = (inverse, torch.bincount(inverse,
                                                                   minlength=len(base)))
    points.cache.voxel_coords[(1, 1, 1)] = voxel_coords
    points.cache.covered[(1, 1, 1)] = True
    pools = {}
    for s in schema.pools:
        x = SparseTensor(base.feats.new_zeros(cache.coords[s].shape[0], 1), cache.coords[s], s,
                         cache, check=False)
        index, counts = point_voxel_index(x, points)
        pools[s] = (segment_sum_plan(index, len(x), schema.levels),
                    counts.clamp(min=1).to(coords.dtype).unsqueeze(1))
    interps = {}
    for s in schema.interps:
        x = SparseTensor(base.feats.new_zeros(cache.coords[s].shape[0], 1), cache.coords[s], s,
                         cache, check=False)
        index, weights = trilinear_index(x, points)
        padded = torch.where(index < 0, torch.full_like(index, len(x)), index).contiguous()
        interps[s] = (padded, weights.contiguous())
    return NetworkPlan(schema, dict(cache.coords), convs, pools, interps)
