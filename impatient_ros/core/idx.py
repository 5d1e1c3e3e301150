"""IDX files (the MNIST / Fashion-MNIST format): the one reader and writer of the package.

Format (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): two zero
bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the data in big-endian C order. Files are often gzipped.

The reader decides whether a file is gzipped by its first two bytes (the gzip
magic ``1f 8b``), not by its name: a renamed or decompressed-in-place file reads
the same. It checks the magic number (two zero bytes, a known type code, 1..4
dimensions) and that the payload holds exactly as many bytes as the header
declares, so a truncated download or a padded copy fails loudly instead of
giving a silently wrong array.

Used by the training data (``training.data``) and the camera tool's data-set
source (``impatient_ros.tools.sources``); pure numpy, no torch, no rclpy.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["IDX_TYPES", "IdxError", "read_idx", "write_idx"]

# Type code (third magic byte) -> big-endian numpy dtype.
IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES: dict[np.dtype, int] = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A missing, unreadable or malformed IDX file; the message names the file and the fault."""


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic."""
    if not path.is_file():
        raise IdxError(f"IDX file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read the IDX file ({exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({exc}); download or copy the file again") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a writable native-endian numpy array."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxError(f"{path}: {len(data)} bytes is too short for an IDX header; is this an IDX file?")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_TYPES or not 1 <= ndim <= 4:
        raise IdxError(
            f"{path} is not an IDX file: bad IDX magic number {data[:4].hex()} (expected 0000 + type code "
            f"{'/'.join(f'{c:02x}' for c in IDX_TYPES)} + 1..4 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise IdxError(
            f"{path}: header declares shape {dims} of {dtype.name} ({expected} bytes with header) but the "
            f"file holds {len(data)} bytes; the file is {'truncated' if len(data) < expected else 'padded'}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzipped if ``compress``, or by default when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=")
    if key not in _IDX_CODES:
        raise IdxError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    if not 1 <= array.ndim <= 4:
        raise IdxError(f"IDX stores 1..4 dimensions, got {array.ndim}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.dtype(IDX_TYPES[code])).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
