"""``clip2scene bench predictor``: where ``Predictor.predict`` spends a real frame's time.

One frame of a bag (the first) goes through ``Predictor.predict`` with a random-weight bundle
(SPVCNN with non-trivial batch-norm statistics, a 16-class random text bank) on each backend
and precision (``--precision fp32,bf16``; each backend runs the precisions it supports), all of
them interleaved run by run so that they share the machine's state. Per run the
predictor's own timings are split into stages:

* ``preprocess``: :func:`~clip2scene_ros.preprocess.prepare_frames` (the predictor's timing);
* ``geometry``: voxelisation, kernel maps, CSR scatter matrices and point <-> voxel maps (the
  torch engine builds them inside its forward) or the plan the ONNX graph reads (``plan_for``):
  the time spent in :data:`.clock.GEOMETRY`'s functions, outermost calls only, the same
  definition as ``bench sparse``'s ``kmap_ms``;
* ``network``: the rest of the backend call (gathers, GEMMs, scatters, point branch);
* ``head``: text-space logits, softmax and the labels of the key frame's points;
* ``total``: the predictor's total.

The physical limit beside them: torch's sgemm rate on this machine with the same threads,
measured in the same run, and the share of a predict spent in dense GEMM kernels (torch
profiler, or onnxruntime's own profile for MatMul/Gemm nodes).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..frame import Frame
from ..models.bundle import ArchitectureSpec, BundleSpec, InputSpec, VocabularySpec, save_bundle
from ..runtime.predictor import Predictor
from . import apply_malloc, sgemm_gflops
from .clock import StageClock, geometry_targets, patched

STAGES = ("preprocess", "geometry", "network", "head", "total")
#: Profiler events that are dense GEMM kernels (torch) and GEMM node types (onnxruntime).
TORCH_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
ORT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
FEATURES = ("x", "y", "z", "intensity")
CLASSES = 16


def first_frame(bag: Path) -> Frame:
    """The first frame of a rosbag2 folder (mcap or sqlite3)."""
    from ..bag.reader import BagReader

    for frame in BagReader(Path(bag)):
        return frame
    raise ValueError(f"{bag}: the bag holds no readable LiDAR frame")


def random_bundle(path: Path, *, cr: float = 0.5, voxel: float = 0.1,
                  features: Sequence[str] = FEATURES, classes: int = CLASSES, seed: int = 0,
                  onnx: bool = False) -> Path:
    """A bundle of a seeded random SPVCNN (non-trivial BN statistics) and text bank; with
    ``onnx`` its ``model.onnx`` too (as ``clip2scene export`` writes it, without its accuracy
    check: the benchmark compares the backends on the real frame itself)."""
    from ..files import file_sha256
    from ..models.bundle import ONNX_FILE, WEIGHTS_FILE
    from ..models.onnx_export import WEIGHTS_KEY, export_onnx
    from ..models.spconv_twin import random_spvcnn

    net = random_spvcnn(cr, in_channels=len(features), seed=seed)
    bank = torch.nn.functional.normalize(
        torch.randn(classes, net.spec.clip_dim, generator=torch.Generator().manual_seed(seed)),
        dim=1)
    rng = np.random.default_rng(seed)
    palette = tuple((int(r), int(g), int(b))
                    for r, g, b in (rng.integers(0, 256, 3) for _ in range(classes)))
    vocab = VocabularySpec(f"random{classes}", tuple(f"class{i}" for i in range(classes)),
                           palette)
    spec = BundleSpec(ArchitectureSpec(cr=cr), InputSpec(voxel_size=voxel,
                                                         features=tuple(features)), vocab)
    path = save_bundle(path, spec, net.state_dict(), bank)
    if onnx:
        export_onnx(net, path / ONNX_FILE, max_points=spec.input.max_points,
                    metadata={WEIGHTS_KEY: file_sha256(path / WEIGHTS_FILE)})
    return path


def _instance_targets(backend: Any) -> list[tuple[Any, str]]:
    return [(backend, name) for name in ("features", "trunk_features") if hasattr(backend, name)]


def _run(predictor: Predictor, frame: Frame, geometry: StageClock, backend: StageClock
         ) -> tuple[dict[str, float], dict[str, float], Any]:
    """Stage wall times of one predict, the calling thread's CPU times of the same stages
    (robust to other load on the machine when torch runs one thread), and the prediction."""
    cpu = time.thread_time()
    prediction = predictor.predict([frame])
    cpu = 1e3 * (time.thread_time() - cpu)
    t = prediction.timings_ms
    (geometry_ms, geometry_cpu), (backend_ms, backend_cpu) = geometry.take_ms(), backend.take_ms()
    stages = {"preprocess": t["preprocess"], "geometry": geometry_ms,
              "network": backend_ms - geometry_ms,
              "head": t["inference"] - backend_ms + t["postprocess"], "total": t["total"]}
    # preprocess and head CPU are not clocked apart: "other" is the CPU outside the backend
    cpu_stages = {"geometry": geometry_cpu, "network": backend_cpu - geometry_cpu,
                  "other": cpu - backend_cpu, "total": cpu}
    return stages, cpu_stages, prediction


def _torch_gemm(predictor: Predictor, frame: Frame) -> tuple[float, float]:
    """(dense GEMM ms, predict ms) of one predict under torch's (autograd) profiler."""
    return torch_gemm_ms(lambda: predictor.predict([frame]))


