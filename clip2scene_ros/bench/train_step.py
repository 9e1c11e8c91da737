"""``clip2scene bench train-step``: one training step of the demo's student in fp32 and under
bf16 autocast, in the same rounds.

The step is what ``clip2scene train`` does per micro-batch, on one real frame (a bag's first):
SPVCNN (the demo's cr 0.5 at 0.1 m, ``point_mapping_global`` into a ``clip_dim``-wide text
space) from a fresh point tensor (so the kernel maps are built, as for every training sample),
the scaled-cosine cross entropy against a random unit text bank with seeded random labels
(stand-ins: the step's work does not depend on what the labels are), backward, and an SGD step
with the demo's momentum. Each precision trains its own copy of the same initial weights, and
the two steps alternate round by round (:func:`..interleaved_ms`), so ``bf16_over_fp32``, the
median of the per-round ratios, is not moved by drift. ``first_loss`` shows that both start
from the same loss; ``fp32_gemm_share`` is the share of one more fp32 step spent in dense GEMM
kernels (torch's profiler): what bf16 matrix units can speed up. ``sgemm_gflops`` and
``bf16_peak_gflops`` are this machine's n x n GEMM rates in each dtype, timed in the same rounds
with the same threads.

The target (demo training ≥ 1.6x faster with bf16) reads ``bf16_over_fp32`` ≤ 0.625; it is
only checked where the CPU has bf16 matrix units (AMX, AVX512-BF16): elsewhere bf16 is
emulated, and ``target_met`` is null with the reason.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.bundle import ArchitectureSpec, InputSpec
from ..models.spvcnn import SPVCNN
from ..precision import cpu_has_fast_bf16
from ..preprocess import prepare_frames
from ..runtime.labels import text_logits
from ..sparse.tensor import PointTensor
from . import gemm_probe, interleaved_ms, median
from .predictor import first_frame, torch_gemm_ms

#: bf16 step time / fp32 step time that makes demo training 1.6x faster.
TARGET_BF16_OVER_FP32 = 1 / 1.6
#: n of the bf16 GEMM probe: emulated bf16 is slow, so it is smaller than the fp32 one.
BF16_GEMM_SIZE = 1024


def _step(net: SPVCNN, optim: torch.optim.Optimizer, coords: torch.Tensor, feats: torch.Tensor,
          bank: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None
          ) -> Callable[[], float]:
    """One step of ``net`` (under ``dtype`` autocast, or fp32 for None); returns the loss."""

    def step() -> float:
        optim.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = net.point_mapping_global(net(PointTensor(feats, coords)))
        loss = F.cross_entropy(text_logits(out.float(), bank), target)
        loss.backward()
        optim.step()
        return float(loss.detach())

    return step


def bench_train_step(bag: Path, *, cr: float = 0.5, voxel: float = 0.1, clip_dim: int = 32,
                     classes: int = 16, repeat: int = 5, threads: int = 0,
                     seed: int = 0) -> dict[str, Any]:
    """Step times in fp32 and bf16 autocast on ``bag``'s first frame (see the module doc)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if threads:
        torch.set_num_threads(threads)
    frame = first_frame(bag)
    spec = InputSpec(voxel_size=voxel, features=("intensity", "z"), scale=(0.01, 0.5))
    prepared = prepare_frames([frame], spec)
    coords = torch.from_numpy(prepared.coords)
    feats = torch.from_numpy(prepared.feats)
    gen = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(classes, clip_dim, generator=gen), dim=1)
    target = torch.randint(0, classes, (len(coords),), generator=gen)

    steps: dict[str, Callable[[], float]] = {}
    first_loss: dict[str, float] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(seed)  # the same initial weights for both
        net = SPVCNN(ArchitectureSpec(cr=cr, clip_dim=clip_dim), in_channels=2).train()
        optim = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, dampening=0.1)
        steps[name] = _step(net, optim, coords, feats, bank, target, dtype)
        first_loss[name] = steps[name]()
    sgemm, sgemm_flops = gemm_probe()
    bf16_gemm, bf16_gemm_flops = gemm_probe(BF16_GEMM_SIZE, torch.bfloat16)
    times = interleaved_ms({**steps, "sgemm": sgemm, "bf16_gemm": bf16_gemm}, repeat,
                           warmup=0)
    ratios = [b / f for b, f in zip(times["bf16"], times["fp32"], strict=True)]
    gemm_ms, profiled_ms = torch_gemm_ms(steps["fp32"])
    fast = cpu_has_fast_bf16()
    ratio = median(ratios)
    return {
        "bag": str(bag), "points": len(coords), "cr": cr, "voxel": voxel, "clip_dim": clip_dim,
        "threads": torch.get_num_threads(), "repeat": repeat,
        "fp32_step_ms": median(times["fp32"]), "bf16_step_ms": median(times["bf16"]),
        "bf16_over_fp32": ratio, "rounds_ms": {k: times[k] for k in steps},
        "first_loss": first_loss,
        "fp32_gemm_share": gemm_ms / profiled_ms,
        "sgemm_gflops": sgemm_flops / (median(times["sgemm"]) * 1e-3) / 1e9,
        "bf16_peak_gflops": bf16_gemm_flops / (median(times["bf16_gemm"]) * 1e-3) / 1e9,
        "cpu_bf16_matrix_units": fast,
        "target_bf16_over_fp32": TARGET_BF16_OVER_FP32,
        "target_met": (ratio <= TARGET_BF16_OVER_FP32) if fast else None,
        "target_note": None if fast else "this CPU has no bf16 matrix units (AMX, "
        "AVX512-BF16): bf16 is emulated, so the target is not checked here",
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import print_report

    parser = argparse.ArgumentParser(prog="python -m clip2scene_ros.bench.train_step",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bag", required=True, help="rosbag2 folder (its first LiDAR frame)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cr", type=float, default=0.5)
    parser.add_argument("--voxel", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    print_report(bench_train_step(args.bag, cr=args.cr, voxel=args.voxel, repeat=args.repeat,
                                  threads=args.threads), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
