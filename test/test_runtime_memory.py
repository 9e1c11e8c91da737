"""``limit_heap_growth``: glibc's mmap threshold is fixed, so big blocks keep their own mapping.

Checked in a fresh interpreter (mallopt is process-wide; the test process is left alone) through
``mallinfo2``: a 4 MiB block is mmapped (``hblkhd``) the first time; after it is freed glibc's
dynamic threshold moves above 4 MiB and the next 4 MiB block comes from the heap, unless the
threshold was fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clip2scene_ros.runtime.memory import _glibc, limit_heap_growth

PROBE = r"""
import ctypes, json, sys
from clip2scene_ros.runtime.memory import limit_heap_growth

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = limit_heap_growth() if sys.argv[1] == "limit" else None
size = 4 << 20
mapped = []
for _ in range(2):
    block = libc.malloc(size)
    mapped.append(libc.mallinfo2().hblkhd >= size)
    libc.free(block)
print(json.dumps({"applied": applied, "mapped": mapped}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def glibc() -> None:
    if _glibc() is None:
        pytest.skip("not glibc: limit_heap_growth is a no-op here")


def test_without_the_limit_glibc_moves_a_freed_big_block_size_onto_the_heap(glibc: None) -> None:
    # the behaviour the fix exists for; if a glibc stops doing this the fix can go
    assert _probe("default") == {"applied": None, "mapped": [True, False]}


def test_limit_heap_growth_keeps_big_blocks_mmapped_after_a_free(glibc: None) -> None:
    assert _probe("limit") == {"applied": True, "mapped": [True, True]}


def test_limit_heap_growth_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clip2scene_ros.runtime.memory._glibc", lambda: None)
    assert limit_heap_growth() is False
