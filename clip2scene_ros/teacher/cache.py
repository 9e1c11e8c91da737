"""The teacher cache: pseudo-labels of every point–pixel pair of a bag, computed once, and its
reader (:class:`TeacherCache`).

CLIP2Scene runs MaskCLIP on every training step; its images are frozen, so the labels can be
computed once per bag and read back for every epoch. For each frame, every camera image is
resized to ``image_size`` (224×416 as in CLIP2Scene), all cameras go through MaskCLIP in one
batch, the dense logits against the text bank are upsampled bilinearly to the resized image, and
each point–pixel pair takes the label (argmax: the text bank's row, i.e. the class index in
vocabulary order) and the confidence (max softmax at temperature 0.01) at its pixel.

On disk, a cache directory holds:

* ``shard-NNNNN.safetensors``: the tensors of a few frames, named ``f{frame}.points`` (int32 row
  of the point in the Frame), ``f{frame}.camera`` (uint8 position of the view in
  ``Frame.cameras``), ``f{frame}.label`` (uint16), ``f{frame}.confidence`` (float16) and, with
  ``store_features``, ``f{frame}.features`` ([P, D] float16, the L2-normalised MaskCLIP feature
  sampled bilinearly at the pixel centre exactly as the logits are).
* ``index.yaml`` (one part per rank, ``index-rank{r}-of-{W}.yaml``, when ``world_size > 1``):
  the format version, the teacher config, the bag's content key, the cache key and per frame its
  stamp, shard, pairs and skipped cameras with their reasons.

The cache key is a hash of the bag's content key (``bag_content_key``), the reader config and the
teacher config. **A directory belongs to one key**: running another bag or another teacher config
into it is refused with the fields that differ (pick a new ``--out``), never silently mixed. With
the same key, every shard listed in the index and matching its checksum is reused; a finished
cache is returned without opening the bag or loading CLIP. A shard is written before the index
that lists it (both atomically), so an interrupted run resumes from its last listed shard and ends
with byte-identical files. Random CLIP weights are drawn from a fixed seed for the same reason.

Nothing here unpickles: tensors are safetensors, the index is YAML read with ``safe_load``.

The package splits along these lines: ``store.py`` (format, content keys, index parts),
``labeller.py`` (text source, teacher config, MaskCLIP's labels of a frame), ``simulated.py`` (the
simulated teacher), ``run.py`` (``run_teacher``: sources, shards, resume) and this module, the
reader the trainer and the quality report use.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError
from .store import parts_complete, read_parts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherLabels:
    """The cached teacher output of one frame.

    Attributes:
        index: the frame's ``Frame.index`` (position of its sweep in the LiDAR topic).
        stamp_ns: the sweep stamp.
        points: (P,) int32 row of each pair's point in the Frame's cloud.
        camera: (P,) uint8 position of the pair's view in ``Frame.cameras`` (``camera_names``).
        label: (P,) uint16 class index (row of the text bank, vocabulary order).
        confidence: (P,) float16 max softmax probability.
        features: (P, D) float16 unit MaskCLIP features, or None if not stored.
        camera_names: names of ``Frame.cameras`` in order.
        skipped: (camera, reason) of every camera without labels.
    """

    index: int
    stamp_ns: int
    points: np.ndarray
    camera: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None
    camera_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


#: Cache keys whose "simulated" warning was logged in this process (once each).
_SIMULATED_LOGGED: set[str] = set()


class TeacherCache:
    """Read a teacher cache directory, merging the index parts of every rank (no unpickling)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"teacher cache {self.path} does not exist")
        parts = read_parts(self.path)
        if not parts:
            raise FileNotFoundError(f"{self.path} has no teacher cache index (index*.yaml)")
        keys = {p.get("cache_key") for p in parts.values()}
        if len(keys) != 1:
            raise IntegrityError("cache_key",
                                 f"{self.path} mixes index parts of {len(keys)} caches")
        worlds = {int(p["layout"]["world_size"]) for p in parts.values()}
        if len(worlds) != 1:
            raise IntegrityError("world_size", f"{self.path} mixes index parts of world sizes "
                                 f"{sorted(worlds)}")
        first = next(iter(parts.values()))
        self.cache_key: str = str(first["cache_key"])
        self.teacher: dict[str, Any] = dict(first["teacher"])
        self.source: dict[str, Any] = dict(first["source"])
        self.world_size = worlds.pop()
        self.complete = parts_complete(parts)
        self.class_names: tuple[str, ...] = tuple(self.teacher["classes"])
        self.simulated: dict[str, Any] | None = self.teacher.get("simulated")
        if self.simulated and self.cache_key not in _SIMULATED_LOGGED:
            _SIMULATED_LOGGED.add(self.cache_key)
            log.warning("teacher cache %s is SIMULATED from ground truth (spec %r): its labels "
                        "measure the distillation, not CLIP", self.path,
                        self.simulated.get("spec", {}).get("name"))
        self._entries: dict[int, dict[str, Any]] = {}
        self.skipped: Counter[str] = Counter()
        for name, part in parts.items():
            for entry in part.get("frames", []):
                i = int(entry["index"])
                if i in self._entries:
                    raise IntegrityError("frames", f"frame {i} is in two index parts", name)
                self._entries[i] = entry
                self.skipped.update(s["reason"] for s in entry["skipped"])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: object) -> bool:
        return index in self._entries

    @property
    def indices(self) -> list[int]:
        """Frame indices in the cache, sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[TeacherLabels]:
        return (self.frame(i) for i in self.indices)

    def frame(self, index: int) -> TeacherLabels:
        """The labels of the frame whose ``Frame.index`` is ``index``."""
        from safetensors import safe_open

        entry = self._entries.get(int(index))
        if entry is None:
            raise KeyError(f"frame {index} is not in the teacher cache {self.path}")
        prefix = f"f{int(index)}."
        with safe_open(str(self.path / entry["shard"]), framework="np") as f:
            keys = set(f.keys())

            def get(name: str) -> np.ndarray | None:
                return f.get_tensor(prefix + name) if prefix + name in keys else None

            required = [get(n) for n in ("points", "camera", "label", "confidence")]
            features = get("features")
        arrays = [a for a in required if a is not None]
        if len(arrays) != len(required):
            raise IntegrityError("shard", f"frame {index} lacks some of its tensors",
                                 entry["shard"])
        points, camera, label, confidence = arrays
        return TeacherLabels(
            index=int(index), stamp_ns=int(entry["stamp_ns"]), points=points, camera=camera,
            label=label, confidence=confidence, features=features,
            camera_names=tuple(entry["cameras"]),
            skipped=tuple((s["camera"], s["reason"]) for s in entry["skipped"]),
        )
