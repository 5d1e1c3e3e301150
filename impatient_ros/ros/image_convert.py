"""sensor_msgs/Image and sensor_msgs/CompressedImage fields -> numpy arrays, and back.

Pure numpy/OpenCV: the functions take the message *fields* (``height``, ``width``,
``encoding``, ``is_bigendian``, ``step``, ``data`` / ``format``, ``data``), so this
module imports no ROS package and is tested without ROS. cv_bridge is not used:
the ROS 2 one cannot be installed from a registry and the PyPI ``cv-bridge`` is a
broken ROS 1 port (see FACTS.md).

Contracts
---------
* Every rejected input raises :class:`ImageConversionError`, whose ``reason`` is
  one short code from :data:`REASONS`, so a node can count failures per reason
  in its diagnostics. Everything is validated *before* memory is touched or
  allocated: a header claiming 100000x100000 pixels is refused by arithmetic on
  the fields alone.
* Raw images: ``sensor_msgs/Image`` defines ``len(data) == step * height``. This
  module requires exactly that, including the padding after the last row
  (``"short_data"`` / ``"long_data"``): fields that do not describe the buffer
  mean one of them is wrong, and guessing which would risk a silently shifted
  or cropped image.
* Raw images are decoded without copying (a strided view on ``data`` that skips
  the row padding) unless 16-bit data must be byte-swapped into native order.
  The view shares memory with ``data``: it is read-only for ``bytes`` and
  ``array.array`` inputs from rclpy, and it changes if a mutable buffer is
  reused. Call ``array.copy()`` to keep an image beyond the buffer's life.
* ``8UC3`` is read as ``bgr`` and ``8UC4`` as ``bgra`` (``16UC3``/``16UC4``
  likewise): the generic OpenCV types carry no channel order, and OpenCV, which
  produces most such buffers, stores colour as BGR.
* Compressed images come out in OpenCV's order: ``gray``, ``bgr`` or ``bgra``,
  uint8 or uint16 (16-bit PNG).
* Compressed images are bounded twice before decoding, from their headers: by
  pixels (``max_pixels``) and by decoded bytes (``max_decoded_bytes``: the
  array from the header's size, bit depth and channels, plus a progressive
  JPEG's coefficient buffer). A small PNG can declare a huge image (7000x7000
  16-bit RGBA is 392 MB from a 381 KB file).
* A decoder *warning* rejects the frame (``"decode_failed"``). libjpeg decodes
  a JPEG whose scan data was cut short (or hit a bit error) into a partly flat
  grey image and only prints "Corrupt JPEG data: ..." to stderr; such an image
  must not be classified. See :func:`_decode_checked` for how it is detected.
* Bad *tuning* arguments (``max_pixels``, ``quality``, ...) are programming
  errors and raise ``ValueError``, so they never count as message failures.
"""

from __future__ import annotations

import ctypes
import operator
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_COMPRESSED_BYTES",
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_PIXELS",
    "REASONS",
    "SUPPORTED_ENCODINGS",
    "DecodedImage",
    "ImageConversionError",
    "array_to_compressed",
    "array_to_image_fields",
    "compressed_to_array",
    "image_to_array",
]

# 50 megapixels: above any camera a classifier node sees, far below what would
# exhaust memory (50 MP x 4 channels x 2 bytes = 400 MB).
DEFAULT_MAX_PIXELS = 50_000_000
# Compressed payloads larger than this are refused before decoding.
DEFAULT_MAX_COMPRESSED_BYTES = 100 * 2**20
# What one compressed image may decode to, from its header: the decoded array, plus
# the coefficient buffer a progressive JPEG needs. 8K UHD bgr8 (99.5 MB) and 4K
# bgra16 (66 MB) fit; a 7000x7000 rgba16 PNG (392 MB from a 381 KB file) does not.
# OpenCV (5.0) holds a second copy of the array while it hands it over, so one
# decode's peak is about twice the decoded size.
DEFAULT_MAX_DECODED_BYTES = 128 * 2**20

