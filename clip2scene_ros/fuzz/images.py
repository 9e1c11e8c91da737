"""Malformed and adversarial ``sensor_msgs/Image`` and ``CompressedImage`` messages.

Raw images: every encoding the codec knows plus unknown ones, row padding, big-endian pixels,
NaN/Inf depth, then wrong ``step``, absurd and huge declared sizes, truncated or extended data.
Compressed images: JPEGs and PNGs that Pillow writes in many modes, then corrupt bytes,
truncation, a header declaring a huge size (CRC fixed, so the decoder believes it), an
arithmetic-coded frame marker, other containers (GIF, BMP, TIFF, WebP) and format strings that
lie.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image as PILImage

from ..codecs.image import ENCODINGS
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
    random_values,
    weird_text,
)

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
#: (width, height) of the node-level camera: a share of images has it, so they are used.
CAMERA_SIZE = (32, 24)

UNKNOWN_ENCODINGS = ("yuv422", "bayer_rggb8", "rgb16", "RGB8", "64FC1", "16SC1", "", "8UC4")
IMAGE_MUTATIONS = ("step", "height", "width", "huge_declared", "truncate", "extend",
                   "empty_data", "encoding", "is_bigendian", "swap_dims")

PIL_MODES = {"png": ("RGB", "RGB", "L", "RGBA", "P", "I;16", "1", "LA"),
             "jpeg": ("RGB", "RGB", "L", "CMYK")}
FORMATS = {"png": ("png", "bgr8; png compressed bgr8", "rgb8; png compressed rgb8", "PNG"),
           "jpeg": ("jpeg", "jpg", "rgb8; jpeg compressed bgr8", "JPEG")}
BAD_FORMATS = ("", "tiff", "jpeg png", "16UC1; compressedDepth png", "bmp", "webp")
OTHER_CONTAINERS = ("GIF", "BMP", "TIFF", "WEBP")
COMPRESSED_MUTATIONS = ("truncate", "flip", "insert", "declare_size", "png_header",
                        "many_chunks", "arithmetic", "format_mismatch", "other_container",
                        "random_bytes", "empty_data", "format_text")

_ENCODINGS = st.sampled_from(sorted(ENCODINGS))
_PADS = st.sampled_from((0, 0, 1, 3, 8))
_KINDS = st.sampled_from(("jpeg", "png"))
_MODES = {kind: st.sampled_from(modes) for kind, modes in PIL_MODES.items()}
_FORMATS = {kind: st.sampled_from(names) for kind, names in FORMATS.items()}
_QUALITIES = st.sampled_from((5, 50, 90, 100))


@st.composite
def _size(draw: st.DrawFn, most: int) -> tuple[int, int]:
    """(width, height): the node camera's size or a small one."""
    if draw(st.integers(0, 3)) == 0:
        return CAMERA_SIZE
    return draw(st.integers(1, most)), draw(st.integers(1, most))


@st.composite
def image_cases(draw: st.DrawFn) -> Case:
    head, tags = draw(headers())
    encoding = draw(_ENCODINGS)
    base, channels = ENCODINGS[encoding]
    big = base.itemsize > 1 and draw(st.booleans())
    width, height = draw(_size(16))
    pad = draw(_PADS)
    rng = np.random.default_rng(draw(SEEDS))
    row = width * channels * base.itemsize
    pixels = random_values(rng, height * width * channels, base.newbyteorder(">" if big else "<"))
    rows = pixels.view(np.uint8).reshape(height, row)
    data = np.concatenate([rows, np.full((height, pad), 0xEE, np.uint8)], axis=1).tobytes()
    if pad and draw(st.booleans()):
        data = data[:-pad]  # the last row without its padding: still valid
    msg: dict[str, Any] = {"height": height, "width": width, "encoding": encoding,
                           "is_bigendian": int(big), "step": row + pad, "data": data}
    tags = (*tags, encoding)
    for mutation in mutations(rng, IMAGE_MUTATIONS):
        _mutate_image(msg, mutation, rng)
        tags = (*tags, mutation)
    return Case(IMAGE, msg_class(IMAGE)(header=head, **{**msg, "data": bytes_of(msg["data"])}),
                tags)


def _mutate_image(msg: dict[str, Any], mutation: str, rng: np.random.Generator) -> None:
    if mutation == "step":
        step = msg["step"]
        # clamped: an earlier mutation may have made step U32 already (uint32 on the wire)
        msg["step"] = pick(rng, (*ABSURD_SIZES, max(0, step - 1), min(U32, step + 1),
                                 min(U32, 2 * step)))
    elif mutation in ("height", "width"):
        msg[mutation] = pick(rng, (*ABSURD_SIZES, min(U32, msg[mutation] + 1)))
    elif mutation == "huge_declared":  # a consistent header over a tiny buffer
        msg["height"], msg["width"] = pick(rng, ABSURD_SIZES), pick(rng, ABSURD_SIZES)
        msg["step"] = min(U32, msg["width"] * 4)
    elif mutation == "truncate":
        msg["data"] = msg["data"][:between(rng, 0, max(0, len(msg["data"]) - 1))]
    elif mutation == "extend":
        msg["data"] += rng.bytes(between(rng, 1, 64))
    elif mutation == "empty_data":
        msg["data"] = b""
    elif mutation == "encoding":
        msg["encoding"] = pick(rng, (*UNKNOWN_ENCODINGS, weird_text(rng)))
    elif mutation == "is_bigendian":
        msg["is_bigendian"] = pick(rng, (0, 1, 2, 255))
    elif mutation == "swap_dims":
        msg["height"], msg["width"] = msg["width"], msg["height"]


