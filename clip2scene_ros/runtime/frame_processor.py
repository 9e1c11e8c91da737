"""The frame processor: a decoded cloud and its synced images in; labels, colours, overlay out.

Everything between a decoded message and an array to publish lives here, ROS-free (DESIGN rule
3); the node converts messages with :mod:`clip2scene_ros.codecs`, calls :meth:`FrameProcessor.
label` once per synced set, publishes, then calls :meth:`FrameProcessor.done`.

Building a :class:`FrameProcessor` is the "configure" step: the Predictor (through
``predictor_factory``), the run-time vocabulary (a bad one is counted and logged, and the
bundle's own labels instead), the cameras and calibration (:mod:`.camera_views`), MaskCLIP for
fusion and the PointCLIP object pass (:mod:`clip2scene_ros.pointclip.object_pass`, sharing
fusion's CLIP). Refusals are ``ConfigError`` naming the parameter.

Contract of :meth:`FrameProcessor.label`, per frame:

1. the cloud becomes a :class:`~clip2scene_ros.frame.Frame` of its finite points (a malformed
   one is counted as a bad ``PointCloud2`` and the frame dropped: None);
2. the camera views (:meth:`~.camera_views.CameraRig.views`; images decoded only when fusion or
   the overlay reads them); each camera's state ("ok" or why not) is kept for diagnostics, a
   change is logged (throttled), and the frame is counted ``with_cameras`` or ``lidar_only``;
3. sweep history: the history restarts when the stamp does not advance or jumps forward more
   than ``jump_forward_ns``; with a multi-sweep model each sweep gets its ego pose
   (``world_frame`` ← cloud frame, from the lookup), and the past sweeps are merged only when
   every sweep in the history has one; otherwise the key frame alone is labelled and
   :attr:`FrameProcessor.sweep_state` says why (a WARN in diagnostics, a throttled log line);
4. the Predictor labels the frame(s); points it dropped are counted per reason;
5. fusion (``fusion``): MaskCLIP's logits on the images, resized to the teacher cache's input,
   blended into the network's for points in view (:func:`~.fusion.fuse_prediction`); its time is
   added to ``inference`` and ``total``;
6. outputs asked for: the labelled cloud's arrays (:func:`~.colouring.labelled_cloud`) and the
   overlay of the first used camera (:func:`~.colouring.draw_overlay`).

:meth:`FrameProcessor.objects_pass` runs the object pass on a labelled frame, after the caller
has published the cloud (it waits for nothing).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..calibration import load_calibration
from ..codecs.pointcloud2 import lidar_points
from ..errors import ConfigError, MessageError
from ..frame import CameraView, Frame
from ..geometry.correspondence import PointPixelPairs, point_pixel_pairs
from ..health import Health, Level
from ..node_params import PATH_PARAMETERS, NodeParams, resolve_path, resolve_paths
from ..pointclip.object_pass import Log, ObjectPass, ObjectResult, ObjectSettings, ObjectsPass
from .camera_views import CameraImage, CameraRig, TransformLookup, camera_inputs, lookup_or_reason
from .colouring import LabelledCloud, draw_overlay, labelled_cloud
from .engine_cache import engine_cache_dir
from .fusion import TEMPERATURE, fuse_prediction
from .labels import PointLabels
from .predictor import Prediction, Predictor

#: Depth below which a point is not paired with a pixel (the teacher cache's default: the LiDAR
#: sees the ego car's roof and mirrors closer than that).
MIN_DEPTH_M = 1.0
#: A stamp this much newer than the oldest sweep kept restarts the history (the camera sync's
#: default forward jump).
JUMP_FORWARD_NS = 60 * 1_000_000_000

PredictorFactory = Callable[[NodeParams], Predictor]


def predictor_from_params(params: NodeParams) -> Predictor:
    """The Predictor the parameters describe (engines cached where
    :func:`~.engine_cache.engine_cache_dir` says: ``engine_cache_dir``, else next to the
    bundle)."""
    if not params.model_path:
        raise ConfigError("model_path", "is empty: point it at a model bundle directory "
                          "(`clip2scene export` writes one)")
    cache = engine_cache_dir(params.model_path, params.engine_cache_dir)
    if params.threads:
        torch.set_num_threads(params.threads)  # process-wide: the node runs one network
    return Predictor(params.model_path, backend=params.backend, device=params.device,
                     sweeps=params.sweeps, max_points=params.max_points,
                     precision=params.precision, engine_cache=cache,
                     profile=params.engine_profile())


@dataclass(frozen=True)
class Overlay:
    """The overlay image and the header of the camera image it was drawn on."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    stamp_ns: int
    frame_id: str