REASONS = frozenset(
    {
        "unknown_encoding",  # raw encoding not in SUPPORTED_ENCODINGS
        "bad_endianness",  # is_bigendian is not 0/1
        "bad_field",  # height/width/step not a non-negative integer
        "zero_size",  # height or width is 0
        "too_large",  # more than max_pixels pixels, max_bytes bytes or max_decoded_bytes decoded
        "bad_step",  # step shorter than a row, or not a multiple of the element size
        "bad_data",  # data is not a contiguous byte buffer
        "short_data",  # fewer than step * height bytes
        "long_data",  # more than step * height bytes
        "empty_data",  # compressed payload of zero bytes
        "unsupported_format",  # compressed format string names no JPEG/PNG codec
        "format_mismatch",  # format string says JPEG but the bytes are PNG, or vice versa
        "truncated",  # compressed payload ends before its end marker
        "decode_failed",  # corrupt compressed payload (header parse, OpenCV failed or warned)
        "bad_array",  # array_to_*: array shape/dtype does not fit the encoding
        "encode_failed",  # array_to_compressed: OpenCV could not encode
    }
)


class ImageConversionError(ValueError):
    """An image message that cannot be converted; ``reason`` is a code from REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            # A typo here would silently create a new diagnostics counter.
            raise AssertionError(f"unregistered reason code {reason!r}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [reason: {self.reason}]"


@dataclass(frozen=True, eq=False)  # eq would compare arrays, which has no single truth value
class DecodedImage:
    """A decoded image: ``array`` is (H, W, C) with C in {1, 3, 4}, uint8 or uint16."""

    array: np.ndarray
    channel_order: str  # "gray" | "rgb" | "bgr" | "rgba" | "bgra"

    @property
    def dtype(self) -> np.dtype:
        """Element type, always native-order uint8 or uint16."""
        return self.array.dtype

    @property
    def height(self) -> int:
        """Rows."""
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        """Columns."""
        return int(self.array.shape[1])

    @property
    def channels(self) -> int:
        """Channels per pixel (1, 3 or 4)."""
        return int(self.array.shape[2])


@dataclass(frozen=True)
class _Encoding:
    channels: int
    bytes_per_channel: int
    channel_order: str

    @property
    def pixel_bytes(self) -> int:
        return self.channels * self.bytes_per_channel


# Names as in sensor_msgs/image_encodings.hpp (case-sensitive there too).
_ENCODINGS: dict[str, _Encoding] = {
    "mono8": _Encoding(1, 1, "gray"),
    "mono16": _Encoding(1, 2, "gray"),
    "rgb8": _Encoding(3, 1, "rgb"),
    "bgr8": _Encoding(3, 1, "bgr"),
    "rgba8": _Encoding(4, 1, "rgba"),
    "bgra8": _Encoding(4, 1, "bgra"),
    "rgb16": _Encoding(3, 2, "rgb"),
    "bgr16": _Encoding(3, 2, "bgr"),
    "rgba16": _Encoding(4, 2, "rgba"),
    "bgra16": _Encoding(4, 2, "bgra"),
    "8UC1": _Encoding(1, 1, "gray"),
    "8UC3": _Encoding(3, 1, "bgr"),
    "8UC4": _Encoding(4, 1, "bgra"),
    "16UC1": _Encoding(1, 2, "gray"),
    "16UC3": _Encoding(3, 2, "bgr"),
    "16UC4": _Encoding(4, 2, "bgra"),
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)

_NATIVE_BIG = sys.byteorder == "big"


# --------------------------------------------------------------------------- raw images


def image_to_array(
    height: Any,
    width: Any,
    encoding: Any,
    is_bigendian: Any,
    step: Any,
    data: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode the fields of a ``sensor_msgs/Image`` into a (H, W, C) array.

    ``data`` may be bytes, bytearray, memoryview, ``array.array('B')`` (what rclpy
    delivers) or a C-contiguous uint8 numpy array. The result is a view on
    ``data`` (no copy) except for 16-bit data in non-native byte order, which is
    swapped into a native-order copy. Raises ImageConversionError on any
    inconsistency; see the module docstring for the exact rules.
    """
    _check_positive_limit("max_pixels", max_pixels)
    spec = _lookup_encoding(encoding)
    big = _parse_endianness(is_bigendian)
    height = _as_size("height", height)
    width = _as_size("width", width)
    if height * width > max_pixels:
        raise ImageConversionError(
            "too_large",
            f"{width}x{height} image has {height * width} pixels, more than "
            f"max_pixels={max_pixels}; raise max_pixels if such images are expected",
        )
    step = _as_step(step)
    row_bytes = width * spec.pixel_bytes
    _check_step(step, row_bytes, spec, encoding)
    buffer = _as_byte_array(data)
    expected = step * height
    if buffer.size != expected:
        reason = "short_data" if buffer.size < expected else "long_data"
        raise ImageConversionError(
            reason,
            f"data has {buffer.size} bytes but step*height = {step}*{height} = {expected}; "
            "the publisher's fields do not describe its buffer",
        )
    dtype = _element_dtype(spec, big)
    # np.ndarray (unlike as_strided) re-checks that the strided extent fits the
    # buffer, so a validation bug here cannot turn into an out-of-bounds read.
    array = np.ndarray(
        shape=(height, width, spec.channels),
        dtype=dtype,
        buffer=buffer,
        offset=0,
        strides=(step, spec.pixel_bytes, spec.bytes_per_channel),
    )
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))  # the only copy
    return DecodedImage(array, spec.channel_order)


