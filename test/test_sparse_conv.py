"""Sparse convolution against dense torch convolutions, dataflow agreement, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_ros.sparse import (
    Conv3d,
    SparseTensor,
    apply_kernel_map,
    choose_dataflow,
    conv3d,
    downsample_coords,
    get_kernel_map,
    get_transposed_map,
    implicit_gemm_conv,
)
from clip2scene_ros.sparse import conv as conv_module

DATAFLOWS = ("gather_scatter", "implicit_gemm")
F64 = torch.float64


def random_tensor(seed: int, side: int, density: float, channels: int, batches: int = 2):
    """Random occupancy of ``batches`` cubes [0, side)^3 at stride 1, fp64 features."""
    gen = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batches, side, side, side, generator=gen) < density
    coords = occupied.nonzero()
    if len(coords) == 0:
        coords = torch.zeros(1, 4, dtype=torch.int64)
    perm = torch.randperm(len(coords), generator=gen)  # rows need not be sorted
    coords = coords[perm]
    feats = torch.randn(len(coords), channels, generator=gen, dtype=F64)
    return SparseTensor(feats, coords, 1)


def densify(x: SparseTensor, batches: int, side: int) -> torch.Tensor:
    """[B, C, S, S, S] grid of ``x`` in units of its stride (x -> D, y -> H, z -> W)."""
    dense = torch.zeros(batches, x.num_channels, side, side, side, dtype=x.feats.dtype)
    c = x.coords.long()
    s = x.stride[0]
    dense[c[:, 0], :, c[:, 1] // s, c[:, 2] // s, c[:, 3] // s] = x.feats
    return dense


def at_coords(dense: torch.Tensor, coords: torch.Tensor, stride: int) -> torch.Tensor:
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1] // stride, c[:, 2] // stride, c[:, 3] // stride]


# torchsparse [K, Cin, Cout] -> dense, from the documented offset order (not from the engine):
# k3: k = 9 dz + 3 dy + dx (x fastest); k2: k = 4 bx + 2 by + bz (x slowest).
def dense_weight_k3(w: torch.Tensor) -> torch.Tensor:  # [Cout, Cin, dx, dy, dz]
    return w.reshape(3, 3, 3, w.shape[1], w.shape[2]).permute(4, 3, 2, 1, 0)


def dense_weight_k2(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(2, 2, 2, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2)


def transposed_weight_k3(w: torch.Tensor) -> torch.Tensor:  # [Cin, Cout, dx, dy, dz]
    return w.reshape(3, 3, 3, w.shape[1], w.shape[2]).permute(3, 4, 2, 1, 0)


def transposed_weight_k2(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(2, 2, 2, w.shape[1], w.shape[2]).permute(3, 4, 0, 1, 2)


def weights(seed: int, k: int, cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return (
        torch.randn(k, cin, cout, generator=gen, dtype=F64),
        torch.randn(cout, generator=gen, dtype=F64),
    )


SIDE = 6
cases = settings(max_examples=6, deadline=None)
seeds = st.integers(0, 100_000)
densities = st.sampled_from([0.1, 0.3, 0.6])


@cases
@given(seeds, densities)
def test_submanifold_k3_equals_dense(seed, density):
    x = random_tensor(seed, SIDE, density, 3)
    w, b = weights(seed, 27, 3, 4)
    ref = F.conv3d(densify(x, 2, SIDE), dense_weight_k3(w), b, padding=1)
    for flow in DATAFLOWS:
        y = conv3d(x, w, b, kernel_size=3, dataflow=flow)
        assert y.coords is x.coords and y.stride == (1, 1, 1)
        assert torch.allclose(y.feats, at_coords(ref, x.coords, 1), atol=1e-10, rtol=0)


@cases
@given(seeds, densities)
def test_k2s2_downsample_equals_dense_at_two_levels(seed, density):
    x = random_tensor(seed, 2 * SIDE, density / 2, 2)
    w1, b1 = weights(seed, 8, 2, 3)
    w2, _ = weights(seed + 7, 8, 3, 2)
    ref1 = F.conv3d(densify(x, 2, 2 * SIDE), dense_weight_k2(w1), b1, stride=2)
    for flow in DATAFLOWS:
        y1 = conv3d(x, w1, b1, kernel_size=2, stride=2, dataflow=flow)
        assert y1.stride == (2, 2, 2)
        assert torch.equal(y1.coords, downsample_coords(x.coords, 1, 2, 2))
        assert torch.allclose(y1.feats, at_coords(ref1, y1.coords, 2), atol=1e-10, rtol=0)
        # second level: the dense reference sees only the active stride-2 voxels (no bias rows)
        ref2 = F.conv3d(densify(y1, 2, SIDE), dense_weight_k2(w2), stride=2)
        y2 = conv3d(y1, w2, kernel_size=2, stride=2, dataflow=flow)  # offsets scaled by stride 2
        assert y2.stride == (4, 4, 4)
        assert torch.allclose(y2.feats, at_coords(ref2, y2.coords, 4), atol=1e-10, rtol=0)


@cases
@given(seeds, densities)
def test_transposed_k2s2_upsample_equals_dense(seed, density):
    x = random_tensor(seed, SIDE, density, 2)
    w_down, _ = weights(seed, 8, 2, 3)
    w_up, b_up = weights(seed + 3, 8, 3, 2)
    coarse = conv3d(x, w_down, kernel_size=2, stride=2)
    dense_coarse = densify(coarse, 2, SIDE // 2)
    ref = F.conv_transpose3d(dense_coarse, transposed_weight_k2(w_up), b_up, stride=2)
    for flow in DATAFLOWS:
        y = conv3d(coarse, w_up, b_up, kernel_size=2, stride=2, transposed=True, dataflow=flow)
        assert y.coords is x.coords and y.stride == (1, 1, 1)
        assert torch.allclose(y.feats, at_coords(ref, x.coords, 1), atol=1e-10, rtol=0)


@cases
@given(seeds, densities)
def test_strided_k3s2_and_its_transpose_equal_dense(seed, density):
    x = random_tensor(seed, SIDE, density, 2)
    w, b = weights(seed, 27, 2, 3)
    w_t, _ = weights(seed + 5, 27, 3, 2)
    # A grid of SIDE + 2 holds every output q <= SIDE that k3 s2 can produce.
    ref = F.conv3d(densify(x, 2, SIDE + 2), dense_weight_k3(w), b, stride=2, padding=1)
    for flow in DATAFLOWS:
        y = conv3d(x, w, b, kernel_size=3, stride=2, dataflow=flow)
        assert torch.allclose(y.feats, at_coords(ref, y.coords, 2), atol=1e-10, rtol=0)
        up = conv3d(y, w_t, kernel_size=3, stride=2, transposed=True, dataflow=flow)
        ref_up = F.conv_transpose3d(
            densify(y, 2, ref.shape[2]), transposed_weight_k3(w_t), stride=2, padding=1
        )
        assert up.coords is x.coords
        assert torch.allclose(up.feats, at_coords(ref_up, x.coords, 1), atol=1e-10, rtol=0)


def test_kernel_size_1_is_a_matmul_and_k1_stride_2_subsamples():
    x = random_tensor(11, SIDE, 0.4, 3)
    w = torch.randn(3, 5, dtype=F64)  # torchsparse stores 1x1x1 kernels as [Cin, Cout]
    y = conv3d(x, w, kernel_size=1)
    assert torch.equal(y.feats, x.feats @ w) and y.coords is x.coords
    assert x.cache.kmaps == {}  # no map needed
    y2 = conv3d(x, w.unsqueeze(0), kernel_size=1, stride=2)
    ref = F.conv3d(densify(x, 2, SIDE), w.t().reshape(5, 3, 1, 1, 1), stride=2)
    assert torch.allclose(y2.feats, at_coords(ref, y2.coords, 2), atol=1e-10, rtol=0)
    assert bool((y2.coords[:, 1:] % 2 == 0).all())


def test_dilation_scales_the_offsets():
    x = random_tensor(12, SIDE, 0.4, 2)
    w, _ = weights(12, 27, 2, 2)
    ref = F.conv3d(densify(x, 2, SIDE), dense_weight_k3(w), padding=2, dilation=2)
    y = conv3d(x, w, kernel_size=3, dilation=2)
    assert torch.allclose(y.feats, at_coords(ref, x.coords, 1), atol=1e-10, rtol=0)


def test_batches_never_mix():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [1, 1, 1, 1], [1, 2, 1, 1], [1, 1, 2, 1]])
    feats = torch.randn(5, 2, dtype=F64)
    w = torch.randn(27, 2, 3, dtype=F64)
    for flow in DATAFLOWS:
        base = conv3d(SparseTensor(feats, coords), w, dataflow=flow).feats
        changed = feats.clone()
        changed[2:] += 100.0  # batch 1 only
        again = conv3d(SparseTensor(changed, coords), w, dataflow=flow).feats
        assert torch.equal(base[:2], again[:2])
        assert not torch.allclose(base[2:], again[2:])
    kmap = get_kernel_map(SparseTensor(feats, coords), 3)
    batch = coords[:, 0]
    hit = kmap.out_in_map >= 0
    rows = torch.arange(len(coords))[:, None].expand_as(hit)
    assert torch.equal(batch[kmap.out_in_map[hit]], batch[rows[hit]])


@pytest.mark.parametrize("kind", ["submanifold", "down", "up"])
def test_dataflows_agree_including_gradients(kind):
    x = random_tensor(21, 4, 0.35, 2, batches=1)
    if kind == "down":
        kwargs = {"kernel_size": 2, "stride": 2}
        k = 8
    elif kind == "up":
        x = conv3d(x, torch.randn(8, 2, 2, dtype=F64), kernel_size=2, stride=2)
        kwargs = {"kernel_size": 2, "stride": 2, "transposed": True}
        k = 8
    else:
        kwargs = {"kernel_size": 3}
        k = 27
    w, b = weights(21, k, 2, 3)
    feats = x.feats.detach().clone().requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    outs = {}
    for flow in DATAFLOWS:

        def f(feats_, w_, b_, flow=flow):
            return conv3d(x.replace_feats(feats_), w_, b_, dataflow=flow, **kwargs).feats

        assert torch.autograd.gradcheck(f, (feats, w, b), eps=1e-6, atol=1e-8)
        outs[flow] = f(feats, w, b)
    assert torch.allclose(outs["gather_scatter"], outs["implicit_gemm"], atol=1e-12, rtol=0)
    grads = [torch.autograd.grad(outs[flow].square().sum(), (feats, w, b)) for flow in DATAFLOWS]
    for ga, gb in zip(*grads, strict=True):
        assert torch.allclose(ga, gb, atol=1e-10, rtol=0)


def test_implicit_gemm_blocks_give_the_same_result():
    x = random_tensor(31, SIDE, 0.5, 3)
    w, _ = weights(31, 27, 3, 4)
    kmap = get_kernel_map(x, 3)
    whole = implicit_gemm_conv(x.feats, w, kmap.padded_out_in_map(), block_elements=None)
    blocked = implicit_gemm_conv(x.feats, w, kmap.padded_out_in_map(), block_elements=27 * 3 * 7)
    assert torch.allclose(whole, blocked, atol=1e-12, rtol=0)
    assert torch.allclose(whole, apply_kernel_map(x.feats, w, kmap, "gather_scatter"), atol=1e-12)


def test_auto_follows_the_measured_fill_rule():
    sparse = random_tensor(41, 8, 0.05, 1, batches=1)
    dense = random_tensor(41, 6, 1.01, 1, batches=1)  # every cell occupied: fill (16/18)^3
    threshold = conv_module.IMPLICIT_GEMM_MIN_FILL
    for x in (sparse, dense):
        kmap = get_kernel_map(x, 3)
        expected = "implicit_gemm" if kmap.fill >= threshold else "gather_scatter"
        assert choose_dataflow(kmap) == expected
    assert choose_dataflow(get_kernel_map(sparse, 3)) == "gather_scatter"
    w = torch.randn(27, 1, 2, dtype=F64)
    assert torch.allclose(
        conv3d(dense, w, dataflow="auto").feats,
        conv3d(dense, w, dataflow="gather_scatter").feats,
        atol=1e-12,
    )


def test_module_loads_torchsparse_state_dicts_and_matches_functional():
    conv = Conv3d(4, 8, kernel_size=3)
    assert list(conv.state_dict()) == ["kernel"] and conv.kernel.shape == (27, 4, 8)
    kernel = torch.randn(27, 4, 8)
    conv.load_state_dict({"kernel": kernel})
    one = Conv3d(32, 64, kernel_size=1)
    assert one.kernel.shape == (32, 64)
    one.load_state_dict({"kernel": torch.randn(32, 64)})
    down = Conv3d(32, 32, kernel_size=2, stride=2)
    assert down.kernel.shape == (8, 32, 32)
    up = Conv3d(32, 16, kernel_size=2, stride=2, transposed=True, bias=True)
    assert set(up.state_dict()) == {"kernel", "bias"}
    bound = 1 / (16 * 8) ** 0.5  # torchsparse init: fan = Cout * K for transposed
    assert float(up.kernel.detach().abs().max()) <= bound
    x = random_tensor(51, SIDE, 0.3, 4)
    x = x.replace_feats(x.feats.float())
    # the module's kernel requires grad (index_add path), the plain tensor does not (CSR path)
    assert torch.allclose(conv(x).feats, conv3d(x, kernel, kernel_size=3).feats, rtol=1e-5,
                          atol=1e-5)


def test_bad_input_is_refused_with_the_reason():
    x = random_tensor(61, 4, 0.5, 3)
    with pytest.raises(ValueError, match="kernel volume K=27"):
        conv3d(x, torch.randn(8, 3, 4, dtype=F64), kernel_size=3)
    with pytest.raises(ValueError, match="kernel volume K=8"):
        conv3d(x, torch.randn(3, 4, dtype=F64), kernel_size=2, stride=2)
    with pytest.raises(ValueError, match="Cin=5 input channels but the input has 3"):
        conv3d(x, torch.randn(27, 5, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"dtype mismatch: feats are torch\.float64 but weight"):
        conv3d(x, torch.randn(27, 3, 4))
    with pytest.raises(ValueError, match="bias shape"):
        conv3d(x, torch.randn(27, 3, 4, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"dtype mismatch: feats are torch\.float64 but bias"):
        conv3d(x, torch.randn(27, 3, 4, dtype=F64), torch.zeros(4))
    with pytest.raises(ValueError, match="dataflow must be one of"):
        conv3d(x, torch.randn(27, 3, 4, dtype=F64), dataflow="winograd")
    with pytest.raises(ValueError, match="dataflow must be one of"):
        Conv3d(3, 4, dataflow="fast")
    with pytest.raises(ValueError, match="stride must be"):
        conv3d(x, torch.randn(27, 3, 4, dtype=F64), stride=0)
    with pytest.raises(ValueError, match="COORD_MIN = -32768"):
        SparseTensor(torch.zeros(1, 1), torch.tensor([[0, -40000, 0, 0]]))
    with pytest.raises(ValueError, match="int32 or int64"):
        SparseTensor(torch.zeros(1, 1), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="coords has 2 rows but feats has 1"):
        SparseTensor(torch.zeros(1, 1), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating point"):
        SparseTensor(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="same coordinates"):
        _ = x + random_tensor(62, 4, 0.5, 3)


def test_empty_input_gives_empty_output():
    x = SparseTensor(torch.zeros(0, 3, dtype=F64), torch.zeros(0, 4, dtype=torch.int64))
    for flow in DATAFLOWS:
        assert conv3d(x, torch.randn(27, 3, 4, dtype=F64), dataflow=flow).feats.shape == (0, 4)
        y = conv3d(x, torch.randn(8, 3, 4, dtype=F64), kernel_size=2, stride=2, dataflow=flow)
        assert y.feats.shape == (0, 4)


def test_int32_coordinates_work_like_int64():
    x = random_tensor(71, SIDE, 0.3, 2)
    x32 = SparseTensor(x.feats, x.coords.int())
    w, _ = weights(71, 8, 2, 2)
    a = conv3d(x, w, kernel_size=2, stride=2)
    b = conv3d(x32, w, kernel_size=2, stride=2)
    assert b.coords.dtype == torch.int32
    assert torch.equal(a.coords, b.coords.long()) and torch.allclose(a.feats, b.feats)


def test_dataflow_bench_smoke():
    from clip2scene_ros.bench.sparse_dataflow import run

    report = run(scan=None, channels=(4,), synthetic_side=6, occupancies=(0.2, 0.9), repeat=1)
    assert report["benchmark"] == "sparse_dataflow" and len(report["cases"]) == 2
    case = report["cases"][0]
    assert case["gather_scatter_ms"] > 0 and case["implicit_gemm_ms"] > 0
    assert 0 < case["fill"] <= 1
    assert 0 < report["rule"]["implicit_gemm_min_fill"] <= 1.01


@pytest.mark.usefixtures("one_torch_thread")  # spconv 2.3's CPU kernels race on 2 threads
def test_layout_matches_spconv_where_installed():
    """Independent engine: spconv (test-only) with weights converted from [K, Cin, Cout]."""
    spconv = pytest.importorskip("spconv.pytorch")
    gen = torch.Generator().manual_seed(81)
    occupied = torch.rand(2, 8, 8, 8, generator=gen) < 0.3
    # spconv reads raw index memory: it needs contiguous int32 (nonzero() is column-major)
    coords = occupied.nonzero().int().contiguous()
    feats = torch.randn(len(coords), 3, generator=gen)
    ours_in = SparseTensor(feats, coords)
    theirs_in = spconv.SparseConvTensor(feats, coords, [8, 8, 8], 2)
    w3 = torch.randn(27, 3, 4, generator=gen)
    w_down = torch.randn(8, 3, 4, generator=gen)
    w_up = torch.randn(8, 4, 3, generator=gen)
    sub = spconv.SubMConv3d(3, 4, 3, bias=False)
    down = spconv.SparseConv3d(3, 4, 2, 2, bias=False, indice_key="d")
    up = spconv.SparseInverseConv3d(4, 3, 2, indice_key="d", bias=False)
    with torch.no_grad():  # spconv: [Cout, kx, ky, kz, Cin]
        sub.weight.copy_(w3.reshape(3, 3, 3, 3, 4).permute(4, 2, 1, 0, 3))
        down.weight.copy_(w_down.reshape(2, 2, 2, 3, 4).permute(4, 0, 1, 2, 3))
        up.weight.copy_(w_up.reshape(2, 2, 2, 4, 3).permute(4, 0, 1, 2, 3))
        t_sub, t_down = sub(theirs_in), down(theirs_in)
        t_up = up(t_down)
    o_sub = conv3d(ours_in, w3)
    o_down = conv3d(ours_in, w_down, kernel_size=2, stride=2)
    o_up = conv3d(o_down, w_up, kernel_size=2, stride=2, transposed=True)

    def matched(theirs, ours, scale):
        rows = {tuple(r): i for i, r in enumerate(theirs.indices.tolist())}
        coarse = ours.coords.clone()
        coarse[:, 1:] //= scale  # spconv indices are in units of the output stride
        assert len(rows) == len(ours)
        return theirs.features[[rows[tuple(r)] for r in coarse.tolist()]]

    assert torch.allclose(matched(t_sub, o_sub, 1), o_sub.feats, atol=1e-4, rtol=1e-5)
    assert torch.allclose(matched(t_down, o_down, 2), o_down.feats, atol=1e-4, rtol=1e-5)
    assert torch.allclose(matched(t_up, o_up, 1), o_up.feats, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("scatter", ["csr", "index_add"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_inference_csr_dataflow_equals_gather_scatter(kind: str, seed: int, bias: bool,
                                                      scatter: str) -> None:
    x = random_tensor(seed, SIDE, 0.4, 5)
    if kind == "transposed":
        get_kernel_map(x, 2, 2)  # the strided map the transposed conv reverses
        coords = x.cache.coords[(2, 2, 2)]
        coarse = SparseTensor(x.feats.new_zeros(len(coords), 1), coords, 2, x.cache)
        kmap = get_transposed_map(coarse, 2, 2)
        feats = torch.randn(kmap.n_in, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    else:
        kmap = get_kernel_map(x, 3 if kind == "submanifold" else 2, 1 if kind == "submanifold"
                              else 2)
        feats = x.feats
    weight = torch.randn(kmap.kernel_volume, 5, 3, dtype=F64)
    b = torch.randn(3, dtype=F64) if bias else None
    expected = conv_module.gather_scatter_conv(feats, weight, kmap.in_index, kmap.out_index,
                                               kmap.counts, kmap.n_out, kmap.identity_offset)
    if b is not None:
        expected = expected + b
    got = conv_module.csr_conv(feats, weight, kmap.compact(), kmap.identity_offset, kmap.n_out,
                               bias=b, scatter=scatter)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    # and against the definition, pair by pair
    ref = (b if b is not None else torch.zeros(3, dtype=F64)).repeat(kmap.n_out, 1)
    for k in range(kmap.kernel_volume):
        for q, p in enumerate(kmap.out_in_map[:, k].tolist()):
            if p >= 0:
                ref[q] += feats[p] @ weight[k]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_scatter_matrix_sums_each_pair_into_its_output_row() -> None:
    """The CSR scatter of the inference dataflow (built from unsorted rows, transposed maps
    whose pairs are not in output order included) is exactly the pair -> output incidence."""
    x = random_tensor(3, SIDE, 0.4, 2)
    get_kernel_map(x, 2, 2)
    coarse = SparseTensor(x.feats.new_zeros(len(x.cache.coords[(2, 2, 2)]), 1),
                          x.cache.coords[(2, 2, 2)], 2, x.cache)
    for kmap in (get_kernel_map(x, 3), get_kernel_map(x, 2, 2), get_transposed_map(coarse, 2, 2)):
        pairs = kmap.compact()
        dense = pairs.scatter.to_dense()
        expected = torch.zeros(kmap.n_out, pairs.in_index.numel())
        expected[pairs.out_index, torch.arange(pairs.out_index.numel())] = 1
        assert torch.equal(dense, expected)
        identity = kmap.identity_offset
        assert all(k != identity for k, _, _ in pairs.segments)
        assert sum(e - s for _, s, e in pairs.segments) == pairs.in_index.numel()


def test_conv_bias_is_folded_the_same_in_every_path() -> None:
    """k1, submanifold, strided and transposed convs with a bias: inference (folded into the
    GEMM / scatter) equals the autograd path (bias added after)."""
    x = random_tensor(5, SIDE, 0.5, 4)
    layers = [Conv3d(4, 6, 1, bias=True), Conv3d(4, 40, 3, bias=True),
              Conv3d(4, 6, 2, 2, bias=True)]
    for layer in layers:
        layer.double()
        with torch.no_grad():
            fast = layer(x).feats
        slow = layer(x).feats  # parameters require grad: the autograd dataflow
        assert slow.requires_grad
        assert torch.allclose(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    down = layers[2](x)
    up = Conv3d(6, 3, 2, 2, bias=True, transposed=True).double()
    with torch.no_grad():
        fast = up(down.replace_feats(down.feats.detach())).feats
    slow = up(down.replace_feats(down.feats.detach())).feats
    assert torch.allclose(fast, slow.detach(), rtol=1e-12, atol=1e-12)


def test_inference_scratch_is_kept_per_thread_from_pass_to_pass():
    """The gather-GEMM-scatter scratch outlives a pass (no fresh buffer, no page faults, per
    frame) and is never shared between threads, which may run passes at the same time."""
    import threading

    w, _ = weights(51, 27, 3, 4)

    def one_pass(seed: int = 51, density: float = 0.3) -> tuple[object, int, torch.Tensor]:
        x = random_tensor(seed, SIDE, density, 3)  # a new input: a new cache
        with torch.no_grad():
            out = conv3d(x, w, dataflow="gather_scatter")
        workspace = x.cache.workspace
        assert workspace.buffer is not None  # the inference path used it
        return workspace, workspace.buffer.data_ptr(), out.feats

    first, first_ptr, first_out = one_pass()
    kept = first_out.clone()
    second, second_ptr, _ = one_pass(52, 0.2)  # smaller: fits the first pass's buffer
    assert second is first and second_ptr == first_ptr  # the same buffer, not reallocated
    assert torch.equal(first_out, kept)  # the second pass did not write into the first's output

    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(one_pass()[0]))
    thread.start()
    thread.join()
    assert other and other[0] is not first


def test_released_inference_scratch_is_dropped_and_made_anew_by_the_next_pass():
    """``Workspace.release`` (the trainer's, after validation) frees the thread's buffer; the
    next no-grad pass allocates one again and gives what a fresh scratch gives."""
    from clip2scene_ros.sparse.tensor import Workspace, thread_workspace

    w, _ = weights(54, 27, 3, 4)
    with torch.no_grad():
        conv3d(random_tensor(54, SIDE, 0.3, 3), w, dataflow="gather_scatter")
    workspace = thread_workspace()
    assert workspace.buffer is not None
    workspace.release()
    assert workspace.buffer is None

    x = random_tensor(55, SIDE, 0.3, 3)
    assert x.cache.workspace is workspace
    with torch.no_grad():
        after = conv3d(x, w, dataflow="gather_scatter").feats
    assert workspace.buffer is not None  # allocated again
    fresh = random_tensor(55, SIDE, 0.3, 3)
    fresh.cache.workspace = Workspace()
    with torch.no_grad():
        expected = conv3d(fresh, w, dataflow="gather_scatter").feats
    assert torch.equal(after, expected)


def test_inference_scratch_serves_inference_mode_and_no_grad_passes_alike():
    """A thread's scratch first made under torch.inference_mode (as the Predictor runs) must
    still be writable by a later pass under no_grad only, and the other way round."""
    w, _ = weights(53, 27, 3, 4)
    x = random_tensor(53, SIDE, 0.3, 3)
    x.cache.workspace = type(x.cache.workspace)()  # a fresh scratch for this test
    with torch.no_grad():
        expected = conv3d(x, w, dataflow="gather_scatter").feats
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        x.cache.workspace.buffer = None  # made anew under this mode
        with mode():
            first = conv3d(x, w, dataflow="gather_scatter").feats
        with torch.no_grad():
            second = conv3d(x, w, dataflow="gather_scatter").feats
        with torch.inference_mode():
            third = conv3d(x, w, dataflow="gather_scatter").feats
        assert torch.equal(first, expected) and torch.equal(second, expected)
        assert torch.equal(third, expected)
