"""Malformed and adversarial ``sensor_msgs/CameraInfo`` messages.

A case starts from a calibrated camera (any distortion model, binning, ROI) and applies zero to
three mutations: an uncalibrated or non-finite K, negative focal lengths, NaN/Inf in D, R or P,
unknown distortion models, wrong or absurd numbers of coefficients, zero or huge sizes and
binning, and ROIs outside the sensor (including a zero ROI size whose offset lies past the edge).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..geometry.camera_model import DISTORTION_MODELS
from .common import (
    ABSURD_SIZES,
    SEEDS,
    Case,
    between,
    headers,
    msg_class,
    mutations,
    pick,
    weird_text,
)
from .images import CAMERA_SIZE

TYPE = "sensor_msgs/msg/CameraInfo"
MUTATIONS = ("k_zero", "focal", "k_special", "d_special", "r_special", "p_special",
             "model_unknown", "d_length", "d_absurd", "size", "binning", "roi")
SPECIAL = (np.nan, np.inf, -np.inf, 0.0, -1.0, 1e308)
_SIZES = st.sampled_from((CAMERA_SIZE, (640, 480), (1920, 1080), (1, 1)))
_MODELS = st.sampled_from(sorted(DISTORTION_MODELS))
_LENGTHS = {model: st.sampled_from(lengths) for model, lengths in DISTORTION_MODELS.items()}
_BINNING = st.integers(0, 2)


def camera_model_fields(width: int, height: int, focal: float) -> dict[str, Any]:
    """The fields of a plain calibrated pinhole camera of that size."""
    k = np.array([focal, 0.0, width / 2, 0.0, focal, height / 2, 0.0, 0.0, 1.0])
    return {"width": width, "height": height, "distortion_model": "plumb_bob",
            "d": np.zeros(5), "k": k, "r": np.eye(3).reshape(9),
            "p": np.hstack([k.reshape(3, 3), np.zeros((3, 1))]).reshape(12),
            "binning_x": 0, "binning_y": 0, "roi": (0, 0, 0, 0, False)}


@st.composite
def camera_info_cases(draw: st.DrawFn) -> Case:
    head, tags = draw(headers())
    width, height = draw(_SIZES)
    rng = np.random.default_rng(draw(SEEDS))
    msg = camera_model_fields(width, height, float(rng.uniform(1.0, 2000.0)))
    model = draw(_MODELS)
    length = draw(_LENGTHS[model])
    msg["distortion_model"] = "" if model == "none" else model
    msg["d"] = rng.normal(0.0, 0.1, length)
    if draw(st.booleans()):
        msg["r"] = np.zeros(9)  # unset R and P: identity and [K | 0]
        msg["p"] = np.zeros(12)
    msg["binning_x"], msg["binning_y"] = draw(_BINNING), draw(_BINNING)
    if draw(st.integers(0, 3)) == 0:  # a ROI inside the sensor
        x, y = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        msg["roi"] = (x, y, draw(st.integers(1, width - x)), draw(st.integers(1, height - y)),
                      draw(st.booleans()))
    tags = (*tags, model)
    for mutation in mutations(rng, MUTATIONS):
        _mutate(msg, mutation, rng)
        tags = (*tags, mutation)
    x, y, w, h, rectify = msg.pop("roi")
    roi = msg_class("sensor_msgs/msg/RegionOfInterest")(
        x_offset=x, y_offset=y, width=w, height=h, do_rectify=rectify)
    return Case(TYPE, msg_class(TYPE)(header=head, roi=roi, **msg), tags)


def _special(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.array(values, dtype=np.float64)
    if out.size:
        out[int(rng.integers(out.size))] = pick(rng, SPECIAL)
    return out


def _mutate(msg: dict[str, Any], mutation: str, rng: np.random.Generator) -> None:
    if mutation == "k_zero":
        msg["k"] = np.zeros(9)
    elif mutation == "focal":
        msg["k"] = msg["k"].copy()
        msg["k"][pick(rng, (0, 4))] = pick(rng, (0.0, -1.0, -1e9))
    elif mutation in ("k_special", "d_special", "r_special", "p_special"):
        key = mutation[0]
        msg[key] = _special(msg[key], rng)
    elif mutation == "model_unknown":
        msg["distortion_model"] = pick(rng, ("fisheye", "kannala_brandt", "", " ", "none",
                                             "PLUMB_BOB", weird_text(rng)))
    elif mutation == "d_length":
        msg["d"] = rng.normal(0.0, 0.1, between(rng, 0, 16))
    elif mutation == "d_absurd":
        msg["d"] = np.zeros(pick(rng, (100, 10_000, 200_000)))
    elif mutation == "size":
        msg["width"], msg["height"] = pick(rng, ABSURD_SIZES), pick(rng, ABSURD_SIZES)
    elif mutation == "binning":
        msg["binning_x"], msg["binning_y"] = pick(rng, ABSURD_SIZES), pick(rng, ABSURD_SIZES)
    elif mutation == "roi":
        bounds = (0, 0, 1, msg["width"], msg["height"], msg["width"] - 1, *ABSURD_SIZES)
        msg["roi"] = (*(max(0, pick(rng, bounds)) for _ in range(4)), bool(rng.integers(2)))
