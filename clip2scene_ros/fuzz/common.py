"""What every message strategy shares: the message classes, a case record, headers and stamps.

Messages are built with the rosbags classes (the ones a bag reader hands the codecs) and stay
*wire-representable*: every integer fits its ROS type (uint32 sizes, int32 seconds, uint8
datatypes) and strings hold no NUL, so each case can also be serialized to CDR and delivered to
the node as an rclpy message, exactly as DDS would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from hypothesis import strategies as st

from ..codecs.messages import rosbags_factory

T = TypeVar("T")
U32 = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
#: Sizes a fuzzer declares to provoke allocations from headers: the type's edges and values
#: whose products overflow 32 and 64 bits.
ABSURD_SIZES = (0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, U32 - 1, U32)

#: Header stamp families (sec, nanosec): plausible now, zero, negative, 1970, the far future
#: (up to int32's end in 2038), and nanoseconds beyond one second (representable, not
#: normalised).
STAMP_KINDS = ("now", "now", "now", "now", "zero", "negative", "epoch", "future", "nanos")
# Strategies are built once: hypothesis validates each new one on its first draw.
SEEDS = st.integers(0, 2**32 - 1)
_KINDS = st.sampled_from(STAMP_KINDS)
_NANOS = st.integers(0, 999_999_999)
_NOW = st.integers(1_600_000_000, 1_800_000_000)
_FRAMES = st.sampled_from(("sensor", "sensor", "", "é/ß frame"))


def factory() -> Any:
    return rosbags_factory()


def msg_class(type_name: str) -> Any:
    """The rosbags class of e.g. ``"sensor_msgs/msg/Image"``."""
    return factory()(type_name)


@dataclass(frozen=True)
class Case:
    """One generated message and what was done to it (``tags``, for the report)."""

    type_name: str
    msg: Any
    tags: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.type_name.rsplit('/', 1)[-1]}[{', '.join(self.tags) or 'valid'}]"


@st.composite
def stamps(draw: st.DrawFn) -> tuple[int, int, str]:
    """(sec, nanosec, kind) of a header stamp, mostly plausible."""
    kind = draw(_KINDS)
    nanos = draw(_NANOS)
    if kind == "now":
        return draw(_NOW), nanos, kind
    if kind == "zero":
        return 0, 0, kind
    if kind == "negative":
        return draw(st.integers(I32_MIN, -1)), nanos, kind
    if kind == "epoch":
        return draw(st.integers(0, 1_000_000)), nanos, kind
    if kind == "future":
        return draw(st.integers(2_000_000_000, I32_MAX)), nanos, kind
    return draw(_NOW), draw(st.integers(10**9, U32)), kind


def header(sec: int, nanosec: int, frame_id: str) -> Any:
    stamp = msg_class("builtin_interfaces/msg/Time")(sec=sec, nanosec=nanosec)
    return msg_class("std_msgs/msg/Header")(stamp=stamp, frame_id=frame_id)


@st.composite
def headers(draw: st.DrawFn) -> tuple[Any, tuple[str, ...]]:
    """A header and its tags (none for a plausible stamp)."""
    sec, nanosec, kind = draw(stamps())
    frame_id = draw(_FRAMES)
    return header(sec, nanosec, frame_id), (() if kind == "now" else (f"stamp:{kind}",))


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One of ``options``, uniformly.

    Mutations choose with a numpy generator seeded by hypothesis rather than with hypothesis
    draws: hypothesis favours the first, simplest choices and mutates earlier examples, so rare
    combinations (a zero ROI width *and* an offset past the edge) would hardly ever come up.
    """
    return options[int(rng.integers(len(options)))]


def between(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]``, uniformly."""
    return int(rng.integers(low, high, endpoint=True))


def mutations(rng: np.random.Generator, names: Sequence[str], share: float = 0.6) -> list[str]:
    """One to three of ``names`` for a ``share`` of the cases, none for the rest (valid ones)."""
    if rng.random() >= share:
        return []
    return [pick(rng, names) for _ in range(between(rng, 1, 3))]


def weird_text(rng: np.random.Generator) -> str:
    """A short string of any code points but NUL and surrogates, or a notable one."""
    if rng.random() < 0.5:
        return pick(rng, ("", " ", "x ", "X", "é", "\u202e", "\ufeffx", "a" * 300, "\n\t"))
    codes = rng.integers(1, 0x110000, between(rng, 1, 12))
    return "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF)


def special_floats(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` floats of ``dtype``, mostly ordinary, some NaN, ±Inf, huge, tiny or -0."""
    values = rng.uniform(-50.0, 50.0, n)
    specials = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e300, 1e-45, -0.0])
    pick = rng.random(n) < rng.choice([0.0, 0.05, 0.5, 1.0])
    values[pick] = rng.choice(specials, int(pick.sum()))
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def random_values(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` values of a numeric ``dtype``: special floats, or integers over the whole range."""
    if dtype.kind == "f":
        return special_floats(rng, n, dtype)
    info = np.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max), n, endpoint=True).astype(dtype)


def bytes_of(data: bytes | np.ndarray) -> np.ndarray:
    """A ``uint8[]`` field value as the rosbags classes hold it."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(bytes(data), dtype=np.uint8)
