"""Kernel offsets, downsampled coordinates and kernel (neighbour) maps.

One concern in ~630 lines: every map here (submanifold, strided, transposed, pooling) is built
from the same offset order, key table and lazily read counts, and the transposed and pooling
maps reuse the strided ones' arrays; keeping them together keeps that order in one place.

Conventions follow torchsparse 1.x (the version spvnas and CLIP2Scene checkpoints were trained
with): coordinates stay on the finest grid, a tensor at stride ``s`` has coordinates that are
multiples of ``s``, and kernel offsets are multiplied by the input tensor stride and dilation.

Kernel-offset order (``torchsparse.nn.utils.get_kernel_offsets``; it decides which slice
``kernel[k]`` of a ``[K, Cin, Cout]`` weight multiplies which neighbour):

* per axis the offsets are ``range(-size // 2 + 1, size // 2 + 1)`` (Python floor division),
  i.e. ``{-1, 0, 1}`` for size 3, ``{0, 1}`` for size 2 and ``{0}`` for size 1, each multiplied
  by ``tensor_stride * dilation``;
* odd kernel volume (1, 27, ...): loops ``z`` outer, ``y``, ``x`` inner, so **x varies fastest**:
  for 3x3x3, ``k = 9 * (dz + 1) + 3 * (dy + 1) + (dx + 1)`` and the centre is ``k = 13``
  (MinkowskiEngine-compatible order);
* even kernel volume (2x2x2): loops ``x`` outer, ``y``, ``z`` inner, so **x varies slowest**:
  ``k = 4 * bx + 2 * by + bz`` with ``b`` in ``{0, 1}``.

Convolution semantics (cross-correlation): ``out[q] += in[q + o_k] @ kernel[k]``.

A :class:`KernelMap` holds one map in two forms:

* ``out_in_map [N_out, K]``: input row of ``out[q] + o_k`` or -1 (torchsparse's implicit-GEMM
  form; :meth:`KernelMap.padded_out_in_map` uses ``N_in`` instead of -1 so that a zero row
  appended to the features answers missing neighbours);
* compacted pairs ``in_index [P]``, ``out_index [P]`` grouped by offset, ``counts[k]`` pairs per
  offset (the gather-GEMM-scatter form).

Map construction, its caches and its compact/CSR forms stay together: they share the key
tables and the offset order, and every consumer (conv, plan, export) reads the same object.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .keys import (
    KeyTable,
    OffsetRows,
    check_coords,
    offset_delta,
    offset_rows,
    pack_keys,
    unpack_keys,
)
from .tensor import SparseTensor

Triple = tuple[int, int, int]


def as_triple(value: int | Sequence[int], name: str) -> Triple:
    """``value`` as a 3-tuple of positive ints; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    if isinstance(value, int):
        items: tuple[Any, ...] = (value, value, value)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(
                f"{name} must be a positive int or 3 positive ints, got {value!r}"
            ) from None
    if len(items) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


