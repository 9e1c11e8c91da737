"""The TensorRT backend against a fake ``tensorrt`` that records calls (10.x and 11.x APIs).

No GPU is needed: construction asks for ``cuda:N`` (torch.cuda's device calls are stood in
for), and the runs go through the backend's engine runner on CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from fake_tensorrt import make_tensorrt

from clip2scene_ros.cli import main as cli
from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    EngineSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.preprocess import prepare_frames
from clip2scene_ros.runtime.labels import UNKNOWN_LABEL
from clip2scene_ros.runtime.predictor import Predictor
from clip2scene_ros.runtime.tensorrt_backend import TensorRTBackend

VOCAB = VocabularySpec("three", ("road", "car", "tree"), ((1, 1, 1), (2, 2, 2), (3, 3, 3)))

Calls = list[tuple[Any, ...]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    arch = ArchitectureSpec(cr=0.25, clip_dim=16)
    spec = BundleSpec(arch, InputSpec(voxel_size=0.2, features=("intensity",),
                                      max_points=20_000), VOCAB,
                      engine=EngineSpec(min_points=1, opt_points=5_000))
    model = SPVCNN(arch, in_channels=1)
    bank = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    path = save_bundle(tmp_path_factory.mktemp("b") / "model", spec, model.state_dict(), bank)
    assert cli(["export", "--model", str(path)]) == 0
    return path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Calls]:
    """``fake(version, **options)`` installs a fake tensorrt and stands in for torch.cuda's
    device calls; returns the list every call is recorded in (set_device included)."""
    calls: Calls = []

    def install(version: str = "10.8.0", **options: Any) -> Calls:
        monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(version, calls, **options))
        return calls

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU 80GB")
    return install


def names(calls: Calls) -> list[str]:
    return [c[0] for c in calls]


def backend(bundle: Path, cache: Path, precision: str = "fp16", device: str = "cuda:1",
            **kwargs: Any) -> TensorRTBackend:
    from clip2scene_ros.models.bundle import load_bundle

    return TensorRTBackend(load_bundle(bundle), torch.device(device), precision=precision,
                           cache_dir=cache, **kwargs)


def on_cpu(b: TensorRTBackend) -> TensorRTBackend:
    """The backend running its engine on CPU tensors (the fake reads none of them)."""
    b.device = b.runner.device = torch.device("cpu")
    return b


def test_tensorrt_10_sets_the_fp16_flag_workspace_and_timing_cache(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls]) -> None:
    calls = fake("10.8.0")
    b = backend(bundle, tmp_path, workspace_mib=512)
    assert ("set_flag", "FP16") in calls
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in calls
    assert ("parse", "model.onnx") in calls  # the fp32 graph: the flag does the fp16
    assert ("set_timing_cache", False) in calls
    timing = list(tmp_path.glob("timing-*.cache"))
    assert [t.parent for t in timing] == [b.engine_path.parent]  # beside the engine
    assert timing[0].read_bytes() == b"timing+build"
    settings = json.loads(b.key.builder)
    assert settings["fp16"] == "flag" and settings["workspace_mib"] == 512
    assert settings["index_dtype"] == "int32"
    # the next build seeds its timings from the file
    calls.clear()
    backend(bundle, tmp_path, precision="fp32")
    assert ("create_timing_cache", b"timing+build") in calls
    assert "set_flag" not in names(calls)


def test_tensorrt_11_builds_an_fp16_graph_without_the_removed_flag(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls]) -> None:
    calls = fake("11.2.0")
    b = backend(bundle, tmp_path)
    assert "set_flag" not in names(calls)
    (parsed,) = [c[1] for c in calls if c[0] == "parse"]
    assert parsed.endswith(".fp16.onnx") and json.loads(b.key.builder)["fp16"] == "graph"
    graph = onnx.load(str(tmp_path / parsed))
    floats = {i.data_type for i in graph.graph.initializer
              if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert floats == {onnx.TensorProto.FLOAT16}
    io = [v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)
          if v.name in ("feats", "features")]
    assert io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]  # callers still use fp32
    calls.clear()
    backend(bundle, tmp_path, precision="fp32")
    assert [c[1] for c in calls if c[0] == "parse"] == ["model.onnx"]


def test_fp16_graph_matches_the_fp32_one(bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from clip2scene_ros.models.onnx_export import fp16_graph
    from clip2scene_ros.runtime.backends import exported_graph_meta, plan_for

    half = fp16_graph(bundle / "model.onnx", tmp_path / "model.fp16.onnx")
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-20, 20, (3000, 3)).astype(np.float32)
    f = Frame(stamp_ns=1, frame_id="l", xyz=xyz,
              intensity=rng.uniform(0, 255, 3000).astype(np.float32))
    from clip2scene_ros.models.bundle import load_bundle

    loaded = load_bundle(bundle)
    prepared = prepare_frames([f], loaded.spec.input)
    _, schema, _ = exported_graph_meta(loaded)
    plan = plan_for(prepared, schema)
    feed = {"feats": prepared.feats}
    feed.update({n: t.numpy() for n, t in zip(schema.input_names(), plan.tensors(),
                                               strict=True)})
    ref = ort.InferenceSession(str(bundle / "model.onnx")).run(None, feed)[0]
    out = ort.InferenceSession(str(half)).run(None, feed)[0]
    assert out.dtype == np.float32
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-2


@pytest.mark.parametrize("version", ["8.6.1", "12.0.0"])
def test_unsupported_tensorrt_major_is_refused_naming_the_range(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls], version: str) -> None:
    fake(version)
    with pytest.raises(ConfigError, match=r"tensorrt>=10.0,<12") as info:
        backend(bundle, tmp_path)
    assert version in str(info.value)


def test_requested_gpu_is_current_before_deserialising(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls]) -> None:
    calls = fake()
    b = backend(bundle, tmp_path, device="cuda:1")
    order = names(calls)
    assert calls[order.index("set_device")] == ("set_device", 1)  # an index, as torch wants
    assert order.index("set_device") < order.index("Builder") < order.index("deserialize")
    assert b.device == torch.device("cuda:1")
    calls.clear()
    plain = backend(bundle, tmp_path, device="cuda")  # plain "cuda": the current device
    assert ("set_device", 0) in calls and plain.device == torch.device("cuda:0")


def test_builder_settings_are_part_of_the_cache_key(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls]) -> None:
    calls = fake()
    first = backend(bundle, tmp_path)
    again = backend(bundle, tmp_path)
    assert names(calls).count("build") == 1 and again.engine_path == first.engine_path
    other = backend(bundle, tmp_path, workspace_mib=1024)
    assert names(calls).count("build") == 2 and other.engine_path != first.engine_path
    profiled = backend(bundle, tmp_path, profile=(1, 100, 2000))
    assert names(calls).count("build") == 3 and profiled.engine_path != first.engine_path


def test_engine_that_does_not_deserialise_is_rebuilt_saying_why(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls],
        caplog: pytest.LogCaptureFixture) -> None:
    calls = fake("10.8.0", fail_deserialize=1)
    with caplog.at_level(logging.WARNING):
        b = backend(bundle, tmp_path)
    assert names(calls).count("build") == 2 and names(calls).count("deserialize") == 2
    lines = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(lines) == 1 and "could not deserialise" in lines[0]
    assert b.engine_path.name in lines[0]


def test_engine_of_another_tensorrt_major_is_rebuilt(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls],
        caplog: pytest.LogCaptureFixture) -> None:
    calls = fake("10.8.0")
    old = backend(bundle, tmp_path, precision="fp32")
    built_by_10 = old.engine_path.read_bytes()
    # an upgrade: the key's TensorRT version changed, so the engine is rebuilt
    calls = fake("11.1.0")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        new = backend(bundle, tmp_path, precision="fp32")
    assert names(calls).count("build") == 1
    # a 10.x engine left under the 11.x engine's name with a matching sidecar: TensorRT 11
    # cannot deserialise it, so it is rebuilt too
    new.engine_path.write_bytes(built_by_10)
    sidecar = new.engine_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta.update(bytes=len(built_by_10), engine_sha256=hashlib.sha256(built_by_10).hexdigest())
    sidecar.write_text(json.dumps(meta))
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        backend(bundle, tmp_path, precision="fp32")
    assert names(calls).count("build") == 1
    assert any("could not deserialise" in r.getMessage() for r in caplog.records)
    assert new.engine_path.read_bytes().startswith(b"fake-trt-engine-11:")


def test_engine_io_is_checked_against_the_graph(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls],
        caplog: pytest.LogCaptureFixture) -> None:
    fake("10.8.0", engine_io={"feats": [True, "HALF", 2]})
    with pytest.raises(IntegrityError, match="'feats' is an input of HALF rank 2; the graph "
                       "has an input of FLOAT rank 2"):
        backend(bundle, tmp_path)
    # a cached engine that lacks an input is rebuilt by a builder that gets it right
    fake("10.8.0", engine_io={"conv_s1_k3_st1": None})
    with pytest.raises(IntegrityError, match="missing \\['conv_s1_k3_st1'\\]"):
        backend(bundle, tmp_path, precision="fp32")
    calls = fake("10.8.0")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        backend(bundle, tmp_path, precision="fp32")
    assert names(calls).count("build") == 1
    assert any("missing ['conv_s1_k3_st1']" in r.getMessage() for r in caplog.records)


def test_out_of_profile_shape_names_the_input_and_bound(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls]) -> None:
    fake()
    b = on_cpu(backend(bundle, tmp_path, profile=(1, 50, 200)))
    too_many = torch.zeros(500, 1)
    with pytest.raises(ValueError, match=r"input 'feats' has shape \[500, 1\]: axis 0 = 500 is "
                       r"above the profile's max 200"):
        b.runner.run({"feats": too_many})
    # an address TensorRT refuses is named too
    fake(refuse_address=frozenset({"feats"}))
    b = on_cpu(backend(bundle, tmp_path, profile=(1, 50, 200)))
    with pytest.raises(RuntimeError, match="refused the address of input 'feats'"):
        b.runner.run({"feats": torch.zeros(10, 1)})
    # an empty segment table fits the profile (min 0) and gets a valid address all the same
    name = next(n for n in b.input_names if n.startswith("pool_") and n.endswith("_pass"))
    calls = fake()
    b = on_cpu(backend(bundle, tmp_path, profile=(1, 50, 200)))
    with pytest.raises(RuntimeError, match="cannot infer the output shape"):  # feats is unset
        b.runner.run({name: torch.zeros((0,), dtype=torch.int32)})
    assert ("set_tensor_address", name) in calls


def test_profile_bounds_each_stride_by_its_voxel_ratio(bundle: Path) -> None:
    from clip2scene_ros.models.profile import DEFAULT_VOXEL_RATIOS
    from clip2scene_ros.runtime.tensorrt_backend import profile_shapes

    shapes = profile_shapes(bundle / "model.onnx", (1, 10_000, 400_000))
    assert shapes["feats"][2][0] == 400_000
    for stride, ratio in zip((1, 2, 4, 8, 16), DEFAULT_VOXEL_RATIOS, strict=True):
        (conv,) = [n for n in shapes if n == f"conv_s{stride}_k3_st1"]
        assert shapes[conv][2][0] == int(np.ceil(400_000 * ratio))
        assert shapes[conv][1][0] == int(np.ceil(10_000 * ratio))
    # the stride-8 gather of SPVCNN at cr 1.0 (27 offsets x 256 channels) stays under 2**31
    assert shapes["conv_s8_k3_st1"][2][0] * 27 * 256 < 2**31
    assert 400_000 * 27 * 256 >= 2**31  # as it did not when every stride got the point max


def test_cloud_over_the_profile_is_thinned_counted_and_warned_once(
        bundle: Path, tmp_path: Path, fake: Callable[..., Calls],
        caplog: pytest.LogCaptureFixture) -> None:
    fake()
    predictor = Predictor(bundle, backend="torch", device="cpu", count_syncs=True)
    b = on_cpu(backend(bundle, tmp_path, precision="fp32", profile=(1, 100, 300)))
    predictor.backend, predictor.text_head = b, None
    rng = np.random.default_rng(1)
    frame = Frame(stamp_ns=1, frame_id="l", xyz=rng.uniform(-30, 30, (1000, 3)).astype(
        np.float32), intensity=np.ones(1000, np.float32))
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.runtime.predictor"):
        first = predictor.predict([frame])
        second = predictor.predict([frame])
    for out in (first, second):
        kept = out.prepared.num_points
        assert kept <= 300 and out.prepared.dropped["over_profile"] == 1000 - kept
        assert (out.labels.label == UNKNOWN_LABEL).sum() == 1000 - kept
        assert b.over_profile(b._plan(out.prepared)[0], kept) <= 1.0
    warnings = [r.getMessage() for r in caplog.records if "over_profile" in r.getMessage()]
    assert len(warnings) == 1
    assert first.host_syncs is not None and first.host_syncs >= 1  # labels came back once


LOCKED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clip2scene_ros.runtime.engine_cache import EngineCache, EngineKey
    root = Path(sys.argv[1])
    def builder(path, key):
        with (root / "builds.log").open("a") as f:
            f.write(sys.argv[2] + "\\n")
        time.sleep(1.5)
        return b"engine-from-" + sys.argv[2].encode()
    key = EngineKey("abc", "10.8.0", "Fake GPU", "fp16", (1, 10, 100), "{}")
    data, _ = EngineCache(root / "engines").get(root / "model.onnx", key, builder)
    print(data.decode())
""")


