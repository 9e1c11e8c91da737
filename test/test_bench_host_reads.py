"""``bench.host_reads``: a frame's host reads through the Predictor, and their bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_sparse_host_reads import SPVCNN_READS

from clip2scene_ros.bench import host_reads
from clip2scene_ros.frame import Frame

#: Predictor.host_syncs of a frame: the engine's reads, then the logits back once.
PREDICT_READS = SPVCNN_READS + 1


def synthetic_frame(n: int, seed: int) -> Frame:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-40, -40, -3], [40, 40, 3], (n, 3)).astype(np.float32)
    return Frame(stamp_ns=1, frame_id="lidar", xyz=xyz,
                 intensity=rng.uniform(0, 255, n).astype(np.float32), pose=np.eye(4))


def test_a_frame_reads_the_device_back_at_most_the_inherent_times() -> None:
    report = host_reads.host_reads_frame(synthetic_frame(20_000, 0), cr=0.25)
    assert report["host_syncs"] <= PREDICT_READS, report["sites"]
    engine = {site: n for site, n in report["sites"].items() if "/sparse/" in site}
    assert report["engine"] == sum(engine.values()) <= SPVCNN_READS, engine
    assert sum(report["by_method"].values()) == sum(report["sites"].values())


def test_the_keyframe_stays_at_the_count(nuscenes_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reads.json"
    assert host_reads.main(["--bag", str(nuscenes_dir / "bag_mcap"), "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["points"] == 34_688 and printed["host_syncs"] <= PREDICT_READS


def test_the_onnx_path_plan_reads_once_per_pool(tmp_path: Path) -> None:
    """onnxruntime's geometry is the plan: its input check and one read per pool (SPVCNN
    pools at three strides); the backend's own host arrays are not the engine's."""
    report = host_reads.host_reads_frame(synthetic_frame(5000, 1), backend="onnxruntime",
                                         cr=0.25)
    assert report["engine"] == 1 + 3, report["sites"]
