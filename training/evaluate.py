"""Annotation-free evaluation: per-class IoU, mIoU and accuracy of a model bundle on labelled data.

The protocol (CLIP2Scene's annotation-free setting):

* **Predictions** are class indices of the bundle's text bank, produced by the same
  :class:`~clip2scene_ros.runtime.predictor.Predictor` the node runs, so what is measured is what
  is deployed. They are matched to the evaluation vocabulary *by class name*: a bundle whose
  text bank has classes the vocabulary lacks can still be evaluated, and predicting such a class
  counts as an error.
* **Ground truth** is the dataset's raw label ids, mapped to vocabulary class indices through
  each class's ``ids`` (:meth:`Vocabulary.map_labels`). Ids no class claims (``ignore_ids`` and
  anything unmapped) become ``ignore_index`` and are left out of every count.
* **Unlabelled points** (``UNKNOWN_LABEL``: the network never saw them because preprocessing
  dropped them as non-finite, out of range or over ``max_points``) count as **wrong**, not
  ignored. Ignoring them would let a model raise its score by dropping hard points; counting
  them keeps the metric honest about the deployed pipeline. They appear in the confusion matrix
  as an extra last column (``<unlabelled>``): a false negative of the true class and a false
  positive of none.

The confusion matrix is ``C x (C + 1)``: rows are ground-truth classes, columns the predicted
class, the last column the unlabelled points; its total is the number of evaluated points.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip2scene_ros.errors import BagError, ConfigError
from clip2scene_ros.figures import EvalSample
from clip2scene_ros.frame import Frame
from clip2scene_ros.metrics import UNLABELLED_COLUMN, ConfusionMatrix
from clip2scene_ros.models.bundle import Bundle, load_bundle
from clip2scene_ros.precision_names import DEFAULT_PRECISION
from clip2scene_ros.vocabulary import Vocabulary

log = logging.getLogger(__name__)

__all__ = [
    "IN_VIEW_MIN_DEPTH",
    "UNLABELLED_COLUMN",
    "ConfusionMatrix",
    "EvalSample",
    "NoLabelledFrames",
    "evaluate_bag",
    "evaluate_frames",
    "evaluate_kitti",
    "in_view_mask",
    "load_kitti_labels",
    "prediction_map",
]

def prediction_map(bundle_classes: Sequence[str], vocabulary: Vocabulary) -> np.ndarray:
    """``(len(bundle_classes),)`` int64: vocabulary index of each text-bank class, -1 if absent.

    Matching is by name because the text bank's row order need not follow the evaluation
    vocabulary's (a bundle may be relabelled with a swapped bank). No shared name at all means
    the bundle and the vocabulary describe different label sets: that is refused, since every
    prediction would count as wrong and the mIoU of 0 would look like a result.
    """
    index = {name: i for i, name in enumerate(vocabulary.names)}
    table = np.array([index.get(name, -1) for name in bundle_classes], dtype=np.int64)
    if not (table >= 0).any():
        raise ConfigError("vocab", f"no class of the model ({list(bundle_classes)}) is in the "
                          f"vocabulary {vocabulary.name!r} ({vocabulary.names})")
    missing = [n for n, i in zip(bundle_classes, table, strict=True) if i < 0]
    if missing:
        log.warning("evaluate: model classes %s are not in vocabulary %r; predicting them counts "
                    "as wrong", missing, vocabulary.name)
    return table


def map_predictions(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Predictor labels (text-bank indices, UNKNOWN_LABEL) to vocabulary indices (-1: none)."""
    labels = np.asarray(labels).astype(np.int64)
    inside = labels < table.size
    return np.where(inside, table[np.where(inside, labels, 0)], -1)


#: Pairs closer than this are not in view, the teachers' rule (``TeacherConfig.min_depth``).
IN_VIEW_MIN_DEPTH = 1.0


def in_view_mask(frame: Frame, min_depth: float = IN_VIEW_MIN_DEPTH) -> np.ndarray:
    """(N,) bool: the points that project into one of the frame's camera images, i.e. those a
    2D teacher can label. A view whose image and camera model disagree in size counts as none.
    """
    from clip2scene_ros.geometry.correspondence import frame_pairs

    mask = np.zeros(frame.num_points, bool)
    if frame.cameras:
        try:
            mask[frame_pairs(frame, min_depth=min_depth).point_index] = True
        except ValueError:
            log.warning("evaluate: frame %d: its camera views cannot project points; every "
                        "point counts as out of view", frame.index)
    return mask


def _view_split(matrix: ConfusionMatrix, names: Sequence[str]) -> dict[str, Any]:
    metrics = matrix.to_dict(names)
    return {k: metrics[k] for k in ("miou", "accuracy", "per_class_iou", "points")}


