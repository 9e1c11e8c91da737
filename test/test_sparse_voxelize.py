"""Point <-> voxel operations against hand-computed values and a loop oracle of torchsparse."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.sparse import (
    PointTensor,
    SparseTensor,
    devoxelize,
    initial_voxelize,
    point_to_voxel,
    trilinear_index,
    voxel_to_point,
    voxelize,
)

F64 = torch.float64


def voxels(rows, values, stride=1) -> SparseTensor:
    return SparseTensor(torch.tensor(values, dtype=F64), torch.tensor(rows), stride)


def test_voxelize_means_features_and_returns_the_inverse():
    coords = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    feats = torch.tensor([[5.0], [1.0], [7.0], [3.0]], dtype=F64, requires_grad=True)
    vc, vf, inverse = voxelize(coords, feats)
    assert vc.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]  # sorted (batch, x, y, z)
    assert vf.flatten().tolist() == [2.0, 5.0, 7.0]
    assert inverse.tolist() == [1, 0, 2, 0]
    assert torch.equal(vc[inverse], coords)
    vf.sum().backward()
    assert feats.grad.flatten().tolist() == [1.0, 0.5, 1.0, 0.5]


def test_initial_voxelize_floors_scaled_points_and_keeps_the_batches_apart():
    coords = torch.tensor([[0.2, 0.9, 0.0], [0.7, 0.1, 0.5], [-0.5, 0.0, 0.0], [0.2, 0.9, 0.0]])
    batch = torch.tensor([0, 0, 0, 1])
    feats = torch.tensor([[1.0], [3.0], [10.0], [20.0]], dtype=F64)
    x, z = initial_voxelize(PointTensor(feats, coords, batch), init_res=0.05, after_res=0.05)
    assert x.stride == (1, 1, 1)
    assert x.coords.tolist() == [[0, -1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert x.feats.flatten().tolist() == [10.0, 2.0, 20.0]
    index, counts = z.cache.voxel_index[(1, 1, 1)]
    assert index.tolist() == [1, 1, 0, 2] and counts.tolist() == [1, 2, 1]
    # init_res / after_res rescales the points (spvnas: coords * pres / vres)
    x2, z2 = initial_voxelize(PointTensor(feats, coords * 10, batch), init_res=1.0, after_res=2.0)
    assert torch.allclose(z2.coords, coords * 5)
    assert x2.coords.tolist() == [[0, -3, 0, 0], [0, 1, 4, 0], [0, 3, 0, 2], [1, 1, 4, 0]]


def test_point_to_voxel_means_points_per_coarse_voxel():
    x = voxels([[0, 0, 0, 0], [0, 2, 0, 0], [0, 4, 4, 4]], [[0.0], [0.0], [0.0]], stride=2)
    points = torch.tensor([[0.5, 1.9, 0.0], [1.5, 0.0, 1.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    z = PointTensor(torch.tensor([[2.0], [4.0], [8.0], [100.0]], dtype=F64), points)
    out = point_to_voxel(x, z)
    assert out.coords is x.coords and out.cache is x.cache and out.stride == (2, 2, 2)
    # voxel (0,0,0) <- points 0, 1; voxel (2,0,0) <- point 2; (4,4,4) gets none -> 0;
    # point 3 falls in voxel (8,8,8), which does not exist, and is left out.
    assert out.feats.flatten().tolist() == [3.0, 8.0, 0.0]
    assert z.cache.voxel_index[(2, 2, 2)][0].tolist() == [0, 0, 1, -1]


def test_voxel_to_point_stride_1_hand_example():
    x = voxels([[0, 0, 0, 0], [0, 1, 0, 0]], [[1.0], [2.0]])
    z = PointTensor(torch.zeros(3, 1, dtype=F64), torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.0, 0.0],
                                                                [1.5, 0.0, 0.0]], dtype=F64))
    out = voxel_to_point(x, z).feats.flatten()
    eps = 1e-8
    # point 0: corners (0,0,0) w 0.75 and (1,0,0) w 0.25 -> 1.25 (renormalised by 1 + 1e-8)
    assert out[0].item() == pytest.approx(1.25 / (1 + eps), abs=1e-15)
    # point 1 sits on voxel (0,0,0): nearest
    assert out[1].item() == pytest.approx(1.0 / (1 + eps), abs=1e-15)
    # point 2: corner (1,0,0) w 0.5 present, (2,0,0) w 0.5 missing -> renormalised to voxel 1
    assert out[2].item() == pytest.approx(2.0 * 0.5 / (0.5 + eps), abs=1e-15)
    index, weights = trilinear_index(x, z)
    assert index[0].tolist() == [0, -1, -1, -1, 1, -1, -1, -1]  # x slowest, z fastest
    assert weights[0, 0].item() == pytest.approx(0.75 / (1 + eps), abs=1e-15)
    assert weights[0, 4].item() == pytest.approx(0.25 / (1 + eps), abs=1e-15)


def test_voxel_to_point_stride_2_features_sit_at_the_min_corner():
    x = voxels([[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 2]], [[1.0], [3.0], [5.0]], stride=2)
    pts = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 1.5], [0.0, 0.0, 0.0]], dtype=F64)
    out = voxel_to_point(x, PointTensor(torch.zeros(3, 1, dtype=F64), pts)).feats.flatten()
    # x = 1 is halfway between lattice points 0 and 2 (cell min corners), not the centre of a cell
    assert out[0].item() == pytest.approx(2.0, abs=1e-7)
    # (0.5, 0, 1.5): weights x (1.5, 0.5), y (2, 0), z (0.5, 1.5) / 8 -> corners (0,0,0) 0.1875,
    # (0,0,2) 0.5625, (2,0,0) 0.0625, (2,0,2) missing; renormalised over 0.8125
    expected = (0.1875 * 1.0 + 0.5625 * 5.0 + 0.0625 * 3.0) / 0.8125
    assert out[1].item() == pytest.approx(expected, abs=1e-7)
    assert out[2].item() == pytest.approx(1.0, abs=1e-7)


def test_nearest_keeps_only_the_own_cell():
    x = voxels([[0, 0, 0, 0], [0, 1, 0, 0]], [[1.0], [2.0]])
    z = PointTensor(torch.zeros(1, 1, dtype=F64), torch.tensor([[0.25, 0.0, 0.0]], dtype=F64))
    out = voxel_to_point(x, z, nearest=True).feats.item()
    assert out == pytest.approx(0.75 / (1 + 1e-8), abs=1e-15)  # spvnas keeps w0 as computed
    assert voxel_to_point(x, z).feats.item() == pytest.approx(1.25, abs=1e-7)  # cache unharmed


def test_devoxelize_never_reads_another_batch():
    x = voxels([[0, 0, 0, 0], [1, 1, 0, 0]], [[1.0], [50.0]])
    pts = torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]], dtype=F64)
    z = PointTensor(torch.zeros(2, 1, dtype=F64), pts, torch.tensor([0, 1]))
    out = voxel_to_point(x, z).feats.flatten()
    assert out[0].item() == pytest.approx(1.0, abs=1e-7)  # (1,0,0) exists only in batch 1
    assert out[1].item() == pytest.approx(50.0, abs=1e-6)  # (0,0,0) exists only in batch 0


def oracle_devoxelize(vox_rows, vox_feats, pts, batch, s):
    """torchsparse calc_ti_weights + spdevoxelize, one point at a time."""
    where = {tuple(r): i for i, r in enumerate(vox_rows)}
    out = []
    for (px, py, pz), b in zip(pts, batch, strict=True):
        p = (px, py, pz)
        pf = [math.floor(v / s) * s for v in p]
        acc, total = [0.0] * len(vox_feats[0]), 0.0
        terms = []
        for bits in itertools.product((0, 1), repeat=3):  # x slowest
            w = 1.0
            for a in range(3):
                w *= (p[a] - pf[a]) if bits[a] else (pf[a] + s - p[a])
            w /= s**3
            row = where.get((b, *(pf[a] + bits[a] * s for a in range(3))))
            if row is None:
                w = 0.0
            total += w
            terms.append((w, row))
        for w, row in terms:
            if row is not None:
                for c in range(len(acc)):
                    acc[c] += w / (total + 1e-8) * vox_feats[row][c]
        out.append(acc)
    return torch.tensor(out, dtype=F64)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([1, 2, 4]))
def test_devoxelize_matches_the_torchsparse_oracle(seed, s):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.randint(0, 3, (30, 4), generator=gen) * torch.tensor([1, s, s, s]),
                        dim=0)
    rows[:, 0] %= 2
    rows = torch.unique(rows, dim=0)
    feats = torch.randn(len(rows), 2, generator=gen, dtype=F64)
    pts = torch.rand(25, 3, generator=gen, dtype=F64) * 3 * s - 0.5 * s
    batch = torch.randint(0, 2, (25,), generator=gen)
    x = SparseTensor(feats, rows, s)
    got = voxel_to_point(x, PointTensor(torch.zeros(25, 1, dtype=F64), pts, batch)).feats
    expected = oracle_devoxelize(rows.tolist(), feats.tolist(), pts.tolist(), batch.tolist(), s)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([1, 2, 4]), st.booleans())
def test_trilinear_corners_equal_a_direct_search(seed, s, all_cells):
    """Corners are read off each point's own voxel where it has one (else searched): the same
    indices as searching all eight corners of every point, and calc_ti_weights' weights."""
    from clip2scene_ros.sparse.keys import KeyTable, offset_delta, pack_keys
    from clip2scene_ros.sparse.kmap import kernel_offsets

    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(60, 3, generator=gen, dtype=F64) * 4 * s - s
    batch = torch.randint(0, 2, (60,), generator=gen)
    cells = torch.cat([batch[:, None], torch.floor(pts / s).long() * s], dim=1)
    extra = torch.randint(-1, 4, (25, 4), generator=gen) * torch.tensor([0, s, s, s])
    extra[:, 0] = torch.randint(0, 2, (25,), generator=gen)
    rows = torch.cat([cells if all_cells else cells[::3], extra])
    rows = torch.unique(rows, dim=0)[torch.randperm(len(torch.unique(rows, dim=0)),
                                                    generator=gen)]
    x = SparseTensor(torch.zeros(len(rows), 1, dtype=F64), rows, s)
    index, weights = trilinear_index(x, PointTensor(torch.zeros(60, 1, dtype=F64), pts, batch))
    query = pack_keys(cells)[:, None] + offset_delta(kernel_offsets(2, s))[None, :]
    assert torch.equal(index, KeyTable(rows).find(query))
    oracle = oracle_devoxelize(rows.tolist(), torch.eye(len(rows), dtype=F64).tolist(),
                               pts.tolist(), batch.tolist(), s)
    dense = torch.zeros(60, len(rows), dtype=F64)
    dense.scatter_add_(1, index.clamp(min=0), torch.where(index >= 0, weights, 0.0))
    assert torch.allclose(dense, oracle, atol=1e-12, rtol=0)


