"""Node health bookkeeping: throttled logs, per-period WARN, ERROR on silence, percentiles."""

from __future__ import annotations

import pytest

from clip2scene_ros.health import Health


def test_logging_is_throttled_per_kind_and_reports_what_it_suppressed() -> None:
    h = Health(log_throttle_s=5.0)
    assert h.should_log("PointCloud2", 0.0) == (True, 0)
    assert h.should_log("PointCloud2", 1.0) == (False, 0)
    assert h.should_log("PointCloud2", 2.0) == (False, 0)
    assert h.should_log("Image", 2.0) == (True, 0)  # kinds are independent
    assert h.should_log("PointCloud2", 5.0) == (True, 2)
    assert h.should_log("PointCloud2", 6.0) == (False, 0)


def test_bad_messages_warn_for_one_period_and_stay_counted() -> None:
    h = Health()
    h.frame("received", 0.0)
    h.frame("processed", 0.0)
    assert h.status(0.1).level == "OK"
    h.bad_message("PointCloud2")
    h.bad_message("PointCloud2")
    h.bad_message("CameraInfo")
    status = h.status(0.2)
    assert status.level == "WARN"
    assert status.message == "bad messages: CameraInfo 1, PointCloud2 2"
    assert status.values["bad_PointCloud2"] == "2"
    h.frame("received", 0.25)
    h.frame("processed", 0.25)
    later = h.status(0.3)
    assert later.level == "OK" and later.values["bad_PointCloud2"] == "2"


def test_dropped_frames_and_slow_processing_warn() -> None:
    h = Health(warn_processing_ms=200.0)
    h.frame("received", 0.0)
    h.frame("processed", 0.0)
    h.frame("dropped_stale", 0.0)
    assert "1 stale frames dropped" in h.status(0.1).message
    h.latency("total", 250.0)
    status = h.status(0.2)
    assert status.level == "WARN" and "processing 250 ms > 200 ms" in status.message


def test_error_when_clouds_arrive_but_nothing_comes_out() -> None:
    h = Health(error_silence_s=1.0)
    h.frame("received", 0.0)
    h.frame("processed", 0.0)
    h.frame("received", 1.4)
    status = h.status(1.5)
    assert status.level == "ERROR" and status.message.startswith("no labelled cloud")
    # no input at all is not the node's fault: OK, not ERROR
    assert h.status(10.0).level == "OK"


def test_latency_percentiles_over_a_window() -> None:
    h = Health(window=100)
    for ms in range(1, 201):
        h.latency("inference", float(ms))
    p = h.percentiles("inference")
    assert p["max"] == 200.0 and p["p50"] == pytest.approx(150.5)
    assert h.status(0.0).values["inference_ms_p99"] == f"{p['p99']:.2f}"
    assert h.percentiles("total") == {}
    with pytest.raises(ValueError, match="unknown latency stage"):
        h.latency("decode", 1.0)


def test_dropped_points_are_counted_by_reason() -> None:
    health = Health()
    health.points_dropped("non_finite", 3)
    health.points_dropped("non_finite", 2)
    health.points_dropped("out_of_range", 0)
    values = health.status(0.0).values
    assert values["points_dropped_non_finite"] == "5"
    assert "points_dropped_out_of_range" not in values
