"""Object files for PointCLIP evaluation and few-shot training: meshes and point files.

Meshes (OFF, PLY, OBJ, STL) are read with trimesh and sampled uniformly over their surface
(area-weighted, seeded), which is how ModelNet point sets are made; point files (``.npy``,
``.xyz``/``.pts``/``.txt``/``.csv`` with x y z in the first columns) are used as they are.

An object's class is, in this order:

1. the one given by ``labels.csv`` at the top of the folder, when there is one: rows of
   ``file,label`` (an optional header row ``file,label``), ``file`` relative to the folder,
   ``label`` a class of the vocabulary or one of its synonyms;
2. the vocabulary class named by its folder (ModelNet's ``chair/train/chair_0001.off``);
3. or by the file name's prefix before ``_NNNN`` (``chair_0001.off``), underscores read as
   spaces.

Everything else in the folder (a ``README.txt``, pictures, a ``.csv`` or ``.txt`` that does not
hold rows of numbers) is left out, and one line (the ``clip2scene_ros.pointclip.data`` logger,
level warning) names what was left out. A file that should hold an object but cannot be read
raises a ``ConfigError`` whose message names it.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..errors import ConfigError
from ..vocabulary import Vocabulary

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".off", ".ply", ".obj", ".stl")
POINT_SUFFIXES = (".npy", ".xyz", ".pts", ".txt", ".csv")
#: Text files that may hold points or anything else (notes, tables): one that does not parse as
#: rows of at least three numbers is left out rather than an error.
AMBIGUOUS_SUFFIXES = (".txt", ".csv")
LABELS_FILE = "labels.csv"
#: How many left-out files the one log line names before "and N more".
SKIPPED_NAMES_SHOWN = 5


@dataclass(frozen=True)
class ObjectFile:
    path: Path
    points: np.ndarray  # (P, 3) float32
    label: int | None  # vocabulary class index, None when the name matches no class


def _mesh_points(path: Path, count: int, seed: int) -> np.ndarray:
    try:
        import trimesh
    except ImportError as exc:
        raise ConfigError("data", "reading meshes needs trimesh (pip install "
                          "'clip2scene_ros[pointclip]')", str(path)) from exc
    try:
        # force="mesh" makes it a Trimesh (the annotation says any Geometry)
        mesh = cast("trimesh.Trimesh", trimesh.load(str(path), force="mesh"))
        vertices = np.asarray(mesh.vertices, np.float32)
        if len(vertices) == 0:
            raise ValueError("the mesh has no vertices")
        if len(mesh.faces) == 0:
            return vertices[:count]
        points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    except ConfigError:
        raise
    except Exception as exc:  # trimesh raises anything from ValueError to IndexError
        raise ConfigError("data", f"cannot read the mesh: {type(exc).__name__}: {exc}",
                          str(path)) from exc
    return np.asarray(points, np.float32)


def _text_points(path: Path) -> np.ndarray:
    """Rows of numbers; a ``.csv`` may start with one header row."""
    delimiter = "," if path.suffix.lower() == ".csv" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty file: checked by the caller
        try:
            return np.loadtxt(path, delimiter=delimiter, ndmin=2)
        except ValueError:
            if delimiter is None:
                raise
            return np.loadtxt(path, delimiter=delimiter, ndmin=2, skiprows=1)


def _points(path: Path, count: int, seed: int) -> np.ndarray:
    """``(P, 3)`` float32 points of one object file; ConfigError naming ``path`` if it cannot
    be read."""
    suffix = path.suffix.lower()
    if suffix in MESH_SUFFIXES:
        return _mesh_points(path, count, seed)
    try:
        data = np.load(path, allow_pickle=False) if suffix == ".npy" else _text_points(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("data", f"cannot read points: {exc}", str(path)) from exc
    if data.ndim != 2 or data.shape[1] < 3 or not np.issubdtype(data.dtype, np.number):
        raise ConfigError("data", f"expected rows of x y z, got shape {data.shape}", str(path))
    if data.shape[0] == 0:
        raise ConfigError("data", "holds no points", str(path))
    return np.asarray(data[:, :3], np.float32)


def _class_names(vocabulary: Vocabulary) -> dict[str, int]:
    """Lower-case class names and synonyms to class indices."""
    names = {n.lower(): i for i, n in enumerate(vocabulary.names)}
    for cls in vocabulary.classes:
        for synonym in cls.synonyms:
            names.setdefault(synonym.lower(), names[cls.name.lower()])
    return names


def class_of(path: Path, vocabulary: Vocabulary) -> int | None:
    """The class named by the file's folder or its name's prefix (see the module docstring)."""
    names = _class_names(vocabulary)
    prefix = re.sub(r"_\d+$", "", path.stem)
    for candidate in (prefix, *(p.name for p in path.parents[:3])):
        key = candidate.replace("_", " ").lower()
        if key in names:
            return names[key]
    return None


def _absolute(path: Path) -> Path:
    """``path`` absolute and with ``..`` folded, symbolic links kept (they may point anywhere)."""
    return Path(os.path.normpath(path.absolute()))


def read_labels_csv(path: Path, vocabulary: Vocabulary) -> dict[Path, int]:
    """``labels.csv`` as (normalised, absolute) file path → class index; the format is in the
    module docstring.

    Raises ConfigError naming the csv row for a malformed row, a label the vocabulary does not
    know or a file listed twice, and naming the file for a listed file that does not exist.
    """
    names = _class_names(vocabulary)
    root = _absolute(path.parent)
    labels: dict[Path, int] = {}
    rows_of: dict[Path, int] = {}
    first = True
    with path.open(newline="", encoding="utf-8-sig") as stream:
        rows = list(csv.reader(stream))
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        header, first = first and [c.lower() for c in cells] == ["file", "label"], False
        if header:
            continue
        key = f"labels.csv row {number}"
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise ConfigError(key, f"expected two columns file,label, got {row!r}", str(path))
        file, label = cells
        index = names.get(label.replace("_", " ").lower())
        if index is None:
            raise ConfigError(key, f"label {label!r} (for {file}) is not a class of the "
                              f"vocabulary {vocabulary.name!r}", str(path))
        target = _absolute(root / file)
        if Path(file).is_absolute() or not target.is_relative_to(root):
            raise ConfigError(key, f"{file} is not a path inside {root}", str(path))
        if not target.is_file():
            raise ConfigError(key, f"the listed file {target} does not exist", str(path))
        if target in labels:
            raise ConfigError(key, f"{file} is already listed in row {rows_of[target]}",
                              str(path))
        labels[target], rows_of[target] = index, number
    return labels


def load_objects(folder: str | Path, vocabulary: Vocabulary, points: int = 1024, seed: int = 0
                 ) -> list[ObjectFile]:
    """Every object file under ``folder`` (recursively, sorted), ``points`` points each.

    Files that are not point or mesh data are left out with one log line naming them; the
    classes follow ``labels.csv`` first, then folder and file names (module docstring).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of object files")
    labels_csv = root / LABELS_FILE
    listed = read_labels_csv(labels_csv, vocabulary) if labels_csv.is_file() else {}
    objects: list[ObjectFile] = []
    skipped: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path == labels_csv:
            continue
        key = _absolute(path)
        suffix = path.suffix.lower()
        if suffix not in MESH_SUFFIXES + POINT_SUFFIXES and key not in listed:
            skipped.append(str(path.relative_to(root)))
            continue
        try:
            data = _points(path, points, seed)
        except ConfigError:
            if suffix in AMBIGUOUS_SUFFIXES and key not in listed:
                skipped.append(str(path.relative_to(root)))
                continue
            raise
        label = listed[key] if key in listed else class_of(path, vocabulary)
        objects.append(ObjectFile(path, data, label))
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_NAMES_SHOWN])
        more = len(skipped) - SKIPPED_NAMES_SHOWN
        log.warning("%s: skipped %d file%s, not point or mesh data: %s%s", root,
                    len(skipped), "" if len(skipped) == 1 else "s", shown,
                    f" and {more} more" if more > 0 else "")
    if not objects:
        raise ConfigError("data", f"no object files ({', '.join(MESH_SUFFIXES + POINT_SUFFIXES)}"
                          f"){f'; skipped {len(skipped)} other files' if skipped else ''}",
                          str(root))
    return objects
