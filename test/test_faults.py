"""Faults, each a test, and safe loading (docs/reliability.md, sections 3 and 4).

Faults covered elsewhere (not repeated here): a camera that stops mid-run and comes back
(``test_node_cameras.py::test_camera_used_then_lidar_only_when_it_stops_then_used_again``), the
sync's own reset on a backwards stamp (``test_sync_clock_jump_backwards_clears_the_state``),
cameras without any extrinsics (``test_without_extrinsics_cameras_are_unusable_and_said_so``),
engine caches with a changed TensorRT version, a missing sidecar or corrupt bytes
(``test_runtime_backends.py::test_engine_cache_rebuilds_stale_engines_saying_why``), torn
checkpoints (``test_training_trainer.py::test_checkpoints_hold_no_pickle_and_damage_is_refused``)
and a single-process run killed with SIGKILL
(``test_training_faults.py::test_run_killed_with_sigkill_resumes_to_the_same_weights``).

Everything is tiny (SPVCNN cr 0.125-0.25, a few hundred points, one torch thread): these tests
check how faults are detected, reported and survived, never model quality.

One file because each test is one fault of docs/reliability.md's list, in its order: the file
is that list, made executable (~700 lines).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# the in-process node rig of the camera tests (pytest puts test/ on sys.path)
from test_node_cameras import (
    LIDAR_TO_CAMERA,
    Rig,
    _cloud,
    _image,
    _params,
    fake_tf2,
    needs_ros,
)
from test_training_faults import _checkpoint_step

from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.teacher.text_bank import save_text_bank
from clip2scene_ros.training.checkpoint import LAST, PREVIOUS, find_checkpoint
from clip2scene_ros.training.config import load_train_config
from clip2scene_ros.training.trainer import train
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
S = 1_000_000_000  # ns per second


# --- training: a full disk, a DDP rank killed ---------------------------------------------------
@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_faults")
    write_sample_drive(root / "drive", frames=4, seed=0, rig=small_rig(120, left=None))
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    rows = torch.randn(len(vocab.classes), 512, generator=torch.Generator().manual_seed(0))
    bank = save_text_bank(root / "bank", torch.nn.functional.normalize(rows, dim=-1), vocab,
                          {"model": "random-rows", "pretrained": "random", "prompts": "none",
                           "templates": 0})
    return {"root": root, "drive": root / "drive", "bank": bank}


def _train_raw(drive: dict[str, Path], run: str, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run_dir": str(drive["root"] / run),
        "dataset": {"bags": [str(drive["drive"])], "sweeps": 1, "label_source": "ground_truth",
                    "vocabulary": "sample_drive", "return_images": False},
        "model": {"architecture": {"cr": 0.125},
                  "input": {"voxel_size": 0.5, "features": ["intensity"], "max_points": 300}},
        "text_bank": {"file": str(drive["bank"])},
        "loss": {"scr": {"form": "cross_entropy"}, "ssr": {"form": "code"}},
        "optimizer": {"lr": 0.05},
        "epochs": 2, "batch_size": 2, "checkpoint_every": 1, "progress": False,
        "tensorboard": False, "device": "cpu", "seed": 3,
    }
    raw.update(over)
    return raw


@pytest.mark.usefixtures("one_torch_thread")
def test_disk_full_while_a_checkpoint_is_written_keeps_the_former_one(
        drive: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half-way through the second checkpoint: the run stops with a message naming the
    file and the errno; the first checkpoint is untouched, no temporary is left, and running
    again resumes from it."""
    config = load_train_config(_train_raw(drive, "disk_full"))
    folder = config.run_dir / "checkpoints"
    real_fdopen = os.fdopen
    writes = []

    class FullDisk:
        """A file whose write stores half the bytes, then finds the disk full."""

        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        if Path(f"/proc/self/fd/{fd}").readlink().parent != folder.resolve():
            return f
        writes.append(fd)
        return FullDisk(f) if len(writes) == 2 else f

    monkeypatch.setattr("clip2scene_ros.files.os.fdopen", fdopen)
    with pytest.raises(OSError) as caught:
        train(config)
    monkeypatch.undo()
    error = caught.value
    assert error.errno == errno.ENOSPC and len(writes) == 2
    message = str(error)
    assert f"checkpoint of step 2 not written to {folder / LAST} (No space left on device)" \
        in message and "resumes" in message
    assert sorted(p.name for p in folder.iterdir()) == [LAST]  # no temporary, no half file
    assert _checkpoint_step(folder / LAST) == 1
    found = find_checkpoint(folder)
    assert found is not None and found[2]["global_step"] == 1

    resumed = train(config)  # space again: resumes from the checkpoint that survived
    assert resumed.resumed_from == {"epoch": 0, "step_in_epoch": 1, "global_step": 1}
    assert resumed.global_step == 4 and _checkpoint_step(folder / LAST) == 4
    assert _checkpoint_step(folder / PREVIOUS) == 3


