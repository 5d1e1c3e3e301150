"""Build the test-only vision_msgs interface package once and give processes the environment to use it.

vision_msgs is not on PyPI. tests/fixtures/vision_msgs holds its Classification,
ObjectHypothesis, LabelInfo and VisionClass definitions (copied from
ros-perception/vision_msgs 4.1.1), built here with CMake and the same rosidl
pipeline as impatient_ros's own messages (cmake/ros_wheels.cmake), against the
venv running the tests.

The build takes about a minute of CPU, so it is cached: in
``$IMPATIENT_TEST_CACHE`` (default: the system temp folder) under a key of the
fixture's files, the shared CMake module and this Python, behind a file lock
so parallel sessions build it once. A build that did not finish leaves no
``.complete`` marker and is redone.

The generated libraries are found through LD_LIBRARY_PATH (rosidl looks its
typesupport libraries up there at run time), which only applies to a process
started with it: the processes that use vision_msgs are children started with
:func:`vision_msgs_env`, never the test process itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "vision_msgs"
_INPUTS = [*sorted(FIXTURE.rglob("*")), REPO / "cmake" / "ros_wheels.cmake"]


def _key() -> str:
    digest = hashlib.sha256(f"{sys.executable}\n{sys.version}\n".encode())
    for path in _INPUTS:
        if path.is_file():
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(cmd: list[str], log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"building the vision_msgs test fixture failed ({' '.join(cmd)}):\n{tail}")


def build_vision_msgs() -> Path:
    """The install prefix of the fixture build (built on first use, then reused)."""
    root = Path(os.environ.get("IMPATIENT_TEST_CACHE", tempfile.gettempdir())) / "impatient_ros-test-cache"
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / f"vision_msgs-{_key()}"
    if (prefix / ".complete").exists():
        return prefix
    with open(root / "vision_msgs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        if (prefix / ".complete").exists():
            return prefix
        shutil.rmtree(prefix, ignore_errors=True)
        build = prefix.with_name(prefix.name + ".build")
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        log = build / "build.log"
        venv_bin = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH")}
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        _run(["cmake", "-S", str(FIXTURE), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}",
              f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF"],
             log, env=env, cwd=build)
        _run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1)], log, env=env, cwd=build)
        _run(["cmake", "--install", str(build)], log, env=env, cwd=build)
        shutil.rmtree(build, ignore_errors=True)
        (prefix / ".complete").touch()
    return prefix


def vision_msgs_env(prefix: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the fixture's Python, libraries and ament index."""
    env = dict(os.environ if base is None else base)
    site = [str(p) for p in sorted(prefix.glob("lib/python*/site-packages"))]
    if not site:
        raise RuntimeError(f"no site-packages under {prefix}/lib: the vision_msgs fixture build is incomplete")

    def prepend(name: str, *paths: str) -> None:
        env[name] = os.pathsep.join([*paths, *filter(None, [env.get(name, "")])])

    prepend("PYTHONPATH", *site)
    prepend("LD_LIBRARY_PATH", str(prefix / "lib"))
    prepend("AMENT_PREFIX_PATH", str(prefix))
    return env
