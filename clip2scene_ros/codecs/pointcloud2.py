"""``sensor_msgs/PointCloud2`` ↔ numpy structured arrays, zero-copy, for any point layout.

The message's ``fields`` become a numpy structured dtype whose ``itemsize`` is ``point_step`` and
whose offsets are the fields' offsets, so the payload is viewed in place with ``np.frombuffer``
(row padding is handled with strides). Every layout rule is checked before the view is made:
a malformed message raises :class:`~clip2scene_ros.errors.MessageError` naming the field, never
an array of garbage.

sensor_msgs_py.point_cloud2 does the same job on a ROS install but is not importable without one,
copies organised clouds and does not validate layouts, so the codec layer owns this.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.lib.recfunctions import structured_to_unstructured

from ..errors import MessageError
from .messages import MessageFactory, make_header, make_with_data, new_byte_array

KIND = "PointCloud2"

#: A structured dtype's ``fields``: name -> (field dtype, byte offset[, title]).
_Layout = Mapping[str, tuple[np.dtype, int] | tuple[np.dtype, int, Any]]

#: ``sensor_msgs/PointField`` datatype constants and their numpy types (little-endian form).
POINTFIELD_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("i1"),  # INT8
    2: np.dtype("u1"),  # UINT8
    3: np.dtype("<i2"),  # INT16
    4: np.dtype("<u2"),  # UINT16
    5: np.dtype("<i4"),  # INT32
    6: np.dtype("<u4"),  # UINT32
    7: np.dtype("<f4"),  # FLOAT32
    8: np.dtype("<f8"),  # FLOAT64
}
_DATATYPE_OF = {(dt.kind, dt.itemsize): code for code, dt in POINTFIELD_DTYPES.items()}

#: Label written for points the model could not label (e.g. filtered out); RViz shows it grey.
UNKNOWN_LABEL = 65535

#: numpy keeps a dtype's itemsize and a field's element count in a C int, so a larger
#: ``point_step`` (uint32 on the wire) cannot be a dtype; no driver comes near it.
MAX_POINT_STEP = 2**31 - 1

#: The labelled output cloud of the node (and of offline prediction): x, y, z, intensity, label,
#: score, rgb. 28 bytes; ``rgb`` is packed into a float32 the way PCL and RViz read it.
LABELLED_DTYPE = np.dtype({
    "names": ["x", "y", "z", "intensity", "label", "score", "rgb"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 20, 24],
    "itemsize": 28,
})


def pointcloud2_dtype(fields: Any, point_step: int, is_bigendian: bool = False) -> np.dtype:
    """The structured dtype of one point, from a message's ``fields``; checks the layout."""
    if not 0 < point_step <= MAX_POINT_STEP:
        raise MessageError(KIND, "point_step", f"must be in [1, {MAX_POINT_STEP}], got "
                           f"{point_step}")
    order: Literal[">", "<"] = ">" if is_bigendian else "<"
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    spans: list[tuple[int, int, str]] = []
    for i, f in enumerate(fields):
        where = f"fields[{i}]"
        name = str(f.name)
        datatype, count, offset = int(f.datatype), int(f.count), int(f.offset)
        if not name:
            raise MessageError(KIND, f"{where}.name", "is empty")
        if name in names:
            raise MessageError(KIND, f"{where}.name", f"{name!r} appears twice")
        if datatype not in POINTFIELD_DTYPES:
            raise MessageError(KIND, f"{where}.datatype",
                               f"{datatype} is not a PointField type (1..8) for field {name!r}")
        if count < 1:
            raise MessageError(KIND, f"{where}.count", f"must be >= 1, got {count} ({name!r})")
        base = POINTFIELD_DTYPES[datatype].newbyteorder(order)
        end = offset + base.itemsize * count
        if offset < 0 or end > point_step:
            raise MessageError(KIND, f"{where}.offset",
                               f"field {name!r} spans bytes [{offset}, {end}) but point_step is "
                               f"{point_step}")
        names.append(name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(offset)
        spans.append((offset, end, name))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise MessageError(KIND, "fields", f"fields {first!r} and {second!r} overlap")
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": point_step})


def decode_pointcloud2(msg: Any, *, organized: bool = False) -> np.ndarray:
    """View a PointCloud2's payload as a structured array, without copying.

    Returns shape ``(height * width,)``, or ``(height, width)`` with ``organized=True``. Invalid
    points of a non-dense cloud keep their NaNs; :func:`lidar_points` drops them. The array is a
    read-only view of the message's buffer (row padding needs a copy only for the flat form).
    """
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if height < 0 or width < 0:
        raise MessageError(KIND, "height/width", f"negative size {height}x{width}")
    dtype = pointcloud2_dtype(msg.fields, point_step, bool(msg.is_bigendian))
    if row_step < width * point_step:
        raise MessageError(KIND, "row_step",
                           f"{row_step} < width * point_step = {width} * {point_step}")
    try:
        buffer = memoryview(msg.data).cast("B")
    except TypeError as exc:
        raise MessageError(KIND, "data", f"is not a byte buffer ({exc})") from exc
    expected = height * row_step
    if buffer.nbytes != expected:
        raise MessageError(KIND, "data",
                           f"has {buffer.nbytes} bytes; height * row_step = {height} * {row_step} "
                           f"= {expected}")
    if height == 0 or width == 0:
        cloud = np.zeros((height, width), dtype=dtype)
    else:
        cloud = np.ndarray((height, width), dtype=dtype, buffer=buffer,
                           strides=(row_step, point_step))
    cloud.flags.writeable = False
    return cloud if organized else cloud.reshape(-1)


def _field_spec(layout: _Layout, name: str) -> tuple[int, int, bool]:
    """(PointField datatype, count, big-endian) of one field of a structured dtype's ``fields``."""
    sub = layout[name][0]
    base, shape = (sub.subdtype if sub.subdtype is not None else (sub, ()))
    if base.fields is not None or (base.kind, base.itemsize) not in _DATATYPE_OF:
        raise MessageError(KIND, f"fields[{name!r}]",
                           f"numpy type {sub} has no PointField datatype")
    big = base.byteorder == ">" or (base.byteorder == "=" and sys.byteorder == "big")
    return _DATATYPE_OF[(base.kind, base.itemsize)], int(np.prod(shape, dtype=np.int64)), big


def encode_pointcloud2(
    cloud: np.ndarray,
    *,
    stamp_ns: int,
    frame_id: str,
    factory: MessageFactory,
    height: int = 1,
    is_dense: bool | None = None,
) -> Any:
    """A PointCloud2 (of the factory's flavour) holding the structured array ``cloud``.

    The dtype's offsets and itemsize become the fields and ``point_step`` unchanged, so a decoded
    cloud re-encodes to the same bytes. ``height > 1`` writes an organised cloud (``cloud.size``
    must divide). ``is_dense`` defaults to "no float field holds a NaN or inf".
    """
    cloud = np.asarray(cloud)
    names, layout = cloud.dtype.names, cloud.dtype.fields
    if names is None or layout is None:
        raise MessageError(KIND, "fields", f"needs a structured array, got dtype {cloud.dtype}")
    n = int(cloud.size)
    if height < 1 or n % height:
        raise MessageError(KIND, "height", f"{height} does not divide {n} points")
    return _message(cloud, np.ascontiguousarray(cloud.reshape(-1)), stamp_ns=stamp_ns,
                    frame_id=frame_id, factory=factory, height=height, is_dense=is_dense)


def _message(cloud: np.ndarray, data: Any, *, stamp_ns: int, frame_id: str,
             factory: MessageFactory, height: int, is_dense: bool | None) -> Any:
    """The PointCloud2 of the structured array ``cloud`` whose bytes are ``data`` (its
    contiguous payload, or the flavour's ``uint8[]`` value holding it)."""
    names, layout = cloud.dtype.names or (), cloud.dtype.fields
    assert layout is not None  # callers pass structured arrays
    specs = {name: _field_spec(layout, name) for name in names}
    endian = {big for code, _, big in specs.values() if POINTFIELD_DTYPES[code].itemsize > 1}
    if len(endian) > 1:
        raise MessageError(KIND, "is_bigendian", "fields mix big- and little-endian types")
    field_cls = factory("sensor_msgs/msg/PointField")
    fields = [field_cls(name=name, offset=int(layout[name][1]), datatype=code,
                        count=count) for name, (code, count, _) in specs.items()]
    if is_dense is None:
        is_dense = all(np.isfinite(cloud[name]).all() for name in names
                       if layout[name][0].base.kind == "f")
    width = int(cloud.size) // height
    point_step = cloud.dtype.itemsize
    return make_with_data(
        factory,
        "sensor_msgs/msg/PointCloud2",
        data,
        header=make_header(factory, stamp_ns, frame_id),
        height=height,
        width=width,
        fields=fields,
        is_bigendian=bool(endian and endian.pop()),
        point_step=point_step,
        row_step=point_step * width,
        is_dense=bool(is_dense),
    )


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(N, 3)`` uint8 RGB to the float32 PCL/RViz ``rgb`` field (0x00RRGGBB bit pattern)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be (N, 3) uint8, got {rgb.shape}")
    packed: np.ndarray = ((rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8)
                          | rgb[:, 2])
    return packed.view(np.float32)


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """The float32 ``rgb`` field back to ``(N, 3)`` uint8."""
    packed = np.ascontiguousarray(rgb, dtype=np.float32).view(np.uint32)
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF],
                    axis=-1).astype(np.uint8)


