"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

Every file this package writes for another process or a later run (checkpoints
and their sha256 sidecars, resume files, timing calibrations, monitor
summaries and plots) goes through :func:`atomic_write`, so they all follow the
same rules:

1. the new content goes into a temp file in the *same directory* as the
   target (``os.replace`` is only atomic within one file system), named
   ``.<name>.<random>.tmp`` so that globs for the real name do not pick it up;
2. the temp file is flushed and fsynced, so its bytes are on disk before the
   rename makes them visible (otherwise a crash right after the rename can
   leave an empty or partial file under the real name);
3. ``os.replace`` swaps it onto the target;
4. the directory is fsynced, so the rename itself survives a power loss;
5. on any failure (the writer raises, the disk is full, KeyboardInterrupt) the
   temp file is removed and the old target is left untouched.

Pure standard library: no torch, no rclpy.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_path", "atomic_write_text", "fsync_directory"]


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], Any],
    *,
    before_replace: Callable[[Path], Any] | None = None,
) -> Path:
    """Replace ``path`` atomically by what ``write(file)`` writes into a binary file object.

    ``before_replace(temp_path)`` runs after the temp file is complete and
    synced and just before the rename (e.g. to hash the new bytes, or to remove
    a sidecar that would no longer match). Returns ``path`` as a :class:`Path`.
    The parent directory must exist.
    """
    return _replace(Path(path), write, None, before_replace)


def atomic_write_path(
    path: str | os.PathLike[str],
    write: Callable[[Path], Any],
    *,
    before_replace: Callable[[Path], Any] | None = None,
) -> Path:
    """Like :func:`atomic_write` for writers that want a file name (``write(temp_path)``), not a file object."""
    return _replace(Path(path), None, write, before_replace)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` atomically by ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` atomically by ``text`` in ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make renames in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # the replace is still atomic, only its durability is up to the OS
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def _replace(
    path: Path,
    write_file: Callable[[BinaryIO], Any] | None,
    write_name: Callable[[Path], Any] | None,
    before_replace: Callable[[Path], Any] | None,
) -> Path:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if write_file is not None:
                write_file(f)
                f.flush()
            else:
                assert write_name is not None
                write_name(tmp)  # writes through its own handle; fsync below covers the inode
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path
