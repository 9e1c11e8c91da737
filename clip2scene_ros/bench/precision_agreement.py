"""Labels of a reduced precision against fp32's, point by point, on every frame of bags.

``python -m clip2scene_ros.bench.precision_agreement --model BUNDLE --bag BAG [--bag BAG ...]
[--precision bf16] [--max-frames N] [--json FILE]``: the bundle's torch backend on the CPU in
fp32 and in ``--precision``, the same single-sweep key frames through both, and per bag the
share of points whose labels are equal (the accuracy gate of a reduced precision: >= 99.5 %),
the worst frame's share and the largest feature difference relative to fp32's largest feature.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..frame import Frame
from ..runtime.predictor import Predictor

#: The gate: reduced-precision labels equal fp32's on at least this share of the points.
MIN_AGREEMENT = 0.995


def agreement(reference: Predictor, other: Predictor, frames: Sequence[Frame] | Any,
              max_frames: int | None = None) -> dict[str, Any]:
    """Label agreement of ``other`` with ``reference`` over ``frames`` (each its own key
    frame)."""
    equal = points = 0
    worst, max_err, count = 1.0, 0.0, 0
    started = time.perf_counter()
    for frame in frames:
        if max_frames is not None and count >= max_frames:
            break
        ref, out = reference.predict([frame]), other.predict([frame])
        same = int(np.count_nonzero(ref.labels.label == out.labels.label))
        n = int(ref.labels.label.size)
        equal, points, count = equal + same, points + n, count + 1
        worst = min(worst, same / max(n, 1))
        if ref.features is not None and out.features is not None:
            scale = float(ref.features.abs().max()) or 1.0
            max_err = max(max_err, float((out.features - ref.features).abs().max()) / scale)
    share = equal / points if points else float("nan")
    return {"frames": count, "points": points, "labels_equal": share,
            "worst_frame_labels_equal": worst, "features_max_rel_err": max_err,
            "gate": MIN_AGREEMENT, "met": bool(share >= MIN_AGREEMENT),
            "seconds": round(time.perf_counter() - started, 1)}


def bag_frames(bag: Path) -> Any:
    from ..bag.reader import BagReader

    return BagReader(bag).frames()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip2scene_ros.bench.precision_agreement",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model bundle directory")
    parser.add_argument("--bag", action="append", required=True, help="rosbag2 folder")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--max-frames", type=int, help="at most N frames per bag")
    parser.add_argument("--json", help="write the result there ('-': stdout only)")
    args = parser.parse_args(argv)
    reference = Predictor(args.model, backend="torch", device="cpu", precision="fp32")
    other = Predictor(args.model, backend="torch", device="cpu", precision=args.precision)
    result: dict[str, Any] = {"model": args.model, "precision": args.precision, "bags": {}}
    for bag in args.bag:
        result["bags"][bag] = agreement(reference, other, bag_frames(Path(bag)), args.max_frames)
    text = json.dumps(result, indent=2)
    if args.json and args.json != "-":
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
