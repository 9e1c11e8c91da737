"""The Predictor: bundle → network → text bank, on Frames, with vocabulary swap and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_ros.codecs import UNKNOWN_LABEL
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
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
    with pytest.raises(ConfigError, match=r"missing \['stem.0.kernel'\]"):
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