def kernel_offsets(
    kernel_size: int | Sequence[int],
    tensor_stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 ``[K, 3]`` (dx, dy, dz) offsets in torchsparse's order (see the module docstring):
    :func:`kernel_offset_rows` as a tensor."""
    rows = kernel_offset_rows(kernel_size, tensor_stride, dilation)
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), 3)


def kernel_offset_rows(
    kernel_size: int | Sequence[int],
    tensor_stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> OffsetRows:
    """:func:`kernel_offsets` as Python ints: the map builders group and check offsets on the
    host from these, never reading the offsets tensor back from the device."""
    return _offset_rows(as_triple(kernel_size, "kernel_size"),
                        as_triple(tensor_stride, "tensor_stride"),
                        as_triple(dilation, "dilation"))


@functools.lru_cache(maxsize=256)
def _offset_rows(size: Triple, ts: Triple, dil: Triple) -> OffsetRows:
    axes = [[v * ts[a] * dil[a] for v in range(-size[a] // 2 + 1, size[a] // 2 + 1)]
            for a in range(3)]
    if (size[0] * size[1] * size[2]) % 2 == 1:  # x fastest
        return tuple((x, y, z) for z, y, x in itertools.product(axes[2], axes[1], axes[0]))
    return tuple(itertools.product(axes[0], axes[1], axes[2]))  # z fastest


def downsample_coords(
    coords: torch.Tensor,
    tensor_stride: int | Sequence[int],
    stride: int | Sequence[int],
    kernel_size: int | Sequence[int],
) -> torch.Tensor:
    """Output coordinates of a strided convolution (torchsparse 1.x ``spdownsample``).

    With ``s = tensor_stride * stride`` per axis:

    * when every axis has ``stride`` 1 or ``stride == kernel_size`` (e.g. k2 s2):
      ``unique(floor(c / s) * s)``;
    * otherwise (e.g. k3 s2): every ``q = p - o_k`` reachable from an input ``p`` through a
      kernel offset, kept where ``q`` is a multiple of ``s`` and not below the per-axis minimum
      of the input. torchsparse writes ``p + o_k``; for odd kernels (symmetric offsets) the two
      sets are identical, and ``p - o_k`` guarantees every output has an input neighbour.

    The result is sorted by (batch, x, y, z) and has the dtype of ``coords``.
    """
    return unpack_keys(downsample_keys(coords, tensor_stride, stride, kernel_size)).to(
        coords.dtype)


def downsample_keys(
    coords: torch.Tensor,
    tensor_stride: int | Sequence[int],
    stride: int | Sequence[int],
    kernel_size: int | Sequence[int],
    *,
    check: bool = True,
) -> torch.Tensor:
    """The strictly increasing keys of :func:`downsample_coords`' output (its z values are
    multiples of ``tensor_stride * stride``): what a :class:`KeyTable` of them is made from.
    ``check=False`` skips the check of ``coords`` (a sparse tensor's, checked when it was
    made); the outputs a kernel reaches beyond them are range-checked either way."""
    if check:
        check_coords(coords)
    ts = as_triple(tensor_stride, "tensor_stride")
    st = as_triple(stride, "stride")
    ks = as_triple(kernel_size, "kernel_size")
    sample = torch.tensor(
        [ts[a] * st[a] for a in range(3)], dtype=torch.int64, device=coords.device
    )
    c = coords.to(torch.int64)
    if all(st[a] in (1, ks[a]) for a in range(3)):
        keys = _parent_keys(c, sample)
    else:
        offsets = kernel_offsets(ks, ts, device=coords.device)
        spatial = (c[:, None, 1:] - offsets[None]).reshape(-1, 3)
        batch = c[:, :1].expand(-1, offsets.shape[0]).reshape(-1, 1)
        lo = c[:, 1:].min(dim=0).values if c.shape[0] else spatial.new_zeros(3)
        keep = ((spatial % sample) == 0).all(dim=1) & (spatial >= lo).all(dim=1)
        keys = pack_keys(torch.cat([batch, spatial], dim=1)[keep])
    unique: torch.Tensor = torch.unique(keys)  # unique sorts
    return unique


def _parent_keys(coords: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Keys of ``(batch, floor(c / sample) * sample)``: each int64 coordinate's cell at the
    coarser grid (check-free: the coordinates were checked when their tensor was made)."""
    spatial = torch.div(coords[:, 1:], sample, rounding_mode="floor") * sample
    return pack_keys(torch.cat([coords[:, :1], spatial], dim=1), check=False)