def encode_labelled_cloud(
    xyz: np.ndarray,
    intensity: np.ndarray | None,
    label: np.ndarray,
    score: np.ndarray,
    rgb: np.ndarray,
    *,
    stamp_ns: int,
    frame_id: str,
    factory: MessageFactory,
) -> Any:
    """The node's output cloud: x, y, z, intensity, label (uint16), score, rgb (packed float32).

    ``intensity`` None writes zeros; unlabelled points carry :data:`UNKNOWN_LABEL`. ``rgb`` is
    ``(N, 3)`` uint8 (usually the vocabulary palette indexed by label).
    """
    xyz = np.asarray(xyz)
    n = xyz.shape[0] if xyz.ndim == 2 and xyz.shape[1] == 3 else -1
    if n < 0:
        raise ValueError(f"xyz must be (N, 3), got {xyz.shape}")
    for name, value in (("intensity", intensity), ("label", label), ("score", score)):
        if value is not None and np.shape(value) != (n,):
            raise ValueError(f"{name} must be ({n},), got {np.shape(value)}")
    # The points are written straight into the message's own payload storage (zeroed, so the
    # two padding bytes after ``label`` are zeros): no second buffer and no copy of it.
    data, raw = new_byte_array(factory, n * LABELLED_DTYPE.itemsize)
    cloud = raw.view(LABELLED_DTYPE)
    cloud["x"], cloud["y"], cloud["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if intensity is not None:
        cloud["intensity"] = intensity
    cloud["label"] = label
    cloud["score"] = score
    cloud["rgb"] = pack_rgb(rgb)
    return _message(cloud, data, stamp_ns=stamp_ns, frame_id=frame_id, factory=factory,
                    height=1, is_dense=True)


# --- per-driver field names -----------------------------------------------------------------

#: Field names drivers use for the same quantity, in order of preference.
#: Velodyne (velodyne_pointcloud): intensity, ring, time (float32 s relative to the stamp).
#: Ouster (ouster-ros): intensity or signal / reflectivity, ring, t (uint32 ns relative).
#: Hesai (HesaiLidar_ROS_2.0): intensity (uint8), ring, timestamp (float64 absolute s).
#: Livox (livox_ros_driver2): intensity or reflectivity, line, offset_time (uint32 ns) or
#: timestamp (float64 absolute ns).
INTENSITY_FIELDS = ("intensity", "signal", "reflectivity", "i")
RING_FIELDS = ("ring", "line", "channel", "laser_id", "scan_id")
RELATIVE_TIME_FIELDS = {"time": 1.0, "t": 1e-9, "offset_time": 1e-9, "time_offset": 1.0}
ABSOLUTE_TIME_FIELDS = ("timestamp", "time_stamp")


@dataclass(frozen=True)
class LidarPoints:
    """The finite points of a sweep with the per-point channels the driver provides.

    ``time`` is seconds relative to the sweep stamp. ``index`` holds the positions of the kept
    points in the flat cloud, so parallel per-point data (e.g. a label cloud) can be aligned.
    """

    xyz: np.ndarray  # (N, 3) float32
    intensity: np.ndarray | None  # (N,) float32
    ring: np.ndarray | None  # (N,) uint16
    time: np.ndarray | None  # (N,) float32
    index: np.ndarray  # (N,) int64


def _first(names: tuple[str, ...] | Any, available: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in available), None)


