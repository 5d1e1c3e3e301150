"""``cv2.imdecode`` with the decoder's warnings seen: a damaged image is not decoded silently.

Used by :func:`impatient_ros.ros.image_convert.compressed_to_array`, which rejects
a frame whose decoder printed a warning (reason ``decode_failed``).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
import threading
from typing import Any

import cv2
import numpy as np

__all__ = ["decode_with_warnings"]

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


def decode_with_warnings(buffer: np.ndarray) -> tuple[np.ndarray | None, str]:
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
        # Shown on the real stderr while the lock is still held: written after it, the text could
        # land in another thread's capture (fd 2 redirected again) and count as that decode's warning.
        if captured:
            _write_all(2, captured)
    lines = [line.strip() for line in captured.decode("utf-8", "replace").splitlines()]
    messages = [line for line in lines if line and not _LOG_RECORD.match(line)]
    if error:
        messages.append(error)
    text = "; ".join(messages)
    return decoded, text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