def array_to_image_fields(
    array: np.ndarray,
    encoding: str,
    *,
    step: int | None = None,
    is_bigendian: bool | int | None = None,
) -> dict[str, Any]:
    """Encode a (H, W) or (H, W, C) array as ``sensor_msgs/Image`` field values.

    The array's channels must already be in the encoding's order (e.g. RGB for
    ``rgb8``). ``step`` defaults to the unpadded row size; a larger value pads each
    row with zero bytes. ``is_bigendian`` defaults to this machine's order. Returns
    ``dict(height, width, encoding, is_bigendian, step, data: bytes)``.
    """
    spec = _lookup_encoding(encoding)
    pixels = _as_image_array(array)
    height, width, channels = pixels.shape
    if channels != spec.channels:
        raise ImageConversionError(
            "bad_array", f"{encoding} needs {spec.channels} channel(s), the array has {channels}"
        )
    if pixels.dtype.kind != "u" or pixels.dtype.itemsize != spec.bytes_per_channel:
        wanted = "uint8" if spec.bytes_per_channel == 1 else "uint16"
        raise ImageConversionError(
            "bad_array", f"{encoding} needs a {wanted} array, got {pixels.dtype}"
        )
    if height == 0 or width == 0:
        raise ImageConversionError("zero_size", f"array of shape {pixels.shape} has no pixels")
    big = _NATIVE_BIG if is_bigendian is None else _parse_endianness(is_bigendian)
    row_bytes = width * spec.pixel_bytes
    step = row_bytes if step is None else _as_step(step)
    _check_step(step, row_bytes, spec, encoding)
    ordered = np.ascontiguousarray(pixels, dtype=_element_dtype(spec, big))
    rows = np.zeros((height, step), dtype=np.uint8)
    rows[:, :row_bytes] = ordered.view(np.uint8).reshape(height, row_bytes)
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "is_bigendian": int(big),
        "step": step,
        "data": rows.tobytes(),
    }


# --------------------------------------------------------------------- compressed images

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_CODEC_NAMES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
# JPEG frame headers (SOF0-SOF15 without DHT C4, JPG C8, DAC CC) carry the size.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length
_JPEG_MAX_SEGMENTS = 4096  # real files have a few dozen; bounds the parse loop
_JPEG_MAX_FILL = 1024  # 0xFF fill bytes allowed before one marker
# End markers (JPEG EOI, PNG IEND) are looked for in this many final bytes, which
# tolerates small trailers and zero padding (e.g. V4L2 MJPEG buffers).
_END_MARKER_WINDOW = 4096


