"""Sparse 3D convolution with torchsparse's weight layout, in two dataflows.

Weight layout: ``[K, Cin, Cout]`` (``[Cin, Cout]`` when ``K == 1``) with the kernel-offset order
documented in :mod:`.kmap`; ``out[q] = sum_k in[q + o_k] @ kernel[k] (+ bias)``.

Dataflows (identical results up to rounding order, both differentiable):

* ``"gather_scatter"``: per offset, gather the real input rows, one GEMM with ``kernel[k]``, and
  add the results into their output rows. Work is proportional to the real pairs. The identity
  offset of a submanifold map (the centre) is a single matmul over all rows. Inference runs
  :func:`csr_conv`; training runs :func:`pair_conv`, the same forward with a backward written
  for the map; :func:`gather_scatter_conv` is the plain autograd form (reference and bench).
* ``"implicit_gemm"``: gather ``[N_out, K, Cin]`` through ``out_in_map`` (missing neighbours read
  an appended zero row) and do one ``[N_out, K*Cin] @ [K*Cin, Cout]`` matmul. It wastes the empty
  slots but uses only Gather + MatMul, which is what the ONNX/TensorRT export needs.
* ``"auto"``: :func:`choose_dataflow`, a rule measured with ``clip2scene_ros/bench/
  sparse_dataflow.py`` (see ``IMPLICIT_GEMM_MIN_FILL``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .kmap import (
    CompactPairs,
    KernelMap,
    as_triple,
    csr_mm,
    get_kernel_map,
    get_transposed_map,
)
from .tensor import SparseTensor, Workspace

DATAFLOWS = ("auto", "gather_scatter", "implicit_gemm")

#: ``auto`` uses implicit GEMM when at least this fraction of the ``N_out x K`` neighbour slots
#: are real pairs (``KernelMap.fill``), else gather-scatter; above 1: never. Measured with
#: ``python -m clip2scene_ros.bench.sparse_dataflow --threads 1`` on the path it decides
#: (inference's :func:`csr_conv` against :func:`implicit_gemm_conv`; 2-core AMD EPYC, one
#: thread pinned to one core, torch 2.14 MKL, fp32, 2026-12-06): on the SemanticKITTI scan at
#: 0.05 m (fill 0.125-0.34, strides 1-16, C = 32..128) csr_conv was 1.9-28x faster; on uniform
#: cubes it was faster at every width up to fill 0.77, at fill 0.86 at five of six (two runs),
#: and implicit GEMM was faster at all three at 0.91 but at two of three at 0.95 (13 % slower
#: at C = 128). No fill from which implicit GEMM wins every width: never on CPU (the former
#: 0.85 came from the training path's gather-scatter). Not measured on a GPU.
IMPLICIT_GEMM_MIN_FILL = 1.01

#: Inference (:func:`csr_conv`) scatters the per-pair GEMM results with one ``embedding_bag``
#: sum over the map's CSR scatter up to this many output channels (None: every width), and
#: with one ``index_add_`` above. Measured on the nuScenes keyframe at 0.1 m (SPVCNN cr 0.5, one
#: thread, forward CPU time, interleaved): the embedding_bag sum everywhere 728 ms, up to 32
#: channels 753 ms, index_add_ everywhere 781 ms. (torch's own CSR product, used before,
#: lost to a per-offset ``index_add_`` from 64 channels on, hence the former limit of 32.)
CSR_MAX_COUT: int | None = None

#: Row blocks of the implicit-GEMM gather are sized to hold at most this many elements, so that
#: ``[N_out, K * Cin]`` never materialises at once for big layers (None: one block).
IMPLICIT_GEMM_BLOCK_ELEMENTS: int | None = 1 << 23


#: Feature dtypes whose convolution sums are accumulated in float32 (:func:`csr_conv`,
#: :func:`pair_conv`).
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The reduced dtype ``torch.autocast`` runs matrix products in on ``device_type`` (None
    when autocast is off there)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def choose_dataflow(kmap: KernelMap) -> str:
    """The dataflow ``auto`` uses for ``kmap``: the measured fill rule."""
    return "implicit_gemm" if kmap.fill >= IMPLICIT_GEMM_MIN_FILL else "gather_scatter"


def gather_scatter_conv(
    feats: torch.Tensor,
    weight: torch.Tensor,
    in_index: torch.Tensor,
    out_index: torch.Tensor,
    counts: Sequence[int],
    n_out: int,
    identity_offset: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compacted gather-GEMM-scatter over real pairs; ``weight`` is ``[K, Cin, Cout]``.

    ``in_index`` / ``out_index`` hold the pairs grouped by offset, ``counts[k]`` per offset.
    ``identity_offset`` (optional) names an offset whose pairs are ``i -> i`` for all rows.
    ``bias`` (optional) is added to every output row.
    """
    out = _base(feats, weight, identity_offset, n_out, bias)
    start = 0
    for k, n in enumerate(counts):
        end = start + n
        if n and k != identity_offset:
            rows = feats.index_select(0, in_index[start:end]) @ weight[k]
            out.index_add_(0, out_index[start:end], rows)
        start = end
    return out


