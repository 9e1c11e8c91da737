"""Annotation-free evaluation: confusion/IoU arithmetic, bag and KITTI runs, report figures, CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip2scene_ros.bag.reader import BagReader
from clip2scene_ros.cli import main
from clip2scene_ros.codecs import UNKNOWN_LABEL
from clip2scene_ros.frame import Frame
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.runtime import predictor as predictor_module
from clip2scene_ros.runtime.labels import PointLabels
from clip2scene_ros.runtime.predictor import Prediction
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.training.evaluate import (
    ConfusionMatrix,
    evaluate_bag,
    evaluate_kitti,
    load_kitti_labels,
)
from clip2scene_ros.vocabulary import Vocabulary, builtin_vocabulary, load_vocabulary

KEYS = {"miou", "accuracy", "per_class_iou", "frames", "points", "confusion", "class_names",
        "ignore_index", "backend", "timing_ms"}
REPORT = ("per_class_iou.png", "confusion.png", "bev.png", "camera_overlay.png")

# ---------------------------------------------------------------- confusion matrix arithmetic


def test_iou_miou_accuracy_by_hand() -> None:
    cm = ConfusionMatrix(3, ignore_index=-1)
    # kept (target, pred): (0,0) (1,0) (1,1) (2,2) (0,1); the 5th point is ignored
    cm.update(np.array([0, 0, 1, 2, 2, 1]), np.array([0, 1, 1, 2, -1, 0]))
    assert cm.counts.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    assert np.allclose(cm.iou(), [1 / 3, 1 / 3, 1.0])
    assert cm.miou() == pytest.approx(5 / 9)
    assert cm.accuracy() == pytest.approx(3 / 5)
    assert cm.total == 5


def test_absent_and_prediction_only_classes() -> None:
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    iou = cm.iou()
    assert iou[:2].tolist() == [1.0, 1.0] and np.isnan(iou[2:]).all()
    assert cm.miou() == 1.0  # classes absent from target and prediction are left out
    cm.update(np.array([3]), np.array([0]))  # a false alarm of class 3 counts as IoU 0
    assert cm.iou()[3] == 0.0 and cm.iou()[0] == pytest.approx(2 / 3)
    assert cm.miou() == pytest.approx((2 / 3 + 1 + 0) / 3)
    d = cm.to_dict(["a", "b", "c", "d"])
    assert d["per_class_iou"]["c"] is None and d["per_class_iou"]["d"] == 0.0
    json.dumps(d, allow_nan=False)
    empty = ConfusionMatrix(2)
    assert np.isnan(empty.miou()) and np.isnan(empty.accuracy())
    assert empty.to_dict(["a", "b"])["miou"] is None


def test_unknown_predictions_are_wrong_not_ignored() -> None:
    cm = ConfusionMatrix(2)
    pred = np.array([UNKNOWN_LABEL, 0, 1, UNKNOWN_LABEL], dtype=np.uint16)
    cm.update(pred, np.array([0, 0, 1, -1]))
    assert cm.total == 3 and cm.unlabelled == 1 and cm.counts[0].tolist() == [1, 0, 1]
    assert cm.iou().tolist() == [0.5, 1.0]  # a miss of class 0, nobody's false positive
    assert cm.accuracy() == pytest.approx(2 / 3)


def test_merge_of_halves_equals_whole() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 6, 1000)
    pred[::17] = UNKNOWN_LABEL
    target = rng.integers(-1, 5, 1000)
    whole, a, b = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    a.update(pred[:400], target[:400])
    b.update(pred[400:], target[400:])
    assert np.array_equal((a + b).counts, whole.counts)
    assert np.array_equal(sum([a, b]).counts, whole.counts)  # type: ignore[union-attr]
    assert (a + b).miou() == whole.miou()
    with pytest.raises(ValueError, match="merge"):
        _ = a + ConfusionMatrix(4)
    with pytest.raises(ValueError, match="neither a class"):
        a.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="class index"):
        ConfusionMatrix(3, ignore_index=1)


# ---------------------------------------------------------------- bundle, drive, evaluation


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return load_vocabulary(builtin_vocabulary("sample_drive"))


def _bundle(path: Path, name: str, classes: Sequence[str], palette: np.ndarray) -> Path:
    torch.manual_seed(0)
    arch = ArchitectureSpec(cr=0.25, clip_dim=16, blocks=1)  # blocks=1: half the convs
    spec = BundleSpec(arch, InputSpec(voxel_size=0.4, features=("intensity", "z"),
                                      scale=(1 / 255, 1.0), sweeps=2, max_points=200_000),
                      VocabularySpec(name, tuple(classes),
                                     tuple(tuple(int(c) for c in rgb) for rgb in palette)))
    bank = torch.nn.functional.normalize(torch.randn(len(classes), 16), dim=1)
    return save_bundle(path, spec, SPVCNN(arch, in_channels=2).state_dict(), bank)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, vocab: Vocabulary) -> Path:
    return _bundle(tmp_path_factory.mktemp("eval") / "model", vocab.name, vocab.names,
                   vocab.palette)


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rig = small_rig(120, (160, 90))
    path = tmp_path_factory.mktemp("eval") / "drive"
    write_sample_drive(path, frames=3, seed=0, rig=rig)
    return path


@pytest.fixture(scope="module")
def scored_points(drive: Path, vocab: Vocabulary) -> list[np.ndarray]:
    """Per frame: the ground truth as vocabulary indices (-1: ignored)."""
    return [vocab.map_labels(f.labels) for f in BagReader(drive).frames()]


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 200
        assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_random_bundle_on_sample_drive_with_report(
        bundle: Path, drive: Path, vocab: Vocabulary, scored_points: list[np.ndarray],
        tmp_path: Path) -> None:
    result = evaluate_bag(bundle, drive, "sample_drive", device="cpu", report_dir=tmp_path / "r")
    assert set(result) >= KEYS
    json.dumps(result, allow_nan=False)
    assert result["frames"] == 3 and result["backend"] == "torch"
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["accuracy"] <= 1.0
    confusion = np.asarray(result["confusion"])
    assert confusion.shape == (8, 9) and result["class_names"] == vocab.names
    expected = sum(int((t >= 0).sum()) for t in scored_points)
    assert confusion.sum() == result["points"] == expected > 0
    assert set(result["per_class_iou"]) == set(vocab.names)
    assert result["timing_ms"]["p95"] >= result["timing_ms"]["p50"] > 0
    assert [Path(p).name for p in result["report"]] == list(REPORT)
    for name in REPORT:
        _check_png(tmp_path / "r" / name)


def _fake_predict(vocab: Vocabulary, unknown_every: int = 0):  # type: ignore[no-untyped-def]
    """A Predictor.predict that returns the ground truth (optionally with UNKNOWN holes)."""

    def predict(self: object, frames: Sequence[Frame]) -> Prediction:
        target = vocab.map_labels(frames[0].labels)
        label = np.where(target >= 0, target, 0).astype(np.uint16)
        if unknown_every:
            label[1::unknown_every] = UNKNOWN_LABEL
        scores = np.ones(label.size, np.float32)
        return Prediction(PointLabels(label, scores), None, {"total": 1.0})  # type: ignore[arg-type]

    return predict


def test_oracle_scores_one(bundle: Path, drive: Path, vocab: Vocabulary,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictor_module.Predictor, "predict", _fake_predict(vocab))
    result = evaluate_bag(bundle, drive, vocab)
    assert result["miou"] == 1.0 and result["accuracy"] == 1.0
    assert result["unlabelled_points"] == 0
    present = [v for v in result["per_class_iou"].values() if v is not None]
    assert present and all(v == 1.0 for v in present)


def test_unknown_predictions_count_as_errors(
        bundle: Path, drive: Path, vocab: Vocabulary, scored_points: list[np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictor_module.Predictor, "predict", _fake_predict(vocab, 2))
    result = evaluate_bag(bundle, drive, vocab)
    holes = sum(int((t[1::2] >= 0).sum()) for t in scored_points)
    assert holes > 0 and result["unlabelled_points"] == holes
    assert np.asarray(result["confusion"])[:, -1].sum() == holes
    assert result["points"] == sum(int((t >= 0).sum()) for t in scored_points)
    assert result["accuracy"] == pytest.approx(1 - holes / result["points"])
    assert result["miou"] < 1.0


# ---------------------------------------------------------------- SemanticKITTI


def _kitti_pair(folder: Path, n: int = 3000) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(1)
    scan = np.column_stack([rng.uniform(-20, 20, (n, 2)), rng.uniform(-2, 2, n),
                            rng.uniform(0, 1, n)]).astype(np.float32)
    semantic = rng.choice(np.array([0, 10, 40, 48, 50, 70, 80, 81, 30, 99]), n).astype(np.uint32)
    instance = rng.integers(0, 50, n).astype(np.uint32)
    scan.tofile(folder / "000000.bin")
    (semantic | (instance << 16)).tofile(folder / "000000.label")
    return folder / "000000.bin", folder / "000000.label", semantic


def test_kitti_labels_and_evaluation(bundle: Path, tmp_path: Path) -> None:
    scan, label, semantic = _kitti_pair(tmp_path)
    assert np.array_equal(load_kitti_labels(label), semantic)
    with pytest.raises(ValueError, match="labels for a scan"):
        load_kitti_labels(label, 10)
    kitti = load_vocabulary(builtin_vocabulary("semantickitti"))
    result = evaluate_kitti(bundle, [scan], [label], "semantickitti", device="cpu",
                            report_dir=tmp_path / "r")
    assert set(result) >= KEYS and result["frames"] == 1
    assert result["points"] == int((kitti.map_labels(semantic) >= 0).sum())
    assert 0.0 <= result["miou"] <= 1.0
    assert len(result["class_names"]) == 19
    # no camera in a KITTI scan: the figures that need none
    assert [Path(p).name for p in result["report"]] == list(REPORT[:3])
    with pytest.raises(ValueError, match=r"\.label files"):
        evaluate_kitti(bundle, [scan], [], kitti)


def test_kitti_real_scan_oracle(semantickitti_dir: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real scan through the loader and the raw-id mapping: a perfect labelling scores 1."""
    label = semantickitti_dir / "000000.label"
    if not label.is_file():
        pytest.skip(f"{label} is absent")
    kitti = load_vocabulary(builtin_vocabulary("semantickitti"))
    model = _bundle(tmp_path / "kitti_model", kitti.name, kitti.names, kitti.palette)
    monkeypatch.setattr(predictor_module.Predictor, "predict", _fake_predict(kitti))
    result = evaluate_kitti(model, [semantickitti_dir / "000000.bin"], [label], kitti)
    expected = int((kitti.map_labels(load_kitti_labels(label)) >= 0).sum())
    assert result["points"] == np.asarray(result["confusion"]).sum() == expected > 100_000
    assert result["miou"] == 1.0 and result["accuracy"] == 1.0