def compressed_to_array(
    format: str,  # noqa: A002 - the sensor_msgs/CompressedImage field name
    data: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_COMPRESSED_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> DecodedImage:
    """Decode the fields of a ``sensor_msgs/CompressedImage`` (JPEG or PNG).

    ``format`` is a ROS format string: ``"jpeg"``, ``"png"`` or image_transport's
    ``"<encoding>; <jpeg|png> compressed <encoding>"``; an empty string means
    "identify the codec by its signature". The payload's signature must agree
    with the format. Image size, bit depth and channels are read from the
    JPEG/PNG header and checked against ``max_pixels`` and ``max_decoded_bytes``
    before OpenCV allocates anything; a decoder warning rejects the image. The
    result is in OpenCV order (``gray``/``bgr``/``bgra``), uint8, or uint16 for
    16-bit PNG.
    """
    _check_positive_limit("max_pixels", max_pixels)
    _check_positive_limit("max_bytes", max_bytes)
    _check_positive_limit("max_decoded_bytes", max_decoded_bytes)
    declared = _codec_from_format(format)
    buffer = _as_byte_array(data)
    if buffer.size == 0:
        raise ImageConversionError("empty_data", "compressed image has no data")
    if buffer.size > max_bytes:
        raise ImageConversionError(
            "too_large",
            f"compressed image has {buffer.size} bytes, more than max_bytes={max_bytes}",
        )
    view = memoryview(buffer)
    actual = _sniff_codec(view)
    if declared is not None and declared != actual:
        raise ImageConversionError(
            "format_mismatch",
            f"format {format!r} says {declared} but the data is {actual}; fix the publisher's format field",
        )
    header = _png_header(view) if actual == "png" else _jpeg_header(view)
    width, height = header.width, header.height
    if width * height > max_pixels:
        raise ImageConversionError(
            "too_large",
            f"{actual} header declares {width}x{height} = {width * height} pixels, "
            f"more than max_pixels={max_pixels}",
        )
    if header.decoded_bytes > max_decoded_bytes:
        raise ImageConversionError(
            "too_large",
            f"{actual} header declares {width}x{height} {header.describe}: decoding needs "
            f"{header.decoded_bytes} bytes, more than max_decoded_bytes={max_decoded_bytes}",
        )
    _check_end_marker(actual, view)
    decoded, messages = _decode_checked(buffer)
    if decoded is None:
        said = f": {messages}" if messages else " (corrupt?)"
        raise ImageConversionError("decode_failed", f"OpenCV could not decode the {actual} data{said}")
    if messages:
        raise ImageConversionError(
            "decode_failed",
            f"the {actual} decoder warned ({messages}): the image is damaged (e.g. cut short and "
            "padded with grey), so it is not used",
        )
    if decoded.nbytes > header.output_bytes:
        # The header arithmetic is what bounds memory; a larger result means it is wrong for this file.
        raise ImageConversionError(
            "decode_failed",
            f"decoded {decoded.shape} {decoded.dtype} ({decoded.nbytes} bytes) exceeds the "
            f"{header.output_bytes} bytes its header allows",
        )
    if decoded.ndim == 2:
        decoded = decoded[:, :, np.newaxis]
    order = {1: "gray", 3: "bgr", 4: "bgra"}.get(decoded.shape[2])
    if order is None or decoded.dtype not in (np.uint8, np.uint16):
        raise ImageConversionError(
            "unsupported_format",
            f"decoded {actual} has {decoded.shape[2]} channel(s) of {decoded.dtype}; "
            "only 1/3/4 channels of uint8/uint16 are supported",
        )
    if decoded.shape[:2] != (height, width):
        # Never expected from a valid file; a disagreement means corrupt data.
        raise ImageConversionError(
            "decode_failed",
            f"decoded size {decoded.shape[1]}x{decoded.shape[0]} differs from the header's {width}x{height}",
        )
    return DecodedImage(decoded, order)


def array_to_compressed(
    array: np.ndarray,
    fmt: str = "jpeg",
    *,
    quality: int = 95,
    png_compression: int = 3,
) -> dict[str, Any]:
    """Encode a (H, W) or (H, W, C) array in OpenCV order as ``CompressedImage`` fields.

    JPEG takes uint8 gray or BGR; PNG takes uint8 or uint16 gray, BGR or BGRA.
    ``quality`` (1-100) applies to JPEG, ``png_compression`` (0-9) to PNG. The
    format string follows image_transport, e.g. ``"bgr8; jpeg compressed bgr8"``.
    Returns ``dict(format, data: bytes)``.
    """
    codec = _CODEC_NAMES.get(str(fmt).lower())
    if codec is None:
        raise ImageConversionError("unsupported_format", f"fmt must be 'jpeg' or 'png', got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not 0 <= png_compression <= 9:
        raise ValueError(f"png_compression must be in 0..9, got {png_compression}")
    pixels = _as_image_array(array)
    height, width, channels = pixels.shape
    allowed_channels = (1, 3) if codec == "jpeg" else (1, 3, 4)
    allowed_dtypes = (np.uint8,) if codec == "jpeg" else (np.uint8, np.uint16)
    if channels not in allowed_channels or pixels.dtype not in allowed_dtypes:
        raise ImageConversionError(
            "bad_array",
            f"{codec} cannot hold {channels} channel(s) of {pixels.dtype}; "
            f"allowed: channels {allowed_channels}, dtypes {[np.dtype(d).name for d in allowed_dtypes]}",
        )
    if height == 0 or width == 0:
        raise ImageConversionError("zero_size", f"array of shape {pixels.shape} has no pixels")
    if codec == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)]
    image = pixels[:, :, 0] if channels == 1 else pixels
    try:
        ok, encoded = cv2.imencode(".jpg" if codec == "jpeg" else ".png", image, params)
    except cv2.error as exc:
        raise ImageConversionError("encode_failed", f"OpenCV could not encode {codec}: {exc}") from exc
    if not ok:
        raise ImageConversionError("encode_failed", f"OpenCV could not encode {codec}")
    bits = 8 * pixels.dtype.itemsize
    encoding = {1: f"mono{bits}", 3: f"bgr{bits}", 4: f"bgra{bits}"}[channels]
    return {"format": f"{encoding}; {codec} compressed {encoding}", "data": encoded.tobytes()}


