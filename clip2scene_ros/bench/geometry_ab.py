"""This checkout's sparse engine against the one at a git revision, in one process: prints JSON.

The package is copied to a temporary folder under another name with its ``sparse/`` taken from
``--against`` (``git archive``), so the two differ in the engine only. On a bag's first frame
(``Predictor.predict``, torch backend, a random-weight bundle as ``bench predictor`` makes it):

1. both must give identical results: the predictions (features and labels), every kernel map
   of the eager forward (both forms, compact pairs, CSR scatter, transposed maps), every
   point <-> voxel map and the ONNX plan's tensors; any difference aborts;
2. paired rounds: old and new alternate (the order flips every round) after a warm-up round;
   ``geometry`` is the time in :data:`.clock.GEOMETRY` (outermost calls), ``total`` the
   predict's wall time, and the ``_cpu`` stages the same as the calling thread's CPU time
   (which other processes on the core do not inflate; with one torch thread it is all the
   predict's CPU); ``ratio_paired`` is the median of the per-round new / old ratios, which a
   machine whose speed drifts from minute to minute does not move.

Run: ``python -m clip2scene_ros.bench.geometry_ab --bag BAG --against REV [--rounds N]
[--threads N] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import print_report
from .clock import GEOMETRY, StageClock, geometry_targets, patched

PACKAGE = "clip2scene_ros"
OLD = "c2s_engine_before"


def old_package(revision: str, into: Path) -> str:
    """This package copied into ``into`` as :data:`OLD`, with ``sparse/`` at ``revision``."""
    root = Path(__file__).resolve().parents[1]
    target = into / OLD
    shutil.copytree(root, target, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "training"))
    shutil.rmtree(target / "sparse")
    archive = subprocess.run(["git", "-C", str(root.parent), "archive", revision,
                              f"{PACKAGE}/sparse"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into / "archive", filter="data")
    shutil.move(into / "archive" / PACKAGE / "sparse", target / "sparse")
    for path in target.rglob("*.py"):
        text = path.read_text()
        if PACKAGE in text:
            path.write_text(re.sub(rf"\b{PACKAGE}\b", OLD, text))
    sys.path.insert(0, str(into))
    return OLD


def _same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        if a.layout == torch.sparse_csr:
            for part in ("crow_indices", "col_indices", "values"):
                _same(getattr(a, part)(), getattr(b, part)(), f"{what}.{part}")
            return
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise RuntimeError(f"{what} differs between the engines; benchmark aborted")
    elif isinstance(a, tuple | list):
        if len(a) != len(b):
            raise RuntimeError(f"{what} differs between the engines; benchmark aborted")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{what}[{i}]")
    elif a != b:
        raise RuntimeError(f"{what} differs between the engines ({a!r} vs {b!r}); "
                           "benchmark aborted")


def _caches(package: str, predictor: Any, frame: Any) -> tuple[Any, Any]:
    """The sparse and point caches of one eager predict."""
    spvcnn: Any = importlib.import_module(f"{package}.models.spvcnn")
    got: dict[str, Any] = {}
    real = spvcnn.voxel_to_point

    def grab(x: Any, z: Any, *args: Any, **kwargs: Any) -> Any:
        got["sparse"], got["point"] = x.cache, z.cache
        return real(x, z, *args, **kwargs)

    spvcnn.voxel_to_point = grab
    try:
        predictor.predict([frame])
    finally:
        spvcnn.voxel_to_point = real
    return got["sparse"], got["point"]


def check_identical(packages: dict[str, str], predictors: dict[str, Any], frame: Any
                    ) -> dict[str, int]:
    """Raise RuntimeError unless both engines give the same predictions and maps."""
    new, old = predictors["new"].predict([frame]), predictors["old"].predict([frame])
    _same(new.features, old.features, "features")
    _same(torch.as_tensor(new.labels.label), torch.as_tensor(old.labels.label), "labels")
    (sn, zn), (so, zo) = (_caches(packages[k], predictors[k], frame) for k in ("new", "old"))
    _same(sorted(sn.kmaps), sorted(so.kmaps), "kernel map keys")
    for key, a in sn.kmaps.items():
        b = so.kmaps[key]
        for part in ("out_in_map", "in_index", "out_index", "counts", "in_coords",
                     "out_coords", "identity_offset"):
            _same(getattr(a, part), getattr(b, part), f"kmap {key} {part}")
        for name, x, y in (("", a, b), (" transposed", a.transposed(), b.transposed())):
            cx, cy = x.compact(), y.compact()
            for part in ("in_index", "out_index", "segments", "scatter"):
                _same(getattr(cx, part), getattr(cy, part), f"kmap {key}{name} {part}")
    _same(sorted(sn.coords), sorted(so.coords), "strides")
    for stride in sn.coords:
        _same(sn.coords[stride], so.coords[stride], f"coords {stride}")
    for part in ("voxel_index", "interp", "pool", "interp_bags"):
        a, b = getattr(zn, part), getattr(zo, part)
        _same(sorted(a), sorted(b), f"{part} strides")
        for stride in a:
            _same(a[stride], b[stride], f"{part} {stride}")
    plans = {}
    for k in ("new", "old"):
        backends = importlib.import_module(f"{packages[k]}.runtime.backends")
        spvcnn = importlib.import_module(f"{packages[k]}.models.spvcnn")
        prepare = importlib.import_module(f"{packages[k]}.preprocess").prepare_frames
        prepared = prepare([frame], predictors[k].input_spec)
        plans[k] = backends.plan_for(prepared, spvcnn.plan_schema(len(prepared.coords)))
    _same(plans["new"].tensors(), plans["old"].tensors(), "plan")
    return {"kernel_maps": len(sn.kmaps), "strides": len(sn.coords)}


def paired_rounds(packages: dict[str, str], predictors: dict[str, Any], frame: Any,
                  rounds: int) -> dict[str, Any]:
    """Old and new alternating (see the module); medians and per-round ratios."""
    targets = {k: geometry_targets([(m.replace(PACKAGE, packages[k], 1), n)
                                    for m, n in GEOMETRY]) for k in packages}
    clocks = {k: StageClock() for k in packages}
    stages = ("geometry", "total", "geometry_cpu", "total_cpu")
    times: dict[str, dict[str, list[float]]] = {k: {s: [] for s in stages} for k in packages}
    for r in range(rounds + 1):  # round 0 warms both up
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            with patched(targets[k], clocks[k]):
                start, cpu = time.perf_counter(), time.thread_time()
                predictors[k].predict([frame])
                total = 1e3 * (time.perf_counter() - start)
                total_cpu = 1e3 * (time.thread_time() - cpu)
            geometry, geometry_cpu = clocks[k].take_ms()
            if r:
                for stage, value in zip(stages, (geometry, total, geometry_cpu, total_cpu),
                                        strict=True):
                    times[k][stage].append(value)
    out: dict[str, Any] = {}
    for stage in stages:
        old, new = times["old"][stage], times["new"][stage]
        ratios = [n / o for n, o in zip(new, old, strict=True)]
        out[stage] = {"old_ms": statistics.median(old), "new_ms": statistics.median(new),
                      "ratio_paired": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "old_rounds_ms": old, "new_rounds_ms": new}
    return out


def run(bag: Path, against: str, rounds: int = 9, threads: int = 0, cr: float = 0.5,
        voxel: float = 0.1) -> dict[str, Any]:
    from .predictor import first_frame, random_bundle

    if threads:
        torch.set_num_threads(threads)
    frame = first_frame(Path(bag))
    with tempfile.TemporaryDirectory() as tmp:
        packages = {"new": PACKAGE, "old": old_package(against, Path(tmp))}
        bundle = random_bundle(Path(tmp) / "model", cr=cr, voxel=voxel)
        predictors = {k: importlib.import_module(f"{p}.runtime.predictor").Predictor(
            bundle, backend="torch", device="cpu") for k, p in packages.items()}
        identical = check_identical(packages, predictors, frame)
        result = paired_rounds(packages, predictors, frame, rounds)
    return {"bag": str(bag), "against": against, "points": frame.num_points, "cr": cr,
            "voxel": voxel, "threads": torch.get_num_threads(), "rounds": rounds,
            "identical": identical, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bag", type=Path, required=True, help="rosbag2 folder")
    parser.add_argument("--against", required=True, help="git revision of the old engine")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    report = run(args.bag, args.against, rounds=args.rounds, threads=args.threads)
    print_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
