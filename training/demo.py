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

Everything lands in ``out``; ``summary.json`` holds the measured figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..vocabulary import config_dir


def _drive(path: Path, frames: int, seed: int) -> Path:
    from ..sample.drive import write_sample_drive

    if not (path / "metadata.yaml").is_file():
        print(f"demo: writing the sample drive {path.name} ({frames} frames, seed {seed})")
        write_sample_drive(path, frames=frames, seed=seed)
    return path


def run_demo(out: str | Path, *, pretrained: str | None = None, replay_rate: float = 0.1,
             train_frames: int = 60, heldout_frames: int = 20,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every step into ``out``; returns (and writes) the summary.

    ``overrides`` are ``key=value`` settings for the training config (tests shrink it).
    """
    from ..node.replay_eval import replay_eval
    from .config import load_train_config
    from .evaluate import evaluate_bag
    from .trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    train_bag = _drive(out / "drive_train", train_frames, 0)
    heldout = _drive(out / "drive_heldout", heldout_frames, 1)
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
    report = train(load_train_config(config, overrides, run_dir=out / "run"),
                   resume=False)
    summary["train"] = {"seconds": time.perf_counter() - t0, "steps": report.global_step,
                        "epochs": report.epochs, "validation": report.validation,
                        "best": report.best, "onnx": report.onnx}
    bundle = report.bundle
    assert bundle is not None
    print(report.summary())

    t0 = time.perf_counter()
    evaluation = evaluate_bag(bundle, heldout, "sample_drive", backend="torch",
                              report_dir=out / "eval")
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    summary["eval"] = {k: evaluation[k] for k in ("miou", "accuracy", "per_class_iou",
                                                  "frames", "points", "timing_ms")}
    summary["eval"]["seconds"] = time.perf_counter() - t0
    print(f"demo: held-out mIoU {evaluation['miou']:.3f} on {evaluation['frames']} frames")

    t0 = time.perf_counter()
    replay_dir = out / "replay"
    if (replay_dir / "outputs").exists():
        import shutil

        shutil.rmtree(replay_dir / "outputs")
    replayed = replay_eval(heldout, bundle, rate=replay_rate, report_dir=replay_dir,
                           params={"device": "cpu"})
    (out / "replay_eval.json").write_text(json.dumps(replayed, indent=2) + "\n")
    summary["replay_eval"] = {k: replayed[k] for k in ("miou", "frames_in", "frames_out",
                                                       "dropped", "latency_ms", "rate")}
    summary["replay_eval"]["seconds"] = time.perf_counter() - t0
    summary["bundle"] = str(bundle)
    summary["total_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(to_dict(summary), indent=2) + "\n")
    print(f"demo: node on the replay: mIoU {replayed['miou']:.3f}, {replayed['dropped']} of "
          f"{replayed['frames_in']} frames dropped, latency p50 {replayed['latency_ms']['p50']}"
          f" ms; {summary['total_s'] / 60:.1f} min in all -> {out / 'summary.json'}")
    return summary
