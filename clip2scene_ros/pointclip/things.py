"""Which classes of a segmentation vocabulary are objects ("things"), and PointCLIP's vocabulary.

PointCLIP names *objects*: points of countable classes (cars, people, poles, ...) clustered into
instances. Road, vegetation or buildings are "stuff" and never clustered. Vocabularies carry no
thing/stuff flag, so a caller either names its thing classes or gets the classes whose name (or
synonym) is in :data:`THING_CLASS_NAMES`: the instance classes of the shipped driving
vocabularies (nuScenes detection classes, SemanticKITTI and Cityscapes things) plus poles, signs
and traffic lights, which have a distinct shape PointCLIP's depth maps can show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from ..vocabulary import Vocabulary, VocabularyClass

THING_CLASS_NAMES = frozenset({
    "car", "truck", "bus", "trailer", "construction vehicle", "other vehicle", "vehicle",
    "motorcycle", "bicycle", "pedestrian", "person", "rider", "bicyclist", "motorcyclist",
    "cyclist", "traffic cone", "barrier", "construction barrier", "pole", "traffic sign",
    "traffic light", "train",
})


def normalize_name(name: str) -> str:
    """Case, underscores and spacing folded: ``traffic_cone`` matches ``Traffic Cone``."""
    return " ".join(name.replace("_", " ").lower().split())


def thing_classes(class_names: Sequence[str], wanted: Sequence[str] = (), *,
                  synonyms: Sequence[Sequence[str]] | None = None,
                  key: str = "classes") -> list[int]:
    """Indices (sorted) of the classes to cluster into objects.

    Args:
        class_names: the segmentation vocabulary's classes, in label order.
        wanted: class names to use; empty: those in :data:`THING_CLASS_NAMES`.
        synonyms: per class, extra names matched against :data:`THING_CLASS_NAMES`.
        key: the parameter named in the error when ``wanted`` holds an unknown class.
    """
    index = {normalize_name(n): i for i, n in enumerate(class_names)}
    if wanted:
        unknown = [w for w in wanted if normalize_name(w) not in index]
        if unknown:
            raise ConfigError(key, f"{unknown} are not classes of the vocabulary "
                              f"{list(class_names)}")
        return sorted({index[normalize_name(w)] for w in wanted})
    out = []
    for i, name in enumerate(class_names):
        names = [name, *(synonyms[i] if synonyms is not None else ())]
        if any(normalize_name(n) in THING_CLASS_NAMES for n in names):
            out.append(i)
    return out


def sub_vocabulary(vocabulary: Vocabulary, indices: Sequence[int],
                   name: str | None = None) -> Vocabulary:
    """The classes ``indices`` of ``vocabulary`` (synonyms and colours kept, dataset ids too)."""
    if not indices:
        raise ConfigError("classes", f"no object classes in vocabulary {vocabulary.name!r}")
    return Vocabulary(name=name or f"{vocabulary.name}_objects",
                      classes=tuple(vocabulary.classes[i] for i in indices),
                      description=f"object classes of {vocabulary.name}",
                      prompts=vocabulary.prompts)


def names_vocabulary(name: str, class_names: Sequence[str],
                     palette: Sequence[Sequence[int]] | np.ndarray) -> Vocabulary:
    """A vocabulary from bare names and colours (a bundle keeps no synonyms)."""
    classes = tuple(VocabularyClass(n, tuple(int(c) for c in color))  # type: ignore[arg-type]
                    for n, color in zip(class_names, palette, strict=True))
    return Vocabulary(name=name, classes=classes)
