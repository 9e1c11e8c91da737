"""``clip2scene demo`` (``make demo``): the product, annotation-free, on the bundled sample drive.

1. Two sample drives: one to train on (seed 0, 60 frames) and a held-out one (seed 1).
2. A text bank of the sample drive's vocabulary.
3. The teacher cache of the training drive: without CLIP weights, the simulated MaskCLIP teacher
   (``config/teachers/maskclip_like.yaml``: the drive's ground truth degraded as MaskCLIP
   degrades it, recorded as simulated); with ``--pretrained TAG|FILE``, MaskCLIP itself on the
   drive's camera images. The same teacher labels the held-out drive's pairs, which gives
   ``teacher_miou``, the score the student has to beat.
4. Annotation-free distillation (``config/train/sample_drive_distill.yaml``: SCR, SSR and S3,
   one sweep per sample); no ground-truth label is read for training. The bundle is exported
   with its ONNX.
5. Offline evaluation on every point of the held-out drive: mIoU, per-class IoU, the split into
   points a camera sees (``in_view``) and those none sees (``out_of_view``), a PNG report.
6. The node in its own process on a replay of the held-out drive (``replay-eval``): mIoU of
   what it publishes, end-to-end latency, dropped frames.

The report lands in ``out`` (``make demo``: ``demo-report/``): ``report.json`` with the
replay-eval keys at the top (``miou``, ``frames_in``, ``frames_out``, ``dropped``,
``latency_ms``), then the teacher (``teacher``, ``teacher_miou``) beside the student's offline
``miou_in_view`` / ``miou_out_of_view``, then the training and offline figures; the PNG
pictures of both evaluations (``eval/``, ``replay/``) and the trained bundle in ``model/`` (the
one the node ran). The drives, caches and the training run are scratch in ``work``.
Label-efficient fine-tuning stays available through ``config/train/sample_drive.yaml``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from clip2scene_ros.config import to_dict
from clip2scene_ros.vocabulary import config_dir

#: The replay-eval keys at the top of report.json.
REPORT_KEYS = ("miou", "frames_in", "frames_out", "dropped", "latency_ms")
#: The simulated teacher used without CLIP weights.
SIMULATED_TEACHER = "maskclip_like"


def _drive(path: Path, frames: int, seed: int) -> Path:
    from clip2scene_ros.sample.drive import write_sample_drive

    if not (path / "metadata.yaml").is_file():
        print(f"demo: writing the sample drive {path.name} ({frames} frames, seed {seed})")
        write_sample_drive(path, frames=frames, seed=seed)
    return path


def _teacher(work: Path, train_bag: Path, heldout: Path, pretrained: str | None,
             clip_model: str) -> tuple[Path, Path, dict[str, Any]]:
    """The text bank, the training drive's teacher cache and the teacher's held-out quality."""
    from clip2scene_ros.teacher.quality import teacher_quality
    from clip2scene_ros.teacher.run import run_teacher
    from clip2scene_ros.teacher.text_bank import bank_paths, build_text_bank

    bank = work / ("bank" if pretrained is None else "bank_clip")
    if not bank_paths(bank)[1].is_file():
        # Without weights a tiny random text tower stands in for CLIP's: the simulated teacher
        # only needs distinct class rows to place its features around.
        build_text_bank("sample_drive", model="tiny-vit" if pretrained is None else clip_model,
                        pretrained=pretrained or "random", out=bank,
                        prompts="single" if pretrained is None else None)
    options: dict[str, Any] = {"progress": False}
    prefix = "teacher"
    if pretrained is None:
        options["simulate"] = SIMULATED_TEACHER
    else:
        options.update(model=clip_model, pretrained=pretrained)
        prefix = "teacher_maskclip"
    train_cache = work / f"{prefix}_train"
    run_teacher(train_bag, bank, train_cache, store_features=True, **options)
    heldout_cache = work / f"{prefix}_heldout"
    run_teacher(heldout, bank, heldout_cache, **options)
    quality = teacher_quality(heldout_cache, heldout, "sample_drive")
    return bank, train_cache, quality


def run_demo(out: str | Path, *, work: str | Path | None = None, pretrained: str | None = None,
             clip_model: str = "ViT-B-16", replay_rate: float = 0.1, train_frames: int = 60,
             heldout_frames: int = 20, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every step; returns (and writes) ``out/report.json``.

    ``work`` (default ``out/work``) holds the drives, teacher caches and the training run.
    ``pretrained`` (an open_clip tag or weights file of ``clip_model``) makes MaskCLIP the
    teacher; without it the simulated teacher is. ``overrides`` are ``key=value`` settings for
    the training config (tests shrink it).
    """
    import shutil

    from clip2scene_ros.teacher.text_bank import load_text_bank
    from clip2scene_ros.training.config import load_train_config
    from clip2scene_ros.training.evaluate import evaluate_bag
    from clip2scene_ros.training.trainer import train

    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    train_bag = _drive(work / "drive_train", train_frames, 0)
    heldout = _drive(work / "drive_heldout", heldout_frames, 1)
    summary["drives_s"] = time.perf_counter() - started

    t0 = time.perf_counter()
    bank, train_cache, quality = _teacher(work, train_bag, heldout, pretrained, clip_model)
    summary["teacher_detail"] = {"name": quality["teacher"], "simulated": quality["simulated"],
                          "heldout": {k: quality[k] for k in (
                              "teacher_miou", "teacher_accuracy", "per_class",
                              "paired_fraction", "frames", "pairs")},
                          "seconds": time.perf_counter() - t0}
    print(f"demo: teacher {quality['teacher']}: held-out mIoU {quality['teacher_miou']:.3f} on "
          f"its pairs ({quality['paired_fraction']:.0%} of the points have one)")

    t0 = time.perf_counter()
    clip_dim = int(load_text_bank(bank)[0].shape[1])
    overrides = [f"dataset.bags=[{train_bag}]", f"dataset.teacher_caches=[{train_cache}]",
                 f"text_bank.file={bank}", f"model.architecture.clip_dim={clip_dim}",
                 *(overrides or [])]
    config = config_dir() / "train" / "sample_drive_distill.yaml"
    report = train(load_train_config(config, overrides, run_dir=work / "run"),
                   resume=False)
    summary["train"] = {"config": str(config), "seconds": time.perf_counter() - t0,
                        "steps": report.global_step, "epochs": report.epochs,
                        "validation": report.validation, "best": report.best,
                        "onnx": report.onnx}
    assert report.bundle is not None
    print(report.summary())
    bundle = out / "model"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(report.bundle, bundle)

    t0 = time.perf_counter()
    evaluation = evaluate_bag(bundle, heldout, "sample_drive", backend="torch",
                              report_dir=out / "eval")
    summary["eval"] = {k: evaluation[k] for k in ("miou", "accuracy", "per_class_iou",
                                                  "in_view", "out_of_view", "frames",
                                                  "points", "timing_ms")}
    summary["eval"]["seconds"] = time.perf_counter() - t0
    print(f"demo: held-out mIoU {evaluation['miou']:.3f} on {evaluation['frames']} frames "
          f"(in view {_fmt(evaluation['in_view'])}, out of view "
          f"{_fmt(evaluation['out_of_view'])}); the teacher's {quality['teacher_miou']:.3f}")

    t0 = time.perf_counter()
    replay_dir = out / "replay"
    if (replay_dir / "outputs").exists():
        shutil.rmtree(replay_dir / "outputs")
    replayed = _replay_eval(heldout, bundle, replay_rate, replay_dir)
    summary["replay_eval"] = {**replayed, "seconds": time.perf_counter() - t0}
    summary["model"] = str(bundle)
    summary["total_s"] = time.perf_counter() - started
    # The node's figures head the report, then the teacher beside the student it taught.
    headline = {
        "teacher": quality["teacher"],
        "teacher_miou": quality["teacher_miou"],
        "miou_offline": evaluation["miou"],
        "miou_in_view": (evaluation["in_view"] or {}).get("miou"),
        "miou_out_of_view": (evaluation["out_of_view"] or {}).get("miou"),
    }
    report_json = {k: replayed[k] for k in REPORT_KEYS} | headline | to_dict(summary)
    (out / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    latency = replayed["latency_ms"]
    print(f"demo: the node on a replay: mIoU {replayed['miou']:.3f}, {replayed['frames_out']} "
          f"of {replayed['frames_in']} frames labelled, {replayed['dropped']} dropped, latency "
          f"p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms; "
          f"{summary['total_s'] / 60:.1f} min in all")
    print(f"demo: report {out / 'report.json'}, pictures {out / 'eval'} and {replay_dir}, "
          f"model {bundle}")
    return report_json


def _replay_eval(bag: Path, bundle: Path, rate: float, report_dir: Path) -> dict[str, Any]:
    """``clip2scene replay-eval`` in its own process: the demo (and the trainer it runs) never
    loads rclpy, and the node is scored exactly as a user scores it from the command line."""
    import subprocess
    import sys

    result = report_dir / "replay_eval.json"
    cmd = [sys.executable, "-m", "clip2scene_ros.cli", "replay-eval", "--bag", str(bag),
           "--model", str(bundle), "--rate", str(rate), "--report", str(report_dir),
           "--json", str(result), "--param", "device:=cpu"]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"replay-eval exited {done.returncode}: {' '.join(cmd)}")
    return dict(json.loads(result.read_text()))


def _fmt(split: dict[str, Any] | None) -> str:
    return "n/a" if not split or split.get("miou") is None else f"{split['miou']:.3f}"
