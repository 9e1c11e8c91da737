"""The teacher's own quality: its cached pair labels scored against a bag's ground truth.

Works for any teacher cache (MaskCLIP or simulated) of a labelled bag. Every cached pair is one
vote: a point seen by two cameras counts twice, as the teacher labelled it twice. Pairs whose
point carries no ground truth (the vocabulary's ignore ids) are left out of the counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metrics import ConfusionMatrix, nan_to_none
from ..vocabulary import Vocabulary
from .cache import TeacherCache
from .store import bag_content_key


def teacher_vocabulary(cache: TeacherCache, vocab: str | Path | None) -> Vocabulary:
    """The vocabulary whose ``ids`` map the bag's labels: the simulated spec's, else ``vocab``."""
    from .text_bank import bank_paths, resolve_vocabulary

    if vocab is not None and all(p.is_file() for p in bank_paths(vocab)):
        vocab = None  # a text bank names its vocabulary; the cache recorded it
    if vocab is None and cache.simulated:
        vocab = str(cache.simulated["spec"]["vocabulary"])
    elif vocab is None:
        vocab = str(cache.teacher.get("vocabulary"))
    vocabulary = resolve_vocabulary(vocab)
    if tuple(vocabulary.names) != cache.class_names:
        raise ConfigError("vocab", f"the vocabulary {vocabulary.name!r} has classes "
                          f"{vocabulary.names}, the cache labels {list(cache.class_names)}")
    return vocabulary


def teacher_quality(cache_dir: str | Path, bag: str | Path, vocab: str | Path | None = None,
                    *, reader_config: Any = None) -> dict[str, Any]:
    """``teacher_miou``, ``teacher_accuracy``, ``per_class`` IoU and ``paired_fraction`` (points
    with a teacher label over all points of the scored frames) of a cache on its bag."""
    from ..bag.reader import BagReader

    cache = TeacherCache(cache_dir)
    bag = Path(bag)
    own = cache.source.get("bag")
    if own is not None and own != bag_content_key(bag):
        raise ConfigError("bag", f"the teacher cache {cache.path} was computed from another bag",
                          str(bag))
    vocabulary = teacher_vocabulary(cache, vocab)
    matrix = ConfusionMatrix(len(vocabulary.classes))
    frames = points = paired = pairs = 0
    for frame in BagReader(bag, reader_config).frames():
        if frame.labels is None or frame.index not in cache:
            continue
        labels = cache.frame(frame.index)
        truth = vocabulary.map_labels(frame.labels)
        matrix.update(labels.label.astype(np.int64), truth[labels.points.astype(np.int64)])
        frames += 1
        points += frame.num_points
        paired += int(np.unique(labels.points).size)
        pairs += int(labels.points.size)
    if frames == 0:
        raise ConfigError("bag", "no frame has both ground-truth labels and teacher labels",
                          str(bag))
    metrics = matrix.to_dict(vocabulary.names)
    return {
        "teacher": (f"simulated:{cache.simulated['spec']['name']}" if cache.simulated
                    else f"maskclip:{cache.teacher.get('model')}"),
        "simulated": bool(cache.simulated),
        "teacher_miou": metrics["miou"],
        "teacher_accuracy": metrics["accuracy"],
        "per_class": metrics["per_class_iou"],
        "paired_fraction": nan_to_none(paired / points if points else float("nan")),
        "frames": frames,
        "points": points,
        "pairs": pairs,
        "scored_pairs": metrics["points"],
        "confusion": metrics["confusion"],
        "class_names": metrics["class_names"],
    }
