"""Tests for impatient_ros.ros.image_convert: round trips, zero-copy, every rejection, fuzzing.

The expected layout of each encoding is written out here independently of the
module's own table, and the fuzz test compares against a naive row-by-row
decoder, so a wrong table or a wrong stride in the module fails a test.
"""

from __future__ import annotations

import array
import importlib.metadata
import io
import json
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import cv2

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from impatient_ros.ros import image_convert
from impatient_ros.ros.image_convert import (
    DEFAULT_MAX_DECODED_BYTES,
    REASONS,
    SUPPORTED_ENCODINGS,
    DecodedImage,
    ImageConversionError,
    array_to_compressed,
    array_to_image_fields,
    compressed_to_array,
    image_to_array,
)

# encoding -> (channels, bytes per channel, channel order); from sensor_msgs/image_encodings
EXPECTED = {
    "mono8": (1, 1, "gray"),
    "mono16": (1, 2, "gray"),
    "rgb8": (3, 1, "rgb"),
    "bgr8": (3, 1, "bgr"),
    "rgba8": (4, 1, "rgba"),
    "bgra8": (4, 1, "bgra"),
    "rgb16": (3, 2, "rgb"),
    "bgr16": (3, 2, "bgr"),
    "rgba16": (4, 2, "rgba"),
    "bgra16": (4, 2, "bgra"),
    "8UC1": (1, 1, "gray"),
    "8UC3": (3, 1, "bgr"),
    "8UC4": (4, 1, "bgra"),
    "16UC1": (1, 2, "gray"),
    "16UC3": (3, 2, "bgr"),
    "16UC4": (4, 2, "bgra"),
}
EIGHT_BIT = [name for name, (_, size, _) in EXPECTED.items() if size == 1]
SIXTEEN_BIT = [name for name, (_, size, _) in EXPECTED.items() if size == 2]
NATIVE_BIG = int(sys.byteorder == "big")


def random_image(encoding: str, height: int = 5, width: int = 7, seed: int = 0) -> np.ndarray:
    channels, size, _ = EXPECTED[encoding]
    dtype = np.uint8 if size == 1 else np.uint16
    high = np.iinfo(dtype).max
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, (height, width, channels), dtype=dtype, endpoint=True)


def decode(fields: dict, **kwargs) -> DecodedImage:
    return image_to_array(
        fields["height"], fields["width"], fields["encoding"], fields["is_bigendian"],
        fields["step"], fields["data"], **kwargs,
    )


def raw_fields(**overrides) -> dict:
    """A valid 3x4 rgb8 image's fields with some replaced."""
    fields = {"height": 3, "width": 4, "encoding": "rgb8", "is_bigendian": 0, "step": 12, "data": bytes(36)}
    fields.update(overrides)
    return fields


def test_supported_encodings_match_the_documented_table():
    assert set(SUPPORTED_ENCODINGS) == set(EXPECTED)


# ------------------------------------------------------------------------ raw round trips


@pytest.mark.parametrize("big_endian", [0, 1])
@pytest.mark.parametrize("padding_elements", [0, 3])
@pytest.mark.parametrize("encoding", sorted(EXPECTED))
def test_raw_round_trip(encoding, padding_elements, big_endian):
    channels, size, order = EXPECTED[encoding]
    image = random_image(encoding)
    step = image.shape[1] * channels * size + padding_elements * size
    fields = array_to_image_fields(image, encoding, step=step, is_bigendian=big_endian)
    assert fields["step"] == step and fields["is_bigendian"] == big_endian
    assert len(fields["data"]) == step * image.shape[0]

    decoded = decode(fields)

    assert decoded.channel_order == order
    assert decoded.array.shape == image.shape == (decoded.height, decoded.width, decoded.channels)
    assert decoded.dtype == image.dtype and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded.array, image)


def test_sixteen_bit_byte_order_is_on_the_wire_and_converted_to_native():
    image = np.array([[0x0102, 0xA0B0]], dtype=np.uint16)
    big = array_to_image_fields(image, "mono16", is_bigendian=1)
    little = array_to_image_fields(image, "16UC1", is_bigendian=0)
    assert big["data"] == b"\x01\x02\xa0\xb0"
    assert little["data"] == b"\x02\x01\xb0\xa0"
    for fields in (big, little):
        decoded = decode(fields)
        assert decoded.dtype == np.dtype(np.uint16) and decoded.dtype.isnative
        np.testing.assert_array_equal(decoded.array[:, :, 0], image)


def test_two_dimensional_array_is_one_channel_and_default_order_is_native():
    image = random_image("mono8")[:, :, 0]
    fields = array_to_image_fields(image, "mono8")
    assert fields["step"] == image.shape[1]
    assert fields["is_bigendian"] == NATIVE_BIG
    np.testing.assert_array_equal(decode(fields).array[:, :, 0], image)