def test_csr_mm_equals_the_sparse_product_and_its_gradient():
    from clip2scene_ros.sparse.kmap import csr_matrix, csr_mm

    gen = torch.Generator().manual_seed(0)
    crow = torch.tensor([0, 2, 2, 5, 6])  # row 1 empty
    col = torch.tensor([0, 3, 1, 2, 3, 0])
    values = torch.rand(6, generator=gen, dtype=F64)
    matrix = csr_matrix(crow, col, values, (4, 5))
    assert matrix.crow_indices().dtype == torch.int32
    dense = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    out = csr_mm(matrix, dense)
    expected = matrix.to_dense() @ dense
    assert torch.allclose(out, expected, atol=1e-12) and not out[1].any()
    grad = torch.randn(4, 3, generator=gen, dtype=F64)
    assert torch.allclose(torch.autograd.grad(out, dense, grad)[0],
                          torch.autograd.grad(expected, dense, grad)[0], atol=1e-12)
    ones = csr_matrix(crow, col, torch.ones(6, dtype=F64), (4, 5))
    assert torch.allclose(csr_mm(ones, dense, weighted=False), ones.to_dense() @ dense)


def test_point_voxel_maps_are_cached_per_stride():
    x = voxels([[0, 0, 0, 0], [0, 1, 0, 0]], [[1.0], [2.0]])
    pts = torch.tensor([[0.3, 0, 0], [1.2, 0, 0]], dtype=F64)
    z = PointTensor(torch.ones(2, 1, dtype=F64), pts)
    first = trilinear_index(x, z)
    z2 = voxel_to_point(x, z)
    assert z2.cache is z.cache
    again = trilinear_index(x, z2)
    assert again[0] is first[0] and again[1] is first[1]
    point_to_voxel(x, z)
    cached = z.cache.voxel_index[(1, 1, 1)]
    point_to_voxel(x, z2)
    assert z.cache.voxel_index[(1, 1, 1)] is cached


def test_devoxelize_gradient():
    x = voxels([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    z = PointTensor(torch.zeros(3, 1, dtype=F64),
                    torch.tensor([[0.3, 0.6, 0.1], [0.9, 0.2, 0.0], [1.0, 1.0, 0.0]], dtype=F64))
    index, weights = trilinear_index(x, z)
    feats = x.feats.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: devoxelize(f, index, weights), (feats,))


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="NaN/Inf"):
        PointTensor(torch.zeros(2, 1), torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"floating \[N, 3\]"):
        PointTensor(torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch must be"):
        PointTensor(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
    far = PointTensor(torch.zeros(1, 1), torch.tensor([[40000.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="COORD_MAX = 32767"):
        initial_voxelize(far)
    with pytest.raises(ValueError, match="feats must have shape"):
        voxelize(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 1))


def test_empty_cloud():
    z = PointTensor(torch.zeros(0, 2), torch.zeros(0, 3))
    x, z1 = initial_voxelize(z)
    assert len(x) == 0 and x.feats.shape == (0, 2)
    assert voxel_to_point(x, z1).feats.shape == (0, 2)
    assert point_to_voxel(x, z1).feats.shape == (0, 2)
