"""The fuzz harness (a small sample of what ``make fuzz`` runs) and one regression test per
hostile input class: declared sizes checked against the buffer before allocating, numpy's
limits, CameraInfo ROIs that projection refuses."""

from __future__ import annotations

import io
import json
import mmap
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image as PILImage

from clip2scene_ros.cli import main
from clip2scene_ros.codecs import (
    camera_info_to_model,
    decode_compressed_image,
    decode_pointcloud2,
    encode_compressed_image,
    encode_image,
    encode_pointcloud2,
    model_to_camera_info,
)
from clip2scene_ros.codecs.messages import rosbags_factory
from clip2scene_ros.errors import MessageError
from clip2scene_ros.fuzz import TYPES, run_fuzz
from clip2scene_ros.fuzz import harness as fuzz_harness
from clip2scene_ros.fuzz.common import Case, bytes_of, header, msg_class
from clip2scene_ros.fuzz.harness import STRATEGIES
from clip2scene_ros.fuzz.images import CAMERA_SIZE, jpeg_frame_offset, png_build
from clip2scene_ros.fuzz.watchdog import Watchdog
from clip2scene_ros.geometry.camera_model import CameraModel

FACTORY = rosbags_factory()
XYZI = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                 "offsets": [0, 4, 8, 12], "itemsize": 16})
S = 1_000_000_000


def _compressed(data: bytes, fmt: str) -> Any:
    return msg_class("sensor_msgs/msg/CompressedImage")(
        header=header(1_700_000_000, 0, "cam"), format=fmt, data=bytes_of(data))


