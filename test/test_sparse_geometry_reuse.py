"""Geometry that reuses what the engine already built gives the indices a search would give:
sorted z neighbours without a search, trilinear corners read off the 3x3x3 map, point -> voxel
rows through the pooling maps; and on the nuScenes keyframe, every map of SPVCNN's forward
equals one built by plain per-offset searches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.sparse import PointTensor, SparseTensor, get_kernel_map, initial_voxelize
from clip2scene_ros.sparse.keys import (
    BATCH_MAX,
    COORD_MAX,
    COORD_MIN,
    KeyTable,
    offset_delta,
    pack_keys,
)
from clip2scene_ros.sparse.kmap import kernel_offsets
from clip2scene_ros.sparse.voxelize import point_voxel_index, trilinear_index, voxelize


def sorted_coords(seed: int, step: int, n: int = 80, edges: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(-3, 4, (n, 4), generator=gen) * step
    coords[:, 0] = coords[:, 0].abs() % 2
    if edges:  # z runs that end at the key range's limits (guard bits, batch borrow)
        coords = torch.cat([coords, torch.tensor(
            [[0, 0, 0, COORD_MIN], [0, 0, 0, COORD_MIN + step], [1, COORD_MAX, 0, COORD_MAX],
             [BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX - COORD_MAX % step],
             [BATCH_MAX, 0, 0, COORD_MIN]])])
    return voxelize(coords, torch.zeros(len(coords), 0))[0]  # unique, sorted


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]), st.booleans())
def test_own_z_neighbours_without_a_search(seed: int, step: int, edges: bool) -> None:
    coords = sorted_coords(seed, step, edges=edges)
    table = KeyTable(coords)
    assert table.order is None  # sorted: the shortcut applies
    offsets = kernel_offsets(3, step)
    got = table.find_offsets(coords, offsets, own=True)
    expected = table.find(pack_keys(coords)[:, None] + offset_delta(offsets)[None, :])
    assert torch.equal(got, expected)
    assert torch.equal(table.find_offsets(coords, offsets), expected)


def test_own_is_ignored_for_an_unsorted_table() -> None:
    coords = sorted_coords(3, 1)
    coords = coords[torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))]
    table = KeyTable(coords)
    assert table.order is not None
    offsets = kernel_offsets(3, 1)
    expected = table.find(pack_keys(coords)[:, None] + offset_delta(offsets)[None, :])
    assert torch.equal(table.find_offsets(coords, offsets, own=True), expected)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([1, 2, 4]))
def test_trilinear_corners_from_the_submanifold_map(seed: int, s: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(80, 3, generator=gen, dtype=torch.float64) * 5 * s - 2 * s
    batch = torch.randint(0, 2, (80,), generator=gen)
    cells = torch.cat([batch[:, None], torch.floor(pts / s).long() * s], dim=1)
    rows = torch.unique(cells, dim=0)
    searched_x = SparseTensor(torch.zeros(len(rows), 1), rows, s)
    searched = trilinear_index(searched_x, PointTensor(torch.zeros(80, 1), pts, batch))
    x = SparseTensor(torch.zeros(len(rows), 1), rows, s)
    kmap = get_kernel_map(x, 3)  # what a network's convolutions at this stride build
    assert x.cache.kmaps and kmap.in_coords is x.coords
    read = trilinear_index(x, PointTensor(torch.zeros(80, 1), pts, batch))
    assert torch.equal(read[0], searched[0]) and torch.equal(read[1], searched[1])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([0.25, 1.0, 3.0]))
def test_point_voxel_rows_through_the_pooling_maps(seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    pts = (torch.rand(300, 3, generator=gen) - 0.5) * 40 * scale
    batch = torch.randint(0, 2, (300,), generator=gen)
    x, z = initial_voxelize(PointTensor(torch.zeros(300, 1), pts, batch))
    tensors = [x]
    for _ in range(4):  # SPVCNN's k2 s2 downsamplings: strides 2, 4, 8, 16
        kmap = get_kernel_map(tensors[-1], 2, 2)
        assert kmap.parents is not None
        stride = tensors[-1].stride[0] * 2
        tensors.append(SparseTensor(torch.zeros(kmap.n_out, 1), kmap.out_coords, stride,
                                    x.cache, check=False))
    for coarse in tensors[1:]:
        read = point_voxel_index(coarse, z)
        fresh = PointTensor(z.feats, z.coords, z.batch)  # no cache: searched
        searched = point_voxel_index(coarse, fresh)
        assert torch.equal(read[0], searched[0]) and torch.equal(read[1], searched[1])
        assert z.cache.voxel_coords[coarse.stride] is coarse.coords


def test_point_voxel_rows_fall_back_to_a_search_without_a_chain() -> None:
    pts = torch.tensor([[0.5, 0.5, 0.5], [3.2, 1.0, -2.5], [5.0, 5.0, 5.0]])
    x, z = initial_voxelize(PointTensor(torch.zeros(3, 1), pts))
    # stride-4 voxels made by hand (no pooling map): one point has none
    coarse = SparseTensor(torch.zeros(2, 1), torch.tensor([[0, 0, 0, 0], [0, 0, 0, -4]]), 4,
                          x.cache)
    index, counts = point_voxel_index(coarse, z)
    assert index.tolist() == [0, 1, -1] and counts.tolist() == [1, 1]


def searched_map(coords_in: torch.Tensor, coords_out: torch.Tensor, offsets: torch.Tensor
                 ) -> torch.Tensor:
    """out_in_map by one plain search per offset (none of the engine's shortcuts)."""
    table = KeyTable(coords_in)
    return table.find(pack_keys(coords_out)[:, None] + offset_delta(offsets)[None, :])


def test_keyframe_maps_equal_plain_searches(nuscenes_dir: Path) -> None:
    """SPVCNN's eager forward on the real keyframe (cr 0.5, 0.1 m): every kernel map, every
    point -> voxel row and every trilinear corner equal plain searches."""
    import clip2scene_ros.models.spvcnn as spvcnn
    from clip2scene_ros.bag.scans import load_scan
    from clip2scene_ros.models.fuse import fold_batchnorms
    from clip2scene_ros.models.spconv_twin import random_spvcnn

    scan = next(nuscenes_dir.glob("*LIDAR_TOP*.pcd.bin"))
    points = torch.from_numpy(np.ascontiguousarray(load_scan(scan)))
    net = fold_batchnorms(random_spvcnn(0.5))
    caches = {}
    real = spvcnn.voxel_to_point

    def grab(x: SparseTensor, z: PointTensor, *args: object, **kwargs: object) -> PointTensor:
        caches["sparse"], caches["point"] = x.cache, z.cache
        return real(x, z, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(spvcnn, "voxel_to_point", grab)
        z = PointTensor(points, points[:, :3] / 0.1)
        net(z)
    sparse, point = caches["sparse"], caches["point"]
    assert len(sparse.kmaps) == 9
    for (stride, ks, st_, _), kmap in sparse.kmaps.items():
        offsets = kernel_offsets(ks, stride)
        expected = searched_map(kmap.in_coords, kmap.out_coords, offsets)
        assert torch.equal(kmap.out_in_map, expected), (stride, ks, st_)
    coords = torch.cat([torch.zeros(len(points), 1, dtype=torch.int64),
                        torch.floor(points[:, :3] / 0.1).long()], dim=1)
    for stride, (index, _) in point.voxel_index.items():
        cells = coords.clone()
        cells[:, 1:] = torch.div(cells[:, 1:], stride[0], rounding_mode="floor") * stride[0]
        table = KeyTable(sparse.coords[stride])
        assert torch.equal(index, table.find(pack_keys(cells))), stride
    assert sorted(point.interp) == [(1, 1, 1), (4, 4, 4), (16, 16, 16)]
    for stride, (index, _, _) in point.interp.items():
        cells = coords.clone()
        cells[:, 1:] = torch.div(cells[:, 1:], stride[0], rounding_mode="floor") * stride[0]
        corners = pack_keys(cells)[:, None] + offset_delta(kernel_offsets(2, stride))[None, :]
        assert torch.equal(index, KeyTable(sparse.coords[stride]).find(corners)), stride


def test_point_voxel_rows_at_other_strides_are_searched() -> None:
    """Only powers of two go through the chain (there a float p / s is exact)."""
    pts = torch.tensor([[5.99, 0.5, 0.5], [6.0, 0.5, 0.5], [-0.01, 11.9, 0.5]])
    x, z = initial_voxelize(PointTensor(torch.zeros(3, 1), pts))
    coarse = SparseTensor(torch.zeros(3, 1), torch.tensor([[0, -6, 6, 0], [0, 0, 0, 0],
                                                          [0, 6, 0, 0]]), 6, x.cache)
    assert point_voxel_index(coarse, z)[0].tolist() == [1, 2, 0]