DDP_SCRIPT = """
import os, sys
from pathlib import Path
from clip2scene_ros.training.config import load_train_config
from clip2scene_ros.training.trainer import train

rank = os.environ["RANK"]
Path(sys.argv[2], f"rank{rank}.pid").write_text(str(os.getpid()))
report = train(load_train_config(sys.argv[1]))
print(f"rank {rank} resumed_from {report.resumed_from} global_step {report.global_step}",
      flush=True)
"""


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")  # the in-process resume: no OpenMP spinning
def test_ddp_rank_killed_mid_epoch_fails_the_job_then_resumes(drive: dict[str, Path]) -> None:
    """``torchrun`` with 2 gloo ranks; rank 1 is SIGKILLed after the first checkpoint: the job
    exits non-zero within seconds (no hang in a collective: the launcher stops the survivor),
    naming the dead rank and its signal; the run then resumes from that checkpoint and finishes.

    The rerun is one process with ``grad_accumulation: 2`` (the same micro-batches per step, so
    the trainer takes a mid-epoch DDP checkpoint): what a job that lost a machine does, and 30 s
    cheaper here than a second torchrun. The DDP/one-process equivalence itself is
    ``test_training_trainer.py::test_ddp_two_ranks_equal_one_process_with_accumulation``.
    """
    script = drive["root"] / "ddp_faults.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    pids = drive["root"] / "ddp_pids"
    pids.mkdir()
    # world 2, batch 1: 4 samples = 2 optimizer steps per epoch
    raw = _train_raw(drive, "ddp_killed", epochs=3, batch_size=1)
    config_file = drive["root"] / "ddp_faults.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(script), str(config_file), str(pids)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = drive["root"] / "ddp_killed.log"
    last = drive["root"] / "ddp_killed" / "checkpoints" / LAST
    with log.open("wb") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_step(last) is None:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        code = job.wait(timeout=60)
        failed_in = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log.read_text(errors="replace")
    assert code != 0 and failed_in < 30, (code, failed_in, text[-3000:])
    assert "rank      : 1" in text and "Signal 9 (SIGKILL)" in text, text[-3000:]
    stopped = _checkpoint_step(last)
    assert stopped is not None and 1 <= stopped < 6
    assert not (drive["root"] / "ddp_killed" / "bundle").exists()

    resumed = train(load_train_config({**raw, "grad_accumulation": 2}))
    assert resumed.resumed_from == {"epoch": stopped // 2, "step_in_epoch": stopped % 2,
                                    "global_step": stopped}
    assert resumed.global_step == 6 and resumed.world_size == 1
    assert (drive["root"] / "ddp_killed" / "bundle" / "model.safetensors").is_file()


# --- the node: clock jumps, a frame without extrinsics, a text bank of another CLIP, paths ------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("node") / "m",
                              palette=((10, 20, 30), (200, 0, 0)))


def _calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump({"lidar_frame": "lidar",
                                    "cameras": {"cam": {"lidar_to_camera": LIDAR_TO_CAMERA}}}))
    return path


def _values(rig: Rig) -> dict[str, str]:
    return {kv.key: kv.value for kv in rig.last_status().values}