# ------------------------------------------------------------------------------ helpers


def _check_positive_limit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _lookup_encoding(encoding: Any) -> _Encoding:
    spec = _ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if spec is None:
        raise ImageConversionError(
            "unknown_encoding",
            f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}",
        )
    return spec


def _parse_endianness(is_bigendian: Any) -> bool:
    # The message field is uint8; only 0 and 1 have a meaning.
    if isinstance(is_bigendian, (bool, np.bool_)):
        return bool(is_bigendian)
    if isinstance(is_bigendian, (int, np.integer)) and is_bigendian in (0, 1):
        return bool(is_bigendian)
    raise ImageConversionError("bad_endianness", f"is_bigendian must be 0 or 1, got {is_bigendian!r}")


def _as_int(name: str, value: Any, reason: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ImageConversionError(reason, f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ImageConversionError(reason, f"{name} must be an integer, got {value!r}") from None
    if number < 0:
        raise ImageConversionError(reason, f"{name} must not be negative, got {number}")
    return number


def _as_size(name: str, value: Any) -> int:
    number = _as_int(name, value, "bad_field")
    if number == 0:
        raise ImageConversionError("zero_size", f"{name} is 0: the image has no pixels")
    return number


def _as_step(value: Any) -> int:
    return _as_int("step", value, "bad_step")


def _check_step(step: int, row_bytes: int, spec: _Encoding, encoding: str) -> None:
    if step < row_bytes:
        raise ImageConversionError(
            "bad_step", f"step {step} is shorter than one {encoding} row ({row_bytes} bytes)"
        )
    if step % spec.bytes_per_channel:
        raise ImageConversionError(
            "bad_step",
            f"step {step} is not a multiple of {encoding}'s {spec.bytes_per_channel}-byte element",
        )


def _element_dtype(spec: _Encoding, big: bool) -> np.dtype:
    if spec.bytes_per_channel == 1:
        return np.dtype(np.uint8)
    return np.dtype(">u2" if big else "<u2")


def _as_byte_array(data: Any) -> np.ndarray:
    """Return a 1-D uint8 numpy view of a byte buffer, never a copy."""
    if isinstance(data, str):
        # memoryview would refuse it anyway; this message says what to do.
        raise ImageConversionError("bad_data", "data is a str; pass the raw bytes")
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageConversionError(
            "bad_data",
            f"data must be a byte buffer (bytes, bytearray, memoryview, array.array('B') "
            f"or a uint8 numpy array), got {type(data).__name__}",
        ) from None
    if view.itemsize != 1:
        raise ImageConversionError(
            "bad_data",
            f"data must hold bytes, got items of {view.itemsize} bytes (format {view.format!r})",
        )
    if not view.c_contiguous:
        raise ImageConversionError("bad_data", "data must be a contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise ImageConversionError("bad_data", f"data cannot be read as bytes: {exc}") from None
    return np.frombuffer(view, dtype=np.uint8)


def _as_image_array(array: Any) -> np.ndarray:
    pixels = np.asarray(array)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.ndim != 3:
        raise ImageConversionError(
            "bad_array", f"array must be (H, W) or (H, W, C), got shape {pixels.shape}"
        )
    return pixels


def _codec_from_format(fmt: Any) -> str | None:
    if not isinstance(fmt, str):
        raise ImageConversionError("unsupported_format", f"format must be a string, got {fmt!r}")
    text = fmt.strip().lower()
    if not text:
        return None
    # "jpeg" | "png" | "<src encoding>; <codec> compressed <dst encoding>"
    parts = text.split(";")
    words = parts[-1].split() if len(parts) <= 2 else []
    if words and words[0] == "compresseddepth":
        raise ImageConversionError(
            "unsupported_format",
            f"format {fmt!r} is compressedDepth, which is not supported; subscribe to the raw or "
            "the 'compressed' transport instead",
        )
    codec = _CODEC_NAMES.get(words[0]) if words else None
    if codec is None:
        raise ImageConversionError(
            "unsupported_format",
            f"format {fmt!r} names no supported codec; expected 'jpeg', 'png' or "
            "'<encoding>; <jpeg|png> compressed <encoding>'",
        )
    return codec


def _sniff_codec(view: memoryview) -> str:
    if view[: len(_PNG_SIGNATURE)] == _PNG_SIGNATURE:
        return "png"
    if view[: len(_JPEG_SIGNATURE)] == _JPEG_SIGNATURE:
        return "jpeg"
    raise ImageConversionError("decode_failed", "data starts with neither a JPEG nor a PNG signature")


@dataclass(frozen=True)
class _Header:
    """What a JPEG/PNG header says about the decoded image and the decoder's memory."""

    width: int
    height: int
    output_bytes: int  # the array OpenCV returns (IMREAD_UNCHANGED)
    decoded_bytes: int  # that plus what the decoder holds for a whole image (progressive JPEG)
    describe: str  # e.g. "16-bit, 4 channel(s)", for messages


# PNG colour type -> (channels OpenCV returns, allowed bit depths). Types 2 and 3 gain an
# alpha channel (BGRA) when a tRNS chunk is present; gray (0) ignores tRNS.
_PNG_COLOUR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (3, (1, 2, 4, 8)), 4: (4, (8, 16)),
                     6: (4, (8, 16))}
_PNG_MAX_CHUNKS = 4096  # chunks looked at before IDAT; bounds the walk
# Progressive JPEG frames: the decoder buffers every DCT coefficient (2 bytes) of the image.
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _png_header(view: memoryview) -> _Header:
    # Signature (8), then the IHDR chunk: length (4), b"IHDR", width (4), height (4),
    # bit depth (1), colour type (1), compression, filter, interlace, CRC.
    if len(view) < 26:
        raise ImageConversionError("truncated", f"PNG of {len(view)} bytes ends inside its header")
    if view[12:16] != b"IHDR":
        raise ImageConversionError("decode_failed", "PNG does not start with an IHDR chunk")
    width = int.from_bytes(view[16:20], "big")
    height = int.from_bytes(view[20:24], "big")
    if width == 0 or height == 0:
        raise ImageConversionError("decode_failed", f"PNG header declares a {width}x{height} image")
    depth, colour = view[24], view[25]
    channels, depths = _PNG_COLOUR_TYPES.get(colour, (0, ()))
    if depth not in depths:
        raise ImageConversionError("decode_failed", f"PNG header declares colour type {colour} at {depth} bits")
    if colour in (2, 3) and _png_has_chunk_before_idat(view, b"tRNS"):
        channels = 4
    output = width * height * channels * (2 if depth == 16 else 1)
    # libpng decodes straight into OpenCV's array (row pointers), interlaced images included.
    return _Header(width, height, output, output, f"{depth}-bit, {channels} channel(s)")


def _png_has_chunk_before_idat(view: memoryview, name: bytes) -> bool:
    pos = 8  # after the signature; every chunk: length (4), type (4), data, CRC (4)
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 8 > len(view):
            return False  # cut short: the end-marker check or the decoder refuses it
        kind = bytes(view[pos + 4 : pos + 8])
        if kind == name:
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + int.from_bytes(view[pos : pos + 4], "big")
    raise ImageConversionError("decode_failed", f"PNG: no image data in its first {_PNG_MAX_CHUNKS} chunks")


def _jpeg_header(view: memoryview) -> _Header:
    # Walk the marker segments after SOI up to the frame header (SOFn), which
    # holds the size; it must come before the first scan (SOS).
    size = len(view)
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos >= size:
            break
        if view[pos] != 0xFF:
            raise ImageConversionError("decode_failed", f"JPEG: no marker at byte {pos}")
        fill_end = min(size, pos + _JPEG_MAX_FILL)
        while pos < fill_end and view[pos] == 0xFF:
            pos += 1
        if pos >= size:
            break
        if pos == fill_end:
            raise ImageConversionError("decode_failed", f"JPEG: run of 0xFF bytes before byte {pos}")
        marker = view[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            raise ImageConversionError("decode_failed", "JPEG has no frame header before its scan data")
        if pos + 2 > size:
            break
        length = int.from_bytes(view[pos : pos + 2], "big")
        if length < 2:
            raise ImageConversionError("decode_failed", f"JPEG segment length {length} at byte {pos}")
        if marker in _JPEG_SOF_MARKERS:
            return _jpeg_frame(view, pos, marker)
        pos += length
    else:
        raise ImageConversionError("decode_failed", f"JPEG: no frame header in {_JPEG_MAX_SEGMENTS} segments")
    raise ImageConversionError("truncated", f"JPEG of {size} bytes ends before its frame header")


def _jpeg_frame(view: memoryview, pos: int, marker: int) -> _Header:
    # Frame header at pos: length (2), precision (1), height (2), width (2), components (1),
    # then per component: id (1), sampling factors H << 4 | V (1), quantisation table (1).
    if pos + 8 > len(view):
        raise ImageConversionError("truncated", f"JPEG of {len(view)} bytes ends inside its frame header")
    precision = view[pos + 2]
    height = int.from_bytes(view[pos + 3 : pos + 5], "big")
    width = int.from_bytes(view[pos + 5 : pos + 7], "big")
    components = view[pos + 7]
    if width == 0 or height == 0:
        # Height 0 means "defined later by DNL", which libjpeg cannot decode.
        raise ImageConversionError("decode_failed", f"JPEG frame header declares {width}x{height}")
    if components == 0:
        raise ImageConversionError("decode_failed", "JPEG frame header declares no components")
    if pos + 8 + 3 * components > len(view):
        raise ImageConversionError("truncated", f"JPEG of {len(view)} bytes ends inside its frame header")
    factors = [(view[pos + 9 + 3 * i] >> 4, view[pos + 9 + 3 * i] & 15) for i in range(components)]
    if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in factors):
        raise ImageConversionError("decode_failed", f"JPEG sampling factors {factors} out of range 1..4")
    sample_bytes = 2 if precision > 8 else 1
    output = width * height * (1 if components == 1 else 3) * sample_bytes  # gray, or BGR (also from CMYK)
    coefficients = 0
    if marker in _JPEG_PROGRESSIVE:
        h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
        for h, v in factors:
            # 8x8 blocks of the component, padded to whole MCUs, 64 coefficients of 2 bytes each.
            blocks_w = _ceil_div(_ceil_div(width * h, h_max), 8)
            blocks_h = _ceil_div(_ceil_div(height * v, v_max), 8)
            blocks_w += -blocks_w % h
            blocks_h += -blocks_h % v
            coefficients += blocks_w * blocks_h * 128
    kind = "progressive, " if coefficients else ""
    return _Header(width, height, output, output + coefficients,
                   f"{kind}{precision}-bit, {components} component(s)")


def _check_end_marker(codec: str, view: memoryview) -> None:
    # Some OpenCV builds (4.x) decode a truncated JPEG into a partly grey image
    # with only a warning; checking the end marker makes truncation an error
    # on every version. Entropy-coded JPEG data cannot contain FF D9 (0xFF is
    # byte-stuffed), so the marker's presence near the end is a sound test.
    tail = bytes(view[-_END_MARKER_WINDOW:])
    marker = b"\xff\xd9" if codec == "jpeg" else b"IEND"
    if marker not in tail:
        raise ImageConversionError(
            "truncated", f"{codec} data of {len(view)} bytes has no end marker: truncated in transit?"
        )


# ------------------------------------------------------------------ decoding with warnings seen

# OpenCV's JPEG decoder keeps libjpeg's default message handler, which prints a
# warning ("Corrupt JPEG data: premature end of data segment") with fprintf to the
# C stderr and decodes on, filling what is missing with grey; libpng prints
# "libpng warning: ..." the same way. OpenCV exposes neither a warning count nor
# a callback, and cv2.utils.logging does not reach these messages (they bypass
# OpenCV's logger). So while OpenCV decodes, file descriptor 2 points at a
# private in-memory file, and whatever the decoder printed there is a warning.
#
# Alternatives rejected: PIL with ImageFile.LOAD_TRUNCATED_IMAGES = False decodes
# the cut-then-EOI-appended JPEG without complaint (its libjpeg message handler is
# silent, and no data is missing from its point of view); parsing the segment
# structure cannot tell a short entropy-coded segment from a complete one
# without Huffman-decoding it; a second decoder would double the decoding cost.
#
# fd 2 is process-wide: output of other threads during a decode lands in the
# same file. Nothing is lost (everything captured is written to the real stderr
# afterwards, so libjpeg's text still shows as before), and lines in rcutils'
# console format (the node's own log records) are not taken for decoder
# messages. Decodes are serialised by a lock so two cannot mix their messages.
_DECODE_LOCK = threading.Lock()
_LOG_RECORD = re.compile(r"^\[(DEBUG|INFO|WARN|ERROR|FATAL)\] \[\d")
_MAX_MESSAGE_CHARS = 300
_capture: dict[str, int] = {"pid": -1, "fd": -1}


def _capture_file() -> int:
    """This process's in-memory file for fd 2 during decodes (a forked child makes its own)."""
    if _capture["pid"] != os.getpid():
        try:
            fd = os.memfd_create("image_convert_stderr", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            with tempfile.TemporaryFile() as tmp:
                fd = os.dup(tmp.fileno())
        _capture.update(pid=os.getpid(), fd=fd)
    return _capture["fd"]


try:
    _LIBC: Any = ctypes.CDLL(None)  # the C library, for fflush
except OSError:  # pragma: no cover - CPython on Linux and macOS can always load it
    _LIBC = None


def _flush_c_stdio() -> None:
    # libjpeg/libpng write through the C library's stderr, unbuffered by default; flushing
    # makes the capture independent of that default.
    try:
        _LIBC.fflush(None)
    except (AttributeError, OSError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # stderr closed or a broken pipe: nowhere to show it


def _decode_checked(buffer: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode`` (IMREAD_UNCHANGED) and what the decoder printed while decoding.

    Returns ``(array or None, messages)``; ``messages`` is empty for a clean decode.
    """
    with _DECODE_LOCK:
        capture = _capture_file()
        os.ftruncate(capture, 0)
        os.lseek(capture, 0, os.SEEK_SET)
        try:
            sys.stderr.flush()  # Python's buffered text so far goes to the real stderr first
        except (AttributeError, OSError, ValueError):
            pass
        _flush_c_stdio()
        try:
            saved = os.dup(2)
        except OSError:
            saved = None  # fd 2 closed: capture anyway, close it again afterwards
        error = ""
        os.dup2(capture, 2)
        try:
            try:
                decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            except cv2.error as exc:
                decoded, error = None, " ".join(str(exc).split())
            _flush_c_stdio()
        finally:
            if saved is None:
                os.close(2)
            else:
                os.dup2(saved, 2)
                os.close(saved)
        printed = os.lseek(capture, 0, os.SEEK_CUR)
        os.lseek(capture, 0, os.SEEK_SET)
        captured = os.read(capture, printed) if printed else b""
    if captured:
        _write_all(2, captured)
    lines = [line.strip() for line in captured.decode("utf-8", "replace").splitlines()]
    messages = [line for line in lines if line and not _LOG_RECORD.match(line)]
    if error:
        messages.append(error)
    text = "; ".join(messages)
    return decoded, text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
