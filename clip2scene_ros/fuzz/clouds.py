"""Malformed and adversarial ``sensor_msgs/PointCloud2`` messages.

A case starts from a real driver layout (Velodyne, Ouster, Hesai, Livox, ...) filled with point
values that include NaN/Inf and out-of-range numbers, then applies zero to three mutations: wrong
``point_step``/``row_step``, truncated or padded data, overlapping or duplicated fields, unknown
datatypes, absurd counts and offsets, huge declared sizes against a small buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from hypothesis import strategies as st

from ..codecs.pointcloud2 import POINTFIELD_DTYPES
from .common import (
    ABSURD_SIZES,
    SEEDS,
    U32,
    Case,
    between,
    bytes_of,
    headers,
    msg_class,
    mutations,
    pick,
    special_floats,
    weird_text,
)

TYPE = "sensor_msgs/msg/PointCloud2"
Field = tuple[str, int, int, int]  # name, datatype, offset, count
_XYZ: tuple[Field, ...] = (("x", 7, 0, 1), ("y", 7, 4, 1), ("z", 7, 8, 1))

#: Driver layouts: point_step and fields.
LAYOUTS: dict[str, tuple[int, tuple[Field, ...]]] = {
    "xyz": (12, _XYZ),
    "xyzi": (16, (*_XYZ, ("intensity", 7, 12, 1))),
    "velodyne": (22, (*_XYZ, ("intensity", 7, 12, 1), ("ring", 4, 16, 1), ("time", 7, 18, 1))),
    "ouster": (48, (*_XYZ, ("intensity", 7, 16, 1), ("t", 6, 20, 1), ("reflectivity", 4, 24, 1),
                    ("ring", 4, 26, 1), ("ambient", 4, 28, 1), ("range", 6, 32, 1))),
    "hesai": (24, (*_XYZ, ("intensity", 2, 12, 1), ("ring", 4, 14, 1),
                   ("timestamp", 8, 16, 1))),
    "livox": (26, (*_XYZ, ("intensity", 7, 12, 1), ("tag", 2, 16, 1), ("line", 2, 17, 1),
                   ("timestamp", 8, 18, 1))),
    "xyz64": (24, (("x", 8, 0, 1), ("y", 8, 8, 1), ("z", 8, 16, 1))),
    "int16": (6, (("x", 3, 0, 1), ("y", 3, 2, 1), ("z", 3, 4, 1))),
    "rgb": (32, (*_XYZ, ("rgb", 7, 16, 1))),
    "no_xyz": (8, (("a", 7, 0, 1), ("intensity", 7, 4, 1))),
    "vector_z": (16, (*_XYZ[:2], ("z", 7, 8, 2))),  # a coordinate with count 2
    "vector_ring": (20, (*_XYZ, ("intensity", 7, 12, 1), ("ring", 4, 16, 2))),
    "empty": (4, ()),
}

MUTATIONS = ("point_step", "row_step", "height", "width", "huge_declared", "truncate", "extend",
             "empty_data", "overlap", "duplicate_name", "datatype", "count", "offset",
             "empty_name", "weird_name", "endianness")

_LAYOUT_NAMES = st.sampled_from([*sorted(LAYOUTS), "wide"])
_HEIGHTS = st.sampled_from((1, 1, 1, 0, 2, 3, 8))
_PADS = st.sampled_from((0, 0, 0, 1, 4, 13))


def _wide_layout(k: int) -> tuple[int, tuple[Field, ...]]:
    """xyz plus ``k`` uint8 fields: an absurd but valid field count."""
    extra = tuple((f"f{i}", 2, 12 + i, 1) for i in range(k))
    return 12 + k, (*_XYZ, *extra)


def _dtype(point_step: int, fields: tuple[Field, ...], big: bool) -> np.dtype:
    order: Literal[">", "<"] = ">" if big else "<"
    formats: list[Any] = [(POINTFIELD_DTYPES[f[1]].newbyteorder(order), (f[3],)) if f[3] > 1
                          else POINTFIELD_DTYPES[f[1]].newbyteorder(order) for f in fields]
    return np.dtype({
        "names": [f[0] for f in fields],
        "formats": formats,
        "offsets": [f[2] for f in fields],
        "itemsize": point_step,
    })


def _payload(rng: np.random.Generator, dtype: np.dtype, height: int, width: int, pad: int,
             stamp_s: float) -> bytes:
    """The points, row by row, each row followed by ``pad`` bytes of padding.

    Random bytes (any integer, any padding), then float fields overwritten with mostly plausible
    values and NaN/Inf/huge ones, and absolute times near the stamp.
    """
    n = height * width
    cloud = np.frombuffer(rng.bytes(n * dtype.itemsize), dtype).copy()
    layout: Mapping[str, tuple[Any, ...]] = dtype.fields or {}
    for name in dtype.names or ():
        base = layout[name][0].base
        if name == "timestamp" and rng.random() < 0.7:  # absolute, in s, ms, us or ns
            scale = rng.choice([1.0, 1e3, 1e6, 1e9])
            cloud[name] = (stamp_s + rng.uniform(0, 0.1, n)) * scale
        elif base.kind == "f":
            cloud[name] = special_floats(rng, cloud[name].size, base).reshape(cloud[name].shape)
    rows = cloud.view(np.uint8).reshape(height, width * dtype.itemsize)
    return np.concatenate([rows, np.zeros((height, pad), np.uint8)], axis=1).tobytes()


@st.composite
def pointcloud2_cases(draw: st.DrawFn) -> Case:
    head, tags = draw(headers())
    name = draw(_LAYOUT_NAMES)
    point_step, fields = (_wide_layout(draw(st.integers(50, 1000))) if name == "wide"
                          else LAYOUTS[name])
    big = draw(st.integers(0, 4)) == 0
    height = draw(_HEIGHTS)
    width = draw(st.integers(0, 64))
    pad = draw(_PADS)
    rng = np.random.default_rng(draw(SEEDS))
    stamp_s = head.stamp.sec + head.stamp.nanosec * 1e-9
    data = _payload(rng, _dtype(point_step, fields, big), height, width, pad, stamp_s)
    msg: dict[str, Any] = {
        "height": height, "width": width, "point_step": point_step,
        "row_step": width * point_step + pad, "is_bigendian": big,
        "is_dense": bool(rng.integers(2)),
        "fields": [list(f) for f in fields], "data": data,
    }
    tags = (*tags, f"layout:{name}")
    for mutation in mutations(rng, MUTATIONS):
        if _mutate(msg, mutation, rng):
            tags = (*tags, mutation)
    field_cls = msg_class("sensor_msgs/msg/PointField")
    return Case(TYPE, msg_class(TYPE)(
        header=head, height=msg["height"], width=msg["width"],
        fields=[field_cls(name=n, offset=o, datatype=d, count=c) for n, d, o, c in msg["fields"]],
        is_bigendian=msg["is_bigendian"], point_step=msg["point_step"],
        row_step=msg["row_step"], data=bytes_of(msg["data"]), is_dense=msg["is_dense"]), tags)


def _mutate(msg: dict[str, Any], mutation: str, rng: np.random.Generator) -> bool:
    """Apply one mutation in place; False where it does not apply (e.g. no fields)."""
    fields = msg["fields"]
    step = msg["point_step"]
    if mutation == "point_step":
        # clamped to uint32 (the wire type): earlier mutations may have made the sizes huge
        msg["point_step"] = pick(rng, (*ABSURD_SIZES, 0, 1, max(0, step - 1),
                                       *(min(U32, s) for s in (step + 1, 2 * step))))
    elif mutation == "row_step":
        row = msg["width"] * step
        msg["row_step"] = pick(rng, (*ABSURD_SIZES, 0, min(U32, max(0, row - 1)),
                                     *(min(U32, r) for r in (row + 1, row + 7))))
    elif mutation in ("height", "width"):
        msg[mutation] = pick(rng, (*ABSURD_SIZES, min(U32, msg[mutation] + 1)))
    elif mutation == "huge_declared":  # consistent header, tiny buffer
        msg["height"], msg["width"] = pick(rng, ABSURD_SIZES), pick(rng, ABSURD_SIZES)
        msg["point_step"] = pick(rng, (step, 2**16, 2**31 - 1))
        msg["row_step"] = min(U32, msg["width"] * msg["point_step"])
    elif mutation == "truncate":
        msg["data"] = msg["data"][:between(rng, 0, max(0, len(msg["data"]) - 1))]
    elif mutation == "extend":
        msg["data"] += rng.bytes(between(rng, 1, 64))
    elif mutation == "empty_data":
        msg["data"] = b""
    elif mutation == "endianness":
        msg["is_bigendian"] = not msg["is_bigendian"]
    elif not fields:
        return False
    else:
        field, other = pick(rng, fields), pick(rng, fields)
        if mutation == "overlap":
            field[2] = min(U32, other[2] + between(rng, 0, 3))
        elif mutation == "duplicate_name":
            field[0] = other[0]
        elif mutation == "datatype":
            field[1] = pick(rng, (0, 9, 255, between(rng, 0, 255)))
        elif mutation == "count":
            field[3] = pick(rng, (0, 2, 3, 2**31 - 1, 2**31, U32))
        elif mutation == "offset":
            field[2] = pick(rng, (step, max(0, step - 1), 2**31, U32))
        elif mutation == "empty_name":
            field[0] = ""
        elif mutation == "weird_name":
            field[0] = weird_text(rng)
    return True
