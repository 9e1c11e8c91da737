"""Which classes of a segmentation vocabulary are objects ("things"), and PointCLIP's vocabulary.

PointCLIP names *objects*: points of countable classes (cars, people, poles, ...) clustered into
instances. Road, vegetation or buildings are "stuff" and never clustered. Which classes are
things is vocabulary data: ``thing: true`` on a class of a vocabulary YAML, carried into
bundles and text banks as :attr:`~clip2scene_ros.models.bundle.VocabularySpec.things`.
:func:`thing_classes` picks, in this order: the classes a caller names; the classes the
vocabulary flags; for a vocabulary that flags none (a bundle written before the flag, a
hand-written file), the classes whose name (or synonym) is a thing of a shipped vocabulary
(:func:`~clip2scene_ros.vocabulary.known_thing_names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from ..vocabulary import Vocabulary, VocabularyClass, known_thing_names, normalize_name

__all__ = ["names_vocabulary", "normalize_name", "sub_vocabulary", "thing_classes"]


def thing_classes(class_names: Sequence[str], wanted: Sequence[str] = (), *,
                  things: Sequence[str] = (),
                  synonyms: Sequence[Sequence[str]] | None = None,
                  key: str = "classes") -> list[int]:
    """Indices (sorted) of the classes to cluster into objects.

    Args:
        class_names: the segmentation vocabulary's classes, in label order.
        wanted: class names to use; empty: ``things``, else the known thing names.
        things: the classes the vocabulary flags ``thing: true``.
        synonyms: per class, extra names matched against the known thing names.
        key: the parameter named in the error when ``wanted`` holds an unknown class.
    """
    index = {normalize_name(n): i for i, n in enumerate(class_names)}
    if wanted:
        unknown = [w for w in wanted if normalize_name(w) not in index]
        if unknown:
            raise ConfigError(key, f"{unknown} are not classes of the vocabulary "
                              f"{list(class_names)}")
        return sorted({index[normalize_name(w)] for w in wanted})
    if things:
        return sorted({index[normalize_name(t)] for t in things if normalize_name(t) in index})
    known = known_thing_names()
    out = []
    for i, name in enumerate(class_names):
        names = [name, *(synonyms[i] if synonyms is not None else ())]
        if any(normalize_name(n) in known for n in names):
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