@dataclass
class _Run:
    matrix: ConfusionMatrix
    in_view: ConfusionMatrix
    out_of_view: ConfusionMatrix
    timings: list[float] = field(default_factory=list)
    frames: int = 0
    frames_without_labels: int = 0
    sample: EvalSample | None = None


def _resolve_vocabulary(vocabulary: Vocabulary | str | Path) -> Vocabulary:
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    from clip2scene_ros.teacher.text_bank import resolve_vocabulary

    return resolve_vocabulary(vocabulary)


def _predictor(model_bundle: Bundle | str | Path, backend: str, device: str,
               precision: str = DEFAULT_PRECISION) -> Any:
    from clip2scene_ros.runtime.predictor import Predictor

    bundle = model_bundle if isinstance(model_bundle, Bundle) else load_bundle(model_bundle)
    return Predictor(bundle, backend=backend, device=device, precision=precision)


class NoLabelledFrames(ValueError):
    """No frame given to :func:`evaluate_frames` has ground-truth labels (each caller says
    which input lacks them)."""


def evaluate_frames(
    predictor: Any,
    frames: Iterable[Frame],
    vocabulary: Vocabulary,
    *,
    max_frames: int | None = None,
    ignore_index: int = -1,
) -> tuple[ConfusionMatrix, dict[str, Any], EvalSample | None]:
    """Run ``predictor`` over ``frames`` and accumulate the confusion of those with labels.

    Frames without ground truth are not scored but still serve as past sweeps of the next key
    frame, exactly as the node would see them. Returns the matrix, run statistics (``frames``,
    ``frames_without_labels``, ``timing_ms``) and one sample for the report: the first scored
    frame with a camera, else the first scored frame. ``in_view`` and ``out_of_view`` split
    the scores by :func:`in_view_mask` (both ``None`` when no frame has a camera).
    """
    if max_frames is not None and max_frames < 1:
        raise ConfigError("max_frames", f"must be >= 1, got {max_frames}")
    table = prediction_map(predictor.vocabulary.classes, vocabulary)
    classes = len(vocabulary.classes)
    run = _Run(ConfusionMatrix(classes, ignore_index), ConfusionMatrix(classes, ignore_index),
               ConfusionMatrix(classes, ignore_index))
    any_camera = False
    history: deque[Frame] = deque(maxlen=max(predictor.sweeps - 1, 0))
    for frame in frames:
        if frame.labels is None:
            run.frames_without_labels += 1
        else:
            past = list(history) if frame.pose is not None else []
            prediction = predictor.predict([frame, *past])
            pred = map_predictions(prediction.labels.label, table)
            target = vocabulary.map_labels(frame.labels, ignore_index)
            run.matrix.update(pred, target)
            seen = in_view_mask(frame)
            any_camera |= bool(frame.cameras)
            run.in_view.update(pred[seen], target[seen])
            run.out_of_view.update(pred[~seen], target[~seen])
            run.timings.append(float(prediction.timings_ms.get("total", 0.0)))
            keep = run.sample is None or (not run.sample.frame.cameras and frame.cameras)
            if keep:
                run.sample = EvalSample(frame, pred, target, run.frames)
            run.frames += 1
        # Past sweeps are merged by ego motion, which needs a pose on every one of them.
        if frame.pose is None:
            history.clear()
        elif history.maxlen:
            history.appendleft(frame)
        if max_frames is not None and run.frames >= max_frames:
            break  # before the reader decodes another frame
    if run.frames == 0:
        raise NoLabelledFrames("no frame with ground-truth labels to evaluate")
    timings = np.asarray(run.timings)
    stats = {
        "frames": run.frames,
        "frames_without_labels": run.frames_without_labels,
        "timing_ms": {"p50": float(np.percentile(timings, 50)),
                      "p95": float(np.percentile(timings, 95))},
        "in_view": _view_split(run.in_view, vocabulary.names) if any_camera else None,
        "out_of_view": _view_split(run.out_of_view, vocabulary.names) if any_camera else None,
    }
    return run.matrix, stats, run.sample


def _finish(
    matrix: ConfusionMatrix,
    stats: dict[str, Any],
    sample: EvalSample | None,
    vocabulary: Vocabulary,
    predictor: Any,
    source: dict[str, Any],
    report_dir: str | Path | None,
    started: float,
) -> dict[str, Any]:
    result: dict[str, Any] = matrix.to_dict(vocabulary.names)
    result.update(stats)
    result.update({
        "backend": predictor.backend_name,
        "precision": getattr(predictor, "precision", None),
        "device": str(predictor.device),
        "vocabulary": vocabulary.name,
        "model_vocabulary": predictor.vocabulary.name,
        "model": str(predictor.bundle.path) if predictor.bundle.path is not None else None,
        "source": source,
        "seconds": time.perf_counter() - started,
    })
    if report_dir is not None:
        from clip2scene_ros.figures import write_report

        files = write_report(Path(report_dir), result, vocabulary, sample)
        result["report"] = [str(p) for p in files]
    return result