def _encoded(mode: str, size: tuple[int, int], fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    PILImage.new(mode, size).save(out, format=fmt, **options)
    return out.getvalue()


def _camera_info(**change: Any) -> Any:
    K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
    msg = model_to_camera_info(CameraModel(width=640, height=480, K=K), stamp_ns=S,
                               frame_id="cam", factory=FACTORY)
    for key, value in change.items():
        setattr(msg, key, value)
    return msg


def _roi(x: int, y: int, width: int, height: int) -> Any:
    return msg_class("sensor_msgs/msg/RegionOfInterest")(
        x_offset=x, y_offset=y, width=width, height=height, do_rectify=False)


# --- the sample -------------------------------------------------------------------------------
def test_codec_sample_has_no_crash_hang_or_oversized_allocation() -> None:
    report = run_fuzz(150, node_cases=0, time_limit_s=5.0)
    assert report["ok"], json.dumps(report, indent=1)[:3000]
    assert report["node"] == "skipped: node_cases is 0"
    for type_key in TYPES:
        counts = report["types"][type_key]
        assert counts["cases"] == 150
        assert counts["crashes"] == counts["hangs"] == counts["oversized_allocations"] == 0
        assert counts["rejected"] > 0 and counts["accepted"] > 0
        assert counts["rejected"] + counts["accepted"] == 150
        assert sum(counts["rejected_fields"].values()) == counts["rejected"]


@pytest.mark.parametrize("type_key", TYPES)
def test_generated_messages_are_wire_representable(type_key: str) -> None:
    """Every case serializes to CDR, so the node-level run can deliver it as DDS would."""

    @settings(max_examples=25, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(STRATEGIES[type_key]())
    def check(case: Case) -> None:
        raw = FACTORY.typestore.serialize_cdr(case.msg, case.type_name)
        back = FACTORY.typestore.deserialize_cdr(raw, case.type_name)
        assert back.header.stamp.sec == case.msg.header.stamp.sec

    check()


def test_harness_counts_crashes_and_keeps_their_traceback(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    def broken(msg: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setitem(fuzz_harness.CHECKS, "camera_info", broken)
    report = run_fuzz(4, ["camera_info"], node_cases=0)
    counts = report["types"]["camera_info"]
    assert not report["ok"] and counts["crashes"] == 4 and counts["rejected"] == 0
    failure = counts["failures"][0]
    assert failure["what"] == "crash" and failure["error"] == "KeyError: 'a bug'"
    assert "broken" in failure["traceback"] and "width" in failure["message"]


def test_watchdog_stops_a_hang_and_measures_an_allocation() -> None:
    with Watchdog(0.2) as watchdog:
        start = time.monotonic()
        with watchdog.case() as stats:
            while True:  # a Python-level hang
                pass
        assert stats.timed_out and time.monotonic() - start < 2.0
        with watchdog.case() as stats:
            # 40 MB of fresh pages from the kernel, every page touched: a heap allocation could
            # reuse memory earlier tests freed and not raise the peak at all
            block = mmap.mmap(-1, 40 * 2**20)
            np.frombuffer(block, np.uint8)[:] = 1
            block.close()
        assert not stats.timed_out and stats.rss_growth_mb >= 30


def test_cli_writes_the_report_and_fails_on_unknown_types(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    target = tmp_path / "fuzz-report.json"
    assert main(["fuzz", "--cases", "3", "--node-cases", "0", "--types", "image,camera_info",
                 "--json", str(target)]) == 0
    report = json.loads(target.read_text())
    assert set(report["types"]) == {"image", "camera_info"}
    assert {"cases", "crashes", "hangs", "rejected"} <= set(report["types"]["image"])
    assert "fuzz PASS" in capsys.readouterr().out
    assert main(["fuzz", "--cases", "1", "--types", "laserscan"]) == 2


# --- hostile inputs, one test each --------------------------------------------------------------
@pytest.mark.parametrize("point_step", [2**31, 2**32 - 1])
def test_point_step_beyond_numpys_c_int_is_rejected(point_step: int) -> None:
    """numpy keeps itemsize in a C int: np.dtype would raise a bare ValueError."""
    msg = encode_pointcloud2(np.zeros(0, XYZI), stamp_ns=S, frame_id="lidar", factory=FACTORY)
    msg.point_step = point_step
    with pytest.raises(MessageError) as info:
        decode_pointcloud2(msg)
    assert info.value.field == "point_step"
    msg.point_step = 2**31 - 1  # the largest numpy takes: an empty cloud still decodes
    assert decode_pointcloud2(msg).dtype.itemsize == 2**31 - 1


def test_jpeg_declaring_a_huge_frame_is_rejected_before_allocating() -> None:
    """600 bytes declaring 9000x9000: libjpeg fills the missing scan in, ~1 GB and seconds."""
    data = _encoded("RGB", (16, 16), "JPEG")
    at = jpeg_frame_offset(data)
    assert at is not None
    data = data[:at + 5] + struct.pack(">HH", 9000, 9000) + data[at + 9:]
    with Watchdog(5.0) as watchdog, watchdog.case() as stats, \
            pytest.raises(MessageError, match="declares 9000x9000") as info:
        decode_compressed_image(_compressed(data, "jpeg"))
    assert info.value.kind == "CompressedImage" and info.value.field == "data"
    assert stats.rss_growth_mb < 16 and stats.seconds < 1.0


def test_png_declaring_more_pixels_than_deflate_can_hold_is_rejected() -> None:
    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    data = png_build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 100)), (b"IEND", b"")])
    with pytest.raises(MessageError, match="declares 9000x9000 png"):
        decode_compressed_image(_compressed(data, "png"))


def test_arithmetic_coded_jpeg_is_rejected() -> None:
    data = _encoded("RGB", (16, 16), "JPEG")
    at = jpeg_frame_offset(data)
    assert at is not None and data[at + 1] == 0xC0
    arithmetic = data[:at + 1] + b"\xc9" + data[at + 2:]  # SOF9: extended, arithmetic
    with pytest.raises(MessageError, match="arithmetic"):
        decode_compressed_image(_compressed(arithmetic, "jpeg"))


@pytest.mark.parametrize(("mode", "fmt", "options"), [
    ("RGB", "PNG", {"optimize": True}),  # ~340 pixels per byte: deflate's bound is 344
    ("L", "JPEG", {"quality": 5, "optimize": True}),
    ("RGB", "JPEG", {"quality": 5, "optimize": True, "progressive": True}),
])
def test_the_most_compressible_real_images_still_decode(mode: str, fmt: str,
                                                        options: dict[str, Any]) -> None:
    data = _encoded(mode, (1920, 1080), fmt, **options)
    assert decode_compressed_image(_compressed(data, fmt.lower())).shape == (1080, 1920, 3)


@pytest.mark.parametrize(("roi", "field"), [
    (_roi(640, 0, 0, 0), "roi"),  # zero width: "to the sensor's edge", from past the edge
    (_roi(0, 480, 10, 0), "roi"),
    (_roi(600, 0, 100, 10), "roi"),
])
def test_roi_that_projection_refuses_is_rejected(roi: Any, field: str) -> None:
    """A zero ROI size must stop at the codec, not raise ValueError in the node's image_size."""
    with pytest.raises(MessageError) as info:
        camera_info_to_model(_camera_info(roi=roi))
    assert info.value.field == field


def test_binning_that_leaves_no_pixel_is_rejected() -> None:
    with pytest.raises(MessageError) as info:
        camera_info_to_model(_camera_info(binning_x=1024))
    assert info.value.field == "binning_x/binning_y"
    assert camera_info_to_model(_camera_info(binning_x=2, binning_y=2)).binning_x == 2


# --- node level (rclpy) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_driver(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")
    from clip2scene_ros.fuzz.node import NodeDriver

    driver = NodeDriver(tmp_path_factory.mktemp("fuzz-node"), domain_id=88)
    yield driver
    driver.close()


def test_node_counts_each_bad_message_and_labels_the_next_good_one(node_driver: Any) -> None:
    health = node_driver.pipeline.health
    stamp = 1_700_000_000 * S
    cloud = encode_pointcloud2(np.ones(10, XYZI), stamp_ns=stamp, frame_id="lidar",
                               factory=FACTORY)
    cloud.data = cloud.data[:-5]  # truncated
    image = encode_image(np.zeros((CAMERA_SIZE[1], CAMERA_SIZE[0], 3), np.uint8), "rgb8",
                         stamp_ns=stamp, frame_id="cam", factory=FACTORY)
    image.step = 7  # shorter than a row
    info = _camera_info(roi=_roi(640, 0, 0, 0))  # a ROI projection refuses
    cases = [("pointcloud2", Case("sensor_msgs/msg/PointCloud2", cloud, ()), "PointCloud2"),
             ("image", Case("sensor_msgs/msg/Image", image, ()), "Image"),
             ("camera_info", Case("sensor_msgs/msg/CameraInfo", info, ()), "CameraInfo")]
    for type_key, case, kind in cases:
        before = health.bad[kind]
        outcome = node_driver.run(type_key, case, "rejected")
        assert (outcome.verdict, outcome.problem) == ("counted", None), outcome
        assert health.bad[kind] == before + 1
    assert node_driver.pipeline.camera_state["cam"] == "ok"  # the good set after each


def test_node_uses_a_valid_compressed_image(node_driver: Any) -> None:
    rgb = np.full((CAMERA_SIZE[1], CAMERA_SIZE[0], 3), 90, np.uint8)
    msg = encode_compressed_image(rgb, "png", stamp_ns=1_700_000_000 * S, frame_id="cam",
                                  factory=FACTORY)
    outcome = node_driver.run("compressed_image", Case("sensor_msgs/msg/CompressedImage", msg,
                                                       ()), "accepted")
    assert (outcome.verdict, outcome.problem) == ("used", None)


def test_node_sample_through_the_pipeline() -> None:
    pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")
    report = run_fuzz(5, node_cases=5, time_limit_s=5.0)
    assert report["ok"], json.dumps(report, indent=1)[:3000]
    for type_key in TYPES:
        node = report["types"][type_key]["node"]
        assert node["cases"] == 5 and not node.get("broken_expectations")
        assert sum(v for k, v in node.items() if k not in ("cases", "recovered_on_second_set")
                   ) == 5  # each case got one verdict


def test_stacked_size_mutations_stay_within_uint32() -> None:
    """A size mutation after another that already made the size huge stays a uint32 (the wire
    type): hypothesis once drew ``huge_declared`` then ``step`` and got step = 2**32."""
    from clip2scene_ros.fuzz.clouds import _mutate
    from clip2scene_ros.fuzz.common import U32
    from clip2scene_ros.fuzz.images import _mutate_image

    for seed in range(200):
        rng = np.random.default_rng(seed)
        image = {"height": 4, "width": 4, "step": 8, "data": b"\0" * 32}
        for mutation in ("huge_declared", "step", "step", "height", "width"):
            _mutate_image(image, mutation, rng)
        cloud = {"height": 1, "width": 4, "point_step": 16, "row_step": 64, "fields": [],
                 "data": b"\0" * 64, "is_bigendian": False, "is_dense": True}
        for mutation in ("huge_declared", "point_step", "point_step", "row_step", "width"):
            _mutate(cloud, mutation, rng)
        sizes = [image[k] for k in ("height", "width", "step")]
        sizes += [cloud[k] for k in ("height", "width", "point_step", "row_step")]
        assert all(0 <= s <= U32 for s in sizes), (seed, image, cloud)
