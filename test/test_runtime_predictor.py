"""The Predictor: bundle → network → text bank, on Frames, with vocabulary swap and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_ros.codecs import UNKNOWN_LABEL
from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    load_bundle,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.runtime.labels import text_logits
from clip2scene_ros.runtime.predictor import Predictor
from clip2scene_ros.sparse.tensor import PointTensor

VOCAB = VocabularySpec("three", ("road", "car", "tree"), ((1, 1, 1), (2, 2, 2), (3, 3, 3)))


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    arch = ArchitectureSpec(cr=0.25, clip_dim=16)
    spec = BundleSpec(arch, InputSpec(voxel_size=0.2, features=("intensity", "z"),
                                      scale=(1 / 255, 1.0), sweeps=2, max_points=5000), VOCAB)
    model = SPVCNN(arch, in_channels=2)
    bank = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    return save_bundle(tmp_path_factory.mktemp("b") / "model", spec, model.state_dict(), bank)


def frame(n: int, seed: int, stamp_s: float = 1.0) -> Frame:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-20, -20, -2], [20, 20, 2], (n, 3)).astype(np.float32)
    return Frame(stamp_ns=int(stamp_s * 1e9), frame_id="lidar", xyz=xyz,
                 intensity=rng.uniform(0, 255, n).astype(np.float32), pose=np.eye(4))


def test_labels_every_key_frame_point_like_the_model(bundle_path: Path) -> None:
    predictor = Predictor(bundle_path, device="cpu")
    f = frame(3000, 0)
    out = predictor.predict([f])
    assert out.labels.label.shape == (3000,) and out.labels.label.max() < 3
    assert set(out.timings_ms) == {"preprocess", "inference", "postprocess", "total"}
    # the same numbers by hand from the bundle's pieces
    z = torch.from_numpy(out.prepared.coords), torch.from_numpy(out.prepared.feats)
    with torch.no_grad():
        logits = text_logits(predictor.backend.model.text_features(PointTensor(z[1], z[0])),
                             predictor.text_bank)
    assert np.array_equal(out.labels.label, logits.argmax(1).numpy().astype(np.uint16))


def test_past_sweeps_and_max_points(bundle_path: Path) -> None:
    predictor = Predictor(bundle_path, device="cpu", max_points=2500)
    key, past = frame(2000, 1, 1.1), frame(1000, 2, 1.0)
    out = predictor.predict([key, past])
    assert out.prepared.dropped["over_max_points"] == 500
    assert out.labels.label.shape == (2000,)
    unknown = out.labels.label == UNKNOWN_LABEL
    assert 0 < unknown.sum() < 2000 and (out.labels.score[unknown] == 0).all()


def test_empty_frame(bundle_path: Path) -> None:
    out = Predictor(bundle_path, device="cpu").predict([frame(0, 3)])
    assert out.labels.label.shape == (0,)


def test_vocabulary_swap_changes_labels_without_reloading(bundle_path: Path) -> None:
    predictor = Predictor(bundle_path, device="cpu")
    f = frame(1000, 4)
    before = predictor.predict([f]).labels.label
    flipped = VocabularySpec("flipped", ("tree", "car", "road"), VOCAB.palette[::-1])
    predictor.set_vocabulary(predictor.text_bank.flip(0).clone(), flipped)
    after = predictor.predict([f]).labels.label
    assert np.array_equal(after, 2 - before)
    with pytest.raises(ConfigError, match="text_bank"):
        predictor.set_vocabulary(torch.zeros(2, 16), flipped)


def test_refusals_name_what_is_wrong(bundle_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.onnx") as info:
        Predictor(bundle_path, backend="onnxruntime")  # the bundle has no exported graph
    assert info.value.key == "backend"
    with pytest.raises(ConfigError, match="backend"):
        Predictor(bundle_path, backend="tensorrt", device="cpu")
    with pytest.raises(ConfigError, match="precision"):
        Predictor(bundle_path, precision="int3")
    with pytest.raises(ConfigError, match="trained on"):
        Predictor(bundle_path, sweeps=5)
    predictor = Predictor(bundle_path, device="cpu")
    state = dict(predictor.bundle.state_dict)
    state.pop("stem.0.kernel")
    bad = save_bundle(tmp_path / "bad", predictor.bundle.spec, state, predictor.text_bank)
    with pytest.raises(IntegrityError, match=r"missing \['stem.0.kernel'\]"):
        Predictor(bad)


@pytest.mark.parametrize("case", ["single", "nan", "beyond_keys", "over_max"])
def test_bad_clouds_give_defined_labels_counted_and_warned_once(
        bundle_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    predictor = Predictor(bundle_path, device="cpu")
    f = frame({"single": 1, "over_max": 6000}.get(case, 500), 9)
    if case == "nan":
        f.xyz[::7] = np.nan
        f.xyz[1, 2] = np.inf
    elif case == "beyond_keys":
        f.xyz[::5, 0] = 1e7  # 5e7 voxels at 0.2 m: past the packed-key range
    with caplog.at_level("WARNING", logger="clip2scene_ros.runtime.predictor"):
        first = predictor.predict([f])
        predictor.predict([f])
    labels = first.labels.label
    assert labels.shape == (f.num_points,)
    reason = {"single": None, "nan": "non_finite", "beyond_keys": "out_of_range",
              "over_max": "over_max_points"}[case]
    if reason is None:
        assert labels[0] < 3 and not caplog.records
        return
    dropped = first.prepared.dropped[reason]
    assert dropped > 0 and (labels == UNKNOWN_LABEL).sum() == dropped
    assert sum(reason in r.getMessage() for r in caplog.records) == 1  # once, not per frame


# --- the fast paths of predict: they must give the reference pipeline's numbers ---------------


def _linear(d: int, f: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(f, d)
    with torch.no_grad():
        linear.bias.mul_(5.0)  # a bias that matters next to W x
    return linear


@pytest.mark.parametrize(("d", "f"), [(64, 30), (16, 30)])  # QR path (D > F) and plain D <= F
def test_text_head_equals_text_logits_of_the_projection(d: int, f: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from clip2scene_ros.runtime.predictor import TextHead, cosine_logits

    linear = _linear(d, f, 1)
    head = TextHead(linear)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, f, generator=g).relu()
    bank = torch.randn(5, d, generator=g)
    with torch.no_grad():
        ref = text_logits(linear(x), bank)
    monkeypatch.setattr(TextHead, "CHUNK_ROWS", 96)  # several chunks and a ragged last one
    for trunk in (x, [x[:, :7], x[:, 7:20], x[:, 20:]]):
        got = head.logits(trunk, bank)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), ref.argmax(1))
    other = torch.randn(3, d, generator=g)  # a new bank (vocabulary swap) is picked up
    with torch.no_grad():
        assert torch.allclose(head.logits(x, other), text_logits(linear(x), other), atol=1e-4)
        assert torch.allclose(cosine_logits(linear(x), other), text_logits(linear(x), other),
                              atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        head.logits(x[:, 1:], bank)


def test_inference_forward_equals_the_autograd_forward() -> None:
    """In-place residual sums and folded biases under no_grad give the autograd path's numbers."""
    from clip2scene_ros.models.fuse import fold_batchnorms
    from clip2scene_ros.models.spconv_twin import random_spvcnn

    net = fold_batchnorms(random_spvcnn(0.25))
    g = torch.Generator().manual_seed(3)
    coords, feats = torch.rand(3000, 3, generator=g) * 60, torch.randn(3000, 4, generator=g)
    with torch.no_grad():
        fast = net(PointTensor(feats, coords))
        blocks = net.point_features(PointTensor(feats, coords))
    slow = net(PointTensor(feats, coords))
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=1e-4, atol=1e-5 * float(fast.abs().max()))
    assert torch.equal(torch.cat(blocks, 1), fast)


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip_dim 160 > feature_dim 120: the head takes its QR path."""
    torch.manual_seed(5)
    arch = ArchitectureSpec(cr=0.25, clip_dim=160)
    spec = BundleSpec(arch, InputSpec(voxel_size=0.2, features=("intensity", "z"),
                                      scale=(1 / 255, 1.0)), VOCAB)
    model = SPVCNN(arch, in_channels=2)
    bank = torch.nn.functional.normalize(torch.randn(3, 160), dim=1)
    return save_bundle(tmp_path_factory.mktemp("w") / "model", spec, model.state_dict(), bank)


def test_features_are_made_on_first_read_and_are_the_models(wide_bundle: Path) -> None:
    import dataclasses

    predictor = Predictor(wide_bundle, device="cpu")
    f = frame(4000, 6)
    out = predictor.predict([f])
    assert type(out.__dict__["_value_features"]).__name__ == "_Deferred"  # not computed yet
    z = PointTensor(torch.from_numpy(out.prepared.feats), torch.from_numpy(out.prepared.coords))
    with torch.no_grad():
        ref = predictor.backend.model.text_features(z)
    logits = text_logits(ref, predictor.text_bank)
    assert torch.allclose(out.features, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert out.features is out.features  # computed once
    probs = torch.softmax(logits, 1)
    best = probs.max(1)
    # labels: the reference's, except where its two best classes tie to float rounding
    top2 = probs.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    label, score = (v[out.prepared.source] for v in (out.labels.label, out.labels.score))
    assert np.array_equal(label[clear.numpy()], best.indices[clear].numpy().astype(np.uint16))
    np.testing.assert_allclose(score, best.values.numpy(), atol=1e-5)
    swapped = dataclasses.replace(out, features=torch.zeros(3))
    assert swapped.features.shape == (3,) and swapped.labels is out.labels


def test_fusion_starts_from_the_labels_logits_and_leaves_the_features_unmade(
        wide_bundle: Path) -> None:
    """``Prediction.logits`` are what the labels are the argmax and softmax of, and fusing with
    no camera in view reproduces the labels exactly without computing the 512-d features."""
    from clip2scene_ros.geometry.correspondence import PointPixelPairs
    from clip2scene_ros.runtime.fusion import fuse_prediction

    out = Predictor(wide_bundle, device="cpu").predict([frame(3000, 8)])
    assert out.logits is not None and out.logits.shape == (out.prepared.num_points, 3)
    best = torch.softmax(out.logits, 1).max(1)
    rows = out.prepared.source
    assert np.array_equal(out.labels.label[rows], best.indices.numpy().astype(np.uint16))
    assert np.array_equal(out.labels.score[rows], best.values.numpy())
    nothing = PointPixelPairs(np.zeros(0, np.int64), np.zeros(0, np.int32),
                              np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int32),
                              np.zeros(0, np.float32))
    fused = fuse_prediction(out, [], nothing, [], 0.5)
    assert np.array_equal(fused.labels.label, out.labels.label)
    assert np.array_equal(fused.labels.score, out.labels.score)
    assert type(out.__dict__["_value_features"]).__name__ == "_Deferred"  # still not computed


def test_nuscenes_keyframe_labels_equal_the_reference(nuscenes_dir: Path, tmp_path: Path,
                                                      one_torch_thread: None) -> None:
    """The real keyframe (34,688 points) through a random SPVCNN cr 0.5 / 512-d bundle: the
    predictor's labels and scores are those of text_logits(model.text_features) on the
    unfolded network."""
    from clip2scene_ros.bench.predictor import first_frame, random_bundle

    f = first_frame(nuscenes_dir / "bag_mcap")
    predictor = Predictor(random_bundle(tmp_path / "model"), device="cpu")
    out = predictor.predict([f])
    z = PointTensor(torch.from_numpy(out.prepared.feats), torch.from_numpy(out.prepared.coords))
    with torch.no_grad():
        from clip2scene_ros.models.spvcnn import build_model

        probs = torch.softmax(text_logits(build_model(predictor.bundle).text_features(z),
                                          predictor.text_bank), 1)
    top2 = probs.topk(2, dim=1).values
    clear = ((top2[:, 0] - top2[:, 1]) > 1e-4).numpy()
    assert clear.mean() > 0.99
    label, score = (v[out.prepared.source] for v in (out.labels.label, out.labels.score))
    assert np.array_equal(label[clear], probs.argmax(1).numpy()[clear])
    np.testing.assert_allclose(score, probs.max(1).values.numpy(), atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_gpu_requested_without_cuda_stops_with_one_line_naming_the_device(
        bundle_path: Path, device: str) -> None:
    from clip2scene_ros.node_params import NodeParams
    from clip2scene_ros.runtime.frame_processor import predictor_from_params

    for make in (lambda: Predictor(bundle_path, device=device),
                 lambda: predictor_from_params(NodeParams(model_path=str(bundle_path),
                                                          device=device))):
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.key == "device"
        text = str(info.value)
        assert "\n" not in text and f"{device!r}" in text and "no CUDA device" in text
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        Predictor(bundle_path, device="cuda:x")


def test_engine_profile_takes_given_values_over_the_bundles(bundle_path: Path) -> None:
    predictor = Predictor(bundle_path, device="cpu", profile=(0, 300, 0))
    assert predictor.profile == (1, 300, 5000)  # the bundle's min and (input) max
    assert Predictor(bundle_path, device="cpu").profile == (1, 5000, 5000)
    with pytest.raises(ConfigError, match="engine_max_points"):
        Predictor(bundle_path, device="cpu", profile=(0, 0, 6000))
    with pytest.raises(ConfigError, match="1 <= min <= opt <= max, got 400/300/5000"):
        Predictor(bundle_path, device="cpu", profile=(400, 300, 0))


def test_host_reads_are_counted_per_frame_and_methods_restored(bundle_path: Path) -> None:
    from clip2scene_ros.runtime.device_io import HOST_READS, count_host_reads

    before = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    with count_host_reads("cpu") as reads:
        t = torch.arange(4)
        t.sum().item()
        bool(t.any())
        int(t[0])
        t.tolist()
        torch.zeros(1, device="meta").sum()  # another device: not counted
    assert reads.by_method == {"item": 1, "__bool__": 1, "__int__": 1, "tolist": 1}
    assert reads.total == 4
    assert {name: getattr(torch.Tensor, name) for name in HOST_READS} == before
    counted = Predictor(bundle_path, device="cpu", count_syncs=True)
    out = counted.predict([frame(2000, 3)])
    # the logits come back once; the rest is the kernel maps' counts and the input checks
    # (test_sparse_host_reads.py pins them on a keyframe-sized cloud)
    assert out.host_syncs is not None and 1 <= out.host_syncs <= 16
    assert Predictor(bundle_path, device="cpu").predict([frame(2000, 3)]).host_syncs is None


def test_fp16_autocast_path_of_the_torch_backend(bundle_path: Path) -> None:
    """The CUDA fp16 path (autocast around the network, float32 features out) exercised on the
    CPU, whose autocast also runs fp16: no dtype mismatch anywhere in the sparse engine."""
    f = frame(3000, 5)
    ref = Predictor(bundle_path, device="cpu", precision="fp32").predict([f])
    predictor = Predictor(bundle_path, device="cpu", precision="fp32")
    assert not predictor.backend.autocast  # fp16 is CUDA's (refused on a CPU)
    predictor.backend.autocast = True
    out = predictor.predict([f])
    assert out.features is not None and ref.features is not None
    assert out.features.dtype == torch.float32
    err = (out.features - ref.features).abs().max() / ref.features.abs().max()
    assert 0 < float(err) <= 3e-2  # it did run in reduced precision, and close
    assert np.mean(out.labels.label == ref.labels.label) >= 0.98


def _probe(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    from clip2scene_ros import precision as precision_module
    from clip2scene_ros.runtime import backends

    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: fast)
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: fast)


def test_default_precision_is_auto_fp32_here_and_bf16_with_matrix_units(
        bundle_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from clip2scene_ros.precision_names import DEFAULT_PRECISION

    assert inspect.signature(Predictor).parameters["precision"].default == DEFAULT_PRECISION
    assert DEFAULT_PRECISION == "auto"
    _probe(monkeypatch, False)
    plain = Predictor(bundle_path, device="cpu")
    assert plain.precision == "fp32" and "bf16" not in plain.backend.describe()
    _probe(monkeypatch, True)
    fast = Predictor(bundle_path, device="cpu")
    assert fast.precision == "bf16" and "bf16 weights" in fast.backend.describe()


def test_bf16_labels_agree_with_fp32_and_the_bundle_stays_fp32(bundle_path: Path) -> None:
    """bf16 on the CPU: the trunk's weights converted once (folded first), the heads and the
    labels in fp32; on a tiny random model the labels agree with fp32's and the features are
    close. The bundle's own weights are untouched, and a bf16 state is never saved."""
    from clip2scene_ros.models.fuse import HEADS

    bundle = load_bundle(bundle_path)
    f = frame(3000, 7)
    ref = Predictor(bundle, device="cpu", precision="fp32").predict([f])
    predictor = Predictor(bundle, device="cpu", precision="bf16")
    model = predictor.backend.model
    assert model.dtype == torch.bfloat16 and predictor.backend.head.weight.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    out = predictor.predict([f])
    assert out.features is not None and ref.features is not None
    assert out.features.dtype == torch.float32
    err = (out.features - ref.features).abs().max() / ref.features.abs().max()
    assert 0 < float(err) <= 3e-2
    assert np.mean(out.labels.label == ref.labels.label) >= 0.98
    assert {t.dtype for t in bundle.state_dict.values() if t.is_floating_point()} == {
        torch.float32}
    trunk = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in HEADS}
    with pytest.raises(IntegrityError, match="bundles hold float32 weights"):
        save_bundle(bundle_path.parent / "bf16", bundle.spec, trunk, bundle.text_bank)
    assert not (bundle_path.parent / "bf16").exists()


def test_fp16_on_a_cpu_is_refused_in_one_line(bundle_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Predictor(bundle_path, device="cpu", precision="fp16")
    assert info.value.key == "precision" and "\n" not in str(info.value)
    assert "fp16" in str(info.value) and "supported: fp32, bf16" in str(info.value)
