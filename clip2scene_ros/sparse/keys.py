"""Packing of sparse coordinates ``(batch, x, y, z)`` into sortable int64 keys.

Layout (most significant first)::

    bit 63      : sign, always 0 for a valid key
    bits 51..62 : batch          (12 bits, 0 .. 4095)
    bits 34..50 : x + 2**15      (17-bit field: 16 value bits + 1 guard bit)
    bits 17..33 : y + 2**15
    bits  0..16 : z + 2**15

Each spatial value is biased to ``[0, 2**16)``, so keys sort like ``(batch, x, y, z)``
lexicographically. The extra guard bit per field makes neighbour queries a single addition:
``key(c + o) == key(c) + offset_delta(o)`` whenever ``c + o`` is in range, and whenever it is out
of range the sum can never equal the key of any valid coordinate (every field of a difference
between two such sums is below ``2**17`` in magnitude, so the sums are equal only if every field
is). Offsets must satisfy ``|o| < 2**16`` per axis, which :func:`offset_delta` checks.

A hash table would also work; sort + ``searchsorted`` is used because it is deterministic, runs
with stock torch ops on CPU and GPU, and a sorted table is reused by every query at one stride.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

#: Value bits of a spatial coordinate; coordinates must lie in [COORD_MIN, COORD_MAX].
COORD_BITS = 16
#: Width of one packed spatial field (value bits + guard bit).
FIELD_BITS = COORD_BITS + 1
#: Bits of the batch index; batch must lie in [0, BATCH_MAX].
BATCH_BITS = 63 - 3 * FIELD_BITS
COORD_BIAS = 1 << (COORD_BITS - 1)
COORD_MIN = -COORD_BIAS
COORD_MAX = COORD_BIAS - 1
BATCH_MAX = (1 << BATCH_BITS) - 1
#: Largest absolute per-axis neighbour offset that offset_delta accepts.
OFFSET_MAX = (1 << COORD_BITS) - 1

_SHIFT_X = 2 * FIELD_BITS
_SHIFT_Y = FIELD_BITS
_SHIFT_B = 3 * FIELD_BITS
_FIELD_MASK = (1 << FIELD_BITS) - 1
_AXES = ("batch", "x", "y", "z")

#: Kernel offsets as Python ints, row for row with an offsets tensor ``[K, 3]``: callers that
#: made the tensor from them pass them along, so that nothing reads the tensor back (on a GPU
#: every such read waits for the device).
OffsetRows = tuple[tuple[int, int, int], ...]


def offset_rows(offsets: torch.Tensor, rows: Sequence[Sequence[int]] | None = None
                ) -> OffsetRows:
    """``rows`` as an :data:`OffsetRows`, or ``offsets`` read back (one host read) without."""
    listed = offsets.tolist() if rows is None else rows
    return tuple((int(r[0]), int(r[1]), int(r[2])) for r in listed)


def check_coords(coords: torch.Tensor, name: str = "coords") -> None:
    """Raise ValueError unless ``coords`` is an integer ``[N, 4]`` tensor inside the key range."""
    if not isinstance(coords, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(coords).__name__}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape [N, 4] (batch, x, y, z), got {list(coords.shape)}"
        )
    if coords.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {coords.dtype}")
    if coords.shape[0] == 0:
        return
    lo, hi = coord_bounds(coords).tolist()  # one host read for both
    raise_if_out_of_range(lo, hi, name)


def coord_bounds(coords: torch.Tensor) -> torch.Tensor:
    """``[2, 4]``: the per-column minimum and maximum of non-empty ``coords [N, 4]``, as one
    tensor so that a check reads both back at once."""
    lo, hi = torch.aminmax(coords, dim=0)
    return torch.stack([lo, hi])


def raise_if_out_of_range(lo: Sequence[int], hi: Sequence[int], name: str = "coords") -> None:
    """:func:`check_coords`' range check on the column bounds ``lo``/``hi`` read back."""
    if lo[0] < 0 or hi[0] > BATCH_MAX:
        bad = lo[0] if lo[0] < 0 else hi[0]
        raise ValueError(
            f"{name}[:, 0] (batch) = {bad} is outside the key-packing range [0, {BATCH_MAX}]"
        )
    for axis in (1, 2, 3):
        if lo[axis] < COORD_MIN:
            raise ValueError(
                f"{name}[:, {axis}] ({_AXES[axis]}) = {lo[axis]} is below the key-packing limit "
                f"COORD_MIN = {COORD_MIN}"
            )
        if hi[axis] > COORD_MAX:
            raise ValueError(
                f"{name}[:, {axis}] ({_AXES[axis]}) = {hi[axis]} is above the key-packing limit "
                f"COORD_MAX = {COORD_MAX}"
            )


