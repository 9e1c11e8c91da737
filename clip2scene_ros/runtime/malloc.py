"""The node's glibc malloc settings, applied to the running process with ``mallopt``.

Big tensors and rclpy's message buffers (a few MB per frame) stay on the heap instead of being
mapped and unmapped, with their page faults, on every frame (docs/benchmarks.md, codecs). The
node applies them itself at start-up, so a plain ``ros2 run`` gets them too; what the user set
in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or the same tunable in
``GLIBC_TUNABLES``) wins, since glibc has already read it. No heavy imports: the benchmarks and
the node both use this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Any

#: the node's settings, by glibc's ``mallopt`` name
NODE_MALLOC: dict[str, int] = {"M_MMAP_THRESHOLD": 134217728, "M_TRIM_THRESHOLD": 268435456}
#: ``mallopt`` parameter numbers (glibc's malloc.h)
MALLOPT: dict[str, int] = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}
#: the environment variable and the GLIBC_TUNABLES name through which a user sets each one
ENV: dict[str, str] = {"M_MMAP_THRESHOLD": "MALLOC_MMAP_THRESHOLD_",
                       "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_"}
TUNABLES: dict[str, str] = {"M_MMAP_THRESHOLD": "glibc.malloc.mmap_threshold",
                            "M_TRIM_THRESHOLD": "glibc.malloc.trim_threshold"}


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings of :data:`NODE_MALLOC` the environment sets: name → ``VARIABLE=value``."""
    environ = os.environ if environ is None else environ
    tunables = dict(item.partition("=")[::2]
                    for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)
    found: dict[str, str] = {}
    for name in NODE_MALLOC:
        if ENV[name] in environ:
            found[name] = f"{ENV[name]}={environ[ENV[name]]}"
        elif TUNABLES[name] in tunables:
            found[name] = f"GLIBC_TUNABLES {TUNABLES[name]}={tunables[TUNABLES[name]]}"
    return found


def _libc() -> Any | None:
    """glibc (any C library with ``mallopt``), or None where there is none to load."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def apply_node_malloc(keep_env: bool = True) -> str:
    """Apply :data:`NODE_MALLOC` to this process; returns what is in effect: ``node``, or
    ``default`` where there is no ``mallopt`` (not glibc) or it refuses a value.

    ``keep_env`` leaves alone each setting the environment sets (:func:`env_settings`; it is
    still ``node`` then: the node's policy, the user's values); the benchmarks' explicit
    ``--malloc node`` passes False to apply all of them.
    """
    libc = _libc()
    if libc is None:
        return "default"
    skip = env_settings() if keep_env else {}
    try:
        ok = all(libc.mallopt(MALLOPT[name], value) == 1
                 for name, value in NODE_MALLOC.items() if name not in skip)
    except AttributeError:  # a C library without mallopt
        return "default"
    return "node" if ok else "default"


def describe(in_effect: str, environ: Mapping[str, str] | None = None) -> str:
    """One log line saying which settings :func:`apply_node_malloc` left in effect."""
    if in_effect != "node":
        return "glibc malloc: default settings (no mallopt, or it refused a value)"
    from_env = env_settings(environ)
    parts = [from_env.get(name, f"{name}={value}") for name, value in NODE_MALLOC.items()]
    return "glibc malloc: node settings " + ", ".join(parts)
