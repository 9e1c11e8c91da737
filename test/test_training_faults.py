"""Faults in training: unreadable bags (named errors, ``skip_bad``), a run killed with SIGKILL
and checkpoints damaged after writing (refused by their SHA-256, ``previous`` resumed instead).

Tiny on purpose (SPVCNN cr 0.125, 0.5 m voxels, 4-frame sample drives, one torch thread): these
tests check the mechanics of failing, skipping and resuming, never the quality of a model.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from rosbags.rosbag2 import ReaderError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clip2scene_ros.bag.reader import BagReader
from clip2scene_ros.cli import main
from clip2scene_ros.errors import BagError, ConfigError, IntegrityError
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.teacher.text_bank import save_text_bank
from clip2scene_ros.training.checkpoint import (
    LAST,
    META_KEY,
    PREVIOUS,
    find_checkpoint,
    load_checkpoint,
    tensor_digest,
)
from clip2scene_ros.training.config import load_train_config
from clip2scene_ros.training.dataset import BagSceneDataset
from clip2scene_ros.training.dataset_config import DatasetConfig
from clip2scene_ros.training.trainer import train
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

FRAMES = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    good = root / "good"
    write_sample_drive(good, frames=FRAMES, seed=0, rig=small_rig(120, left=None))
    bad = root / "truncated"
    shutil.copytree(good, bad)
    (storage,) = bad.glob("*.mcap")
    raw = storage.read_bytes()
    storage.write_bytes(raw[: len(raw) // 2])  # a copy cut off half-way
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    rows = torch.randn(len(vocab.classes), 512, generator=torch.Generator().manual_seed(0))
    bank = save_text_bank(root / "bank", torch.nn.functional.normalize(rows, dim=-1), vocab,
                          {"model": "random-rows", "pretrained": "random", "prompts": "none",
                           "templates": 0})
    return {"root": root, "good": good, "bad": bad, "storage": storage, "bank": bank}


def _raw(data: dict[str, Path], run: str, bags: list[Path], **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run_dir": str(data["root"] / run),
        "dataset": {"bags": [str(b) for b in bags], "sweeps": 1,
                    "label_source": "ground_truth", "vocabulary": "sample_drive",
                    "return_images": False},
        "model": {"architecture": {"cr": 0.125},
                  "input": {"voxel_size": 0.5, "features": ["intensity"], "max_points": 300}},
        "text_bank": {"file": str(data["bank"])},
        "loss": {"scr": {"form": "cross_entropy"}, "ssr": {"form": "code"}},
        "s3": {"enabled": True, "start_epoch": 1, "probability": 0.5},
        "optimizer": {"lr": 0.05},
        "epochs": 1, "batch_size": 2, "checkpoint_every": 1, "progress": False,
        "tensorboard": False, "device": "cpu", "seed": 3,
    }
    raw.update(over)
    return raw


def _dataset(bags: list[Path], **extra: Any) -> BagSceneDataset:
    return BagSceneDataset(DatasetConfig(bags=tuple(bags), sweeps=1, label_source="none",
                                         return_images=False, augment=False, **extra))


def test_truncated_bag_is_named_or_skipped(data: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bags = [data["good"], data["bad"]]
    with pytest.raises(BagError) as caught:
        _dataset(bags)
    error = caught.value
    assert not isinstance(error, ConfigError) and error.bag == str(data["bad"])
    message = str(error)
    assert str(data["storage"]) in message and "opening" in message  # the file and where
    assert "magic" in message  # rosbags' reason: the footer is gone

    config_file = data["root"] / "skip.yaml"
    config_file.write_text(yaml.safe_dump(_raw(data, "skip", bags)))
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert str(data["storage"]) in err and "cannot read bag" in err

    assert main(["train", "--config", str(config_file), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 epochs, 2 steps" in out  # the good bag's 4 keyframes, batch 2
    assert "skipped 1 unreadable bag(s) and 0 unreadable keyframe(s)" in out
    assert str(data["bad"]) in out

    report = train(load_train_config(_raw(data, "skip_api", bags, skip_bad=True)))
    assert list(report.skipped) == [str(data["bad"])]
    assert str(data["storage"]) in report.skipped[str(data["bad"])]


def test_unreadable_keyframe_is_named_or_replaced(data: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that breaks inside the bag (here: the read of keyframe 2) names the keyframe; with
    skip_bad the next readable keyframe stands in, the same in every worker."""
    original = BagReader.frames

    def frames(self: BagReader, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        if stop == 3:
            raise ReaderError("Chunk is corrupt.")
        yield from original(self, start, stop)

    monkeypatch.setattr(BagReader, "frames", frames)
    strict = _dataset([data["good"]])
    assert strict.keyframes == [(0, k) for k in range(FRAMES)]
    with pytest.raises(BagError, match=r"keyframe 2 \(message 2 of topic .*log time"):
        strict[2]

    lenient = _dataset([data["good"]], skip_bad=True)
    worker = pickle.loads(pickle.dumps(lenient))  # what a DataLoader worker gets
    sample = lenient[2]
    assert (sample.index, sample.frame_index) == (2, 3)
    name = f"{data['good']} frame 2"
    assert [entry[0] for entry in sample.replaced] == [name]
    assert "Chunk is corrupt" in sample.replaced[0][1] and lenient.bad == dict(sample.replaced)
    again = lenient[2]  # known bad now: the same replacement without re-reading
    other = worker[2]
    for twin in (again, other):
        assert twin.frame_index == 3 and twin.replaced == sample.replaced
        assert np.array_equal(twin.coords, sample.coords)
    assert lenient[1].frame_index == 1 and lenient[1].replaced == ()


def _checkpoint_step(path: Path) -> int | None:
    """global_step of a checkpoint, from its safetensors header (no tensor is read)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (FileNotFoundError, ValueError):
        return None
    return int(json.loads(header["__metadata__"]["clip2scene"])["global_step"])


def test_run_killed_with_sigkill_resumes_to_the_same_weights(data: dict[str, Path]) -> None:
    """``clip2scene train`` killed (SIGKILL) after a mid-epoch checkpoint, then run again: the
    final weights equal those of an uninterrupted run bit for bit."""
    epochs, kill_at = 3, 3  # 2 steps per epoch: step 3 is inside the second epoch
    config_file = data["root"] / "kill.yaml"
    config_file.write_text(yaml.safe_dump(_raw(data, "unused", [data["good"]], epochs=epochs)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def command(run: str) -> list[str]:
        return [sys.executable, "-m", "clip2scene_ros.cli", "train", "--config",
                str(config_file), "--run-dir", str(data["root"] / run)]

    def start(run: str) -> subprocess.Popen[bytes]:
        log = (data["root"] / f"{run}.log").open("ab")
        return subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env)

    def output(run: str) -> str:
        return (data["root"] / f"{run}.log").read_text(errors="replace")[-3000:]

    reference = start("uninterrupted")  # runs alongside the one to be killed
    victim = start("killed")
    last = data["root"] / "killed" / "checkpoints" / LAST
    try:
        deadline = time.monotonic() + 120
        while (_checkpoint_step(last) or 0) < kill_at:
            assert victim.poll() is None, "finished before it could be killed:\n" + output(
                "killed")
            assert time.monotonic() < deadline, output("killed")
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert reference.wait(timeout=120) == 0, output("uninterrupted")
    finally:
        for proc in (victim, reference):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # (killed between moving `last` to `previous` and writing the new one, `previous` is it)
    stopped = _checkpoint_step(last) or _checkpoint_step(last.with_name(PREVIOUS))
    assert stopped is not None and kill_at <= stopped < epochs * 2
    assert not (data["root"] / "killed" / "bundle").exists()

    resumed = subprocess.run(command("killed"), capture_output=True, text=True, env=env,
                             timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from epoch" in resumed.stdout
    assert f"trained {epochs} epochs, {epochs * 2} steps" in resumed.stdout

    ref = load_file(str(data["root"] / "uninterrupted" / "bundle" / "model.safetensors"))
    new = load_file(str(data["root"] / "killed" / "bundle" / "model.safetensors"))
    assert ref.keys() == new.keys() and ref
    for key in ref:
        assert torch.equal(ref[key], new[key]), key
    # the training state too: momentum buffers, BatchNorm statistics
    ref_ckpt = load_file(str(data["root"] / "uninterrupted" / "checkpoints" / LAST))
    new_ckpt = load_file(str(data["root"] / "killed" / "checkpoints" / LAST))
    for key in ref_ckpt:
        if key.startswith(("model.", "optim.")):
            assert torch.equal(ref_ckpt[key], new_ckpt[key]), key


# ------------------------------------------------------------------ checkpoints damaged on disk


@pytest.fixture(scope="module")
def checkpoints(data: dict[str, Path], one_torch_thread: None) -> Path:
    """The checkpoints folder of a finished 1-epoch run (2 steps): ``last`` and ``previous``."""
    train(load_train_config(_raw(data, "checksum", [data["good"]])))
    folder = data["root"] / "checksum" / "checkpoints"
    assert (folder / LAST).is_file() and (folder / PREVIOUS).is_file()
    return folder


def _flip_data_byte(path: Path, offset: int = 100) -> None:
    """Flip one byte ``offset`` bytes into the tensor data: size and header stay intact."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # 8-byte header length, JSON header, data
    assert start + offset < len(raw)
    raw[start + offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_tensor_digest_covers_names_dtypes_shapes_and_bytes() -> None:
    tensors = {"b": torch.arange(6, dtype=torch.int64), "a": torch.ones(2, 3),
               "flag": torch.tensor([True, False]), "count": torch.tensor(7),
               "rng": torch.arange(4, dtype=torch.uint8)}
    digest = tensor_digest(tensors)
    assert len(digest) == 64 and digest == tensor_digest(dict(reversed(tensors.items())))
    variants = [
        {**tensors, "a": torch.ones(3, 2)},  # reshaped
        {**{k: v for k, v in tensors.items() if k != "a"}, "c": torch.ones(2, 3)},  # renamed
        {**tensors, "b": torch.arange(6, dtype=torch.float64)},  # another dtype, same size
        {**tensors, "flag": torch.tensor([True, True])},  # one value
        {**tensors, "count": torch.tensor([7])},  # 0-dim vs 1-dim
    ]
    assert len({digest, *(tensor_digest(v) for v in variants)}) == len(variants) + 1


def test_checkpoint_damaged_after_writing_is_refused(checkpoints: Path, tmp_path: Path) -> None:
    """A bit flip inside the tensor data (size and header intact, so safetensors reads it)
    does not resume silently from garbage weights: the checksum names the file."""
    tensors, state = load_checkpoint(checkpoints / LAST)
    assert state["sha256"] == tensor_digest(tensors)

    damaged = tmp_path / LAST
    shutil.copyfile(checkpoints / LAST, damaged)
    _flip_data_byte(damaged)
    with safe_open(str(damaged), framework="pt") as f:  # still a readable safetensors file
        assert json.loads(f.metadata()[META_KEY])["sha256"] == state["sha256"]
    with pytest.raises(IntegrityError, match="SHA-256 checksum") as caught:
        load_checkpoint(damaged)
    message = str(caught.value)
    assert str(damaged) in message and caught.value.source == str(damaged)
    assert "damaged after writing" in message and PREVIOUS in message


def test_damaged_last_resumes_from_previous(data: dict[str, Path], checkpoints: Path,
                                            tmp_path: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    run = tmp_path / "run"
    folder = run / "checkpoints"
    shutil.copytree(checkpoints, folder)
    _flip_data_byte(folder / LAST)
    previous_step = load_checkpoint(folder / PREVIOUS)[1]["global_step"]

    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.training.checkpoint"):
        found = find_checkpoint(folder)
    assert found is not None and found[0] == folder / PREVIOUS
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder / LAST) in warning.getMessage() and "checksum" in warning.getMessage()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clip2scene_ros.training.trainer"):
        report = train(load_train_config(_raw(data, "unused", [data["good"]],
                                               run_dir=str(run))))
    assert report.resumed_from is not None
    assert report.resumed_from["global_step"] == previous_step
    messages = [r.getMessage() for r in caplog.records]
    assert any("checksum" in m and str(folder / LAST) in m for m in messages)
    assert any(f"resumed from {folder / PREVIOUS}" in m for m in messages)
    load_checkpoint(folder / LAST)  # rewritten whole by the resumed run


def test_checkpoint_without_checksum_still_loads(checkpoints: Path, tmp_path: Path) -> None:
    """Files of the previous release carry no ``sha256``: they resume as before."""
    with safe_open(str(checkpoints / LAST), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    state = json.loads(metadata[META_KEY])
    del state["sha256"]
    legacy = tmp_path / LAST
    save_file(tensors, str(legacy), metadata={**metadata, META_KEY: json.dumps(state)})

    loaded, loaded_state = load_checkpoint(legacy)
    assert "sha256" not in loaded_state and loaded_state["global_step"] == state["global_step"]
    assert loaded.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key]), key