@dataclass
class LabelledFrame:
    """One labelled frame: the key frame (with its camera views), the labels of its points
    (Frame order), the prediction, and the outputs asked for."""

    frame: Frame
    labels: PointLabels
    prediction: Prediction
    timings_ms: dict[str, float]
    cloud: LabelledCloud | None = None
    overlay: Overlay | None = None
    pairs: PointPixelPairs | None = field(default=None, repr=False)


class FrameProcessor:
    """Parameters → Predictor (+ MaskCLIP, PointCLIP); decoded frames → labelled arrays.

    ``log``: an rclpy or ``logging`` logger. ``tf_available``: whether the caller can serve
    transforms (tf2); :attr:`wants_lookup` then says whether it should set :attr:`lookup`.
    """

    def __init__(self, params: NodeParams, log: Log,
                 predictor_factory: PredictorFactory | None = None, *,
                 tf_available: bool = False) -> None:
        params = resolve_paths(params)  # absolute once: reported, and immune to a chdir
        self.params = params
        self.log = log
        self.paths = {name: getattr(params, name) for name in PATH_PARAMETERS}
        if params.objects_vocabulary:
            self.paths["objects_vocabulary"] = params.objects_vocabulary
        log.info("paths: " + ", ".join(f"{k} {v or '(none)'}" for k, v in self.paths.items()))
        self.health = Health(log_throttle_s=params.log_throttle_s)
        self.work: Counter[str] = Counter()  # optional outputs computed, by output
        self.predictor = (predictor_factory or predictor_from_params)(params)
        if params.vocabulary:
            try:
                self.set_vocabulary(params.vocabulary)
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                # a bad bank must not stop a vehicle's perception: label with the bundle's own
                self.bad("vocabulary", f"{exc}; labelling with the bundle's vocabulary "
                         f"{self.predictor.vocabulary.name!r}", time.monotonic())

        self.rig = CameraRig(
            camera_inputs(params),
            load_calibration(params.calibration_file) if params.calibration_file else None,
            params.calibration_file, params.sync_slop_s, params.camera_timeout_s)
        self.cameras = self.rig.cameras
        self.camera_state: dict[str, str] = {}  # per camera: "ok" or why the last frame lacked it
        # a lookup (tf2) serves the extrinsics the calibration file lacks, and the ego poses
        # that move past sweeps into the key frame (a multi-sweep model)
        self.wants_lookup = tf_available and (
            self.rig.needs_lookup() or (self.predictor.sweeps > 1 and bool(params.world_frame)))
        if self.cameras and self.rig.calibration is None and not self.wants_lookup:
            unusable = "no extrinsics: calibration_file is empty and tf2_ros is not installed"
            self.rig.unusable = unusable
            if params.fusion:
                raise ConfigError("calibration_file", f"fusion needs camera extrinsics, but "
                                  f"{unusable.removeprefix('no extrinsics: ')}")
            # said once here; diagnostics keep showing it per camera
            log.error(f"cameras {[c.name for c in self.cameras]} are unusable "
                      f"({unusable}); labelling LiDAR-only")
            self.camera_state = dict.fromkeys((c.name for c in self.cameras), unusable)
        self._clip: tuple[Any, Any] | None = None  # (model, tokenizer) fusion loaded
        self.maskclip: Any = self._load_maskclip() if params.fusion else None
        # PointCLIP objects share fusion's CLIP when both run: one copy of the weights
        self.objects = (ObjectPass(ObjectSettings(
            params.clip_model, params.clip_pretrained, params.objects_budget_ms,
            tuple(params.objects_classes), params.objects_vocabulary,
            params.objects_ensemble_weight, params.objects_mode), self.predictor, log, self._clip)
            if params.publish_objects else None)
        self.jump_forward_ns = JUMP_FORWARD_NS
        self._history: deque[Frame] = deque(maxlen=max(1, self.predictor.sweeps))
        self.sweep_state = f"1 of {self.predictor.sweeps}"  # sweeps merged into the last frame

    @property
    def unusable(self) -> str | None:
        """Why no camera can be used at all (no extrinsics anywhere), or None."""
        return self.rig.unusable

    @property
    def camera_models(self) -> dict[str, Any]:
        return self.rig.camera_models

    @property
    def lookup(self) -> TransformLookup | None:
        return self.rig.lookup

    @lookup.setter
    def lookup(self, value: TransformLookup | None) -> None:
        self.rig.lookup = value

    # --- configure ----------------------------------------------------------------------------
    def _load_maskclip(self) -> Any:
        from ..teacher.clip_loader import RANDOM, load_clip
        from ..teacher.maskclip import MaskCLIP

        p = self.params
        if p.clip_pretrained.strip().lower() in RANDOM:
            self.log.warning(f"fusion runs CLIP {p.clip_model} with RANDOM weights "
                             f"(clip_pretrained: {p.clip_pretrained!r}): the fused labels are "
                             "meaningless; use this for tests only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, logged
            clip, tokenizer = load_clip(p.clip_model, p.clip_pretrained,
                                        device=str(self.predictor.device))
        self._clip = (clip, tokenizer)
        # MaskCLIP keeps the visual tower only; the text tower goes with ``clip``
        maskclip = MaskCLIP(clip).to(self.predictor.device)
        dim = int(self.predictor.text_bank.shape[1])
        if maskclip.embed_dim != dim:
            raise ConfigError("clip_model", f"{p.clip_model} embeds images in "
                              f"{maskclip.embed_dim} dims but the bundle's text bank has {dim}: "
                              "use the CLIP the bundle was distilled from")
        self.log.info(f"fusion: MaskCLIP {p.clip_model} ({p.clip_pretrained}), image weight "
                      f"{p.fusion_weight}")
        return maskclip

    def set_vocabulary(self, path: str) -> None:
        """Label with the text bank at ``path`` from the next frame (ConfigError if it does not
        fit the model, IntegrityError if the bank files are damaged).

        MaskCLIP reads the Predictor's bank each frame, so fusion follows the swap too.
        """
        from ..teacher.text_bank import load_text_bank

        path = resolve_path(path)
        bank, vocabulary, _ = load_text_bank(path)
        try:
            self.predictor.set_vocabulary(bank, vocabulary)
        except ConfigError as exc:  # e.g. a bank of another CLIP: say which file and setting
            raise ConfigError("vocabulary", f"{exc.key} {exc.reason}", path) from None
        self.paths["vocabulary"] = path
        self.log.info(f"vocabulary {vocabulary.name!r} ({len(vocabulary.classes)} classes) "
                      f"from {path}")

    # --- bookkeeping --------------------------------------------------------------------------
    def bad(self, kind: str, text: str, now: float) -> None:
        """Count a bad input of ``kind`` and log it (throttled per kind)."""
        self.health.bad_message(kind)
        log, suppressed = self.health.should_log(kind, now)
        if log:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.log.warning(f"dropped a bad {kind}: {text}{more}")

    def reset(self) -> None:
        """Forget the sweep history (a deactivated node starts afresh)."""
        self._history.clear()

    def done(self, timings_ms: Mapping[str, float], now: float) -> None:
        """Count a frame processed (published) and its stage latencies (``pipeline_latency``:
        the ``pipeline`` stage)."""
        self.health.frame("processed", now)
        for stage, ms in timings_ms.items():
            self.health.latency("pipeline" if stage == "pipeline_latency" else stage, ms)

    # --- one frame ----------------------------------------------------------------------------
    def label(self, cloud: np.ndarray, stamp_ns: int, frame_id: str,
              images: Mapping[str, CameraImage], *, cloud_out: bool = True,
              overlay: bool = False, now: float | None = None) -> LabelledFrame | None:
        """Label one decoded ``cloud`` with its synced ``images`` (see the module doc); None
        when the cloud is malformed (counted)."""
        now = time.monotonic() if now is None else now
        try:
            frame, kept = self._frame(cloud, stamp_ns, frame_id)
        except MessageError as exc:
            self.bad(exc.kind, str(exc), now)
            return None
        need_images = self.maskclip is not None or overlay
        found = self.rig.views(images, frame, decode=need_images,
                               bad=lambda exc: self.bad(exc.kind, str(exc), time.monotonic()))
        self._note_cameras(found.used, found.skipped, now)
        if self._history and not (0 < frame.stamp_ns - self._history[0].stamp_ns
                                  <= self.jump_forward_ns):
            self._history.clear()  # the clock went backwards (bag loop) or far ahead: start over
        pose = self._ego_pose(frame) if self.predictor.sweeps > 1 else None
        frame = replace(frame, pose=None if isinstance(pose, str) else pose)
        self._history.appendleft(frame)  # past sweeps keep no images
        frame = replace(frame, cameras=tuple(found.views),
                        skipped_cameras=tuple(found.skipped.items()))
        # past sweeps are moved by the ego poses; without them the key frame alone is used
        past = list(self._history)[1:]
        usable = all(f.pose is not None for f in self._history)
        self._note_sweeps(1 + len(past) if usable else 1, pose, now)
        bank = self.predictor.text_bank  # one bank for the 3D and the image logits
        result = self.predictor.predict([frame, *past] if usable else [frame])
        for reason, count in result.prepared.dropped.items():
            self.health.points_dropped(reason, count)
        labels = result.labels
        timings = dict(result.timings_ms)
        pairs = None
        if frame.cameras:  # decoded only when fusion or the overlay needs them
            pairs = point_pixel_pairs(frame.xyz, [(v.camera, v.lidar_to_camera)
                                                  for v in frame.cameras], min_depth=MIN_DEPTH_M)
        if self.maskclip is not None and pairs is not None:
            t0 = time.perf_counter()
            labels = self._fuse(frame, result, bank, pairs)
            ms = 1e3 * (time.perf_counter() - t0)
            timings["inference"] = timings.get("inference", 0.0) + ms
            timings["total"] = timings.get("total", 0.0) + ms
        out = LabelledFrame(frame, labels, result, timings, pairs=pairs)
        palette = self.predictor.palette
        if cloud_out:
            out.cloud = labelled_cloud(cloud, kept, labels.label, labels.score, palette)
        if overlay and pairs is not None:
            view = frame.cameras[0]
            out.overlay = Overlay(draw_overlay(view.image, pairs, labels.label, palette),
                                  view.stamp_ns, view.frame_id)
            self.work["overlay"] += 1
        return out

    def objects_pass(self, labelled: LabelledFrame,
                     deliver: Callable[[list[ObjectResult]], object] | None = None
                     ) -> ObjectsPass | None:
        """The PointCLIP object pass over ``labelled`` (None when objects are off);
        ``deliver(results)`` runs inside it (see :meth:`~clip2scene_ros.pointclip.object_pass.
        ObjectPass.run`)."""
        if self.objects is None:
            return None
        labels = labelled.labels
        done = self.objects.run(labelled.frame.xyz, labels.label, labels.score,
                                labelled.prediction, deliver)
        self.work["objects"] += 1
        return done

    def _frame(self, cloud: np.ndarray, stamp_ns: int, frame_id: str
               ) -> tuple[Frame, np.ndarray]:
        if stamp_ns <= 0:
            raise MessageError("PointCloud2", "header.stamp", "is zero or negative")
        points = lidar_points(cloud, stamp_ns=stamp_ns)
        frame = Frame(stamp_ns=stamp_ns, frame_id=frame_id, xyz=points.xyz,
                      intensity=points.intensity, ring=points.ring, time=points.time)
        return frame, points.index

    def _ego_pose(self, frame: Frame) -> np.ndarray | str:
        """world_frame ← LiDAR at the sweep's stamp from the lookup; or why not."""
        world = self.params.world_frame
        if not world:
            return "world_frame is empty"
        return lookup_or_reason(self.lookup, world, frame.frame_id, frame.stamp_ns,
                                latest=False)

    def _note_sweeps(self, merged: int, pose: np.ndarray | str | None, now: float) -> None:
        """Diagnostics say how many sweeps the model got; a missing pose is a WARN (a model
        trained on several sweeps sees a sparser cloud) with a throttled log line."""
        state = f"{merged} of {self.predictor.sweeps}"
        if isinstance(pose, str):
            state += f": no ego pose ({pose})"
            log, _ = self.health.should_log("sweeps", now)
            if log and state != self.sweep_state:
                self.log.warning(f"sweeps {state}; the key frame alone is labelled")
        self.sweep_state = state

    def _note_cameras(self, used: list[str], skipped: dict[str, str], now: float) -> None:
        if not self.cameras:
            return  # LiDAR-only by configuration, nothing to report
        for cam in self.cameras:
            state = "ok" if cam.name in used else skipped.get(cam.name, "not synced")
            if state != "ok" and state != self.camera_state.get(cam.name):
                log, _ = self.health.should_log(f"camera:{cam.name}", now)
                if log:
                    self.log.warning(f"camera {cam.name}: {state}")
            self.camera_state[cam.name] = state
        self.health.frame("with_cameras" if used else "lidar_only", now)

    def _fuse(self, frame: Frame, result: Prediction, bank: torch.Tensor,
              pairs: PointPixelPairs) -> PointLabels:
        from ..teacher.labeller import DEFAULT_IMAGE_SIZE, resize_images

        # the teacher cache's input size: MaskCLIP sees images as it did in training
        device = self.predictor.device
        images = resize_images([v.image for v in frame.cameras], DEFAULT_IMAGE_SIZE).to(device)
        with torch.inference_mode():
            logits = self.maskclip.dense_logits(images, bank.to(device))
        fused = fuse_prediction(result, list(logits), pairs,
                                [v.image.shape[:2] for v in frame.cameras],
                                self.params.fusion_weight, TEMPERATURE)
        self.work["fusion"] += 1
        return fused.labels

    # --- diagnostics --------------------------------------------------------------------------
    def diagnostics(self, now: float, sync: str = "") -> tuple[Level, str, dict[str, str]]:
        """``(level, message, values)`` of the segmentation status: health, backend, paths,
        objects, sweeps (WARN without ego poses) and cameras (WARN for each missing one,
        "LiDAR-only" when all are); ``sync`` names the camera sync engine."""
        status = self.health.status(now)
        level, message = status.level, status.message
        values = {**status.values, "backend": self.predictor.backend.describe(),
                  "device": str(self.predictor.device),
                  "vocabulary": self.predictor.vocabulary.name,
                  **{f"path_{k}": v for k, v in self.paths.items() if v}}
        if self.objects is not None:
            values.update(self.objects.diagnostics())
        if self.predictor.sweeps > 1:
            values["sweeps"] = self.sweep_state
            if "no ego pose" in self.sweep_state:
                text = f"sweeps {self.sweep_state}"
                message = text if message == "ok" else f"{message}; {text}"
                level = "WARN" if level == "OK" else level
        if self.cameras:
            values["sync"] = sync
            values["fusion"] = (f"on ({self.params.clip_model}, weight "
                                f"{self.params.fusion_weight})" if self.maskclip else "off")
            states = dict(self.camera_state)
            values.update({f"camera_{name}": state for name, state in states.items()})
            missing = {name: state for name, state in states.items() if state != "ok"}
            if missing:
                text = "; ".join(f"camera {name} missing: {state}"
                                 for name, state in missing.items())
                if len(missing) == len(self.cameras):
                    text = f"LiDAR-only ({text})"
                message = text if message == "ok" else f"{message}; {text}"
                level = "WARN" if level == "OK" else level
        return level, message, values


__all__ = ["CameraImage", "CameraView", "FrameProcessor", "LabelledFrame", "Overlay",
           "PredictorFactory", "predictor_from_params"]
