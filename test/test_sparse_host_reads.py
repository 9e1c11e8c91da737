"""The sparse engine's host reads per frame: few, and where they are inherent.

On a GPU every read of a device value back to the host (``.tolist()``, ``int(t)``, ``bool(t)``,
...) waits for the device; :func:`count_host_reads` counts them on a CPU, where they are the
calls that would wait. A frame's geometry reads its input checks once and each kernel map's
pairs per offset once (the gather-scatter dataflow slices by them); nothing else.
"""

from __future__ import annotations

import pytest
import torch

from clip2scene_ros.models.spconv_twin import random_spvcnn
from clip2scene_ros.runtime.device_io import count_host_reads
from clip2scene_ros.sparse import (
    KeyTable,
    PointTensor,
    SparseTensor,
    get_kernel_map,
    initial_voxelize,
    kernel_offsets,
    offset_delta,
    pack_keys,
    trilinear_index,
)
from clip2scene_ros.sparse.keys import OFFSET_MAX
from clip2scene_ros.sparse.kmap import (
    _pooling_map,
    build_kernel_map,
    build_pooling_map,
    downsample_coords,
    downsample_keys,
    kernel_offset_rows,
)

#: SPVCNN's maps of one frame: a 3x3x3 submanifold map at strides 1-16 and a 2x2x2 pooling map
#: into strides 2-16 (the transposed convolutions reuse the pooling maps).
SPVCNN_MAPS = 9
#: Host reads of one SPVCNN forward: the input checks in one read, then one per kernel map.
SPVCNN_READS = 1 + SPVCNN_MAPS


def cloud(n: int, seed: int, side: float = 40.0) -> PointTensor:
    gen = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([side, side, 4.0]) / 0.1
    return PointTensor(torch.rand(n, 4, generator=gen), xyz, check=False)


def test_an_spvcnn_frame_reads_once_per_kernel_map_and_once_for_its_checks() -> None:
    """A keyframe-sized cloud (35k points, as the nuScenes keyframe) through SPVCNN's trunk:
    the read count stays at the inherent ones, so that it cannot creep back."""
    net = random_spvcnn(0.25)
    points = cloud(35_000, 0)
    with torch.inference_mode():
        net.point_features(points)  # warm-up: lazy module state is not the frame's
        with count_host_reads("cpu", sites=True) as reads:
            net.point_features(cloud(35_000, 0))
    assert reads.total <= SPVCNN_READS, dict(reads.by_site)
    sites = {site.rsplit(" ", 1)[1]: n for site, n in reads.by_site.items()}
    assert sites == {"_check_frame": 1, "counts": SPVCNN_MAPS}, dict(reads.by_site)


def test_counting_reads_by_site_names_the_calling_line() -> None:
    t = torch.arange(3)
    with count_host_reads("cpu", sites=True) as outer, count_host_reads("cpu") as inner:
        t.tolist()
        int(t[0])
    assert inner.total == outer.total == 2 and inner.by_site == {}
    assert sorted(site.rsplit(" ", 1)[1] for site in outer.by_site) == [
        "test_counting_reads_by_site_names_the_calling_line"] * 2
    assert all(site.startswith("test/test_sparse_host_reads.py:") or
               "test_sparse_host_reads.py:" in site for site in outer.by_site)


def test_kernel_maps_read_their_counts_once_and_only_when_asked() -> None:
    x, _ = initial_voxelize(cloud(3000, 1, side=8.0))
    with count_host_reads("cpu") as building:
        sub = get_kernel_map(x, 3)
        pool = get_kernel_map(x, 2, 2)
        down = SparseTensor(torch.zeros(pool.n_out, 1), pool.out_coords, 2, x.cache,
                            check=False)
        sub2 = get_kernel_map(down, 3)
        sub.padded_out_in_map(), sub2.padded_out_in_map()  # what a plan reads
        back = pool.transposed()
    assert building.total == 0
    # the counts are the hits per offset, read once and kept
    with count_host_reads("cpu") as asked:
        counts = sub.counts
        again = sub.counts
        pairs = sub.num_pairs
    assert asked.total == 1 and again is counts
    assert pairs == int((sub.out_in_map >= 0).sum())
    assert counts == tuple((sub.out_in_map >= 0).sum(dim=0).tolist())
    assert back.counts == pool.counts and sub.identity_offset == 13
    assert pool.identity_offset is None


