"""PointCloud2 codec: random layouts against an independent struct-based reader, both message
flavours and CDR, zero-copy views, driver layouts, the labelled output cloud, malformed input."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip2scene_ros.codecs import (
    UNKNOWN_LABEL,
    decode_pointcloud2,
    decode_xyz,
    encode_labelled_cloud,
    encode_pointcloud2,
    lidar_points,
    pack_rgb,
    unpack_rgb,
)
from clip2scene_ros.codecs.messages import RclpyFactory, rosbags_factory
from clip2scene_ros.errors import MessageError

STRUCT = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d"}
FACTORIES = [rosbags_factory(), RclpyFactory()]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Field:
    def __init__(self, name: str, offset: int, datatype: int, count: int) -> None:
        self.name, self.offset, self.datatype, self.count = name, offset, datatype, count


class Msg:
    """A PointCloud2 built by hand (no codec involved), readable by duck typing."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, Any]:
    n_fields = draw(st.integers(1, 5))
    fields, offset = [], 0
    for i in range(n_fields):
        offset += draw(st.integers(0, 3))  # padding before the field
        datatype, count = draw(st.integers(1, 8)), draw(st.integers(1, 3))
        fields.append(Field(f"f{i}", offset, datatype, count))
        offset += struct.calcsize(STRUCT[datatype]) * count
    point_step = offset + draw(st.integers(0, 4))
    height, width = draw(st.integers(1, 3)), draw(st.integers(0, 5))
    row_step = width * point_step + draw(st.sampled_from([0, 0, 3]))
    big = draw(st.booleans())
    data = bytearray(draw(st.binary(min_size=height * row_step, max_size=height * row_step)))
    return {"fields": fields, "point_step": point_step, "height": height, "width": width,
            "row_step": row_step, "is_bigendian": big, "data": bytes(data), "is_dense": False}


def struct_read(m: dict[str, Any]) -> list[dict[str, tuple]]:
    """Reference reader: one struct.unpack per field per point."""
    order = ">" if m["is_bigendian"] else "<"
    out = []
    for row in range(m["height"]):
        for col in range(m["width"]):
            base = row * m["row_step"] + col * m["point_step"]
            out.append({f.name: struct.unpack_from(f"{order}{f.count}{STRUCT[f.datatype]}",
                                                   m["data"], base + f.offset)
                        for f in m["fields"]})
    return out


def assert_same(decoded: np.ndarray, reference: list[dict[str, tuple]]) -> None:
    assert decoded.shape == (len(reference),)
    for point, ref in zip(decoded, reference, strict=True):
        for name, values in ref.items():
            got = np.atleast_1d(point[name])
            np.testing.assert_array_equal(got, np.array(values, dtype=got.dtype))


@SETTINGS
@given(layouts())
def test_any_layout_decodes_like_struct(layout: dict[str, Any]) -> None:
    msg = Msg(**layout)
    assert_same(decode_pointcloud2(msg), struct_read(layout))
    organized = decode_pointcloud2(msg, organized=True)
    assert organized.shape == (layout["height"], layout["width"])


@SETTINGS
@given(layouts(), st.sampled_from(FACTORIES))
def test_round_trip_through_encode_and_cdr(layout: dict[str, Any], factory: Any) -> None:
    cloud = decode_pointcloud2(Msg(**layout), organized=True)
    msg = encode_pointcloud2(cloud.reshape(-1), stamp_ns=7, frame_id="lidar", factory=factory,
                             height=layout["height"])
    assert msg.point_step == layout["point_step"] and bool(msg.is_bigendian) == \
        (layout["is_bigendian"] and any(f.datatype > 2 for f in layout["fields"]))
    if factory.flavour == "rosbags":
        store = factory.typestore
        msg = store.deserialize_cdr(store.serialize_cdr(msg, "sensor_msgs/msg/PointCloud2"),
                                    "sensor_msgs/msg/PointCloud2")
    else:
        from rclpy.serialization import deserialize_message, serialize_message
        from sensor_msgs.msg import PointCloud2

        msg = deserialize_message(serialize_message(msg), PointCloud2)
    again = decode_pointcloud2(msg)
    assert again.dtype.names == cloud.dtype.names
    flat = np.ascontiguousarray(cloud.reshape(-1))
    assert np.ascontiguousarray(again).tobytes() == flat.tobytes()


def test_decode_is_a_read_only_view() -> None:
    cloud = np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    msg = encode_pointcloud2(cloud, stamp_ns=0, frame_id="l", factory=rosbags_factory())
    view = decode_pointcloud2(msg)
    assert np.shares_memory(view, msg.data) and not view.flags.writeable


VELODYNE = np.dtype({"names": ["x", "y", "z", "intensity", "ring", "time"],
                     "formats": ["<f4"] * 4 + ["<u2", "<f4"],
                     "offsets": [0, 4, 8, 12, 16, 18], "itemsize": 22})
OUSTER = np.dtype({"names": ["x", "y", "z", "intensity", "t", "reflectivity", "ring"],
                   "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2", "<u2"],
                   "offsets": [0, 4, 8, 16, 20, 24, 26], "itemsize": 48})
HESAI = np.dtype({"names": ["x", "y", "z", "intensity", "ring", "timestamp"],
                  "formats": ["<f4", "<f4", "<f4", "u1", "<u2", "<f8"],
                  "offsets": [0, 4, 8, 12, 14, 16], "itemsize": 24})
LIVOX = np.dtype({"names": ["x", "y", "z", "intensity", "tag", "line", "timestamp"],
                  "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "u1", "<f8"],
                  "offsets": [0, 4, 8, 12, 16, 17, 18], "itemsize": 26})
STAMP_NS = 1_700_000_000_250_000_000


