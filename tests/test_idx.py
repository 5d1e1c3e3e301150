"""impatient_ros.core.idx: the IDX reader and writer (training data and the camera's data-set source)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from impatient_ros.core.idx import IdxError, read_idx, write_idx


def _idx_bytes(type_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written by hand (independently of write_idx): 0, 0, type, ndim, big-endian dims, data."""
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def test_reads_hand_written_files_raw_and_gzipped(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(0x08, (2, 3, 4), images.tobytes())
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and got.flags.writeable
        np.testing.assert_array_equal(got, images)

    # Multi-byte types are big-endian in IDX; the array comes back in native order.
    values = np.array([1, -2, 300, -40000], dtype=np.int32)
    (tmp_path / "b.idx").write_bytes(_idx_bytes(0x0C, (4,), values.astype(">i4").tobytes()))
    got = read_idx(tmp_path / "b.idx")
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_gzip_is_detected_by_its_magic_bytes_not_the_name(tmp_path: Path) -> None:
    raw = _idx_bytes(0x08, (3,), bytes([7, 8, 9]))
    (tmp_path / "gzipped-without-suffix").write_bytes(gzip.compress(raw))
    (tmp_path / "plain-with-suffix.gz").write_bytes(raw)  # e.g. gunzipped in place, name kept
    for name in ("gzipped-without-suffix", "plain-with-suffix.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), [7, 8, 9])


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_write_idx_round_trips(tmp_path: Path, name: str, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")  # gzipped because of the name
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert read_idx(write_idx(tmp_path / "forced", array, compress=True)).tolist() == array.tolist()


def test_write_idx_refuses_what_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="cannot store dtype"):
        write_idx(tmp_path / "x.idx", np.zeros(2, np.int64))
    with pytest.raises(IdxError, match="1..4 dimensions"):
        write_idx(tmp_path / "x.idx", np.zeros((1,) * 5, np.uint8))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "too short"),
        (bytes([1, 0, 8, 1]) + struct.pack(">I", 1) + b"\x00", "not an IDX file: bad IDX magic"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
        (bytes([0, 0, 8, 0]), "bad IDX magic"),
        (bytes([0, 0, 8, 5]) + bytes(20), "bad IDX magic"),  # more than 4 dimensions
        (b"\x08\x03\x00\x01" + bytes(8), "not an IDX file"),
        (b"not gzip", "bad IDX magic"),
        (bytes([0, 0, 8, 2]) + struct.pack(">I", 3), "truncated IDX header"),
        (_idx_bytes(0x08, (2, 2), b"\x00" * 3), "declares shape .* truncated"),
        (_idx_bytes(0x08, (2, 2), b"\x00" * 5), "declares shape .* padded"),
    ],
)
def test_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(IdxError, match=message):
        read_idx(path)


def test_reports_missing_and_corrupt_gzip(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="not found"):
        read_idx(tmp_path / "nothing.gz")
    good = gzip.compress(_idx_bytes(0x08, (100,), bytes(100)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxError, match="gzip"):
        read_idx(tmp_path / "cut.gz")
