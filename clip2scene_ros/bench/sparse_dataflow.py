"""Which sparse-conv dataflow is faster, as a function of neighbour density: prints JSON.

For every case it times the same convolution (same map, same weights) with the compacted
gather-GEMM-scatter dataflow and with the out_in_map implicit-GEMM dataflow, each in the form
the engine runs, and records the map's fill (real pairs / (N_out * K)) and mean neighbours per
output. The forward is inference's (``csr_conv`` with a reused workspace, against
``implicit_gemm_conv``), forward+backward (``--backward``) training's (``pair_conv`` against
``implicit_gemm_conv`` under autograd). The maps' compact pairs, CSR tables and padded
``out_in_map`` are built before the timing (geometry, cached per map in the engine), and the
two dataflows are timed side by side, once each per round (:func:`..interleaved_ms`). Cases:

* a real scan (``--scan``, float32 rows of x, y, z, ...) voxelised at ``--voxel`` metres and
  downsampled by k2 s2 maps to strides 1..16: the submanifold 3x3x3 map at every stride, the
  k2 s2 downsample and the transposed k2 s2 upsample maps;
* synthetic uniform occupancy of a cube at several densities (fills from sparse to dense).

``rule.implicit_gemm_min_fill`` is the smallest measured fill from which on implicit GEMM was
faster in every forward case; ``clip2scene_ros.sparse.conv.IMPLICIT_GEMM_MIN_FILL`` is set from
it.

Run: ``python -m clip2scene_ros.bench.sparse_dataflow [--scan FILE] [--threads N] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sparse import SparseTensor, get_kernel_map, get_transposed_map
from ..sparse.conv import IMPLICIT_GEMM_MIN_FILL, csr_conv, implicit_gemm_conv, pair_conv
from ..sparse.kmap import KernelMap
from ..sparse.tensor import Workspace
from ..sparse.voxelize import voxelize
from . import interleaved_ms, median, print_report

DEFAULT_SCAN = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "semantickitti" / "000000.bin"
)


def _time_case(kmap: KernelMap, cin: int, cout: int, repeat: int, backward: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(kmap.n_in, cin, generator=gen)
    weight = torch.randn(kmap.kernel_volume, cin, cout, generator=gen) / (cin * 3)
    padded = kmap.padded_out_in_map()
    pairs = kmap.compact()
    pairs.scatter  # noqa: B018 (the CSR scatter is geometry: built once per map, not timed)
    workspace = Workspace()

    def gs() -> torch.Tensor:  # inference's gather-GEMM-scatter
        return csr_conv(feats, weight, pairs, kmap.identity_offset, kmap.n_out, workspace)

    def ig() -> torch.Tensor:
        return implicit_gemm_conv(feats, weight, padded)

    result: dict[str, Any] = {
        "n_in": kmap.n_in,
        "n_out": kmap.n_out,
        "K": kmap.kernel_volume,
        "mean_neighbours": round(kmap.mean_neighbours, 3),
        "fill": round(kmap.fill, 4),
        "cin": cin,
        "cout": cout,
    }
    with torch.inference_mode():
        times = interleaved_ms({"gs": gs, "ig": ig}, repeat, warmup=2)
    result["gather_scatter_ms"] = round(median(times["gs"]), 3)
    result["implicit_gemm_ms"] = round(median(times["ig"]), 3)
    if backward:
        pairs.gather_t  # noqa: B018 (training's transposed gather, built once per map)
        feats.requires_grad_(True)
        weight.requires_grad_(True)
        times = interleaved_ms({
            "gs": lambda: pair_conv(feats, weight, pairs, kmap.identity_offset).sum().backward(),
            "ig": lambda: ig().sum().backward()}, repeat, warmup=1)
        result["gather_scatter_fwd_bwd_ms"] = round(median(times["gs"]), 3)
        result["implicit_gemm_fwd_bwd_ms"] = round(median(times["ig"]), 3)
    result["implicit_over_gather_scatter"] = round(
        result["implicit_gemm_ms"] / max(result["gather_scatter_ms"], 1e-9), 3
    )
    return result


def _scan_levels(path: Path, voxel: float, dims: int, max_points: int | None) -> SparseTensor:
    raw = np.fromfile(path, dtype=np.float32).reshape(-1, dims)[:, :3]
    if max_points:
        raw = raw[:max_points]
    xyz = torch.from_numpy(np.floor(raw / voxel).astype(np.int64))
    xyz -= xyz.min(dim=0).values
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], dim=1)
    vcoords, _, _ = voxelize(coords, torch.zeros(len(xyz), 1))
    return SparseTensor(torch.zeros(len(vcoords), 1), vcoords, 1)


def _synthetic(side: int, occupancy: float, seed: int) -> SparseTensor:
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(side, side, side, generator=gen) < occupancy
    xyz = grid.nonzero()
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], dim=1)
    return SparseTensor(torch.zeros(len(xyz), 1), coords, 1)


def _fit_rule(cases: list[dict]) -> dict:
    """Smallest measured fill from which implicit GEMM wins every case at that fill and above
    (cases of equal fill count together: a tie is a win only if all of them are); 1.01 when
    it never does."""
    threshold = 1.01
    for fill in sorted({c["fill"] for c in cases}, reverse=True):
        if all(c["implicit_gemm_ms"] < c["gather_scatter_ms"] for c in cases
               if c["fill"] == fill):
            threshold = fill
        else:
            break
    wins = sorted(c["fill"] for c in cases if c["implicit_gemm_ms"] < c["gather_scatter_ms"])
    return {
        "implicit_gemm_min_fill": threshold,
        "implicit_gemm_wins_at_fills": wins,
        "cases": len(cases),
    }


def run(
    scan: Path | None = DEFAULT_SCAN,
    voxel: float = 0.05,
    dims: int = 4,
    channels: tuple[int, ...] = (32, 64, 128),
    levels: int = 5,
    synthetic_side: int = 40,
    occupancies: tuple[float, ...] = (0.05, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9),
    repeat: int = 5,
    backward: bool = False,
    max_points: int | None = None,
) -> dict:
    """Measure every case and return the JSON-ready report."""
    cases: list[dict] = []
    if scan is not None and Path(scan).exists():
        x = _scan_levels(Path(scan), voxel, dims, max_points)
        for level in range(levels):
            stride = 2**level
            sub = get_kernel_map(x, 3)
            maps = [("submanifold_k3", sub)]
            if level + 1 < levels:
                down = get_kernel_map(x, 2, 2)
                coarse = SparseTensor(
                    torch.zeros(down.n_out, 1), down.out_coords, x.stride[0] * 2, x.cache
                )
                maps += [("down_k2s2", down), ("up_k2s2", get_transposed_map(coarse, 2, 2))]
            for kind, kmap in maps:
                for c in channels:
                    case = _time_case(kmap, c, c, repeat, backward)
                    cases.append({"source": "scan", "stride": stride, "kind": kind, **case})
            if level + 1 < levels:
                x = coarse
    for i, occ in enumerate(occupancies):
        x = _synthetic(synthetic_side, occ, seed=i)
        kmap = get_kernel_map(x, 3)
        for c in channels:
            case = _time_case(kmap, c, c, repeat, backward)
            cases.append(
                {"source": f"uniform_{occ}", "stride": 1, "kind": "submanifold_k3", **case}
            )
    return {
        "benchmark": "sparse_dataflow",
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scan": str(scan) if scan is not None and Path(scan).exists() else None,
        "voxel": voxel,
        "rule": _fit_rule(cases),
        "engine_implicit_gemm_min_fill": IMPLICIT_GEMM_MIN_FILL,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="float32 point file")
    parser.add_argument("--no-scan", action="store_true", help="synthetic cases only")
    parser.add_argument("--dims", type=int, default=4, help="floats per point in --scan")
    parser.add_argument("--voxel", type=float, default=0.05)
    parser.add_argument("--channels", default="32,64,128")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--side", type=int, default=40, help="synthetic cube side (voxels)")
    parser.add_argument("--occupancies", default="0.05,0.15,0.3,0.45,0.6,0.7,0.8,0.9")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--max-points", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(
        scan=None if args.no_scan else args.scan,
        voxel=args.voxel,
        dims=args.dims,
        channels=tuple(int(c) for c in args.channels.split(",") if c),
        levels=args.levels,
        synthetic_side=args.side,
        occupancies=tuple(float(o) for o in args.occupancies.split(",") if o),
        repeat=args.repeat,
        backward=args.backward,
        max_points=args.max_points,
    )
    print_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