@pytest.mark.parametrize(("dtype", "time_field", "time_values"), [
    (VELODYNE, "time", [0.0, 0.05]),
    (OUSTER, "t", [0, 50_000_000]),
    (HESAI, "timestamp", [STAMP_NS * 1e-9, STAMP_NS * 1e-9 + 0.05]),
    (LIVOX, "timestamp", [float(STAMP_NS), STAMP_NS + 5e7]),
])
def test_driver_layouts(dtype: np.dtype, time_field: str, time_values: list) -> None:
    cloud = np.zeros(3, dtype=dtype)
    cloud["x"] = [1.0, np.nan, 3.0]  # a non-dense cloud: point 1 is invalid
    cloud["intensity"] = [10, 20, 30]
    cloud["ring" if "ring" in dtype.names else "line"] = [1, 2, 3]
    cloud[time_field] = [time_values[0], 0, time_values[1]]
    msg = encode_pointcloud2(cloud, stamp_ns=STAMP_NS, frame_id="l", factory=rosbags_factory())
    assert not msg.is_dense
    points = lidar_points(decode_pointcloud2(msg), stamp_ns=STAMP_NS)
    assert points.index.tolist() == [0, 2]
    assert points.xyz[:, 0].tolist() == [1.0, 3.0]
    assert points.intensity.tolist() == [10.0, 30.0] and points.ring.tolist() == [1, 3]
    np.testing.assert_allclose(points.time, [0.0, 0.05], atol=2e-6)
    np.testing.assert_array_equal(decode_xyz(msg), points.xyz)


def test_absolute_time_needs_the_stamp() -> None:
    cloud = np.zeros(1, dtype=HESAI)
    assert lidar_points(cloud).time is None


def test_labelled_cloud() -> None:
    xyz = np.arange(6, dtype=np.float32).reshape(2, 3)
    rgb = np.array([[255, 0, 1], [7, 128, 255]], np.uint8)
    label = np.array([3, UNKNOWN_LABEL], np.uint16)
    for factory in FACTORIES:
        msg = encode_labelled_cloud(xyz, None, label, np.array([0.5, 0.0], np.float32), rgb,
                                    stamp_ns=5, frame_id="lidar", factory=factory)
        assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "label", "score",
                                                "rgb"]
        cloud = decode_pointcloud2(msg)
        assert cloud["label"].tolist() == [3, 65535] and cloud["intensity"].tolist() == [0, 0]
        np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), rgb)
    assert pack_rgb(rgb[:1]).view(np.uint32)[0] == 0xFF0001
    with pytest.raises(ValueError, match="label must be"):
        encode_labelled_cloud(xyz, None, label[:1], label, rgb, stamp_ns=0, frame_id="l",
                              factory=rosbags_factory())


def valid() -> dict[str, Any]:
    return {"fields": [Field("x", 0, 7, 1), Field("y", 4, 7, 1), Field("z", 8, 7, 1)],
            "point_step": 12, "height": 1, "width": 2, "row_step": 24, "is_bigendian": False,
            "data": bytes(24), "is_dense": True}


@pytest.mark.parametrize(("change", "field"), [
    ({"point_step": 8}, "fields[2].offset"),
    ({"point_step": 0}, "point_step"),
    ({"row_step": 20}, "row_step"),
    ({"data": bytes(23)}, "data"),
    ({"data": bytes(25)}, "data"),
    ({"width": 3}, "row_step"),
    ({"height": -1}, "height/width"),
    ({"fields": [Field("x", 0, 9, 1)]}, "fields[0].datatype"),
    ({"fields": [Field("x", 0, 7, 0)]}, "fields[0].count"),
    ({"fields": [Field("x", 0, 7, 1), Field("x", 4, 7, 1)]}, "fields[1].name"),
    ({"fields": [Field("x", 0, 7, 1), Field("y", 2, 7, 1)]}, "fields"),
    ({"fields": [Field("", 0, 7, 1)]}, "fields[0].name"),
    ({"fields": [Field("x", -4, 7, 1)]}, "fields[0].offset"),
    ({"data": 12345}, "data"),
])
def test_malformed_messages_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_pointcloud2(Msg(**{**valid(), **change}))
    assert info.value.field == field and info.value.kind == "PointCloud2"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["point_step", "row_step", "width", "height"]), st.integers(-5, 40),
       st.integers(0, 2), st.sampled_from(["offset", "datatype", "count"]), st.integers(-3, 30),
       st.integers(0, 40))
def test_fuzzed_layouts_decode_or_raise_message_error(
    key: str, value: int, field_index: int, attr: str, field_value: int, size: int
) -> None:
    m = valid()
    m[key] = value
    setattr(m["fields"][field_index], attr, field_value)
    m["data"] = bytes(size)
    try:
        cloud = decode_pointcloud2(Msg(**m))
    except MessageError:
        return
    assert cloud.size == m["height"] * m["width"]  # what decodes is the declared size
    decode_xyz(Msg(**m))


def test_parity_with_sensor_msgs_py_where_installed() -> None:
    point_cloud2 = pytest.importorskip(
        "sensor_msgs_py.point_cloud2", reason="sensor_msgs_py comes with a ROS install only")
    cloud = np.zeros(5, dtype=VELODYNE)
    cloud["x"], cloud["ring"], cloud["time"] = np.arange(5), np.arange(5) * 3, 0.01
    msg = encode_pointcloud2(cloud, stamp_ns=1, frame_id="l", factory=RclpyFactory())
    theirs = point_cloud2.read_points_numpy(msg, field_names=("x", "y", "z"))
    np.testing.assert_array_equal(decode_xyz(msg), theirs)
    structured = point_cloud2.read_points(msg)
    assert structured["ring"].tolist() == decode_pointcloud2(msg)["ring"].tolist()
