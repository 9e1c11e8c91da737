"""The ``clip2scene`` command line: sample → inspect → JSON, codec bench, one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros import cli
from clip2scene_ros.bench.codecs import TARGETS_MS


def test_sample_then_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bag = tmp_path / "drive"
    assert cli.main(["sample", "--out", str(bag), "--frames", "2", "--seed", "3"]) == 0
    assert "2 frames" in capsys.readouterr().out
    report_path = tmp_path / "out" / "inspect.json"
    assert cli.main(["inspect", "--bag", str(bag), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["detected"]["lidar"] == "/velodyne_points"
    assert set(report["pairs"]) == {"camera_front", "camera_left"}
    assert len(report["frames"]) == 2 and report["problems"] == []
    assert report["pairs_total"] == sum(report["pairs"].values()) > 0
    assert f"{report['pairs_total']} pairs" in printed


def test_inspect_json_to_stdout_prints_only_json(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bag = tmp_path / "drive"
    cli.main(["sample", "--out", str(bag), "--frames", "1"])
    capsys.readouterr()
    assert cli.main(["inspect", "--bag", str(bag), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"][0]["num_points"] > 0


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--bag", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip2scene inspect: error:") and "\n" not in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert cli.main(["sample", "--out", str(tmp_path / "taken")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_bench_codecs_json(tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    assert cli.main(["bench", "codecs", "--points", "2000", "--repeat", "2",
                     "--json", str(target)]) == 0
    result = json.loads(target.read_text())
    for key in ("decode_ms", "encode_ms", "points", "memcpy_ms", "decode_vs_memcpy"):
        assert key in result
    assert result["points"] == 2000 and result["targets_ms"] == TARGETS_MS
    assert result["decode_ms"] > 0 and result["encode_ms"] > 0


def test_bench_refuses_to_time_a_wrong_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    import clip2scene_ros.bench.codecs as bench

    monkeypatch.setattr(bench, "decode_xyz", lambda msg: np.zeros((1, 3), np.float32))
    with pytest.raises(RuntimeError, match="wrong points"):
        bench.bench_codecs(points=500, repeat=1)
