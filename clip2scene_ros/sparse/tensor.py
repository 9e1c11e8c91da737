"""Sparse voxel tensors and point tensors with the caches that layers share.

A :class:`SparseTensor` is ``coords [N, 4]`` (batch, x, y, z; int32 or int64, on the finest grid,
multiples of ``stride``), ``feats [N, C]`` and a stride (3-tuple). Every tensor derived from the
same input (by convolutions, norms, activations, additions) shares one :class:`SparseCache`, so a
kernel map is built once per (stride, kernel size, conv stride, dilation) and then reused, as in
torchsparse's ``cmaps`` / ``kmaps``.

A :class:`PointTensor` is the point branch of SPVCNN: float point coordinates in stride-1 voxel
units, per-point features, and a :class:`PointCache` of point<->voxel index maps per stride.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from .keys import KeyTable, check_coords

Triple = tuple[int, int, int]


def _stride_triple(stride: int | Sequence[int]) -> Triple:
    if isinstance(stride, bool):
        raise ValueError(f"stride must be an int or 3 ints, got {stride!r}")
    if isinstance(stride, int):
        stride = (stride, stride, stride)
    try:
        items = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise ValueError(f"stride must be an int or 3 ints, got {stride!r}") from None
    if len(items) != 3 or min(items) < 1:
        raise ValueError(f"stride must be positive (an int or 3 ints), got {stride!r}")
    return (items[0], items[1], items[2])


class Workspace:
    """One scratch buffer reused by every layer of every forward pass of a thread (inference).

    Layers run one after another and drop their scratch before returning, so one buffer at the
    largest size serves them all; reusing it avoids the allocation and page faults a fresh
    tensor of tens of MB costs on CPU. It is also kept from one pass to the next
    (:func:`thread_workspace`): a fresh 136 MB buffer per pass (SemanticKITTI at 0.1 m, cr 0.5)
    paid its page faults on every pass, 13 % of that forward with glibc's default malloc.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        b = self.buffer
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            # A normal tensor even when made under torch.inference_mode (the Predictor's): an
            # inference tensor could not be written outside it, and the thread's next pass
            # may run under no_grad only (evaluation, benchmarks).
            with torch.inference_mode(False):
                b = self.buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel]

    def release(self) -> None:
        """Drop the buffer (its memory goes back once no view of it is alive); the next
        :meth:`get` allocates again. For a thread whose no-grad passes are over for a while,
        e.g. the trainer after validation."""
        self.buffer = None


_THREAD = threading.local()


def thread_workspace() -> Workspace:
    """The calling thread's :class:`Workspace`, shared by every forward pass the thread runs.

    Per thread because passes on one thread run one after another, while two threads may run
    passes at the same time. The buffer stays at the largest size a pass has needed until
    :meth:`Workspace.release`.
    """
    workspace = getattr(_THREAD, "workspace", None)
    if workspace is None:
        workspace = _THREAD.workspace = Workspace()
    return workspace


@dataclass(eq=False)
class SparseCache:
    """State shared by all sparse tensors derived from one input.

    ``coords``: coordinates per stride; ``tables``: sorted key tables per stride (one sort per
    stride serves every map and lookup there); ``kmaps``: kernel maps keyed by
    ``(tensor_stride, kernel_size, stride, dilation)`` exactly as torchsparse keys them.
    """

    coords: dict[Triple, torch.Tensor] = field(default_factory=dict)
    tables: dict[Triple, KeyTable] = field(default_factory=dict)
    kmaps: dict[tuple[Triple, Triple, Triple, Triple], Any] = field(default_factory=dict)
    #: A :class:`~.plan.NetworkPlan`: when set, ops read their maps from it (planned pass).
    plan: Any = None
    workspace: Workspace = field(default_factory=thread_workspace)


