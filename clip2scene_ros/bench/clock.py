"""One definition of "time spent in geometry", shared by ``bench sparse`` and ``bench predictor``.

Geometry is the integer work that depends only on coordinates: voxelisation, kernel maps (with
their compact pairs and CSR scatter tables), point <-> voxel maps and the ONNX graph's plan.
:data:`GEOMETRY` lists the functions that compute it; :class:`StageClock` wrapped around them
(:func:`patched`) adds up the wall and CPU time of the *outermost* calls only, so a function
that calls another listed one (``trilinear_index`` calls ``point_voxel_index``, ``get_kernel_map``
builds key tables, ``csr_conv`` reads ``KernelMap.compact``) is counted once.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: ``(module, attribute)`` of every function that computes geometry (indices only) on the
#: inference path; nested calls count once (the outermost).
GEOMETRY = (
    ("clip2scene_ros.sparse.conv", "get_kernel_map"),
    ("clip2scene_ros.sparse.conv", "get_transposed_map"),
    ("clip2scene_ros.sparse.kmap", "KernelMap.compact"),
    ("clip2scene_ros.sparse.kmap", "CompactPairs._build_scatter"),
    ("clip2scene_ros.sparse.voxelize", "voxelize"),
    ("clip2scene_ros.sparse.voxelize", "point_voxel_index"),
    ("clip2scene_ros.sparse.voxelize", "trilinear_index"),
    ("clip2scene_ros.sparse.voxelize", "pool_matrix"),
    ("clip2scene_ros.sparse.voxelize", "interp_bags"),
    ("clip2scene_ros.runtime.backends", "plan_for"),
)

_MISSING = object()


class StageClock:
    """Wall and calling-thread CPU time spent inside wrapped callables, outermost calls only.

    ``wall`` and ``cpu`` are the clocks read (seconds); tests pass fakes.
    """

    def __init__(self, wall: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.thread_time) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0  #: outermost calls clocked since the last :meth:`take_ms`
        self._wall, self._cpu = wall, cpu
        self._depth = 0

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return func(*args, **kwargs)
            self._depth += 1
            start, cpu = self._wall(), self._cpu()
            try:
                return func(*args, **kwargs)
            finally:
                self.seconds += self._wall() - start
                self.cpu_seconds += self._cpu() - cpu
                self.calls += 1
                self._depth -= 1
        timed.__wrapped__ = func  # type: ignore[attr-defined]
        return timed

    def take_ms(self) -> tuple[float, float]:
        """(wall ms, CPU ms) since the last call."""
        ms = (1e3 * self.seconds, 1e3 * self.cpu_seconds)
        self.seconds = self.cpu_seconds = 0.0
        self.calls = 0
        return ms


@contextlib.contextmanager
def patched(targets: Sequence[tuple[Any, str]], clock: StageClock) -> Iterator[None]:
    """Wrap ``owner.<name>`` (module, class or instance attribute) for each target with
    ``clock``; everything is restored on exit."""
    saved = []
    try:
        for owner, name in targets:
            own = vars(owner).get(name, _MISSING)
            saved.append((owner, name, own))
            setattr(owner, name, clock.wrap(getattr(owner, name)))
        yield
    finally:
        for owner, name, own in reversed(saved):
            if own is _MISSING:  # e.g. a method wrapped on an instance: drop the wrapper
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def geometry_targets(listed: Sequence[tuple[str, str]] = GEOMETRY) -> list[tuple[Any, str]]:
    """The ``(owner, name)`` pairs of ``listed`` that exist (modules imported here)."""
    targets = []
    for module_name, path in listed:
        owner: Any = importlib.import_module(module_name)
        *classes, name = path.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        if hasattr(owner, name):
            targets.append((owner, name))
    return targets


@contextlib.contextmanager
def geometry_clock(clock: StageClock) -> Iterator[StageClock]:
    """``clock`` around every :data:`GEOMETRY` function while the block runs."""
    with patched(geometry_targets(), clock):
        yield clock
