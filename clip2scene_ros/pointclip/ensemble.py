"""Ensembling PointCLIP's object logits with a 3D network's per-point logits.

PointCLIP's paper ensembles by adding its logits to a trained 3D network's, with a weight
(reference §3.3). Here the 3D network labels *points*, so its logits are first pooled per object:

* ``pool="softmax"`` (default): the object's distribution is the mean of its points' softmax
  probabilities, and its logits are the log of that mean. Averaging probabilities lets every
  point vote with a bounded weight, so a few over-confident points cannot outvote the rest (as
  they can when averaging raw logits), and ``log(mean p)`` is a proper logit vector whose softmax
  is exactly that mean.
* ``pool="logits"``: the plain mean of the points' logits (a product of experts).

The result is ``pooled + weight · pointclip_logits``. PointCLIP's logits already carry CLIP's
temperature (``logit_scale`` ≈ 100 for trained CLIP times a cosine), so useful weights are
around 0.01–1; ``weight=0`` returns the 3D network alone. An object with no points pools to
uniform (``log 1/C`` or 0), which leaves PointCLIP's ranking alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

#: Floor for probabilities before the log, so a class no point votes for stays finite.
_PROB_FLOOR = 1e-12

PointIndex = Sequence[np.ndarray | Tensor | Sequence[int]] | np.ndarray | Tensor


def _membership(object_point_index: PointIndex, num_points: int, num_objects: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """``(point index, object index)`` pairs from a list of index arrays or a ``[N]`` id array.

    An id array marks points of no object with a negative id; in the list form a point may
    belong to several objects.
    """
    if isinstance(object_point_index, np.ndarray | Tensor):
        ids = torch.as_tensor(object_point_index, device=device)
        if ids.dim() != 1 or ids.numel() != num_points or ids.is_floating_point():
            raise ConfigError("object_point_index", f"an id array must be [N={num_points}] "
                              f"integers, got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        if ids.numel() and int(ids.max()) >= num_objects:
            raise ConfigError("object_point_index", f"object id {int(ids.max())} >= "
                              f"{num_objects} objects")
        points = torch.nonzero(ids >= 0)[:, 0]
        return points, ids[points]
    if len(object_point_index) != num_objects:
        raise ConfigError("object_point_index", f"has {len(object_point_index)} index arrays "
                          f"for {num_objects} objects")
    parts = [torch.as_tensor(np.asarray(ix) if not isinstance(ix, Tensor) else ix,
                             dtype=torch.long, device=device).flatten()
             for ix in object_point_index]
    points = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    counts = torch.tensor([p.numel() for p in parts], device=device)
    objects = torch.repeat_interleave(torch.arange(num_objects, device=device), counts)
    if points.numel() and (int(points.min()) < 0 or int(points.max()) >= num_points):
        raise ConfigError("object_point_index", f"point indices must lie in [0, {num_points})")
    return points, objects


def pool_point_logits(point_logits: Tensor, object_point_index: PointIndex, num_objects: int,
                      pool: Literal["softmax", "logits"] = "softmax") -> Tensor:
    """``[O, C]`` per-object logits pooled from ``[N, C]`` per-point logits (see module doc)."""
    if point_logits.dim() != 2:
        raise ConfigError("point_logits", f"must be [N, C], got {tuple(point_logits.shape)}")
    if pool not in ("softmax", "logits"):
        raise ConfigError("pool", f"must be 'softmax' or 'logits', got {pool!r}")
    n, c = point_logits.shape
    points, objects = _membership(object_point_index, n, num_objects, point_logits.device)
    values = point_logits.float()
    if pool == "softmax":
        values = values.softmax(dim=1)
    sums = torch.zeros(num_objects, c, device=values.device).index_add_(0, objects,
                                                                        values[points])
    counts = torch.bincount(objects, minlength=num_objects).to(values.dtype)
    empty = counts == 0
    mean = sums / counts.clamp_min(1)[:, None]
    if pool == "softmax":
        mean[empty] = 1.0 / c
        return mean.clamp_min(_PROB_FLOOR).log()
    return mean  # empty objects: zeros


def ensemble_logits(pointclip_logits: Tensor, point_logits: Tensor,
                    object_point_index: PointIndex, weight: float = 1.0,
                    pool: Literal["softmax", "logits"] = "softmax") -> Tensor:
    """``[O, C]`` = pooled 3D-network logits + ``weight`` · PointCLIP logits.

    Args:
        pointclip_logits: ``[O, C]`` from :meth:`PointCLIPClassifier.logits`.
        point_logits: ``[N, C]`` per-point logits of the 3D network, same classes and order.
        object_point_index: one index array (into the N points) per object, or ``[N]`` object
            ids with −1 for points in no object.
        weight: PointCLIP's weight (>= 0).
        pool: ``"softmax"`` (log of the mean probability) or ``"logits"`` (mean logit).
    """
    if pointclip_logits.dim() != 2 or point_logits.dim() != 2 or (
            pointclip_logits.shape[1] != point_logits.shape[1]):
        raise ConfigError("pointclip_logits", f"[O, C] and [N, C] with the same C needed, got "
                          f"{tuple(pointclip_logits.shape)} and {tuple(point_logits.shape)}")
    if not weight >= 0:
        raise ConfigError("weight", f"must be >= 0, got {weight}")
    pooled = pool_point_logits(point_logits.to(pointclip_logits.device), object_point_index,
                               pointclip_logits.shape[0], pool)
    return pooled + weight * pointclip_logits.float()


def agreement(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fraction of objects on which two predictions agree (NaN when there are none).

    Each of ``a``, ``b`` is ``[O, C]`` logits/probabilities (argmax taken) or ``[O]`` labels.
    """
    labels = []
    for x in (a, b):
        t = torch.as_tensor(x)
        labels.append(t.argmax(dim=1) if t.dim() == 2 else t.long())
    if labels[0].shape != labels[1].shape or labels[0].dim() != 1:
        shapes = [tuple(torch.as_tensor(x).shape) for x in (a, b)]
        raise ConfigError("agreement", f"need matching [O] or [O, C] inputs, got {shapes}")
    if labels[0].numel() == 0:
        return float("nan")
    return float((labels[0] == labels[1].to(labels[0].device)).float().mean())
