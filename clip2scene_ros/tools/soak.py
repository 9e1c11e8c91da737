"""``clip2scene soak``: thousands of frames through the node process, watched for leaks and drift.

The node runs in its own process exactly as in replay-eval (:class:`NodeProcess`); the bag's
LiDAR topic (only that one: the node runs LiDAR-only unless given ``camera_topics``) is replayed
in a loop with ``/clock`` until the node has *published* ``frames`` labelled clouds. Each pass
restarts the stamps and the clock; the node clears its sweep history on the jump, and a pause of
one period is kept between passes. Recorded over the run:

* **RSS** (``rss_mb``: MiB) and open file descriptors of the node process, read from
  ``/proc/<pid>/status`` every ``rss_period_s`` (psutil is not a dependency);
* **latency** of every output, end to end: from the moment the cloud is published here to the
  moment its labelled cloud arrives back (both DDS hops), matched by header stamp to the *latest*
  publish of that stamp. A looped bag repeats its stamps once per pass, so this is unambiguous
  while a frame's latency stays under one pass (``bag frames / rate``: 2.5 s for the default
  20 frames at 8 Hz); an output whose send was already answered is counted as ``late``;
* the node's own processing time (its ``~/debug/total_ms`` topic) and its diagnostics counters;
* **dropped** frames: published clouds that never came back (the node's one-slot mailbox
  replaced them, or DDS lost them).

Everything is grouped into windows of ``window`` output frames. Verdict (:func:`soak_verdict`):

* RSS growth = (peak RSS over the last quarter of the post-warm-up samples − peak RSS of the
  last warm-up window) / the latter, must be ≤ ``rss_limit`` (5 %). Peaks against peaks, so
  the per-frame allocation churn is not read as growth;
* latency p99 stable: p99 of the last quarter of post-warm-up outputs ≤ ``p99_factor`` (1.5)
  × p99 of the first quarter. 1.5 and not tighter because the soak shares its CPU with
  whatever else runs on the host; the per-window load average is recorded to tell the two apart.

Defaults (``make soak``: 10,000 frames in about 21 minutes on an otherwise idle 2-core
machine, where the node keeps up with the 8 clouds/s and drops a handful): a 20-frame
sample drive with a 360-column HDL-32E (about 11k points per sweep, a fifth of a real sweep; no
cameras: the node runs LiDAR-only) replayed at 8 Hz, through a random-weight SPVCNN with ``cr``
0.125 on 0.4 m voxels and 64-dim embeddings, on the CPU with one torch thread
(``node_threads``; node processing p50 in docs/reliability.md), mostly per-layer overhead; a
512-dim head or a full sweep would no longer fit the budget. One thread because the replayer and
listener share the two cores: torch's default of one OpenMP thread per core spins against them.
The soak measures the node's resources over time, not its accuracy, so the weights are random.

A frame's kernel maps hold no reference cycles (their tensors would wait for CPython's rare full
collection, and the heap grown meanwhile would stay): :mod:`clip2scene_ros.sparse.kmap`;
test/test_runtime_memory.py checks it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.highlevel import AnyReader
from std_msgs.msg import Float64

from ..bag.reader import BagReader
from ..errors import BagError, ConfigError
from ..health import latency_summary
from .replay import replay
from .replay_eval import NodeProcess, cdr_stamp_ns

NODE_TOTAL_TOPIC = "/clip2scene_node/debug/total_ms"
RSS_GROWTH_LIMIT = 0.05
P99_FACTOR = 1.5
WINDOW_FRAMES = 100
RSS_PERIOD_S = 1.0
#: The self-contained inputs of ``make soak`` (see the module doc for why these sizes).
DRIVE_FRAMES = 20
DRIVE_AZIMUTH_STEPS = 360
MODEL_CR = 0.125
MODEL_VOXEL_M = 0.4
MODEL_CLIP_DIM = 64
RANDOM_WEIGHTS = "random (seeded): the soak measures resources over time, not labelling quality"


def read_rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in kB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no VmRSS for pid {pid} (a zombie?)")


@dataclass
class SoakRecord:
    """What the callbacks collect; small tuples only (10,000 output clouds are not kept)."""

    sends: list[tuple[int, int]] = field(default_factory=list)  # (monotonic ns, stamp)
    answered: list[bool] = field(default_factory=list)
    latest: dict[int, int] = field(default_factory=dict)  # stamp -> its latest send's index
    outputs: list[tuple[int, float]] = field(default_factory=list)  # (monotonic ns, ms)
    late: int = 0
    node_ms: list[tuple[int, float]] = field(default_factory=list)  # (monotonic ns, ms)
    # (monotonic ns, outputs so far, RSS kB, open fds, 1-min load average)
    samples: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    counters: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def sent(self, stamp: int) -> None:
        self.answered.append(False)
        self.sends.append((time.monotonic_ns(), stamp))
        self.latest[stamp] = len(self.sends) - 1  # last: received() may read it at once

    def received(self, raw: bytes) -> None:
        now = time.monotonic_ns()
        index = self.latest.get(cdr_stamp_ns(raw))
        if index is None or self.answered[index]:
            if index is not None:  # its stamp's latest send was answered: ambiguous, not timed
                self.late += 1
            self.outputs.append((now, math.nan))
            return
        self.answered[index] = True
        self.outputs.append((now, (now - self.sends[index][0]) * 1e-6))


class Sampler(threading.Thread):
    """Reads the node process's RSS and open descriptors every ``period_s``."""

    def __init__(self, pid: int, record: SoakRecord, period_s: float) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.pid, self.record, self.period_s = pid, record, period_s
        self.done = threading.Event()

    def sample(self) -> None:
        try:
            rss = read_rss_kb(self.pid)
            fds = sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())
        except (OSError, ProcessLookupError):
            return  # the node is gone: the run stops on that, not here
        self.record.samples.append((time.monotonic_ns(), len(self.record.outputs), rss, fds,
                                    os.getloadavg()[0]))

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.sample()