def test_8uc3_is_read_as_bgr_and_8uc4_as_bgra():
    assert decode(array_to_image_fields(random_image("8UC3"), "8UC3")).channel_order == "bgr"
    assert decode(array_to_image_fields(random_image("8UC4"), "8UC4")).channel_order == "bgra"


# ---------------------------------------------------------------------------- zero copy


def containers(payload: bytes):
    """The byte containers a caller may hand over, each with the object whose memory is used."""
    as_bytes = bytes(payload)
    as_bytearray = bytearray(payload)
    as_array = array.array("B", payload)
    as_numpy = np.frombuffer(bytearray(payload), dtype=np.uint8)
    return {
        "bytes": (as_bytes, as_bytes),
        "bytearray": (as_bytearray, as_bytearray),
        "memoryview": (memoryview(as_bytearray), as_bytearray),
        "array.array": (as_array, as_array),
        "numpy": (as_numpy, as_numpy),
    }


@pytest.mark.parametrize("container", ["bytes", "bytearray", "memoryview", "array.array", "numpy"])
@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("encoding", EIGHT_BIT)
def test_eight_bit_decoding_is_a_view_without_copy(encoding, padding, container):
    image = random_image(encoding)
    step = image.shape[1] * image.shape[2] + padding
    fields = array_to_image_fields(image, encoding, step=step)
    data, owner = containers(fields["data"])[container]
    decoded = decode({**fields, "data": data})
    assert np.shares_memory(decoded.array, np.frombuffer(owner, dtype=np.uint8))
    np.testing.assert_array_equal(decoded.array, image)


def test_native_sixteen_bit_is_a_view_and_foreign_order_is_a_native_copy():
    image = random_image("16UC1")
    native = array_to_image_fields(image, "16UC1", step=image.shape[1] * 2 + 4, is_bigendian=NATIVE_BIG)
    foreign = array_to_image_fields(image, "16UC1", is_bigendian=1 - NATIVE_BIG)
    native_buffer = np.frombuffer(bytearray(native["data"]), dtype=np.uint8)
    foreign_buffer = np.frombuffer(bytearray(foreign["data"]), dtype=np.uint8)
    as_view = decode({**native, "data": native_buffer})
    as_copy = decode({**foreign, "data": foreign_buffer})
    assert np.shares_memory(as_view.array, native_buffer)
    assert not np.shares_memory(as_copy.array, foreign_buffer)
    assert as_copy.dtype.isnative
    np.testing.assert_array_equal(as_view.array, image)
    np.testing.assert_array_equal(as_copy.array, image)


def test_view_on_bytes_is_read_only():
    decoded = decode(array_to_image_fields(random_image("rgb8"), "rgb8"))
    assert not decoded.array.flags.writeable


def test_real_ros2_image_message_decodes_zero_copy():
    sensor_msgs = pytest.importorskip("sensor_msgs.msg", reason="ROS 2 sensor_msgs wheel not installed")
    image = random_image("bgr8")
    fields = array_to_image_fields(image, "bgr8", step=image.shape[1] * 3 + 2)
    message = sensor_msgs.Image(**fields)
    assert isinstance(message.data, array.array)  # what rclpy delivers
    decoded = image_to_array(
        message.height, message.width, message.encoding, message.is_bigendian, message.step, message.data
    )
    assert np.shares_memory(decoded.array, np.frombuffer(message.data, dtype=np.uint8))
    np.testing.assert_array_equal(decoded.array, image)


# ---------------------------------------------------------------------- raw rejections

MALFORMED_RAW = {
    "unknown encoding": (raw_fields(encoding="yuv422"), "unknown_encoding"),
    "encoding in wrong case": (raw_fields(encoding="RGB8"), "unknown_encoding"),
    "encoding not a string": (raw_fields(encoding=b"rgb8"), "unknown_encoding"),
    "float encoding": (raw_fields(encoding="32FC1", step=16, data=bytes(48)), "unknown_encoding"),
    "is_bigendian 2": (raw_fields(is_bigendian=2), "bad_endianness"),
    "is_bigendian None": (raw_fields(is_bigendian=None), "bad_endianness"),
    "is_bigendian str": (raw_fields(is_bigendian="0"), "bad_endianness"),
    "zero height": (raw_fields(height=0, data=b""), "zero_size"),
    "zero width": (raw_fields(width=0, step=0, data=b""), "zero_size"),
    "negative height": (raw_fields(height=-3), "bad_field"),
    "float width": (raw_fields(width=4.0), "bad_field"),
    "bool height": (raw_fields(height=True), "bad_field"),
    "huge image": (raw_fields(height=100_000, width=100_000, step=300_000), "too_large"),
    "step shorter than a row": (raw_fields(step=11, data=bytes(33)), "bad_step"),
    "negative step": (raw_fields(step=-12), "bad_step"),
    "odd step for 16-bit": (raw_fields(encoding="mono16", step=9, data=bytes(27)), "bad_step"),
    "data one byte short": (raw_fields(data=bytes(35)), "short_data"),
    "last row without padding": (raw_fields(step=14, data=bytes(14 * 2 + 12)), "short_data"),
    "empty data": (raw_fields(data=b""), "short_data"),
    "data one byte long": (raw_fields(data=bytes(37)), "long_data"),
    "data a list": (raw_fields(data=[0] * 36), "bad_data"),
    "data a str": (raw_fields(data="x" * 36), "bad_data"),
    "data uint16 array": (raw_fields(data=np.zeros(18, dtype=np.uint16)), "bad_data"),
    "data array('H')": (raw_fields(data=array.array("H", bytes(36))), "bad_data"),
    "data not contiguous": (raw_fields(data=np.zeros(72, dtype=np.uint8)[::2]), "bad_data"),
    "data None": (raw_fields(data=None), "bad_data"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RAW))
