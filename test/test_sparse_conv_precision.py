"""Reduced precision in the sparse convolution: bf16 inference and training sum in float32 and
round once, float64 stays float64, and Conv3d follows torch.autocast."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_sparse_conv import F64, SIDE, random_tensor

from clip2scene_ros.sparse import Conv3d, get_kernel_map
from clip2scene_ros.sparse import conv as conv_module


@pytest.fixture
def csr_sums(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.dtype]]:
    """The dtype of every CSR sum the convolutions run (``conv.csr_mm``), in call order."""
    summed: list[torch.dtype] = []
    csr_mm = conv_module.csr_mm

    def spy(matrix: torch.Tensor, dense: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        summed.append(dense.dtype)
        return csr_mm(matrix, dense, weighted)

    monkeypatch.setattr(conv_module, "csr_mm", spy)
    yield summed


@pytest.mark.parametrize("scatter", ["csr", "index_add"])
@pytest.mark.parametrize("kind", ["submanifold", "strided"])
def test_bf16_inference_sums_in_float32_and_rounds_once(kind: str, scatter: str,
                                                        csr_sums: list[torch.dtype]) -> None:
    """bf16 features and weights: bf16 gathers and GEMMs, the scatter's sum over the offsets
    in float32, one rounding to bf16 at the end; close to the fp32 convolution."""
    x = random_tensor(3, SIDE, 0.5, 16)
    kmap = get_kernel_map(x, 3 if kind == "submanifold" else 2, 1 if kind == "submanifold"
                          else 2)
    gen = torch.Generator().manual_seed(4)
    feats = x.feats.float().to(torch.bfloat16)
    weight = (torch.randn(kmap.kernel_volume, 16, 8, generator=gen) / 8).to(torch.bfloat16)
    bias = torch.randn(8, generator=gen).to(torch.bfloat16)
    got = conv_module.csr_conv(feats, weight, kmap.compact(), kmap.identity_offset, kmap.n_out,
                               bias=bias, scatter=scatter)
    assert got.dtype == torch.bfloat16
    assert csr_sums == ([torch.float32] if scatter == "csr" else [])
    # the reference: the same bf16 inputs, every product and sum in float64
    ref = conv_module.gather_scatter_conv(feats.double(), weight.double(), kmap.in_index,
                                          kmap.out_index, kmap.counts, kmap.n_out,
                                          kmap.identity_offset) + bias.double()
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert 0 < float(err) <= 1e-2
    # float32 sums of bf16 products: within a few bf16 roundings of the exact sum per row
    assert torch.allclose(got.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_float64_inference_stays_float64() -> None:
    """Only bf16/fp16 take the float32 scatter: fp64 sums stay fp64 (exact to 1e-12)."""
    x = random_tensor(5, SIDE, 0.4, 4)
    kmap = get_kernel_map(x, 3, 1)
    weight = torch.randn(kmap.kernel_volume, 4, 2, dtype=F64)
    got = conv_module.csr_conv(x.feats, weight, kmap.compact(), kmap.identity_offset,
                               kmap.n_out)
    assert got.dtype == F64
    ref = conv_module.gather_scatter_conv(x.feats, weight, kmap.in_index, kmap.out_index,
                                          kmap.counts, kmap.n_out, kmap.identity_offset)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["submanifold", "strided"])
def test_bf16_training_conv_sums_in_float32_forward_and_backward(
        kind: str, csr_sums: list[torch.dtype]) -> None:
    """pair_conv (training) with bf16 features and weights: both CSR sums (the forward's
    scatter, the backward's input-gradient gather) in float32, outputs and gradients in bf16
    and close to the same product in float64."""
    x = random_tensor(6, SIDE, 0.5, 16)
    kmap = get_kernel_map(x, 3 if kind == "submanifold" else 2, 1 if kind == "submanifold"
                          else 2)
    gen = torch.Generator().manual_seed(7)
    feats = x.feats.float().to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(kmap.kernel_volume, 16, 8, generator=gen) / 8).to(torch.bfloat16)
    weight.requires_grad_(True)
    bias = torch.randn(8, generator=gen).to(torch.bfloat16).requires_grad_(True)
    out = conv_module.pair_conv(feats, weight, kmap.compact(), kmap.identity_offset, bias)
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    (out * upstream).sum().backward()
    assert csr_sums == [torch.float32, torch.float32]
    assert out.dtype == feats.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.bfloat16

    leaves = [t.detach().double().requires_grad_(True) for t in (feats, weight, bias)]
    ref = conv_module.gather_scatter_conv(leaves[0], leaves[1], kmap.in_index, kmap.out_index,
                                          kmap.counts, kmap.n_out, kmap.identity_offset,
                                          bias=leaves[2])
    (ref * upstream.double()).sum().backward()
    for got, want in ((out, ref), (feats.grad, leaves[0].grad), (weight.grad, leaves[1].grad),
                      (bias.grad, leaves[2].grad)):
        assert want is not None and got is not None
        want = want.detach()
        scale = float(want.abs().max())
        assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2 * scale)


def test_conv3d_module_under_autocast_runs_bf16_with_float32_weight_gradients() -> None:
    """Conv3d under CPU bf16 autocast: the input and its float32 weights are cast to bf16 (as
    torch's own convolutions), the output is bf16, and the weights' gradients are float32."""
    x = random_tensor(8, SIDE, 0.5, 4)
    layer = Conv3d(4, 6, 3, bias=True)
    feats = x.feats.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.replace_feats(feats))
    assert out.feats.dtype == torch.bfloat16
    out.feats.float().square().sum().backward()
    assert layer.kernel.grad is not None and layer.kernel.grad.dtype == torch.float32
    assert layer.bias is not None and layer.bias.grad is not None
    assert layer.bias.grad.dtype == torch.float32
    assert feats.grad is not None and feats.grad.dtype == torch.float32
    ref = layer(x.replace_feats(x.feats.float())).feats.detach()
    assert torch.allclose(out.feats.float(), ref, rtol=3e-2,
                          atol=3e-2 * float(ref.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(x.replace_feats(x.feats.float())).feats.dtype == torch.float32