class SparseTensor:
    """Sparse voxels: ``coords [N, 4]`` (batch, x, y, z), ``feats [N, C]``, ``stride``."""

    __slots__ = ("cache", "coords", "feats", "stride")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        stride: int | Sequence[int] = 1,
        cache: SparseCache | None = None,
        *,
        check: bool = True,
    ) -> None:
        if check:
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
                shape = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                raise ValueError(f"feats must be a 2-D tensor [N, C], got {shape}")
            if not feats.is_floating_point():
                raise ValueError(f"feats must be floating point, got {feats.dtype}")
            check_coords(coords)
            if coords.shape[0] != feats.shape[0]:
                raise ValueError(
                    f"coords has {coords.shape[0]} rows but feats has {feats.shape[0]}"
                )
            if coords.device != feats.device:
                raise ValueError(f"coords on {coords.device} but feats on {feats.device}")
        self.feats = feats
        self.coords = coords
        self.stride = _stride_triple(stride)
        self.cache = cache if cache is not None else SparseCache()
        self.cache.coords.setdefault(self.stride, coords)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        return (
            f"SparseTensor(n={len(self)}, channels={self.feats.shape[1]}, stride={self.stride}, "
            f"dtype={self.feats.dtype}, device={self.feats.device})"
        )

    @property
    def num_channels(self) -> int:
        return int(self.feats.shape[1])

    def replace_feats(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates, stride and cache with new features ``[N, C']``."""
        if feats.dim() != 2 or feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"replacement feats must have shape [{self.coords.shape[0]}, C], "
                f"got {list(feats.shape)}"
            )
        return SparseTensor(feats, self.coords, self.stride, self.cache, check=False)

    def key_table(self) -> KeyTable:
        """Sorted key table of these coordinates, built once per stride and cached."""
        table = self.cache.tables.get(self.stride)
        if table is None or len(table) != len(self):
            # a sparse tensor's coordinates are in range: checked when it was made from
            # outside, derived in range by every op that makes one inside
            table = KeyTable(self.coords, check=False)
            if self.cache.coords.get(self.stride) is self.coords:
                self.cache.tables[self.stride] = table
        return table

    def _check_same_layout(self, other: SparseTensor, op: str) -> None:
        if other.stride != self.stride or other.coords.shape != self.coords.shape:
            raise ValueError(
                f"{op} needs tensors with the same coordinates: stride {self.stride} "
                f"n={len(self)} vs stride {other.stride} n={len(other)}"
            )
        if other.coords is not self.coords and not torch.equal(other.coords, self.coords):
            raise ValueError(f"{op} needs tensors with the same coordinates (rows differ)")

    def __add__(self, other: SparseTensor) -> SparseTensor:
        self._check_same_layout(other, "addition")
        return self.replace_feats(self.feats + other.feats)


def cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Concatenate features along channels of tensors that share coordinates (torchsparse.cat)."""
    if not tensors:
        raise ValueError("cat needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        first._check_same_layout(t, "cat")
    return first.replace_feats(torch.cat([t.feats for t in tensors], dim=1))


@dataclass(eq=False)
class PointCache:
    """Point<->voxel maps per voxel stride, shared by all point tensors of one cloud.

    ``voxel_index[s]``: ``(index [N], counts [M])`` point -> voxel row (-1 where the point has no
    voxel) and points per voxel; ``interp[s]``: ``(index [N, 8], weights [N, 8], M)`` trilinear
    corners and weights for devoxelisation, and the voxel count they were built for.
    """

    voxel_index: dict[Triple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: The voxel coordinates (the tensor itself) that ``voxel_index[s]`` indexes.
    voxel_coords: dict[Triple, torch.Tensor] = field(default_factory=dict)
    interp: dict[Triple, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    #: Built from the above on first use, per stride: ``pool[s]``, the ``[M, N]`` CSR matrix
    #: with 1/count entries; ``interp_bags[s]``, ``(index, bags)``: the corner index it was
    #: made from and the same ``[N, 8]`` with missing corners at row 0 (their weight is 0),
    #: which devoxelisation's ``embedding_bag`` reads.
    pool: dict[Triple, torch.Tensor] = field(default_factory=dict)
    interp_bags: dict[Triple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: Per stride of ``voxel_index``: whether every point has a voxel there (no -1), known from
    #: how the index was made or read back once, so that later users need not read it again.
    covered: dict[Triple, bool] = field(default_factory=dict)
    plan: Any = None  # as SparseCache.plan


class PointTensor:
    """Points: float ``coords [N, 3]`` in stride-1 voxel units, ``batch [N]``, ``feats [N, C]``."""

    __slots__ = ("batch", "cache", "coords", "feats")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch: torch.Tensor | None = None,
        cache: PointCache | None = None,
        *,
        check: bool = True,
    ) -> None:
        if batch is None:
            batch = torch.zeros(coords.shape[0], dtype=torch.int64, device=coords.device)
        if check:
            check_point_shapes(feats, coords, batch)
            finite = torch.isfinite(coords).all(dim=1)
            if not bool(finite.all()):
                raise_non_finite(finite)
        self.feats = feats
        self.coords = coords
        self.batch = batch
        self.cache = cache if cache is not None else PointCache()

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        return f"PointTensor(n={len(self)}, channels={self.feats.shape[1]})"

    def replace_feats(self, feats: torch.Tensor) -> PointTensor:
        """Same points and cache with new features ``[N, C']``."""
        if feats.dim() != 2 or feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"replacement feats must have shape [{self.coords.shape[0]}, C], "
                f"got {list(feats.shape)}"
            )
        return PointTensor(feats, self.coords, self.batch, self.cache, check=False)


def check_point_shapes(feats: torch.Tensor, coords: torch.Tensor, batch: torch.Tensor) -> None:
    """:class:`PointTensor`'s checks of shapes and dtypes (they read nothing from the device)."""
    if coords.dim() != 2 or coords.shape[1] != 3 or not coords.is_floating_point():
        raise ValueError(
            f"point coords must be a floating [N, 3] tensor, got {coords.dtype} "
            f"{list(coords.shape)}"
        )
    if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"point feats must have shape [{coords.shape[0]}, C], got {list(feats.shape)}"
        )
    if batch.shape != (coords.shape[0],) or batch.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"batch must be an int32/int64 tensor [{coords.shape[0]}], got {batch.dtype} "
            f"{list(batch.shape)}"
        )


def raise_non_finite(finite: torch.Tensor) -> NoReturn:
    """The error for point coordinates whose per-row ``finite [N]`` flag is not all true."""
    raise ValueError(
        f"point coords has {int((~finite).sum())} rows with NaN/Inf; filter them first"
    )
