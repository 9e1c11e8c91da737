"""ONNX export (kernel maps as inputs), the onnxruntime and TensorRT backends, the engine cache."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from clip2scene_ros.cli import main as cli
from clip2scene_ros.errors import IntegrityError
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.onnx_export import export_bundle
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.runtime.engine_cache import EngineCache, EngineKey, engine_cache_dir
from clip2scene_ros.runtime.predictor import Predictor

VOCAB = VocabularySpec("three", ("road", "car", "tree"), ((1, 1, 1), (2, 2, 2), (3, 3, 3)))
#: Operators an exported graph may hold: no scatter, no custom domain, no loops.
ALLOWED_OPS = {"Cast", "Concat", "Constant", "ConstantOfShape", "Div",
               "Gather", "Gemm", "Identity", "MatMul", "Mul", "Add", "ReduceSum", "Relu",
               "Reshape", "Shape", "Slice", "Unsqueeze"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    arch = ArchitectureSpec(cr=0.25, clip_dim=16)
    spec = BundleSpec(arch, InputSpec(voxel_size=0.2, features=("intensity", "z"),
                                      scale=(1 / 255, 1.0), max_points=20_000), VOCAB)
    model = SPVCNN(arch, in_channels=2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    bank = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    path = save_bundle(tmp_path_factory.mktemp("b") / "model", spec, model.state_dict(), bank)
    assert cli(["export", "--model", str(path)]) == 0
    return path


def frame(n: int, seed: int) -> Frame:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-30, -30, -2], [30, 30, 2], (n, 3)).astype(np.float32)
    xyz[: n // 4] = xyz[: n // 4] * 0.01 + 3.0  # a dense lump: voxels with many points
    return Frame(stamp_ns=1, frame_id="lidar", xyz=xyz,
                 intensity=rng.uniform(0, 255, n).astype(np.float32))


def test_export_is_standard_ops_with_dynamic_axes(bundle: Path) -> None:
    report = export_bundle(bundle)
    assert report["onnx_max_rel_err"] <= 1e-4
    graph = onnx.load(str(bundle / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    feats = graph.graph.input[0]
    assert feats.name == "feats" and feats.type.tensor_type.shape.dim[0].dim_param == "points"
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input)
    # batch norms folded; every index input int32 (TensorRT casts int64 before each Gather)
    assert "BatchNormalization" not in ops
    kinds = {i.type.tensor_type.elem_type for i in graph.graph.input[1:]}
    assert onnx.TensorProto.INT64 not in kinds and onnx.TensorProto.INT32 in kinds
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["clip2scene.index_dtype"] == "int32"


def test_index_dtype_is_int32_only_where_every_index_fits() -> None:
    from clip2scene_ros.models.onnx_export import index_dtype

    assert index_dtype(400_000) == torch.int32
    assert index_dtype(2**31 - 2) == torch.int32
    assert index_dtype(2**31 - 1) == torch.int64


@pytest.mark.parametrize("points", [1, 2, 777, 6000])
def test_onnxruntime_equals_torch(bundle: Path, points: int) -> None:
    f = frame(points, points)
    torch_out = Predictor(bundle, backend="torch", device="cpu").predict([f])
    ort_out = Predictor(bundle, backend="onnxruntime", device="cpu").predict([f])
    assert torch_out.features is not None and ort_out.features is not None
    err = (ort_out.features - torch_out.features).abs().max() / torch_out.features.abs().max()
    assert float(err) <= 1e-4
    same = ort_out.labels.label == torch_out.labels.label
    assert same.mean() >= 0.999  # argmax ties at 1e-7 may flip a point


def test_stale_or_foreign_graph_is_refused(bundle: Path, tmp_path: Path) -> None:
    predictor = Predictor(bundle, backend="torch", device="cpu")
    state = {k: v + 0.01 if v.is_floating_point() else v
             for k, v in predictor.bundle.state_dict.items()}
    other = save_bundle(tmp_path / "other", predictor.bundle.spec, state, predictor.text_bank)
    (other / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    with pytest.raises(IntegrityError, match="other weights"):
        Predictor(other, backend="onnxruntime", device="cpu")


def test_truncated_graph_is_refused_naming_the_file(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    raw = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match="truncated or not an ONNX file") as info:
        Predictor(copy, backend="onnxruntime", device="cpu")
    assert info.value.key == "model.onnx" and info.value.source == str(copy / "model.onnx")


def test_auto_uses_torch_on_cpu_and_says_why(bundle: Path, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    with caplog.at_level(logging.INFO, logger="clip2scene_ros.runtime.predictor"):
        predictor = Predictor(bundle, device="cpu")
    assert predictor.backend_name == "torch"
    assert sum("backend torch" in r.getMessage() for r in caplog.records) == 1


# --- engine cache (TensorRT-independent logic) -----------------------------------------------
KEY = EngineKey("abc", "10.3.0", "NVIDIA H100", "fp16", (1, 50_000, 200_000))


def test_one_engine_cache_default_for_node_and_predictor(tmp_path: Path) -> None:
    """The node's spelt-out cache folder is the one the predictor and backend default to."""
    from clip2scene_ros.node_params import NodeParams, resolve_paths

    bundle = tmp_path / "model"
    assert engine_cache_dir(bundle) == bundle / "engines"
    assert engine_cache_dir(bundle, "") == bundle / "engines"
    assert engine_cache_dir(bundle, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    resolved = resolve_paths(NodeParams(model_path=str(bundle)))
    assert resolved.engine_cache_dir == str(engine_cache_dir(bundle.resolve()))


def test_engine_cache_builds_once_then_reuses(tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    builds: list[EngineKey] = []

    def builder(path: Path, key: EngineKey) -> bytes:
        builds.append(key)
        return f"engine for {key.tensorrt_version} {key.precision}".encode()

    cache = EngineCache(tmp_path / "engines")
    data, path = cache.get(onnx_path, KEY, builder)
    assert data == b"engine for 10.3.0 fp16" and path.is_file() and len(builds) == 1
    assert cache.get(onnx_path, KEY, builder)[0] == data and len(builds) == 1
    fp32 = EngineKey(**{**KEY.__dict__, "precision": "fp32"})
    assert cache.paths(onnx_path, fp32)[0] != path  # precision is part of the key
    cache.get(onnx_path, fp32, builder)
    assert len(builds) == 2


@pytest.mark.parametrize("damage, reason", [
    ("corrupt", "checksum"),
    ("version", "tensorrt_version changed"),
    ("sidecar", "sidecar"),
])
def test_engine_cache_rebuilds_stale_engines_saying_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, reason: str) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    cache = EngineCache(tmp_path)
    calls = []

    def builder(path: Path, key: EngineKey) -> bytes:
        calls.append(key)
        return b"engine-bytes"

    _, engine = cache.get(onnx_path, KEY, builder)
    sidecar = engine.with_suffix(".json")
    if damage == "corrupt":
        engine.write_bytes(b"engine-BYTES")  # same size, other bytes (truncation: test_faults)
    elif damage == "version":  # a sidecar written by another TensorRT under the same name
        sidecar.write_text(sidecar.read_text().replace("10.3.0", "8.6.1"))
    else:
        sidecar.unlink()
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.runtime.engine_cache"):
        data, _ = cache.get(onnx_path, KEY, builder)
    assert data == b"engine-bytes" and len(calls) == 2
    assert any(reason in r.getMessage() for r in caplog.records)


def test_tensorrt_profile_covers_every_dynamic_input(bundle: Path) -> None:
    from clip2scene_ros.models.onnx_export import dynamic_axes, schema_from_json
    from clip2scene_ros.models.profile import axis_bound
    from clip2scene_ros.runtime.tensorrt_backend import profile_shapes

    shapes = profile_shapes(bundle / "model.onnx", (1, 100, 1000))
    graph = onnx.load(str(bundle / "model.onnx"))
    assert set(shapes) == {i.name for i in graph.graph.input}
    assert shapes["feats"] == ((1, 2), (100, 2), (1000, 2))  # (points, features)
    meta = {p.key: p.value for p in graph.metadata_props}
    axes = dynamic_axes(schema_from_json(meta["clip2scene.plan_schema"]))
    ratios = (1.0, 0.78, 0.55, 0.35, 0.2)
    for name, (low, opt, high) in shapes.items():
        assert low[0] == (0 if name.startswith("pool_") else 1)  # segment tables may be empty
        axis = axes[name][0]
        assert opt[0] == axis_bound(axis, 100, ratios) <= 100
        assert high[0] == axis_bound(axis, 1000, ratios) <= 1000
        assert low[1:] == opt[1:] == high[1:]
    assert shapes["conv_s16_k3_st1"][2][0] == 200  # stride 16: 0.2 voxels per point


@pytest.fixture
def bf16_units(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Set what the CPU probe answers (both modules that read it), with a fresh log-once."""
    from clip2scene_ros import precision as precision_module
    from clip2scene_ros.runtime import backends

    monkeypatch.setattr(backends, "_LOGGED", set())

    def answer(fast: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: fast)
        monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: fast)

    return answer


def test_auto_precision_is_the_devices_and_logged_once(
        bf16_units: Callable[[bool], None], caplog: pytest.LogCaptureFixture) -> None:
    from clip2scene_ros.runtime.backends import check_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16_units(False)  # this machine: no AMX, no AVX512-BF16
    with caplog.at_level(logging.INFO, logger="clip2scene_ros.runtime.backends"):
        assert check_precision("auto", "torch", cpu) == "fp32"
        assert check_precision("auto", "torch", cpu) == "fp32"
    said = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert said == ["precision auto -> fp32 (torch on cpu, CPU bf16 matrix units: no)"]
    bf16_units(True)
    assert check_precision("auto", "torch", cpu) == "bf16"
    assert check_precision("auto", "onnxruntime", cpu) == "fp32"  # the graph is fp32
    assert check_precision("auto", "torch", cuda) == "fp16"
    assert check_precision("auto", "tensorrt", cuda) == "fp16"
    assert check_precision("auto", "onnxruntime", cuda) == "fp32"


@pytest.mark.parametrize(("precision", "backend", "device", "supported"), [
    ("fp16", "torch", "cpu", "fp32, bf16"),
    ("fp16", "auto", "cpu", "fp32, bf16"),
    ("bf16", "torch", "cuda", "fp32, fp16"),
    ("bf16", "tensorrt", "cuda", "fp32, fp16"),
    ("bf16", "onnxruntime", "cpu", "fp32"),
    ("fp16", "onnxruntime", "cuda", "fp32"),
])
def test_a_precision_the_device_cannot_run_is_one_line(
        precision: str, backend: str, device: str, supported: str,
        bf16_units: Callable[[bool], None]) -> None:
    from clip2scene_ros.errors import ConfigError
    from clip2scene_ros.runtime.backends import check_precision

    bf16_units(True)
    with pytest.raises(ConfigError) as info:
        check_precision(precision, backend, torch.device(device))
    text = str(info.value)
    assert info.value.key == "precision" and "\n" not in text
    assert precision in text and f"(supported: {supported})" in text and device in text


def test_bf16_without_matrix_units_runs_but_says_it_is_slow(
        bf16_units: Callable[[bool], None], caplog: pytest.LogCaptureFixture) -> None:
    from clip2scene_ros.errors import ConfigError
    from clip2scene_ros.runtime.backends import check_precision

    bf16_units(False)
    with caplog.at_level(logging.INFO, logger="clip2scene_ros.runtime.backends"):
        assert check_precision("bf16", "torch", torch.device("cpu")) == "bf16"
        assert check_precision("bf16", "torch", torch.device("cpu")) == "bf16"
    slow = [r for r in caplog.records if "emulated, slower than fp32" in r.getMessage()]
    assert len(slow) == 1 and slow[0].levelno == logging.WARNING
    bf16_units(True)
    caplog.clear()
    assert check_precision("bf16", "torch", torch.device("cpu")) == "bf16"
    assert not [r for r in caplog.records if "emulated" in r.getMessage()]
    with pytest.raises(ConfigError, match="must be one of auto, fp32, bf16, fp16"):
        check_precision("half", "torch", torch.device("cpu"))