def pack_keys(coords: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """int64 keys ``[N]`` of integer coordinates ``[N, 4]`` = (batch, x, y, z).

    With ``check`` (the default) coordinates outside the range raise ValueError naming the axis
    and the limit; pass ``check=False`` only for coordinates already validated.
    """
    if check:
        check_coords(coords)
    c = coords.to(torch.int64)
    return (
        (c[:, 0] << _SHIFT_B)
        | ((c[:, 1] + COORD_BIAS) << _SHIFT_X)
        | ((c[:, 2] + COORD_BIAS) << _SHIFT_Y)
        | (c[:, 3] + COORD_BIAS)
    )


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: int64 ``[N, 4]`` (batch, x, y, z) of valid keys ``[N]``."""
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D int64 tensor, got {keys.dtype} {list(keys.shape)}")
    return torch.stack(
        [
            keys >> _SHIFT_B,
            ((keys >> _SHIFT_X) & _FIELD_MASK) - COORD_BIAS,
            ((keys >> _SHIFT_Y) & _FIELD_MASK) - COORD_BIAS,
            (keys & _FIELD_MASK) - COORD_BIAS,
        ],
        dim=1,
    )


def offset_delta(offsets: torch.Tensor, rows: OffsetRows | None = None) -> torch.Tensor:
    """int64 ``[K]`` key increments of spatial offsets ``[K, 3]``: key(c + o) = key(c) + delta.

    ``rows`` (the same offsets as Python ints, see :data:`OffsetRows`) lets the range check run
    on the host without reading ``offsets`` back.
    """
    if offsets.dim() != 2 or offsets.shape[1] != 3:
        raise ValueError(f"offsets must have shape [K, 3], got {list(offsets.shape)}")
    o = offsets.to(torch.int64)
    if o.numel():
        largest = (max(abs(v) for row in rows for v in row) if rows is not None
                   else int(o.abs().max()))
        if largest > OFFSET_MAX:
            raise ValueError(
                f"offset {largest} exceeds the key-packing limit OFFSET_MAX = {OFFSET_MAX}"
            )
    # Multiplication (not shifts) keeps negative offsets exact in two's complement.
    return o[:, 0] * (1 << _SHIFT_X) + o[:, 1] * (1 << _SHIFT_Y) + o[:, 2]


class KeyTable:
    """Sorted keys of one coordinate set, answering "which row holds this key?" queries.

    ``find`` returns the row index into the original (unsorted) coordinates, or -1 where the key
    is absent. Duplicate coordinates are refused: a sparse tensor has one row per voxel.
    """

    def __init__(self, coords: torch.Tensor, *, check: bool = True,
                 sorted_keys: torch.Tensor | None = None, z_step: int = 1) -> None:
        """``sorted_keys``: the keys of ``coords``, row for row, already known to be strictly
        increasing (made by ``torch.unique``): the table then neither packs, checks the order
        nor looks for duplicates, which reads nothing back from the device. ``z_step``: every z
        is known to be a multiple of it (coordinates at that stride), so that
        :meth:`find_offsets` need not read the z values to know it."""
        self._z = coords[:, 3]
        self._z_step = z_step
        self._z_aligned: dict[int, bool] = {}
        self._padded: torch.Tensor | None = None
        self._order_padded: torch.Tensor | None = None
        self._minus_one: torch.Tensor | None = None
        self.order: torch.Tensor | None
        if sorted_keys is not None:
            if sorted_keys.shape != coords.shape[:1]:
                raise ValueError(f"sorted_keys has {list(sorted_keys.shape)} entries for "
                                 f"{coords.shape[0]} coords")
            self.sorted_keys, self.order = sorted_keys, None
            return
        keys = pack_keys(coords, check=check)
        # Coordinates from voxelize / downsample_coords are already sorted: then the sorted
        # position is the row itself and both the sort and a gather per query are skipped.
        if keys.numel() > 1 and bool((keys[1:] > keys[:-1]).all()):
            self.sorted_keys, self.order = keys, None
        else:
            self.sorted_keys, self.order = torch.sort(keys)
        if self.order is not None and self.sorted_keys.numel() > 1:
            dup = self.sorted_keys[1:] == self.sorted_keys[:-1]
            if bool(dup.any()):
                first = int(self.order[1:][dup][0])
                raise ValueError(
                    f"coords has duplicate rows (e.g. row {first} = {coords[first].tolist()}); "
                    "a sparse tensor needs one row per voxel"
                )

    def __len__(self) -> int:
        return int(self.sorted_keys.numel())

    def find(self, query: torch.Tensor) -> torch.Tensor:
        """Row index (int64, same shape as ``query``) of each query key, -1 where absent."""
        n = self.sorted_keys.numel()
        if n == 0:
            return torch.full_like(query, -1)
        pos = torch.searchsorted(self.sorted_keys, query)
        return self._rows_where(_take(self._padded_keys(), pos) == query, pos)

    def _padded_keys(self) -> torch.Tensor:
        """The sorted keys and one sentinel, so that any ``searchsorted`` position (0..n) can be
        read without clamping. The sentinel, the largest int64, never equals a query key: a
        valid key's guard bits are 0, and ``key + offset_delta`` can set every guard bit of a
        field only by borrowing from the batch bits, which then are not all ones."""
        if self._padded is None:
            sentinel = torch.full((1,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                                  device=self.sorted_keys.device)
            self._padded = torch.cat([self.sorted_keys, sentinel])
        return self._padded

    def _rows_where(self, hit: torch.Tensor, pos: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Row of sorted position ``pos`` where ``hit``, else -1 (into ``out`` when given)."""
        rows = pos if self.order is None else _take(self._padded_order(), pos)
        if self._minus_one is None:
            self._minus_one = torch.full((), -1, dtype=torch.int64, device=pos.device)
        if out is None:
            return torch.where(hit, rows, self._minus_one)
        return torch.where(hit, rows, self._minus_one, out=out)

    def _padded_order(self) -> torch.Tensor:
        if self._order_padded is None:
            assert self.order is not None
            self._order_padded = torch.cat([self.order, self.order.new_full((1,), -1)])
        return self._order_padded

    def _all_z_multiple_of(self, step: int) -> bool:
        if self._z_step % step == 0:  # known without reading (integers: step 1 always)
            return True
        if step not in self._z_aligned:
            self._z_aligned[step] = bool((self._z % step == 0).all())
        return self._z_aligned[step]

    def find_offsets(self, base: torch.Tensor, offsets: torch.Tensor, *, check: bool = True,
                     own: bool = False, rows: OffsetRows | None = None) -> torch.Tensor:
        """Row index ``[M, K]`` of ``base[i] + offsets[k]`` (spatial offsets), -1 where absent.

        ``check=False`` skips the range check of ``base`` (as :func:`pack_keys`): for the
        coordinates of a sparse tensor, which were checked when it was made.

        The result is the transposed view of a contiguous ``[K, M]`` tensor (columns are
        contiguous), which is what per-offset consumers read.

        Offsets sharing (dx, dy) whose dz form an arithmetic run (e.g. -1, 0, 1) are answered
        with one ``searchsorted`` per run: when every table z and every query z is a multiple of
        the run step, no table key lies strictly between two consecutive queries of the run (they
        differ only in z), so after locating the first query the next ones can only sit at the
        same or the following sorted position. This cuts the binary searches of a 3x3x3 map from
        27 to 9 per row. Otherwise each offset is searched on its own.

        ``own=True`` says that ``base`` is the table's own coordinates, row for row (a
        submanifold map). When they are also sorted, the run of the (0, 0) column with offsets
        ``-step, 0, step`` needs no search at all: a voxel's z neighbours, if present, are its
        neighbours in sorted order (no key lies strictly between them, as above), so one
        comparison with the adjacent key answers each.

        ``rows``: ``offsets`` as Python ints (:data:`OffsetRows`), so that grouping them reads
        nothing back from the device.
        """
        # base is the table's own sorted rows: its keys are the table's (checked when made)
        own = own and self.order is None and base.shape[0] == self.sorted_keys.numel()
        base_keys = self.sorted_keys if own else pack_keys(base, check=check)
        listed = offset_rows(offsets, rows)
        delta = offset_delta(offsets.to(base_keys.device), listed)
        k_total, m = offsets.shape[0], base.shape[0]
        n = self.sorted_keys.numel()
        if n == 0 or m == 0:
            return torch.full((k_total, m), -1, dtype=torch.int64, device=base_keys.device).t()
        # Filled offset by offset as contiguous rows of [K, M]; returned as its [M, K] view.
        result_t = torch.empty((k_total, m), dtype=torch.int64, device=base_keys.device)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for k, (dx, dy, dz) in enumerate(listed):
            groups.setdefault((dx, dy), []).append((dz, k))
        base_z = base[:, 3]
        aligned: dict[tuple[int, int], bool] = {}  # (dz mod step, step) -> base z aligned
        keys = self._padded_keys()
        for column, items in groups.items():
            items.sort()
            dzs = [dz for dz, _ in items]
            step = dzs[1] - dzs[0] if len(dzs) > 1 else 0
            run = (step > 0 and all(b - a == step for a, b in itertools.pairwise(dzs))
                   and self._all_z_multiple_of(step))
            if run:
                phase = (dzs[0] % step, step)
                if own or step == 1:  # base z are the table's (multiples of step, checked
                    aligned[phase] = phase[0] == 0  # just above), or integers (step 1)
                elif phase not in aligned:
                    aligned[phase] = bool(((base_z + dzs[0]) % step == 0).all())
                run = aligned[phase]
            if run and own and column == (0, 0) and set(dzs) <= {-step, 0, step}:
                for dz, k in items:
                    self._adjacent(dz // step, delta[k], out=result_t[k])
                continue
            if not run:
                for _, k in items:
                    query = base_keys + delta[k]
                    pos = torch.searchsorted(self.sorted_keys, query)
                    self._rows_where(_take(keys, pos) == query, pos, out=result_t[k])
                continue
            query = base_keys + delta[items[0][1]]
            pos = torch.searchsorted(self.sorted_keys, query)
            for j, (_, k) in enumerate(items):
                hit = _take(keys, pos) == query
                self._rows_where(hit, pos, out=result_t[k])
                if j + 1 < len(items):
                    pos += hit
                    query += step
        return result_t.t()

    def _adjacent(self, side: int, delta: torch.Tensor, out: torch.Tensor) -> None:
        """Into ``out [n]``: the sorted row next to each row on ``side`` (-1, 0 or 1) where it
        holds the row's key + ``delta``, else -1 (see :meth:`find_offsets`' ``own``)."""
        keys, n = self.sorted_keys, self.sorted_keys.numel()
        rows = torch.arange(n, device=keys.device)
        if side == 0:
            out.copy_(rows)
            return
        out.fill_(-1)
        if n < 2:
            return
        if side > 0:
            hit = keys[1:] == keys[:-1] + delta
            out[:-1] = torch.where(hit, rows[1:], out[:-1])
        else:
            hit = keys[:-1] == keys[1:] + delta
            out[1:] = torch.where(hit, rows[:-1], out[1:])


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for 1-D ``values``: ``index_select`` is 3-4x faster than advanced
    indexing on CPU (measured on 18k int64 lookups: 35 vs 140 us)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)