def _base(feats: torch.Tensor, weight: torch.Tensor, identity_offset: int | None, n_out: int,
          bias: torch.Tensor | None) -> torch.Tensor:
    """The output before the scatter: identity offset's matmul (one GEMM over all rows, the
    bias folded into it) or zeros / the bias."""
    if identity_offset is not None:
        w = weight[identity_offset]
        return feats @ w if bias is None else torch.addmm(bias, feats, w)
    if bias is None:
        return feats.new_zeros(n_out, weight.shape[2])
    return bias.expand(n_out, weight.shape[2]).clone()


def csr_conv(
    feats: torch.Tensor,
    weight: torch.Tensor,
    pairs: CompactPairs,
    identity_offset: int | None,
    n_out: int,
    workspace: Workspace | None = None,
    bias: torch.Tensor | None = None,
    scatter: str = "csr",
) -> torch.Tensor:
    """Inference form of gather-GEMM-scatter: one gather of every pair's input row, a GEMM per
    offset into one result buffer, and one scatter that adds the results into the outputs:
    the CSR matrix ``pairs.scatter`` applied as an ``embedding_bag`` sum (``scatter="csr"``,
    see :func:`.kmap.csr_mm`) or one ``index_add_`` over all pairs (``"index_add"``; see
    :data:`CSR_MAX_COUT`). ``bias`` (optional) is added to every output row.

    Without autograd only (``out=`` writes into the reused ``workspace``); it gives the same
    sums as :func:`gather_scatter_conv` up to float rounding order.

    Reduced precision (bf16 ``feats`` and ``weight``): the gather and the GEMMs run in bf16
    (the GEMMs accumulate in fp32 inside), the scatter's sum over up to K offsets in fp32, and
    the output is rounded to bf16 once.
    """
    p, cin, cout = pairs.in_index.numel(), weight.shape[1], weight.shape[2]
    scratch = (workspace or Workspace()).get(p * (cin + cout), feats)
    gathered = torch.index_select(feats, 0, pairs.in_index, out=scratch[: p * cin].view(p, cin))
    results = scratch[p * cin :].view(p, cout)
    for k, start, end in pairs.segments:
        torch.mm(gathered[start:end], weight[k], out=results[start:end])
    if scatter == "index_add":
        if feats.dtype not in REDUCED_DTYPES:
            return _base(feats, weight, identity_offset, n_out, bias).index_add_(
                0, pairs.out_index, results)
        # float32 sums, as in _sum_pairs
        out = _base(feats, weight, identity_offset, n_out, None).float()
        out.index_add_(0, pairs.out_index, results.float())
    else:
        out = _sum_pairs(pairs.scatter, results, feats, weight, identity_offset, transpose=False)
    if bias is not None:
        out.add_(bias)
    return out.to(feats.dtype)


def _sum_pairs(matrix: torch.Tensor, per_pair: torch.Tensor, rows: torch.Tensor,
               weight: torch.Tensor, identity: int | None, *, transpose: bool) -> torch.Tensor:
    """``matrix @ per_pair`` (a CSR sum over the pairs) plus the identity offset's product
    ``rows @ weight[identity]`` (its transpose with ``transpose``); float32 for reduced-precision
    inputs (a bf16 running sum of up to 27 terms loses the low bits of every row)."""
    reduced = per_pair.dtype in REDUCED_DTYPES
    out = csr_mm(matrix, per_pair.float() if reduced else per_pair, weighted=False)
    if identity is not None:
        w = weight[identity].t() if transpose else weight[identity]
        if reduced:
            out.add_(rows @ w)
        else:
            out.addmm_(rows, w)
    return out