# --- compressed ---------------------------------------------------------------------------
def _encode(rgb: np.ndarray, fmt: str, mode: str, **options: Any) -> bytes:
    if mode == "I;16":
        img = PILImage.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        img = PILImage.fromarray(rgb, "RGB").convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt.upper(), **options)
    return out.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each chunk of a well-formed PNG."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with a correct CRC (so the decoder trusts them)."""
    parts = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        parts.append(struct.pack(">I", len(body)) + kind + body
                     + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(parts)


def _patch_png_header(data: bytes, width: int | None, height: int | None,
                      tail: bytes | None = None) -> bytes:
    chunks = png_chunks(data)
    for i, (kind, body) in enumerate(chunks):
        if kind == b"IHDR" and len(body) == 13:
            w, h = struct.unpack(">II", body[:8])
            body = struct.pack(">II", w if width is None else width, h if height is None
                               else height) + (body[8:] if tail is None else tail)
            chunks[i] = (kind, body)
    return png_build(chunks)


def jpeg_frame_offset(data: bytes) -> int | None:
    """Offset of the SOF0/SOF2 marker Pillow writes (baseline or progressive)."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return at
    return None


@st.composite
def compressed_image_cases(draw: st.DrawFn) -> Case:
    head, tags = draw(headers())
    kind = draw(_KINDS)
    mode = draw(_MODES[kind])
    width, height = draw(_size(40))
    rng = np.random.default_rng(draw(SEEDS))
    flat = draw(st.booleans())  # flat images compress the most
    rgb = (np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8) if flat
           else rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    options: dict[str, Any] = {}
    if kind == "jpeg":
        options = {"quality": draw(_QUALITIES),
                   "progressive": draw(st.booleans()), "optimize": draw(st.booleans())}
    data = _encode(rgb, kind, mode, **options)
    fmt = draw(_FORMATS[kind])
    tags = (*tags, f"{kind}:{mode}")
    for mutation in mutations(rng, COMPRESSED_MUTATIONS):
        changed = _mutate_compressed(kind, data, fmt, mutation, rng)
        if changed is not None:
            data, fmt = changed
            tags = (*tags, mutation)
    return Case(COMPRESSED, msg_class(COMPRESSED)(header=head, format=fmt, data=bytes_of(data)),
                tags)


def _mutate_compressed(kind: str, data: bytes, fmt: str, mutation: str,
                       rng: np.random.Generator) -> tuple[bytes, str] | None:
    """(data, format) after one mutation, or None where it does not apply."""
    if mutation == "truncate":
        return data[:between(rng, 0, max(0, len(data) - 1))], fmt
    if mutation == "flip":
        out = bytearray(data)
        for _ in range(between(rng, 1, 8)):
            if out:
                out[int(rng.integers(len(out)))] ^= between(rng, 1, 255)
        return bytes(out), fmt
    if mutation == "insert":
        at = between(rng, 0, len(data))
        return data[:at] + rng.bytes(between(rng, 1, 32)) + data[at:], fmt
    if mutation == "format_mismatch":
        return data, pick(rng, FORMATS["png" if kind == "jpeg" else "jpeg"])
    if mutation == "format_text":
        return data, pick(rng, (*BAD_FORMATS, weird_text(rng)))
    if mutation == "other_container":
        rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        return _encode(rgb, pick(rng, OTHER_CONTAINERS), "RGB"), fmt
    if mutation == "random_bytes":
        prefix = pick(rng, (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))
        return prefix + rng.bytes(between(rng, 0, 256)), fmt
    if mutation == "empty_data":
        return b"", fmt
    return _mutate_header(kind, data, fmt, mutation, rng)


def _mutate_header(kind: str, data: bytes, fmt: str, mutation: str, rng: np.random.Generator
                   ) -> tuple[bytes, str] | None:
    png = data.startswith(b"\x89PNG")
    if mutation == "declare_size":
        if png:
            sizes: tuple[int, ...] = (*ABSURD_SIZES, 4000, 8000, between(rng, 1, 20000))
            return _patch_png_header(data, pick(rng, sizes), pick(rng, sizes)), fmt
        at = jpeg_frame_offset(data)
        if at is None or len(data) < at + 9:
            return None
        # a few thousand pixels square: under Pillow's bomb limit, yet hundreds of MB decoded
        sizes = (0, 1, 4000, 8000, 9000, 2**16 - 1, between(rng, 1, 2**16 - 1))
        dims = struct.pack(">HH", pick(rng, sizes), pick(rng, sizes))
        return data[:at + 5] + dims + data[at + 9:], fmt
    if mutation == "png_header" and png:  # bit depth, colour type, compression, filter, interlace
        values = (0, 1, 2, 3, 4, 6, 8, 16, 255)
        return _patch_png_header(data, None, None, bytes(pick(rng, values) for _ in range(5))), fmt
    if mutation == "many_chunks" and png:  # every IDAT byte its own chunk: valid, absurd count
        chunks = png_chunks(data)
        idat = b"".join(body for k, body in chunks if k == b"IDAT")
        rest = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
        return png_build([*rest, *((b"IDAT", idat[i:i + 1]) for i in range(len(idat))),
                          (b"IEND", b"")]), fmt
    if mutation == "arithmetic" and not png:
        at = jpeg_frame_offset(data)
        if at is None:
            return None
        return data[:at + 1] + bytes([0xC9 if data[at + 1] == 0xC0 else 0xCA]) + data[at + 2:], fmt
    return None
