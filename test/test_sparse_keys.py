"""Key packing of sparse coordinates: round trip, order, neighbour deltas, range checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.sparse.keys import (
    BATCH_MAX,
    COORD_MAX,
    COORD_MIN,
    OFFSET_MAX,
    KeyTable,
    check_coords,
    offset_delta,
    pack_keys,
    unpack_keys,
)

coord = st.integers(COORD_MIN, COORD_MAX)
row = st.tuples(st.integers(0, BATCH_MAX), coord, coord, coord)


@settings(max_examples=60, deadline=None)
@given(st.lists(row, min_size=1, max_size=40))
def test_pack_unpack_round_trip_and_lexicographic_order(rows):
    coords = torch.tensor(rows, dtype=torch.int64)
    keys = pack_keys(coords)
    assert torch.equal(unpack_keys(keys), coords)
    # Keys sort exactly like the (batch, x, y, z) tuples.
    by_key = [tuple(r) for r in coords[torch.argsort(keys, stable=True)].tolist()]
    assert by_key == sorted(by_key, key=lambda r: r)
    assert bool((keys >= 0).all())


def test_int32_coords_pack_like_int64():
    coords = torch.tensor([[3, -5, 7, COORD_MAX], [0, COORD_MIN, 0, -1]], dtype=torch.int32)
    assert torch.equal(pack_keys(coords), pack_keys(coords.long()))


near_edge = st.one_of(
    st.integers(COORD_MIN, COORD_MIN + 3), st.integers(-3, 3), st.integers(COORD_MAX - 3, COORD_MAX)
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), near_edge, near_edge, near_edge), min_size=1, max_size=30
    ),
    st.lists(st.tuples(*[st.integers(-4, 4)] * 3), min_size=1, max_size=8),
)
def test_offset_delta_finds_exactly_the_in_range_neighbours(rows, offsets):
    """key + delta hits a row iff that shifted coordinate exists, also across the range edges."""
    coords = torch.tensor(sorted(set(rows)), dtype=torch.int64)
    table = KeyTable(coords)
    off = torch.tensor(offsets, dtype=torch.int64)
    found = table.find(pack_keys(coords)[:, None] + offset_delta(off)[None, :])
    where = {tuple(c): i for i, c in enumerate(coords.tolist())}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        for k, (dx, dy, dz) in enumerate(offsets):
            assert int(found[i, k]) == where.get((b, x + dx, y + dy, z + dz), -1)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([1, 2, 3]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([2, 3]),
)
def test_find_offsets_equals_one_search_per_offset(seed, step, table_aligned, base_aligned, ks):
    """The run shortcut (aligned z) and its fallback both give the per-offset answer."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(-4, 5, (60, 4), generator=gen), dim=0)
    coords[:, 0] = coords[:, 0].abs() % 2
    if table_aligned:
        coords[:, 1:] *= step
    coords = torch.unique(coords, dim=0)
    base = torch.randint(-4, 5, (40, 4), generator=gen)
    base[:, 0] = base[:, 0].abs() % 2
    if base_aligned:
        base[:, 1:] *= step
    offs = [(x * step, y * step, z * step) for z in range(-1, 2) for y in (0, 1) for x in (0, -1)]
    offsets = torch.tensor(offs[: 4 * ks])
    table = KeyTable(coords)
    got = table.find_offsets(base, offsets)
    expected = table.find(pack_keys(base)[:, None] + offset_delta(offsets)[None, :])
    assert torch.equal(got, expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 2]))
def test_find_offsets_on_an_unsorted_table_at_the_key_range_edges(seed, step):
    """Rows of an unsorted table, queries past the last key and at the range limits (where a
    query key can run into the sentinel past the end or borrow across fields) all resolve."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(-3, 4, (50, 4), generator=gen), dim=0) * step
    coords[:, 0] = coords[:, 0].abs() % 3
    edge = torch.tensor([[BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX - COORD_MAX % step],
                         [0, COORD_MIN, COORD_MIN, COORD_MIN],
                         [BATCH_MAX, COORD_MIN, COORD_MAX, COORD_MIN]])
    coords = torch.unique(torch.cat([coords, edge]), dim=0)
    coords = coords[torch.randperm(len(coords), generator=gen)]
    offsets = torch.tensor([(x, y, z) for z in (-step, 0, step) for y in (-1, 0, 1)
                            for x in (-1, 0, 1)])
    table = KeyTable(coords)
    assert table.order is not None
    for base in (coords, edge):
        got = table.find_offsets(base, offsets)
        where = {tuple(c): i for i, c in enumerate(coords.tolist())}
        expected = torch.tensor([[where.get((b, x + dx, y + dy, z + dz), -1)
                                  for dx, dy, dz in offsets.tolist()]
                                 for b, x, y, z in base.tolist()])
        assert torch.equal(got, expected)
    assert table.find(pack_keys(coords)).tolist() == list(range(len(coords)))


def test_key_table_maps_back_to_unsorted_rows_and_misses():
    coords = torch.tensor([[0, 5, 0, 0], [1, -2, 3, 4], [0, -7, 1, 1]])
    table = KeyTable(coords)
    query = pack_keys(torch.tensor([[0, -7, 1, 1], [0, 5, 0, 0], [1, -2, 3, 4], [1, 5, 0, 0]]))
    assert table.find(query).tolist() == [2, 0, 1, -1]


def test_empty_table_finds_nothing():
    table = KeyTable(torch.zeros(0, 4, dtype=torch.int64))
    assert len(table) == 0
    assert table.find(torch.tensor([0, 5])).tolist() == [-1, -1]


def test_duplicate_rows_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        KeyTable(torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 2, 3]]))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([0, COORD_MIN - 1, 0, 0], r"x\) = -32769 is below the key-packing limit COORD_MIN = -3"),
        ([0, 0, COORD_MAX + 1, 0], r"y\) = 32768 is above the key-packing limit COORD_MAX = 32767"),
        ([0, 0, 0, -100000], r"z\) = -100000 is below the key-packing limit COORD_MIN"),
        ([-1, 0, 0, 0], r"batch\) = -1 is outside the key-packing range \[0, 4095\]"),
        ([BATCH_MAX + 1, 0, 0, 0], r"batch\) = 4096 is outside"),
    ],
)
def test_out_of_range_coordinates_name_the_limit(bad, match):
    coords = torch.tensor([[0, 0, 0, 0], bad])
    with pytest.raises(ValueError, match=match):
        pack_keys(coords)


def test_bad_coordinate_tensors_are_refused():
    with pytest.raises(ValueError, match="int32 or int64"):
        check_coords(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        check_coords(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        check_coords([[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="OFFSET_MAX"):
        offset_delta(torch.tensor([[OFFSET_MAX + 1, 0, 0]]))
    with pytest.raises(ValueError, match="1-D int64"):
        unpack_keys(torch.zeros(3, dtype=torch.int32))
