"""Engine shape profiles: how many voxels each stride of SPVCNN may hold, from the point count.

An exported graph's inputs have dynamic first axes named by :func:`~.onnx_export.dynamic_axes`:
``points``, ``voxels_s<S>`` for stride S, and the segment-sum tables ``pool_*``. A TensorRT
optimisation profile needs a min/opt/max for every one of them. A stride-S count is at most the
point count, but giving every stride the point count's max sizes the deep layers' gathers for
clouds that do not exist (at cr 1.0 and 400k points the stride-8 ``[N, 27, 256]`` gather would pass
2**31 elements). So the voxels of stride S are bounded by ``ratio[S] * points``, with the ratios
measured on real scans (below) and a margin; a cloud whose voxels exceed the bound is thinned until
it fits (:func:`~clip2scene_ros.runtime.tensorrt_backend.TensorRTBackend.fit`), counted and
warned about once, like ``max_points``.

Measured voxels per point (``voxel_ratios`` below; ``python -m clip2scene_ros.models.profile
SCAN...``, 2026-12-06, 2-core AMD EPYC dev machine):

================================  =====  =====  =====  =====  =====  =====
scan                              voxel  s1     s2     s4     s8     s16
================================  =====  =====  =====  =====  =====  =====
nuScenes keyframe (34,688 pts)    0.05   0.666  0.516  0.364  0.227  0.130
nuScenes keyframe                 0.1    0.516  0.364  0.227  0.130  0.066
SemanticKITTI 00/000000 (124,668) 0.05   0.736  0.482  0.255  0.116  0.048
SemanticKITTI 00/000000           0.1    0.482  0.255  0.116  0.048  0.018
================================  =====  =====  =====  =====  =====  =====

:data:`DEFAULT_VOXEL_RATIOS` takes the larger of the two at the finest voxel (0.05 m) times 1.5,
capped at 1 (a stride never has more voxels than points): bundles with coarser voxels get room
to spare.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence

import numpy as np

#: Strides of SPVCNN's encoder, in ``voxel_ratios`` order.
STRIDES = (1, 2, 4, 8, 16)
#: Per-stride voxel-to-point ratio bounds (see the module docstring for the measurement).
DEFAULT_VOXEL_RATIOS = (1.0, 0.78, 0.55, 0.35, 0.2)
MARGIN = 1.5

_VOXELS = re.compile(r"voxels_s(\d+)$")


def voxel_ratios(xyz: np.ndarray, voxel_size: float, strides: Sequence[int] = STRIDES
                 ) -> list[float]:
    """Occupied voxels per point of ``xyz [N, 3]`` at each stride (voxel ``floor(p / v / s)``,
    as the strided convolutions downsample)."""
    coords = np.floor(np.asarray(xyz, np.float64) / voxel_size).astype(np.int64)
    n = max(1, len(coords))
    return [np.unique(np.floor_divide(coords, s), axis=0).shape[0] / n for s in strides]


def axis_bound(axis: str, points: int, ratios: Sequence[float]) -> int:
    """The largest size of the dynamic axis ``axis`` for clouds of ``points`` points."""
    match = _VOXELS.match(axis)
    if match is None:  # points, and the segment-sum tables (at most one row per point)
        return points
    level = int(math.log2(int(match.group(1))))
    ratio = ratios[min(level, len(ratios) - 1)]
    return max(1, min(points, math.ceil(points * ratio)))


def main(argv: Sequence[str]) -> int:
    """Print the ratios of KITTI ``.bin`` (x,y,z,r) or nuScenes ``.pcd.bin`` (x,y,z,i,ring)."""
    for path in argv:
        columns = 5 if path.endswith(".pcd.bin") else 4
        xyz = np.fromfile(path, np.float32).reshape(-1, columns)[:, :3]
        for voxel in (0.05, 0.1):
            ratios = voxel_ratios(xyz, voxel)
            cells = " ".join(f"s{s}={r:.3f}" for s, r in zip(STRIDES, ratios, strict=True))
            print(f"{path} {len(xyz)} points, voxel {voxel}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