@dataclass(eq=False)
class KernelMap:
    """One neighbour map; see the module docstring for the two forms it holds.

    ``in_coords`` / ``out_coords`` are the coordinate tensors the indices refer to (for a
    submanifold map they are the same tensor). ``identity_offset`` is the offset index whose
    pairs are exactly ``i -> i`` for every row (the centre of a submanifold map), which the
    gather-scatter dataflow turns into one plain matmul.

    The caches below hold no reference back to this map (the transposed map reaches it
    through a weak reference): a cycle would leave every frame's maps, a few MB of tensors, to
    the cyclic garbage collector, which a long-running process runs rarely.
    """

    out_in_map: torch.Tensor
    in_index: torch.Tensor
    out_index: torch.Tensor
    #: int64 ``[K]`` pairs per offset, on the device (:attr:`counts` reads it back once).
    pair_counts: torch.Tensor
    in_coords: torch.Tensor
    out_coords: torch.Tensor
    identity_offset: int | None = None
    _padded: torch.Tensor | None = field(default=None, repr=False)
    _transposed: KernelMap | None = field(default=None, repr=False)
    #: On a transposed map: the map it was made from (weak, so the two form no cycle).
    _source: weakref.ReferenceType[KernelMap] | None = field(default=None, repr=False)
    _compact: CompactPairs | None = field(default=None, repr=False)
    #: On a pooling map (:func:`build_pooling_map`): the output row of every input row.
    parents: torch.Tensor | None = field(default=None, repr=False)
    _counts: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def counts(self) -> tuple[int, ...]:
        """Pairs per offset as Python ints (the gather-scatter dataflow slices by them): one
        host read on first use, none for a consumer of ``out_in_map`` only (a plan)."""
        if self._counts is None:
            self._counts = tuple(int(c) for c in self.pair_counts.tolist())
        return self._counts

    @property
    def n_in(self) -> int:
        return int(self.in_coords.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.out_coords.shape[0])

    @property
    def kernel_volume(self) -> int:
        return int(self.out_in_map.shape[1])

    @property
    def num_pairs(self) -> int:
        return int(sum(self.counts))

    @property
    def mean_neighbours(self) -> float:
        """Mean number of real input neighbours per output row (n-bar)."""
        return self.num_pairs / self.n_out if self.n_out else 0.0

    @property
    def fill(self) -> float:
        """Fraction of the ``N_out x K`` slots that hold a real neighbour (n-bar / K)."""
        slots = self.n_out * self.kernel_volume
        return self.num_pairs / slots if slots else 0.0

    def padded_out_in_map(self) -> torch.Tensor:
        """``out_in_map`` with ``N_in`` in place of -1 (index of an appended zero row); cached."""
        if self._padded is None:
            m = self.out_in_map
            self._padded = torch.where(m < 0, torch.full_like(m, self.n_in), m).contiguous()
        return self._padded

    def compact(self) -> CompactPairs:
        """The non-identity pairs (and their CSR scatter, see :class:`CompactPairs`); cached."""
        if self._compact is None:
            self._compact = CompactPairs.of(self)
        return self._compact

    def transposed(self) -> KernelMap:
        """The same pairs with inputs and outputs swapped (for a transposed convolution); cached.

        Used on a downsampling map: the transposed convolution then writes every fine voxel
        ``p`` from the coarse voxel ``q`` with ``p = q + o_k``, with the same ``kernel[k]``.
        """
        if self._transposed is not None:
            return self._transposed
        source = self._source() if self._source is not None else None
        if source is not None:
            return source
        table = torch.full(
            (self.n_in, self.kernel_volume), -1, dtype=torch.int64, device=self.in_index.device
        )
        k_of_pair = torch.repeat_interleave(  # output_size: no read of the counts
            torch.arange(self.kernel_volume, device=self.in_index.device),
            self.pair_counts, output_size=self.in_index.numel(),
        )
        # Each (input row, offset) occurs at most once in a map, so no writes collide.
        table[self.in_index, k_of_pair] = self.out_index
        t = KernelMap(
            out_in_map=table,
            in_index=self.out_index,
            out_index=self.in_index,
            pair_counts=self.pair_counts,
            in_coords=self.out_coords,
            out_coords=self.in_coords,
            identity_offset=self.identity_offset,
            _counts=self._counts,
        )
        t._source = weakref.ref(self)
        self._transposed = t
        return self._transposed


