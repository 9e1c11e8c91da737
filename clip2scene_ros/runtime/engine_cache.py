"""TensorRT engine cache: one engine per (graph, TensorRT version, GPU, precision, profile).

An engine is only valid for the TensorRT version and GPU that built it, so each cached engine
has a sidecar ``.json`` naming what it was built for plus the SHA-256 of the engine bytes
(written at build time). :meth:`EngineCache.get` rebuilds, with one log line saying why, when the
sidecar is missing or any field differs, and when the engine's size or bytes do not match the
ones recorded (a truncated or foreign file is never deserialised: the cache uses only engines it
wrote itself). The bytes returned are the bytes that were checked, read once. Writes are atomic.
The key holds the builder settings too (workspace limit, how fp16 is reached, per-stride profile
ratios, index dtype): an engine built with other settings is another file.

Building takes an exclusive lock (``<engine>.lock``, ``fcntl.flock``): a second process asking
for the same engine waits, then finds it cached, so two processes never build one engine at
once. The TensorRT timing cache lives beside the engines (:meth:`EngineCache.timing_cache_path`,
one per TensorRT version and GPU): later builds, for other precisions or profiles, reuse its
kernel timings.

Where engines live is decided here and only here (:func:`engine_cache_dir`): the folder given
(the node's ``engine_cache_dir``, the predictor's ``engine_cache``), else ``<bundle>/engines``
beside the bundle's ``model.onnx``. The bundle folder wins over a per-user cache because an
engine is only valid for the graph it was built from: it travels and is deleted with that graph,
and the node, the predictor and the TensorRT backend all find the same engine for the same
bundle. Give a folder where the bundle directory is read-only.

Building is injected (:data:`Builder`) so the cache logic is tested without a GPU; the real
builder is :func:`clip2scene_ros.runtime.tensorrt_backend.build_engine`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = 1

#: The engine folder inside a bundle directory, used when no folder is given.
BUNDLE_ENGINES_DIR = "engines"


def engine_cache_dir(bundle_path: str | Path, given: str | Path | None = None) -> Path:
    """The engine cache folder for the bundle at ``bundle_path``: ``given`` when it is set (not
    None and not empty), else ``<bundle_path>/engines``. Not resolved: callers that need an
    absolute path resolve it (:class:`EngineCache` does)."""
    if given:
        return Path(given)
    return Path(bundle_path) / BUNDLE_ENGINES_DIR


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. ``profile`` is (min, opt, max) points; ``builder`` the
    builder settings as canonical JSON (:func:`builder_settings`)."""

    onnx_sha256: str
    tensorrt_version: str
    gpu: str
    precision: str
    profile: tuple[int, int, int]
    builder: str = ""

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def builder_settings(**settings: object) -> str:
    """Canonical JSON of builder settings, for :attr:`EngineKey.builder`."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


#: Builds serialized engine bytes for a key (the ONNX path is passed alongside).
Builder = Callable[[Path, EngineKey], bytes]


@contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); yields whether another
    holder had to be waited for. Released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        waited = False
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("TensorRT engine: another process is building %s; waiting for it",
                        path.with_suffix("").name)
            waited = True
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class EngineCache:
    """Engines for one ONNX graph under ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().resolve()

    def paths(self, onnx_path: Path, key: EngineKey) -> tuple[Path, Path]:
        stem = f"{onnx_path.stem}-{key.precision}-{key.digest()}"
        return self.directory / f"{stem}.engine", self.directory / f"{stem}.json"

    def timing_cache_path(self, key: EngineKey) -> Path:
        """The TensorRT timing cache for ``key``'s TensorRT version and GPU (kernel timings do
        not depend on the graph, the precision or the profile)."""
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{key.gpu}-trt{key.tensorrt_version}").strip("_")
        return self.directory / f"timing-{slug}.cache"

    def stale_reason(self, engine: Path, sidecar: Path, key: EngineKey) -> str | None:
        """Why the cached engine cannot be used for ``key``, or None when it can."""
        return self._cached(engine, sidecar, key)[1]

    def _cached(self, engine: Path, sidecar: Path, key: EngineKey
                ) -> tuple[bytes | None, str | None]:
        """``(engine bytes, None)`` when the cache wrote this engine for ``key``, else
        ``(None, why not)``."""
        if not engine.is_file():
            return None, "no cached engine"
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return None, "its sidecar is missing or unreadable (not written by this cache)"
        if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
            return None, "its sidecar is not one this cache writes"
        if meta.get("format") != CACHE_FORMAT:
            return None, f"cache format {meta.get('format')} != {CACHE_FORMAT}"
        for name, want in asdict(key).items():
            have = meta["key"].get(name)
            if have != (list(want) if isinstance(want, tuple) else want):
                return None, f"{name} changed ({have} -> {want})"
        size = engine.stat().st_size
        if size != meta.get("bytes"):
            return None, (f"the engine file is {size} bytes, its sidecar records "
                          f"{meta.get('bytes')} (truncated or foreign)")
        data = engine.read_bytes()  # hashed and returned as one read: no swap in between
        if hashlib.sha256(data).hexdigest() != meta.get("engine_sha256"):
            return None, "the engine file does not match its recorded checksum (corrupt or foreign)"
        return data, None

    def get(self, onnx_path: Path, key: EngineKey, builder: Builder, *,
            rebuild: bool | str = False) -> tuple[bytes, Path]:
        """Serialized engine for ``key``: from the cache, or built (and cached) now, under the
        engine's lock. ``rebuild`` may be True or the reason the caller rebuilds (logged)."""
        engine, sidecar = self.paths(onnx_path, key)
        cached: bytes | None = None
        reason: str | None = None
        if not rebuild:
            cached, reason = self._cached(engine, sidecar, key)
            if cached is not None:
                log.info("TensorRT engine: using cached %s", engine)
                return cached, engine
        with exclusive_lock(engine.with_name(engine.name + ".lock")) as waited:
            if waited:  # the other process built it meanwhile (or failed: then build here)
                cached, reason = self._cached(engine, sidecar, key)
                if cached is not None:
                    log.info("TensorRT engine: using %s, built by another process", engine)
                    return cached, engine
            elif rebuild:
                reason = rebuild if isinstance(rebuild, str) else "rebuild requested"
            return self._build(onnx_path, key, builder, engine, sidecar, str(reason))

    def _build(self, onnx_path: Path, key: EngineKey, builder: Builder, engine: Path,
               sidecar: Path, reason: str) -> tuple[bytes, Path]:
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
