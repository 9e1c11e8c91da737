"""Image, CompressedImage and CameraInfo codecs: every encoding with padding, conversions to RGB,
JPEG/PNG, the bomb guard, calibration round trips and malformed input."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from clip2scene_ros.codecs import (
    ENCODINGS,
    camera_info_to_model,
    decode_compressed_image,
    decode_image,
    encode_compressed_image,
    encode_image,
    image_to_rgb8,
    model_to_camera_info,
)
from clip2scene_ros.codecs import image as image_codec
from clip2scene_ros.codecs.messages import RclpyFactory, rosbags_factory
from clip2scene_ros.errors import MessageError
from clip2scene_ros.geometry.camera_model import CameraModel, RegionOfInterest

FACTORIES = [rosbags_factory(), RclpyFactory()]


class Msg:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def raw_image(encoding: str, pixels: np.ndarray, pad: int, big: bool, last_row_pad: bool
              ) -> Msg:
    """An Image built by hand: rows of ``pixels`` bytes followed by ``pad`` bytes."""
    base, _ = ENCODINGS[encoding]
    dtype = base.newbyteorder(">" if big else "<")
    rows = [np.ascontiguousarray(r, dtype=dtype).tobytes() for r in pixels]
    step = len(rows[0]) + pad
    data = b"".join(r + b"\xee" * pad for r in rows)
    if not last_row_pad:
        data = data[: len(data) - pad]
    return Msg(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
               is_bigendian=int(big), step=step, data=data)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(ENCODINGS)), st.integers(1, 4), st.integers(1, 5),
       st.integers(0, 7), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_every_encoding_with_padding(encoding: str, h: int, w: int, pad: int, big: bool,
                                     last_row_pad: bool, seed: int) -> None:
    base, channels = ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    pixels = (rng.uniform(-1e3, 1e3, shape) if base.kind == "f"
              else rng.integers(0, 2 ** (8 * base.itemsize), shape)).astype(base)
    decoded = decode_image(raw_image(encoding, pixels, pad, big, last_row_pad))
    np.testing.assert_array_equal(decoded, pixels)
    assert not decoded.flags.writeable
    for factory in FACTORIES:
        msg = encode_image(pixels, encoding, stamp_ns=3, frame_id="cam", factory=factory)
        np.testing.assert_array_equal(decode_image(msg), pixels)


def test_conversion_to_rgb8() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    alpha = np.full((2, 3, 1), 9, np.uint8)
    f = rosbags_factory()

    def enc(a: np.ndarray, e: str) -> Any:
        return encode_image(a, e, stamp_ns=0, frame_id="c", factory=f)

    for array, encoding in [(rgb, "rgb8"), (rgb[..., ::-1], "bgr8"),
                            (np.concatenate([rgb, alpha], 2), "rgba8"),
                            (np.concatenate([rgb[..., ::-1], alpha], 2), "bgra8")]:
        np.testing.assert_array_equal(image_to_rgb8(enc(np.ascontiguousarray(array), encoding)),
                                      rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(image_to_rgb8(enc(grey, "mono8")), np.repeat(grey[..., None],
                                                                                3, 2))
    deep = grey.astype(np.uint16) * 256 + 255
    np.testing.assert_array_equal(image_to_rgb8(enc(deep, "mono16"))[..., 1], grey)
    with pytest.raises(MessageError, match="not a colour"):
        image_to_rgb8(enc(np.zeros((2, 2), np.float32), "32FC1"))


@pytest.mark.parametrize(("change", "field"), [
    ({"encoding": "yuv422"}, "encoding"),
    ({"step": 5}, "step"),
    ({"data": bytes(7)}, "data"),
    ({"data": bytes(40)}, "data"),
    ({"height": 0}, "height/width"),
])
def test_malformed_images(change: dict[str, Any], field: str) -> None:
    good = {"height": 2, "width": 2, "encoding": "rgb8", "is_bigendian": 0, "step": 6,
            "data": bytes(12)}
    with pytest.raises(MessageError) as info:
        decode_image(Msg(**{**good, **change}))
    assert info.value.field == field


def test_compressed_round_trips_and_format_strings() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:24, 0:32]
    smooth = np.stack([xx * 8, yy * 10, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    for factory in FACTORIES:
        png = encode_compressed_image(rgb, "png", stamp_ns=0, frame_id="c", factory=factory)
        assert png.format == "rgb8; png compressed bgr8"
        np.testing.assert_array_equal(image_to_rgb8(png), rgb)
        jpeg = encode_compressed_image(smooth, "jpeg", quality=95, stamp_ns=0, frame_id="c",
                                       factory=factory)
        assert np.abs(decode_compressed_image(jpeg).astype(int) - smooth).mean() < 2
    for fmt in ("jpeg", "jpg", "bgr8; jpeg compressed bgr8"):
        assert decode_compressed_image(Msg(format=fmt, data=jpeg.data)).shape == (24, 32, 3)


@pytest.mark.parametrize(("fmt", "data", "match"), [
    ("png", "jpeg", "is jpeg, format says png"),
    ("jpeg", b"\xff\xd8\xff garbage", "cannot be decoded"),
    ("jpeg", b"", "cannot be decoded"),
    ("16UC1; compressedDepth png", "png", "compressedDepth"),
    ("tiff", "png", "neither jpeg nor png"),
])
def test_bad_compressed_images(fmt: str, data: Any, match: str) -> None:
    if data in ("png", "jpeg"):
        data = encode_compressed_image(np.zeros((4, 4, 3), np.uint8), data, stamp_ns=0,
                                       frame_id="c", factory=rosbags_factory()).data
    with pytest.raises(MessageError, match=match):
        decode_compressed_image(Msg(format=fmt, data=data))


def test_decompression_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.BytesIO()
    PILImage.new("RGB", (64, 64)).save(out, format="PNG")
    monkeypatch.setattr(image_codec, "MAX_PIXELS", 1000)
    with pytest.raises(MessageError, match="exceeds 1000 pixels"):
        decode_compressed_image(Msg(format="png", data=out.getvalue()))


K = [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize(("model", "D"), [
    ("plumb_bob", [0.1, -0.2, 0.001, 0.002, 0.05]),
    ("rational_polynomial", [0.1, -0.2, 0.001, 0.002, 0.05, 0.01, 0.02, 0.03]),
    ("equidistant", [0.0, 0.0, 0.0, 0.0]),
    ("none", []),
])
def test_camera_info_round_trip(model: str, D: list[float]) -> None:
    camera = CameraModel(640, 480, K, D, model, binning_x=2, binning_y=2,
                         roi=RegionOfInterest(8, 4, 320, 240))
    for factory in FACTORIES:
        msg = model_to_camera_info(camera, stamp_ns=1, frame_id="cam", factory=factory)
        back = camera_info_to_model(msg)
        assert back.distortion_model == model  # all-zero equidistant D stays equidistant
        for name in ("K", "D", "R", "P"):
            np.testing.assert_array_equal(getattr(back, name), getattr(camera, name))
        assert (back.binning_x, back.binning_y, back.roi) == (2, 2, camera.roi)


def info(**change: Any) -> Msg:
    roi = Msg(x_offset=0, y_offset=0, width=0, height=0, do_rectify=False)
    fields = {"width": 640, "height": 480, "k": np.ravel(K), "d": [0.0] * 5,
              "distortion_model": "plumb_bob", "r": np.zeros(9), "p": np.zeros(12),
              "binning_x": 0, "binning_y": 0, "roi": roi}
    return Msg(**{**fields, **change})


def test_unset_r_and_p_mean_identity_and_k() -> None:
    camera = camera_info_to_model(info())
    np.testing.assert_array_equal(camera.R, np.eye(3))
    np.testing.assert_array_equal(camera.P[:, :3], K)


@pytest.mark.parametrize(("change", "field"), [
    ({"k": np.zeros(9)}, "k"),
    ({"k": np.zeros(8)}, "k"),
    ({"d": [0.1, 0.2]}, "d"),
    ({"distortion_model": "fisheye62"}, "distortion_model"),
    ({"distortion_model": "", "d": [0.1]}, "distortion_model"),
    ({"width": 0}, "width/height"),
    ({"p": np.full(12, np.nan)}, "p"),
    ({"roi": Msg(x_offset=600, y_offset=0, width=100, height=10, do_rectify=False)}, "roi"),
])
def test_malformed_camera_info(change: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageError) as info_error:
        camera_info_to_model(info(**change))
    assert info_error.value.field == field and info_error.value.kind == "CameraInfo"