def test_tables_made_from_sorted_keys_equal_searched_ones() -> None:
    gen = torch.Generator().manual_seed(2)
    rows = torch.unique(torch.randint(-6, 6, (400, 4), generator=gen)
                        * torch.tensor([0, 2, 2, 2]), dim=0)
    rows[:, 0] = 0
    rows = torch.unique(rows, dim=0)
    keys = pack_keys(rows)
    assert bool((keys[1:] > keys[:-1]).all())
    given = KeyTable(rows, sorted_keys=keys, z_step=2)
    searched = KeyTable(rows)
    offsets = kernel_offsets(3, 2)
    with count_host_reads("cpu") as reads:
        got = given.find_offsets(rows, offsets, own=True, rows=kernel_offset_rows(3, 2))
    assert reads.total == 0
    assert torch.equal(got, searched.find_offsets(rows, offsets))
    query = keys[:, None] + offset_delta(offsets)[None, :]
    assert torch.equal(got, searched.find(query))
    with pytest.raises(ValueError, match="sorted_keys has"):
        KeyTable(rows, sorted_keys=keys[1:])


def test_z_step_decides_the_run_search_without_reading() -> None:
    """A table that knows its z are multiples of 2 answers dz runs of step 2 the same as one
    that reads its z to find out; one that does not know reads them (once per step)."""
    rows = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 4], [0, 2, 0, 2]])
    offsets = kernel_offsets(3, 2)
    listed = kernel_offset_rows(3, 2)
    base = rows + torch.tensor([0, 0, 0, 2])
    known = KeyTable(rows, sorted_keys=pack_keys(rows), z_step=2)
    unknown = KeyTable(rows)
    with count_host_reads("cpu") as reads:
        a = known.find_offsets(rows, offsets, own=True, rows=listed)
    assert reads.total == 0
    with count_host_reads("cpu") as reads:
        b = unknown.find_offsets(rows, offsets, own=True, rows=listed)
    assert reads.total >= 1  # the order check and the z step
    assert torch.equal(a, b)
    # a base that is not the table's rows: its alignment is read, the answer is the same
    assert torch.equal(known.find_offsets(base, offsets, rows=listed),
                       unknown.find_offsets(base, offsets))


def test_offset_rows_equal_the_offsets_tensor() -> None:
    for size in (1, 2, 3, (3, 1, 1), (2, 3, 1), (1, 2, 2)):
        for stride in (1, 2, (1, 2, 4)):
            for dilation in (1, 3):
                rows = kernel_offset_rows(size, stride, dilation)
                assert kernel_offsets(size, stride, dilation).tolist() == [list(r) for r in rows]
    big = torch.tensor([[OFFSET_MAX + 1, 0, 0]])
    for rows in (None, ((OFFSET_MAX + 1, 0, 0),)):
        with pytest.raises(ValueError, match=f"offset {OFFSET_MAX + 1} exceeds"):
            offset_delta(big, rows)


def test_maps_from_offset_rows_equal_maps_that_read_the_offsets() -> None:
    x, _ = initial_voxelize(cloud(2000, 3, side=6.0))
    offsets = kernel_offsets(3)
    listed = build_kernel_map(x.coords, x.coords, offsets)
    given = build_kernel_map(x.coords, x.coords, offsets, rows=kernel_offset_rows(3))
    assert torch.equal(listed.out_in_map, given.out_in_map)
    assert listed.counts == given.counts and listed.identity_offset == given.identity_offset
    pool_offsets = kernel_offsets(2)
    a = build_pooling_map(x.coords, (1, 1, 1), (2, 2, 2), pool_offsets)
    b, keys = _pooling_map(x.coords, (1, 1, 1), (2, 2, 2), pool_offsets, kernel_offset_rows(2))
    assert torch.equal(a.out_in_map, b.out_in_map) and a.counts == b.counts
    assert torch.equal(pack_keys(b.out_coords), keys)
    k3 = downsample_keys(x.coords, 1, 2, 3)
    assert torch.equal(pack_keys(downsample_coords(x.coords, 1, 2, 3)), k3)
    assert torch.equal(downsample_keys(x.coords, 1, 2, 3, check=False), k3)
    with pytest.raises(ValueError, match="int32 or int64"):
        downsample_keys(x.coords.float(), 1, 2, 3)
    assert bool((k3[1:] > k3[:-1]).all())


