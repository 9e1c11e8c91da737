"""The object pass over one labelled frame: thing-class clusters, named by PointCLIP in a budget.

Contract of :meth:`ObjectPass.run` (ROS-free; the node turns its result into markers):

1. the points the segmentation labels with a thing class (``classes``, by default the
   vocabulary's ``thing: true`` classes: :mod:`.things`) are clustered into instances with
   oriented boxes (:func:`~.objects.cluster_objects`, 0.25 m grid, at least 10 points), sorted
   largest first (most points, so mostly nearest; ties by distance);
2. the instances are classified by PointCLIP, largest first, while ``budget_ms`` lasts. The
   budget counts from the start of the pass (clustering included); a batch is started only if
   its estimated cost plus a reserve for the rest of the pass still fits (:mod:`.budget`: a
   warm-up at construction gives the first cost per object, then it and its spread follow the
   measured batches), so a pass stops *before* the batch that would overrun. Objects left over
   keep their segmentation class and mean score, flagged ``classified=False``;
3. when every PointCLIP class is a class of the labelling vocabulary, the network's
   log-probabilities are pooled over each classified object (:func:`~.ensemble.
   pool_point_logits`; the network's own, before any image fusion). How often their argmax
   agrees with PointCLIP's is counted (``objects_agreement`` in :meth:`ObjectPass.diagnostics`);
   with ``ensemble_weight`` w > 0, PointCLIP's logits get w times them added.

Construction loads CLIP (unless ``clip`` shares fusion's copy), a PointCLIP adapter found in the
bundle folder (``clip2scene pointclip train``: few-shot, over the adapter's classes unless
``vocabulary`` names others), builds the classifier and times a warm-up. A labelling vocabulary
without any clustered class is a ``ConfigError`` naming ``objects_classes``; a run-time swap to
one is logged once and leaves the result empty until the vocabulary changes again.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError
from ..models.bundle import VocabularySpec
from ..vocabulary import Vocabulary
from .adapter import adapter_paths, load_adapter
from .budget import BatchCost, classify_within_budget
from .classifier import PointCLIPClassifier
from .ensemble import agreement, pool_point_logits
from .objects import ObjectInstance, cluster_objects
from .things import names_vocabulary, normalize_name, thing_classes

#: Clustering grid and noise floor (pointclip.objects' defaults: parked cars stay apart).
VOXEL_SIZE_M = 0.25
MIN_POINTS = 10


class Log(Protocol):
    """What the pass logs through: an rclpy logger or a ``logging.Logger`` alike."""

    def info(self, message: str) -> Any: ...
    def warning(self, message: str) -> Any: ...
    def error(self, message: str) -> Any: ...


class Labeller(Protocol):
    """The labelling side the pass follows (a :class:`~clip2scene_ros.runtime.predictor.
    Predictor`): its current vocabulary and palette, its device and its bundle."""

    @property
    def vocabulary(self) -> VocabularySpec: ...
    @property
    def palette(self) -> np.ndarray: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def bundle(self) -> Any: ...


@dataclass(frozen=True)
class ObjectSettings:
    """The object pass's settings (the node's ``objects_*`` and ``clip_*`` parameters)."""

    clip_model: str
    clip_pretrained: str
    budget_ms: float = 50.0
    classes: Sequence[str] = ()
    vocabulary: str = ""
    ensemble_weight: float = 0.0
    mode: str = "every_frame"  # reported only: when a pass runs is the caller's choice


@dataclass(frozen=True)
class ObjectResult:
    """One object of a pass: its instance, text (``"car p=0.87"``, or ``"car (3D) p=0.75"``
    when the budget left it to the segmentation), colour (RGB 0-255) and whether PointCLIP
    classified it."""

    instance: ObjectInstance
    text: str
    color: tuple[int, int, int]
    classified: bool


@dataclass(frozen=True)
class ObjectsPass:
    """What one pass did: objects found, classified by PointCLIP, skipped over budget."""

    objects: int
    classified: int
    skipped: int
    ms: float
    results: list[ObjectResult] = field(default_factory=list, compare=False, repr=False)


def load_objects_clip(model: str, pretrained: str, device: torch.device, log: Log
                      ) -> tuple[Any, Any]:
    """``(clip, tokenizer)`` of ``model`` / ``pretrained`` (random weights: warned once)."""
    from ..teacher.clip_loader import RANDOM, load_clip

    if pretrained.strip().lower() in RANDOM:
        log.warning(f"objects: PointCLIP runs CLIP {model} with RANDOM weights "
                    f"(clip_pretrained: {pretrained!r}): object labels are "
                    "meaningless; use this for tests only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, logged
        return load_clip(model, pretrained, device=str(device))


def _rgb(color: Sequence[int]) -> tuple[int, int, int]:
    return (int(color[0]), int(color[1]), int(color[2]))


class ObjectPass:
    """Clusters, PointCLIP, the budget and the ensemble of one labeller (see the module doc)."""

    def __init__(self, settings: ObjectSettings, labeller: Labeller, log: Log,
                 clip: tuple[Any, Any] | None = None) -> None:
        self.settings = settings
        self.labeller = labeller
        self.log = log
        self.clip, self.tokenizer = clip or load_objects_clip(
            settings.clip_model, settings.clip_pretrained, labeller.device, log)
        self.counts: Counter[str] = Counter()
        self.last_ms = 0.0
        self._warned: set[str] = set()
        self.adapter = None
        bundle_dir = getattr(labeller.bundle, "path", None)
        if bundle_dir is not None and adapter_paths(bundle_dir)[0].is_file():
            self.adapter = load_adapter(bundle_dir, labeller.device)
        self.fixed = self._fixed_vocabulary()
        self._things_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._things: list[int] = []
        self._classifier: PointCLIPClassifier | None = None
        if not self.things():  # at start-up a vocabulary without objects is a config error
            raise ConfigError("objects_classes", f"the vocabulary {self._names()} has no object "
                              "class (car, pedestrian, ...): name the classes to cluster")
        classifier = self.classifier()
        self.cost = BatchCost(self._warm_up(classifier))
        weight = settings.ensemble_weight
        ensemble = f"weight {weight}" if weight > 0 else "off"
        if weight > 0 and self._ensemble_columns(classifier) is None:
            ensemble = "off (object classes are not all labelling classes)"
            log.warning(f"objects: objects_ensemble_weight is ignored: the object classes "
                        f"{classifier.class_names} are not all classes of {self._names()}")
        self.ensemble = ensemble
        log.info(f"objects: PointCLIP {settings.clip_model} ({settings.clip_pretrained}), "
                 f"{'few-shot adapter' if self.adapter is not None else 'zero-shot'} over "
                 f"{classifier.class_names}; clustering {[self._names()[i] for i in self._things]}"
                 f"; {settings.mode}, budget {settings.budget_ms} ms, ensemble "
                 f"{ensemble}; {1e3 * self.cost.per_object.mean:.1f} ms per object")

    # --- configuration ------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return list(self.labeller.vocabulary.classes)

    def _fixed_vocabulary(self) -> Vocabulary | None:
        """The objects' own vocabulary, if any: ``vocabulary``, else an adapter's."""
        from ..teacher.text_bank import resolve_vocabulary

        if self.settings.vocabulary:
            try:
                return resolve_vocabulary(self.settings.vocabulary)
            except ConfigError as exc:
                raise ConfigError("objects_vocabulary", exc.reason, exc.source) from None
        if self.adapter is not None and self.adapter.config.classes:
            colors = dict(zip(map(normalize_name, self._names()), self.labeller.palette.tolist(),
                              strict=True))
            names = list(self.adapter.config.classes)
            return names_vocabulary("pointclip_adapter", names, [
                colors.get(normalize_name(n), (255, 255, 255)) for n in names])
        return None

    def things(self) -> list[int]:
        """Indices of the clustered classes in the *current* labelling vocabulary.

        The vocabulary can change at run time; a swap to one without the configured classes is
        logged once and leaves the output empty until it changes again.
        """
        names = tuple(self._names())
        flagged = tuple(self.labeller.vocabulary.things)
        if (names, flagged) != self._things_key:
            self._things_key = (names, flagged)
            try:
                self._things = thing_classes(names, list(self.settings.classes),
                                             things=flagged,
                                             key="objects_classes")
            except ConfigError as exc:
                if self._classifier is None:
                    raise  # start-up: refuse with the parameter's name
                self.log.error(f"objects: {exc}; no objects until the vocabulary has them")
                self._things = []
        return self._things

    def classifier(self) -> PointCLIPClassifier:
        """PointCLIP over the fixed vocabulary, or over the current thing classes (rebuilt when
        the labelling vocabulary changes)."""
        current = self._classifier
        if self.fixed is not None:
            vocabulary = self.fixed
        else:
            names, things = self._names(), self.things()
            if not things and current is not None:
                return current  # nothing to cluster in this vocabulary: nothing to classify
            vocabulary = names_vocabulary(f"{self.labeller.vocabulary.name}_objects",
                                          [names[i] for i in things],
                                          self.labeller.palette[things])
        if current is not None and current.class_names == vocabulary.names:
            return current
        views, projection = "v1_zeroshot", "v1"
        if self.adapter is not None:
            views, projection = self.adapter.config.views, self.adapter.config.projection
        classifier = PointCLIPClassifier(self.clip, self.tokenizer, vocabulary, views=views,
                                         projection=projection,  # type: ignore[arg-type]
                                         align_yaw=True)
        if self.adapter is not None:
            try:
                classifier.attach_adapter(self.adapter)
            except ConfigError as exc:
                raise ConfigError("objects_vocabulary", f"the bundle's PointCLIP adapter does "
                                  f"not fit: {exc.reason}") from None
        self._classifier = classifier
        return classifier

    def _warm_up(self, classifier: PointCLIPClassifier) -> float:
        """Seconds per object of one classification: the first budget estimate (the first run
        also pays one-off costs, so a second one is timed)."""
        rng = np.random.default_rng(0)
        car = (rng.random((200, 3)) * np.array([4.0, 1.8, 1.5])).astype(np.float32)
        with torch.no_grad():
            classifier.logits([car])
            t0 = time.perf_counter()
            classifier.logits([car])
        return time.perf_counter() - t0

    def _ensemble_columns(self, classifier: PointCLIPClassifier) -> list[int] | None:
        index = {normalize_name(n): i for i, n in enumerate(self._names())}
        cols = [index.get(normalize_name(n)) for n in classifier.class_names]
        return None if any(c is None for c in cols) else [c for c in cols if c is not None]

    # --- the pass -----------------------------------------------------------------------------
    def run(self, xyz: np.ndarray, label: np.ndarray, score: np.ndarray,
            prediction: Any = None,
            deliver: Callable[[list[ObjectResult]], object] | None = None) -> ObjectsPass:
        """Cluster, classify within the budget, pool (see the module doc).

        ``xyz`` ``[N, 3]``, ``label`` and ``score`` ``[N]`` are the key frame's points (Frame
        order); ``prediction`` (optional) carries the network's ``logits`` over its
        ``prepared`` points (``sweep``, ``source``) for the ensemble. ``deliver(results)``
        (e.g. publishing them) runs inside the pass: its time counts in the pass's tail, which
        the budget reserves for.
        """
        start = time.perf_counter()
        things = self.things()
        # UNKNOWN_LABEL is no class index, so unlabelled points are never clustered
        objects = cluster_objects(xyz, label.astype(np.int64), things, VOXEL_SIZE_M,
                                  MIN_POINTS) if things else []
        objects.sort(key=lambda o: (-o.num_points, float(np.hypot(*o.box.center[:2]))))
        classifier = self.classifier()
        logits = self._classify(classifier, objects, start)
        tail_start = time.perf_counter()
        done = logits.shape[0]
        pooled = (self._pooled(classifier, objects[:done], xyz.shape[0], prediction)
                  if done else None)
        if pooled is not None:  # PointCLIP's own classes against the network's, per object
            agreed = round(agreement(logits, pooled) * done)
            self.counts.update({"compared": done, "agreed": agreed})
            if self.settings.ensemble_weight > 0:
                logits = logits + self.settings.ensemble_weight * pooled
        prob, best = logits.softmax(dim=1).max(dim=1) if done else (torch.zeros(0),) * 2
        results = []
        vocab_palette = classifier.vocabulary.palette
        for i, obj in enumerate(objects):
            if i < done:
                c = int(best[i])
                results.append(ObjectResult(
                    obj, f"{classifier.class_names[c]} p={float(prob[i]):.2f}",
                    _rgb(vocab_palette[c]), True))
            else:  # over budget: the segmentation's class and mean score
                mean = float(score[obj.indices].mean())
                results.append(ObjectResult(
                    obj, f"{self._names()[obj.class_index]} (3D) p={mean:.2f}",
                    _rgb(self.labeller.palette[obj.class_index]), False))
        if deliver is not None:
            deliver(results)
        end = time.perf_counter()
        self.cost.tail_ran(end - tail_start)
        ms = 1e3 * (end - start)
        self.last_ms = ms
        n = len(results)
        self.counts.update({"passes": 1, "found": n, "classified": done, "skipped": n - done})
        return ObjectsPass(n, done, n - done, ms, results)

    def _classify(self, classifier: PointCLIPClassifier, objects: list[ObjectInstance],
                  start: float) -> torch.Tensor:
        """``[k, C]`` logits of the first k objects that fit the budget."""
        def batch(begin: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                return classifier.logits(objects[begin:end]).float().cpu()

        parts = classify_within_budget(len(objects), classifier.batch_size, batch, self.cost,
                                       self.settings.budget_ms / 1e3, start)
        if not parts:
            return torch.zeros(0, len(classifier.class_names))
        return torch.cat(parts)

    def _pooled(self, classifier: PointCLIPClassifier, objects: list[ObjectInstance],
                num_points: int, prediction: Any) -> torch.Tensor | None:
        """``[O, C]`` the network's log-probabilities pooled over each object, in PointCLIP's
        classes; None when they are not all labelling classes or there are no logits."""
        cols = self._ensemble_columns(classifier)
        point_logits = getattr(prediction, "logits", None)
        if cols is None or point_logits is None:
            if "ensemble" not in self._warned and self.settings.ensemble_weight > 0:
                self._warned.add("ensemble")
                self.log.warning("objects: no ensemble (the object classes are not all "
                                 "labelling classes, or the prediction carries no logits)")
            return None
        prepared = prediction.prepared
        key = prepared.sweep == 0
        point_logits = point_logits[torch.from_numpy(key)][:, cols]
        row = np.full(num_points, -1, dtype=np.int64)  # frame point -> row of point_logits
        row[prepared.source[key]] = np.arange(int(key.sum()))
        index = [r[r >= 0] for r in (row[o.indices] for o in objects)]
        return pool_point_logits(point_logits, index, len(objects))

    def diagnostics(self) -> dict[str, str]:
        """The pass's counters as diagnostic key/values (``objects_*``)."""
        c = self.counts
        return {"objects_mode": self.settings.mode, "objects_passes": str(c["passes"]),
                "objects_found": str(c["found"]), "objects_classified": str(c["classified"]),
                "objects_skipped_budget": str(c["skipped"]),
                "objects_ms_last": f"{self.last_ms:.1f}",
                "objects_ms_per_object": f"{1e3 * self.cost.per_object.mean:.2f}",
                "objects_ensemble": self.ensemble,
                "objects_agreement": (f"{c['agreed'] / c['compared']:.3f} ({c['agreed']} of "
                                      f"{c['compared']} objects)" if c["compared"] else "n/a")}
