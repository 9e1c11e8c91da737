"""File helpers every writer shares: atomic replacement and content checksums."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import IntegrityError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary sibling and ``os.replace``.

    Readers (and a crash at any moment) see either the old file or the new one, never a part.
    A failed write (a full disk, an I/O error) removes the temporary file and raises ``OSError``
    naming ``path``, with the original errno; the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide bundles and caches
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except OSError as exc:
        # ENOSPC and EIO name no file on their own: say which write failed and what is left
        text = (f"writing {path} failed ({exc.strerror or exc}); the previous {path.name}, if "
                "any, is unchanged")
        raise (OSError(exc.errno, text) if exc.errno is not None else OSError(text)) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_checked_tensors(tensor_path: Path, yaml_path: Path, tensors: dict[str, Any],
                         meta: dict[str, Any]) -> None:
    """``tensor_path`` (safetensors) then ``yaml_path`` (``meta`` plus the tensors' SHA-256).

    The tensors go first; the YAML, written second, records their checksum, so a crash between
    the two replaces is caught by :func:`load_checked_tensors` instead of pairing new tensors
    with old metadata.
    """
    import yaml
    from safetensors.torch import save

    atomic_write_bytes(tensor_path, save(tensors))
    text = yaml.safe_dump({**meta, "sha256": file_sha256(tensor_path)}, sort_keys=False,
                          allow_unicode=True, default_flow_style=None)
    atomic_write_bytes(yaml_path, text.encode("utf-8"))


def load_checked_tensors(tensor_path: Path, yaml_path: Path, what: str, fmt: str, version: int
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)`` of a pair written by :func:`save_checked_tensors`, never unpickled.

    ``IntegrityError`` names what is wrong: a missing file, another format or version, a checksum
    that does not match (another run's tensors, or an interrupted write), unreadable tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import read_yaml

    for file in (tensor_path, yaml_path):
        if not file.is_file():
            raise IntegrityError("<file>", f"{what} file is missing", str(file))
    where = str(yaml_path)
    meta = read_yaml(yaml_path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise IntegrityError("format", f"not a {what} (expected format: {fmt})", where)
    if meta.get("version") != version:
        raise IntegrityError("version", f"unsupported {what} version {meta.get('version')!r}",
                             where)
    if meta.get("sha256") != file_sha256(tensor_path):
        raise IntegrityError("sha256", f"{tensor_path.name} does not match this YAML (written by "
                             "another run, or interrupted); write it again", where)
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError("<file>", f"unreadable safetensors: {exc}", str(tensor_path)) from exc
    return tensors, meta
