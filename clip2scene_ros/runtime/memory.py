"""Process-wide malloc settings for a long-running inference process (the node).

:func:`limit_heap_growth` fixes glibc's mmap threshold, called once at node start-up. Why
(issue 8, the soak): glibc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB by default)
with its own ``mmap`` and gives it back to the OS on ``free``. But the threshold is dynamic:
each time such a block is freed, glibc raises the threshold to that block's size (up to 32
MiB), so from then on the per-frame tensors of the sparse trunk (kernel maps, features, GEMM
scratch: hundreds of KiB to tens of MiB, a little different in size every frame) are carved
out of the heap instead, where they fragment and are rarely returned. The node's RSS then
climbed by about 40 MiB per 1,000 frames for ~2,500 frames before it levelled off.

Setting the threshold explicitly (``mallopt(M_MMAP_THRESHOLD, ...)``) turns the dynamic
adjustment off: big tensors keep their own mappings and go back to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks of this size or more get their own mapping (glibc's default before the dynamic raise).
MMAP_THRESHOLD_BYTES = 128 * 1024


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on another C library (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def limit_heap_growth(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes (see the module doc).

    Call once, early in the process. Returns True when glibc accepted it; False (and does
    nothing) on a platform without glibc or when ``mallopt`` refuses.
    """
    libc = _glibc()
    if libc is None:
        log.debug("limit_heap_growth: not glibc, malloc settings left as they are")
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if not ok:
        log.warning("limit_heap_growth: mallopt(M_MMAP_THRESHOLD, %d) refused", mmap_threshold)
    return ok
