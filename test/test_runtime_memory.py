"""A frame's tensors are freed when the frame is done, not when the cyclic GC next runs.

The soak's RSS climbed ~40 MiB / 1,000 frames for ~2,500 frames and then stayed flat: every
prediction left its kernel maps (KernelMap <-> CompactPairs, KernelMap <-> its transposed map)
in reference cycles, about 4 MiB of tensors per frame. The young generations collect most of
them, but the ones promoted to the oldest generation wait for a full collection, which CPython
runs only once the objects promoted since the last one exceed a quarter of all long-lived
objects (hundreds of thousands once torch is imported): about 1,800 frames in a plain loop. The
heap grown meanwhile stays. These tests fail as soon as a cycle through a frame's tensors
comes back.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_ros.frame import Frame
from clip2scene_ros.models.spvcnn import save_random_bundle
from clip2scene_ros.runtime.predictor import Predictor
from clip2scene_ros.sparse import SparseTensor, get_kernel_map, get_transposed_map


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic collector off: what is freed here is freed by reference counting alone."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _holds_tensor(obj: object) -> bool:
    for ref in gc.get_referents(obj):
        if isinstance(ref, torch.Tensor):
            return True
        if isinstance(ref, dict) and any(isinstance(v, torch.Tensor) for v in ref.values()):
            return True  # an instance's __dict__
    return False


def _tensor_holders_in_cycles() -> list[str]:
    """Collect; the types of the unreachable objects (cycles) that held tensors."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = gc.garbage[:]
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    return sorted({type(o).__qualname__ for o in found
                   if not isinstance(o, tuple | list | dict) and _holds_tensor(o)})


def test_kernel_maps_and_their_caches_are_freed_without_the_cyclic_gc(
        no_cyclic_gc: None) -> None:
    g = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.zeros(400, 1, dtype=torch.int64),
                        torch.randint(0, 16, (400, 3), generator=g)], dim=1).unique(dim=0)
    x = SparseTensor(torch.ones(len(coords), 4), coords)
    sub, down = get_kernel_map(x, 3), get_kernel_map(x, 2, 2)
    coarse = SparseTensor(torch.zeros(down.n_out, 1), down.out_coords, 2, x.cache)
    up = get_transposed_map(coarse, 2, 2)
    assert up is down.transposed() and up.transposed() is down  # the caches still answer
    for kmap in (sub, down, up):
        _ = kmap.compact().scatter  # every cache filled
    refs = [weakref.ref(m) for m in (sub, down, up, sub.compact(), up.compact())]
    del x, coarse, sub, down, up, kmap
    assert [r() is None for r in refs] == [True] * len(refs)
    assert _tensor_holders_in_cycles() == []


def test_a_prediction_leaves_no_tensor_to_the_cyclic_gc(tmp_path: Path,
                                                        no_cyclic_gc: None) -> None:
    bundle = save_random_bundle(tmp_path / "model", cr=0.125, clip_dim=8, voxel_size=0.4)
    predictor = Predictor(bundle, backend="torch", device="cpu")
    rng = np.random.default_rng(0)
    xyz = rng.uniform([-30, -30, -2], [30, 30, 2], (3000, 3)).astype(np.float32)
    frame = Frame(stamp_ns=1, frame_id="lidar", xyz=xyz,
                  intensity=rng.uniform(0, 1, 3000).astype(np.float32))
    predictor.predict([frame])  # first call: lazy one-time state
    _tensor_holders_in_cycles()
    result = predictor.predict([frame])
    assert result.features is not None and result.labels.label.shape == (3000,)
    del result
    assert _tensor_holders_in_cycles() == []