@dataclass(eq=False)
class CompactPairs:
    """A map's pairs without the identity offset, for the gather-GEMM-scatter (inference and
    training's backward).

    ``in_index [P]`` / ``out_index [P]`` list the input and output row of every pair (offsets in
    order, identity left out), ``segments`` holds ``(k, start, end)`` per non-empty offset, and
    :attr:`scatter` (built on first use) is the ``[N_out, P]`` CSR matrix with a one at ``(out
    row, pair)``: one sparse product (:func:`csr_mm`) adds every pair's GEMM result into its
    output row, which costs less than per-offset ``index_add_`` calls.
    """

    in_index: torch.Tensor
    out_index: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    n_out: int  #: the map's output rows (not the map itself: that would be a cycle)
    n_in: int  #: the map's input rows
    _scatter: torch.Tensor | None = field(default=None, repr=False)
    _gather_t: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, kmap: KernelMap) -> CompactPairs:
        segments, start, begin, skip = [], 0, 0, (0, 0)
        for k, n in enumerate(kmap.counts):
            if n and k != kmap.identity_offset:
                segments.append((k, start, start + n))
                start += n
            if k == kmap.identity_offset:
                skip = (begin, begin + n)
            begin += n
        in_index, out_index = kmap.in_index, kmap.out_index
        if skip[1] > skip[0]:
            in_index = torch.cat([in_index[: skip[0]], in_index[skip[1]:]])
            out_index = torch.cat([out_index[: skip[0]], out_index[skip[1]:]])
        return cls(in_index, out_index, tuple(segments), kmap.n_out, kmap.n_in)

    @property
    def scatter(self) -> torch.Tensor:
        if self._scatter is None:
            self._scatter = self._build_scatter()
        return self._scatter

    @property
    def gather_t(self) -> torch.Tensor:
        """The ``[N_in, P]`` CSR matrix with a one at ``(in row, pair)``: the transpose of the
        gather, which adds every pair's input gradient into its input row (training's
        backward)."""
        if self._gather_t is None:
            self._gather_t = _one_hot_rows(self.in_index, self.n_in)
        return self._gather_t

    def _build_scatter(self) -> torch.Tensor:
        return _one_hot_rows(self.out_index, self.n_out)


