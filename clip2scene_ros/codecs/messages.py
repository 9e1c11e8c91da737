"""Message classes for encoding, from rclpy or from rosbags, behind one small interface.

Decoding needs no classes: rclpy messages and rosbags messages have the same field names, so the
codecs read either by attribute. Encoding must build a message of the caller's flavour: a node
publishes rclpy messages, a bag writer serializes rosbags messages. A ``MessageFactory`` maps a
ROS type name such as ``"sensor_msgs/msg/PointCloud2"`` to a class; both flavours accept the same
keyword arguments.
"""

from __future__ import annotations

import array
import importlib
from functools import cache
from typing import Any, Protocol

import numpy as np

#: The rosbags type store used to write bags; Humble's definitions of the sensor messages are
#: identical to later distributions and readable by every ROS 2 release since.
WRITE_STORE = "ros2_humble"


class MessageFactory(Protocol):
    """Returns the message class for a ROS 2 type name like ``"std_msgs/msg/Header"``."""

    flavour: str

    def __call__(self, type_name: str) -> type[Any]: ...


class RosbagsFactory:
    """Message classes from a rosbags type store (for bags; no ROS install needed)."""

    flavour = "rosbags"

    def __init__(self, store: str = WRITE_STORE) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.typestore = get_typestore(Stores(store))

    def __call__(self, type_name: str) -> type[Any]:
        return self.typestore.types[type_name]


class RclpyFactory:
    """Message classes from the installed ROS 2 Python message packages (for publishing)."""

    flavour = "rclpy"

    def __call__(self, type_name: str) -> type[Any]:
        package, _, name = type_name.split("/")
        cls: type[Any] = getattr(importlib.import_module(f"{package}.msg"), name)
        return cls


@cache
def rosbags_factory(store: str = WRITE_STORE) -> RosbagsFactory:
    return RosbagsFactory(store)


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (either flavour) to integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_stamp(factory: MessageFactory, stamp_ns: int) -> Any:
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return factory("builtin_interfaces/msg/Time")(sec=sec, nanosec=nanosec)


def make_header(factory: MessageFactory, stamp_ns: int, frame_id: str) -> Any:
    return factory("std_msgs/msg/Header")(stamp=make_stamp(factory, stamp_ns), frame_id=frame_id)


def byte_array(factory: MessageFactory, data: np.ndarray | bytes | memoryview) -> Any:
    """A ``uint8[]`` field value in the factory's flavour, copying only when it must.

    rosbags wants a uint8 ndarray (no copy). rclpy stores ``uint8[]`` as ``array.array('B')``;
    one that already is such an array (e.g. from :func:`new_byte_array`) is used as it is, and
    any other payload is copied into one with a single memcpy.
    """
    if factory.flavour == "rosbags":
        if isinstance(data, np.ndarray):
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, array.array) and data.typecode == "B":
        return data
    out = array.array("B")
    if isinstance(data, np.ndarray):
        out.frombytes(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
    else:
        out.frombytes(data)
    return out


def new_byte_array(factory: MessageFactory, nbytes: int) -> tuple[Any, np.ndarray]:
    """A zeroed ``uint8[]`` field value of ``nbytes`` in the factory's flavour and a writable
    uint8 view of its memory: an encoder writes the payload through the view, straight into
    the storage the message keeps (no second buffer, no copy)."""
    if factory.flavour == "rosbags":
        zeros = np.zeros(nbytes, dtype=np.uint8)
        return zeros, zeros
    value = array.array("B", b"\0") * nbytes  # one allocation and a memset
    return value, np.frombuffer(value, dtype=np.uint8)


def make_with_data(factory: MessageFactory, type_name: str, data: np.ndarray | bytes | memoryview,
                   **fields: Any) -> Any:
    """Build a message whose ``data`` field is a large ``uint8[]``, copying the payload at most
    once (never when ``data`` already is the flavour's value, see :func:`new_byte_array`).

    rclpy's generated ``__init__`` copies ``data`` into a new ``array('B')`` element by element,
    so the rclpy flavour is built empty and ``data`` assigned after. Its ``data`` setter keeps
    an ``array('B')`` as it is only when the message checks its fields (rosidl's
    ``check_fields``, off by default in newer distributions, whose unchecked setter copies the
    payload once more); such messages are built checked.
    """
    payload = byte_array(factory, data)
    cls = factory(type_name)
    if factory.flavour == "rosbags":
        return cls(data=payload, **fields)
    if "_check_fields" in getattr(cls, "__slots__", ()):
        fields["check_fields"] = True
    msg = cls(**fields)
    msg.data = payload
    return msg