@needs_ros
def test_clock_jumps_back_and_forward_reset_the_sync_are_counted_and_labelling_goes_on(
        ros: Any, bundle: Path, tmp_path: Path) -> None:
    from clip2scene_ros.codecs.messages import stamp_to_ns
    from clip2scene_ros.node.node import Clip2SceneNode

    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_params(
        bundle, camera_topics=["/cam/image_raw"], calibration_file=str(_calibration(tmp_path)),
        sync_slop_s=0.05, camera_timeout_s=0.3)))
    frames, sync = rig.node.health.frames, rig.node.pipeline.sync

    def stamps() -> list[int]:
        return [stamp_to_ns(m.header.stamp) for m in rig.outputs]

    try:
        rig.connect()
        rig.wait_for_camera_info()
        assert rig.spin(lambda: frames["with_cameras"] >= 2, every=rig.tick)
        assert sync.resets == 0 and "clock_jump_back" not in frames

        # the bag loops: stamps from 100 s back to 10 s; images and clouds of the new pass pair
        rig.stamp, used = 10 * S, frames["with_cameras"]
        assert rig.spin(lambda: frames["with_cameras"] >= used + 2
                        and any(s < 20 * S for s in stamps()), every=rig.tick)
        assert frames["clock_jump_back"] >= 1 and sync.jumps["back"] >= 1 and sync.resets >= 1
        assert "jumped back" in sync.last_jump

        # and an hour ahead (a skipped bag, a clock set by PTP)
        rig.stamp, used, resets = rig.stamp + 3600 * S, frames["with_cameras"], sync.resets
        assert rig.spin(lambda: frames["with_cameras"] >= used + 2
                        and any(s > 3600 * S for s in stamps()), every=rig.tick)
        assert frames["clock_jump_forward"] >= 1 and sync.resets > resets
        assert "jumped forward by 3600" in sync.last_jump
        assert frames["lidar_only"] == 0 and rig.node.pipeline.camera_state == {"cam": "ok"}
        assert rig.spin(lambda: _values(rig).get("frames_clock_jump_forward") == str(
            frames["clock_jump_forward"]) and "frames_clock_jump_back" in _values(rig))
    finally:
        rig.close()


#: A static LiDAR -> camera transform, and no transform at all from any other frame.
_STATIC_RIG_TF2 = fake_tf2(lambda target, source, stamp_ns: (0.0, 0.0, 0.0)
                           if source == "lidar" else None)


@needs_ros
@pytest.mark.parametrize("source", ["calibration", "tf2"])
def test_a_frame_without_extrinsics_goes_lidar_only_and_the_next_uses_the_camera(
        ros: Any, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        source: str) -> None:
    """A cloud in a frame the calibration (its ``lidar_frame``) or the TF tree does not know:
    that frame is labelled LiDAR-only, counted and said why; the next ones use the camera."""
    from clip2scene_ros.codecs.messages import stamp_to_ns
    from clip2scene_ros.node.node import Clip2SceneNode

    extra: dict[str, Any] = {}
    if source == "calibration":
        extra["calibration_file"] = str(_calibration(tmp_path))
    else:
        monkeypatch.setitem(sys.modules, "tf2_ros", _STATIC_RIG_TF2)
    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_params(
        bundle, camera_topics=["/cam/image_raw"], sync_slop_s=0.05, camera_timeout_s=0.3,
        **extra)))
    frames, pipeline = rig.node.health.frames, rig.node.pipeline
    try:
        assert (pipeline._tf_buffer is not None) == (source == "tf2")
        rig.connect()
        rig.wait_for_camera_info()
        assert rig.spin(lambda: frames["with_cameras"] >= 2, every=rig.tick)
        assert frames["lidar_only"] == 0

        rig.stamp += 100_000_000  # one sweep from a frame nobody calibrated
        rig.info_pub.publish(rig.info)
        rig.image_pub.publish(_image(rig.stamp, compressed=False))
        odd = _cloud(rig.stamp)
        odd.header.frame_id = "radar"
        rig.cloud_pub.publish(odd)
        assert rig.spin(lambda: rig.stamp in {stamp_to_ns(m.header.stamp) for m in rig.outputs})
        assert frames["lidar_only"] == 1  # labelled all the same, without the camera
        state = pipeline.camera_state["cam"]
        assert state.startswith("no ") and "radar" in state
        assert ("calibrates 'lidar'" in state) if source == "calibration" else (
            "no tf2 transform radar -> cam_optical" in state)
        assert rig.spin(lambda: "camera cam missing" in rig.last_status().message)

        used = frames["with_cameras"]
        assert rig.spin(lambda: frames["with_cameras"] >= used + 2, every=rig.tick)
        assert frames["lidar_only"] == 1 and pipeline.camera_state == {"cam": "ok"}
    finally:
        rig.close()


