"""``clip2scene bench sparse``: SPVCNN forward on a real scan, ours vs spconv, in one run.

Both engines run the same network with the same weights, on equal work (JSON ``compared``):
the batch norms folded into the convolutions (:func:`~clip2scene_ros.models.fuse.
fold_batchnorms`) and ReLU and residual sums in place in both. ``models.spconv_twin`` runs the
folded network with spconv doing every sparse convolution (bias included), ours does them here;
voxelisation, the point branch and the linear layers are the same code. Both run on ONE
thread, because spconv 2.3's CPU kernels give wrong results with more (see the twin); ours is
also timed on all threads, and unfolded (``ours_unfolded_ms``, context only). The physical
limit is this machine's sgemm rate, measured in the same run with the same thread counts.

The engines are timed side by side, one forward of each per round (:func:`..interleaved_ms`):
``ratio`` is the ratio of the median times and ``ratio_paired`` the median of the per-round
ratios, which drift on a shared machine does not move.

bf16 (the deployed precision on a CPU with bf16 matrix units): ``ours_bf16_ms`` is our folded
network with its trunk in bf16 (:func:`~clip2scene_ros.models.fuse.to_reduced_precision`),
timed in the same rounds; ``ratio_bf16`` = ours bf16 / spconv fp32; ``bf16_label_agreement``
the share of points whose labels (argmax over a random unit text bank of
:data:`LABEL_CLASSES` classes, through the fp32 head) equal fp32's; ``bf16_peak_gflops`` this
machine's bf16 GEMM rate (an n x n product, n = :data:`BF16_PEAK_SIZE`) in the same
rounds, as ``sgemm_gflops`` is fp32's. On a CPU without bf16 matrix units bf16 is emulated and
far slower than fp32.

Where the time goes: ``layers`` times every sparse convolution in both engines (hooks on the
layers during the same rounds), ``conv_ms`` / ``rest_ms`` split each forward into its sparse
convolutions and the rest (point branch, activations, residual sums). ``kmap_ms`` is the time
our forward spends in geometry (``kmap_functions``: :data:`.clock.GEOMETRY`, outermost calls
only, the definition ``bench predictor`` uses), median over forwards of their own. Two floors
bound what any rearrangement of our engine can reach: ``gemm_floor_ms`` runs only the
convolutions' GEMMs at their real shapes, and ``traffic_floor_ms`` is the least time the
gathers and scatters of an unfused engine (rows through memory, as stock torch ops must) take
at this machine's gather rate. ``ratio_floor`` = (both floors + our rest) / spconv is the ratio
our engine would reach if its kernel maps took no time and everything else ran at those rates.
The GEMM floor, the gather rate and the sgemm baseline run in the same rounds as the engines,
and ``ratio_floor`` and ``sgemm_share`` are medians of per-round values, like ``ratio_paired``.
"""

from __future__ import annotations

import contextlib
import importlib
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bag.scans import load_scan
from ..models.fuse import fold_batchnorms, to_reduced_precision
from ..models.spconv_twin import random_spvcnn
from ..models.spvcnn import SPVCNN
from ..sparse.conv import Conv3d
from ..sparse.tensor import PointTensor
from . import apply_malloc, gemm_probe, interleaved_ms, median, median_ms, sgemm_gflops
from .clock import GEOMETRY, StageClock, geometry_clock

#: Classes of the random text bank that labels points for ``bf16_label_agreement``.
LABEL_CLASSES = 16
#: n of the bf16 n x n GEMM probe (smaller than the sgemm probe's: emulated bf16, on a CPU
#: without matrix units, runs about a hundredth of fp32's rate).
BF16_PEAK_SIZE = 512

# the module itself (the package re-exports its functions)
sparse_conv = importlib.import_module("clip2scene_ros.sparse.conv")


@dataclass(frozen=True)
class ConvCall:
    """One sparse convolution of a forward pass: ``rows`` of each of its GEMMs (real pairs per
    kernel offset; every voxel for a 1x1x1 convolution), of which ``moved`` go through a
    gather and a scatter (all but the identity offset's), and its ``n_out`` output rows."""

    name: str
    module: Conv3d
    rows: tuple[int, ...]
    moved: int
    n_out: int


