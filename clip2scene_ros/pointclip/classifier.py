"""PointCLIP zero-shot object classifier: multi-view depth images through a frozen CLIP.

Each object goes into PointCLIP's y-up frame (:func:`~.objects.lidar_to_pointclip`), is centred
and scaled to the unit sphere, projected to ``M`` depth images (V1 or V2, :mod:`.projection`),
and every image is encoded by CLIP's image tower. View ``v`` scores class ``c`` with the cosine
``cos(f_v, t_c)`` against a text bank built from the vocabulary and prompt templates; the object
logits are ``logit_scale · Σ_v w_v cos(f_v, t_c) / Σ_v w_v``.

Two deliberate differences from the reference code:

* Views are combined as a *weighted mean* of per-view logits. The reference concatenates the
  weighted view features and takes a dot product with the M-times repeated, re-normalised text
  feature, i.e. ``logit_scale/√M · Σ_v w_v cos`` — the same ranking, but a temperature that
  depends on M and on the weights. The mean keeps CLIP's own calibration for any view set.
* Images are normalised with CLIP's mean/std (the reference feeds raw depth; ``normalize_images
  =False`` restores that), because that is the input distribution CLIP was trained on.

Weights default to uniform. The reference's tuned view weights and V2's per-class GPT prompts
were searched on *test labels* (reference §2.1–2.2) and are not reproduced; learn weights from
labelled shots (:mod:`.adapter`) instead. The shipped ``pointclip`` prompt set is class-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..teacher.maskclip import CLIP_MEAN, CLIP_STD
from ..teacher.prompts import load_prompts, validate_templates
from ..teacher.text_bank import encode_text_bank, resolve_vocabulary
from ..vocabulary import Vocabulary
from .objects import ObjectInstance, lidar_to_pointclip
from .projection import (
    Projection,
    V2Config,
    ViewSet,
    normalize_unit_sphere,
    project,
    view_set,
)

if TYPE_CHECKING:
    from ..teacher.clip_loader import ClipModel

#: What ``classify`` and friends accept as one object: raw points or a clustered instance.
ObjectLike = ObjectInstance | Tensor | np.ndarray
#: Prompt set used when none is given: depth-map templates from the PointCLIP papers.
DEFAULT_POINTCLIP_PROMPTS = "pointclip"


def _image_size(visual: torch.nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    if isinstance(size, list | tuple):
        if size[0] != size[1]:
            raise ConfigError("image_size", f"CLIP expects non-square {size}; pass image_size")
        size = size[0]
    return int(size)


class PointCLIPClassifier:
    """Zero-shot (or, with an attached inter-view adapter, few-shot) PointCLIP classifier.

    Args:
        clip_model: an open_clip CLIP model (``load_clip``); it is only run, never modified.
        tokenizer: its tokenizer.
        vocabulary: a :class:`Vocabulary`, or the name/path of one.
        prompts: a prompt-set name/path (``config/prompts/``) or a list of templates.
        views: ``"v1_zeroshot"`` (6), ``"v1_fewshot"`` (10), ``"v2"`` (10) or a :class:`ViewSet`.
        view_weights: one non-negative weight per view; ``None`` = uniform.
        projection: ``"v1"`` (perspective splat) or ``"v2"`` (realistic projection).
        image_size: side of the images given to CLIP; default: the model's input size.
        resolution: V1 render size before resizing; default: the view set's (128 / 224).
        normalize_images: apply CLIP's mean/std (the reference code does not).
        up_axis: ``"z"`` for LiDAR objects (remapped to y-up), ``"y"`` for ModelNet-h5 clouds.
        align_yaw: turn clustered instances by −yaw of their box first (length along x).
        batch_size: objects projected and encoded at once (V2 needs ~4 MB per object).
    """

    def __init__(self, clip_model: ClipModel, tokenizer: Callable[[list[str]], Tensor],
                 vocabulary: Vocabulary | str | Path,
                 prompts: str | Path | Sequence[str] = DEFAULT_POINTCLIP_PROMPTS,
                 views: str | ViewSet = "v1_zeroshot",
                 view_weights: Sequence[float] | Tensor | None = None,
                 projection: Projection = "v1", *, image_size: int | None = None,
                 resolution: int | None = None, normalize_images: bool = True,
                 up_axis: str = "z", align_yaw: bool = False, v2: V2Config | None = None,
                 batch_size: int = 16) -> None:
        if projection not in ("v1", "v2"):
            raise ConfigError("projection", f"must be 'v1' or 'v2', got {projection!r}")
        if up_axis not in ("z", "y"):
            raise ConfigError("up_axis", f"must be 'z' or 'y', got {up_axis!r}")
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        self.clip = clip_model
        self.device = next(clip_model.parameters()).device
        self.dtype = next(clip_model.visual.parameters()).dtype
        self.vocabulary = (vocabulary if isinstance(vocabulary, Vocabulary)
                           else resolve_vocabulary(vocabulary))
        if isinstance(prompts, str | Path):
            self.prompts = str(prompts)
            self.templates = load_prompts(prompts)
        else:
            self.prompts = "<custom>"
            self.templates = validate_templates(list(prompts))
        self.views = view_set(views)
        self.projection: Projection = projection
        self.image_size = int(image_size) if image_size is not None else _image_size(
            clip_model.visual)
        self.resolution = resolution
        self.v2 = v2
        self.up_axis = up_axis
        self.align_yaw = align_yaw
        self.batch_size = batch_size
        self.normalize_images = normalize_images
        m = self.views.num_views
        if view_weights is None:
            weights = torch.ones(m)
        else:
            weights = torch.as_tensor(view_weights, dtype=torch.float32).flatten()
            if weights.numel() != m:
                raise ConfigError("view_weights", f"needs {m} weights for view set "
                                  f"{self.views.name!r}, got {weights.numel()}")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ConfigError("view_weights", "must be finite, >= 0 and not all zero")
        self.view_weights = weights.to(self.device)
        pp = getattr(clip_model.visual, "preprocess_cfg", None) or {}
        self._mean = torch.tensor(pp.get("mean", CLIP_MEAN), device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pp.get("std", CLIP_STD), device=self.device).view(1, 3, 1, 1)
        scale = getattr(clip_model, "logit_scale", None)
        # 100 for trained CLIP models; the reference hard-codes 100 in V2
        self.logit_scale = float(scale.detach().exp()) if scale is not None else 100.0
        self.text_bank = encode_text_bank(clip_model, tokenizer, self.vocabulary,
                                          self.templates).to(self.device)
        self.adapter: Any = None  # an InterViewAdapter once attached (kept untyped: no cycle)

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def class_names(self) -> list[str]:
        return self.vocabulary.names

    # -- geometry -------------------------------------------------------------------------------
    def prepare(self, objects: Sequence[ObjectLike]) -> list[Tensor]:
        """Each object in PointCLIP's frame, centred and scaled to the unit sphere."""
        clouds = []
        for i, obj in enumerate(objects):
            points: Tensor | np.ndarray
            if isinstance(obj, ObjectInstance):
                points, yaw = obj.points, obj.box.yaw if self.align_yaw else None
            else:
                points, yaw = obj, None
            arr = points if isinstance(points, Tensor) else np.asarray(points)
            if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 3:
                raise ConfigError(f"objects[{i}]", f"must be [N >= 1, >= 3] points, got "
                                  f"{tuple(arr.shape)}")
            cloud = lidar_to_pointclip(arr, yaw=yaw, up=self.up_axis).to(self.device)
            zeros = torch.zeros(cloud.shape[0], dtype=torch.long, device=self.device)
            clouds.append(normalize_unit_sphere(cloud, zeros, 1))
        return clouds

    def images(self, clouds: Sequence[Tensor]) -> Tensor:
        """``[O, M, 3, S, S]`` depth images in [0, ~3] (V1) or [0, 1] (V2) of prepared clouds."""
        return project(clouds, self.views, self.projection, image_size=self.image_size,
                       resolution=self.resolution, normalize=False, v2=self.v2,
                       device=self.device)

    # -- features and logits --------------------------------------------------------------------
    @torch.no_grad()
    def encode_prepared(self, clouds: Sequence[Tensor]) -> Tensor:
        """``[O, M, D]`` unit CLIP features of every view of prepared clouds."""
        if len(clouds) == 0:
            return torch.zeros(0, self.num_views, self.text_bank.shape[1], device=self.device)
        chunks = []
        for start in range(0, len(clouds), self.batch_size):
            images = self.images(clouds[start:start + self.batch_size])
            o, m = images.shape[:2]
            x = images.flatten(0, 1)
            if self.normalize_images:
                x = (x - self._mean) / self._std
            feats = self.clip.encode_image(x.to(self.dtype)).float()
            chunks.append(F.normalize(feats, dim=-1).view(o, m, -1))
        return torch.cat(chunks)

    def encode_views(self, objects: Sequence[ObjectLike]) -> Tensor:
        """``[O, M, D]`` unit CLIP features of every view of every object."""
        return self.encode_prepared(self.prepare(objects))

    def view_logits(self, features: Tensor) -> Tensor:
        """``[O, M, C]`` per-view logits ``logit_scale · cos(f_v, t_c)``."""
        return self.logit_scale * features @ self.text_bank.T

    def adapter_logits(self, features: Tensor, adapter: torch.nn.Module) -> Tensor:
        """``[O, C]`` logits of adapted features, as PointCLIP's few-shot head computes them.

        The adapter returns one unit vector over all ``M·D`` view channels; the text feature is
        repeated M times and re-normalised, so for equal view norms this is the mean cosine.
        """
        adapted = adapter(features)
        text = F.normalize(self.text_bank.repeat(1, self.num_views), dim=-1)
        return self.logit_scale * adapted @ text.T

    def logits_from_features(self, features: Tensor) -> Tensor:
        """``[O, C]`` object logits: adapter head if one is attached, else weighted view mean."""
        if self.adapter is not None:
            with torch.no_grad():
                return self.adapter_logits(features, self.adapter)
        weights = self.view_weights / self.view_weights.sum()
        return torch.einsum("omc,m->oc", self.view_logits(features), weights)

    def logits(self, objects: Sequence[ObjectLike]) -> Tensor:
        """``[O, C]`` logits, e.g. for :func:`.ensemble.ensemble_logits`."""
        return self.logits_from_features(self.encode_views(objects))

    def probabilities(self, objects: Sequence[ObjectLike]) -> Tensor:
        return self.logits(objects).softmax(dim=-1)

    def classify(self, objects: Sequence[ObjectLike]) -> list[tuple[int, float]]:
        """``(class index, probability)`` of the best class of each object."""
        if len(objects) == 0:
            return []
        prob, index = self.probabilities(objects).max(dim=-1)
        return [(int(i), float(p)) for i, p in zip(index.tolist(), prob.tolist(), strict=True)]

    def attach_adapter(self, adapter: torch.nn.Module | None) -> None:
        """Use a trained inter-view adapter (or ``None`` to go back to zero-shot)."""
        if adapter is not None:
            cfg: Any = adapter.config  # an AdapterConfig
            dim = self.text_bank.shape[1]
            if cfg.num_views != self.num_views or cfg.dim != dim:
                raise ConfigError("adapter", f"is for {cfg.num_views} views × {cfg.dim} dims; "
                                  f"this classifier has {self.num_views} × {dim}")
            if (cfg.views, cfg.projection) != (self.views.name, self.projection):
                raise ConfigError("adapter", f"was trained on {cfg.projection}/{cfg.views} "
                                  f"images; this classifier renders {self.projection}/"
                                  f"{self.views.name}")
            if cfg.image_size != self.image_size:
                raise ConfigError("adapter", f"was trained on {cfg.image_size} px images; this "
                                  f"classifier feeds CLIP {self.image_size} px")
            if cfg.classes and tuple(cfg.classes) != tuple(self.class_names):
                raise ConfigError("adapter", f"was trained for classes {list(cfg.classes)}, not "
                                  f"{self.class_names}")
            adapter = adapter.to(self.device).eval()
        self.adapter = adapter
