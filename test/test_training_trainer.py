"""The trainer on a 5-frame sample drive: configs, checkpoints, bundle, exact resume, DDP.

Tiny on purpose (SPVCNN cr 0.125, 0.5 m voxels, <= 400 points per sample, ground-truth labels
against a random text bank, 2 optimizer steps per epoch): these tests check the mechanics
(state, determinism, file formats), never the quality of a model.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clip2scene_ros.cli import main
from clip2scene_ros.codecs.pointcloud2 import UNKNOWN_LABEL
from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.files import atomic_write_bytes
from clip2scene_ros.models.bundle import load_bundle
from clip2scene_ros.runtime.predictor import Predictor
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.sparse import conv as conv_module
from clip2scene_ros.sparse.tensor import Workspace, thread_workspace
from clip2scene_ros.teacher.text_bank import save_text_bank
from clip2scene_ros.training import student as student_module
from clip2scene_ros.training import trainer as trainer_module
from clip2scene_ros.training.checkpoint import (
    BEST,
    LAST,
    PREVIOUS,
    find_checkpoint,
    load_checkpoint,
)
from clip2scene_ros.training.config import TrainConfig, load_train_config
from clip2scene_ros.training.trainer import StepInfo, TrainReport, train
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    drive = root / "drive"
    write_sample_drive(drive, frames=FRAMES, seed=0, rig=small_rig(120, left=None))
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    rows = torch.randn(len(vocab.classes), 512, generator=torch.Generator().manual_seed(0))
    bank = save_text_bank(root / "bank", torch.nn.functional.normalize(rows, dim=-1), vocab,
                          {"model": "random-rows", "pretrained": "random", "prompts": "none",
                           "templates": 0})
    return {"root": root, "drive": drive, "bank": bank}


def _dataset(drive: Path, **extra: Any) -> dict[str, Any]:
    return {"bags": [str(drive)], "sweeps": 1, "label_source": "ground_truth",
            "vocabulary": "sample_drive", "return_images": False, **extra}


def _raw(data: dict[str, Path], run: str, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run_dir": str(data["root"] / run),
        "dataset": _dataset(data["drive"]),
        "model": {"architecture": {"cr": 0.125},
                  "input": {"voxel_size": 0.5, "features": ["intensity"], "max_points": 400}},
        "text_bank": {"file": str(data["bank"])},
        "loss": {"scr": {"form": "cross_entropy"}, "ssr": {"form": "code"}},
        # S3 from the second epoch: its coins are part of what must resume exactly
        "s3": {"enabled": True, "start_epoch": 1, "probability": 0.5},
        "optimizer": {"lr": 0.05},
        "epochs": 2, "batch_size": 2, "checkpoint_every": 1, "progress": False,
        "device": "cpu", "seed": 3,
    }
    raw.update(over)
    return raw


def _config(data: dict[str, Path], run: str, **over: Any) -> TrainConfig:
    return load_train_config(_raw(data, run, **over))


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_plain_file(path: Path) -> None:
    """safetensors (an 8-byte length, a JSON header, raw tensor bytes) or YAML / JSON text:
    formats with no code in them, unlike pickle or torch.save's zipped pickles."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes <= {"F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL"}, path
    elif path.suffix == ".yaml":
        yaml.safe_load(raw.decode("utf-8"))
    elif path.suffix == ".json":
        json.loads(raw)
    else:
        raise AssertionError(f"unexpected file {path}")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def reference(data: dict[str, Path]) -> TrainReport:
    """An uninterrupted 2-epoch run with validation (2 steps per epoch: 5 samples, batch 2)."""
    val = {"dataset": _dataset(data["drive"], augment=False), "metric": "miou",
           "max_samples": 2}
    return train(_config(data, "reference", validation=val))


