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
  must not be classified. See :mod:`impatient_ros.ros.decoder_warnings` for how it is detected.
* Bad *tuning* arguments (``max_pixels``, ``quality``, ...) are programming
  errors and raise ``ValueError``, so they never count as message failures.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from impatient_ros.ros.compressed_headers import (
    CODEC_NAMES,
    check_end_marker,
    codec_from_format,
    jpeg_header,
    png_header,
    sniff_codec,
)
from impatient_ros.ros.decoder_warnings import decode_with_warnings
from impatient_ros.ros.image_errors import REASONS, ImageConversionError

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
    declared = codec_from_format(format)
    buffer = _as_byte_array(data)
    if buffer.size == 0:
        raise ImageConversionError("empty_data", "compressed image has no data")
    if buffer.size > max_bytes:
        raise ImageConversionError(
            "too_large",
            f"compressed image has {buffer.size} bytes, more than max_bytes={max_bytes}",
        )
    view = memoryview(buffer)
    actual = sniff_codec(view)
    if declared is not None and declared != actual:
        raise ImageConversionError(
            "format_mismatch",
            f"format {format!r} says {declared} but the data is {actual}; fix the publisher's format field",
        )
    header = png_header(view) if actual == "png" else jpeg_header(view)
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
    check_end_marker(actual, view)
    decoded, messages = decode_with_warnings(buffer)
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
    codec = CODEC_NAMES.get(str(fmt).lower())
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