def _scalar(cloud: np.ndarray, name: str) -> np.ndarray:
    values = cloud[name]
    if values.ndim != 1:
        raise MessageError(KIND, f"fields[{name!r}].count", "must be 1 for a per-point channel")
    return values


def _relative_time(cloud: np.ndarray, names: tuple[str, ...], stamp_ns: int | None
                   ) -> np.ndarray | None:
    name = _first(tuple(RELATIVE_TIME_FIELDS), names)
    if name is not None:
        return (_scalar(cloud, name) * RELATIVE_TIME_FIELDS[name]).astype(np.float32)
    name = _first(ABSOLUTE_TIME_FIELDS, names)
    if name is None or stamp_ns is None or cloud.size == 0:
        return None  # absolute stamps cannot be made relative without the sweep stamp
    absolute = _scalar(cloud, name).astype(np.float64)
    # Drivers write seconds, milliseconds, microseconds or nanoseconds since the epoch; the
    # magnitude tells which (any date after 1973 in seconds is > 1e8 and < 1e11).
    magnitude = float(np.nanmedian(np.abs(absolute)))
    scale = next((s for limit, s in ((1e11, 1.0), (1e14, 1e-3), (1e17, 1e-6)) if magnitude < limit),
                 1e-9)
    whole, frac = divmod(int(stamp_ns), 1_000_000_000)
    return ((absolute * scale - whole) - frac * 1e-9).astype(np.float32)


