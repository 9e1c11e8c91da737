"""clip2scene soak: the verdict arithmetic, the loop-aware latency bookkeeping, and a short soak
through the real node process."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from clip2scene_ros.cli import main as cli
from clip2scene_ros.tools.soak import SoakRecord, read_rss_kb, soak_verdict, soak_windows


def _raw(stamp_ns: int) -> bytes:
    """A serialized message starting with a std_msgs/Header (little-endian CDR)."""
    return b"\x00\x01\x00\x00" + struct.pack("<iI", *divmod(stamp_ns, 1_000_000_000))


def test_verdict_passes_a_flat_run() -> None:
    rss = [(n, 500.0 + (n % 3)) for n in range(0, 1001, 10)]  # churn, no growth
    verdict = soak_verdict([50.0] * 1000, rss, warmup_frames=200, window=100)
    assert verdict["ok"] and verdict["rss_ok"] and verdict["p99_stable"]
    assert verdict["rss_mb_warmup_end"] == 502.0 and verdict["rss_mb_last_quarter_max"] == 502.0
    assert verdict["rss_growth"] == 0.0 and verdict["frames_per_quarter"] == 200


def test_verdict_fails_rss_growth_above_the_limit() -> None:
    # 400 MB at the end of warm-up, then a leak of 0.1 MB per frame: 480 MB at frame 1000
    rss = [(n, 400.0 + 0.1 * max(0, n - 200)) for n in range(0, 1001, 10)]
    verdict = soak_verdict([50.0] * 1000, rss, warmup_frames=200, window=100)
    assert verdict["rss_mb_warmup_end"] == 400.0
    assert verdict["rss_mb_last_quarter_max"] == pytest.approx(480.0)
    assert verdict["rss_growth"] == pytest.approx(0.20)
    assert verdict["rss_ok"] is False and verdict["p99_stable"] is True
    assert verdict["ok"] is False
    # the same series passes under a 25 % limit
    assert soak_verdict([50.0] * 1000, rss, 200, 100, rss_limit=0.25)["ok"] is True


def test_verdict_fails_a_p99_that_drifts_up() -> None:
    # warm-up 100 frames of 500 ms (ignored), then 400 frames: quarters of 100
    first = [10.0] * 99 + [20.0]
    middle = [10.0] * 200
    last = [10.0] * 98 + [40.0, 40.0]
    latencies = [500.0] * 100 + first + middle + last
    rss = [(n, 300.0) for n in range(0, 501, 5)]
    verdict = soak_verdict(latencies, rss, warmup_frames=100, window=50)
    assert verdict["latency_p99_ms_first_quarter"] == pytest.approx(10.0 + 0.01 * 10.0)
    assert verdict["latency_p99_ms_last_quarter"] == pytest.approx(40.0)
    assert verdict["p99_stable"] is False and verdict["rss_ok"] is True and not verdict["ok"]
    # NaN latencies (not measurable) are left out, not counted as zero
    with_nan = [500.0] * 100 + first + middle + [math.nan] * 50 + [10.0] * 50
    assert soak_verdict(with_nan, rss, 100, 50)["latency_p99_ms_last_quarter"] == 10.0


def test_verdict_without_post_warmup_data_is_not_a_pass() -> None:
    verdict = soak_verdict([50.0] * 100, [(n, 300.0) for n in range(101)], warmup_frames=100)
    assert verdict["ok"] is False and verdict["p99_stable"] is None
    assert verdict["rss_growth"] is None


def test_record_times_each_output_against_the_latest_publish_of_its_stamp() -> None:
    record = SoakRecord()
    for stamp in (1, 2, 1):  # a two-cloud bag played twice: stamps repeat each loop
        record.sent(stamp * 1_000_000_000)
    record.received(_raw(1_000_000_000))  # the second loop's cloud 1; loop 1's were dropped
    record.received(_raw(1_000_000_000))  # a second answer to that send: not timed
    record.received(_raw(9_000_000_000))  # a stamp never sent
    assert record.answered == [False, False, True]
    assert math.isfinite(record.outputs[0][1]) and record.outputs[0][1] >= 0
    assert math.isnan(record.outputs[1][1]) and math.isnan(record.outputs[2][1])
    assert record.late == 1


def test_windows_count_drops_and_latencies_per_window() -> None:
    ms = 1_000_000
    record = SoakRecord(
        sends=[(t * ms, t) for t in (10, 20, 30, 40)], answered=[True, False, True, True],
        outputs=[(15 * ms, 5.0), (35 * ms, 5.0), (45 * ms, 7.0)],
        samples=[(16 * ms, 1, 2048, 20, 0.5), (44 * ms, 2, 3072, 21, 0.7)],
        counters=[(36 * ms, {"frames_received": "3", "frames_processed": "2",
                             "frames_dropped_stale": "1"})])
    windows = soak_windows(record, start_ns=0, window=2)
    assert [w["frames_out"] for w in windows] == [2, 1]
    assert [w["frames_in"] for w in windows] == [3, 1] and [w["dropped"] for w in windows] == [1, 0]
    assert windows[0]["latency_ms"]["p50"] == 5.0 and windows[1]["latency_ms"]["max"] == 7.0
    assert windows[0]["rss_mb"] == {"last": 2.0, "max": 2.0} and windows[1]["rss_mb"]["max"] == 3.0
    assert windows[1]["node_frames"] == {"received": 3, "processed": 2, "dropped_stale": 1}
    assert windows[0]["node_frames"] == {}
    # a tail shorter than half a window (the frames past the target) joins the one before it
    tail = SoakRecord(outputs=[(t * ms, 1.0) for t in range(1, 10)])
    assert [w["frames_out"] for w in soak_windows(tail, start_ns=0, window=4)] == [4, 5]
    assert [w["frames_out"] for w in soak_windows(tail, start_ns=0, window=3)] == [3, 3, 3]


def test_rss_of_this_process() -> None:
    import os

    assert read_rss_kb(os.getpid()) > 1024  # a Python with numpy loaded is well over 1 MB


def test_soak_wants_bag_and_model_together(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["soak", "--bag", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "--bag and --model together" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_short_soak_through_the_node_process(tmp_path: Path) -> None:
    frames, warmup, window = 60, 20, 20
    rc = cli(["soak", "--frames", str(frames), "--warmup", str(warmup), "--window", str(window),
              "--rate", "8", "--out", str(tmp_path), "--param", "device:=cpu"])
    result = json.loads((tmp_path / "soak.json").read_text())
    verdict, totals = result["verdict"], result["totals"]
    assert rc == (0 if verdict["ok"] else 1)  # a short run on a busy machine may fail p99
    assert "random" in result["model_weights"] and "--frames 60" in result["command"]
    assert totals["frames_out"] >= frames and totals["loops"] >= 1  # 20-frame bag, looped
    assert totals["frames_in"] == totals["frames_out"] + totals["dropped"] - totals["late_outputs"]
    windows = result["windows"]
    assert len(windows) >= frames // window
    assert sum(w["frames_out"] for w in windows) == totals["frames_out"]
    assert all(w["latency_ms"]["p50"] > 0 and w["rss_mb"]["max"] > 0 for w in windows[1:])
    samples = result["rss_samples"]
    assert len(samples) >= 2 and all(s[2] > 0 for s in samples)
    # the JSON's growth is the documented rule applied to its own samples
    base = max(s[2] for s in samples if warmup - window <= s[1] <= warmup)
    after = [s[2] for s in samples if s[1] > warmup]
    if after:
        peak = max(after[-max(1, len(after) // 4):])
        assert verdict["rss_growth"] == pytest.approx((peak - base) / base, abs=1e-3)
    png = Path(result["plot"])
    assert png == tmp_path / "soak.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 500 and image.size[1] > 400
