"""``make gpu-check``: the GPU path measured in one command, with a JSON summary.

On a machine with an NVIDIA GPU (``--device cuda``, the default) it runs, in order:

1. the GPU-marked tests (``test/test_gpu.py``: the torch backend on the device against CPU fp32,
   bf16/fp16 autocast training steps, TensorRT build, cache, rebuild and parity where
   ``tensorrt`` imports), with ``CLIP2SCENE_TEST_DEVICE`` set to the device;
2. ``clip2scene bench predictor`` on the nuScenes keyframe bag (its stage split), with
   ``--device``/``--precision`` when the command offers them (on a CUDA device it is skipped,
   saying why, when it has no ``--device``: its figures would be the CPU's);
3. end-to-end ``Predictor.predict`` latency (plan included) on the device, on the nuScenes
   keyframe (1 sweep) and on a 3-sweep nuScenes-size input (the keyframe and two past sweeps
   moved by ego motion), in fp32 and fp16, torch backend and TensorRT when it imports: p50/p90,
   the predictor's stage split, host <-> device syncs per frame, and label agreement with CPU
   fp32;

and writes ``<out>/summary.json`` (with the targets below checked on CUDA). ``--device cpu`` is
the dry run: the same steps on small inputs, quick enough for CI.

It needs only torch, numpy, onnx, onnxruntime, safetensors, pyyaml and pytest (hypothesis for
the test suite's plugins): no TensorRT, rclpy, open_clip, Pillow or network. Step 2 also needs
``rosbags`` and Pillow to read the bag (its camera images are decoded with the cloud); on a
machine without them, put their wheels (``pip download rosbags pillow -d wheels`` on a networked
machine with the same Python and platform; installed, they and their dependencies take about
35 MB, well under the 64 MiB a carried working tree may hold) in ``wheels/`` at the repository
root, and this script installs them with ``pip install --no-index --find-links wheels rosbags
pillow``; without either, step 2 is skipped and says so. The real data is looked for in
``../shared/data`` and ``shared/data`` beside the repository (``--data`` to name it); without
it a synthetic cloud of the keyframe's size stands in, and the summary says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..frame import Frame
from ..models.bundle import ArchitectureSpec, BundleSpec, InputSpec, VocabularySpec, save_bundle

ROOT = Path(__file__).resolve().parents[2]
#: What an H100 should reach (fp16, torch backend, plan included).
TARGETS = {"keyframe_fp16_p50_ms": 15.0, "sweeps3_fp16_p50_ms": 25.0, "labels_agree_min": 0.995}
FEATURES = ("x", "y", "z", "intensity")
CLASSES = 16
#: Points of the nuScenes keyframe (the synthetic stand-in has as many).
KEYFRAME_POINTS = 34_688
#: Points per sweep in the CPU dry run (small: it runs in CI).
DRY_RUN_POINTS = 1_500
TEST_INI = """[pytest]
markers =
    slow: takes more than a few seconds
    gpu: the GPU path
"""


def find_data(given: str | None) -> Path | None:
    candidates = [Path(given)] if given else [ROOT.parent / "shared" / "data",
                                              ROOT / "shared" / "data"]
    return next((p for p in candidates if (p / "nuscenes_keyframe").is_dir()), None)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
        "machine": platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for module in ("tensorrt", "onnxruntime", "onnx", "rosbags"):
        try:
            env[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            env[module] = None
    if env["onnxruntime"]:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


def run_tests(device: torch.device, out: Path, timeout: float) -> dict[str, Any]:
    """The GPU-marked tests in a pytest of their own (no plugins beyond pytest's own)."""
    ini = out / "pytest-gpu.ini"
    ini.write_text(TEST_INI)
    report = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-c", str(ini), "--rootdir",
           str(ROOT), "-p", "no:cacheprovider", f"--junitxml={report}", "-ra",
           str(ROOT / "test" / "test_gpu.py")]
    env = {**os.environ, "CLIP2SCENE_TEST_DEVICE": str(device)}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    result: dict[str, Any] = {"returncode": proc.returncode,
                              "seconds": round(time.monotonic() - start, 1),
                              "log": str(out / "tests.log")}
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"]
                      - counts["skipped"])
        result["cases"] = {f"{c.get('name')}": _outcome(c) for c in suite.iter("testcase")}
    return result


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        if case.find(tag) is not None:
            return tag
    skipped = case.find("skipped")
    return f"skipped: {skipped.get('message', '')}" if skipped is not None else "passed"


#: What reading the keyframe bag needs beyond the GPU check's own requirements: module ->
#: pip name (rosbags reads the bag, Pillow decodes its camera images).
BAG_PACKAGES = {"rosbags": "rosbags", "PIL": "pillow"}