def _percentile(values: Sequence[float], q: float) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


def _p99(values: Sequence[float]) -> float | None:
    return _percentile(values, 99)


def soak_verdict(latencies_ms: Sequence[float], rss: Sequence[tuple[int, float]],
                 warmup_frames: int, window: int = WINDOW_FRAMES, *,
                 rss_limit: float = RSS_GROWTH_LIMIT, p99_factor: float = P99_FACTOR
                 ) -> dict[str, Any]:
    """Pass/fail of a soak: RSS growth after warm-up and latency p99 stability.

    ``latencies_ms``: per output frame, in arrival order (NaN: not measurable); ``rss``:
    ``(outputs so far, RSS MiB)`` samples in time order. See the module doc for the rules.
    """
    post = list(latencies_ms[warmup_frames:])
    quarter = len(post) // 4
    p99_first = _p99(post[:quarter]) if quarter else None
    p99_last = _p99(post[-quarter:]) if quarter else None
    stable = None if p99_first is None or p99_last is None else p99_last <= p99_factor * p99_first
    base = [mb for n, mb in rss if warmup_frames - window <= n <= warmup_frames]
    after = [mb for n, mb in rss if n > warmup_frames]
    last = after[-max(1, len(after) // 4):] if after else []
    rss_warm = max(base) if base else None
    rss_last = max(last) if last else None
    growth = None if rss_warm is None or rss_last is None else (rss_last - rss_warm) / rss_warm
    rss_ok = None if growth is None else growth <= rss_limit
    return {
        "ok": bool(rss_ok and stable),
        "rss_ok": rss_ok, "rss_growth": growth, "rss_limit": rss_limit,
        "rss_mb_warmup_end": rss_warm, "rss_mb_last_quarter_max": rss_last,
        "rss_mb_max_after_warmup": max(after) if after else None,
        "p99_stable": stable, "p99_factor": p99_factor,
        "latency_p99_ms_first_quarter": p99_first, "latency_p99_ms_last_quarter": p99_last,
        "latency_p50_ms_first_quarter": _percentile(post[:quarter], 50),
        "latency_p50_ms_last_quarter": _percentile(post[-quarter:] if quarter else [], 50),
        "warmup_frames": warmup_frames, "frames_per_quarter": quarter,
    }


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    return {**latency_summary(finite)} if finite else dict.fromkeys(("p50", "p95", "p99", "max"))


def soak_windows(record: SoakRecord, start_ns: int, window: int) -> list[dict[str, Any]]:
    """Per ``window`` output frames: frames in/out, dropped, latencies, RSS (MiB), node
    counters."""
    out: list[dict[str, Any]] = []
    begin_ns = start_ns
    starts = list(range(0, len(record.outputs), window))
    if len(starts) > 1 and len(record.outputs) - starts[-1] < window // 2:
        starts.pop()  # the few frames past the target join the last window, not a noisy own one
    for first, stop in zip(starts, [*starts[1:], len(record.outputs)], strict=True):
        chunk = record.outputs[first:stop]
        end_ns = chunk[-1][0]
        sent = [i for i, (t, _) in enumerate(record.sends) if begin_ns < t <= end_ns]
        samples = [s for s in record.samples if begin_ns < s[0] <= end_ns] or [
            s for s in record.samples if s[0] <= end_ns][-1:]  # none inside: the one before
        node_ms = [ms for t, ms in record.node_ms if begin_ns < t <= end_ns]
        counters = [c for t, c in record.counters if t <= end_ns]
        node = counters[-1] if counters else {}
        out.append({
            "index": len(out), "frames_out_total": first + len(chunk),
            "t_end_s": (end_ns - start_ns) * 1e-9,
            "frames_in": len(sent), "frames_out": len(chunk),
            "dropped": sum(not record.answered[i] for i in sent),
            "latency_ms": _summary([ms for _, ms in chunk]),
            "node_total_ms": _summary(node_ms),
            "rss_mb": {"last": samples[-1][2] / 1024, "max": max(s[2] for s in samples) / 1024}
            if samples else None,
            "fds": samples[-1][3] if samples else None,
            "load1": samples[-1][4] if samples else None,
            "node_frames": {k: int(node[f"frames_{k}"]) for k in
                            ("received", "processed", "dropped_stale") if f"frames_{k}" in node},
        })
        begin_ns = end_ns
    return out


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def plot_soak(result: dict[str, Any], path: Path) -> Path:
    """Two panels over output frames: the node's RSS, and latency p50/p99 per window."""
    from ..figures import figure, save

    samples = result["rss_samples"]
    windows = result["windows"]
    verdict = result["verdict"]
    fig = figure(10, 7)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot([s[1] for s in samples], [s[2] for s in samples], color="tab:blue", lw=1,
             label="node RSS")
    warm = verdict["rss_mb_warmup_end"]
    if warm is not None:
        top.axhline(warm, color="grey", ls=":", lw=1, label="RSS at warm-up end (peak)")
        top.axhline(warm * (1 + verdict["rss_limit"]), color="tab:red", ls="--", lw=1,
                    label=f"+{100 * verdict['rss_limit']:.0f} % limit")
    for ax in (top, bottom):
        ax.axvline(verdict["warmup_frames"], color="grey", lw=1)
        ax.grid(alpha=0.3)
    growth = verdict["rss_growth"]
    top.set_ylabel("RSS (MiB)")
    top.set_title(f"soak: {result['totals']['frames_out']} frames in "
                  f"{result['totals']['wall_s'] / 60:.1f} min; RSS growth "
                  f"{'n/a' if growth is None else f'{100 * growth:+.2f} %'}, "
                  f"{'PASS' if verdict['ok'] else 'FAIL'}")
    top.legend(loc="lower right", fontsize=8)
    x = [w["frames_out_total"] for w in windows]
    for key, style in (("p50", "-"), ("p99", "-")):
        bottom.plot(x, [_nan(w["latency_ms"][key]) for w in windows], ls=style,
                    label=f"end-to-end {key}")
    bottom.plot(x, [_nan(w["node_total_ms"]["p99"]) for w in windows], ls="--", lw=1,
                label="in-node processing p99")
    dropped = bottom.twinx()  # each bar spans its window, behind the latency lines
    dropped.bar(x, [w["dropped"] for w in windows], width=[-w["frames_out"] for w in windows],
                align="edge", color="tab:red", alpha=0.2)
    dropped.set_ylabel("dropped per window", color="tab:red")
    bottom.set_zorder(dropped.get_zorder() + 1)
    bottom.patch.set_visible(False)
    bottom.set_xlabel("frames published by the node")
    bottom.set_ylabel("latency (ms)")
    bottom.legend(loc="upper left", fontsize=8)
    return save(fig, path)


def make_soak_inputs(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The sample drive and a random-weight bundle of ``make soak`` (reused when present)."""
    from ..models.spvcnn import save_random_bundle
    from ..sample.drive import SampleRig, write_sample_drive
    from ..sample.lidar import LidarModel
    from ..vocabulary import builtin_vocabulary, load_vocabulary

    bag, model = out_dir / "drive", out_dir / "model"
    if not (bag / "metadata.yaml").is_file():
        rig = SampleRig(lidar=LidarModel(azimuth_steps=DRIVE_AZIMUTH_STEPS), cameras=())
        write_sample_drive(bag, frames=DRIVE_FRAMES, seed=seed, rig=rig)
    if not (model / "model.yaml").is_file():
        vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
        save_random_bundle(model, name="sample_drive", classes=vocab.names,
                           palette=[tuple(c) for c in vocab.palette.tolist()], cr=MODEL_CR,
                           clip_dim=MODEL_CLIP_DIM, voxel_size=MODEL_VOXEL_M, seed=seed,
                           provenance={"weights": RANDOM_WEIGHTS, "made_by": "clip2scene soak"},
                           overwrite=True)
    return bag, model


def _lidar_period_s(bag: Path, lidar: str) -> tuple[float, int, int]:
    """The LiDAR's period in the bag, and its number of sweeps and last stamp."""
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == lidar]
        logs, last = [], 0
        for _, log_ns, raw in reader.messages(connections=conns):
            logs.append(log_ns)
            last = cdr_stamp_ns(raw)
    if len(logs) < 2:
        raise BagError(str(bag), lidar, f"the soak loops the bag, so it needs at least 2 "
                       f"clouds, found {len(logs)}")
    return (logs[-1] - logs[0]) * 1e-9 / (len(logs) - 1), len(logs), last


def run_soak(bag: str | Path, bundle: str | Path, *, frames: int, rate: float,
             out_dir: str | Path, warmup_frames: int | None = None,
             window: int = WINDOW_FRAMES, rss_period_s: float = RSS_PERIOD_S,
             params: dict[str, str] | None = None, node_threads: int = 1,
             rss_limit: float = RSS_GROWTH_LIMIT,
             p99_factor: float = P99_FACTOR, stall_s: float = 60.0,
             startup_timeout_s: float = 120.0, settle_s: float = 5.0,
             command: str | None = None, extra: dict[str, Any] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Loop ``bag`` through the node running ``bundle`` at ``rate`` clouds/s until it has
    published ``frames`` labelled clouds; writes ``soak.json`` and ``soak.png`` in ``out_dir``
    and returns the JSON. ``warmup_frames`` (default a tenth, at least one window) are left out
    of the verdict; ``node_threads`` sets the node's OpenMP threads (0: torch's default).
    RuntimeError if the node dies, never comes up or stalls for ``stall_s``."""
    import json

    bag, bundle, out = Path(bag), Path(bundle), Path(out_dir)
    if frames < 1 or window < 1:
        raise ConfigError("frames" if frames < 1 else "window",
                          f"must be >= 1, got {frames if frames < 1 else window}")
    warmup = max(window, frames // 10) if warmup_frames is None else warmup_frames
    if not 0 <= warmup < frames:
        raise ConfigError("warmup", f"must be in [0, frames), got {warmup} of {frames}")
    out.mkdir(parents=True, exist_ok=True)
    lidar = BagReader(bag).topics.lidar
    period_s, sweeps, last_stamp = _lidar_period_s(bag, lidar)
    record = SoakRecord()
    failure: list[str] = []
    gap_s = 1.0 / rate if rate > 0 else 0.0
    progress_every = max(window, (frames // 10) // window * window)

    def on_publish(topic: str, raw: bytes) -> None:
        if topic != lidar:
            return
        stamp = cdr_stamp_ns(raw)
        record.sent(stamp)
        if stamp == last_stamp:
            # replay starts the next pass right after the last message: keep one period
            # between the passes, or every loop would send two clouds back to back
            time.sleep(gap_s)

    def on_output(raw: bytes) -> None:
        record.received(raw)
        n = len(record.outputs)
        if progress is not None and n % progress_every == 0:
            rss = record.samples[-1][2] / 1024 if record.samples else float("nan")
            recent = [ms for _, ms in record.outputs[-window:]]
            progress(f"soak: {n}/{frames} frames, RSS {rss:.0f} MiB, last {window} p99 "
                     f"{_p99(recent) or float('nan'):.0f} ms, {len(record.sends) - n} not back")

    def stop() -> bool:
        if len(record.outputs) >= frames:
            return True
        if session.process.poll() is not None:
            failure.append(f"the node exited with {session.process.poll()}")
            return True
        last = record.outputs[-1][0] if record.outputs else start_ns
        if record.sends and time.monotonic_ns() - last > stall_s * 1e9:
            failure.append(f"no output for {stall_s:.0f} s")
            return True
        return False

    log = out / "node.log"
    load_start = os.getloadavg()
    env = ({name: str(node_threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
           if node_threads > 0 else None)
    with NodeProcess(bundle, lidar, log, params or {}, env) as session:
        session.subscribe_output(on_output)
        session.listener.create_subscription(
            Float64, NODE_TOTAL_TOPIC,
            lambda msg: record.node_ms.append((time.monotonic_ns(), float(msg.data))),
            QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
        session.on_diagnostics = lambda values: record.counters.append(
            (time.monotonic_ns(), {k: v for k, v in values.items() if k.startswith("frames_")}))
        session.start(startup_timeout_s)
        sampler = Sampler(session.process.pid, record, rss_period_s)
        sampler.sample()
        start_ns = time.monotonic_ns()
        sampler.start()
        played = replay(bag, rate=rate * period_s if rate > 0 else 0.0, loop=True,
                        topics=[lidar], context=session.context, stop=stop,
                        on_publish=on_publish, wait_for=[lidar])
        end = time.monotonic() + settle_s  # the last clouds in flight (dropped ones: never)
        while time.monotonic() < end and not all(record.answered[-3:]):
            time.sleep(0.05)
        sampler.sample()
        sampler.done.set()
        sampler.join(5)
        wall_s = (time.monotonic_ns() - start_ns) * 1e-9
        diagnostics = dict(session.diagnostics)
        if failure:
            raise RuntimeError(f"soak stopped after {len(record.outputs)} of {frames} frames: "
                               f"{failure[0]}\n{session.log_tail()}")

    latencies = [ms for _, ms in record.outputs]
    rss_mb = [(n, kb / 1024) for _, n, kb, _, _ in record.samples]
    verdict = soak_verdict(latencies, rss_mb, warmup, window, rss_limit=rss_limit,
                           p99_factor=p99_factor)
    result: dict[str, Any] = {
        "command": command, "bag": str(bag), "model": str(bundle), **(extra or {}),
        "settings": {"frames": frames, "rate_hz": rate, "warmup_frames": warmup,
                     "window": window, "rss_period_s": rss_period_s, "params": params or {},
                     "node_threads": node_threads or "torch default",
                     "bag_sweeps": sweeps, "bag_period_s": period_s},
        "verdict": verdict,
        "totals": {
            "frames_in": len(record.sends), "frames_out": len(record.outputs),
            "dropped": record.answered.count(False), "late_outputs": record.late,
            "loops": played.loops, "wall_s": wall_s,
            "latency_ms": _summary(latencies),
            "node_total_ms": _summary([ms for _, ms in record.node_ms]),
            "rss_mb": {"start": rss_mb[0][1] if rss_mb else None,
                       "end": rss_mb[-1][1] if rss_mb else None,
                       "max": max(mb for _, mb in rss_mb) if rss_mb else None},
            "fds": {"start": record.samples[0][3], "end": record.samples[-1][3]}
            if record.samples else None,
            "load1": {"start": load_start[0], "end": os.getloadavg()[0]},
            "cpus": os.cpu_count(),
        },
        "node_diagnostics": diagnostics, "node_log": str(log), "node_pid": session.process.pid,
        "windows": soak_windows(record, start_ns, window),
        # (seconds since start, outputs so far, RSS MiB, open fds, load average)
        "rss_samples": [[round((t - start_ns) * 1e-9, 3), n, round(kb / 1024, 2), fds,
                         round(load, 2)] for t, n, kb, fds, load in record.samples],
    }
    result["plot"] = str(plot_soak(result, out / "soak.png"))
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