def _one_hot_rows(rows_of_pairs: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``[n_rows, P]`` CSR with a one at ``(rows_of_pairs[p], p)``.

    The CSR columns list the pairs sorted by row, then offset: the pairs are grouped by offset
    in order, so a stable sort by row gives exactly that.
    """
    rows, col = stable_row_sort(rows_of_pairs, n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    return csr_matrix(crow, col, torch.ones(col.numel(), device=rows.device),
                      (n_rows, col.numel()))


def stable_row_sort(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(rows, stable=True)`` of row indices in ``[0, n_rows)``: the same order,
    sorted as int32 where the rows fit (about twice as fast as int64 on CPU, measured on the
    keyframe's maps); the sorted values come back int32 then."""
    if n_rows < 2**31 and rows.dtype == torch.int64:
        rows = rows.to(torch.int32)
    values, order = torch.sort(rows, stable=True)
    return values, order


def csr_mm(matrix: torch.Tensor, dense: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """``matrix @ dense`` for a CSR ``matrix [R, M]`` and ``dense [M, C]``: ``[R, C]``.

    Computed as an ``embedding_bag`` sum (each CSR row a bag of ``dense`` rows, the values as
    per-sample weights; ``weighted=False`` when every value is one): one pass, no zero-filled
    output to copy, and 2-3x faster than torch's CSR product on CPU for the point <-> voxel
    maps and convolution scatters here. Differentiable in ``dense``.
    """
    crow, col = matrix.crow_indices(), matrix.col_indices()
    weights = matrix.values().to(dense.dtype) if weighted else None
    return torch.nn.functional.embedding_bag(col, dense, crow[:-1], mode="sum",
                                             per_sample_weights=weights)


def csr_matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix of well-formed indices, stored as int32 where they fit (half the
    memory; torch's own CSR products convert int64 indices to int32 on every call)."""
    if max(size) < 2**31 - 1 and values.numel() < 2**31 - 1:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    with warnings.catch_warnings():  # torch calls CSR "beta"; these matrices are well formed
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def build_kernel_map(
    in_coords: torch.Tensor,
    out_coords: torch.Tensor,
    offsets: torch.Tensor,
    *,
    in_table: KeyTable | None = None,
    check: bool = True,
    rows: OffsetRows | None = None,
) -> KernelMap:
    """Map every output ``q`` and offset ``o_k`` to the input row at ``q + o_k`` (or -1).

    ``in_table`` may pass an already built :class:`KeyTable` of ``in_coords`` (one sort per
    stride). When ``out_coords is in_coords`` the map is submanifold and its zero offset, if
    any, is recorded as ``identity_offset``. ``check=False`` skips the range check of the
    coordinates: for those of sparse tensors, checked when they were made. ``rows``: the
    offsets as Python ints (:func:`kernel_offset_rows`), so that nothing reads them back.
    """
    listed = offset_rows(offsets, rows)
    if in_table is None:
        in_table = KeyTable(in_coords, check=check)
    if out_coords is in_coords:
        out_in_map = _submanifold_find(in_table, in_coords, offsets, check, listed)
    else:
        out_in_map = in_table.find_offsets(out_coords, offsets, check=check, rows=listed)
    return _from_out_in_map(out_in_map, in_coords, out_coords, listed,
                            submanifold=out_coords is in_coords)


def _from_out_in_map(out_in_map: torch.Tensor, in_coords: torch.Tensor,
                     out_coords: torch.Tensor, rows: OffsetRows, *, submanifold: bool
                     ) -> KernelMap:
    """The :class:`KernelMap` of ``out_in_map [N_out, K]``, the transposed view of a
    contiguous ``[K, N_out]`` tensor."""
    map_t = out_in_map.t()  # [K, N_out] (contiguous): pairs grouped by offset, then output row
    hit_t = map_t >= 0
    # one nonzero gives both indices (a boolean-mask index would run a second one, and is
    # slower than index_select on CPU)
    flat = torch.nonzero(hit_t.reshape(-1)).squeeze(1)
    in_index = map_t.reshape(-1).index_select(0, flat)
    out_index = flat.remainder_(out_in_map.shape[0]) if flat.numel() else flat
    identity = None
    if submanifold and (0, 0, 0) in rows:
        identity = rows.index((0, 0, 0))
    return KernelMap(
        out_in_map=out_in_map,
        in_index=in_index,
        out_index=out_index,
        pair_counts=hit_t.sum(dim=1),
        in_coords=in_coords,
        out_coords=out_coords,
        identity_offset=identity,
    )


def is_pooling(kernel_size: Triple, stride: Triple, dilation: Triple) -> bool:
    """Whether a strided map puts every input in exactly one output, its cell at the coarser
    grid: per axis kernel size = stride = 2 (offsets 0 and the tensor stride) or both 1,
    dilation 1, and not every axis 1."""
    return (all(k == s in (1, 2) for k, s in zip(kernel_size, stride, strict=True))
            and dilation == (1, 1, 1) and stride != (1, 1, 1))


def build_pooling_map(in_coords: torch.Tensor, tensor_stride: Triple, stride: Triple,
                      offsets: torch.Tensor, rows: OffsetRows | None = None) -> KernelMap:
    """The strided map of :func:`is_pooling` kernels from each input's cell alone, without a
    neighbour search: ``unique(cells)`` gives the outputs (exactly
    :func:`downsample_coords`' coordinates) and each input's output row, and the input's
    place in its cell gives its offset. Equal to :func:`build_kernel_map` on the same
    coordinates (tested), and several times faster: no binary searches. ``rows`` as in
    :func:`build_kernel_map`."""
    return _pooling_map(in_coords, tensor_stride, stride, offsets, offset_rows(offsets, rows))[0]


def _pooling_map(in_coords: torch.Tensor, tensor_stride: Triple, stride: Triple,
                 offsets: torch.Tensor, rows: OffsetRows) -> tuple[KernelMap, torch.Tensor]:
    """:func:`build_pooling_map` and its output coordinates' (strictly increasing) keys."""
    device = in_coords.device
    c = in_coords.to(torch.int64)
    sample = torch.tensor([tensor_stride[a] * stride[a] for a in range(3)], device=device)
    out_keys, parent = torch.unique(_parent_keys(c, sample), return_inverse=True)
    out_coords = unpack_keys(out_keys).to(in_coords.dtype)
    # key(c) - key(cell) = offset_delta(c - cell), which names the input's offset
    within = pack_keys(c, check=False) - out_keys.index_select(0, parent)
    deltas, order = torch.sort(offset_delta(offsets.to(device), rows))
    k = order.index_select(0, torch.searchsorted(deltas, within))
    n_out, k_total = out_coords.shape[0], offsets.shape[0]
    map_t = torch.full((k_total, n_out), -1, dtype=torch.int64, device=device)
    map_t.view(-1).index_put_((k * n_out + parent,), torch.arange(c.shape[0], device=device))
    kmap = _from_out_in_map(map_t.t(), in_coords, out_coords, rows, submanifold=False)
    kmap.parents = parent
    return kmap, out_keys


def _submanifold_find(table: KeyTable, coords: torch.Tensor, offsets: torch.Tensor,
                      check: bool, listed: OffsetRows) -> torch.Tensor:
    """``table.find_offsets(coords, offsets)`` for a map from ``coords`` to themselves, reading
    half of it off the other half when the offsets come in pairs ``o, -o``.

    ``q + o = p`` exactly when ``p + (-o) = q``: the ``-o`` column is the ``o`` column inverted
    (a scatter of its hits). The searched half keeps whole (dx, dy) columns of offsets, the
    (0, 0) column and those with (dy, dx) > (0, 0), so their z runs still need one binary
    search each: 5 instead of 9 for 3x3x3.
    """
    where = {o: k for k, o in enumerate(listed)}
    mirror = [where.get((-dx, -dy, -dz)) for dx, dy, dz in listed]
    if len(where) != len(listed) or None in mirror:
        return table.find_offsets(coords, offsets, check=check, own=True, rows=listed)
    searched = [k for k, (dx, dy, _) in enumerate(listed) if (dy, dx) >= (0, 0)]
    filled = [mirror[k] for k in searched if (listed[k][1], listed[k][0]) > (0, 0)]
    found = table.find_offsets(coords, offsets[searched], check=check, own=True,
                               rows=tuple(listed[k] for k in searched)).t()  # [S, N]
    result_t = torch.empty((len(listed), coords.shape[0]), dtype=torch.int64,
                           device=found.device)
    result_t.index_copy_(0, torch.tensor(searched, device=found.device), found)
    if filled:
        n = coords.shape[0]
        picked = torch.tensor([i for i, k in enumerate(searched)
                               if (listed[k][1], listed[k][0]) > (0, 0)], device=found.device)
        source = found.index_select(0, picked)  # [F, N]
        rows = torch.tensor(filled, dtype=torch.int64, device=found.device)
        result_t.index_fill_(0, rows, -1)
        hits = torch.nonzero(source.reshape(-1) >= 0).squeeze(1)  # flat (f, q) of every hit
        p = source.reshape(-1).index_select(0, hits)
        which = torch.div(hits, n, rounding_mode="floor")
        # result_t[rows[which], p] = q, with q = hits - which * n, as one flat index_put
        target = rows.index_select(0, which).mul_(n).add_(p)
        result_t.reshape(-1).index_put_((target,), hits.sub_(which.mul_(n)))
    return result_t.t()


def _same_coords(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a.to(torch.int64), b.to(torch.int64)))


def get_kernel_map(
    x: SparseTensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> KernelMap:
    """The (cached) map of a submanifold (stride 1) or strided convolution applied to ``x``.

    The map is stored in ``x.cache.kmaps`` under ``(x.stride, kernel_size, stride, dilation)``
    and the same object is returned to every later layer with that key. A strided map also
    records its output coordinates in ``x.cache.coords`` (the first set per stride wins, as in
    torchsparse).
    """
    ks = as_triple(kernel_size, "kernel_size")
    st = as_triple(stride, "stride")
    dil = as_triple(dilation, "dilation")
    key = (x.stride, ks, st, dil)
    # the cache holds KernelMaps (typed Any there: tensor.py cannot import this module back)
    kmap: KernelMap | None = x.cache.kmaps.get(key)
    if kmap is not None:
        if kmap.n_in != len(x):
            raise ValueError(
                f"cached kernel map {key} was built for {kmap.n_in} input voxels but the input has "
                f"{len(x)}; tensors that share a cache must share coordinates per stride"
            )
        return kmap
    rows = kernel_offset_rows(ks, x.stride, dil)
    offsets = kernel_offsets(ks, x.stride, dil, device=x.coords.device)
    out_stride = (x.stride[0] * st[0], x.stride[1] * st[1], x.stride[2] * st[2])
    if st == (1, 1, 1):
        kmap = build_kernel_map(x.coords, x.coords, offsets, in_table=x.key_table(), check=False,
                                rows=rows)
    elif is_pooling(ks, st, dil):
        kmap, out_keys = _pooling_map(x.coords, x.stride, st, offsets, rows)
        kmap.out_coords = _shared_coords(x, out_stride, kmap.out_coords, out_keys)
    else:
        out_keys = downsample_keys(x.coords, x.stride, st, ks, check=False)
        out_coords = _shared_coords(x, out_stride, unpack_keys(out_keys).to(x.coords.dtype),
                                    out_keys)
        kmap = build_kernel_map(x.coords, out_coords, offsets, in_table=x.key_table(),
                                check=False, rows=rows)
    x.cache.kmaps[key] = kmap
    return kmap


def _shared_coords(x: SparseTensor, stride: Triple, coords: torch.Tensor,
                   keys: torch.Tensor) -> torch.Tensor:
    """``coords``, or the equal tensor ``x``'s cache already holds at ``stride``: one coordinate
    tensor per stride keeps later maps shareable. The first set per stride is the one kept, as
    in torchsparse. ``keys``: the strictly increasing keys of ``coords`` (multiples of
    ``stride``), from which the stride's key table is made when the cache has none: it then
    needs no sort, order check or duplicate check."""
    known = x.cache.coords.get(stride)
    if known is not None and _same_coords(known, coords):
        return known
    x.cache.coords.setdefault(stride, coords)
    if x.cache.coords[stride] is coords and stride not in x.cache.tables:
        x.cache.tables[stride] = KeyTable(coords, sorted_keys=keys, z_step=stride[2])
    return coords


def get_transposed_map(
    x: SparseTensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
) -> KernelMap:
    """Map of a transposed convolution from ``x`` back to stride ``x.stride / stride``.

    It is the downsampling map from the finer stride to ``x`` with inputs and outputs swapped,
    taken from the cache when the strided convolution built it (torchsparse's behaviour), or
    built here from the finer coordinates in ``x.cache.coords``.
    """
    ks = as_triple(kernel_size, "kernel_size")
    st = as_triple(stride, "stride")
    dil = as_triple(dilation, "dilation")
    if any(x.stride[a] % st[a] for a in range(3)):
        raise ValueError(f"transposed stride {st} does not divide the input stride {x.stride}")
    fine_stride = (x.stride[0] // st[0], x.stride[1] // st[1], x.stride[2] // st[2])
    key = (fine_stride, ks, st, dil)
    down = x.cache.kmaps.get(key)
    if down is None:
        fine = x.cache.coords.get(fine_stride)
        if fine is None:
            raise ValueError(
                f"transposed convolution at stride {x.stride} needs the coordinates at stride "
                f"{fine_stride}, which this tensor's cache does not hold"
            )
        table = x.cache.tables.get(fine_stride)
        if table is None or len(table) != fine.shape[0]:
            table = KeyTable(fine)
            x.cache.tables[fine_stride] = table
        offsets = kernel_offsets(ks, fine_stride, dil, device=x.coords.device)
        down = build_kernel_map(fine, x.coords, offsets, in_table=table,
                                rows=kernel_offset_rows(ks, fine_stride, dil))
        x.cache.kmaps[key] = down
    if down.n_out != len(x):
        raise ValueError(
            f"the downsampling map {key} has {down.n_out} coarse voxels but the input of the "
            f"transposed convolution has {len(x)}"
        )
    return down.transposed()
