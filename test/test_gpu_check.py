"""``make gpu-check``: its CPU dry run end to end (as CI runs it) on a Python where rclpy,
open_clip and TensorRT cannot be imported, the GPU path without Pillow and rosbags either, and
the pieces the check is made of."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_ros.tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent
#: What a GPU machine with only the GPU check's requirements lacks. rosbags and Pillow come
#: as wheels there to read the bag, so the dry run keeps them; the GPU path itself runs without
#: them (test_gpu_path_runs_without_pillow_or_rosbags).
BLOCKED = ("rclpy", "open_clip", "tensorrt", "matplotlib", "torchvision", "tqdm", "spconv",
           "tensorboard", "trimesh")

#: Hides the blocked packages from the path finder, so they look uninstalled: ``import`` fails
#: and ``importlib.util.find_spec`` answers None, as on a machine without them.
SITECUSTOMIZE = textwrap.dedent("""
    import importlib.machinery, os, sys
    BLOCKED = set(os.environ["CLIP2SCENE_BLOCK_IMPORTS"].split(","))
    class _Hidden(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return super().find_spec(name, path, target)
    sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
""")


def blocked_env(tmp_path: Path, blocked: tuple[str, ...] = BLOCKED) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(site), "CLIP2SCENE_BLOCK_IMPORTS": ",".join(blocked)}


GPU_PATH = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import numpy as np
    from clip2scene_ros.frame import Frame
    from clip2scene_ros.runtime import tensorrt_backend  # importable without tensorrt
    from clip2scene_ros.runtime.predictor import Predictor
    from clip2scene_ros.tools import gpu_check
    bundle = gpu_check.random_bundle(Path(tempfile.mkdtemp()) / "m", 3, onnx=True, cr=0.25)
    key = gpu_check.thin(gpu_check.keyframe(None)[0], 800)
    out = Predictor(bundle, device="cpu", count_syncs=True).predict(
        [key, *gpu_check.past_sweeps(key, 2)])
    assert out.host_syncs and out.labels.label.shape == (key.num_points,)
    print("absent:", sorted(m for m in ("PIL", "rosbags", "rclpy", "open_clip", "tensorrt")
                            if m in sys.modules))
""")


def test_gpu_path_runs_without_pillow_or_rosbags(tmp_path: Path) -> None:
    env = blocked_env(tmp_path, (*BLOCKED, "PIL", "rosbags"))
    proc = subprocess.run([sys.executable, "-c", GPU_PATH], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "absent: []" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_dry_run_passes_without_rclpy_open_clip_or_tensorrt(tmp_path: Path) -> None:
    env = blocked_env(tmp_path)
    for name in ("open_clip", "rclpy", "rosbags"):  # the block is in force (rosbags kept)
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env,
                               capture_output=True, text=True, check=False)
        blocked = name != "rosbags"
        assert (probe.returncode != 0) == blocked, probe.stderr
        assert ("No module named" in probe.stderr) == blocked
    out = tmp_path / "out"
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "DEVICE=cpu",
                           f"GPU_CHECK_OUT={out}", f"GPU_PYTHON={sys.executable}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["environment"]["device"] == "cpu"
    tests = summary["tests"]
    assert tests["returncode"] == 0 and tests["failures"] == tests["errors"] == 0
    assert tests["passed"] >= 5, (out / "tests.log").read_text()[-2000:]
    for name in ("keyframe", "sweeps3"):
        entry = summary["latency"]["inputs"][name]
        assert "torch_fp16" not in entry  # fp16 needs CUDA
        for run in ("torch_fp32",):
            result = entry[run]
            assert "error" not in result, result
            assert result["labels_agree_cpu_fp32"] == 1.0 and result["p50_ms"] > 0
            assert isinstance(result["host_syncs"], int) and result["host_syncs"] >= 1
    assert summary["latency"]["inputs"]["sweeps3"]["sweeps"] == 3
    bench = summary["bench_predictor"]
    if "skipped" not in bench:  # rosbags here: the command ran on the keyframe bag
        (run,) = bench["runs"].values()
        assert run["returncode"] == 0, run
        assert run["points"] == 34_688 and "geometry" in run["backends"]["torch"]["stages_ms"]
    assert "targets" not in summary  # the targets are an H100's, not checked on a CPU
    assert "gpu-check: summary in" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_stops_with_one_line(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'cuda' requested" in err and "no CUDA device" in err
    assert not (tmp_path / "summary.json").exists()


def test_past_sweeps_land_on_the_key_frame_after_ego_motion() -> None:
    from clip2scene_ros.models.bundle import InputSpec
    from clip2scene_ros.preprocess import prepare_frames

    key, _ = gpu_check.keyframe(None)  # the synthetic stand-in
    key = gpu_check.thin(key, 1000)
    frames = [key, *gpu_check.past_sweeps(key, 2)]
    merged = prepare_frames(frames, InputSpec(voxel_size=1.0, features=("intensity",),
                                              sweeps=3))
    n = key.num_points
    assert merged.num_points == 3 * n
    for sweep in (1, 2):  # the same world points, 3 cm noise
        rows = merged.sweep == sweep
        assert np.abs(merged.coords[rows] - merged.coords[: n]).max() < 0.2


def test_targets_are_checked_against_the_fp16_torch_runs() -> None:
    measured = {"inputs": {"keyframe": {"torch_fp16": {"p50_ms": 12.0,
                                                       "labels_agree_cpu_fp32": 0.99}},
                           "sweeps3": {"torch_fp16": {"error": "out of memory"}}}}
    targets = gpu_check.check_targets(measured)
    assert targets["keyframe_fp16_p50_ms"]["met"] is True
    assert targets["labels_agree_min"]["met"] is False  # 99.0 % < 99.5 %
    assert targets["sweeps3_fp16_p50_ms"] == {"value": None, "target": "<= 25.0", "met": None}