def test_malformed_raw_image_raises_its_reason(case):
    fields, reason = MALFORMED_RAW[case]
    with pytest.raises(ImageConversionError) as caught:
        decode(fields)
    assert caught.value.reason == reason
    assert reason in str(caught.value)


def test_all_reasons_are_registered():
    with pytest.raises(AssertionError):
        ImageConversionError("no_such_reason", "typo")
    assert {case[1] for case in MALFORMED_RAW.values()} <= REASONS


def test_huge_declared_image_is_refused_without_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(ImageConversionError) as caught:
            image_to_array(100_000, 100_000, "rgba16", 0, 800_000, bytes(16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "too_large"
    assert peak < 1_000_000


def test_max_pixels_is_configurable_and_validated():
    fields = array_to_image_fields(random_image("mono8", 4, 4), "mono8")
    assert decode(fields, max_pixels=16).array.shape == (4, 4, 1)
    with pytest.raises(ImageConversionError, match="max_pixels"):
        decode(fields, max_pixels=15)
    with pytest.raises(ValueError, match="positive"):
        decode(fields, max_pixels=0)


def test_array_to_image_fields_rejects_what_the_encoding_cannot_hold():
    cases = [
        (random_image("rgb8"), "mono8", "bad_array"),
        (random_image("mono16"), "mono8", "bad_array"),
        (random_image("rgb8").astype(np.float32), "rgb8", "bad_array"),
        (np.zeros((2, 2, 3, 1), np.uint8), "rgb8", "bad_array"),
        (np.zeros((0, 4, 3), np.uint8), "rgb8", "zero_size"),
        (random_image("rgb8"), "rgb9", "unknown_encoding"),
    ]
    for image, encoding, reason in cases:
        with pytest.raises(ImageConversionError) as caught:
            array_to_image_fields(image, encoding)
        assert caught.value.reason == reason, (encoding, image.shape, image.dtype)
    for step in (20, 29):  # shorter than a 7-pixel mono16 row; odd for 16-bit
        with pytest.raises(ImageConversionError) as caught:
            array_to_image_fields(random_image("mono16", width=15), "mono16", step=step)
        assert caught.value.reason == "bad_step"


# ------------------------------------------------------------------------ raw fuzzing

VALID_ENCODINGS = st.sampled_from(sorted(EXPECTED))
ODD_ENCODINGS = st.one_of(
    st.sampled_from(["MONO8", "rgb8 ", "32FC1", "8UC2", "yuv422", "", None, b"mono8", 8]), st.text(max_size=8)
)
VALID_SIZES = st.integers(1, 9)
ODD_SIZES = st.sampled_from([0, -1, 100_000, 2**31, 2**64, 2.0, "3", None, True])
VALID_ENDIANNESS = st.sampled_from([0, 1, True, False])
ODD_ENDIANNESS = st.sampled_from([2, -1, 255, None, "1", 1.0])


def naive_decode(height, width, encoding, is_bigendian, step, payload: bytes) -> np.ndarray:
    """Row-by-row reference decoder, written without strides."""
    channels, size, _ = EXPECTED[encoding]
    dtype = np.dtype(np.uint8) if size == 1 else np.dtype(">u2" if is_bigendian else "<u2")
    rows = [
        np.frombuffer(payload[row * step : row * step + width * channels * size], dtype=dtype)
        for row in range(height)
    ]
    return np.stack(rows).reshape(height, width, channels).astype(dtype.newbyteorder("="))


@st.composite
def fuzz_fields(draw):
    # About half of the examples are consistent fields (they must decode
    # correctly); the others break one field, or mix odd values into all.
    fields = ["encoding", "height", "width", "endianness", "step", "length", "all"]
    broken = draw(st.sampled_from(fields))
    broken = "none" if draw(st.booleans()) else broken

    def pick(field, valid, odd):
        if broken == field:
            return draw(odd)
        return draw(st.one_of(valid, odd) if broken == "all" else valid)

    encoding = pick("encoding", VALID_ENCODINGS, ODD_ENCODINGS)
    height = pick("height", VALID_SIZES, ODD_SIZES)
    width = pick("width", VALID_SIZES, ODD_SIZES)
    is_bigendian = pick("endianness", VALID_ENDIANNESS, ODD_ENDIANNESS)
    channels, size, _ = EXPECTED.get(encoding, (3, 1, "")) if isinstance(encoding, str) else (3, 1, "")
    row_bytes = width * channels * size if isinstance(width, int) and width > 0 else 0
    step = pick(
        "step",
        st.integers(0, 4).map(lambda pad: row_bytes + pad * size),  # row padding in whole elements
        st.one_of(
            st.integers(-2, 80),
            st.integers(-2, 9).map(lambda pad: row_bytes + pad),
            st.sampled_from([2**40, 1.5, None]),
        ),
    )
    exact = step * height if isinstance(step, int) and isinstance(height, int) else 0
    exact = exact if 0 <= exact <= 4096 else 0
    near_exact = st.integers(-3, 3).map(lambda delta: max(0, exact + delta))
    length = pick("length", st.just(exact), st.one_of(st.integers(0, 600), near_exact))
    payload = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(length)
    container = draw(st.sampled_from(["bytes", "bytearray", "memoryview", "array.array", "numpy"]))
    data = containers(payload)[container][0]
    return height, width, encoding, is_bigendian, step, data, payload


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_fields())
def test_fuzz_raw_fields_decode_consistently_or_raise(fields):
    height, width, encoding, is_bigendian, step, data, payload = fields
    try:
        decoded = image_to_array(height, width, encoding, is_bigendian, step, data, max_pixels=10**6)
    except ImageConversionError as exc:
        assert exc.reason in REASONS
        event(f"rejected: {exc.reason}")  # see pytest --hypothesis-show-statistics
        return
    event("decoded")
    channels, size, order = EXPECTED[encoding]
    assert decoded.array.shape == (height, width, channels)
    assert decoded.channel_order == order
    assert decoded.dtype == np.dtype(np.uint8 if size == 1 else np.uint16) and decoded.dtype.isnative
    assert len(payload) == step * height
    expected = naive_decode(height, width, encoding, is_bigendian, step, payload)
    np.testing.assert_array_equal(decoded.array, expected)


# ----------------------------------------------------------------- compressed images


def test_jpeg_round_trip_colour_and_gray():
    # Smooth content so that JPEG's loss stays small and the check is meaningful.
    ramp = np.linspace(0, 255, 32, dtype=np.float64)
    colour = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), axis=-1).astype(np.uint8)
    for image, order, encoding in ((colour, "bgr", "bgr8"), (colour[:, :, :1], "gray", "mono8")):
        message = array_to_compressed(image, "jpeg", quality=95)
        assert message["format"] == f"{encoding}; jpeg compressed {encoding}"
        decoded = compressed_to_array(message["format"], message["data"])
        assert decoded.channel_order == order and decoded.dtype == np.uint8
        assert decoded.array.shape == image.shape
        assert np.abs(decoded.array.astype(int) - image.astype(int)).mean() < 3