# ---------------------------------------------------------------- CLI


def test_cli_eval(bundle: Path, drive: Path, vocab: Vocabulary, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the wiring is under test here, the network ran above: an oracle keeps this fast
    monkeypatch.setattr(predictor_module.Predictor, "predict", _fake_predict(vocab))
    out = tmp_path / "eval.json"
    # default vocabulary: the bundle's, which is the built-in sample_drive
    assert main(["eval", "--model", str(bundle), "--bag", str(drive), "--json", str(out),
                 "--max-frames", "1", "--backend", "torch"]) == 0
    data = json.loads(out.read_text())
    assert set(data) >= KEYS and data["frames"] == 1 and data["vocabulary"] == "sample_drive"
    assert "mIoU" in capsys.readouterr().out

    scan, label, _ = _kitti_pair(tmp_path)
    assert main(["eval", "--model", str(bundle), "--kitti-bin", str(scan), "--kitti-label",
                 str(label), "--vocab", "semantickitti", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["vocabulary"] == "semantickitti"

    custom = _bundle(tmp_path / "custom", "my_labels", vocab.names, vocab.palette)
    assert main(["eval", "--model", str(custom), "--bag", str(drive), "--json", str(out)]) == 2
    assert "--vocab" in capsys.readouterr().err
    assert main(["eval", "--model", str(bundle), "--kitti-bin", str(scan), "--json",
                 str(out)]) == 2


def test_in_view_and_out_of_view_split(bundle: Path, drive: Path, vocab: Vocabulary,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Right where a camera sees the point, unlabelled elsewhere: the split shows exactly that."""
    from clip2scene_ros.geometry.correspondence import frame_pairs

    def predict(self: object, frames: Sequence[Frame]) -> Prediction:
        target = vocab.map_labels(frames[0].labels)
        label = np.full(target.size, UNKNOWN_LABEL, np.uint16)
        seen = frame_pairs(frames[0], min_depth=1.0).point_index
        label[seen] = np.where(target[seen] >= 0, target[seen], 0)
        return Prediction(PointLabels(label, np.ones(label.size, np.float32)), None,  # type: ignore[arg-type]
                          {"total": 1.0})

    monkeypatch.setattr(predictor_module.Predictor, "predict", predict)
    result = evaluate_bag(bundle, drive, vocab)
    inside, outside = result["in_view"], result["out_of_view"]
    assert inside["accuracy"] == 1.0 and inside["miou"] == 1.0
    assert outside["accuracy"] == 0.0 and outside["miou"] == 0.0
    seen = 0
    for frame in BagReader(drive).frames():
        mask = np.zeros(frame.num_points, bool)
        mask[frame_pairs(frame, min_depth=1.0).point_index] = True
        seen += int((mask & (vocab.map_labels(frame.labels) >= 0)).sum())
    assert 0 < inside["points"] == seen < result["points"]
    assert inside["points"] + outside["points"] == result["points"]
