"""Raw LiDAR scan files outside a bag: KITTI ``.bin`` and nuScenes ``.pcd.bin``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError


def load_scan(path: Path) -> np.ndarray:
    """``(N, 4)`` float32 x, y, z, intensity from a KITTI ``.bin`` or a nuScenes ``.pcd.bin``."""
    raw = np.fromfile(path, dtype=np.float32)
    width = 5 if path.name.endswith(".pcd.bin") else 4  # nuScenes adds the ring index
    if raw.size % width:
        raise ConfigError("scan", f"{raw.size} floats is not a whole number of {width}-float "
                          "points", str(path))
    return raw.reshape(-1, width)[:, :4].copy()
