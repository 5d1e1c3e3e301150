"""What a PNG or JPEG header declares, read before decoding: codec, size, bit depth, decoded bytes.

Pure byte parsing (no OpenCV): it lets :func:`impatient_ros.ros.image_convert.compressed_to_array`
refuse an image that would decode to too many bytes before any memory is spent,
and notice a payload cut before its end marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from impatient_ros.ros.image_errors import ImageConversionError

__all__ = ["CODEC_NAMES", "CompressedHeader", "check_end_marker", "codec_from_format", "jpeg_header", "png_header",
           "sniff_codec"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
CODEC_NAMES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
# JPEG frame headers (SOF0-SOF15 without DHT C4, JPG C8, DAC CC) carry the size.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length
_JPEG_MAX_SEGMENTS = 4096  # real files have a few dozen; bounds the parse loop
_JPEG_MAX_FILL = 1024  # 0xFF fill bytes allowed before one marker
# End markers (JPEG EOI, PNG IEND) are looked for in this many final bytes, which
# tolerates small trailers and zero padding (e.g. V4L2 MJPEG buffers).
_END_MARKER_WINDOW = 4096


def codec_from_format(fmt: Any) -> str | None:
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
    codec = CODEC_NAMES.get(words[0]) if words else None
    if codec is None:
        raise ImageConversionError(
            "unsupported_format",
            f"format {fmt!r} names no supported codec; expected 'jpeg', 'png' or "
            "'<encoding>; <jpeg|png> compressed <encoding>'",
        )
    return codec


def sniff_codec(view: memoryview) -> str:
    if view[: len(_PNG_SIGNATURE)] == _PNG_SIGNATURE:
        return "png"
    if view[: len(_JPEG_SIGNATURE)] == _JPEG_SIGNATURE:
        return "jpeg"
    raise ImageConversionError("decode_failed", "data starts with neither a JPEG nor a PNG signature")


@dataclass(frozen=True)
class CompressedHeader:
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


def png_header(view: memoryview) -> CompressedHeader:
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
    return CompressedHeader(width, height, output, output, f"{depth}-bit, {channels} channel(s)")


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


def jpeg_header(view: memoryview) -> CompressedHeader:
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


def _jpeg_frame(view: memoryview, pos: int, marker: int) -> CompressedHeader:
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
    return CompressedHeader(width, height, output, output + coefficients,
                   f"{kind}{precision}-bit, {components} component(s)")


def check_end_marker(codec: str, view: memoryview) -> None:
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