def ensure_bag_packages(wheels: Path) -> str | None:
    """None when the bag can be read (installing :data:`BAG_PACKAGES` from ``wheels`` where
    missing), else why not."""
    missing = [pip for module, pip in BAG_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    if not wheels.is_dir():
        return (f"{', '.join(missing)} not installed and {wheels} is absent (pip download "
                f"{' '.join(missing)} -d wheels on a networked machine with the same Python)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                           str(wheels), *missing], capture_output=True, text=True, check=False)
    importlib.invalidate_caches()
    if proc.returncode or any(importlib.util.find_spec(m) is None for m in BAG_PACKAGES):
        return f"{', '.join(missing)} did not install from {wheels}: {proc.stderr.strip()[-300:]}"
    return None


def run_bench(device: torch.device, data: Path | None, out: Path, wheels: Path, repeat: int,
              tensorrt: bool) -> dict[str, Any]:
    """``clip2scene bench predictor`` on the keyframe bag, per precision it offers."""
    if data is None:
        return {"skipped": "the nuScenes keyframe bag is absent (--data)"}
    why = ensure_bag_packages(wheels)
    if why:
        return {"skipped": why}
    base = [sys.executable, "-m", "clip2scene_ros.cli", "bench", "predictor"]
    help_text = subprocess.run([*base, "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=False).stdout
    has_device, has_precision = "--device" in help_text, "--precision" in help_text
    if device.type != "cpu" and not has_device:
        return {"skipped": "clip2scene bench predictor has no --device option, so its stage "
                "split would be the CPU's; the device latency is in 'latency'"}
    backends = "torch,tensorrt" if tensorrt and device.type == "cuda" else "torch"
    runs: dict[str, Any] = {}
    # one call times every precision in the same rounds (fp16 runs on CUDA only)
    precisions = ("fp32", "fp16") if device.type == "cuda" else ("fp32",)
    target = out / "bench_predictor.json"
    cmd = [*base, "--bag", str(data / "nuscenes_keyframe" / "bag_mcap"), "--backends",
           backends, "--repeat", str(repeat), "--json", str(target), "--sgemm-size",
           "4096" if device.type == "cuda" else "256",
           # the dry run only checks that the command runs: a narrow network is enough
           "--cr", "0.5" if device.type == "cuda" else "0.125"]
    if has_device:
        cmd += ["--device", str(device)]
    if has_precision:
        cmd += ["--precision", ",".join(precisions)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    result = json.loads(target.read_text()) if proc.returncode == 0 and target.is_file() else None
    for precision in precisions if has_precision else ("default",):
        entry: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode}
        if result is not None:
            entry["backends"] = {
                name: {k: b[k] for k in ("stages_ms", "total_ms")}
                for name, entries in result["backends"].items()
                for b in [entries.get(precision, entries)] if "stages_ms" in b}
            entry["points"], entry["voxels"] = result["points"], result["voxels"]
            entry["over_fp32"] = {name: entries[f"{precision}_over_fp32"]
                                  for name, entries in result["backends"].items()
                                  if f"{precision}_over_fp32" in entries}
        else:
            entry["error"] = (proc.stderr or proc.stdout).strip()[-600:]
        runs[precision] = entry
    return {"device_option": has_device, "precision_option": has_precision, "runs": runs}


def keyframe(data: Path | None) -> tuple[Frame, str]:
    """The nuScenes keyframe scan, or a synthetic cloud of its size when the data is absent."""
    if data is not None:
        (scan,) = (data / "nuscenes_keyframe").glob("*LIDAR_TOP*.pcd.bin")
        raw = np.fromfile(scan, np.float32).reshape(-1, 5)
        xyz, intensity, source = raw[:, :3].copy(), raw[:, 3].copy(), scan.name
    else:
        rng = np.random.default_rng(0)
        ring = rng.integers(0, 32, KEYFRAME_POINTS)
        azimuth = rng.uniform(-np.pi, np.pi, KEYFRAME_POINTS)
        pitch = np.deg2rad(-30.67 + 1.33 * ring)  # HDL-32E beams
        rng_m = np.clip(-1.8 / np.minimum(np.sin(pitch), -0.02), 1.0, 70.0)
        rng_m = np.where(rng.random(KEYFRAME_POINTS) < 0.3, rng.uniform(2, 30, KEYFRAME_POINTS),
                         rng_m)
        xyz = np.stack([rng_m * np.cos(pitch) * np.cos(azimuth),
                        rng_m * np.cos(pitch) * np.sin(azimuth), rng_m * np.sin(pitch)],
                       1).astype(np.float32)
        intensity = rng.uniform(0, 100, KEYFRAME_POINTS).astype(np.float32)
        source = "synthetic (the nuScenes keyframe is absent)"
    pose = np.eye(4)
    return Frame(stamp_ns=1_532_402_927_647_951_000, frame_id="LIDAR_TOP", xyz=xyz,
                 intensity=intensity, pose=pose), source


def past_sweeps(key: Frame, count: int, seed: int = 0) -> list[Frame]:
    """``count`` past sweeps of ``key``'s size: its points re-sampled with 3 cm noise, seen from
    0.5 m further back per 50 ms sweep (20 Hz, ~10 m/s), so ego motion moves them back."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, count + 1):
        pose = np.eye(4)
        pose[0, 3] = -0.5 * i
        xyz = key.xyz + rng.normal(0, 0.03, key.xyz.shape).astype(np.float32)
        xyz[:, 0] += 0.5 * i  # the same world points, in a sensor frame 0.5 m further back
        out.append(Frame(stamp_ns=key.stamp_ns - i * 50_000_000, frame_id=key.frame_id,
                         xyz=xyz.astype(np.float32), intensity=key.intensity, pose=pose))
    return out


def thin(frame: Frame, points: int) -> Frame:
    step = max(1, frame.num_points // points)
    return Frame(stamp_ns=frame.stamp_ns, frame_id=frame.frame_id, xyz=frame.xyz[::step].copy(),
                 intensity=None if frame.intensity is None else frame.intensity[::step].copy(),
                 pose=frame.pose)


def random_bundle(path: Path, sweeps: int, onnx: bool, cr: float = 0.5) -> Path:
    """A seeded random SPVCNN bundle (as ``clip2scene bench predictor`` uses) for ``sweeps``."""
    from ..files import file_sha256
    from ..models.bundle import ONNX_FILE, WEIGHTS_FILE
    from ..models.onnx_export import WEIGHTS_KEY, export_onnx
    from ..models.spconv_twin import random_spvcnn

    net = random_spvcnn(cr, in_channels=len(FEATURES), seed=0)
    bank = torch.nn.functional.normalize(torch.randn(
        CLASSES, net.spec.clip_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    vocab = VocabularySpec(f"random{CLASSES}", tuple(f"class{i}" for i in range(CLASSES)),
                           tuple((i * 15, 255 - i * 15, 128) for i in range(CLASSES)))
    spec = BundleSpec(ArchitectureSpec(cr=cr), InputSpec(voxel_size=0.1, features=FEATURES,
                                                         sweeps=sweeps), vocab)
    path = save_bundle(path, spec, net.state_dict(), bank, overwrite=True)
    if onnx:
        export_onnx(net, path / ONNX_FILE, max_points=spec.input.max_points,
                    metadata={WEIGHTS_KEY: file_sha256(path / WEIGHTS_FILE)})
    return path


def latency(predictor: Any, frames: list[Frame], ref: Any, warmup: int, repeat: int
            ) -> dict[str, Any]:
    """Timings of ``predictor.predict(frames)`` (warm), its syncs, and agreement with ``ref``."""
    from ..runtime.predictor import Predictor

    assert isinstance(predictor, Predictor)
    for _ in range(warmup):
        predictor.predict(frames)
    runs = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = predictor.predict(frames)
        runs.append((1e3 * (time.perf_counter() - start), out.timings_ms))
    predictor.count_syncs = True
    counted = predictor.predict(frames)
    predictor.count_syncs = False
    totals = sorted(t for t, _ in runs)
    stages = {s: statistics.median(t[s] for _, t in runs)
              for s in ("preprocess", "inference", "postprocess")}
    agree = float(np.mean(counted.labels.label == ref.labels.label))
    assert counted.logits is not None and ref.logits is not None
    err = float((counted.logits - ref.logits).abs().max() / ref.logits.abs().max())
    return {"p50_ms": statistics.median(totals), "p90_ms": totals[int(0.9 * (len(totals) - 1))],
            "min_ms": totals[0], "runs": len(totals), "stages_ms": stages,
            "host_syncs": counted.host_syncs, "labels_agree_cpu_fp32": agree,
            "logits_max_rel_err": err, "points": counted.prepared.num_points,
            "dropped": dict(counted.prepared.dropped)}


def measure(device: torch.device, data: Path | None, out: Path, repeat: int, warmup: int,
            tensorrt: bool) -> dict[str, Any]:
    from ..runtime.predictor import Predictor

    key, source = keyframe(data)
    if device.type == "cpu":
        key = thin(key, DRY_RUN_POINTS)
    inputs = {"keyframe": (1, [key]), "sweeps3": (3, [key, *past_sweeps(key, 2)])}
    backends = ["torch", *(["tensorrt"] if tensorrt and device.type == "cuda" else [])]
    result: dict[str, Any] = {"source": source, "inputs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (sweeps, frames) in inputs.items():
            bundle = random_bundle(Path(tmp) / f"model{sweeps}", sweeps, "tensorrt" in backends,
                                   cr=0.25 if device.type == "cpu" else 0.5)
            ref = Predictor(bundle, backend="torch", device="cpu", precision="fp32"
                            ).predict(frames)
            entry: dict[str, Any] = {"sweeps": sweeps,
                                     "input_points": sum(f.num_points for f in frames)}
            for backend in backends:
                # fp16 needs CUDA (on a CPU it is refused)
                for precision in ("fp32", "fp16") if device.type == "cuda" else ("fp32",):
                    label = f"{backend}_{precision}"
                    try:
                        start = time.monotonic()
                        predictor = Predictor(bundle, backend=backend, device=str(device),
                                              precision=precision,
                                              engine_cache=out / "engines" / name)
                        setup = time.monotonic() - start
                        entry[label] = {"setup_s": round(setup, 2), "describe":
                                        predictor.backend.describe(),
                                        **latency(predictor, frames, ref, warmup, repeat)}
                    except Exception as exc:
                        entry[label] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            result["inputs"][name] = entry
    return result


def check_targets(measured: dict[str, Any]) -> dict[str, Any]:
    inputs = measured["inputs"]
    key = inputs["keyframe"].get("torch_fp16", {})
    sweeps = inputs["sweeps3"].get("torch_fp16", {})
    checks = {
        "keyframe_fp16_p50_ms": (key.get("p50_ms"), TARGETS["keyframe_fp16_p50_ms"], "<="),
        "sweeps3_fp16_p50_ms": (sweeps.get("p50_ms"), TARGETS["sweeps3_fp16_p50_ms"], "<="),
        "labels_agree_min": (key.get("labels_agree_cpu_fp32"), TARGETS["labels_agree_min"],
                             ">="),
    }
    out = {}
    for name, (value, bound, op) in checks.items():
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"gpu-check on {summary['environment'].get('gpu', summary['environment']['device'])}"
             f" ({summary['seconds']:.0f} s)"]
    tests = summary.get("tests", {})
    if "tests" in tests:
        lines.append(f"tests: {tests['passed']} passed, {tests['failures']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped")
    lines.append("| input | run | p50 ms | p90 ms | syncs | labels = CPU fp32 |")
    lines.append("|---|---|---|---|---|---|")
    for name, entry in summary.get("latency", {}).get("inputs", {}).items():
        for run, value in entry.items():
            if not isinstance(value, dict):
                continue
            if "error" in value:
                lines.append(f"| {name} | {run} | error: {value['error'][:80]} | | | |")
                continue
            lines.append(f"| {name} | {run} | {value['p50_ms']:.1f} | {value['p90_ms']:.1f} | "
                         f"{value['host_syncs']} | {100 * value['labels_agree_cpu_fp32']:.2f}% |")
    for name, check in summary.get("targets", {}).items():
        lines.append(f"target {name}: {check['value']} {check['target']} -> {check['met']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    parser.add_argument("--out", default="build/gpu-check", help="folder for summary.json")
    parser.add_argument("--data", help="the real data folder (default: ../shared/data)")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"),
                        help="wheels to install rosbags and Pillow from when missing")
    parser.add_argument("--repeat", type=int, help="timed runs per setting (default 30 on a "
                        "GPU, 1 on the CPU)")
    parser.add_argument("--skip-tests", action="store_true", help="no GPU-marked tests")
    args = parser.parse_args(argv)
    from ..errors import ConfigError
    from ..runtime.predictor import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    dry = device.type == "cpu"
    repeat = args.repeat or (1 if dry else 30)
    warmup = 0 if dry else 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = find_data(args.data)
    tensorrt = importlib.util.find_spec("tensorrt") is not None
    start = time.monotonic()
    summary: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": dry, "environment": environment(device),
        "data": str(data) if data else None, "targets_defined": TARGETS}
    steps = {
        "tests": lambda: ({"skipped": "--skip-tests"} if args.skip_tests
                          else run_tests(device, out, timeout=420)),
        "bench_predictor": lambda: run_bench(device, data, out, Path(args.wheels),
                                             1 if dry else 10, tensorrt),
        "latency": lambda: measure(device, data, out, repeat, warmup, tensorrt),
    }
    failed = False
    for name, step in steps.items():
        t0 = time.monotonic()
        try:
            summary[name] = step()
        except Exception as exc:
            summary[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            failed = True
        print(f"gpu-check: {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    tests = summary["tests"]
    failed = failed or tests.get("returncode", 0) != 0
    if not dry and "inputs" in summary["latency"]:
        summary["targets"] = check_targets(summary["latency"])
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"gpu-check: summary in {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
