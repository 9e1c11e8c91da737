"""Key-frame point–pixel pairs of a training sample, joined with the teacher and cropped.

A sample's pairs are the key frame's points that project into its cameras (depth above
``min_depth``: the teacher cache's own rule when there is one, so pairs join the cache one to
one), on the prepared cloud's rows (points ``prepare_frames`` dropped have none). Each pair takes
the teacher's label, confidence and pixel feature from the cache, through camera *names* (robust
to a reader config with other cameras; -1 and zeros where the cache has none,
:func:`join_teacher`). Each camera's image is then cropped and flipped
(:mod:`~clip2scene_ros.training.augmentation`): pairs outside the crop are dropped, the others'
pixel coordinates follow the crop. A point seen by two cameras has two teacher labels; the more
confident one wins, ties going to the earlier camera (:func:`best_pair_per_point`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clip2scene_ros.errors import IntegrityError
from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.correspondence import PointPixelPairs, point_pixel_pairs
from clip2scene_ros.preprocess import PreparedCloud
from clip2scene_ros.teacher.cache import TeacherLabels
from clip2scene_ros.training.augmentation import CropFlip

__all__ = ["best_pair_per_point", "join_teacher", "keyframe_pairs"]


def keyframe_pairs(key: Frame, cloud: PreparedCloud, teacher: TeacherLabels | None,
                   min_depth: float, rng: np.random.Generator, *,
                   draw: Callable[[int, int, np.ndarray, np.random.Generator], CropFlip],
                   crop_size: tuple[int, int], return_images: bool) -> dict[str, Any]:
    """Key-frame point–pixel pairs on prepared rows, joined with the teacher, augmented.

    ``draw(height, width, uv, rng)`` gives each camera's crop. The result holds every pair
    before the crops (``all_*``: prepared row, label, confidence, features) and the pairs the
    crops kept (``kept_*``, with their ``uv`` and ``pixel`` in the cropped images), the crop
    rows ``[C, 5]`` and the cropped images (``[C, 3, H, W]``, or None without
    ``return_images``).
    """
    # Prepared row of each key-frame point (-1: dropped by prepare_frames).
    row_of = np.full(cloud.key_points, -1, np.int64)
    is_key = cloud.source < cloud.key_points
    row_of[cloud.source[is_key]] = np.flatnonzero(is_key)
    views = key.cameras
    if views:
        found: PointPixelPairs = point_pixel_pairs(
            key.xyz, [(v.camera, v.lidar_to_camera) for v in views], min_depth=min_depth)
        point, camera, uv = found.point_index, found.camera_index.astype(np.int64), found.uv
    else:
        point, camera = np.zeros(0, np.int64), np.zeros(0, np.int64)
        uv = np.zeros((0, 2), np.float32)
    rows = row_of[point]
    alive = rows >= 0
    rows, camera, key_point, uv = rows[alive], camera[alive], point[alive], uv[alive]
    label, conf, feats = join_teacher(teacher, [v.name for v in views], camera, key_point,
                                      cloud.key_points)

    kept_idx: list[np.ndarray] = []
    uv_out: list[np.ndarray] = []
    px_out: list[np.ndarray] = []
    crops: list[list[int]] = []
    images: list[torch.Tensor] = []
    for c, view in enumerate(views):
        members = np.flatnonzero(camera == c)
        crop = draw(view.image.shape[0], view.image.shape[1], uv[members], rng)
        uv_c, px_c, keep = crop.apply(uv[members])
        kept_idx.append(members[keep])
        uv_out.append(uv_c)
        px_out.append(px_c)
        crops.append(crop.as_row())
        if return_images:
            images.append(crop.image(view.image))
    kept = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
    h, w = crop_size
    return {
        "all_point": rows, "all_label": label, "all_confidence": conf, "all_feats": feats,
        "kept_point": rows[kept], "kept_camera": camera[kept], "kept_label": label[kept],
        "kept_confidence": conf[kept],
        "kept_feats": None if feats is None else feats[kept],
        "uv": np.concatenate(uv_out) if uv_out else np.zeros((0, 2), np.float32),
        "pixel": np.concatenate(px_out) if px_out else np.zeros((0, 2), np.int64),
        "crops": np.array(crops, np.int64).reshape(-1, 5),
        "images": (torch.stack(images) if images else torch.zeros(0, 3, h, w))
        if return_images else None,
    }


def join_teacher(teacher: TeacherLabels | None, camera_names: Sequence[str],
                 camera: np.ndarray, point: np.ndarray, key_points: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Teacher label, confidence and feature of each (camera, key point) pair; -1 if none.

    The cache stores its pairs by (position of the camera in the frame, point row) only, so the
    join goes through camera *names* (robust to a reader config with other cameras).
    """
    m = len(point)
    label = np.full(m, -1, np.int64)
    conf = np.zeros(m, np.float32)
    if teacher is None:
        return label, conf, None
    feats = None
    if teacher.features is not None:
        feats = np.zeros((m, teacher.features.shape[1]), np.float32)
    if teacher.points.size and int(teacher.points.max()) >= key_points:
        raise IntegrityError("teacher_caches", f"frame {teacher.index}: the cache names point "
                             f"{int(teacher.points.max())}, the frame has {key_points}")
    position = {name: c for c, name in enumerate(camera_names)}
    # cache camera position -> position in this frame's cameras (-1: not in this frame)
    remap = np.array([position.get(name, -1) for name in teacher.camera_names] + [-1], np.int64)
    cache_cam = remap[teacher.camera.astype(np.int64)]
    valid = cache_cam >= 0
    keys = cache_cam[valid] * key_points + teacher.points[valid].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    want = camera * key_points + point
    pos = np.minimum(np.searchsorted(sorted_keys, want), max(len(sorted_keys) - 1, 0))
    hit = (sorted_keys[pos] == want) if len(sorted_keys) else np.zeros(m, bool)
    src = np.flatnonzero(valid)[order[pos[hit]]]
    label[hit] = teacher.label[src].astype(np.int64)
    conf[hit] = teacher.confidence[src].astype(np.float32)
    if feats is not None and teacher.features is not None:
        feats[hit] = teacher.features[src].astype(np.float32)
    return label, conf, feats


def best_pair_per_point(rows: np.ndarray, label: np.ndarray, conf: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, pair index)`` of the most confident labelled pair of each point.

    A point seen by two cameras has two teacher labels; the more confident one wins (ties: the
    earlier camera).
    """
    labelled = np.flatnonzero(label >= 0)
    order = labelled[np.lexsort((-conf[labelled], rows[labelled]))]
    unique_rows, first = np.unique(rows[order], return_index=True)
    return unique_rows, order[first]
