"""Object files for PointCLIP evaluation and few-shot training: meshes and point files.

Meshes (OFF, PLY, OBJ, STL) are read with trimesh and sampled uniformly over their surface
(area-weighted, seeded), which is how ModelNet point sets are made; point files (``.npy``,
``.txt``/``.xyz``/``.csv`` with x y z in the first columns) are used as they are. An object's
class is the vocabulary class named by its folder (ModelNet's ``chair/train/chair_0001.off``)
or by the file name's prefix before ``_NNNN`` (``chair_0001.off``), underscores read as spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..vocabulary import Vocabulary

MESH_SUFFIXES = (".off", ".ply", ".obj", ".stl")
POINT_SUFFIXES = (".npy", ".txt", ".xyz", ".csv")


@dataclass(frozen=True)
class ObjectFile:
    path: Path
    points: np.ndarray  # (P, 3) float32
    label: int | None  # vocabulary class index, None when the name matches no class


def _points(path: Path, count: int, seed: int) -> np.ndarray:
    if path.suffix.lower() in MESH_SUFFIXES:
        try:
            import trimesh
        except ImportError as exc:
            raise ConfigError("data", "reading meshes needs trimesh (pip install "
                              "'clip2scene_ros[pointclip]')") from exc
        mesh = trimesh.load(str(path), force="mesh")
        if len(mesh.faces) == 0:
            return np.asarray(mesh.vertices, np.float32)[:count]
        points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
        return np.asarray(points, np.float32)
    if path.suffix.lower() == ".npy":
        data = np.load(path, allow_pickle=False)
    else:
        data = np.loadtxt(path, delimiter="," if path.suffix.lower() == ".csv" else None,
                          ndmin=2)
    if data.ndim != 2 or data.shape[1] < 3:
        raise ConfigError("data", f"expected rows of x y z, got shape {data.shape}", str(path))
    return np.asarray(data[:, :3], np.float32)


def class_of(path: Path, vocabulary: Vocabulary) -> int | None:
    """The class named by the file's folder or its name's prefix (see the module docstring)."""
    names = {n.lower(): i for i, n in enumerate(vocabulary.names)}
    for cls in vocabulary.classes:
        for synonym in cls.synonyms:
            names.setdefault(synonym.lower(), names[cls.name.lower()])
    prefix = re.sub(r"_\d+$", "", path.stem)
    for candidate in (prefix, *(p.name for p in path.parents[:3])):
        key = candidate.replace("_", " ").lower()
        if key in names:
            return names[key]
    return None


def load_objects(folder: str | Path, vocabulary: Vocabulary, points: int = 1024, seed: int = 0
                 ) -> list[ObjectFile]:
    """Every object file under ``folder`` (recursively, sorted), ``points`` points each."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of object files")
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in MESH_SUFFIXES + POINT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError("data", f"no {MESH_SUFFIXES + POINT_SUFFIXES} files", str(root))
    return [ObjectFile(p, _points(p, points, seed), class_of(p, vocabulary)) for p in files]