def lidar_points(cloud: np.ndarray, *, stamp_ns: int | None = None) -> LidarPoints:
    """Extract xyz, intensity, ring and relative time from a decoded cloud of any driver.

    Points with a non-finite coordinate (the NaNs of a non-dense cloud) are dropped.
    """
    flat = cloud.reshape(-1)
    names = flat.dtype.names or ()
    missing = [axis for axis in "xyz" if axis not in names]
    if missing:
        raise MessageError(KIND, "fields", f"has no {'/'.join(missing)} field (fields: "
                           f"{list(names)})")
    xyz = np.empty((flat.size, 3), dtype=np.float32)
    for i, axis in enumerate("xyz"):
        xyz[:, i] = _scalar(flat, axis)
    finite = np.isfinite(xyz).all(axis=1)
    all_finite = bool(finite.all())
    index = np.arange(flat.size, dtype=np.int64) if all_finite else np.flatnonzero(finite)

    def keep(values: np.ndarray | None, dtype: type) -> np.ndarray | None:
        if values is None:
            return None
        values = values if all_finite else values[index]
        return values.astype(dtype, copy=False)

    intensity = _first(INTENSITY_FIELDS, names)
    ring = _first(RING_FIELDS, names)
    return LidarPoints(
        xyz=xyz if all_finite else xyz[index],
        intensity=keep(None if intensity is None else _scalar(flat, intensity), np.float32),
        ring=keep(None if ring is None else _scalar(flat, ring), np.uint16),
        time=keep(_relative_time(flat, names, stamp_ns), np.float32),
        index=index,
    )


def decode_xyz(msg: Any) -> np.ndarray:
    """The finite points of a PointCloud2 as ``(N, 3)`` float32 (the node's hot path)."""
    cloud = decode_pointcloud2(msg)
    names, layout = cloud.dtype.names or (), cloud.dtype.fields
    if layout is None or not all(axis in names for axis in "xyz"):
        raise MessageError(KIND, "fields", f"has no x/y/z fields (fields: {list(names)})")
    for axis in "xyz":
        _scalar(cloud, axis)
    offset = layout["x"][1]
    adjacent = all(layout[a][0] == np.dtype("<f4")
                   and layout[a][1] == offset + 4 * i for i, a in enumerate("xyz"))
    if adjacent and cloud.flags.c_contiguous:
        # x, y, z adjacent little-endian float32 (every driver we know): copying 12 bytes per
        # point is faster than numpy's unaligned strided float copy.
        rows = cloud.view(np.uint8).reshape(cloud.size, cloud.dtype.itemsize)
        xyz = rows[:, offset:offset + 12].copy().view(np.float32)
    else:
        xyz = structured_to_unstructured(cloud[["x", "y", "z"]], dtype=np.float32)
    return _finite_rows(xyz)


def _finite_rows(xyz: np.ndarray) -> np.ndarray:
    # The all-finite check over the flat array is ~40x faster than a per-row reduction; dense
    # clouds never pay for the mask.
    if np.isfinite(xyz).all():
        return xyz
    keep = np.isfinite(xyz[:, 0]) & np.isfinite(xyz[:, 1]) & np.isfinite(xyz[:, 2])
    finite: np.ndarray = xyz[keep]
    return finite