class _PairConv(torch.autograd.Function):
    """Training's gather-GEMM-scatter with a backward written for the kernel map.

    Autograd through ``index_select``/``index_add_`` (:func:`gather_scatter_conv`) zero-fills
    an ``[N_in, Cin]`` gradient per offset, sums the 27 of them, and scatters with torch's CPU
    ``index_add_``, which expands the index to every element: on the sample drive that was
    about 60 % of a training step. Here the forward is :func:`csr_conv`'s dataflow, and the
    backward is its transpose: gather the output gradient per pair, one GEMM per offset for the
    weight and the input gradients, and one CSR sum (:attr:`CompactPairs.gather_t`) into the
    input rows.

    Reduced precision (mixed-precision training): gathers and GEMMs in ``feats``' dtype, both
    CSR sums (up to K terms per row, forward and backward) in float32, each result rounded once.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, feats: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None, pairs: CompactPairs,
                identity_offset: int | None) -> torch.Tensor:
        p, cout = pairs.in_index.numel(), weight.shape[2]
        gathered = feats.index_select(0, pairs.in_index)
        results = feats.new_empty(p, cout)
        for k, start, end in pairs.segments:
            torch.mm(gathered[start:end], weight[k], out=results[start:end])
        out = _sum_pairs(pairs.scatter, results, feats, weight, identity_offset, transpose=False)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(feats, weight, gathered)
        ctx.pairs, ctx.identity_offset = pairs, identity_offset  # type: ignore[attr-defined]
        return out.to(feats.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        feats, weight, gathered = ctx.saved_tensors  # type: ignore[attr-defined]
        pairs: CompactPairs = ctx.pairs  # type: ignore[attr-defined]
        identity: int | None = ctx.identity_offset  # type: ignore[attr-defined]
        need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()
        per_pair = grad_out.index_select(0, pairs.out_index)  # [P, Cout]
        grad_feats = grad_weight = grad_bias = None
        if need_weight:
            grad_weight = torch.zeros_like(weight)
            for k, start, end in pairs.segments:
                torch.mm(gathered[start:end].t(), per_pair[start:end], out=grad_weight[k])
            if identity is not None:
                torch.mm(feats.t(), grad_out, out=grad_weight[identity])
        if need_feats:
            grad_gathered = per_pair.new_empty(per_pair.shape[0], weight.shape[1])
            for k, start, end in pairs.segments:
                torch.mm(per_pair[start:end], weight[k].t(), out=grad_gathered[start:end])
            grad_feats = _sum_pairs(pairs.gather_t, grad_gathered, grad_out, weight, identity,
                                    transpose=True).to(feats.dtype)
        if need_bias:
            wide = torch.float32 if grad_out.dtype in REDUCED_DTYPES else grad_out.dtype
            grad_bias = grad_out.sum(0, dtype=wide).to(grad_out.dtype)
        return grad_feats, grad_weight, grad_bias, None, None


def pair_conv(feats: torch.Tensor, weight: torch.Tensor, pairs: CompactPairs,
              identity_offset: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable gather-GEMM-scatter over a map's compact pairs (training's dataflow);
    the same sums as :func:`gather_scatter_conv` up to float rounding order."""
    out: torch.Tensor = _PairConv.apply(feats, weight, bias, pairs, identity_offset)
    return out


