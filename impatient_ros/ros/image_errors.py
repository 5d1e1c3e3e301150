"""The one error type of image conversion and its registry of reasons (pure).

Every reason is a diagnostics counter of the node (``frames_rejected_<reason>``),
so a reason must be registered here before it can be raised.
"""

from __future__ import annotations

__all__ = ["REASONS", "ImageConversionError"]

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
