"""Host reads of one frame: how often ``Predictor.predict`` waits for the device, and where.

A bag's first frame goes through ``Predictor.predict`` (the torch backend unless told, a
random-weight bundle as ``bench predictor`` makes it) once to warm up, then once counted.
``host_syncs`` is :attr:`~clip2scene_ros.runtime.predictor.Prediction.host_syncs` (the reads
from the network's input to its logits on the host); ``sites`` counts every read of the call
by the line that made it, the labels' post-processing included (on a host array, no device
wait there), and ``engine`` sums those in the sparse engine (``clip2scene_ros/sparse/``). On a
CPU the reads of CPU tensors are counted: the calls that would wait on a GPU.

Run: ``python -m clip2scene_ros.bench.host_reads --bag BAG [--backend torch] [--device cpu]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..frame import Frame
from ..runtime.device_io import count_host_reads
from ..runtime.predictor import Predictor
from .predictor import first_frame, random_bundle


def host_reads_frame(frame: Frame, *, backend: str = "torch", device: str = "cpu",
                     cr: float = 0.5, voxel: float = 0.1) -> dict[str, Any]:
    """``{"host_syncs", "engine", "by_method", "sites"}`` of ``Predictor.predict([frame])``."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = random_bundle(Path(tmp) / "model", cr=cr, voxel=voxel,
                               onnx=backend != "torch")
        predictor = Predictor(bundle, backend=backend, device=device, count_syncs=True)
        predictor.predict([frame])  # warm-up
        with count_host_reads(device, sites=True) as reads:
            out = predictor.predict([frame])
    engine = sum(n for site, n in reads.by_site.items()
                 if site.startswith("clip2scene_ros/sparse/"))
    return {"points": frame.num_points, "backend": backend, "device": device, "cr": cr,
            "voxel": voxel, "host_syncs": out.host_syncs, "engine": engine,
            "by_method": dict(reads.by_method), "sites": dict(reads.by_site.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag", type=Path, required=True, help="rosbag2 folder")
    parser.add_argument("--backend", default="torch", help="torch, onnxruntime, ...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    report = {"bag": str(args.bag), **host_reads_frame(first_frame(args.bag),
                                                       backend=args.backend,
                                                       device=args.device)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