def _conv_calls(net: SPVCNN, z: PointTensor) -> tuple[list[ConvCall], float]:
    """Every sparse convolution of one forward of ``net`` on ``z``, in call order, and the
    FLOPs (2 x multiply-adds) of the point branch's dense linear layers in that forward."""
    names = {m: n for n, m in net.named_modules()}
    found: list[ConvCall] = []
    linear_flops = [0.0]

    def conv_hook(m: Conv3d, inputs: tuple[Any, ...], _: Any) -> None:
        x = inputs[0]
        if m.kernel_volume == 1 and m.stride == (1, 1, 1):
            found.append(ConvCall(names[m], m, (len(x),), 0, len(x)))
            return
        if m.transposed:
            kmap = sparse_conv.get_transposed_map(x, m.kernel_size, m.stride)
        else:
            kmap = sparse_conv.get_kernel_map(x, m.kernel_size, m.stride)
        identity = 0 if kmap.identity_offset is None else kmap.counts[kmap.identity_offset]
        found.append(ConvCall(names[m], m, tuple(r for r in kmap.counts if r),
                              kmap.num_pairs - identity, kmap.n_out))

    def linear_hook(m: nn.Linear, inputs: tuple[Any, ...], _: Any) -> None:
        linear_flops[0] += 2.0 * inputs[0].shape[0] * m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules() if isinstance(m, Conv3d)]
    hooks += [m.register_forward_hook(linear_hook) for m in net.point_transforms.modules()
              if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            net(z)
    finally:
        for h in hooks:
            h.remove()
    return found, linear_flops[0]


def _gemm_floor(convs: list[ConvCall]) -> Callable[[], None]:
    """Only the convolutions' GEMMs at their real shapes, back to back on one reused operand
    buffer (warm in cache where it fits): what an engine whose gathers, scatters and kernel
    maps took no time would still spend in this BLAS."""
    shapes = [(r, c.module.in_channels, c.module.out_channels) for c in convs for r in c.rows]
    a = torch.randn(max(r * ci for r, ci, _ in shapes))
    out = torch.empty(max(r * co for r, _, co in shapes))
    weights = {(ci, co): torch.randn(ci, co) for _, ci, co in shapes}

    def gemms() -> None:
        for r, ci, co in shapes:
            torch.mm(a[: r * ci].view(r, ci), weights[ci, co], out=out[: r * co].view(r, co))

    return gemms


def _gather_probe() -> tuple[Callable[[], object], float]:
    """A gather of rows of 64 floats by a sorted index (as a kernel map's pairs are), and the
    bytes it moves (each float read once and written once): this machine's row-traffic rate."""
    n, pairs, channels = 50_000, 400_000, 64
    x = torch.randn(n, channels)
    index = torch.sort(torch.randint(0, n, (pairs,))).values
    out = torch.empty(pairs, channels)
    return (lambda: torch.index_select(x, 0, index, out=out)), pairs * channels * 8.0


def _moved_bytes(convs: list[ConvCall]) -> float:
    """The least row traffic of an engine that gathers to memory and scatters from memory
    (ours, and any built from stock torch ops): every moved pair's input row copied once and
    its result row read once."""
    return float(sum(c.moved * (8 * c.module.in_channels + 4 * c.module.out_channels)
                     for c in convs))


def label_agreement(net: SPVCNN, a: torch.Tensor, b: torch.Tensor,
                    classes: int = LABEL_CLASSES) -> float:
    """Share of points whose labels agree between features ``a`` and ``b`` (``[N,
    feature_dim]``): each through ``net``'s fp32 text-space head, argmax over a seeded random
    unit bank."""
    bank = nn.functional.normalize(torch.randn(
        classes, net.spec.clip_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    head = net.point_mapping_global
    with torch.no_grad():
        la, lb = ((head(x.float()) @ bank.t()).argmax(1) for x in (a, b))
    return float((la == lb).float().mean())


@contextlib.contextmanager
def _layer_times(layers: dict[nn.Module, str], into: dict[str, list[float]]) -> Iterator[None]:
    """Append the wall time (ms) of every call of each of ``layers`` to ``into[name]``."""
    started: dict[nn.Module, float] = {}

    def pre(m: nn.Module, _: Any) -> None:
        started[m] = time.perf_counter()

    def post(m: nn.Module, _: Any, __: Any) -> None:
        into.setdefault(layers[m], []).append(1e3 * (time.perf_counter() - started[m]))

    hooks = [h for m in layers for h in (m.register_forward_pre_hook(pre),
                                         m.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _per_layer(convs: list[ConvCall], ours: dict[str, list[float]],
               theirs: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per sparse convolution: its shape, real pairs and both engines' median times
    (the first call, the warm-up round, left out). A layer's time includes building the
    kernel map when it is the first layer to need it, in both engines."""
    def med(times: list[float] | None) -> float | None:
        return median(times[1:] if len(times) > 1 else times) if times else None

    return [{"name": c.name, "kernel": c.module.kernel_size[0], "stride": c.module.stride[0],
             "transposed": c.module.transposed, "cin": c.module.in_channels,
             "cout": c.module.out_channels, "pairs": sum(c.rows), "voxels_out": c.n_out,
             "ours_ms": med(ours.get(c.name)), "spconv_ms": med(theirs.get(c.name))}
            for c in convs]


def bench_sparse(scan: Path, voxel: float = 0.05, cr: float = 1.0, repeat: int = 3,
                 malloc: str = "node") -> dict[str, Any]:
    """The benchmark's JSON (see the module). ``malloc="node"`` first applies the node's glibc
    settings (:func:`.apply_malloc`) to this process, so both engines run as the node
    runs them; ``"default"`` leaves glibc's."""
    from ..models.spconv_twin import SpconvTwin

    malloc = apply_malloc(malloc)

    points = load_scan(Path(scan))
    coords = torch.from_numpy(points[:, :3]) / voxel
    coords = coords - torch.floor(coords.min(0).values / 16) * 16  # spconv wants coords >= 0
    feats = torch.from_numpy(points)
    net = random_spvcnn(cr)
    fused = fold_batchnorms(net)  # our inference path (the Predictor's torch backend)
    twin = SpconvTwin(fused)  # the same folded network: equal work (see the module)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return fused(PointTensor(feats, coords))

    reduced = to_reduced_precision(fold_batchnorms(net), torch.bfloat16)

    def ours_bf16() -> torch.Tensor:
        with torch.no_grad():
            return reduced(PointTensor(feats, coords))

    def ours_unfolded() -> torch.Tensor:
        with torch.no_grad():
            return net(PointTensor(feats, coords))

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return twin(PointTensor(feats, coords))

    all_threads = torch.get_num_threads()
    a, b = ours(), theirs()  # the twin builds its spconv layers on its first call
    err = float((a - b).abs().max() / b.abs().max())
    bf16_agreement = label_agreement(fused, a, ours_bf16())
    voxels = int(torch.unique(torch.floor(coords).long(), dim=0).shape[0])
    names = {m: n for n, m in fused.named_modules()}  # fold_batchnorms keeps module names
    ours_layers: dict[nn.Module, str] = {m: n for m, n in names.items()
                                         if isinstance(m, Conv3d)}
    their_layers = {layer: names[twin.mirrors[n]] for n, layer in twin.convs.items()}
    ours_times: dict[str, list[float]] = {}
    their_times: dict[str, list[float]] = {}
    convs, linear_flops = _conv_calls(fused, PointTensor(feats, coords))
    # useful work: 2 x multiply-adds over the real pairs of every sparse conv, plus the dense
    # linear layers
    flops = linear_flops + sum(2.0 * r * c.module.in_channels * c.module.out_channels
                               for c in convs for r in c.rows)
    gather, gather_bytes = _gather_probe()
    sgemm, sgemm_flops = gemm_probe()
    bf16_gemm, bf16_gemm_flops = gemm_probe(BF16_PEAK_SIZE, torch.bfloat16)
    torch.set_num_threads(1)
    try:
        # the baselines run in the same rounds as the engines, so drift moves them together
        with _layer_times(ours_layers, ours_times), _layer_times(their_layers, their_times):
            rounds = interleaved_ms({"ours": ours, "ours_bf16": ours_bf16,
                                     "ours_unfolded": ours_unfolded,
                                     "spconv": theirs, "gemm_floor": _gemm_floor(convs),
                                     "gather": gather, "sgemm": sgemm,
                                     "bf16_gemm": bf16_gemm}, repeat)
        # kernel maps: the shared definition (bench.clock), in forwards of their own
        geometry, kmap_r, kmap_share_r = StageClock(), [], []
        with geometry_clock(geometry):
            for _ in range(max(1, repeat)):
                start = time.perf_counter()
                ours()
                total = 1e3 * (time.perf_counter() - start)
                kmap_r.append(geometry.take_ms()[0])
                kmap_share_r.append(kmap_r[-1] / total)
    finally:
        torch.set_num_threads(all_threads)
    ours_all_ms = median_ms(ours, repeat, warmup=1)
    sgemm_all = sgemm_gflops()
    ours_ms, unfolded_ms, spconv_ms, bf16_ms = (
        median(rounds[k]) for k in ("ours", "ours_unfolded", "spconv", "ours_bf16"))
    layers = _per_layer(convs, ours_times, their_times)
    conv_ms = {engine: sum(row[f"{engine}_ms"] or 0.0 for row in layers)
               for engine in ("ours", "spconv")}
    rest_ms = {"ours": ours_ms - conv_ms["ours"], "spconv": spconv_ms - conv_ms["spconv"]}
    # per round (the warm-up round's layer times come first): our rest, the traffic floor at
    # that round's gather rate, and the floor ratio against that round's spconv
    rest_r = [total - sum(ours_times[c.name][1 + r] for c in convs)
              for r, total in enumerate(rounds["ours"])]
    moved = _moved_bytes(convs)
    traffic_r = [moved * ms / gather_bytes for ms in rounds["gather"]]
    floor_r = [(g + t + rest) / sp for g, t, rest, sp in
               zip(rounds["gemm_floor"], traffic_r, rest_r, rounds["spconv"], strict=True)]
    share_r = [(flops / o) / (sgemm_flops / g) for o, g in
               zip(rounds["ours"], rounds["sgemm"], strict=True)]
    sgemm_1 = sgemm_flops / (median(rounds["sgemm"]) * 1e-3) / 1e9
    return {
        "scan": str(scan), "voxel": voxel, "cr": cr, "repeat": repeat, "malloc": malloc,
        "points": int(points.shape[0]), "voxels": voxels,
        "threads": 1, "ours_ms": ours_ms, "spconv_ms": spconv_ms, "ratio": ours_ms / spconv_ms,
        "ratio_paired": median([a / b for a, b in zip(rounds["ours"], rounds["spconv"],
                                                      strict=True)]),
        "ours_bf16_ms": bf16_ms, "ratio_bf16": bf16_ms / spconv_ms,
        "ratio_bf16_paired": median([a / b for a, b in zip(rounds["ours_bf16"],
                                                           rounds["spconv"], strict=True)]),
        "bf16_label_agreement": bf16_agreement,
        "bf16_peak_gflops": bf16_gemm_flops / (median(rounds["bf16_gemm"]) * 1e-3) / 1e9,
        "bf16_peak_size": BF16_PEAK_SIZE,
        "bf16_useful_gflops": flops / (bf16_ms * 1e-3) / 1e9,
        "rounds_ms": rounds,
        "kmap_ms": median(kmap_r), "kmap_share": median(kmap_share_r),
        "kmap_functions": [f"{module}.{name}" for module, name in GEOMETRY],
        "compared": _compared(),
        "useful_gflops": flops / (ours_ms * 1e-3) / 1e9, "sgemm_gflops": sgemm_1,
        "sgemm_share": median(share_r),
        "ours_ms_all_threads": ours_all_ms, "all_threads": all_threads,
        "sgemm_gflops_all_threads": sgemm_all,
        "useful_gflop": flops / 1e9,
        "parity_max_rel_err": err,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ours_unfolded_ms": unfolded_ms,
        "ours_peak_rss_mb": _ours_peak_rss_mb(Path(scan), voxel, cr),
        "onnx_max_rel_err": _onnx_err(net, coords, feats),
        "layers": layers, "conv_ms": conv_ms, "rest_ms": rest_ms,
        "gemm_floor_ms": median(rounds["gemm_floor"]), "traffic_floor_ms": median(traffic_r),
        "ratio_floor": median(floor_r),
    }


def _compared() -> str:
    """What ``ratio`` compares, in words (it goes into the JSON)."""
    from importlib.metadata import version

    return ("ours: SPVCNN with its batch norms folded into the convolutions' kernels and biases "
            "(models.fuse.fold_batchnorms), biases in the GEMMs, ReLU and residual sums in "
            f"place; spconv {version('spconv')}: the same folded network "
            "(models.spconv_twin.SpconvTwin of it), every sparse convolution and its kernel "
            "maps done by spconv with the bias in its layers, ReLU and residual sums in place; "
            "voxelisation, point branch and linear layers are the same code in both; one "
            "thread each, timed side by side in the same rounds")


def _ours_forward_rss(scan: str, voxel: float, cr: float) -> float:
    """Peak RSS (MB) of this process after only our forward (run in a fresh interpreter).

    Read from ``VmHWM``: ``ru_maxrss`` would include the parent's size, since Linux carries it
    across fork and exec.
    """
    points = load_scan(Path(scan))
    coords = torch.from_numpy(points[:, :3]) / voxel
    net = fold_batchnorms(random_spvcnn(cr))
    with torch.no_grad():
        net(PointTensor(torch.from_numpy(points), coords))
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _ours_peak_rss_mb(scan: Path, voxel: float, cr: float) -> float:
    # The benchmark process also holds spconv and both networks; a fresh interpreter measures
    # what a deployment of our engine alone needs (torch itself included).
    code = ("import sys; from clip2scene_ros.bench.sparse import _ours_forward_rss; "
            "print(_ours_forward_rss(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, str(scan), str(voxel), str(cr)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _onnx_err(net: SPVCNN, coords: torch.Tensor, feats: torch.Tensor) -> float:
    """Max relative error of the exported graph in onnxruntime against torch on the scan."""
    import tempfile

    from ..models.onnx_export import export_onnx, onnx_max_rel_err

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, Path(tmp) / "model.onnx", max_points=coords.shape[0])
        return onnx_max_rel_err(net, path, (coords, feats))
