"""What a labelled frame looks like: the output cloud's arrays, label colours and the overlay.

ROS-free; the node hands the arrays to :func:`~clip2scene_ros.codecs.encode_labelled_cloud` and
the overlay to :func:`~clip2scene_ros.codecs.encode_image`.

* :func:`labelled_cloud`: point for point the *input* cloud (NaN points stay), each with its
  label (``UNKNOWN_LABEL`` for points the network never saw), score (0 for those) and colour;
* :func:`label_colours`: the vocabulary palette's colour per label, grey (128, 128, 128) for
  labels outside it (``UNKNOWN_LABEL`` included);
* :func:`overlay_image` / :func:`draw_overlay`: a camera image with each point that lands in it
  drawn as a small square in its label's colour, nearest point on top; unknown labels are not
  drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.recfunctions import structured_to_unstructured

from ..codecs.pointcloud2 import INTENSITY_FIELDS, UNKNOWN_LABEL
from ..geometry.correspondence import PointPixelPairs

#: Half-size in pixels of the square drawn for each point on the overlay.
OVERLAY_RADIUS = 1
#: The colour of a point whose label is not in the palette.
UNKNOWN_GREY = 128


@dataclass(frozen=True)
class LabelledCloud:
    """The output cloud's fields, one row per point of the input cloud (its flat order)."""

    xyz: np.ndarray  # [n, 3] float32
    intensity: np.ndarray | None  # [n] the input's intensity field, if it has one
    label: np.ndarray  # [n] uint16
    score: np.ndarray  # [n] float32
    rgb: np.ndarray  # [n, 3] uint8


def label_colours(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``[n, 3]`` uint8: ``palette[label]``, grey where the label is not a palette row."""
    rgb = np.full((label.shape[0], 3), UNKNOWN_GREY, np.uint8)
    known = label < len(palette)
    rgb[known] = palette[label[known]]
    return rgb


def labelled_cloud(cloud: np.ndarray, kept: np.ndarray, label: np.ndarray, score: np.ndarray,
                   palette: np.ndarray) -> LabelledCloud:
    """The output of a decoded ``cloud`` whose points ``kept`` (flat indices) got ``label`` and
    ``score``; every other point is ``UNKNOWN_LABEL`` with score 0."""
    n = cloud.size
    full_label = np.full(n, UNKNOWN_LABEL, np.uint16)
    full_score = np.zeros(n, np.float32)
    full_label[kept], full_score[kept] = label, score
    xyz = structured_to_unstructured(cloud[["x", "y", "z"]], dtype=np.float32)
    name = next((f for f in INTENSITY_FIELDS if f in (cloud.dtype.names or ())), None)
    intensity = None if name is None else cloud[name]
    return LabelledCloud(xyz, intensity, full_label, full_score,
                         label_colours(full_label, palette))


def overlay_image(image: np.ndarray, pixel: np.ndarray, colors: np.ndarray, depth: np.ndarray,
                  radius: int = OVERLAY_RADIUS) -> np.ndarray:
    """``image`` with a ``(2r+1)²`` square of ``colors[i]`` at each ``pixel[i]`` (col, row).

    Far points are drawn first, so where squares overlap the nearest point shows, as it would
    in the scene. One vectorised assignment: numpy keeps the last of repeated indices.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    if pixel.shape[0] == 0:
        return out
    height, width = out.shape[:2]
    order = np.argsort(-depth, kind="stable")
    px, rgb = pixel[order].astype(np.int64), colors[order]
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    # [offsets, M] -> point-major order so every square of a nearer point comes later
    cols = np.stack([px[:, 0] + dx for dx, _ in offsets], axis=1).reshape(-1)
    rows = np.stack([px[:, 1] + dy for _, dy in offsets], axis=1).reshape(-1)
    fill = np.repeat(rgb, len(offsets), axis=0)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    out[rows[inside], cols[inside]] = fill[inside]
    return out


def draw_overlay(image: np.ndarray, pairs: PointPixelPairs, label: np.ndarray,
                 palette: np.ndarray, camera: int = 0) -> np.ndarray:
    """Camera ``camera``'s ``image`` with its paired points in their label colours (``label``
    per key-frame point; labels outside the palette are not drawn)."""
    own = pairs.camera_index == camera
    point_label = label[pairs.point_index[own]]
    known = point_label < len(palette)
    return overlay_image(image, pairs.pixel[own][known], palette[point_label[known]],
                         pairs.depth[own][known])
