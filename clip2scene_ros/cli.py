"""``clip2scene``: one command line with subcommands for everything outside the node.

Subcommands import their implementation lazily so that ``clip2scene --help`` stays instant and a
subcommand never pays for torch or open_clip it does not use.

Every subcommand's arguments are declared here, in one parser, so ``--help`` shows the whole
command line; the work lives in the modules each command imports. That is why the file is long
(~680 lines): it holds one concern, argument declarations and their thin ``cmd_*`` adapters,
and splitting the parser would scatter the one place a user's command line is defined.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import errors
from .errors import ConfigError

#: Errors a user can fix (each layer's type: configuration, bag, integrity, message; a missing
#: or existing file; a bad value): printed as one line, not a stack trace, and exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (*errors.USER_ERRORS, FileNotFoundError,
                                           FileExistsError, ValueError)


def write_json(data: dict[str, Any], target: str | None) -> None:
    """Write ``data`` as JSON to ``target`` (``-`` for stdout); parent folders are created."""
    if target is None:
        return
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample.drive import write_sample_drive

    info = write_sample_drive(Path(args.out), frames=args.frames, seed=args.seed,
                              storage=args.storage)
    print(info.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bag.inspect import format_inspect, inspect_bag
    from .bag.reader import ReaderConfig
    from .config import load_config

    config = load_config(ReaderConfig, args.config) if args.config else None
    report = inspect_bag(Path(args.bag), config)
    if args.json != "-":
        print(format_inspect(report))
    write_json(report, args.json)
    return 0


def cmd_bench_codecs(args: argparse.Namespace) -> int:
    from .bench.codecs import bench_codecs

    result = bench_codecs(points=args.points, repeat=args.repeat)
    write_json(result, args.json)
    if args.json != "-":
        print(json.dumps(result, indent=2))
    return 0


def cmd_bench_sparse(args: argparse.Namespace) -> int:
    from .bench.sparse import bench_sparse

    result = bench_sparse(Path(args.scan), voxel=args.voxel, cr=args.cr, repeat=args.repeat,
                          malloc=args.malloc)
    write_json(result, args.json)
    if args.json != "-":
        print(json.dumps(result, indent=2))
    return 0


def cmd_bench_predictor(args: argparse.Namespace) -> int:
    from .bench.predictor import bench_predictor, format_table

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result = bench_predictor(Path(args.bag), backends=backends, repeat=args.repeat,
                             threads=args.threads, cr=args.cr, voxel=args.voxel,
                             malloc=args.malloc, sgemm_size=args.sgemm_size,
                             device=args.device, precisions=args.precision)
    write_json(result, args.json)
    if args.json != "-":
        print(format_table(result))
    return 0


def cmd_vocab_build(args: argparse.Namespace) -> int:
    from .teacher.text_bank import build_text_bank

    summary = build_text_bank(args.vocab, model=args.model, pretrained=args.pretrained,
                              out=args.out, prompts=args.prompts, device=args.device)
    print(f"text bank {summary['vocabulary']}: {summary['classes']} classes x {summary['dim']} "
          f"dims, {summary['templates']} templates -> {', '.join(summary['files'])}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    import logging

    from .bag.reader import ReaderConfig
    from .config import load_config
    from .teacher.run import run_teacher

    log_to_terminal(logging.INFO)
    config = load_config(ReaderConfig, args.config) if args.config else None
    vocab = args.vocab
    if vocab is None:
        if args.simulate is None:
            raise ConfigError("vocab", "--vocab is required (a vocabulary or a text bank FILE)")
        from .teacher.simulated import load_spec, resolve_spec_path

        vocab = load_spec(resolve_spec_path(args.simulate)).vocabulary
    report = run_teacher(Path(args.bag), vocab, Path(args.out), model=args.model,
                         pretrained=args.pretrained, image_size=tuple(args.image_size),
                         store_features=args.features, device=args.device,
                         reader_config=config, progress=not args.quiet, simulate=args.simulate)
    if args.json != "-":
        print(report.summary())
    if args.json:
        from .teacher.quality import teacher_quality

        quality = teacher_quality(args.out, args.bag, None if args.simulate else vocab,
                                  reader_config=config)
        write_json({"cache": str(args.out), "cache_key": report.cache_key, **quality},
                   args.json)
        if args.json != "-":
            print(f"teacher mIoU {quality['teacher_miou']:.3f} on its pairs, accuracy "
                  f"{quality['teacher_accuracy']:.3f}, paired fraction "
                  f"{quality['paired_fraction']:.3f} -> {args.json}")
    return 0


def cmd_bench_teacher(args: argparse.Namespace) -> int:
    from .bench.teacher import bench_teacher

    result = bench_teacher(model=args.model, images=args.images, repeat=args.repeat)
    write_json(result, args.json)
    if args.json != "-":
        print(json.dumps(result, indent=2))
    return 0


def cmd_bench_transport(args: argparse.Namespace) -> int:
    from .tools.transport_bench import bench_transport

    result = bench_transport(points=args.points, rate=args.rate, messages=args.messages)
    write_json(result, args.json)
    if args.json != "-":
        print(json.dumps(result, indent=2))
    return 0 if result["documented_meets_target"] else 1


def cmd_fuzz(args: argparse.Namespace) -> int:
    from .fuzz import run_fuzz

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    report = run_fuzz(args.cases, types, seed=args.seed, node_cases=args.node_cases,
                      time_limit_s=args.time_limit, max_case_rss_mb=args.max_case_rss_mb,
                      progress=lambda line: print(line, flush=True))
    write_json(report, args.json)
    print(f"fuzz {'PASS' if report['ok'] else 'FAIL'} in {report['seconds']} s (node: "
          f"{report['node']})" + (f"; report {args.json}" if args.json else ""))
    return 0 if report["ok"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .models.onnx_export import export_bundle

    report = export_bundle(Path(args.model))
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .models.bundle import load_bundle
    from .training.evaluate import evaluate_bag, evaluate_kitti
    from .vocabulary import builtin_vocabulary

    if bool(args.kitti_bin) != bool(args.kitti_label):
        raise ConfigError("kitti", "--kitti-bin and --kitti-label go together")
    bundle = load_bundle(args.model)
    vocab = args.vocab
    if vocab is None:  # the model's own vocabulary, when it is one shipped with the package
        name = bundle.spec.vocabulary.name
        try:
            builtin_vocabulary(name)
        except FileNotFoundError as exc:
            raise ConfigError("vocab", f"the model's vocabulary {name!r} is not a built-in one; "
                              "pass --vocab FILE with the dataset's label ids") from exc
        vocab = name
    common = {"backend": args.backend, "device": args.device, "max_frames": args.max_frames,
              "report_dir": args.report, "precision": args.precision}
    if args.bag is not None:
        result = evaluate_bag(bundle, Path(args.bag), vocab, **common)
    else:
        result = evaluate_kitti(bundle, args.kitti_bin, args.kitti_label, vocab, **common)
    write_json(result, args.json)
    if args.json != "-":
        miou = "n/a" if result["miou"] is None else f"{100 * result['miou']:.2f}"
        acc = "n/a" if result["accuracy"] is None else f"{100 * result['accuracy']:.2f}"
        print(f"eval {result['vocabulary']}: mIoU {miou}, accuracy {acc} over "
              f"{result['frames']} frames, {result['points']} points "
              f"(backend {result['backend']}, p50 {result['timing_ms']['p50']:.1f} ms)")
        for split in ("in_view", "out_of_view"):
            part = result.get(split)
            if part and part["miou"] is not None:
                print(f"  {split.replace('_', ' ')}: mIoU {100 * part['miou']:.2f} over "
                      f"{part['points']} points")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .tools.replay import main_replay

    print(main_replay(args.bag, rate=args.rate, loop=args.loop, clock=not args.no_clock,
                      clock_hz=args.clock_hz, wait_for=args.wait_for,
                      wait_timeout_s=args.wait_timeout).summary())
    return 0


def cmd_replay_eval(args: argparse.Namespace) -> int:
    from .tools.replay_eval import replay_eval

    params = dict(item.split(":=", 1) for item in args.param)
    result = replay_eval(args.bag, args.model, vocab=args.vocab, rate=args.rate,
                         report_dir=args.report, output_bag=args.output_bag, params=params)
    write_json(result, args.json)
    latency = result["latency_ms"]
    miou = "n/a (no ground truth)" if result["miou"] is None else f"{result['miou']:.3f}"
    print(f"mIoU {miou} on {result['frames_scored']} frames; "
          f"{result['dropped']} of {result['frames_in']} dropped; latency p50 "
          f"{latency['p50']} ms, p99 {latency['p99']} ms")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    import shlex

    from .tools.soak import RANDOM_WEIGHTS, make_soak_inputs, run_soak

    out = Path(args.out)
    if (args.bag is None) != (args.model is None):
        raise ConfigError("soak", "give --bag and --model together, or neither (the sample "
                          "drive and a random-weight model are then written to --out)")
    extra: dict[str, Any] = {}
    if args.bag is None:
        out.mkdir(parents=True, exist_ok=True)
        bag, model = make_soak_inputs(out)
        extra["model_weights"] = RANDOM_WEIGHTS
    else:
        bag, model = Path(args.bag), Path(args.model)
    params = dict(item.split(":=", 1) for item in args.param)
    command = ["clip2scene", "soak", "--bag", str(bag), "--model", str(model), "--frames",
               str(args.frames), "--rate", str(args.rate), "--out", str(out)]
    if args.warmup is not None:
        command += ["--warmup", str(args.warmup)]
    command += ["--window", str(args.window), "--node-threads", str(args.node_threads)]
    for item in args.param:
        command += ["--param", item]
    result = run_soak(bag, model, frames=args.frames, rate=args.rate, out_dir=out,
                      warmup_frames=args.warmup, window=args.window, params=params,
                      node_threads=args.node_threads,
                      command=shlex.join(command),
                      extra=extra, progress=lambda line: print(line, flush=True))
    verdict, totals = result["verdict"], result["totals"]
    growth = verdict["rss_growth"]
    print(f"soak {'PASS' if verdict['ok'] else 'FAIL'}: {totals['frames_out']} frames out of "
          f"{totals['frames_in']} in {totals['wall_s'] / 60:.1f} min, {totals['dropped']} "
          f"dropped; RSS growth after warm-up "
          f"{'n/a' if growth is None else f'{100 * growth:+.2f} %'}; latency p99 "
          f"{verdict['latency_p99_ms_first_quarter']} -> "
          f"{verdict['latency_p99_ms_last_quarter']} ms; {out / 'soak.json'}, {result['plot']}")
    return 0 if verdict["ok"] else 1


def log_to_terminal(level: int) -> None:
    """Show our package's log messages (not every library's) on the terminal: commands whose
    work reports through logging (the trainer; the teacher's cached-bank and simulated-teacher
    notes)."""
    import logging

    logger = logging.getLogger("clip2scene_ros")
    for old in [h for h in logger.handlers if getattr(h, "clip2scene_terminal", False)]:
        logger.removeHandler(old)  # one per process, on today's stderr (a second main() call)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.clip2scene_terminal = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


def cmd_train(args: argparse.Namespace) -> int:
    import logging
    import os

    from .training.config import load_train_config
    from .training.trainer import train

    # The trainer reports through logging (resume, validation, bundle): rank 0's only under
    # torchrun.
    log_to_terminal(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    overrides = [*args.set, "skip_bad=true"] if args.skip_bad else args.set
    config = load_train_config(args.config, overrides, run_dir=args.run_dir)
    report = train(config, resume=args.resume)
    if report.bundle is not None:  # rank 0 (under torchrun the other ranks stay quiet)
        print(report.summary())
    return 0


def cmd_pointclip_eval(args: argparse.Namespace) -> int:
    if args.bag is not None:
        from .pointclip.crops import evaluate_crops

        if args.vocab is None:
            raise ConfigError("vocab", "--bag needs --vocab: the vocabulary whose ids are the "
                              "bag's label values (e.g. sample_drive)")
        result = evaluate_crops(args.bag, vocab=args.vocab, classes=args.classes or (),
                                model=args.model, pretrained=args.pretrained,
                                projection=args.projection, adapter=args.adapter,
                                min_points=args.min_points, max_frames=args.max_frames,
                                device=args.device)
    else:
        from .pointclip.evaluate import evaluate_folder

        result = evaluate_folder(args.data, model=args.model, pretrained=args.pretrained,
                                 vocab=args.vocab or "modelnet40", projection=args.projection,
                                 adapter=args.adapter, points=args.points, device=args.device)
    write_json(result, args.json)
    print(f"{result['objects']} objects, accuracy {result['accuracy']}"
          + (f" ({result['accuracy_note']})" if result["accuracy_note"] else ""))
    return 0


def cmd_pointclip_train(args: argparse.Namespace) -> int:
    from .pointclip.evaluate import train_folder

    report = train_folder(args.data, args.out, shots=args.shots, epochs=args.epochs,
                          model=args.model, pretrained=args.pretrained,
                          vocab=args.vocab or "modelnet40", projection=args.projection,
                          points=args.points, device=args.device)
    print(json.dumps(report, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    run_demo(args.out, work=args.work, pretrained=args.pretrained, clip_model=args.clip_model,
             replay_rate=args.replay_rate)
    return 0


def positive_hz(text: str) -> float:
    """argparse type: a finite frequency > 0 (``--clock-hz``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite frequency > 0, got {text!r}")
    return value


def add_precision(p: argparse.ArgumentParser) -> None:
    """``--precision`` of a command that runs the network (one meaning everywhere)."""
    from .precision_names import DEFAULT_PRECISION, PRECISIONS

    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help=f"network precision (default {DEFAULT_PRECISION}: bf16 on a CPU with "
                   "bf16 matrix units, fp16 on CUDA, else fp32)")


