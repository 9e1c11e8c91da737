"""Where text banks are cached, and the key that says a cached bank is the one asked for.

Encoding a vocabulary through CLIP's text tower takes seconds to minutes; every bag labelled with
the same CLIP and vocabulary needs the same bank. Banks are kept in ``vocab build``'s format
(``FILE.safetensors`` + ``FILE.yaml``, see :mod:`.text_bank`, which reads and writes them) under
``<cache>/text_banks/<vocabulary>-<digest>``, where ``<cache>`` is ``$CLIP2SCENE_CACHE``, else
``$XDG_CACHE_HOME/clip2scene``, else ``~/.cache/clip2scene``.

The key holds everything that changes the bank's numbers: the model name, where the weights came
from (a pretrained tag, a file or random), a checksum of the text tower's weights and
architecture as loaded (so a re-downloaded tag, an edited file or another open_clip activation is
another key), every class's names and synonyms in order, every template, and the precision the
tower ran in. Palette, label ids and the vocabulary's name do not change the bank and are not in
the key.

The text tower's checksum needs the text tower. So that a run which only reads a cached bank
need not build it, each checksum is also remembered under the identity of the weights it was
computed from (``clip_loader.weights_identity``: model, versions, seed or weights file) in
``<cache>/text_towers/<digest>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import atomic_write_bytes
from .store import hash_json

if TYPE_CHECKING:
    from ..vocabulary import Vocabulary
    from .clip_loader import ClipModel

log = logging.getLogger(__name__)

CACHE_ENV = "CLIP2SCENE_CACHE"
BANKS_DIR = "text_banks"
TOWERS_DIR = "text_towers"
#: Version of the key's layout; a new layout never matches an old cached bank.
KEY_VERSION = 1
#: Characters kept from a vocabulary name in a cache file name.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def cache_root() -> Path:
    """``$CLIP2SCENE_CACHE``, else ``$XDG_CACHE_HOME/clip2scene``, else ``~/.cache/clip2scene``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "clip2scene"


def weights_origin(pretrained: str | None) -> str:
    """``random``, ``file`` (its content is in the tower checksum, not its path) or
    ``tag:NAME`` (a tag also fixes the activation open_clip builds)."""
    if pretrained is None or pretrained.strip().lower() in ("random", "none", ""):
        return "random"
    if Path(pretrained).expanduser().is_file():
        return "file"
    return f"tag:{pretrained}"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def text_tower_sha256(model: ClipModel) -> str:
    """sha256 of every non-image weight (name, dtype, shape, bytes) and of the text modules'
    structure (``repr``: layer types such as GELU or QuickGELU, widths, depths)."""
    digest = hashlib.sha256()
    for name, child in sorted(model.named_children()):
        if name != "visual":
            digest.update(f"{name}\0{child!r}\0".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("visual."):
            continue
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def bank_key(model_name: str, pretrained: str | None, tower_sha256: str,
             vocabulary: Vocabulary, templates: Sequence[str], precision: str) -> dict[str, Any]:
    """The cache key of a bank (a JSON-able mapping; :func:`key_digest` names it)."""
    return {
        "version": KEY_VERSION,
        "model": model_name.replace("/", "-"),
        "weights": weights_origin(pretrained),
        "text_tower": tower_sha256,
        "classes": [[c.name, *c.synonyms] for c in vocabulary.classes],
        "templates": list(templates),
        "precision": precision,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hash_json(key)


def bank_file(key: dict[str, Any], vocabulary_name: str, root: Path | None = None) -> Path:
    """The bank ``FILE`` (without suffix) a key is stored under."""
    name = _UNSAFE.sub("_", vocabulary_name).strip("._") or "vocabulary"
    return (cache_root() if root is None else root) / BANKS_DIR / f"{name}-{key_digest(key)[:24]}"


def _tower_file(weights: dict[str, Any]) -> Path:
    return cache_root() / TOWERS_DIR / f"{hash_json(weights)[:24]}.json"


def remember_text_tower(weights: dict[str, Any], tower_sha256: str) -> None:
    """Keep ``tower_sha256`` as the text-tower checksum of the weights ``weights`` names; a
    cache folder that cannot be written only costs a later run the text tower."""
    path = _tower_file(weights)
    record = {"weights": weights, "text_tower": tower_sha256}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, indent=1, sort_keys=True).encode())
    except OSError as exc:
        log.warning("text bank cache: cannot store the text tower's checksum in %s (%s)",
                    path.parent, exc)


def remembered_text_tower(weights: dict[str, Any]) -> str | None:
    """The text-tower checksum :func:`remember_text_tower` kept for ``weights``, else None (a
    record that is unreadable or names other weights is ignored, with a warning)."""
    path = _tower_file(weights)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        sha = record["text_tower"]
        if record["weights"] != json.loads(json.dumps(weights)) or not (
                isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ValueError("it names other weights or no sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("text bank cache: ignoring %s (%s)", path, exc)
        return None
    return sha