def implicit_gemm_conv(
    feats: torch.Tensor,
    weight: torch.Tensor,
    padded_out_in_map: torch.Tensor,
    block_elements: int | None = IMPLICIT_GEMM_BLOCK_ELEMENTS,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather through ``padded_out_in_map [N_out, K]`` (``N_in`` = missing) + one matmul."""
    n_out, k = padded_out_in_map.shape
    cin = feats.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, cin)], dim=0)
    flat_weight = weight.reshape(k * cin, weight.shape[2])

    def matmul(gathered: torch.Tensor) -> torch.Tensor:
        return gathered @ flat_weight if bias is None else torch.addmm(bias, gathered, flat_weight)

    rows = n_out if block_elements is None else max(1, block_elements // max(1, k * cin))
    if rows >= n_out:
        gathered = padded.index_select(0, padded_out_in_map.reshape(-1))
        # reshape(-1, ...) rather than n_out keeps the row count symbolic in an ONNX trace.
        return matmul(gathered.reshape(-1, k * cin))
    blocks = []
    for start in range(0, n_out, rows):
        part = padded_out_in_map[start : start + rows]
        gathered = padded.index_select(0, part.reshape(-1))
        blocks.append(matmul(gathered.view(part.shape[0], k * cin)))
    return torch.cat(blocks, dim=0)


def apply_kernel_map(
    feats: torch.Tensor,
    weight: torch.Tensor,
    kmap: KernelMap,
    dataflow: str = "auto",
    workspace: Workspace | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output features ``[kmap.n_out, Cout]`` of ``feats [kmap.n_in, Cin]`` through ``kmap``
    (plus ``bias`` per output row, when given)."""
    if dataflow == "auto":
        dataflow = choose_dataflow(kmap)
    if dataflow == "gather_scatter":
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (feats, weight, bias))
        if not grad:
            wide = CSR_MAX_COUT is not None and weight.shape[2] > CSR_MAX_COUT
            scatter = "index_add" if wide else "csr"
            return csr_conv(feats, weight, kmap.compact(), kmap.identity_offset, kmap.n_out,
                            workspace, bias, scatter)
        return pair_conv(feats, weight, kmap.compact(), kmap.identity_offset, bias)
    if dataflow == "implicit_gemm":
        return implicit_gemm_conv(feats, weight, kmap.padded_out_in_map(), bias=bias)
    raise ValueError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")