@pytest.mark.parametrize(
    "encoding, order",
    [("mono8", "gray"), ("bgr8", "bgr"), ("bgra8", "bgra"), ("mono16", "gray"), ("bgr16", "bgr")],
)
def test_png_round_trip_is_exact_for_8_and_16_bit(encoding, order):
    image = random_image(encoding, 9, 11)
    message = array_to_compressed(image, "png")
    assert message["format"] == f"{encoding}; png compressed {encoding}"
    decoded = compressed_to_array(message["format"], message["data"])
    assert decoded.channel_order == order
    assert decoded.dtype == image.dtype
    np.testing.assert_array_equal(decoded.array, image)


@pytest.mark.parametrize(
    "fmt", ["jpeg", "JPEG", "jpg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8", ""]
)
def test_ros_jpeg_format_strings_are_understood(fmt):
    data = array_to_compressed(random_image("bgr8"), "jpeg")["data"]
    assert compressed_to_array(fmt, data).array.shape == (5, 7, 3)


@pytest.mark.parametrize("fmt", ["png", "mono8; png compressed mono8", " png "])
def test_ros_png_format_strings_are_understood(fmt):
    data = array_to_compressed(random_image("mono8"), "png")["data"]
    assert compressed_to_array(fmt, data).channel_order == "gray"


@pytest.mark.parametrize("container", ["bytes", "bytearray", "memoryview", "array.array", "numpy"])
def test_compressed_data_in_every_container(container):
    image = random_image("bgra8")
    data = containers(array_to_compressed(image, "png")["data"])[container][0]
    np.testing.assert_array_equal(compressed_to_array("png", data).array, image)


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    return array_to_compressed(random_image("bgr8", 24, 32, seed=3), "jpeg")["data"]


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    return array_to_compressed(random_image("bgr8", 24, 32, seed=4), "png")["data"]


def forged_png_size(png: bytes, width: int, height: int) -> bytes:
    # CRC left stale on purpose: the size check must come before any decoding.
    return png[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:]


