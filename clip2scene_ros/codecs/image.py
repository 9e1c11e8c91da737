"""``sensor_msgs/Image`` and ``CompressedImage`` ↔ numpy.

Raw images are viewed in place (``step`` padding handled with strides), as cv_bridge's
``imgmsg_to_cv2`` does; cv_bridge needs OpenCV and a ROS install, so the codec layer owns this
small part. JPEG and PNG go through Pillow, with a decompression-bomb guard.
"""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any

import numpy as np

try:
    from PIL import Image as PILImage
except ImportError:  # only compressed images need Pillow; the rest of the package runs without
    PILImage = None  # type: ignore[assignment]

from ..errors import MessageError
from .messages import MessageFactory, make_header, make_with_data

#: Raw encodings we read and write: numpy element type (little-endian) and channels.
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype("u1"), 3),
    "bgr8": (np.dtype("u1"), 3),
    "rgba8": (np.dtype("u1"), 4),
    "bgra8": (np.dtype("u1"), 4),
    "mono8": (np.dtype("u1"), 1),
    "8UC1": (np.dtype("u1"), 1),
    "8UC3": (np.dtype("u1"), 3),
    "mono16": (np.dtype("<u2"), 1),
    "16UC1": (np.dtype("<u2"), 1),
    "32FC1": (np.dtype("<f4"), 1),
}

#: Larger compressed images are refused before decoding (a 16k x 16k frame is no camera's).
MAX_PIXELS = 16384 * 16384
COMPRESSED_FORMATS = ("jpeg", "png")

# Pillow allocates the whole frame from the header's size before decoding, and libjpeg fills a
# truncated scan in silently: a 600-byte JPEG declaring 9000x9000 would cost ~1 GB. So the
# declared size is checked against what the payload can hold first. Deflate expands at most
# 1032:1; a Huffman-coded JPEG spends at least one bit per 8x8 block (its DC code) of its
# full-resolution component. Arithmetic-coded JPEG has no such floor, and no camera writes it.
PNG_MAX_RATIO = 1032
JPEG_MAX_PIXELS_PER_BYTE = 8 * 64
#: Fewest bits a PNG stores per pixel of each Pillow mode (grey and palette can pack 1-4
#: pixels per byte; others default to 1).
_PNG_MIN_BITS = {"RGB": 24, "RGBA": 32, "LA": 16, "I;16": 16, "I": 16, "L": 2}
_JPEG_FRAMES = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
_JPEG_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}


def decode_image(msg: Any) -> np.ndarray:
    """View an Image's pixels as ``(H, W)`` or ``(H, W, C)`` in its native encoding, no copy."""
    kind = "Image"
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise MessageError(kind, "encoding", f"{encoding!r} is not one of {sorted(ENCODINGS)}")
    base, channels = ENCODINGS[encoding]
    if base.itemsize > 1 and bool(msg.is_bigendian):
        base = base.newbyteorder(">")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise MessageError(kind, "height/width", f"image is {width}x{height}")
    row = width * channels * base.itemsize
    if step < row:
        raise MessageError(kind, "step", f"{step} < width * bytes per pixel = {row}")
    try:
        buffer = memoryview(msg.data).cast("B")
    except TypeError as exc:
        raise MessageError(kind, "data", f"is not a byte buffer ({exc})") from exc
    # The last row may omit its padding; anything shorter, or longer than height * step, is wrong.
    if not step * (height - 1) + row <= buffer.nbytes <= step * height:
        raise MessageError(kind, "data", f"has {buffer.nbytes} bytes; {height} rows of step "
                           f"{step} need {step * height}")
    shape = (height, width) if channels == 1 else (height, width, channels)
    strides = (step, channels * base.itemsize, base.itemsize)[: len(shape)]
    image = np.ndarray(shape, dtype=base, buffer=buffer, strides=strides)
    image.flags.writeable = False
    return image


