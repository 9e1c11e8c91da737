"""``clip2scene pointclip eval`` and ``train``: PointCLIP over a folder of object files.

(Object crops of a labelled bag: :mod:`.crops`.) With random CLIP weights the run checks the
mechanics only (projection, encoding, logits, bookkeeping) and reports ``accuracy: null``; with
real weights (an open_clip tag or a local file) it reports top-1 accuracy over the objects whose
class the vocabulary knows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..teacher.clip_loader import RANDOM as RANDOM_TAGS
from ..teacher.clip_loader import load_clip
from ..teacher.text_bank import resolve_vocabulary
from ..vocabulary import Vocabulary
from .adapter import load_adapter, save_adapter, train_adapter
from .classifier import PointCLIPClassifier
from .data import load_objects


def is_random(pretrained: str | None) -> bool:
    """Whether ``pretrained`` means random weights, as :func:`load_clip` reads it."""
    return pretrained is None or pretrained.strip().lower() in RANDOM_TAGS


def _classifier(model: str, pretrained: str | None, vocab: str | Vocabulary, projection: str,
                views: str, device: str, **options: Any) -> PointCLIPClassifier:
    clip, tokenizer = load_clip(model, None if is_random(pretrained) else pretrained, device)
    vocabulary = vocab if isinstance(vocab, Vocabulary) else resolve_vocabulary(vocab)
    return PointCLIPClassifier(clip, tokenizer, vocabulary, projection=projection,  # type: ignore[arg-type]
                               views=views, **options)


def evaluate_folder(data: str | Path, *, model: str = "ViT-B-16", pretrained: str | None = None,
                    vocab: str = "modelnet40", projection: str = "v1",
                    views: str = "v1_zeroshot", adapter: str | Path | None = None,
                    points: int = 1024, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Classify every object file under ``data``; the JSON result of ``pointclip eval``."""
    started = time.perf_counter()
    classifier = _classifier(model, pretrained, vocab, projection,
                             "v1_fewshot" if adapter is not None and views == "v1_zeroshot"
                             else views, device)
    if adapter is not None:
        classifier.attach_adapter(load_adapter(adapter, classifier.device))
    objects = load_objects(data, classifier.vocabulary, points, seed)
    with torch.no_grad():
        results = classifier.classify([o.points for o in objects])
    names = classifier.class_names
    rows = [{"file": str(o.path), "label": None if o.label is None else names[o.label],
             "predicted": names[c], "probability": p}
            for o, (c, p) in zip(objects, results, strict=True)]
    labelled = [(o.label, c) for o, (c, _) in zip(objects, results, strict=True)
                if o.label is not None]
    real = not is_random(pretrained)
    accuracy = (float(np.mean([t == c for t, c in labelled]))
                if labelled and real else None)
    return {
        "objects": len(objects), "labelled": len(labelled), "accuracy": accuracy,
        "accuracy_note": None if accuracy is not None else (
            "random CLIP weights: mechanics only" if not real else "no labelled objects"),
        "model": model, "pretrained": pretrained if real else "random",
        "vocabulary": classifier.vocabulary.name, "projection": projection,
        "views": classifier.views.name, "adapter": str(adapter) if adapter else None,
        "seconds": time.perf_counter() - started, "results": rows,
    }


def train_folder(data: str | Path, out: str | Path, *, shots: int = 16, epochs: int = 250,
                 model: str = "ViT-B-16", pretrained: str | None = None,
                 vocab: str = "modelnet40", projection: str = "v1", points: int = 1024,
                 seed: int = 2, device: str = "cpu") -> dict[str, Any]:
    """Few-shot inter-view adapter from the labelled object files under ``data``."""
    classifier = _classifier(model, pretrained, vocab, projection, "v1_fewshot", device)
    labelled = [(o.points, o.label) for o in load_objects(data, classifier.vocabulary, points, seed)
                if o.label is not None]
    training = train_adapter(classifier, [p for p, _ in labelled], [c for _, c in labelled],
                             shots=shots, epochs=epochs, seed=seed)
    path = save_adapter(out, training.adapter, {"data": str(data), "shots": shots,
                                                "model": model, "pretrained": str(pretrained)})
    return {"adapter": str(path), "objects": len(labelled), "epochs": epochs,
            "first_loss": training.losses[0], "last_loss": training.losses[-1]}
