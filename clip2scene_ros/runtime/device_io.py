"""Moving a frame to the device once, and counting the times its path reads values back.

:func:`upload_cloud` sends a prepared cloud's coordinates and features up as one ``[N, 3 + F]``
copy from pinned (page-locked) host memory, which the GPU reads by DMA without a staging copy;
everything after it (voxels, kernel maps, plans) is made on the device from those tensors.

Every host read of a device tensor (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``) makes the host wait for the GPU. :func:`count_host_reads` counts them
in a block by wrapping those methods of ``torch.Tensor`` for its duration; on a CPU it counts
the reads of CPU tensors, which are the calls that would wait on a GPU, so the count is tested
without one.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..preprocess import PreparedCloud

#: ``torch.Tensor`` methods that copy a value to the host (and wait for the device).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
              "__index__")

_lock = threading.RLock()  # nested blocks restore in LIFO order


class PinnedBuffer:
    """A grow-only pinned host buffer reused frame after frame (pinning is slow to allocate)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """A pinned float32 ``[rows, cols]`` view, free to overwrite (the last copy is done)."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous frame's upload may still be reading it
        need = rows * cols
        if self.buffer is None or self.buffer.numel() < need:
            self.buffer = torch.empty(max(need, 1), dtype=torch.float32, pin_memory=True)
        return self.buffer[:need].view(rows, cols)


def upload_cloud(prepared: PreparedCloud, device: torch.device,
                 pinned: PinnedBuffer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords [N, 3], feats [N, F])`` float32 on ``device``: on CUDA one non-blocking copy of
    a pinned ``[N, 3 + F]`` buffer (``pinned`` reuses one), then contiguous splits on the
    device; on a CPU the arrays themselves (no copy)."""
    if device.type != "cuda":
        return torch.from_numpy(prepared.coords), torch.from_numpy(prepared.feats)
    n, f = prepared.num_points, prepared.feats.shape[1]
    if pinned is None:
        host = torch.empty((n, 3 + f), dtype=torch.float32, pin_memory=True)
    else:
        host = pinned.take(n, 3 + f)
    view = host.numpy()
    np.copyto(view[:, :3], prepared.coords, casting="same_kind")
    np.copyto(view[:, 3:], prepared.feats, casting="same_kind")
    both = host.to(device, non_blocking=True)
    if pinned is not None:
        pinned.copied = torch.cuda.Event()
        pinned.copied.record(torch.cuda.current_stream(device))
    return both[:, :3].contiguous(), both[:, 3:].contiguous()


@dataclass
class HostReads:
    """Host reads counted by :func:`count_host_reads`, by method name (and by call site,
    ``"path:line function"`` with the path from the package's parent, when asked)."""

    by_method: Counter[str] = field(default_factory=Counter)
    by_site: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_method.values())


@contextmanager
def count_host_reads(device: torch.device | str, *, sites: bool = False
                     ) -> Iterator[HostReads]:
    """Count calls of :data:`HOST_READS` on tensors on ``device`` made inside the block (any
    thread; a block in one thread waits for another thread's to end); ``sites`` also counts
    them by the line that made them (:attr:`HostReads.by_site`)."""
    device = torch.device(device)
    reads = HostReads()
    saved: list[tuple[str, Any]] = []

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type == device.type:
                reads.by_method[name] += 1
                if sites:
                    reads.by_site[_caller()] += 1
            return method(self, *args, **kwargs)
        counted.__name__ = name
        return counted

    with _lock:
        for name in HOST_READS:
            saved.append((name, vars(torch.Tensor).get(name)))
            setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        try:
            yield reads
        finally:
            for name, own in saved:
                if own is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)


def _caller() -> str:
    """``"path:line function"`` of the code that called the counted method, past every
    ``counted`` wrapper (nested blocks wrap the wrappers), the path from the folder that holds
    the package."""
    frame = sys._getframe(2)
    while (frame.f_back is not None and frame.f_code.co_name == "counted"
           and frame.f_code.co_filename == __file__):
        frame = frame.f_back
    code = frame.f_code
    path = code.co_filename.replace("\\", "/")
    _, found, tail = path.rpartition("/clip2scene_ros/")
    return f"{'clip2scene_ros/' + tail if found else path}:{frame.f_lineno} {code.co_name}"
