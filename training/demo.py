"""``clip2scene demo`` (``make demo``): the whole product on the bundled synthetic sample drive.

1. Two sample drives: one to train on (seed 0, 60 frames) and a held-out one (seed 1).
2. With CLIP weights (``--pretrained``), annotation-free distillation first (MaskCLIP teacher
   cache, SCR + SSR + S3); without them that step is skipped and said so, since a random
   teacher teaches nothing.
3. Label-efficient training on 10 % of the training drive's frames (``config/train/
   sample_drive.yaml``), exported as a bundle with its ONNX.
4. Offline evaluation on the held-out drive (mIoU, per-class IoU, PNG report).
5. The node in its own process on a replay of the held-out drive (``replay-eval``): mIoU of
   what it publishes, end-to-end latency, dropped frames.

The report lands in ``out`` (``make demo``: ``demo-report/``): ``report.json`` with the
replay-eval keys at the top (``miou``, ``frames_in``, ``frames_out``, ``dropped``,
``latency_ms``) plus the training and offline figures, the PNG pictures of both evaluations
(``eval/``, ``replay/``) and the trained bundle in ``model/`` (the one the node ran). The
drives and the training run (checkpoints, TensorBoard) are scratch in ``work``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..vocabulary import config_dir

#: The replay-eval keys at the top of report.json.
REPORT_KEYS = ("miou", "frames_in", "frames_out", "dropped", "latency_ms")


def _drive(path: Path, frames: int, seed: int) -> Path:
    from ..sample.drive import write_sample_drive

    if not (path / "metadata.yaml").is_file():
        print(f"demo: writing the sample drive {path.name} ({frames} frames, seed {seed})")
        write_sample_drive(path, frames=frames, seed=seed)
    return path


def run_demo(out: str | Path, *, work: str | Path | None = None, pretrained: str | None = None,
             replay_rate: float = 0.1, train_frames: int = 60, heldout_frames: int = 20,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every step; returns (and writes) ``out/report.json``.

    ``work`` (default ``out/work``) holds the drives and the training run. ``overrides`` are
    ``key=value`` settings for the training config (tests shrink it).
    """
    import shutil

    from ..node.replay_eval import replay_eval
    from .config import load_train_config
    from .evaluate import evaluate_bag
    from .trainer import train

    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    train_bag = _drive(work / "drive_train", train_frames, 0)
    heldout = _drive(work / "drive_heldout", heldout_frames, 1)
    summary["drives_s"] = time.perf_counter() - started

    overrides = [f"dataset.bags=[{train_bag}]", f"validation.dataset.bags=[{heldout}]",
                 *(overrides or [])]
    if pretrained:
        summary["distillation"] = "see config/train/annotation_free.yaml: run it with " \
            f"--set text_bank.pretrained={pretrained} and set model.init_from to its bundle"
    else:
        summary["distillation"] = ("skipped: no CLIP weights (--pretrained TAG|FILE); a "
                                   "random-weight teacher teaches nothing")
    print(f"demo: distillation {summary['distillation']}")

    t0 = time.perf_counter()
    config = config_dir() / "train" / "sample_drive.yaml"
    report = train(load_train_config(config, overrides, run_dir=work / "run"),
                   resume=False)
    summary["train"] = {"seconds": time.perf_counter() - t0, "steps": report.global_step,
                        "epochs": report.epochs, "validation": report.validation,
                        "best": report.best, "onnx": report.onnx}
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
                                                  "frames", "points", "timing_ms")}
    summary["eval"]["seconds"] = time.perf_counter() - t0
    print(f"demo: held-out mIoU {evaluation['miou']:.3f} on {evaluation['frames']} frames")

    t0 = time.perf_counter()
    replay_dir = out / "replay"
    if (replay_dir / "outputs").exists():
        shutil.rmtree(replay_dir / "outputs")
    replayed = replay_eval(heldout, bundle, rate=replay_rate, report_dir=replay_dir,
                           params={"device": "cpu"})
    summary["replay_eval"] = {**replayed, "seconds": time.perf_counter() - t0}
    summary["model"] = str(bundle)
    summary["total_s"] = time.perf_counter() - started
    # The node's figures head the report: they are what the demo is about.
    report_json = {k: replayed[k] for k in REPORT_KEYS} | to_dict(summary)
    (out / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    latency = replayed["latency_ms"]
    print(f"demo: offline held-out mIoU {evaluation['miou']:.3f}; the node on a replay: mIoU "
          f"{replayed['miou']:.3f}, {replayed['frames_out']} of {replayed['frames_in']} frames "
          f"labelled, {replayed['dropped']} dropped, latency p50 {latency['p50']:.0f} ms, p99 "
          f"{latency['p99']:.0f} ms; {summary['total_s'] / 60:.1f} min in all")
    print(f"demo: report {out / 'report.json'}, pictures {out / 'eval'} and {replay_dir}, "
          f"model {bundle}")
    return report_json