def evaluate_bag(
    model_bundle: Bundle | str | Path,
    bag: str | Path,
    vocabulary: Vocabulary | str | Path,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    max_frames: int | None = None,
    report_dir: str | Path | None = None,
    *,
    reader_config: Any = None,
) -> dict[str, Any]:
    """Evaluate a bundle on the labelled frames of a rosbag2 recording (see module doc).

    ``vocabulary`` is a :class:`Vocabulary`, a YAML file or a built-in name; its ``ids`` must be
    the values of the bag's label field. ``max_frames`` caps the scored frames. With
    ``report_dir`` the PNG figures of :mod:`.report` are written there (needs matplotlib).
    """
    from clip2scene_ros.bag.reader import BagReader

    started = time.perf_counter()
    vocab = _resolve_vocabulary(vocabulary)
    predictor = _predictor(model_bundle, backend, device, precision)
    reader = BagReader(bag, reader_config)
    try:
        matrix, stats, sample = evaluate_frames(predictor, reader.frames(), vocab,
                                                max_frames=max_frames)
    except NoLabelledFrames as exc:
        topic = reader.index.topics.labels
        where = "its topics" if topic is None else f"label topic {topic}"
        why = ("no label cloud topic (a PointCloud2 with a `label` field)" if topic is None
               else f"{exc} (BagReader.skipped: {dict(reader.skipped)})")
        raise BagError(str(bag), where, why) from exc
    source = {"kind": "bag", "path": str(bag), "skipped": dict(reader.skipped)}
    return _finish(matrix, stats, sample, vocab, predictor, source, report_dir, started)


def load_kitti_labels(path: str | Path, num_points: int | None = None) -> np.ndarray:
    """Semantic ids of a SemanticKITTI ``.label``: the lower 16 bits of each uint32 (upper:
    instance id)."""
    raw = np.fromfile(Path(path), dtype=np.uint32)
    if num_points is not None and raw.size != num_points:
        raise ConfigError("kitti_label", f"{raw.size} labels for a scan of {num_points} points",
                          str(path))
    return (raw & 0xFFFF).astype(np.uint16)


def _kitti_frames(bin_files: Sequence[str | Path], label_files: Sequence[str | Path],
                  intensity_scale: float) -> Iterator[Frame]:
    from clip2scene_ros.bag.scans import load_scan

    for i, (scan_path, label_path) in enumerate(zip(bin_files, label_files, strict=True)):
        scan = load_scan(Path(scan_path))
        labels = load_kitti_labels(label_path, len(scan))
        # No poses: every scan is its own key frame, evaluated single-sweep.
        yield Frame(stamp_ns=i, frame_id="velodyne", xyz=scan[:, :3].copy(),
                    intensity=scan[:, 3] * np.float32(intensity_scale), labels=labels, index=i)


def evaluate_kitti(
    model_bundle: Bundle | str | Path,
    bin_files: Sequence[str | Path],
    label_files: Sequence[str | Path],
    vocabulary: Vocabulary | str | Path = "semantickitti",
    backend: str = "auto",
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    max_frames: int | None = None,
    report_dir: str | Path | None = None,
    *,
    intensity_scale: float = 1.0,
) -> dict[str, Any]:
    """Evaluate a bundle on SemanticKITTI ``.bin`` scans and their ``.label`` files (paired in
    order).

    The vocabulary's ``ids`` are raw SemanticKITTI ids (``config/vocabularies/semantickitti.yaml``
    folds them the way the official ``learning_map`` does). KITTI stores remission in 0..1;
    ``intensity_scale`` multiplies it for a model trained on another range (e.g. 255 for ROS
    drivers that publish 0..255).
    """
    bin_files, label_files = list(bin_files), list(label_files)
    if not bin_files:
        raise ConfigError("kitti_bin", "no KITTI scans given")
    if len(bin_files) != len(label_files):
        raise ConfigError("kitti_label", f"{len(bin_files)} .bin files but {len(label_files)} "
                          ".label files")
    started = time.perf_counter()
    vocab = _resolve_vocabulary(vocabulary)
    predictor = _predictor(model_bundle, backend, device, precision)
    frames = _kitti_frames(bin_files, label_files, intensity_scale)
    matrix, stats, sample = evaluate_frames(predictor, frames, vocab, max_frames=max_frames)
    source = {"kind": "kitti", "scans": [str(p) for p in bin_files[: stats["frames"]]]}
    return _finish(matrix, stats, sample, vocab, predictor, source, report_dir, started)