def image_to_rgb8(msg: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from an Image or a CompressedImage (what the teacher consumes)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return decode_compressed_image(msg)
    image = decode_image(msg)
    encoding = str(msg.encoding)
    if encoding in ("rgb8", "8UC3"):
        return np.ascontiguousarray(image)
    if encoding in ("bgr8", "bgra8"):
        return np.ascontiguousarray(image[..., 2::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(image[..., :3])
    if encoding in ("mono8", "8UC1"):
        return np.repeat(image[..., None], 3, axis=2)
    if encoding in ("mono16", "16UC1"):
        return np.repeat((image >> 8).astype(np.uint8)[..., None], 3, axis=2)
    raise MessageError("Image", "encoding", f"{encoding!r} is not a colour or grey image")


def _compressed_kind(fmt: str) -> str:
    """``"jpeg"`` or ``"png"`` from a CompressedImage ``format`` string.

    image_transport writes e.g. ``"bgr8; jpeg compressed bgr8"``; plain ``"jpeg"``/``"png"`` is
    common too. compressedDepth (a PNG behind a custom header) is not a camera image.
    """
    text = fmt.lower()
    if "compresseddepth" in text:
        raise MessageError("CompressedImage", "format",
                           f"{fmt!r}: compressedDepth is not supported")
    text = text.replace("jpg", "jpeg")
    found = [name for name in COMPRESSED_FORMATS if name in text]
    if len(found) != 1:
        raise MessageError("CompressedImage", "format",
                           f"{fmt!r} names neither jpeg nor png exactly once")
    return found[0]


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker of a JPEG's frame header (None if no frame comes before a scan).

    Walks the segments as Pillow does, skipping junk and fill bytes between them.
    """
    pos = 2  # after SOI
    while pos + 1 < len(data):
        if data[pos] != 0xFF or data[pos + 1] == 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in _JPEG_FRAMES:
            return marker
        if marker == 0xDA:  # start of scan
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 if marker in _JPEG_STANDALONE or marker == 0 else 2 + length
    return None


def _check_declared_size(data: bytes, fmt: str, width: int, height: int, mode: str) -> None:
    """Refuse a header whose size the payload cannot hold (see ``PNG_MAX_RATIO``)."""
    pixels = width * height
    if fmt == "png":
        room = PNG_MAX_RATIO * 8 * len(data) // _PNG_MIN_BITS.get(mode, 1)
    else:
        if _jpeg_frame_marker(data) in _JPEG_ARITHMETIC:
            raise MessageError("CompressedImage", "data", "is an arithmetic-coded JPEG")
        room = JPEG_MAX_PIXELS_PER_BYTE * len(data)
    if pixels > room:
        raise MessageError("CompressedImage", "data", f"declares {width}x{height} {fmt} "
                           f"pixels; {len(data)} bytes hold at most {room}")


def _need_pillow() -> None:
    if PILImage is None:
        raise ImportError("compressed images need Pillow (pip install pillow)")


def decode_compressed_image(msg: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a JPEG or PNG CompressedImage."""
    kind = "CompressedImage"
    _need_pillow()
    expected = _compressed_kind(str(msg.format))
    data = bytes(memoryview(msg.data).cast("B"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:
                actual = (img.format or "").lower()
                if actual != expected:
                    raise MessageError(kind, "data", f"is {actual or 'not an image'}, format says "
                                       f"{expected}")
                if img.width * img.height > MAX_PIXELS:
                    raise MessageError(kind, "data", f"{img.width}x{img.height} exceeds "
                                       f"{MAX_PIXELS} pixels")
                _check_declared_size(data, actual, img.width, img.height, img.mode)
                rgb = np.asarray(img.convert("RGB"))
    except MessageError:
        raise
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError,
            PILImage.DecompressionBombWarning) as exc:
        raise MessageError(kind, "data", f"cannot be decoded as {expected}: {exc}") from exc
    return rgb


def encode_image(
    array: np.ndarray, encoding: str, *, stamp_ns: int, frame_id: str, factory: MessageFactory
) -> Any:
    """An Image of ``encoding`` holding ``array`` (``(H, W)`` or ``(H, W, C)``), tightly packed."""
    if encoding not in ENCODINGS:
        raise MessageError("Image", "encoding", f"{encoding!r} is not one of {sorted(ENCODINGS)}")
    base, channels = ENCODINGS[encoding]
    array = np.asarray(array)
    shape = (array.ndim, array.shape[-1] if array.ndim == 3 else 1)
    shape_ok = shape == ((2, 1) if channels == 1 else (3, channels))
    if not shape_ok or array.dtype.kind != base.kind or array.dtype.itemsize != base.itemsize:
        raise MessageError("Image", "data", f"{encoding} needs {channels} channel(s) of {base}, "
                           f"got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    big = array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big")
    return make_with_data(
        factory,
        "sensor_msgs/msg/Image",
        np.ascontiguousarray(array),
        header=make_header(factory, stamp_ns, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=int(big and base.itemsize > 1),
        step=width * channels * base.itemsize,
    )


def encode_compressed_image(
    rgb: np.ndarray,
    fmt: str = "jpeg",
    *,
    quality: int = 90,
    stamp_ns: int,
    frame_id: str,
    factory: MessageFactory,
) -> Any:
    """A CompressedImage of ``(H, W, 3)`` uint8 RGB, in the format string image_transport uses."""
    if fmt not in COMPRESSED_FORMATS:
        raise MessageError("CompressedImage", "format", f"{fmt!r} is not one of "
                           f"{COMPRESSED_FORMATS}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise MessageError("CompressedImage", "data", f"needs (H, W, 3) uint8, got {rgb.dtype} "
                           f"{rgb.shape}")
    _need_pillow()
    out = io.BytesIO()
    options = {"quality": int(quality)} if fmt == "jpeg" else {}
    PILImage.fromarray(rgb, "RGB").save(out, format=fmt.upper(), **options)
    return make_with_data(
        factory,
        "sensor_msgs/msg/CompressedImage",
        out.getbuffer(),
        header=make_header(factory, stamp_ns, frame_id),
        # image_transport's republisher decodes to the encoding before ';' (the JPEG itself is
        # stored in the standard colour order whichever names follow).
        format=f"rgb8; {fmt} compressed bgr8",
    )
