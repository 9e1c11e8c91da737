"""Vocabularies as data: class names, synonyms, palette and the dataset label ids they cover.

A vocabulary file (``config/vocabularies/*.yaml``) names the classes the network can output. The
text bank built from it (one CLIP text embedding per class) is what makes the label set
swappable at run time; the ``ids`` of each class map a dataset's ground-truth label ids onto
the vocabulary for evaluation. ``thing: true`` marks a class as a countable object ("thing":
cars, people, poles, ...) as opposed to "stuff" (road, vegetation, buildings): the object pass
clusters and names only thing classes (:mod:`clip2scene_ros.pointclip.things`).

:func:`known_thing_names` is the thing classes (names and synonyms) of the shipped vocabularies:
what a vocabulary that flags no class is matched against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from .config import load_config
from .errors import ConfigError


@dataclass(frozen=True)
class VocabularyClass:
    name: str
    color: tuple[int, int, int]
    synonyms: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    thing: bool = False  # a countable object class (clustered into instances), not stuff

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("name", "must not be empty")
        if any(not 0 <= c <= 255 for c in self.color):
            raise ConfigError("color", f"each channel must be in 0..255, got {self.color}")
        if any(not 0 <= i <= 65534 for i in self.ids):
            raise ConfigError("ids", f"label ids must be in 0..65534, got {self.ids}")


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[VocabularyClass, ...]
    ignore_ids: tuple[int, ...] = ()
    description: str = ""
    prompts: str | None = field(default=None)  # name of a prompt-template set in config/

    def validate(self) -> None:
        if not self.classes:
            raise ConfigError("classes", "must list at least one class")
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("classes", f"duplicate class names {dupes}")
        seen: dict[int, str] = {}
        for i, cls in enumerate(self.classes):
            for label_id in cls.ids:
                if label_id in seen:
                    raise ConfigError(
                        f"classes[{i}].ids",
                        f"label id {label_id} is already mapped to {seen[label_id]!r}",
                    )
                if label_id in self.ignore_ids:
                    raise ConfigError(f"classes[{i}].ids", f"label id {label_id} is also ignored")
                seen[label_id] = cls.name

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def thing_names(self) -> tuple[str, ...]:
        """Names of the classes flagged ``thing: true``, in class order."""
        return tuple(c.name for c in self.classes if c.thing)

    @property
    def palette(self) -> np.ndarray:
        """``(C, 3)`` uint8 RGB colours, one per class."""
        return np.array([c.color for c in self.classes], dtype=np.uint8).reshape(-1, 3)

    def label_map(self, ignore_index: int = -1) -> np.ndarray:
        """Lookup table from dataset label id (0..max id) to class index, ``ignore_index`` else."""
        top = max([i for c in self.classes for i in c.ids] + list(self.ignore_ids) + [0])
        table = np.full(top + 1, ignore_index, dtype=np.int64)
        for index, cls in enumerate(self.classes):
            table[list(cls.ids)] = index
        return table

    def map_labels(self, labels: np.ndarray, ignore_index: int = -1) -> np.ndarray:
        """Dataset label ids to class indices; unknown ids become ``ignore_index``."""
        table = self.label_map(ignore_index)
        labels = np.asarray(labels).astype(np.int64)
        known = (labels >= 0) & (labels < table.size)
        return np.where(known, table[np.clip(labels, 0, table.size - 1)], ignore_index)


def load_vocabulary(path: str | Path) -> Vocabulary:
    return load_config(Vocabulary, path)


def config_dir() -> Path:
    """The package's ``config/`` folder: the source tree's, or the installed share/ copy."""
    here = Path(__file__).resolve().parent.parent / "config"
    if here.is_dir():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("clip2scene_ros")) / "config"
    except (ImportError, LookupError) as exc:
        raise FileNotFoundError("cannot locate clip2scene_ros's config/ folder") from exc


def names_a_file(name_or_path: str | Path) -> bool:
    """Whether a vocabulary argument means a file rather than a shipped name: it exists, ends
    in ``.yaml``/``.yml`` or has folders (``modelnet40`` is a name, ``mine.yaml`` a file)."""
    path = Path(name_or_path)
    return path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1


def builtin_vocabulary(name: str) -> Path:
    """Path of a vocabulary shipped in ``config/vocabularies/``."""
    path = config_dir() / "vocabularies" / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no built-in vocabulary {name!r}; shipped: {shipped}")
    return path


def normalize_name(name: str) -> str:
    """Case, underscores and spacing folded: ``traffic_cone`` matches ``Traffic Cone``."""
    return " ".join(name.replace("_", " ").lower().split())


@cache
def known_thing_names() -> frozenset[str]:
    """Names and synonyms (:func:`normalize_name`-d) of every ``thing: true`` class of the
    vocabularies shipped in ``config/vocabularies/``."""
    out: set[str] = set()
    for path in sorted((config_dir() / "vocabularies").glob("*.yaml")):
        for cls in load_vocabulary(path).classes:
            if cls.thing:
                out.update(normalize_name(n) for n in (cls.name, *cls.synonyms))
    return frozenset(out)
