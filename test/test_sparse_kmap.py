"""Kernel offsets (torchsparse order), downsampled coordinates, kernel maps and their cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.sparse import (
    SparseTensor,
    build_kernel_map,
    conv3d,
    downsample_coords,
    get_kernel_map,
    get_transposed_map,
    kernel_offsets,
)
from clip2scene_ros.sparse.kmap import build_pooling_map, is_pooling


def random_coords(seed: int, n: int, lo: int = -4, hi: int = 5, batches: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randint(0, batches, (n, 1), generator=gen)
    xyz = torch.randint(lo, hi, (n, 3), generator=gen)
    return torch.unique(torch.cat([b, xyz], dim=1), dim=0)


def tensor_of(coords: torch.Tensor, stride: int = 1, channels: int = 1) -> SparseTensor:
    return SparseTensor(torch.zeros(len(coords), channels, dtype=torch.float64), coords, stride)


# --- kernel offsets -------------------------------------------------------------------------


def test_k3_offsets_x_fastest_centre_13():
    off = kernel_offsets(3).tolist()
    assert len(off) == 27
    for k, (dx, dy, dz) in enumerate(off):
        assert k == 9 * (dz + 1) + 3 * (dy + 1) + (dx + 1)
    assert off[13] == [0, 0, 0]
    assert off[:4] == [[-1, -1, -1], [0, -1, -1], [1, -1, -1], [-1, 0, -1]]


def test_k2_offsets_x_slowest():
    off = kernel_offsets(2).tolist()
    assert off == [[bx, by, bz] for bx in (0, 1) for by in (0, 1) for bz in (0, 1)]
    for k, (bx, by, bz) in enumerate(off):
        assert k == 4 * bx + 2 * by + bz


def test_offsets_scale_with_tensor_stride_and_dilation_and_k1_is_zero():
    assert torch.equal(kernel_offsets(3, tensor_stride=4), kernel_offsets(3) * 4)
    assert torch.equal(kernel_offsets(2, tensor_stride=2, dilation=3), kernel_offsets(2) * 6)
    assert kernel_offsets(1).tolist() == [[0, 0, 0]]
    assert kernel_offsets((3, 1, 1)).tolist() == [[-1, 0, 0], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="kernel_size"):
        kernel_offsets(0)


# --- downsampled coordinates ----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.sampled_from([1, 2, 4]))
def test_k2s2_downsample_is_unique_floor(seed, n, ts):
    coords = random_coords(seed, n, -9, 9)
    coords[:, 1:] *= ts
    out = downsample_coords(coords, ts, 2, 2)
    s = 2 * ts
    expected = sorted({(b, x // s * s, y // s * s, z // s * s) for b, x, y, z in coords.tolist()})
    assert [tuple(r) for r in out.tolist()] == expected  # Python // floors like torchsparse
    assert out.dtype == coords.dtype


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40))
def test_k3s2_downsample_reaches_every_output_with_a_neighbour(seed, n):
    coords = random_coords(seed, n)
    out = downsample_coords(coords, 1, 2, 3)
    lo = coords[:, 1:].min(dim=0).values.tolist()
    inputs = {tuple(r) for r in coords.tolist()}
    expected = set()
    for b, x, y, z in inputs:
        for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3):
            q = (x - dx, y - dy, z - dz)
            if all(v % 2 == 0 for v in q) and all(q[a] >= lo[a] for a in range(3)):
                expected.add((b, *q))
    assert [tuple(r) for r in out.tolist()] == sorted(expected)


# --- kernel maps ----------------------------------------------------------------------------


def brute_force_map(in_coords, out_coords, offsets):
    where = {tuple(c): i for i, c in enumerate(in_coords.tolist())}
    return torch.tensor(
        [
            [where.get((b, x + dx, y + dy, z + dz), -1) for dx, dy, dz in offsets.tolist()]
            for b, x, y, z in out_coords.tolist()
        ],
        dtype=torch.int64,
    ).reshape(len(out_coords), len(offsets))


def check_pairs_match_table(kmap):
    """The compacted pairs list exactly the hits of out_in_map, grouped by offset."""
    start = 0
    for k, n in enumerate(kmap.counts):
        outs = kmap.out_index[start : start + n]
        ins = kmap.in_index[start : start + n]
        expected_outs = (kmap.out_in_map[:, k] >= 0).nonzero().flatten()
        assert torch.equal(outs, expected_outs)
        assert torch.equal(ins, kmap.out_in_map[outs, k])
        start += n
    assert start == kmap.num_pairs == int((kmap.out_in_map >= 0).sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50), st.sampled_from([1, 2, 3]))
def test_submanifold_map_matches_brute_force(seed, n, ks):
    coords = random_coords(seed, n)
    x = tensor_of(coords)
    kmap = get_kernel_map(x, ks)
    assert torch.equal(kmap.out_in_map, brute_force_map(coords, coords, kernel_offsets(ks)))
    check_pairs_match_table(kmap)
    assert kmap.out_coords is coords and kmap.in_coords is coords
    zero = kernel_offsets(ks).abs().sum(dim=1).tolist().index(0)
    assert kmap.identity_offset == zero
    assert torch.equal(kmap.out_in_map[:, zero], torch.arange(len(coords)))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.sampled_from([1, 2]),
       st.sampled_from(["k3", "k2", "one_sided", "z_only"]))
def test_submanifold_maps_of_unsorted_rows_match_brute_force(seed, n, dilation, kind):
    """Submanifold maps read half their offsets off the mirrored half (``o`` vs ``-o``); on
    unsorted rows, with dilation, and for offset sets that are not closed under negation (no
    mirroring) they must still equal the brute-force map."""
    gen = torch.Generator().manual_seed(seed + 1)
    coords = random_coords(seed, n)
    coords = coords[torch.randperm(len(coords), generator=gen)]
    offsets = {"k3": kernel_offsets(3, dilation=dilation),
               "k2": kernel_offsets(2, dilation=dilation),
               "one_sided": kernel_offsets(3, dilation=dilation)[13:],
               "z_only": torch.tensor([[0, 0, -1], [0, 0, 0], [0, 0, 1], [0, 0, 2]])}[kind]
    kmap = build_kernel_map(coords, coords, offsets)
    assert torch.equal(kmap.out_in_map, brute_force_map(coords, coords, offsets))
    check_pairs_match_table(kmap)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50), st.sampled_from([(2, 2), (3, 2), (1, 2)]))
def test_strided_map_matches_brute_force(seed, n, ks_stride):
    ks, stride = ks_stride
    coords = random_coords(seed, n) * torch.tensor([1, 2, 2, 2])  # a stride-2 tensor
    x = tensor_of(coords, stride=2)
    kmap = get_kernel_map(x, ks, stride)
    assert torch.equal(kmap.out_coords, downsample_coords(coords, 2, stride, ks))
    expected = brute_force_map(coords, kmap.out_coords, kernel_offsets(ks, tensor_stride=2))
    assert torch.equal(kmap.out_in_map, expected)
    check_pairs_match_table(kmap)
    assert kmap.identity_offset is None
    assert bool((kmap.out_in_map >= 0).any(dim=1).all())  # every output has an input
    assert x.cache.coords[(4, 4, 4)] is kmap.out_coords


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.sampled_from([1, 2, 4]),
       st.sampled_from([(2, 2, 2), (2, 2, 1), (1, 2, 2)]))
def test_pooling_map_equals_the_searched_map(seed, n, ts, ks):
    """Kernel = stride = 2 maps are built from each input's cell, without a neighbour search
    (``build_pooling_map``); on unsorted rows, any tensor stride and mixed per-axis kernels
    they must equal the searched map field for field."""
    gen = torch.Generator().manual_seed(seed + 7)
    coords = random_coords(seed, n, lo=-9, hi=9) * torch.tensor([1, ts, ts, ts])
    coords = coords[torch.randperm(len(coords), generator=gen)]
    assert is_pooling(ks, ks, (1, 1, 1))
    offsets = kernel_offsets(ks, tensor_stride=ts)
    fast = build_pooling_map(coords, (ts, ts, ts), ks, offsets)
    out_coords = downsample_coords(coords, ts, ks, ks)
    searched = build_kernel_map(coords, out_coords, offsets)
    assert torch.equal(fast.out_coords, out_coords)
    for name in ("out_in_map", "in_index", "out_index"):
        assert torch.equal(getattr(fast, name), getattr(searched, name)), name
    assert fast.counts == searched.counts and fast.identity_offset is None
    assert fast.out_in_map.t().is_contiguous()  # the [K, N_out] layout per-offset readers use
    check_pairs_match_table(fast)


def test_only_cell_maps_count_as_pooling():
    assert is_pooling((2, 2, 2), (2, 2, 2), (1, 1, 1))
    assert not is_pooling((3, 3, 3), (2, 2, 2), (1, 1, 1))  # k3 s2 reaches across cells
    assert not is_pooling((2, 2, 2), (2, 2, 2), (2, 2, 2))  # dilated
    assert not is_pooling((1, 1, 1), (1, 1, 1), (1, 1, 1))  # not strided
    assert not is_pooling((4, 4, 4), (4, 4, 4), (1, 1, 1))  # offsets -1..2, not 0..3


def test_transposed_map_reverses_the_downsampling_map():
    coords = random_coords(3, 80)
    x = tensor_of(coords)
    down = get_kernel_map(x, 2, 2)
    coarse = SparseTensor(torch.zeros(down.n_out, 1), down.out_coords, 2, x.cache)
    up = get_transposed_map(coarse, 2, 2)
    assert up is down.transposed() and up.transposed() is down
    assert up.n_out == len(coords) and up.n_in == down.n_out
    offsets = kernel_offsets(2).tolist()
    coarse_rows = {tuple(c): i for i, c in enumerate(down.out_coords.tolist())}
    for p, (b, px, py, pz) in enumerate(coords.tolist()):
        for k, (dx, dy, dz) in enumerate(offsets):
            # fine p reads coarse q with p = q + o_k
            assert int(up.out_in_map[p, k]) == coarse_rows.get((b, px - dx, py - dy, pz - dz), -1)
    # k2 s2: every fine voxel has exactly one coarse parent
    assert torch.equal((up.out_in_map >= 0).sum(dim=1), torch.ones(len(coords), dtype=torch.int64))
    check_pairs_match_table(up)


def test_transposed_map_is_built_from_cached_fine_coordinates_when_missing():
    coords = random_coords(5, 60)
    x = tensor_of(coords)
    coarse_coords = downsample_coords(coords, 1, 2, 2)
    coarse = SparseTensor(torch.zeros(len(coarse_coords), 1), coarse_coords, 2, x.cache)
    up = get_transposed_map(coarse, 2, 2)
    reference = build_kernel_map(coords, coarse_coords, kernel_offsets(2)).transposed()
    assert torch.equal(up.out_in_map, reference.out_in_map)


def test_transposed_map_without_fine_coordinates_is_refused():
    coarse = tensor_of(random_coords(1, 10) * 2, stride=2)
    with pytest.raises(ValueError, match=r"coordinates at stride \(1, 1, 1\)"):
        get_transposed_map(coarse, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        get_transposed_map(coarse, 2, 4)


def test_map_is_cached_per_stride_and_shared_by_derived_tensors():
    coords = random_coords(7, 100)
    x = SparseTensor(torch.randn(len(coords), 2, dtype=torch.float64), coords)
    first = get_kernel_map(x, 3)
    assert get_kernel_map(x, 3) is first
    y = conv3d(x, torch.randn(27, 2, 3, dtype=torch.float64))
    assert y.cache is x.cache
    assert get_kernel_map(y, 3) is first  # a later layer at the same stride reuses the map
    relu = y.replace_feats(torch.relu(y.feats))
    assert get_kernel_map(relu, 3) is first
    down = conv3d(relu, torch.randn(8, 3, 3, dtype=torch.float64), kernel_size=2, stride=2)
    other = get_kernel_map(down, 3)
    assert other is not first and other.n_in == len(down)
    assert get_kernel_map(down, 3) is other
    keys = set(x.cache.kmaps)
    assert ((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)) in keys
    assert ((2, 2, 2), (3, 3, 3), (1, 1, 1), (1, 1, 1)) in keys
    assert x.cache.tables[(1, 1, 1)] is x.key_table()  # one sort per stride


def test_cached_map_for_other_coordinates_is_refused():
    x = tensor_of(random_coords(2, 30))
    get_kernel_map(x, 3)
    impostor_coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    impostor = SparseTensor(torch.zeros(3, 1), impostor_coords, 1, x.cache)
    with pytest.raises(ValueError, match="share coordinates"):
        get_kernel_map(impostor, 3)


def test_empty_tensor_has_an_empty_map():
    x = tensor_of(torch.zeros(0, 4, dtype=torch.int64))
    kmap = get_kernel_map(x, 3)
    assert kmap.out_in_map.shape == (0, 27) and kmap.num_pairs == 0
    assert kmap.mean_neighbours == 0.0 and kmap.fill == 0.0
    assert get_kernel_map(x, 2, 2).n_out == 0


def test_fill_and_mean_neighbours_of_a_full_block():
    xyz = torch.tensor(list(itertools.product(range(3), repeat=3)))
    x = tensor_of(torch.cat([torch.zeros(27, 1, dtype=torch.int64), xyz], dim=1))
    kmap = get_kernel_map(x, 3)
    # pairs of a 3x3x3 block: per axis 3 + 2 + 2 = 7 (offset 0, +1, -1) -> 7**3
    assert kmap.num_pairs == 343
    assert kmap.mean_neighbours == pytest.approx(343 / 27)
    assert kmap.fill == pytest.approx(343 / 729)


def test_padded_map_uses_n_in_for_missing():
    x = tensor_of(random_coords(4, 20))
    kmap = get_kernel_map(x, 3)
    padded = kmap.padded_out_in_map()
    assert padded is kmap.padded_out_in_map()
    assert torch.equal(padded == kmap.n_in, kmap.out_in_map < 0)