@needs_ros
def test_a_text_bank_of_another_dimension_is_refused_and_counted(
        ros: Any, bundle: Path, tmp_path: Path) -> None:
    """A bank from another CLIP (16 dims; the bundle's network has 8): at start-up the node
    labels with the bundle's own vocabulary (README: a bad file is refused, counted and leaves
    the current vocabulary); set at run time, the parameter is refused with the file and both
    dimensions named, counted, and labelling goes on."""
    from rclpy.parameter import Parameter

    from clip2scene_ros.codecs import decode_pointcloud2
    from clip2scene_ros.errors import ConfigError
    from clip2scene_ros.node.node import Clip2SceneNode
    from clip2scene_ros.vocabulary import Vocabulary, VocabularyClass

    vocab = Vocabulary("wide", (VocabularyClass("tree", (0, 9, 0)),
                                VocabularyClass("bus", (9, 0, 0))))
    wide = save_text_bank(tmp_path / "wide", torch.nn.functional.normalize(
        torch.randn(2, 16), dim=1), vocab, {"model": "another-clip"})
    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_params(
        bundle, vocabulary=str(wide))))
    node = rig.node
    try:
        assert node.predictor.vocabulary.name == "two" and node.health.bad["vocabulary"] == 1
        assert node.health.status(time.monotonic()).level == "WARN"
        with pytest.raises(ConfigError) as caught:
            node.pipeline.set_vocabulary(str(wide))
        error = caught.value
        assert error.key == "vocabulary" and error.source == str(wide)
        assert "the model 8 dims" in error.reason and "(2, 16)" in error.reason

        result = node.set_parameters([Parameter("vocabulary", value=str(wide))])[0]
        assert not result.successful and "8 dims" in result.reason and str(wide) in result.reason
        assert node.health.bad["vocabulary"] == 2 and node.predictor.vocabulary.name == "two"
        rig.connect(rig.cloud_pub)
        assert rig.spin(lambda: len(rig.outputs) >= 1, every=lambda: rig.tick(camera=False))
        assert decode_pointcloud2(rig.outputs[-1])["label"].max() <= 1  # the bundle's 2 classes
    finally:
        rig.close()


