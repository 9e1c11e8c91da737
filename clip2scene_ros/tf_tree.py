"""A small TF tree: static and time-stamped transforms, chained lookups with interpolation.

The bag reader uses it to turn ``/tf_static`` and ``/tf`` (and odometry) into LiDAR→camera
extrinsics and ego poses; the node uses it when ``tf2_ros`` is not installed. It follows tf2's
conventions: every frame has at most one parent, an edge ``parent -> child`` stores the pose of
``child`` in ``parent`` (``T_parent<-child``), ``lookup(target, source)`` returns the transform
taking points in ``source`` into ``target``, and dynamic edges are interpolated (linear
translation, slerp rotation) between their samples but never extrapolated beyond a tolerance.

Hand-written because ``tf2_ros``'s buffer needs a ROS install; this is the ~200 lines of it the
package needs, and it is pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs.messages import stamp_to_ns
from .errors import MessageError
from .geometry.transforms import (
    interpolate_transform,
    invert_transform,
    make_transform,
    transform_from_msg,
)


def _as_transform(matrix: Any, what: str) -> np.ndarray:
    T = np.asarray(matrix, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"{what} must be a finite (4, 4) transform, got shape {T.shape}")
    return T.copy()


@dataclass
class _Edge:
    """The transform ``T_parent<-child``: one matrix if static, else time-stamped samples."""

    parent: str
    static: np.ndarray | None = None
    pending: list[tuple[int, np.ndarray]] = field(default_factory=list)
    stamps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matrices: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)))

    def consolidate(self, cache_ns: int | None) -> None:
        """Merge pending samples into the sorted arrays; a repeated stamp keeps its last sample."""
        if not self.pending:
            return
        stamps = np.concatenate([self.stamps, np.array([s for s, _ in self.pending], np.int64)])
        mats = np.concatenate([self.matrices, np.stack([m for _, m in self.pending])])
        self.pending.clear()
        order = np.argsort(stamps, kind="stable")
        stamps, mats = stamps[order], mats[order]
        last = np.r_[stamps[1:] != stamps[:-1], True]  # last of each run of equal stamps
        stamps, mats = stamps[last], mats[last]
        if cache_ns is not None:
            keep = stamps >= stamps[-1] - cache_ns
            stamps, mats = stamps[keep], mats[keep]
        self.stamps, self.matrices = stamps, mats


class TfTree:
    """Static and dynamic transforms between named frames.

    Args:
        tolerance_ns: how far (ns) a lookup may fall outside the recorded samples of a dynamic
            transform and still be answered, with the nearest sample (tf2 allows none: 0).
        cache_ns: keep only the last ``cache_ns`` of each dynamic transform (``None``: keep all,
            as a bag reader wants; a node sets e.g. 10 s as tf2 does).
    """

    def __init__(self, *, tolerance_ns: int = 0, cache_ns: int | None = None) -> None:
        if tolerance_ns < 0:
            raise ValueError(f"tolerance_ns must be >= 0, got {tolerance_ns}")
        if cache_ns is not None and cache_ns < 0:
            raise ValueError(f"cache_ns must be >= 0 or None, got {cache_ns}")
        self.tolerance_ns = int(tolerance_ns)
        self.cache_ns = cache_ns
        self._edges: dict[str, _Edge] = {}  # keyed by child frame

    # ------------------------------------------------------------------ building the tree

    def _edge(self, parent: str, child: str, *, static: bool) -> _Edge:
        if not parent or not child:
            raise ValueError(f"frame ids must be non-empty, got parent {parent!r} child {child!r}")
        if parent == child:
            raise ValueError(f"transform from frame {child!r} to itself")
        edge = self._edges.get(child)
        if edge is not None:
            if edge.parent != parent:
                raise ValueError(
                    f"frame {child!r} already has parent {edge.parent!r}; "
                    f"a TF tree cannot also give it parent {parent!r}"
                )
            if (edge.static is not None) != static:
                have = "static" if edge.static is not None else "dynamic"
                raise ValueError(
                    f"transform {parent!r} -> {child!r} is {have}; it cannot also be "
                    f"{'static' if static else 'dynamic'}"
                )
            return edge
        if child in self.chain(parent):
            raise ValueError(f"transform {parent!r} -> {child!r} would close a loop in the tree")
        edge = _Edge(parent)
        self._edges[child] = edge
        return edge

    def add_transform(
        self, parent: str, child: str, matrix: Any, stamp_ns: int | None = None
    ) -> None:
        """Add ``T_parent<-child``: static when ``stamp_ns`` is None, else one dynamic sample."""
        T = _as_transform(matrix, f"transform {parent!r} -> {child!r}")
        edge = self._edge(parent, child, static=stamp_ns is None)
        if stamp_ns is None:
            edge.static = T
        else:
            edge.pending.append((int(stamp_ns), T))

    def add_arrays(
        self,
        parent: str,
        child: str,
        stamps_ns: Any,
        translations: Any,
        quaternions: Any,
    ) -> None:
        """Add dynamic samples of ``T_parent<-child`` from (N,) stamps, (N, 3) and (N, 4) xyzw."""
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        t = np.asarray(translations, dtype=np.float64)
        q = np.asarray(quaternions, dtype=np.float64)
        n = stamps.size
        if t.shape != (n, 3) or q.shape != (n, 4):
            raise ValueError(
                f"transform {parent!r} -> {child!r}: {n} stamps need translations (N, 3) and "
                f"quaternions (N, 4), got {t.shape} and {q.shape}"
            )
        edge = self._edge(parent, child, static=False)
        # One small matrix per pose sample (not per point): the loop is over poses.
        edge.pending.extend(
            (int(s), make_transform(ti, qi)) for s, ti, qi in zip(stamps, t, q, strict=True)
        )

    def add_message(self, msg: Any, *, static: bool) -> int:
        """Add every transform of a ``tf2_msgs/TFMessage`` (rclpy or rosbags); returns how many.

        Static messages keep no stamp (tf2 latches them for all time). Raises ``MessageError``
        for a malformed transform; transforms before it in the message are kept.
        """
        transforms = getattr(msg, "transforms", None)
        if transforms is None:
            raise MessageError("TFMessage", "transforms", "missing: not a TFMessage")
        for i, ts in enumerate(transforms):
            try:
                parent = str(ts.header.frame_id)
                child = str(ts.child_frame_id)
                stamp = None if static else stamp_to_ns(ts.header.stamp)
            except AttributeError as exc:
                raise MessageError("TFMessage", f"transforms[{i}]", str(exc)) from exc
            T = transform_from_msg(ts)
            try:
                self.add_transform(parent, child, T, stamp)
            except ValueError as exc:
                raise MessageError("TFMessage", f"transforms[{i}]", str(exc)) from exc
        return len(transforms)

    # ------------------------------------------------------------------ structure

    @property
    def frames(self) -> set[str]:
        return set(self._edges) | {e.parent for e in self._edges.values()}

    def parent(self, frame: str) -> str | None:
        edge = self._edges.get(frame)
        return None if edge is None else edge.parent

    def chain(self, frame: str) -> list[str]:
        """``frame`` and its ancestors up to the root."""
        out = [frame]
        while (edge := self._edges.get(out[-1])) is not None:
            out.append(edge.parent)
        return out

    def root(self, frame: str) -> str:
        return self.chain(frame)[-1]

    def is_static(self, frame: str) -> bool:
        """Whether ``frame``'s transform to its root involves no dynamic edge."""
        return all(self._edges[f].static is not None for f in self.chain(frame)[:-1])

    def stamp_range(self, parent: str, child: str) -> tuple[int, int] | None:
        """First and last sample stamp of the dynamic edge ``parent -> child`` (None if static)."""
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent:
            raise LookupError(f"the TF tree has no transform {parent!r} -> {child!r}")
        if edge.static is not None:
            return None
        edge.consolidate(self.cache_ns)
        return int(edge.stamps[0]), int(edge.stamps[-1])

    def _check_frame(self, frame: str) -> None:
        if frame not in self._edges and not any(e.parent == frame for e in self._edges.values()):
            known = sorted(self.frames)
            shown = ", ".join(map(repr, known[:20])) + (" ..." if len(known) > 20 else "")
            raise LookupError(f"frame {frame!r} is not in the TF tree (known frames: {shown})")

    # ------------------------------------------------------------------ lookups

    def _edge_at(self, child: str, stamp_ns: int | None, what: str) -> np.ndarray:
        edge = self._edges[child]
        if edge.static is not None:
            return edge.static
        edge.consolidate(self.cache_ns)
        stamps = edge.stamps
        if stamp_ns is None:
            return edge.matrices[-1]
        i = int(np.searchsorted(stamps, stamp_ns))
        if i < stamps.size and stamps[i] == stamp_ns:
            return edge.matrices[i]
        if 0 < i < stamps.size:
            t0, t1 = int(stamps[i - 1]), int(stamps[i])
            alpha = (stamp_ns - t0) / (t1 - t0)
            return interpolate_transform(edge.matrices[i - 1], edge.matrices[i], alpha)
        nearest = 0 if i == 0 else stamps.size - 1
        if abs(int(stamps[nearest]) - stamp_ns) <= self.tolerance_ns:
            return edge.matrices[nearest]
        raise LookupError(
            f"{what} at stamp {stamp_ns}: transform {edge.parent!r} -> {child!r} is only known "
            f"for [{int(stamps[0])}, {int(stamps[-1])}] ns "
            f"(tolerance {self.tolerance_ns / 1e6:g} ms; no extrapolation)"
        )

    def _to_ancestor(self, frame: str, ancestor: str, stamp_ns: int | None, what: str
                     ) -> np.ndarray:
        """``T_ancestor<-frame`` at ``stamp_ns`` by composing the edges on the way up."""
        T = np.eye(4)
        while frame != ancestor:
            T = self._edge_at(frame, stamp_ns, what) @ T
            frame = self._edges[frame].parent
        return T

    def _common_ancestor(self, target: str, source: str, what: str) -> str:
        self._check_frame(target)
        self._check_frame(source)
        up = self.chain(target)
        ups = set(up)
        for frame in self.chain(source):
            if frame in ups:
                return frame
        raise LookupError(
            f"{what}: the frames are not connected (tree roots {up[-1]!r} and "
            f"{self.root(source)!r})"
        )

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray:
        """(4, 4) ``T_target<-source`` at ``stamp_ns`` (None: latest sample of each edge).

        Raises ``LookupError`` naming the frames when a frame is unknown, the two are not
        connected, or a dynamic transform on the path has no sample near ``stamp_ns``.
        """
        what = f"cannot transform {source!r} into {target!r}"
        if target == source:  # as tf2: a frame is itself even before any transform names it
            return np.eye(4)
        anc = self._common_ancestor(target, source, what)
        T_anc_src = self._to_ancestor(source, anc, stamp_ns, what)
        T_anc_tgt = self._to_ancestor(target, anc, stamp_ns, what)
        return invert_transform(T_anc_tgt) @ T_anc_src

    def lookup_full(
        self,
        target: str,
        target_stamp_ns: int,
        source: str,
        source_stamp_ns: int,
        fixed_frame: str,
    ) -> np.ndarray:
        """``T_target(t_target)<-source(t_source)`` through ``fixed_frame`` (tf2's time travel).

        With ``fixed_frame`` the world (e.g. ``map``), this folds the ego motion between the two
        stamps in: ``T_target<-fixed(t_target) · T_fixed<-source(t_source)``.
        """
        return self.lookup(target, fixed_frame, target_stamp_ns) @ self.lookup(
            fixed_frame, source, source_stamp_ns
        )

    def can_transform(self, target: str, source: str, stamp_ns: int | None = None) -> bool:
        try:
            self.lookup(target, source, stamp_ns)
        except LookupError:
            return False
        return True


def tree_from_messages(
    static_msgs: Iterable[Any] = (), dynamic_msgs: Iterable[Any] = (), **kwargs: Any
) -> TfTree:
    """A ``TfTree`` from ``/tf_static`` and ``/tf`` messages (either flavour)."""
    tree = TfTree(**kwargs)
    for msg in static_msgs:
        tree.add_message(msg, static=True)
    for msg in dynamic_msgs:
        tree.add_message(msg, static=False)
    return tree