def test_strided_maps_leave_the_next_stride_a_table_of_sorted_keys() -> None:
    """... and read nothing (pooling) or only the range check of the outputs a k3 kernel
    reaches beyond the inputs (those of the input were checked when its tensor was made)."""
    for ks, expected_reads in ((2, 0), (3, 1)):  # pooling, and k3 s2 via downsample_coords
        x, _ = initial_voxelize(cloud(2000, 4, side=6.0))
        with count_host_reads("cpu", sites=True) as reads:
            kmap = get_kernel_map(x, ks, 2)
        assert reads.total == expected_reads, dict(reads.by_site)
        table = x.cache.tables[(2, 2, 2)]
        assert table.order is None and torch.equal(table.sorted_keys,
                                                   pack_keys(kmap.out_coords))
        assert x.cache.coords[(2, 2, 2)] is kmap.out_coords


def test_points_without_a_voxel_are_read_once_then_remembered() -> None:
    """At a stride whose voxels do not hold every point, the search's coverage is read once
    (then the corners of the points without a cell are searched); a covered stride reads
    nothing."""
    z = cloud(500, 5, side=4.0)
    x, z = initial_voxelize(z)
    assert z.cache.covered[(1, 1, 1)] is True
    with count_host_reads("cpu") as reads:
        trilinear_index(x, z)
    assert reads.total == 0
    half = SparseTensor(torch.zeros(len(x) // 2, 1), x.coords[: len(x) // 2].clone(), 1)
    index, _ = trilinear_index(half, z)
    assert z.cache.covered[(1, 1, 1)] is False
    assert bool((index[:, 0] < 0).any())
    z.cache.interp.clear()  # corners again: the coverage is not read again
    with count_host_reads("cpu") as reads:
        again, _ = trilinear_index(half, z)
    assert reads.total == 0 and torch.equal(again, index)


def test_the_frame_checks_read_once_and_fail_as_before() -> None:
    z = cloud(100, 6)
    with count_host_reads("cpu") as reads:
        initial_voxelize(z)
    assert reads.total == 1
    bad = z.coords.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="point coords has 1 rows with NaN/Inf"):
        initial_voxelize(PointTensor(z.feats, bad, check=False))
    far = z.coords.clone()
    far[0, 2] = -40000.0
    with pytest.raises(ValueError, match=r"coords\[:, 3\] \(z\) = -40000 is below"):
        initial_voxelize(PointTensor(z.feats, far, check=False))
    batch = torch.full((100,), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(batch\) = -1 is outside"):
        initial_voxelize(PointTensor(z.feats, z.coords, batch, check=False))
    with pytest.raises(ValueError, match="batch must be"):
        initial_voxelize(PointTensor(z.feats, z.coords, batch[:5], check=False))


def test_a_plan_reads_its_input_check_and_one_read_per_pool() -> None:
    """The ONNX/TensorRT path's geometry: one read for the input check, one per pool for the
    chunk counts of every level; its pools equal a search from scratch."""
    from clip2scene_ros.models.spvcnn import plan_schema
    from clip2scene_ros.sparse.plan import build_plan
    from clip2scene_ros.sparse.voxelize import point_voxel_index

    gen = torch.Generator().manual_seed(7)
    coords = torch.rand(5000, 3, generator=gen) * torch.tensor([300.0, 300.0, 40.0])
    coords[:1000] = coords[:1000] * 0.01 + 50.0  # voxels of many points: several levels
    batch = torch.zeros(5000, dtype=torch.int64)
    schema = plan_schema(5000)
    with count_host_reads("cpu", sites=True) as reads:
        plan = build_plan(schema, coords, batch)
    assert reads.total == 1 + len(schema.pools), dict(reads.by_site)
    for s in schema.pools:
        x = SparseTensor(torch.zeros(plan.coords[s].shape[0], 1), plan.coords[s], s,
                         check=False)
        index, counts = point_voxel_index(x, PointTensor(torch.zeros(5000, 0), coords, batch))
        assert torch.equal(plan.pools[s][1].squeeze(1), counts.clamp(min=1).float()), s
        summed = plan.pools[s][0](torch.eye(5000)[:, :64])
        expected = torch.zeros(len(x), 64).index_add_(0, index, torch.eye(5000)[:, :64])
        assert torch.equal(summed, expected), s