def test_two_processes_never_build_the_same_engine_at_once(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    procs = [subprocess.Popen([sys.executable, "-c", LOCKED_BUILD, str(tmp_path), tag],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1  # the second waited on the lock, then took the cached engine
    assert {o[0].strip() for o in outs} == {f"engine-from-{builds[0]}"}
    waited = [o[1] for o in outs if "another process is building" in o[1]]
    assert len(waited) <= 1


def test_setup_extra_names_the_supported_tensorrt_range() -> None:
    from clip2scene_ros.runtime.tensorrt_backend import SUPPORTED_MAJORS, TENSORRT_REQUIREMENT

    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert f'"tensorrt": ["{TENSORRT_REQUIREMENT}"' in setup
    low, high = SUPPORTED_MAJORS[0], SUPPORTED_MAJORS[-1] + 1
    assert f"tensorrt>={low}.0,<{high}" == TENSORRT_REQUIREMENT


def test_default_voxel_ratios_cover_real_scans(nuscenes_dir: Path,
                                               semantickitti_dir: Path) -> None:
    """The profile's ratios bound the voxels per point measured on the nuScenes keyframe and
    SemanticKITTI 00/000000 at 0.05 m and 0.1 m, with the margin the module names."""
    from clip2scene_ros.models.profile import DEFAULT_VOXEL_RATIOS, MARGIN, voxel_ratios

    (nu,) = nuscenes_dir.glob("*LIDAR_TOP*.pcd.bin")
    scans = [np.fromfile(nu, np.float32).reshape(-1, 5)[:, :3],
             np.fromfile(semantickitti_dir / "000000.bin", np.float32).reshape(-1, 4)[:, :3]]
    measured = [voxel_ratios(xyz, voxel) for xyz in scans for voxel in (0.05, 0.1)]
    assert measured[0][0] == pytest.approx(0.666, abs=1e-3)  # the module's table
    for stride in range(5):
        worst = max(m[stride] for m in measured)
        assert DEFAULT_VOXEL_RATIOS[stride] >= min(1.0, worst * MARGIN) - 0.01
        assert DEFAULT_VOXEL_RATIOS[stride] <= min(1.0, worst * MARGIN) + 0.01