def test_every_shipped_config_loads_and_validates() -> None:
    files = sorted((ROOT / "config" / "train").glob("*.yaml"))
    assert {f.stem for f in files} >= {"annotation_free", "annotation_free_code",
                                       "label_efficient", "kl_baseline", "ppkt_baseline",
                                       "sample_drive"}
    for file in files:
        config = load_train_config(file)
        assert config.epochs >= 1 and config.loss, file.name
    tuned = load_train_config(ROOT / "config" / "train" / "label_efficient.yaml",
                              ["dataset.label_fraction=0.1", "model.init_from=null"],
                              run_dir="elsewhere")
    assert tuned.dataset.label_fraction == 0.1 and tuned.model.init_from is None
    assert tuned.run_dir == Path("elsewhere")
    with pytest.raises(ConfigError, match="epochs"):
        load_train_config(ROOT / "config" / "train" / "sample_drive.yaml", ["epochs=0"])
    with pytest.raises(ConfigError, match="unknown"):
        load_train_config(ROOT / "config" / "train" / "sample_drive.yaml", ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="student_logits"):
        load_train_config(ROOT / "config" / "train" / "kl_baseline.yaml", ["loss.kl.inputs={}"])


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (-5.0, "-5.0"), (math.nan, ".nan"),
                                             (math.inf, ".inf"), (1e300, "1.0e+300")])
def test_distributed_timeout_must_be_a_positive_finite_time(data: dict[str, Path], value: float,
                                                            text: str) -> None:
    assert _config(data, "timeout_default").distributed_timeout_s == 1800.0
    with pytest.raises(ConfigError, match=r"distributed_timeout_s.*> 0"):
        _config(data, "timeout_bad", distributed_timeout_s=value)
    with pytest.raises(ConfigError, match=r"distributed_timeout_s.*> 0"):  # --set, YAML text
        load_train_config(ROOT / "config" / "train" / "sample_drive.yaml",
                          [f"distributed_timeout_s={text}"])


def test_distributed_timeout_reaches_the_process_group(data: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (WORLD_SIZE 2) the trainer's process group gets the configured timeout
    instead of torch's 30 minutes (here init_process_group is a stand-in: no second rank)."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args, **kwargs: 2)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    trainer = trainer_module._Trainer(_config(data, "timeout", distributed_timeout_s=42.5),
                                      None, None)
    assert trainer.dist.world == 2 and trainer.dist.owns_group
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(seconds=42.5)})]


def test_run_writes_checkpoints_and_a_bundle_the_predictor_runs(
        reference: TrainReport, data: dict[str, Path]) -> None:
    run = reference.run_dir
    assert reference.global_step == 4 and reference.steps_per_epoch == 2
    assert {LAST, PREVIOUS, BEST} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert reference.best is not None and reference.validation is not None
    assert 0.0 <= reference.validation["miou"] <= 1.0
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))

    bundle = load_bundle(reference.bundle)
    spec = bundle.spec
    assert spec.architecture.cr == 0.125
    assert (spec.input.voxel_size, spec.input.sweeps, spec.input.max_points) == (0.5, 1, 400)
    assert spec.vocabulary.name == "sample_drive"
    assert spec.provenance["global_step"] == 4
    assert spec.provenance["config"]["loss"]["scr"] == {"form": "cross_entropy"}
    assert set(spec.provenance["final_losses"]) == {"total", "scr", "ssr"}
    for key, value in reference.model.state_dict().items():
        assert torch.equal(bundle.state_dict[key], value), key

    from clip2scene_ros.bag.reader import BagReader

    frame = next(iter(BagReader(data["drive"])))
    prediction = Predictor(bundle, backend="torch", device="cpu").predict([frame])
    labels = prediction.labels.label
    assert labels.shape == (frame.num_points,)
    known = labels != UNKNOWN_LABEL  # max_points 400: the rest of the scan is not labelled
    assert known.sum() == 400 and int(labels[known].max()) < len(spec.vocabulary.classes)


@pytest.mark.parametrize(("workers", "stop_after"), [(0, 3), (2, 1)])
def test_interrupted_run_resumes_bit_identical(reference: TrainReport, data: dict[str, Path],
                                               workers: int, stop_after: int) -> None:
    """Stopped after k steps (mid-epoch: the checkpoint of step k is the resume point), then
    resumed: every tensor of the final state equals the uninterrupted run's (torch.equal)."""
    config = _config(data, f"resume_{workers}", num_workers=workers)

    def stop(info: StepInfo) -> None:
        if info.global_step == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        train(config, callback=stop)
    _, state = load_checkpoint(config.run_dir / "checkpoints" / LAST)
    assert state["global_step"] == stop_after and state["step_in_epoch"] == stop_after % 2

    resumed = train(config)
    assert resumed.resumed_from == {"epoch": stop_after // 2, "step_in_epoch": stop_after % 2,
                                    "global_step": stop_after}
    _assert_equal_states(resumed.model.state_dict(), reference.model.state_dict())
    # the optimizer's momentum buffers and the S3 counter came back too
    ref_tensors, ref_state = load_checkpoint(reference.run_dir / "checkpoints" / LAST)
    new_tensors, new_state = load_checkpoint(config.run_dir / "checkpoints" / LAST)
    momentum = [k for k in ref_tensors if k.startswith("optim.state.")]
    assert momentum
    for key in momentum:
        assert torch.equal(ref_tensors[key], new_tensors[key]), key
    assert new_state["s3"] == ref_state["s3"] and new_state["scheduler"] == ref_state["scheduler"]