def torch_gemm_ms(run: Callable[[], object]) -> tuple[float, float]:
    """(dense GEMM ms, total ms) of one call of ``run`` under torch's (autograd) profiler."""
    # the autograd profiler, not torch.profiler: that one imports torch._inductor (seconds)
    with torch.autograd.profiler.profile() as prof:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    gemm_us = 0.0
    for event in prof.function_events:
        if event.name not in TORCH_GEMM_OPS:
            continue
        children = {c.name for c in event.cpu_children}
        if children & set(TORCH_GEMM_OPS) or "aten::_nnz" in children:
            continue  # a dispatcher layer above the kernel, or a sparse (CSR) product
        gemm_us += event.self_cpu_time_total
    return gemm_us / 1e3, 1e3 * total


def _ort_gemm(predictor: Predictor, frame: Frame) -> tuple[float, float]:
    """(MatMul/Gemm node ms, model run ms) of one run in onnxruntime's own profile."""
    import onnxruntime as ort

    from ..models.onnx_export import FEATS_INPUT, OUTPUT
    from ..preprocess import prepare_frames
    from ..runtime.backends import plan_for

    backend: Any = predictor.backend
    prepared = prepare_frames([frame], predictor.input_spec)
    plan = plan_for(prepared, backend.schema)
    feed = {FEATS_INPUT: prepared.feats}
    feed.update({n: t.numpy() for n, t in zip(backend.input_names[1:], plan.tensors(),
                                               strict=True)})
    with tempfile.TemporaryDirectory() as tmp:
        options = backend.session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(backend.path, options, providers=backend.providers)
        session.run([OUTPUT], feed)  # warm-up (allocations, kernel choices)
        session.run([OUTPUT], feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return ort_gemm_of_last_run(events)


def ort_gemm_of_last_run(events: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(MatMul/Gemm node ms, model run ms) of the *last* ``model_run`` in an onnxruntime
    profile: only the node events inside that run's time span count, so a warm-up run in the
    same profile adds nothing to either figure."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        return float("nan"), float("nan")
    last = max(runs, key=lambda e: e["ts"])
    start, end = last["ts"], last["ts"] + last["dur"]
    gemm = sum(e["dur"] for e in events if e.get("cat") == "Node"
               and e.get("name", "").endswith("_kernel_time")
               and e.get("args", {}).get("op_name") in ORT_GEMM_OPS
               and start <= e["ts"] and e["ts"] + e["dur"] <= end)
    return gemm / 1e3, last["dur"] / 1e3


def _summary(runs: list[dict[str, float]], cpu_runs: list[dict[str, float]]
             ) -> dict[str, Any]:
    totals = [r["total"] for r in runs]
    return {"stages_ms": {s: statistics.median(r[s] for r in runs) for s in STAGES},
            "total_ms": {"p50": statistics.median(totals), "min": min(totals),
                         "max": max(totals)},
            "thread_cpu_ms": {s: statistics.median(r[s] for r in cpu_runs)
                              for s in cpu_runs[0]},
            "runs": runs}


def bench_predictor_frame(frame: Frame, *, backends: Sequence[str] = ("torch", "onnxruntime"),
                          repeat: int = 7, warmup: int = 1, threads: int = 0, cr: float = 0.5,
                          voxel: float = 0.1, features: Sequence[str] = FEATURES,
                          gemm: bool = True, malloc: str = "node", sgemm_size: int = 2048,
                          device: str = "cpu", precisions: Sequence[str] = ("fp32",)
                          ) -> dict[str, Any]:
    """Per-stage medians of ``Predictor.predict([frame])`` per backend and precision (see the
    module): ``result["backends"][name][precision]`` holds the stage split and
    ``total_p50_ms``, and ``result["backends"][name]["<p>_over_<first>"]`` the median of the
    per-round ratios of each other precision's total to the first one's (all are timed in
    the same rounds). A precision a backend does not run on ``device`` is recorded as
    ``{"skipped": why}``.

    ``malloc="node"`` applies the node's glibc settings first (:func:`.apply_malloc`; they stay
    in effect for the rest of the process), ``"default"`` leaves glibc's. ``device`` is the
    predictors' device (``cpu``, ``cuda``, ...); the GEMM share is profiled on the CPU's clock.
    """
    from ..errors import ConfigError

    if not precisions or len(set(precisions)) != len(precisions) or "auto" in precisions:
        raise ConfigError("precision", f"want distinct precisions other than auto, got "
                          f"{list(precisions)}")
    malloc = apply_malloc(malloc)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    skipped: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = random_bundle(Path(tmp) / "model", cr=cr, voxel=voxel, features=features,
                               onnx=any(b != "torch" for b in backends))
        predictors: dict[tuple[str, str], Predictor] = {}
        for name in backends:
            for precision in precisions:
                try:
                    predictors[name, precision] = Predictor(bundle, backend=name, device=device,
                                                            precision=precision)
                except ConfigError as exc:
                    if exc.key != "precision":
                        raise
                    skipped[name, precision] = str(exc)
        if not predictors:
            raise ConfigError("precision", "; ".join(skipped.values()))
        geometry, backend_clock = StageClock(), StageClock()
        runs: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in predictors}
        cpu_runs: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in predictors}
        outputs: dict[tuple[str, str], Any] = {}
        calls = [t for p in predictors.values() for t in _instance_targets(p.backend)]
        with patched(geometry_targets(), geometry), patched(calls, backend_clock):
            for _ in range(warmup):
                for predictor in predictors.values():
                    _run(predictor, frame, geometry, backend_clock)
            for _ in range(max(1, repeat)):  # interleaved: every predictor once per round
                for key, predictor in predictors.items():
                    stages, cpu, outputs[key] = _run(predictor, frame, geometry,
                                                     backend_clock)
                    runs[key].append(stages)
                    cpu_runs[key].append(cpu)
        result: dict[str, Any] = {
            "points": frame.num_points, "cr": cr, "voxel": voxel, "features": list(features),
            "classes": CLASSES, "threads": threads, "device": device,
            "interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "malloc": malloc,
            "repeat": repeat, "warmup": warmup, "stages": list(STAGES),
            "precisions": list(precisions), "backends": {}}
        for name in backends:
            entry: dict[str, Any] = {}
            for precision in precisions:
                key = (name, precision)
                if key in skipped:
                    entry[precision] = {"skipped": skipped[key]}
                    continue
                predictor = predictors[key]
                summary = {"describe": predictor.backend.describe(),
                           **_summary(runs[key], cpu_runs[key])}
                summary["total_p50_ms"] = summary["total_ms"]["p50"]
                if gemm:
                    gemm_ms, total_ms = (_torch_gemm if name == "torch" else _ort_gemm)(
                        predictor, frame)
                    summary.update(gemm_ms=gemm_ms, gemm_profiled_ms=total_ms,
                                   gemm_share=gemm_ms / total_ms)
                entry[precision] = summary
            first = (name, precisions[0])
            for precision in precisions[1:]:
                if first in runs and (name, precision) in runs:
                    ratios = [r["total"] / b["total"]
                              for r, b in zip(runs[name, precision], runs[first], strict=True)]
                    entry[f"{precision}_over_{precisions[0]}"] = statistics.median(ratios)
            result["backends"][name] = entry
    first_out = next(iter(outputs.values()))
    result["voxels"] = int(np.unique(np.floor(first_out.prepared.coords).astype(np.int64),
                                     axis=0).shape[0])
    ref_key = ("torch", precisions[0])
    if ref_key in outputs and len(outputs) > 1:
        ref = outputs[ref_key]
        for (name, precision), out in outputs.items():
            if (name, precision) != ref_key:
                err = (out.features - ref.features).abs().max() / ref.features.abs().max()
                target = result["backends"][name][precision]
                target["labels_equal_torch"] = float(np.mean(out.labels.label
                                                             == ref.labels.label))
                target["features_max_rel_err_vs_torch"] = float(err)
    result["sgemm_gflops"] = sgemm_gflops(n=sgemm_size)
    result["sgemm_size"] = sgemm_size
    result["loadavg_1min"] = [load_before[0], os.getloadavg()[0]]
    return result


