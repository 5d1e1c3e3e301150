"""impatient_ros.core.atomic: the one atomic-replace used by every writer of the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from impatient_ros.core import atomic
from impatient_ros.core.atomic import atomic_write, atomic_write_bytes, atomic_write_path, atomic_write_text


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_creates_and_replace_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    assert atomic_write_text(target, "one") == target
    assert target.read_text() == "one"
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write(target, lambda f: f.write(b"three"))
    assert target.read_bytes() == b"three"
    atomic_write_path(target, lambda tmp: tmp.write_text("four"))
    assert target.read_text() == "four"
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind


@pytest.mark.parametrize("writer", [atomic_write, atomic_write_path])
def test_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path, writer) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def half_then_fail(dest) -> None:
        if isinstance(dest, Path):
            dest.write_bytes(b"ne")
        else:
            dest.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        writer(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_failure_before_replace_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    seen: list[bytes] = []

    def check(tmp: Path) -> None:
        seen.append(tmp.read_bytes())  # the temp file is complete when the hook runs
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda f: f.write(b"new"), before_replace=check)
    assert seen == [b"new"] and target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    directory_fds: set[int] = set()
    real_open = os.open

    def spy_open(name, flags, *args, **kwargs):
        fd = real_open(name, flags, *args, **kwargs)
        if Path(name) == tmp_path:
            directory_fds.add(fd)
        return fd

    def spy_fsync(fd: int) -> None:
        events.append("fsync dir" if fd in directory_fds else "fsync file")
        real_fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "open", spy_open)
    monkeypatch.setattr(atomic.os, "fsync", spy_fsync)
    monkeypatch.setattr(atomic.os, "replace", spy_replace)
    atomic_write_text(tmp_path / "x.txt", "data")
    assert events == ["fsync file", "replace", "fsync dir"]


def test_missing_directory_is_an_error_not_a_stray_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "no" / "x.txt", "data")
    assert not (tmp_path / "no").exists()