def forged_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    sof = max(jpeg.find(bytes([0xFF, marker])) for marker in (0xC0, 0xC1, 0xC2))
    return jpeg[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9 :]


def test_header_size_is_checked_before_decoding(jpeg_bytes, png_bytes):
    tracemalloc.start()
    try:
        for fmt, data in (("png", forged_png_size(png_bytes, 100_000, 100_000)),
                          ("jpeg", forged_jpeg_size(jpeg_bytes, 65_000, 65_000))):
            with pytest.raises(ImageConversionError) as caught:
                compressed_to_array(fmt, data)
            assert caught.value.reason == "too_large", fmt
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(ImageConversionError, match="max_pixels"):
        compressed_to_array("jpeg", jpeg_bytes, max_pixels=24 * 32 - 1)
    assert compressed_to_array("jpeg", jpeg_bytes, max_pixels=24 * 32).array.shape == (24, 32, 3)


def corrupt_payloads(jpeg: bytes, png: bytes) -> dict:
    flipped = bytearray(png)
    flipped[40:60] = bytes(20)  # inside IDAT: zlib data and CRC broken
    return {
        "empty jpeg": ("jpeg", b"", "empty_data"),
        "empty array": ("png", np.zeros(0, np.uint8), "empty_data"),
        "jpeg cut in half": ("jpeg", jpeg[: len(jpeg) // 2], "truncated"),
        "jpeg cut at a third, EOI re-appended": ("jpeg", jpeg[: len(jpeg) // 3] + b"\xff\xd9", "decode_failed"),
        "jpeg without EOI": ("jpeg", jpeg[:-2], "truncated"),
        "jpeg cut in header": ("jpeg", jpeg[:40], "truncated"),
        "png cut in half": ("png", png[: len(png) // 2], "truncated"),
        "png cut in IHDR": ("png", png[:20], "truncated"),
        "png without IEND": ("png", png[:-12], "truncated"),
        "png with broken IDAT": ("png", bytes(flipped), "decode_failed"),
        "garbage": ("jpeg", b"this is not an image at all", "decode_failed"),
        "signature only": ("jpeg", b"\xff\xd8\xff", "truncated"),
        "jpeg scan before frame": ("jpeg", b"\xff\xd8\xff\xda\x00\x02" + jpeg[-100:], "decode_failed"),
        "jpeg zero-length segment": ("jpeg", b"\xff\xd8\xff\xe0\x00\x00" + jpeg[-100:], "decode_failed"),
        "png claims jpeg": ("jpeg", png, "format_mismatch"),
        "jpeg claims png": ("bgr8; png compressed bgr8", jpeg, "format_mismatch"),
        "compressedDepth": ("16UC1; compressedDepth png", png, "unsupported_format"),
        "tiff": ("tiff", png, "unsupported_format"),
        "theora": ("bgr8; theora", jpeg, "unsupported_format"),
        "format not a string": (None, jpeg, "unsupported_format"),
        "data a list": ("jpeg", list(jpeg), "bad_data"),
    }


def test_corrupt_truncated_and_mislabelled_payloads_raise_their_reason(jpeg_bytes, png_bytes):
    for case, (fmt, data, reason) in corrupt_payloads(jpeg_bytes, png_bytes).items():
        with pytest.raises(ImageConversionError) as caught:
            compressed_to_array(fmt, data)
        assert caught.value.reason == reason, case


def test_compressed_byte_limit(jpeg_bytes):
    with pytest.raises(ImageConversionError) as caught:
        compressed_to_array("jpeg", jpeg_bytes, max_bytes=len(jpeg_bytes) - 1)
    assert caught.value.reason == "too_large"
    assert compressed_to_array("jpeg", jpeg_bytes, max_bytes=len(jpeg_bytes)).height == 24


def test_trailing_zero_padding_after_jpeg_is_accepted(jpeg_bytes):
    assert compressed_to_array("jpeg", jpeg_bytes + bytes(512)).array.shape == (24, 32, 3)


def test_array_to_compressed_rejects_what_the_codec_cannot_hold():
    cases = [
        (random_image("mono16"), "jpeg", "bad_array"),
        (random_image("bgra8"), "jpeg", "bad_array"),
        (np.zeros((4, 4, 2), np.uint8), "png", "bad_array"),
        (np.zeros((4, 4, 3), np.float32), "png", "bad_array"),
        (np.zeros((0, 4), np.uint8), "png", "zero_size"),
        (random_image("bgr8"), "webp", "unsupported_format"),
    ]
    for image, fmt, reason in cases:
        with pytest.raises(ImageConversionError) as caught:
            array_to_compressed(image, fmt)
        assert caught.value.reason == reason, (fmt, image.shape, image.dtype)
    with pytest.raises(ValueError):
        array_to_compressed(random_image("bgr8"), "jpeg", quality=0)
    with pytest.raises(ValueError):
        array_to_compressed(random_image("bgr8"), "png", png_compression=10)


@settings(max_examples=300, deadline=None, database=None)
@given(
    codec=st.sampled_from(["jpeg", "png"]),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    fmt=st.sampled_from(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "x"]),
)
def test_fuzz_mutated_compressed_data_decodes_or_raises(codec, cut, edits, fmt, jpeg_bytes, png_bytes):
    payload = bytearray(jpeg_bytes if codec == "jpeg" else png_bytes)
    if cut is not None:
        del payload[cut:]
    for position, value in edits:
        if position < len(payload):
            payload[position] = value
    try:
        decoded = compressed_to_array(fmt, bytes(payload), max_pixels=10_000)
    except ImageConversionError as exc:
        assert exc.reason in REASONS
        event(f"rejected: {exc.reason}")
        return
    event("decoded")
    assert decoded.array.ndim == 3 and decoded.channels in (1, 3, 4)
    assert decoded.height * decoded.width <= 10_000


# ------------------------------------------------------------- decoder warnings reject the frame


def gradient_jpeg(width: int = 640, height: int = 480) -> bytes:
    ramp = (np.add.outer(np.linspace(0, 127, height), np.linspace(0, 127, width))).astype(np.uint8)
    return array_to_compressed(np.repeat(ramp[:, :, None], 3, axis=2), "jpeg")["data"]


def test_jpeg_cut_short_with_its_end_marker_is_rejected_not_classified(capfd):
    """The reported case: a 640x480 JPEG cut at a third, FF D9 re-appended."""
    jpeg = gradient_jpeg()
    cut = jpeg[: len(jpeg) // 3] + b"\xff\xd9"
    # The premise: OpenCV returns an image for it, its bottom 60 % one flat grey.
    premise = cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_UNCHANGED)
    assert premise is not None and premise.shape == (480, 640, 3)
    assert premise[int(0.4 * 480):].std() == 0.0
    capfd.readouterr()
    with pytest.raises(ImageConversionError) as caught:
        compressed_to_array("jpeg", cut)
    assert caught.value.reason == "decode_failed"
    assert "Corrupt JPEG data: premature end of data segment" in caught.value.message
    # libjpeg's own line still reaches stderr (nothing swallowed), and fd 2 is ours again afterwards.
    os.write(2, b"after the decode\n")
    err = capfd.readouterr().err
    assert "Corrupt JPEG data" in err and err.rstrip().endswith("after the decode")
    assert compressed_to_array("jpeg", jpeg).array.shape == (480, 640, 3)  # the whole file is fine
    assert capfd.readouterr().err == ""


def test_jpeg_bit_error_in_the_scan_is_rejected():
    corrupt = bytearray(gradient_jpeg(64, 48))
    corrupt[corrupt.find(b"\xff\xda") + 40] ^= 0x55
    assert cv2.imdecode(np.frombuffer(bytes(corrupt), np.uint8), cv2.IMREAD_UNCHANGED) is not None  # premise
    with pytest.raises(ImageConversionError) as caught:
        compressed_to_array("jpeg", bytes(corrupt))
    assert caught.value.reason == "decode_failed" and "Corrupt JPEG data" in caught.value.message


def fake_decoder(printed: bytes):
    """A cv2.imdecode stand-in that prints to fd 2 (as libjpeg does) and returns a valid image."""
    real = cv2.imdecode

    def imdecode(buffer, flags):
        os.write(2, printed)
        return real(buffer, flags)

    return imdecode


@pytest.mark.parametrize(
    "printed, rejected",
    [
        (b"libpng warning: IDAT: Too much image data\n", True),
        (b"Premature end of JPEG file\n", True),
        (b"[ WARN:0@1.234] global grfmt_png.cpp (123) readData imgcodecs: something odd\n", True),
        (b"[WARN] [1764620000.123456789] [impatient_node]: budget rejected\n", False),  # another thread's log
        (b"\n", False),
    ],
)
def test_what_the_decoder_prints_is_a_warning_but_log_records_are_not(monkeypatch, capfd, png_bytes,
                                                                      printed, rejected):
    monkeypatch.setattr(image_convert.cv2, "imdecode", fake_decoder(printed))
    capfd.readouterr()
    if rejected:
        with pytest.raises(ImageConversionError) as caught:
            compressed_to_array("png", png_bytes)
        assert caught.value.reason == "decode_failed"
        assert printed.decode().strip() in caught.value.message
    else:
        assert compressed_to_array("png", png_bytes).array.shape == (24, 32, 3)
    assert capfd.readouterr().err == printed.decode()  # passed on to the real stderr either way


def test_concurrent_decodes_keep_their_warnings_apart():
    good, cut = gradient_jpeg(320, 240), None
    cut = good[: len(good) // 3] + b"\xff\xd9"
    outcomes: list[tuple[bool, bool]] = []

    def worker(index: int) -> None:
        for round_ in range(6):
            damaged = (index + round_) % 2 == 1
            try:
                compressed_to_array("jpeg", cut if damaged else good)
                outcomes.append((damaged, False))
            except ImageConversionError:
                outcomes.append((damaged, True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 24 and all(damaged == rejected for damaged, rejected in outcomes)


# ------------------------------------------------------------- decoded-size bound


def constant_png(width: int, height: int, channels: int = 4, depth: int = 16, colour_type: int = 6) -> bytes:
    """A valid PNG of zeros, compressed row by row (never holds the decoded image)."""
    row = bytes(1 + width * channels * depth // 8)  # filter byte 0 + the row
    deflate = zlib.compressobj(9)
    idat = b"".join([deflate.compress(row) for _ in range(height)] + [deflate.flush()])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def png_bomb(tmp_path_factory) -> Path:
    """The reported file: 7000x7000 16-bit RGBA (392 MB decoded, 49 MP: under max_pixels) in 381 KB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(constant_png(7000, 7000))
    return path


def test_small_png_declaring_a_huge_16_bit_image_is_refused_from_its_header(png_bomb):
    data = png_bomb.read_bytes()
    assert len(data) < 400_000 and 7000 * 7000 < image_convert.DEFAULT_MAX_PIXELS
    tracemalloc.start()
    try:
        with pytest.raises(ImageConversionError) as caught:
            compressed_to_array("png", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "too_large"
    assert "392000000 bytes" in caught.value.message and "max_decoded_bytes" in caught.value.message
    assert peak < 1_000_000


_PEAK_CHILD = r"""
import json, resource, sys
import numpy as np
from impatient_ros.ros.image_convert import ImageConversionError, array_to_compressed, compressed_to_array
from impatient_ros.runtime.preprocess import Preprocessor

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pre = Preprocessor({"input_size": [32, 32], "channels": "gray", "mean": [0.286], "std": [0.353]})
warm = array_to_compressed(np.zeros((64, 64, 4), np.uint16), "png")["data"]
pre(compressed_to_array("png", warm).array, "bgra")
bomb, allowed = (open(path, "rb").read() for path in sys.argv[1:3])
base = peak()
try:
    compressed_to_array("png", bomb)
    raise SystemExit("the bomb was decoded")
except ImageConversionError as exc:
    reason = exc.reason
after_bomb = peak()
image = compressed_to_array("png", allowed)
x = pre(image.array, image.channel_order)
print(json.dumps({"reason": reason, "bomb": after_bomb - base, "decoded": image.array.nbytes,
                  "allowed": peak() - after_bomb, "shape": list(x.shape)}))
"""


@pytest.mark.slow  # peak RSS of a fresh process that imports torch and decodes a 72 MB frame
def test_one_compressed_frame_costs_bounded_memory_end_to_end(png_bomb, tmp_path):
    """Peak RSS in a fresh process: the bomb adds nothing; a 3000x3000 rgba16 PNG (72 MB decoded,
    under the limit) decoded and preprocessed adds about OpenCV's two copies of the array plus the
    OpenCV path's one uint16 plane (1/4 of it), never a float copy of the frame."""
    allowed = tmp_path / "allowed.png"
    allowed.write_bytes(constant_png(3000, 3000))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(png_bomb), str(allowed)], capture_output=True,
                          text=True, timeout=300, cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reason"] == "too_large" and result["shape"] == [1, 1, 32, 32]
    assert result["bomb"] < 8 * 2**20, result
    assert result["allowed"] < 2.5 * result["decoded"], result


def _pil_png(mode: str, **save) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(5).integers(0, 255, (9, 11, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode in ("LA", "P"):
        image = image.convert(mode)
    elif mode == "1":
        image = image.convert("1")
    elif mode == "I;16":
        image = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)
    out = io.BytesIO()
    image.save(out, format="PNG", **save)
    return out.getvalue()


@pytest.mark.parametrize(
    "case",
    ["gray", "gray+tRNS", "1-bit", "gray16", "gray+alpha", "rgb", "rgb+tRNS", "palette", "palette+tRNS",
     "bgra16", "bgr16"],
)
def test_png_header_predicts_the_decoded_bytes_exactly(case):
    data = {
        "gray": lambda: _pil_png("L"),
        "gray+tRNS": lambda: _pil_png("L", transparency=5),
        "1-bit": lambda: _pil_png("1"),
        "gray16": lambda: _pil_png("I;16"),
        "gray+alpha": lambda: _pil_png("LA"),
        "rgb": lambda: _pil_png("RGB"),
        "rgb+tRNS": lambda: _pil_png("RGB", transparency=(1, 2, 3)),
        "palette": lambda: _pil_png("P"),
        "palette+tRNS": lambda: _pil_png("P", transparency=0),
        "bgra16": lambda: array_to_compressed(random_image("bgra16", 9, 11), "png")["data"],
        "bgr16": lambda: array_to_compressed(random_image("bgr16", 9, 11), "png")["data"],
    }[case]()
    decoded = compressed_to_array("png", data)
    exact = decoded.array.nbytes
    assert compressed_to_array("png", data, max_decoded_bytes=exact).array.nbytes == exact
    with pytest.raises(ImageConversionError) as caught:
        compressed_to_array("png", data, max_decoded_bytes=exact - 1)
    assert caught.value.reason == "too_large"


def test_jpeg_header_bound_counts_a_progressive_jpegs_coefficients():
    image = random_image("bgr8", 48, 64)
    baseline = array_to_compressed(image, "jpeg")["data"]
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    progressive = encoded.tobytes()
    gray = array_to_compressed(image[:, :, :1], "jpeg")["data"]
    array_bytes = 48 * 64 * 3
    assert compressed_to_array("jpeg", baseline, max_decoded_bytes=array_bytes).array.nbytes == array_bytes
    assert compressed_to_array("jpeg", gray, max_decoded_bytes=48 * 64).array.shape == (48, 64, 1)
    with pytest.raises(ImageConversionError, match="progressive"):
        compressed_to_array("jpeg", progressive, max_decoded_bytes=array_bytes)
    # 4:2:0: luma 48x64 plus two 24x32 chroma planes, 2 bytes per coefficient.
    coefficients = (48 * 64 + 2 * 24 * 32) * 2
    decoded = compressed_to_array("jpeg", progressive, max_decoded_bytes=array_bytes + coefficients)
    assert decoded.array.shape == (48, 64, 3)


def test_decoded_byte_limit_is_validated_and_defaults():
    assert DEFAULT_MAX_DECODED_BYTES == 128 * 2**20
    with pytest.raises(ValueError):
        compressed_to_array("png", b"x", max_decoded_bytes=0)


# ------------------------------------------------------------- ROS 2 cv_bridge cross-check


def ros2_cv_bridge():
    """Return (CvBridge(), sensor_msgs.msg) for ROS 2's own cv_bridge, or skip."""
    try:
        from cv_bridge import CvBridge
        from sensor_msgs import msg as sensor_msgs
    except ImportError as exc:
        pytest.skip(
            f"ROS 2 cv_bridge is not importable ({exc}); this cross-check runs only in a sourced "
            "ROS 2 install (do not pip install cv-bridge: it is a broken ROS 1 port)"
        )
    if not hasattr(sensor_msgs.Image, "get_fields_and_field_types"):
        pytest.skip("sensor_msgs is not the ROS 2 (rosidl) package")
    try:
        version = importlib.metadata.version("cv_bridge")
    except importlib.metadata.PackageNotFoundError:
        version = None  # ament installs may carry no metadata; the checks above and below decide
    if version is not None and version.startswith("1."):
        pytest.skip(f"cv_bridge {version} is the broken ROS 1 port from PyPI, not ROS 2's (see FACTS.md)")
    bridge = CvBridge()
    if not callable(getattr(bridge, "imgmsg_to_cv2", None)):
        pytest.skip("cv_bridge.CvBridge has no imgmsg_to_cv2: not ROS 2's cv_bridge")
    return bridge, sensor_msgs


CROSS_CHECK_ENCODINGS = ["mono8", "mono16", "rgb8", "bgr8", "rgba8", "bgra8", "8UC1", "8UC3", "8UC4", "16UC1"]


@pytest.mark.parametrize("big_endian", [0, 1])
@pytest.mark.parametrize("encoding", CROSS_CHECK_ENCODINGS)
def test_matches_ros2_cv_bridge(encoding, big_endian):
    bridge, sensor_msgs = ros2_cv_bridge()
    image = random_image(encoding)
    pixel_bytes = image.shape[2] * image.itemsize
    # cv_bridge reads padded rows only when the padding is whole pixels.
    fields = array_to_image_fields(
        image, encoding, step=(image.shape[1] + 2) * pixel_bytes, is_bigendian=big_endian
    )
    theirs = np.asarray(bridge.imgmsg_to_cv2(sensor_msgs.Image(**fields), desired_encoding="passthrough"))
    ours = decode(fields).array
    np.testing.assert_array_equal(theirs.reshape(ours.shape), ours)

    message = bridge.cv2_to_imgmsg(image[:, :, 0] if image.shape[2] == 1 else image, encoding=encoding)
    decoded = image_to_array(
        message.height, message.width, message.encoding, message.is_bigendian, message.step, message.data
    )
    np.testing.assert_array_equal(decoded.array, image)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_matches_ros2_cv_bridge_compressed(fmt):
    bridge, sensor_msgs = ros2_cv_bridge()
    fields = array_to_compressed(random_image("bgr8", 16, 16), fmt)
    theirs = np.asarray(bridge.compressed_imgmsg_to_cv2(sensor_msgs.CompressedImage(**fields)))
    ours = compressed_to_array(fields["format"], fields["data"]).array
    np.testing.assert_array_equal(theirs.reshape(ours.shape), ours)
