"""The GPU path: the torch backend on the device against CPU fp32, autocast training steps, and
TensorRT build, cache, rebuild and parity where ``tensorrt`` imports.

Marked ``gpu``; ``make gpu-check`` runs them on CUDA. ``CLIP2SCENE_TEST_DEVICE=cpu`` runs them on
the CPU (the quick dry run CI uses), so they never rot on a machine without a GPU. They need
only torch, numpy, onnx, onnxruntime, safetensors and pyyaml: no rclpy, open_clip or Pillow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.onnx_export import export_bundle
from clip2scene_ros.models.spconv_twin import random_spvcnn
from clip2scene_ros.runtime.predictor import Predictor

pytestmark = pytest.mark.gpu

VOCAB = VocabularySpec("eight", tuple(f"c{i}" for i in range(8)),
                       tuple((i, i, i) for i in range(8)))


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("CLIP2SCENE_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CLIP2SCENE_TEST_DEVICE=cpu runs these on the CPU)")
    return torch.device(name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = random_spvcnn(0.25, in_channels=2, seed=0)
    spec = BundleSpec(ArchitectureSpec(cr=0.25), InputSpec(
        voxel_size=0.1, features=("intensity", "z"), scale=(1 / 255, 1.0), max_points=60_000),
        VOCAB)
    bank = torch.nn.functional.normalize(torch.randn(
        8, spec.architecture.clip_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return save_bundle(tmp_path_factory.mktemp("gpu") / "model", spec, net.state_dict(), bank)


def scan(points: int, seed: int = 0) -> Frame:
    """A street-like cloud: a ground ring, walls and a dense lump."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(2, 40, points)
    a = rng.uniform(0, 2 * np.pi, points)
    z = np.where(rng.random(points) < 0.6, -1.7, rng.uniform(-1.7, 3, points))
    xyz = np.stack([r * np.cos(a), r * np.sin(a), z], 1).astype(np.float32)
    xyz[: points // 10] = rng.normal([6, 2, 0], 0.3, (points // 10, 3))
    return Frame(stamp_ns=1, frame_id="lidar", xyz=xyz,
                 intensity=rng.uniform(0, 255, points).astype(np.float32))


def on_cpu() -> bool:
    return os.environ.get("CLIP2SCENE_TEST_DEVICE", "cuda") == "cpu"


def points() -> int:
    """Clouds of a real scan's size on a GPU; small ones keep the CPU dry run quick."""
    return 3_000 if on_cpu() else 30_000


@pytest.mark.parametrize(("precision", "agree", "bound"), [("fp32", 0.995, 1e-3),
                                                           ("reduced", 0.99, 3e-2)])
def test_torch_backend_on_the_device_agrees_with_cpu_fp32(
        bundle: Path, device: torch.device, precision: str, agree: float, bound: float) -> None:
    if precision == "reduced":  # fp16 on CUDA; a CPU refuses fp16 and runs bf16
        precision = "fp16" if device.type == "cuda" else "bf16"
    f = scan(points())
    ref = Predictor(bundle, backend="torch", device="cpu", precision="fp32").predict([f])
    out = Predictor(bundle, backend="torch", device=str(device), precision=precision,
                    count_syncs=True).predict([f])
    assert out.features is not None and ref.features is not None
    assert out.features.device.type == device.type
    same = float(np.mean(out.labels.label == ref.labels.label))
    err = float((out.features.cpu() - ref.features).abs().max() / ref.features.abs().max())
    assert same >= agree and err <= bound, (same, err)
    # 11 on a CPU (test_sparse_host_reads.py pins them): kernel-map counts, one input check,
    # the logits; a little room for what only a device adds
    assert out.host_syncs is not None and out.host_syncs <= 16


def test_geometry_and_plan_are_made_on_the_device(bundle: Path, device: torch.device) -> None:
    from clip2scene_ros.models.spvcnn import plan_schema
    from clip2scene_ros.runtime.backends import plan_for
    from clip2scene_ros.runtime.device_io import upload_cloud

    predictor = Predictor(bundle, backend="torch", device=str(device))
    prepared = predictor.predict([scan(2000)]).prepared
    coords, feats = upload_cloud(prepared, device)
    assert coords.device.type == feats.device.type == device.type
    plan = plan_for(prepared, plan_schema(60_000), coords=coords)
    assert {t.device.type for t in plan.tensors()} == {device.type}
    assert {t.dtype for t in plan.tensors() if not t.is_floating_point()} == {torch.int32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_steps(device: torch.device, dtype: torch.dtype) -> None:
    from clip2scene_ros.sparse.tensor import PointTensor

    torch.manual_seed(0)
    net = random_spvcnn(0.25, in_channels=2, seed=1).to(device).train()
    optim = torch.optim.SGD(net.parameters(), lr=0.01)
    # a modest initial scale: the first fp16 steps would otherwise overflow and be skipped
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0,
                                  enabled=dtype == torch.float16)
    f = scan(600 if on_cpu() else points(), seed=3)  # CPU autocast is emulated: slow
    coords = torch.from_numpy(f.xyz / 0.1).to(device)
    feats = torch.stack([torch.from_numpy(f.intensity) / 255, torch.from_numpy(f.xyz[:, 2])],
                        1).to(device)
    target = torch.randint(0, 8, (len(coords),), device=device)
    bank = torch.nn.functional.normalize(torch.randn(8, 512, device=device), dim=1)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(2):
        optim.zero_grad()
        with torch.autocast(device.type, dtype=dtype):
            out = net.text_features(PointTensor(feats, coords))
            loss = torch.nn.functional.cross_entropy((out.float() @ bank.T) * 10, target)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
        assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def _tensorrt_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "TensorRT runs on CUDA only"
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    return None


@pytest.mark.parametrize(("precision", "bound"), [("fp32", 1e-3), ("fp16", 3e-2)])
def test_tensorrt_build_cache_rebuild_and_parity(
        bundle: Path, device: torch.device, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        precision: str, bound: float) -> None:  # pragma: no cover - GPU machines only
    reason = _tensorrt_reason(device)
    if reason:
        pytest.skip(reason)
    export_bundle(bundle)  # idempotent: the same graph for the same weights
    f = scan(points())
    ref = Predictor(bundle, backend="torch", device="cpu", precision="fp32").predict([f])
    trt = Predictor(bundle, backend="tensorrt", device=str(device), precision=precision,
                    engine_cache=tmp_path)
    out = trt.predict([f])
    assert out.features is not None and ref.features is not None
    err = float((out.features.cpu() - ref.features).abs().max() / ref.features.abs().max())
    assert err <= bound and np.mean(out.labels.label == ref.labels.label) >= 0.99
    engine = next(tmp_path.glob("*.engine"))
    assert list(tmp_path.glob("timing-*.cache"))
    with caplog.at_level(logging.INFO):
        Predictor(bundle, backend="tensorrt", device=str(device), precision=precision,
                  engine_cache=tmp_path)
    assert any("using cached" in r.getMessage() for r in caplog.records)
    engine.write_bytes(b"\0" * engine.stat().st_size)  # damaged in place
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = Predictor(bundle, backend="tensorrt", device=str(device), precision=precision,
                          engine_cache=tmp_path).predict([f])
    assert any("building" in r.getMessage() for r in caplog.records)
    assert again.features is not None
    assert float((again.features - out.features).abs().max()) <= bound * float(
        out.features.abs().max())
