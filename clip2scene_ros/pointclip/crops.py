"""``clip2scene pointclip eval --bag``: PointCLIP on the object crops of a labelled recording.

For every sweep with ground-truth labels, the labels are mapped through the vocabulary (its
``ids`` are the bag's label values), the points of the thing classes are clustered into
instances (:func:`~.objects.cluster_objects`, the same clustering the node runs on predicted
labels), and each crop is classified by PointCLIP among the thing classes only. An instance's
true class is its points' class: the clustering never joins two classes.

As for a folder, random CLIP weights check the mechanics (clustering, projection, encoding,
bookkeeping) and report ``accuracy: null``; real weights report top-1 accuracy over the crops.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..teacher.text_bank import resolve_vocabulary
from .adapter import load_adapter
from .evaluate import _classifier, is_random
from .objects import cluster_objects
from .things import sub_vocabulary, thing_classes


def _ms(seconds: list[float], count: int | None = None) -> float | None:
    """Mean milliseconds per item (``count`` items, default one per entry), None if none."""
    n = len(seconds) if count is None else count
    return 1e3 * float(sum(seconds)) / n if n else None


def evaluate_crops(bag: str | Path, *, vocab: str | Path, classes: Sequence[str] = (),
                   model: str = "ViT-B-16", pretrained: str | None = None,
                   projection: str = "v1", views: str = "v1_zeroshot",
                   adapter: str | Path | None = None, voxel_size: float = 0.25,
                   min_points: int = 10, max_frames: int | None = None, device: str = "cpu",
                   reader_config: Any = None) -> dict[str, Any]:
    """Classify the labelled objects of ``bag``'s sweeps; the JSON result of ``pointclip eval``.

    Args:
        vocab: vocabulary YAML or built-in name whose ``ids`` are the bag's label values.
        classes: thing classes to cluster and classify among; empty: the vocabulary's
            ``thing: true`` classes (:func:`~.things.thing_classes`).
        max_frames: stop after this many labelled sweeps.
        reader_config: a :class:`~clip2scene_ros.bag.reader.ReaderConfig`; default: detected
            topics, no cameras (PointCLIP needs none, and images cost decoding time).
    """
    from ..bag.reader import BagReader, ReaderConfig

    if max_frames is not None and max_frames < 1:
        raise ConfigError("max_frames", f"must be >= 1, got {max_frames}")
    started = time.perf_counter()
    vocabulary = resolve_vocabulary(vocab)
    things = thing_classes(vocabulary.names, classes, things=vocabulary.thing_names,
                           synonyms=[c.synonyms for c in vocabulary.classes], key="classes")
    if not things:
        raise ConfigError("classes", f"vocabulary {vocabulary.name!r} has no thing class "
                          f"({vocabulary.names}); name them with --classes")
    objects_vocab = sub_vocabulary(vocabulary, things)
    local = {c: i for i, c in enumerate(things)}  # vocabulary index -> PointCLIP class index
    if adapter is not None and views == "v1_zeroshot":
        views = "v1_fewshot"  # what `pointclip train` fits adapters on
    classifier = _classifier(model, pretrained, objects_vocab, projection, views, device,
                             align_yaw=True)
    if adapter is not None:
        classifier.attach_adapter(load_adapter(adapter, classifier.device))
    names = classifier.class_names

    reader = BagReader(bag, reader_config or ReaderConfig(cameras=[]))
    rows: list[dict[str, Any]] = []
    frames = labelled_frames = 0
    read_s: list[float] = []
    cluster_s: list[float] = []
    classify_s = 0.0
    tick = time.perf_counter()
    for frame in reader.frames():
        read_s.append(time.perf_counter() - tick)
        frames += 1
        if frame.labels is None:
            tick = time.perf_counter()
            continue
        labelled_frames += 1
        t0 = time.perf_counter()
        crops = cluster_objects(frame.xyz, vocabulary.map_labels(frame.labels), things,
                                voxel_size=voxel_size, min_points=min_points)
        t1 = time.perf_counter()
        with torch.no_grad():
            results = classifier.classify(crops)
        t2 = time.perf_counter()
        cluster_s.append(t1 - t0)
        classify_s += t2 - t1
        for obj, (pred, prob) in zip(crops, results, strict=True):
            box = obj.box
            rows.append({"frame": frame.index, "stamp_ns": frame.stamp_ns,
                         "label": names[local[obj.class_index]], "predicted": names[pred],
                         "probability": prob, "points": obj.num_points,
                         "box": {"center": list(box.center), "size": list(box.size),
                                 "yaw": box.yaw}})
        if max_frames is not None and labelled_frames >= max_frames:
            break
        tick = time.perf_counter()
    if labelled_frames == 0:
        raise ConfigError("bag", f"none of its {frames} sweeps has ground-truth labels (a "
                          "PointCloud2 topic with a `label` field, same stamp as the sweep)",
                          str(bag))

    real = not is_random(pretrained)
    correct = [r["label"] == r["predicted"] for r in rows]
    accuracy = float(np.mean(correct)) if rows and real else None
    truth = Counter(r["label"] for r in rows)
    predicted = Counter(r["predicted"] for r in rows)
    hits = Counter(r["label"] for r, ok in zip(rows, correct, strict=True) if ok)
    per_class = {n: {"objects": truth[n], "predicted": predicted[n],
                     "correct": hits[n] if real else None} for n in names}
    return {
        "objects": len(rows), "labelled": len(rows), "accuracy": accuracy,
        "accuracy_note": None if accuracy is not None else (
            "random CLIP weights: mechanics only" if not real else "no labelled objects"),
        "per_class": per_class,
        "frames": frames, "labelled_frames": labelled_frames,
        "objects_per_frame": len(rows) / labelled_frames,
        "timing_ms": {"read_per_frame": _ms(read_s), "cluster_per_frame": _ms(cluster_s),
                      "classify_per_object": _ms([classify_s], len(rows)),
                      "classify_total": 1e3 * classify_s},
        "source": {"kind": "bag", "path": str(bag), "skipped": dict(reader.skipped)},
        "model": model, "pretrained": pretrained if real else "random",
        "vocabulary": vocabulary.name, "classes": names, "projection": projection,
        "views": classifier.views.name, "adapter": str(adapter) if adapter else None,
        "voxel_size": voxel_size, "min_points": min_points,
        "seconds": time.perf_counter() - started, "results": rows,
    }