def _check_weight(
    x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None, volume: int
) -> torch.Tensor:
    """``weight`` as ``[K, Cin, Cout]`` after checking it against the input; ValueError else."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 2 and volume == 1:
        weight = weight.unsqueeze(0)
    if weight.dim() != 3 or weight.shape[0] != volume:
        expected = "[Cin, Cout] or [1, Cin, Cout]" if volume == 1 else f"[{volume}, Cin, Cout]"
        raise ValueError(
            f"weight shape {list(weight.shape)} does not match kernel volume K={volume}: "
            f"expected {expected} (torchsparse layout)"
        )
    if weight.shape[1] != x.num_channels:
        raise ValueError(
            f"weight shape {list(weight.shape)} expects Cin={weight.shape[1]} input channels "
            f"but the input has {x.num_channels}"
        )
    if weight.dtype != x.feats.dtype:
        raise ValueError(f"dtype mismatch: feats are {x.feats.dtype} but weight is {weight.dtype}")
    if weight.device != x.feats.device:
        raise ValueError(
            f"device mismatch: feats on {x.feats.device} but weight on {weight.device}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[2],):
            raise ValueError(
                f"bias shape {list(bias.shape)} does not match Cout={weight.shape[2]}"
            )
        if bias.dtype != x.feats.dtype:
            raise ValueError(f"dtype mismatch: feats are {x.feats.dtype} but bias is {bias.dtype}")
    return weight


def conv3d(
    input: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    transposed: bool = False,
    dataflow: str = "auto",
) -> SparseTensor:
    """Sparse convolution of ``input`` (torchsparse 1.x ``conv3d`` semantics).

    * ``kernel_size`` 1 with stride 1: a plain matmul, same coordinates;
    * ``stride`` 1: submanifold, same coordinates, map cached per stride;
    * ``stride`` > 1: strided, output coordinates from :func:`.kmap.downsample_coords`,
      output stride ``input.stride * stride``;
    * ``transposed``: back to stride ``input.stride / stride`` on the finer coordinates, with the
      downsampling map reversed (weights in the same ``[K, Cin, Cout]`` layout).
    """
    if not isinstance(input, SparseTensor):
        raise ValueError(f"input must be a SparseTensor, got {type(input).__name__}")
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
    ks = as_triple(kernel_size, "kernel_size")
    st = as_triple(stride, "stride")
    dil = as_triple(dilation, "dilation")
    w = _check_weight(input, weight, bias, ks[0] * ks[1] * ks[2])

    plan = input.cache.plan
    add_bias = bias is not None  # the planned pass adds it on its own; the others fold it in
    if ks == (1, 1, 1) and st == (1, 1, 1):
        feats = input.feats @ w[0] if bias is None else torch.addmm(bias, input.feats, w[0])
        out_coords, out_stride, add_bias = input.coords, input.stride, False
    elif plan is not None:  # planned pass: the map is given; Gather + MatMul only
        if transposed:
            out_stride = (input.stride[0] // st[0], input.stride[1] // st[1],
                          input.stride[2] // st[2])
            key = (out_stride, ks, st, dil, True)
        else:
            out_stride = (input.stride[0] * st[0], input.stride[1] * st[1], input.stride[2] * st[2])
            key = (input.stride, ks, st, dil, False)
        feats = implicit_gemm_conv(input.feats, w, plan.conv_map(key), block_elements=None)
        out_coords = plan.coords[out_stride]
    elif not transposed:
        kmap = get_kernel_map(input, ks, st, dil)
        feats = apply_kernel_map(input.feats, w, kmap, dataflow, input.cache.workspace, bias)
        out_coords, add_bias = kmap.out_coords, False
        out_stride = (input.stride[0] * st[0], input.stride[1] * st[1], input.stride[2] * st[2])
    else:
        kmap = get_transposed_map(input, ks, st, dil)
        feats = apply_kernel_map(input.feats, w, kmap, dataflow, input.cache.workspace, bias)
        out_coords, add_bias = kmap.out_coords, False
        out_stride = (input.stride[0] // st[0], input.stride[1] // st[1], input.stride[2] // st[2])
    if add_bias and bias is not None:
        feats = feats + bias
    return SparseTensor(feats, out_coords, out_stride, input.cache, check=False)


class Conv3d(nn.Module):
    """Sparse 3D convolution layer; parameter names and shapes are torchsparse's.

    ``kernel`` is ``[K, Cin, Cout]`` (``[Cin, Cout]`` when ``K == 1``) and ``bias`` is optional
    (off by default, as in torchsparse), so torchsparse ``state_dict`` entries load unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        bias: bool = False,
        transposed: bool = False,
        dataflow: str = "auto",
    ) -> None:
        super().__init__()
        if dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channels must be positive, got in={in_channels}, out={out_channels}"
            )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = as_triple(stride, "stride")
        self.dilation = as_triple(dilation, "dilation")
        self.transposed = bool(transposed)
        self.dataflow = dataflow
        self.kernel_volume = math.prod(self.kernel_size)
        if self.kernel_volume > 1:
            shape: tuple[int, ...] = (self.kernel_volume, in_channels, out_channels)
        else:
            shape = (in_channels, out_channels)
        self.kernel = nn.Parameter(torch.zeros(shape))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchsparse's init: uniform in +-1/sqrt(fan), fan = Cin (Cout if transposed) * K."""
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_volume
        std = 1.0 / math.sqrt(fan)
        with torch.no_grad():
            self.kernel.uniform_(-std, std)
            if self.bias is not None:
                self.bias.uniform_(-std, std)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1, 1):
            text += f", stride={self.stride}"
        if self.dilation != (1, 1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.transposed:
            text += ", transposed=True"
        if self.dataflow != "auto":
            text += f", dataflow={self.dataflow!r}"
        return text

    def forward(self, x: SparseTensor) -> SparseTensor:
        kernel: torch.Tensor = self.kernel
        bias: torch.Tensor | None = self.bias
        dtype = autocast_dtype(x.feats.device.type)
        if dtype is not None:
            # As torch's own convolutions under autocast: input and weights in the reduced
            # dtype. The weight casts are differentiable, so float32 masters get float32
            # gradients.
            if x.feats.dtype != dtype:
                x = x.replace_feats(x.feats.to(dtype))
            kernel = kernel.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return conv3d(
            x,
            kernel,
            bias,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.transposed,
            self.dataflow,
        )