def precision_list(text: str) -> list[str]:
    """argparse type: comma-separated precisions without ``auto`` (benchmarks name theirs)."""
    from .precision_names import PRECISIONS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in PRECISIONS or n == "auto"]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"want distinct names of {', '.join(PRECISIONS[1:])}, "
                                         f"got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip2scene",
        description="Open-vocabulary LiDAR segmentation distilled from CLIP: offline tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("sample", cmd_sample, "write the synthetic sample drive as a rosbag2")
    p.add_argument("--out", required=True, help="bag directory to create (must not exist)")
    p.add_argument("--frames", type=int, default=60, help="LiDAR frames at 10 Hz (default 60)")
    p.add_argument("--seed", type=int, default=0, help="scene and noise seed (default 0)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")

    p = add("inspect", cmd_inspect,
            "topics, rates, sync offsets and point-pixel pairs of a recording")
    p.add_argument("--bag", required=True, help="rosbag2 directory (mcap or sqlite3)")
    p.add_argument("--config", help="reader YAML (topics, slop, calibration); default: detect")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout)")

    p = add("export", cmd_export,
            "write a bundle's model.onnx (planned feature pass) and check it against torch")
    p.add_argument("--model", required=True, help="model bundle directory")

    p = add("eval", cmd_eval,
            "annotation-free mIoU of a model bundle on a labelled bag or SemanticKITTI scans")
    p.add_argument("--model", required=True, help="model bundle directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", help="rosbag2 directory with a label cloud topic")
    src.add_argument("--kitti-bin", nargs="+", metavar="FILE", help="SemanticKITTI .bin scans")
    p.add_argument("--kitti-label", nargs="+", metavar="FILE",
                   help="the scans' .label files, in the same order")
    p.add_argument("--vocab", help="vocabulary YAML or built-in name mapping the dataset's label "
                   "ids (default: the model's vocabulary, if built in)")
    p.add_argument("--json", required=True, metavar="FILE",
                   help="write the metrics as JSON ('-': stdout)")
    p.add_argument("--report", metavar="DIR", help="also write PNG figures there (matplotlib)")
    p.add_argument("--backend", default="auto", help="auto, torch, onnxruntime or tensorrt")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_precision(p)
    p.add_argument("--max-frames", type=int, help="score at most N labelled frames")

    p = add("replay", cmd_replay, "publish a bag's topics and /clock over rclpy "
            "(ros2 bag play --clock)")
    p.add_argument("--bag", required=True, help="rosbag2 directory (mcap or sqlite3)")
    p.add_argument("--rate", type=float, default=1.0, help="playback rate (<= 0: unpaced)")
    p.add_argument("--loop", action="store_true", help="start over at the end (Ctrl-C stops)")
    p.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    p.add_argument("--clock-hz", type=positive_hz, default=40.0, metavar="HZ",
                   help="/clock ticks per second between messages (default 40, as "
                   "ros2 bag play --clock)")
    p.add_argument("--wait-for", action="append", default=[], metavar="TOPIC",
                   help="start once TOPIC (one of the bag's) has a subscriber (repeatable)")
    p.add_argument("--wait-timeout", type=float, default=30.0, metavar="S",
                   help="play anyway after S seconds without them (default 30)")

    p = add("replay-eval", cmd_replay_eval,
            "run clip2scene_node in its own process on a replayed bag and score its output")
    p.add_argument("--bag", required=True, help="rosbag2 directory with ground-truth labels")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--json", required=True, metavar="FILE", help="result JSON ('-': stdout)")
    p.add_argument("--report", metavar="DIR", help="PNG report, node log and recorded outputs")
    p.add_argument("--vocab", help="evaluation vocabulary (default: the bundle's, if built in)")
    p.add_argument("--rate", type=float, default=1.0, help="playback rate")
    p.add_argument("--output-bag", help="mcap bag of the node's outputs (default: in --report)")
    p.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                   help="extra node parameter (repeatable), e.g. backend:=onnxruntime")

    p = add("soak", cmd_soak, "loop a bag through clip2scene_node for N frames; record RSS, "
            "latency and drops over time (soak.json, soak.png); exit 1 on a failed verdict")
    p.add_argument("--bag", help="rosbag2 directory (default: a small sample drive in --out)")
    p.add_argument("--model", help="model bundle (default: a random-weight one in --out)")
    p.add_argument("--frames", type=int, default=10_000,
                   help="labelled clouds the node must publish (default 10000)")
    p.add_argument("--rate", type=float, default=8.0,
                   help="clouds per second replayed (default 8; <= 0: unpaced)")
    p.add_argument("--warmup", type=int, help="frames left out of the verdict (default: a "
                   "tenth, at least one window)")
    p.add_argument("--window", type=int, default=100,
                   help="output frames per recorded window (default 100)")
    p.add_argument("--node-threads", type=int, default=1,
                   help="OpenMP threads of the node process (default 1; 0: torch's default)")
    p.add_argument("--out", default="build/soak", help="folder for soak.json, soak.png, the "
                   "node log (default build/soak)")
    p.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                   help="extra node parameter (repeatable), e.g. device:=cpu")

    pointclip = add("pointclip", lambda a: (a.pointclip_parser.print_help(), 2)[1],
                    "PointCLIP object classification (zero-shot and few-shot)")
    pointclip.set_defaults(pointclip_parser=pointclip)
    pc_sub = pointclip.add_subparsers(dest="pointclip_command", metavar="PC")
    for name, func, help_ in (
            ("eval", cmd_pointclip_eval, "classify a folder of object files (OFF/PLY/points) "
             "or the labelled object crops of a bag"),
            ("train", cmd_pointclip_train, "few-shot inter-view adapter into a bundle folder")):
        p = pc_sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        data_help = "folder of object files (e.g. ModelNet)"
        if name == "eval":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--data", help=data_help)
            src.add_argument("--bag", help="rosbag2 directory with ground-truth labels: "
                             "classify the crops of its thing-class instances")
        else:
            p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--model", default="ViT-B-16", help="open_clip model")
        p.add_argument("--pretrained", help="open_clip tag or weights file; default: random "
                       "weights (mechanics only, no accuracy)")
        p.add_argument("--vocab", help="vocabulary YAML or built-in name (default modelnet40; "
                       "with --bag: required, its ids are the bag's label values)")
        p.add_argument("--projection", choices=["v1", "v2"], default="v1")
        p.add_argument("--points", type=int, default=1024, help="points sampled per object")
        p.add_argument("--device", default="cpu")
        if name == "eval":
            p.add_argument("--adapter", help="bundle folder holding a trained adapter")
            p.add_argument("--json", metavar="FILE", help="result JSON ('-': stdout)")
            p.add_argument("--classes", nargs="+", metavar="NAME", help="with --bag: the thing "
                           "classes to crop and classify among (default: the vocabulary's "
                           "object classes, e.g. car, pedestrian, pole)")
            p.add_argument("--min-points", type=int, default=10,
                           help="with --bag: smaller clusters are noise (default 10)")
            p.add_argument("--max-frames", type=int, help="with --bag: at most N labelled sweeps")
        else:
            p.add_argument("--out", required=True, help="bundle folder to write the adapter to")
            p.add_argument("--shots", type=int, default=16)
            p.add_argument("--epochs", type=int, default=250)

    p = add("demo", cmd_demo, "sample drives -> teacher -> annotation-free distillation -> "
            "export -> evaluate -> the node on a replay")
    p.add_argument("--out", default="demo-report", help="report folder: report.json, pictures, "
                   "model/ (default demo-report)")
    p.add_argument("--work", default="build/demo", help="scratch: drives and the training run "
                   "(default build/demo)")
    p.add_argument("--pretrained", help="CLIP weights (open_clip tag or file): MaskCLIP labels "
                   "the drive; default: the simulated teacher (config/teachers/maskclip_like)")
    p.add_argument("--clip-model", default="ViT-B-16",
                   help="open_clip model of --pretrained (default ViT-B-16)")
    p.add_argument("--replay-rate", type=float, default=0.1,
                   help="replay rate of the node run (default 0.1: 1 frame/s)")

    bench = add("bench", lambda a: (a.bench_parser.print_help(), 2)[1], "benchmarks (JSON)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(bench_parser=bench)
    p = bench_sub.add_parser("codecs", help="PointCloud2 decode/encode of a 100k-point cloud")
    p.set_defaults(func=cmd_bench_codecs)
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")
    p = bench_sub.add_parser("sparse", help="SPVCNN forward on a scan: ours vs spconv, sgemm")
    p.set_defaults(func=cmd_bench_sparse)
    p.add_argument("--scan", required=True, help="KITTI .bin or nuScenes .pcd.bin")
    p.add_argument("--voxel", type=float, default=0.05, help="voxel size in metres")
    p.add_argument("--cr", type=float, default=1.0, help="SPVCNN width multiplier")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--malloc", choices=("node", "default"), default="node",
                   help="glibc malloc settings for both engines: the node's "
                   "(default) or glibc's")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")
    p = bench_sub.add_parser("predictor", help="Predictor.predict per stage and backend on a "
                             "bag's first frame (random weights), sgemm and GEMM share")
    p.set_defaults(func=cmd_bench_predictor)
    p.add_argument("--bag", required=True, help="rosbag2 folder (e.g. the nuScenes keyframe)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="comma-separated, run interleaved (default torch,onnxruntime)")
    p.add_argument("--repeat", type=int, default=7, help="runs per backend after a warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch/onnxruntime intra-op threads "
                   "(default 0: torch's default)")
    p.add_argument("--cr", type=float, default=0.5, help="SPVCNN width multiplier")
    p.add_argument("--voxel", type=float, default=0.1, help="voxel size in metres")
    p.add_argument("--malloc", choices=("node", "default"), default="node",
                   help="glibc malloc settings: the node's (default) or glibc's")
    p.add_argument("--sgemm-size", type=int, default=2048,
                   help="n of the n x n sgemm baseline (default 2048)")
    p.add_argument("--device", default="cpu", help="the predictors' torch device (default cpu)")
    p.add_argument("--precision", default="fp32", type=precision_list, metavar="LIST",
                   help="comma-separated precisions timed in the same rounds, e.g. fp32,bf16 "
                   "(default fp32: on a CPU without bf16 matrix units bf16 is emulated, far "
                   "slower, and timing it only adds minutes)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")

    p = bench_sub.add_parser("teacher", help="MaskCLIP images/s at 224x416 (random weights) "
                             "and teacher cache bytes per frame")
    p.set_defaults(func=cmd_bench_teacher)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model (default ViT-B-16)")
    p.add_argument("--images", type=int, default=6, help="images per MaskCLIP batch (default 6)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")
    p = bench_sub.add_parser("transport", help="cross-process loss and latency of labelled "
                             "clouds per Fast DDS transport and reliability")
    p.set_defaults(func=cmd_bench_transport)
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=10.0, help="messages per second (default 10)")
    p.add_argument("--messages", type=int, default=200, help="per setting (default 200)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")

    p = add("fuzz", cmd_fuzz, "malformed PointCloud2/Image/CompressedImage/CameraInfo "
            "through the codecs and the node; exit 1 on any crash, hang or oversized allocation")
    p.add_argument("--cases", type=int, default=1000, help="cases per type (default 1000)")
    p.add_argument("--types", default="pointcloud2,image,compressed_image,camera_info",
                   help="comma-separated message types (default: all four)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    p.add_argument("--node-cases", type=int, help="cases per type also run through the node's "
                   "Pipeline (default: cases / 40, at least 10; 0: codecs only)")
    p.add_argument("--time-limit", type=float, default=2.0,
                   help="seconds a codec case may take before it counts as a hang (default 2)")
    p.add_argument("--max-case-rss-mb", type=float, default=64.0,
                   help="peak RSS growth of one case that counts as an oversized allocation")

    p = add("teacher", cmd_teacher,
            "cache MaskCLIP pseudo-labels of every point-pixel pair of a bag (resumable)")
    p.add_argument("--bag", required=True, help="rosbag2 directory (mcap or sqlite3)")
    p.add_argument("--vocab", help="vocabulary YAML or built-in name, or a text bank FILE "
                   "(vocab build); with --simulate: default the spec's vocabulary (a bank is "
                   "needed for --features). A vocabulary's bank is cached in $CLIP2SCENE_CACHE "
                   "(else $XDG_CACHE_HOME/clip2scene or ~/.cache/clip2scene) for later runs")
    p.add_argument("--out", required=True,
                   help="cache directory; one bag + teacher config per directory")
    p.add_argument("--simulate", metavar="SPEC", help="a simulated MaskCLIP teacher from the "
                   "bag's ground truth (a spec YAML or a name in config/teachers/, e.g. "
                   "maskclip_like): measures distillation without CLIP weights")
    p.add_argument("--json", metavar="FILE", help="the teacher's own quality on the bag's "
                   "ground truth: teacher_miou, teacher_accuracy, per_class, paired_fraction")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, a local weights file, or "
                   "'random' (the default: seeded random weights, for tests only)")
    p.add_argument("--image-size", type=int, nargs=2, default=[224, 416], metavar=("H", "W"),
                   help="size every camera image is resized to (default 224 416)")
    p.add_argument("--features", action="store_true",
                   help="also store each pair's dense MaskCLIP feature (float16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--config", help="reader YAML (topics, slop, calibration); default: detect")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("train", cmd_train,
            "train a model from rosbags (CLIP2Scene distillation or fine-tuning); run under "
            "torchrun for several GPUs/processes")
    p.add_argument("--config", required=True, help="training YAML (see config/train/)")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from run_dir/checkpoints (default: when a checkpoint is "
                   "there); --no-resume starts over")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value), e.g. --set epochs=2 "
                   "--set dataset.label_fraction=0.01; repeatable")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out bags and keyframes that cannot be read (truncated or corrupt "
                   "files) instead of stopping; the summary lists what was skipped")

    vocab = add("vocab", lambda a: (a.vocab_parser.print_help(), 2)[1],
                "vocabularies and text banks")
    vocab_sub = vocab.add_subparsers(dest="vocab_command", metavar="VOCAB")
    vocab.set_defaults(vocab_parser=vocab)
    p = vocab_sub.add_parser("build", help="encode a vocabulary with CLIP into a text bank")
    p.set_defaults(func=cmd_vocab_build)
    p.add_argument("--vocab", required=True, help="vocabulary YAML, or a built-in name (nuscenes)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", required=True,
                   help="open_clip pretrained tag (needs internet or a cached copy), a local "
                   "weights file (.safetensors or state dict), or 'random' for tests")
    p.add_argument("--out", required=True, help="bank FILE: writes FILE.safetensors + FILE.yaml")
    p.add_argument("--prompts", help="prompt set name or YAML (default: the vocabulary's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"clip2scene {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
