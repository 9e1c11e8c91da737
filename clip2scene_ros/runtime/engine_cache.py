"""TensorRT engine cache: one engine per (graph, TensorRT version, GPU, precision, profile).

An engine is only valid for the TensorRT version and GPU that built it, so each cached engine
has a sidecar ``.json`` naming what it was built for plus the SHA-256 of the engine bytes
(written at build time). :meth:`EngineCache.get` rebuilds, with one log line saying why, when the
sidecar is missing or any field differs, and when the engine's bytes do not match the recorded
checksum (a truncated or foreign file is never deserialised). Writes are atomic.

Building is injected (:data:`Builder`) so the cache logic is tested without a GPU; the real
builder is :func:`clip2scene_ros.runtime.tensorrt_backend.build_engine`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write_bytes, file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. ``profile`` is (min, opt, max) points."""

    onnx_sha256: str
    tensorrt_version: str
    gpu: str
    precision: str
    profile: tuple[int, int, int]

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Builds serialized engine bytes for a key (the ONNX path is passed alongside).
Builder = Callable[[Path, EngineKey], bytes]


class EngineCache:
    """Engines for one ONNX graph under ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().resolve()

    def paths(self, onnx_path: Path, key: EngineKey) -> tuple[Path, Path]:
        stem = f"{onnx_path.stem}-{key.precision}-{key.digest()}"
        return self.directory / f"{stem}.engine", self.directory / f"{stem}.json"

    def stale_reason(self, engine: Path, sidecar: Path, key: EngineKey) -> str | None:
        """Why the cached engine cannot be used for ``key``, or None when it can."""
        if not engine.is_file():
            return "no cached engine"
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return "its sidecar is missing or unreadable"
        if meta.get("format") != CACHE_FORMAT:
            return f"cache format {meta.get('format')} != {CACHE_FORMAT}"
        for name, want in asdict(key).items():
            have = meta.get("key", {}).get(name)
            if have != (list(want) if isinstance(want, tuple) else want):
                return f"{name} changed ({have} -> {want})"
        if file_sha256(engine) != meta.get("engine_sha256"):
            return "the engine file does not match its recorded checksum (corrupt or foreign)"
        return None

    def get(self, onnx_path: Path, key: EngineKey, builder: Builder, *, rebuild: bool = False
            ) -> tuple[bytes, Path]:
        """Serialized engine for ``key``: from the cache, or built (and cached) now."""
        engine, sidecar = self.paths(onnx_path, key)
        reason = "rebuild requested" if rebuild else self.stale_reason(engine, sidecar, key)
        if reason is None:
            log.info("TensorRT engine: using cached %s", engine)
            return engine.read_bytes(), engine
        log.warning("TensorRT engine: building %s because %s; %s %s, profile %s points "
                    "(this can take minutes)", engine.name, reason, key.gpu, key.precision,
                    "/".join(map(str, key.profile)))
        data = builder(onnx_path, key)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(engine, data)
        meta = {"format": CACHE_FORMAT, "key": asdict(key), "onnx": str(onnx_path),
                "engine_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        atomic_write_bytes(sidecar, json.dumps(meta, indent=2).encode())
        log.info("TensorRT engine: cached %s (%.1f MB)", engine, len(data) / 1e6)
        return data, engine