def bench_predictor(bag: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`bench_predictor_frame` on the first frame of ``bag``."""
    frame = first_frame(Path(bag))
    return {"bag": str(bag), "stamp_ns": frame.stamp_ns,
            **bench_predictor_frame(frame, **kwargs)}


def format_table(result: dict[str, Any]) -> str:
    """The per-stage medians, backends and precisions side by side (markdown)."""
    cols = [(n, p) for n, entry in result["backends"].items() for p in result["precisions"]
            if "stages_ms" in entry[p]]
    heads = [f"{n} {p}" for n, p in cols]
    lines = [f"| stage (ms, p50) | {' | '.join(heads)} |", "|---|" + "---|" * len(cols)]
    for stage in STAGES:
        cells = [f"{result['backends'][n][p]['stages_ms'][stage]:.1f}" for n, p in cols]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    if all("gemm_share" in result["backends"][n][p] for n, p in cols):
        cells = [f"{100 * result['backends'][n][p]['gemm_share']:.0f}%" for n, p in cols]
        lines.append(f"| GEMM share | {' | '.join(cells)} |")
    ratios = [f"{n} {k.replace('_', ' ')} {v:.2f}" for n, entry in result["backends"].items()
              for k, v in entry.items() if "_over_" in k]
    lines.append(f"\n{result['points']} points, {result['voxels']} voxels, cr {result['cr']}, "
                 f"{result['threads']} threads, {result['malloc']} malloc, "
                 f"sgemm {result['sgemm_gflops']:.1f} GFLOP/s, "
                 f"load {result['loadavg_1min'][0]:.1f} -> {result['loadavg_1min'][1]:.1f}"
                 + (f"; {', '.join(ratios)}" if ratios else ""))
    return "\n".join(lines)