@needs_ros
def test_paths_from_parameters_are_resolved_and_reported(
        ros: Any, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Relative model_path and calibration_file: resolved against the working directory once,
    used as absolute paths, logged at start-up and published in the diagnostics."""
    from clip2scene_ros.node.node import Clip2SceneNode

    calibration = _calibration(tmp_path)
    monkeypatch.chdir(bundle.parent)  # relative paths, as a launch file in the run directory
    rig = Rig(ros, Clip2SceneNode(context=ros, parameter_overrides=_params(
        Path(bundle.name), camera_topics=["/cam/image_raw"],
        calibration_file=os.path.relpath(calibration, bundle.parent))))
    try:
        expected = {"model_path": str(bundle), "calibration_file": str(calibration),
                    "engine_cache_dir": str(bundle / "engines")}
        params = rig.node.params
        assert {k: getattr(params, k) for k in expected} == expected
        assert rig.node.pipeline.paths == {**expected, "vocabulary": ""}
        assert (f"paths: model_path {bundle}, calibration_file {calibration}, vocabulary "
                f"(none), engine_cache_dir {bundle / 'engines'}") in capfd.readouterr().err
        assert rig.spin(lambda: {f"path_{k}": v for k, v in expected.items()}.items()
                        <= _values(rig).items())
    finally:
        rig.close()


def test_sync_forward_jump_resets_like_a_backward_one() -> None:
    """The ROS-free half of the clock-jump faults: an hour ahead flushes the waiting cloud with
    what it has and forgets the old timeline's images; a few seconds of silence do not."""
    from clip2scene_ros.node.camera_sync import CameraSync

    sync: CameraSync[str] = CameraSync(["front"], 0.05, 10.0, engine="builtin")
    assert sync.add_image("front", 100 * S, "img", now_ns=0) == []
    assert [s.reference for s in sync.add_cloud(100 * S, "c0", now_ns=0)] == ["c0"]
    assert sync.add_cloud(100 * S + 100_000_000, "waiting", now_ns=0) == []
    quiet = sync.add_cloud(130 * S, "after_silence", now_ns=1)  # 30 s gap: same timeline
    assert quiet == [] and sync.resets == 0 and not sync.jumps
    out = sync.add_cloud(3730 * S, "an_hour_on", now_ns=2)
    assert [(s.reference, s.missing) for s in out] == [("waiting", ("front",)),
                                                       ("after_silence", ("front",))]
    assert sync.resets == 1 and sync.jumps == {"forward": 1}
    assert sync.last_jump == "cloud stamp jumped forward by 3600.000 s"
    out = sync.add_image("front", 3730 * S + 10_000_000, "new_img", now_ns=3)
    assert [(s.reference, dict(s.matches)) for s in out] == [
        ("an_hour_on", {"front": (3730 * S + 10_000_000, "new_img")})]
    with pytest.raises(ValueError, match="jump_forward_s"):
        CameraSync(["front"], 0.05, 0.1, jump_forward_s=-1.0)


# --- engine cache: only engines it wrote ------------------------------------------------------
@pytest.mark.parametrize(("damage", "reason"), [
    ("truncated", "the engine file is 8 bytes, its sidecar records 12 (truncated or foreign)"),
    ("foreign", "does not match its recorded checksum (corrupt or foreign)"),
    ("no_sidecar", "sidecar is missing or unreadable (not written by this cache)"),
    ("sidecar_not_ours", "its sidecar is not one this cache writes"),
    ("other_tensorrt", "tensorrt_version changed (8.6.1 -> 10.3.0)"),
])
def test_engine_cache_uses_only_engines_it_wrote(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, reason: str) -> None:
    """A cached engine is deserialised only when its size and SHA-256 match those the cache
    recorded at build time for this key; anything else is rebuilt, with one log line saying why,
    and the bytes it had are never handed out."""
    import logging

    from clip2scene_ros.runtime.engine_cache import EngineCache, EngineKey

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    key = EngineKey("abc", "10.3.0", "NVIDIA H200", "fp16", (1, 50_000, 200_000))
    cache = EngineCache(tmp_path / "engines")
    built: list[EngineKey] = []

    def builder(path: Path, k: EngineKey) -> bytes:
        built.append(k)
        return b"engine-bytes"

    _, engine = cache.get(onnx_path, key, builder)
    sidecar = engine.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    if damage == "truncated":
        engine.write_bytes(b"engine-b")
    elif damage == "foreign":  # another engine of the same size dropped in under the name
        engine.write_bytes(b"ENGINE-BYTES")
    elif damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "sidecar_not_ours":
        sidecar.write_text(json.dumps(["engine_sha256", meta["engine_sha256"]]))
    else:  # an engine built by TensorRT 8.6 left under this name (a copied cache directory)
        sidecar.write_text(json.dumps({**meta, "key": {**meta["key"],
                                                       "tensorrt_version": "8.6.1"}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.runtime.engine_cache"):
        data, again = cache.get(onnx_path, key, builder)
    assert data == b"engine-bytes" and again == engine and len(built) == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"building {engine.name} because" in line and reason in line
    assert engine.read_bytes() == b"engine-bytes"  # rebuilt, re-recorded, used from now on
    assert json.loads(sidecar.read_text())["bytes"] == len(b"engine-bytes")
    assert cache.stale_reason(engine, sidecar, key) is None
    assert cache.get(onnx_path, key, builder)[0] == b"engine-bytes" and len(built) == 2


# --- model bundle: checked before use ---------------------------------------------------------
def _small_bundle(path: Path) -> Path:
    from clip2scene_ros.models.bundle import (
        ArchitectureSpec,
        BundleSpec,
        InputSpec,
        VocabularySpec,
        save_bundle,
    )

    vocab = VocabularySpec("two", ("road", "car"), ((1, 2, 3), (4, 5, 6)))
    spec = BundleSpec(ArchitectureSpec(cr=0.125, clip_dim=8), InputSpec(), vocab)
    weights = {"stem.0.kernel": torch.randn(27, 1, 4), "stem.1.running_mean": torch.zeros(4)}
    return save_bundle(path, spec, weights, torch.nn.functional.normalize(torch.randn(2, 8), dim=1))


@pytest.mark.parametrize("cut", ["weights_tail", "weights_header", "yaml_end", "yaml_half",
                                 "weights_swapped"])
def test_truncated_or_swapped_bundle_is_refused_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str) -> None:
    """model.safetensors or model.yaml cut short (an interrupted copy), or the weights of
    another bundle: refused with an IntegrityError naming the file, before any tensor is read."""
    from safetensors import torch as safetensors_torch

    from clip2scene_ros.errors import IntegrityError
    from clip2scene_ros.models.bundle import FILES_KEY, SPEC_FILE, WEIGHTS_FILE, load_bundle

    path = _small_bundle(tmp_path / "m")
    assert load_bundle(path).text_bank.shape == (2, 8)  # whole, it loads
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    assert next(iter(raw)) == "bundle_version" and list(raw)[-1] == FILES_KEY
    assert set(raw[FILES_KEY]) == {WEIGHTS_FILE}
    weights, spec_file = path / WEIGHTS_FILE, path / SPEC_FILE
    if cut == "weights_tail":
        weights.write_bytes(weights.read_bytes()[:-16])
    elif cut == "weights_header":
        weights.write_bytes(weights.read_bytes()[:100])
    elif cut == "yaml_end":  # the copy stopped inside the files section
        text = spec_file.read_text()
        spec_file.write_text(text[: text.index(FILES_KEY) + 20])
    elif cut == "yaml_half":
        text = spec_file.read_text()
        spec_file.write_text(text[: len(text) // 2])
    else:  # same size, other content: the weights of a sibling bundle
        other = _small_bundle(tmp_path / "other")
        weights.write_bytes((other / WEIGHTS_FILE).read_bytes())
    read: list[str] = []
    monkeypatch.setattr(safetensors_torch, "load_file", lambda *a, **k: read.append("!"))
    with pytest.raises(IntegrityError) as caught:
        load_bundle(path)
    assert read == []  # refused before any tensor was read
    error = caught.value
    keys, source, words = {
        "weights_tail": ({WEIGHTS_FILE}, weights, "truncated or replaced"),
        "weights_header": ({WEIGHTS_FILE}, weights, "truncated or replaced"),
        "weights_swapped": ({WEIGHTS_FILE}, weights, "from another bundle"),
        "yaml_end": ({FILES_KEY}, spec_file, "cut short"),
        # cut mid-line the YAML no longer parses; cut at a line end it loses `files`
        "yaml_half": ({"<file>", FILES_KEY}, spec_file, ""),
    }[cut]
    assert error.source == str(source) and error.key in keys and words in error.reason, error


def test_version_1_bundles_load_unverified_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Bundles written before checksums (version 1) are still read, as SUPPORTED_VERSIONS says,
    with a warning that their files are unverified; saving one again writes version 2."""
    import logging

    from clip2scene_ros.models.bundle import (
        BUNDLE_VERSION,
        FILES_KEY,
        SPEC_FILE,
        load_bundle,
        save_bundle,
    )

    path = _small_bundle(tmp_path / "m")
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    raw["bundle_version"] = 1
    del raw[FILES_KEY]
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.models.bundle"):
        old = load_bundle(path)
    assert old.spec.bundle_version == 1
    assert any("version 1" in r.getMessage() and "not verified" in r.getMessage()
               for r in caplog.records)
    again = save_bundle(tmp_path / "again", old.spec, old.state_dict, old.text_bank)
    assert load_bundle(again).spec.bundle_version == BUNDLE_VERSION == 2
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    raw["bundle_version"] = 2  # a version 2 file without its checksums is refused
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(Exception, match="files: has no size and sha256"):
        load_bundle(path)


# --- safe loading: nothing unpickles ------------------------------------------------------------
#: Modules whose only purpose is (un)pickling or that unpickle on load.
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
                    "marshal"}
#: Loaders that unpickle (or run code) whatever their arguments.
UNSAFE_CALLS = {"torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                "torch.serialization.load", "yaml.unsafe_load", "yaml.unsafe_load_all",
                "yaml.full_load", "yaml.full_load_all", "pandas.read_pickle", "pd.read_pickle"}
#: Calls that are reviewed by hand, with why each is safe; the guard must appear in the call.
ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("clip2scene_ros/teacher/store.py", "yaml.load"): (
        "Loader=loader", "loader is yaml.CSafeLoader or yaml.SafeLoader (getattr just above): "
        "the safe loaders, which build plain Python data only"),
}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _unsafe_loads(path: Path) -> list[tuple[str, int, str]]:
    """``(dotted name, line, source)`` of each import or call in ``path`` that could unpickle."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, str(path))
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                aliases[name.asname or name.name] = name.name
                if name.name.split(".")[0] in PICKLING_MODULES:
                    found.append((name.name, node.lineno, "import"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in node.names:
                aliases[name.asname or name.name] = f"{node.module}.{name.name}"
            if node.module.split(".")[0] in PICKLING_MODULES:
                found.append((node.module, node.lineno, "import"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        const = {k: v.value for k, v in kwargs.items() if isinstance(v, ast.Constant)}
        unsafe = (
            name in UNSAFE_CALLS
            or (name.endswith(".load") and name.split(".")[0] == "torch"
                and const.get("weights_only") is not True)  # torch < 2.6 defaults to False
            or (name in ("numpy.load", "np.load") and "allow_pickle" in kwargs
                and const.get("allow_pickle") is not False)
            or (name in ("yaml.load", "yaml.load_all")
                and not (isinstance(kwargs.get("Loader"), ast.Attribute)
                         and kwargs["Loader"].attr in ("SafeLoader", "CSafeLoader")))
        )
        if unsafe:
            found.append((name, node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_nothing_in_the_package_or_trainer_can_unpickle() -> None:
    """Every loader in clip2scene_ros/ and training/ reads safetensors, YAML with a safe loader,
    or torch files with ``weights_only=True``; the few calls a scan cannot prove safe are
    listed in ALLOWED with the reason, and must still look as reviewed."""
    files = sorted([*(ROOT / "clip2scene_ros").rglob("*.py"), *(ROOT / "training").rglob("*.py")])
    assert len(files) > 50
    problems, allowed_seen = [], set()
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for name, line, text in _unsafe_loads(path):
            allowed = ALLOWED.get((rel, name))
            if allowed is not None and allowed[0] in text:
                allowed_seen.add((rel, name))
                continue
            problems.append(f"{rel}:{line}: {name}: {text[:120]}")
    assert problems == [], "calls that can unpickle:\n" + "\n".join(problems)
    assert allowed_seen == set(ALLOWED), "stale ALLOWED entries: update the list"
    # the scan itself finds what it is meant to
    probe = ROOT / "build" / "unsafe_probe.py"
    sample = textwrap.dedent("""
        import pickle
        import numpy as np
        import torch
        import yaml
        from torch import load as tload
        torch.load("a")
        torch.load("a", weights_only=False)
        tload("a")
        torch.jit.load("a")
        np.load("a", allow_pickle=True)
        yaml.load("a", Loader=yaml.Loader)
        yaml.unsafe_load("a")
        torch.load("a", weights_only=True)
        np.load("a")
        yaml.load("a", Loader=yaml.SafeLoader)
    """)
    probe.parent.mkdir(exist_ok=True)
    try:
        probe.write_text(sample)
        names = [name for name, _, _ in _unsafe_loads(probe)]
    finally:
        probe.unlink(missing_ok=True)
    assert names == ["pickle", "torch.load", "torch.load", "torch.load", "torch.jit.load",
                     "numpy.load", "yaml.load", "yaml.unsafe_load"]


def test_data_files_are_checked_before_use() -> None:
    """Where each on-disk format is verified (size, version, checksum) before its content is
    used, so the list stays complete when a format is added: every module that reads tensors
    from safetensors goes through a checked loader or is listed here with its check."""
    checked = {
        # module: the check, proved by the test named
        "clip2scene_ros/models/bundle.py": "files.sha256/bytes in model.yaml "
        "(test_truncated_or_swapped_bundle_is_refused_naming_the_file)",
        "clip2scene_ros/files.py": "load_checked_tensors: format, version, sha256 "
        "(test_vocab_text_bank.py::test_wrong_banks_are_refused)",
        "clip2scene_ros/teacher/cache.py": "per-frame sha256 in the index "
        "(test_teacher_cache.py)",
        "clip2scene_ros/models/checkpoint.py": "imports foreign checkpoints once, by hand: "
        "safetensors or weights_only=True, then key/shape checks (test_models_checkpoint_import)",
        "training/checkpoint.py": "training checkpoints: safetensors' own length checks, format "
        "and version (test_training_trainer.py::test_checkpoints_hold_no_pickle_and_damage_is_"
        "refused)",
    }
    readers = set()
    for path in sorted([*(ROOT / "clip2scene_ros").rglob("*.py"),
                        *(ROOT / "training").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        if re.search(r"\bload_file\(|\bsafe_open\(", text):
            readers.add(path.relative_to(ROOT).as_posix())
    unchecked = readers - set(checked) - {
        p for p in readers if "load_checked_tensors(" in (ROOT / p).read_text()}
    assert unchecked == set(), f"safetensors readers without a listed check: {unchecked}"
