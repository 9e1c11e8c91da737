"""Where a rosbag2 bag fails to read: its storage files and the last message read before it broke.

A reader that fails on a bag (truncated or corrupt storage file, a message that cannot be read)
often says only *what* failed. :func:`locate_read_error` re-reads the bag's raw messages with
``rosbags``' ``AnyReader`` (no decoding) and returns ``(where, cause)``: ``opening FILES`` when
the storage cannot be opened, else the storage files and the topic, position in the topic and
log time of the last message read before the failure, and the exception that stopped it; None
when the raw messages read cleanly (the failure lies elsewhere, e.g. in decoding). Storage files
are named with their sizes (:func:`storage_files`), missing ones as missing. :data:`READ_ERRORS`
are the exceptions that reading a bag's storage raises, so that a caller can tell a damaged bag
from a bug when the raw re-read finds nothing.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import yaml
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError
from rosbags.typesys import Stores, get_typestore

__all__ = ["READ_ERRORS", "locate_read_error", "storage_files"]

#: Errors of reading a bag's storage. Anything else (a decompressor's own error, say) counts as
#: the bag's only when re-reading its raw messages fails too (locate_read_error); otherwise it
#: is a bug and propagates.
READ_ERRORS = (ValueError, OSError, EOFError, struct.error, AnyReaderError, ReaderError)


def storage_files(bag: Path) -> str:
    """The bag's storage files and their sizes, for messages."""
    try:
        meta = yaml.safe_load((bag / "metadata.yaml").read_text(encoding="utf-8")) or {}
        names = [str(n) for n in meta["rosbag2_bagfile_information"]["relative_file_paths"]]
    except Exception:  # only for a message: any unreadable metadata will do
        names = sorted(p.name for p in bag.glob("*") if p.name != "metadata.yaml")
    parts = []
    for name in names:
        path = bag / name
        parts.append(f"{path} ({path.stat().st_size} bytes)" if path.is_file()
                     else f"{path} (missing)")
    return ", ".join(parts) or f"{bag} (no storage file)"


def locate_read_error(bag: Path, typestore: str, *, start: int | None = None,
                       stop: int | None = None, first: Mapping[str, int] | None = None
                       ) -> tuple[str, str] | None:
    """``(where, cause)`` of the first failure reading ``bag``'s raw messages, or None.

    ``where`` is ``opening FILES`` when the storage cannot be opened, else the topic, position in
    the topic and log time of the last message read before it broke. Only log times in
    ``[start, stop)`` are read; ``first`` gives each topic's position at ``start`` (and limits
    the read to those topics).
    """
    files = storage_files(bag)
    try:
        reader = AnyReader([bag], default_typestore=get_typestore(Stores(typestore)))
        reader.open()
    except Exception as exc:  # whatever the storage raises is the answer
        return f"opening {files}", f"{type(exc).__name__}: {exc}"
    seen: Counter[str] = Counter(first or {})
    last: tuple[str, int, int] | None = None
    try:
        conns = [c for c in reader.connections if first is None or c.topic in first]
        for conn, log_ns, _ in reader.messages(connections=conns, start=start, stop=stop):
            last = (conn.topic, seen[conn.topic], log_ns)
            seen[conn.topic] += 1
    except Exception as exc:
        after = (f"after message {last[1]} of topic {last[0]} (log time {last[2]} ns)"
                 if last is not None else "at its first message"
                 + (f" from log time {start} ns" if start is not None else ""))
        return f"reading {files} {after}", f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            reader.close()
    return None
