"""The teacher cache on disk: its format constants, content keys and index parts.

See :mod:`clip2scene_ros.teacher.cache` for the layout. Nothing here unpickles: the index is YAML
read with a safe loader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import IntegrityError
from ..files import file_sha256

CACHE_FORMAT = "clip2scene_teacher_cache"
CACHE_VERSION = 1
INDEX_NAME = "index.yaml"
#: Bytes hashed at each end of a file for a cheap content key.
_EDGE_BYTES = 1 << 20


def hash_json(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_edges_hash(path: Path) -> str:
    """sha256 of a file's size and its first and last MiB: cheap, and survives copies."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if size > 2 * _EDGE_BYTES:
            f.seek(size - _EDGE_BYTES)
            digest.update(f.read())
    return digest.hexdigest()


def bag_content_key(bag: Path) -> str:
    """A key of a rosbag2 directory's content, without reading the whole bag.

    sha256 over ``metadata.yaml`` (message counts, durations, file list) and, for every other
    file, its name, size and first and last MiB. Unlike mtimes it survives copying the bag; bags
    are never edited in place, so a same-size change in the middle of a file is not a concern.
    """
    bag = Path(bag)
    meta = bag / "metadata.yaml"
    if not meta.is_file():
        raise FileNotFoundError(f"{bag} is not a rosbag2 directory: it has no metadata.yaml")
    digest = hashlib.sha256(b"metadata.yaml\0" + meta.read_bytes())
    for path in sorted(bag.iterdir()):
        if path.is_file() and path.name != "metadata.yaml" and not path.name.startswith("."):
            digest.update(f"\0{path.name}\0{file_edges_hash(path)}".encode())
    return digest.hexdigest()


def index_name(rank: int, world_size: int) -> str:
    return INDEX_NAME if world_size == 1 else f"index-rank{rank:03d}-of-{world_size:03d}.yaml"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"


def dump_yaml(data: Any) -> bytes:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: fast on long indexes
    text = yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=None)
    return text.encode("utf-8")


def load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a safe loader: no objects


def read_parts(out: Path) -> dict[str, dict[str, Any]]:
    """Every index part in ``out`` by file name, format- and version-checked."""
    parts = {}
    for path in sorted(out.glob("index*.yaml")):
        data = load_yaml(path)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise IntegrityError("format", f"not a teacher cache index (expected {CACHE_FORMAT})",
                                 str(path))
        version = data.get("version")
        if not isinstance(version, int) or version > CACHE_VERSION or version < 1:
            raise IntegrityError("version", f"teacher cache version {version!r} is not supported "
                                 f"(this clip2scene_ros reads version {CACHE_VERSION}); recompute "
                                 "the cache into a new --out, or upgrade clip2scene_ros", str(path))
        parts[path.name] = data
    return parts


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def shard_verified(out: Path, shard: dict[str, Any]) -> bool:
    path = out / str(shard.get("name", ""))
    try:
        return path.stat().st_size == shard.get("bytes") and file_sha256(path) == shard["sha256"]
    except (OSError, KeyError):
        return False


def parts_complete(parts: dict[str, dict[str, Any]]) -> bool:
    sizes = {int(p["layout"]["world_size"]) for p in parts.values()}
    if len(sizes) != 1:
        return False
    world = sizes.pop()
    ranks = {int(p["layout"]["rank"]) for p in parts.values() if p.get("complete")}
    return ranks == set(range(world))
