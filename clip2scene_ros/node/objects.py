"""PointCLIP object labels in the node: thing-class clusters, named by PointCLIP, as markers.

Per frame (``objects_mode: every_frame``) or once per call of the ``~/classify_objects``
service (``on_demand``), and only while someone subscribes to ``objects_topic``:

1. the points the segmentation labels with a thing class (``objects_classes``, by default the
   vocabulary's classes named like objects: :mod:`clip2scene_ros.pointclip.things`) are
   clustered into instances with oriented boxes (:func:`~clip2scene_ros.pointclip.objects.
   cluster_objects`, 0.25 m grid, at least 10 points);
2. the instances are classified by PointCLIP, largest (most points, so mostly nearest) first,
   while ``objects_budget_ms`` lasts. The budget counts from the start of the pass (clustering
   included); a batch is started only if its estimated cost plus a reserve for the rest of the
   pass still fits (:mod:`clip2scene_ros.pointclip.budget`: a warm-up at start-up gives the
   first cost per object, then it and its spread follow the measured batches), so a pass stops
   *before* the batch that would overrun. Objects left over keep their segmentation class and
   are drawn half transparent with a "(3D)" label;
3. when every PointCLIP class is a class of the labelling vocabulary (true for the default
   object vocabulary), the network's log-probabilities are pooled over each classified object
   (:func:`~clip2scene_ros.pointclip.ensemble.pool_point_logits`; the network's own, before
   any image fusion). How often their argmax agrees with PointCLIP's is counted and reported in
   diagnostics (``objects_agreement``); with ``objects_ensemble_weight`` w > 0, PointCLIP's
   logits get w times them added;
4. a ``MarkerArray`` goes out with the cloud's header: DELETEALL first (stale boxes vanish),
   then per object a LINE_LIST box and a TEXT_VIEW_FACING label ``"car p=0.87"``. Every-frame
   markers live 1 s, so they vanish soon after the node stops; on-demand ones stay until the
   next answer.

**On demand.** A ``std_srvs/Trigger`` call answers at once ("scheduled") and the next frame
processed publishes the objects. Waiting for that frame inside the call would block the node's
(single-threaded) executor, which has to deliver the very cloud the answer waits for. Calls
before that frame collapse into one pass; a failed pass is retried on the next frame.

**CLIP.** The same ``clip_model`` / ``clip_pretrained`` as fusion (one copy when both run);
``publish_objects`` without weights is refused at start-up by the parameter check, as fusion
is. A bundle folder holding a PointCLIP adapter (``clip2scene pointclip train``) makes the
classifier few-shot, over the adapter's classes unless ``objects_vocabulary`` says otherwise.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from geometry_msgs.msg import Point
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from ..errors import ConfigError
from ..node_params import NodeParams
from ..pointclip.adapter import adapter_paths, load_adapter
from ..pointclip.budget import BatchCost, classify_within_budget
from ..pointclip.classifier import PointCLIPClassifier
from ..pointclip.ensemble import agreement, pool_point_logits
from ..pointclip.objects import ObjectInstance, cluster_objects
from ..pointclip.things import names_vocabulary, normalize_name, thing_classes
from ..runtime.labels import PointLabels
from ..vocabulary import Vocabulary

#: Clustering grid and noise floor (pointclip.objects' defaults: parked cars stay apart).
VOXEL_SIZE_M = 0.25
MIN_POINTS = 10
#: Lifetime of every-frame markers: a stopped node's boxes fade instead of staying forever.
EVERY_FRAME_LIFETIME_S = 1
BOX_NS = "clip2scene_objects"
TEXT_NS = "clip2scene_object_labels"
LINE_WIDTH_M = 0.05
TEXT_HEIGHT_M = 0.5
SERVICE = "~/classify_objects"
#: The 12 edges of :meth:`OrientedBox.corners` (bottom face, top face, uprights).
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
          (0, 4), (1, 5), (2, 6), (3, 7))


@dataclass(frozen=True)
class ObjectsPass:
    """What one pass did: objects found, classified by PointCLIP, skipped over budget."""

    objects: int
    classified: int
    skipped: int
    ms: float


def load_objects_clip(params: NodeParams, device: torch.device, log: Any) -> tuple[Any, Any]:
    """``(clip, tokenizer)`` from ``clip_model`` / ``clip_pretrained`` (random: warned once)."""
    from ..teacher.clip_loader import RANDOM, load_clip

    if params.clip_pretrained.strip().lower() in RANDOM:
        log.warning(f"objects: PointCLIP runs CLIP {params.clip_model} with RANDOM weights "
                    f"(clip_pretrained: {params.clip_pretrained!r}): object labels are "
                    "meaningless; use this for tests only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, logged
        return load_clip(params.clip_model, params.clip_pretrained, device=str(device))


def _rgba(color: Sequence[int], alpha: float) -> tuple[float, float, float, float]:
    return (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0, alpha)


class ObjectsOutput:
    """The objects output of one pipeline (see the module doc).

    Building it is part of "configure": CLIP (unless ``clip`` shares fusion's), the adapter,
    the classifier, a warm-up. :meth:`open` / :meth:`close` attach the publisher and service.
    """

    def __init__(self, params: NodeParams, predictor: Any, log: Any,
                 clip: tuple[Any, Any] | None = None) -> None:
        self.params = params
        self.predictor = predictor
        self.log = log
        self.clip, self.tokenizer = clip or load_objects_clip(params, predictor.device, log)
        self.publisher: Any = None
        self.service: Any = None
        self.counts: Counter[str] = Counter()
        self.last_ms = 0.0
        self._lock = threading.Lock()
        self._requested = self._served = 0  # on-demand calls, and the last one answered
        self._warned: set[str] = set()
        self.adapter = None
        bundle_dir = getattr(predictor.bundle, "path", None)
        if bundle_dir is not None and adapter_paths(bundle_dir)[0].is_file():
            self.adapter = load_adapter(bundle_dir, predictor.device)
        self.fixed = self._fixed_vocabulary()
        self._things_key: tuple[str, ...] | None = None
        self._things: list[int] = []
        self._classifier: PointCLIPClassifier | None = None
        if not self.things():  # at start-up a vocabulary without objects is a config error
            raise ConfigError("objects_classes", f"the vocabulary {self._names()} has no object "
                              "class (car, pedestrian, ...): name the classes to cluster")
        classifier = self.classifier()
        self.cost = BatchCost(self._warm_up(classifier))
        ensemble = (f"weight {params.objects_ensemble_weight}"
                    if params.objects_ensemble_weight > 0 else "off")
        if params.objects_ensemble_weight > 0 and self._ensemble_columns(classifier) is None:
            ensemble = "off (object classes are not all labelling classes)"
            log.warning(f"objects: objects_ensemble_weight is ignored: the object classes "
                        f"{classifier.class_names} are not all classes of {self._names()}")
        self.ensemble = ensemble
        log.info(f"objects: PointCLIP {params.clip_model} ({params.clip_pretrained}), "
                 f"{'few-shot adapter' if self.adapter is not None else 'zero-shot'} over "
                 f"{classifier.class_names}; clustering {[self._names()[i] for i in self._things]}"
                 f"; {params.objects_mode}, budget {params.objects_budget_ms} ms, ensemble "
                 f"{ensemble}; {1e3 * self.cost.per_object.mean:.1f} ms per object")

    # --- configuration ------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return list(self.predictor.vocabulary.classes)

    def _fixed_vocabulary(self) -> Vocabulary | None:
        """The objects' own vocabulary, if any: ``objects_vocabulary``, else an adapter's."""
        from ..teacher.text_bank import resolve_vocabulary

        if self.params.objects_vocabulary:
            try:
                return resolve_vocabulary(self.params.objects_vocabulary)
            except ConfigError as exc:
                raise ConfigError("objects_vocabulary", exc.reason, exc.source) from None
        if self.adapter is not None and self.adapter.config.classes:
            colors = dict(zip(map(normalize_name, self._names()), self.predictor.palette.tolist(),
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
        if names != self._things_key:
            self._things_key = names
            try:
                self._things = thing_classes(names, self.params.objects_classes,
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
            vocabulary = names_vocabulary(f"{self.predictor.vocabulary.name}_objects",
                                          [names[i] for i in things],
                                          self.predictor.palette[things])
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
        return None if any(c is None for c in cols) else cols  # type: ignore[misc]

    # --- ROS entities -------------------------------------------------------------------------
    def open(self, node: Any, publisher: Any) -> None:
        self.publisher = publisher
        if self.params.objects_mode == "on_demand":
            self.service = node.create_service(Trigger, SERVICE, self._on_trigger)

    def close(self, node: Any) -> None:
        if self.service is not None:
            node.destroy_service(self.service)
        self.service = self.publisher = None

    def _on_trigger(self, request: Any, response: Any) -> Any:
        with self._lock:
            self._requested += 1
        pub = self.publisher
        topic = pub.topic_name if pub is not None else self.params.objects_topic
        response.success = True
        response.message = f"scheduled: the objects of the next frame go to {topic}"
        if pub is None or pub.get_subscription_count() == 0:
            response.message += "; nobody subscribes to it yet: they are labelled once one does"
        return response

    def wanted(self) -> bool:
        """Whether the coming frame needs an object pass (a subscriber, and a request if
        on demand)."""
        pub = self.publisher
        if pub is None or pub.get_subscription_count() == 0:
            return False
        if self.params.objects_mode == "every_frame":
            return True
        with self._lock:
            return self._requested > self._served

    # --- the pass -----------------------------------------------------------------------------
    def publish(self, header: Any, xyz: np.ndarray, labels: PointLabels,
                prediction: Any = None) -> ObjectsPass:
        """Cluster, classify within the budget, publish the markers (see the module doc)."""
        start = time.perf_counter()
        with self._lock:
            request = self._requested
        things = self.things()
        # UNKNOWN_LABEL is no class index, so unlabelled points are never clustered
        objects = cluster_objects(xyz, labels.label.astype(np.int64), things, VOXEL_SIZE_M,
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
            if self.params.objects_ensemble_weight > 0:
                logits = logits + self.params.objects_ensemble_weight * pooled
        prob, best = logits.softmax(dim=1).max(dim=1) if done else (torch.zeros(0),) * 2
        entries = []
        vocab_palette = classifier.vocabulary.palette
        for i, obj in enumerate(objects):
            if i < done:
                c = int(best[i])
                entries.append((obj, f"{classifier.class_names[c]} p={float(prob[i]):.2f}",
                                _rgba(vocab_palette[c], 1.0)))
            else:  # over budget: the segmentation's class and mean score
                score = float(labels.score[obj.indices].mean())
                entries.append((obj, f"{self._names()[obj.class_index]} (3D) p={score:.2f}",
                                _rgba(self.predictor.palette[obj.class_index], 0.5)))
        publisher = self.publisher
        if publisher is not None:
            publisher.publish(self._markers(header, entries))
        with self._lock:
            self._served = max(self._served, request)
        end = time.perf_counter()
        self.cost.tail_ran(end - tail_start)
        ms = 1e3 * (end - start)
        self.last_ms = ms
        self.counts.update({"passes": 1, "found": len(objects), "classified": done,
                            "skipped": len(objects) - done})
        return ObjectsPass(len(objects), done, len(objects) - done, ms)

    def _classify(self, classifier: PointCLIPClassifier, objects: list[ObjectInstance],
                  start: float) -> torch.Tensor:
        """``[k, C]`` logits of the first k objects that fit the budget."""
        def batch(begin: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                return classifier.logits(objects[begin:end]).float().cpu()

        parts = classify_within_budget(len(objects), classifier.batch_size, batch, self.cost,
                                       self.params.objects_budget_ms / 1e3, start)
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
            if "ensemble" not in self._warned and self.params.objects_ensemble_weight > 0:
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

    def _markers(self, header: Any, entries: list[tuple[ObjectInstance, str, tuple]]
                 ) -> MarkerArray:
        out = MarkerArray()
        clear = Marker(action=Marker.DELETEALL)
        clear.header = header
        out.markers.append(clear)
        lifetime = EVERY_FRAME_LIFETIME_S if self.params.objects_mode == "every_frame" else 0
        for i, (obj, text, rgba) in enumerate(entries):
            corners = obj.box.corners()
            box = Marker(ns=BOX_NS, id=i, type=Marker.LINE_LIST, action=Marker.ADD)
            box.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))
                          for a, b in _EDGES for p in (corners[a], corners[b])]
            box.scale.x = LINE_WIDTH_M
            label = Marker(ns=TEXT_NS, id=i, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                           text=text)
            cx, cy, cz = obj.box.center
            label.pose.position.x, label.pose.position.y = float(cx), float(cy)
            label.pose.position.z = float(cz + obj.box.size[2] / 2 + 0.6 * TEXT_HEIGHT_M)
            label.scale.z = TEXT_HEIGHT_M
            for m in (box, label):
                m.header = header
                m.pose.orientation.w = 1.0
                m.color.r, m.color.g, m.color.b, m.color.a = rgba
                m.lifetime.sec = lifetime
                out.markers.append(m)
        return out

    def diagnostics(self) -> dict[str, str]:
        c = self.counts
        return {"objects_mode": self.params.objects_mode, "objects_passes": str(c["passes"]),
                "objects_found": str(c["found"]), "objects_classified": str(c["classified"]),
                "objects_skipped_budget": str(c["skipped"]),
                "objects_ms_last": f"{self.last_ms:.1f}",
                "objects_ms_per_object": f"{1e3 * self.cost.per_object.mean:.2f}",
                "objects_ensemble": self.ensemble,
                "objects_agreement": (f"{c['agreed'] / c['compared']:.3f} ({c['agreed']} of "
                                      f"{c['compared']} objects)" if c["compared"] else "n/a")}