def test_checkpoints_hold_no_pickle_and_damage_is_refused(reference: TrainReport,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    run = reference.run_dir
    for path in [*(run / "checkpoints").iterdir(), *Path(reference.bundle).iterdir()]:
        _assert_plain_file(path)
    tensors, state = load_checkpoint(run / "checkpoints" / LAST)
    assert tensors["rng.0.torch"].dtype == torch.uint8
    assert isinstance(state["rng"]["0"]["python"][1], list)  # random.getstate() as JSON
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert any(k.startswith("model.") for k in tensors)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = (run / "checkpoints" / LAST).read_bytes()
    (folder / PREVIOUS).write_bytes(good)
    (folder / LAST).write_bytes(good[: len(good) // 2])  # a torn copy
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        load_checkpoint(folder / LAST)
    found = find_checkpoint(folder)
    assert found is not None and found[0].name == PREVIOUS
    (folder / PREVIOUS).write_bytes(good[:100])
    with pytest.raises(IntegrityError, match="no readable checkpoint"):
        find_checkpoint(folder)

    # a crash while a checkpoint is written leaves the former file whole
    (folder / LAST).write_bytes(good)

    def crash(_: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("clip2scene_ros.files.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(folder / LAST, good[:1000] + b"\0" * 1000)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert load_checkpoint(folder / LAST)[1]["global_step"] == 4


def test_fine_tune_from_the_bundle_through_the_cli(reference: TrainReport,
                                                   data: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Label-efficient fine-tuning: init_from the distilled bundle, a new classifier with its
    own learning rate; the bundle's text head labels exactly as the classifier does."""
    raw = _raw(data, "finetune")
    del raw["model"]["architecture"], raw["s3"]
    raw["model"]["init_from"] = str(reference.bundle)
    raw["model"]["head"] = "classifier"
    raw["loss"] = {"supervised": {"lovasz_weight": 1.0}}
    raw["optimizer"] = {"lr": 0.02, "lr_head": 0.5}
    config_file = data["root"] / "finetune.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    code = main(["train", "--config", str(config_file), "--set", "epochs=1",
                 "--set", "dataset.label_fraction=0.5"])
    assert code == 0
    assert "trained 1 epochs" in capsys.readouterr().out

    checkpoint, state = load_checkpoint(data["root"] / "finetune" / "checkpoints" / LAST)
    groups = state["optimizer"]["param_groups"]  # backbone, then the classifier head
    assert [g["initial_lr"] for g in groups] == [0.02, 0.5]
    bundle = load_bundle(data["root"] / "finetune" / "bundle")
    assert bundle.spec.text_bank["kind"] == "classifier"
    from clip2scene_ros.models.spvcnn import SPVCNN
    from clip2scene_ros.runtime.labels import text_logits
    from clip2scene_ros.sparse.tensor import PointTensor

    net = SPVCNN(bundle.spec.architecture, 1, num_classes=8)
    net.load_state_dict({k[len("model."):]: v for k, v in checkpoint.items()
                         if k.startswith("model.")})
    net.eval()
    gen = torch.Generator().manual_seed(1)
    z = PointTensor(torch.rand(300, 1, generator=gen), torch.rand(300, 3, generator=gen) * 40)
    with torch.no_grad():
        features = net(z)
        classifier = net.classifier(features).argmax(1)
        g = (features @ bundle.state_dict["point_mapping_global.weight"].T
             + bundle.state_dict["point_mapping_global.bias"])
        via_bank = text_logits(g, bundle.text_bank).argmax(1)
    assert torch.equal(classifier, via_bank)

    assert main(["train", "--config", str(config_file), "--set", "epochs=0"]) == 2
    assert "epochs" in capsys.readouterr().err


DDP_SCRIPT = """
import os, sys
from safetensors.torch import save_file
from clip2scene_ros.training.config import load_train_config
from clip2scene_ros.training.trainer import train

report = train(load_train_config(sys.argv[1]))
state = {k: v.contiguous() for k, v in report.model.state_dict().items()}
save_file(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
"""


def test_ddp_two_ranks_equal_one_process_with_accumulation(data: dict[str, Path]) -> None:
    """``torchrun --nproc_per_node 2`` on CPU (gloo) against one process, same global batch.

    DDP averages the two ranks' gradients, so its step is, by definition, one process
    accumulating the gradients of the same two micro-batches (rank r's shard is micro-batch
    ``a·W + r`` of the step, whatever the world size); the reference is that run
    (``grad_accumulation: 2``, one process). BatchNorm: in training mode both normalise each
    micro-batch with its own statistics, so the parameters agree without SyncBatchNorm (which
    torch only runs on GPU tensors, and which would make the reference a different computation,
    one BN over both shards). BN *running* statistics would differ (each rank sees half the
    micro-batches); the trainer gathers every rank's per-micro-batch update and applies them in
    the single-process order, so buffers agree as well. Agreement is to float rounding (the
    gradient all-reduce sums in another order), hence allclose 1e-6 rather than equality.
    """
    script = data["root"] / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = data["root"] / "ddp_out"
    out.mkdir()
    common = {"epochs": 1, "batch_size": 1, "checkpoint_every": 0, "tensorboard": False,
              "s3": {"enabled": True, "start_epoch": 0, "probability": 0.5},
              "optimizer": {"lr": 0.02}}
    ddp_file = data["root"] / "ddp.yaml"
    ddp_file.write_text(yaml.safe_dump(_raw(data, "ddp", **common)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(ddp_file), str(out)],
        capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    _assert_equal_states(rank0, rank1)  # DDP keeps the ranks in lockstep

    single = train(_config(data, "ddp_reference", grad_accumulation=2, **common))
    assert single.global_step == 2  # 5 samples -> 5 micro-batches -> 2 steps of 2
    reference = single.model.state_dict()
    assert rank0.keys() == reference.keys()
    for key, value in reference.items():
        if value.is_floating_point():
            assert torch.allclose(rank0[key], value, rtol=1e-6, atol=1e-6), (
                key, float((rank0[key] - value).abs().max()))
        else:
            assert torch.equal(rank0[key], value), key  # num_batches_tracked
    # and the DDP run wrote its checkpoint and bundle once, from rank 0
    assert (data["root"] / "ddp" / "bundle" / "model.safetensors").is_file()
    shutil.rmtree(out)


def test_validation_releases_the_inference_scratch(data: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation's no-grad passes fill the thread's sparse-conv scratch; training passes never
    use it, so the trainer lets it go after each validation rather than hold it for the run."""
    released: list[bool] = []
    release = Workspace.release

    def spy(self: Workspace) -> None:
        released.append(self.buffer is not None)
        release(self)

    monkeypatch.setattr(Workspace, "release", spy)
    val = {"dataset": _dataset(data["drive"], augment=False), "max_samples": 1}
    train(_config(data, "release_scratch", epochs=1, checkpoint_every=0, tensorboard=False,
                  s3={"enabled": False}, validation=val))
    assert released == [True]  # once, after the validation that used it
    assert thread_workspace().buffer is None


def test_tensorboard_missing_warns_once(data: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "_tensorboard_warned", False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.warns(UserWarning, match="tensorboard is not installed") as record:
        assert trainer_module._summary_writer(data["root"] / "tb") is None
        assert trainer_module._summary_writer(data["root"] / "tb") is None
    assert len([w for w in record if "tensorboard" in str(w.message)]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_on_gpu_trains_with_finite_losses_and_a_float32_bundle(
        data: dict[str, Path], dtype: str) -> None:
    report = train(_config(data, f"amp_{dtype}", device="cuda", amp=True, amp_dtype=dtype,
                           epochs=1))
    assert report.global_step == 2 and report.losses
    assert all(math.isfinite(v) for v in report.losses.values()), report.losses
    state = load_bundle(report.bundle).state_dict
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_amp_on_a_cpu_without_bf16_units_trains_fp32_and_says_so(
        data: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``amp: true`` on a CPU without bf16 matrix units trains exactly as ``amp: false`` (no
    autocast, no scaler), and logs that once."""
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger=trainer_module.__name__):
        with_amp = train(_config(data, "amp_cpu", amp=True, epochs=1))
    said = [r.getMessage() for r in caplog.records if "no bf16 matrix units" in r.getMessage()]
    assert len(said) == 1 and "training runs fp32" in said[0]
    without = train(_config(data, "no_amp_cpu", epochs=1))
    _assert_equal_states(with_amp.model.state_dict(), without.model.state_dict())


def test_amp_on_a_cpu_with_bf16_units_trains_under_bf16_autocast(
        data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the probe finds bf16 units, ``amp: true`` on a CPU runs the steps under bf16
    autocast, the sparse trunk's convolutions included: the losses are finite, close to fp32's
    but not identical, and the bundle stays float32."""
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: True)
    dtypes: list[torch.dtype] = []
    autocast = torch.autocast

    def spy(device_type: str, *args: Any, **kwargs: Any) -> Any:
        dtypes.append(kwargs["dtype"])
        return autocast(device_type, *args, **kwargs)

    conv_dtypes: set[torch.dtype] = set()
    pair_conv = conv_module.pair_conv

    def conv_spy(feats: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        conv_dtypes.update((feats.dtype, weight.dtype))
        return pair_conv(feats, weight, *args)

    monkeypatch.setattr(trainer_module.torch, "autocast", spy)
    monkeypatch.setattr(conv_module, "pair_conv", conv_spy)
    bf16 = train(_config(data, "amp_cpu_bf16", amp=True, epochs=1, s3={"enabled": False}))
    monkeypatch.setattr(trainer_module.torch, "autocast", autocast)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert conv_dtypes == {torch.bfloat16}
    fp32 = train(_config(data, "fp32_cpu", epochs=1, s3={"enabled": False}))
    assert bf16.losses.keys() == fp32.losses.keys() and bf16.losses
    for key, value in bf16.losses.items():
        assert math.isfinite(value)
        assert value == pytest.approx(fp32.losses[key], rel=0.05, abs=1e-3), key
    state = load_bundle(bf16.bundle).state_dict
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_amp_dtype_is_checked_against_the_device(
        data: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """float16 autocast on a CPU is refused in one line; ``bfloat16`` runs on a CPU without
    bf16 units, with a warning that it is emulated; ``auto`` there is float32."""
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: False)
    cpu = torch.device("cpu")
    config = _config(data, "amp_dtype", amp=True, amp_dtype="float16")
    with pytest.raises(ConfigError, match=r"amp_dtype.*float16 autocast runs on CUDA"):
        trainer_module.amp_dtype(config, cpu)
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        got = trainer_module.amp_dtype(replace(config, amp_dtype="bfloat16"), cpu)
    assert got == torch.bfloat16
    assert any("emulated" in r.getMessage() for r in caplog.records)
    assert trainer_module.amp_dtype(replace(config, amp_dtype="auto"), cpu) is None
    assert trainer_module.amp_dtype(replace(config, amp=False, amp_dtype="bfloat16"),
                                    cpu) is None
    assert trainer_module.amp_dtype(replace(config, amp_dtype="auto"),
                                    torch.device("cuda")) == torch.float16
    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: True)
    assert trainer_module.amp_dtype(replace(config, amp_dtype="auto"), cpu) == torch.bfloat16


def test_paper_ssr_refuses_a_cache_without_features_at_start_up(data: dict[str, Path]) -> None:
    """Paper-form SSR (and KL, PPKT) read the teacher's pixel features: a cache built without
    ``--features`` is refused before any step, naming the cache and the loss term."""
    from clip2scene_ros.teacher.run import run_teacher

    cache = data["root"] / "teacher_no_features"
    run_teacher(data["drive"], data["bank"], cache, simulate="maskclip_like", progress=False)
    dataset = {**_dataset(data["drive"]), "label_source": "teacher",
               "teacher_caches": [str(cache)]}
    for loss, term in (({"scr": {}, "ssr": {"form": "paper"}}, "loss.ssr"),
                       ({"ppkt": {}}, "loss.ppkt"),
                       ({"kl": {"inputs": {"student_logits": "paired_logits"}}}, "loss.kl")):
        run = f"no_features_{term}"
        with pytest.raises(ConfigError, match=rf"stores no pixel features.*{term}"):
            train(_config(data, run, dataset=dataset, loss=loss))
        assert not (data["root"] / run / "checkpoints").exists()
    assert student_module.needs_pixel_features({"scr": {}, "ssr": {"form": "code"}}) is None
