"""Both ways of building the package work, proven by building them.

* pip: a fresh venv gets the ROS build wheels, then `pip install
  --no-build-isolation .` generates the messages and installs the console
  scripts (torch is left out of this venv to keep the test quick; the
  project's own venv proves the full install).
* colcon: `colcon build` of a workspace holding this repo under src/, with the
  same wheels standing in for a ROS 2 install, and the installed messages
  import and serialise in a fresh process that only sourced install/setup.bash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ["impatient_node", "impatient-camera", "impatient-budget", "impatient-monitor", "impatient-train", "impatient-eval"]
CHECK_MESSAGES = (
    "from rclpy.serialization import deserialize_message, serialize_message\n"
    "from impatient_ros.msg import Budget, StagePrediction\n"
    "m = StagePrediction(stage=2, label='x', top_ids=[1, 2]); b = Budget(max_stage=3)\n"
    "assert deserialize_message(serialize_message(m), StagePrediction) == m\n"
    "assert deserialize_message(serialize_message(b), Budget) == b\n"
    "import impatient_ros.msg as msg; print(msg.__file__)\n"
)


def _copy_sources(dest: Path) -> None:
    """Copy what git would ship (tracked and untracked-but-not-ignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "LD_LIBRARY_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE")}
    return env


def test_pip_install_builds_messages_and_console_scripts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_sources(src)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    env = _clean_env()
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    _run(pip + ["-r", str(REPO / "requirements" / "build.txt"), "ros-rclpy", "ros-rmw-fastrtps-cpp"], env=env)
    _run(pip + ["--no-build-isolation", "--no-deps", str(src)], env=env, cwd=tmp_path)
    out = _run([py, "-c", CHECK_MESSAGES], env=env, cwd=tmp_path).stdout
    assert str(env_dir) in out, out  # the message module came from the new venv
    for script in CONSOLE_SCRIPTS:
        assert (env_dir / "bin" / script).exists(), f"console script {script} not installed"
    # The offline package lives inside ours: a top-level "training" would collide on a robot.
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip())
    assert not (site / "training").exists(), "a top-level 'training' package was installed"
    assert (site / "impatient_ros" / "training" / "cli.py").is_file()
    metadata = _run([py, "-m", "pip", "show", "impatient_ros"], env=env).stdout
    assert "torch" in metadata and "opencv-python-headless" in metadata and "ros-rclpy" in metadata

    # What `ros2 run` and launch_ros's Node() look up once AMENT_PREFIX_PATH names the venv: the
    # package in the ament index, then <prefix>/lib/<package>/<executable>, one per console script.
    with open(REPO / "pyproject.toml", "rb") as f:
        assert set(tomllib.load(f)["project"]["scripts"]) == set(CONSOLE_SCRIPTS)
    assert (env_dir / "share" / "ament_index" / "resource_index" / "packages" / "impatient_ros").is_file()
    assert (env_dir / "share" / "impatient_ros" / "launch" / "impatient.launch.py").is_file()
    for script in CONSOLE_SCRIPTS:
        entry = env_dir / "lib" / "impatient_ros" / script
        assert entry.is_file() and os.access(entry, os.X_OK), f"lib/impatient_ros/{script} missing or not executable"
    ament_env = {**env, "AMENT_PREFIX_PATH": str(env_dir)}
    found = _run([py, "-c", "from ament_index_python.packages import get_package_prefix as p; "
                  "print(p('impatient_ros'))"], env=ament_env, cwd=tmp_path).stdout.strip()
    assert Path(found) == env_dir, found
    # Run one as ros2 run would (the path alone, from elsewhere, no venv active): it must find the
    # venv's Python and our package. The budget tool needs neither torch nor a subscriber.
    ran = _run([str(Path(found) / "lib" / "impatient_ros" / "impatient-budget"), "--ros-args",
                "-p", "max_messages:=1", "-p", "schedule:=constant:7"], env=ament_env, cwd=tmp_path)
    assert "constant 7 ms" in ran.stdout + ran.stderr, ran.stdout + ran.stderr


def test_installed_training_is_namespaced_and_runs(tmp_path: Path) -> None:
    """In the project's venv (outside the source tree) training is impatient_ros.training, never 'training'."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = _run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('training'))"],
                 env=env, cwd=tmp_path).stdout
    assert probe.strip() == "None", f"a top-level 'training' module is importable: {probe}"
    for cmd in ([sys.executable, "-m", "impatient_ros.training", "--help"],
                [str(Path(sys.executable).parent / "impatient-train"), "--help"],
                [str(Path(sys.executable).parent / "impatient-eval"), "--help"]):
        out = _run(cmd, env=env, cwd=tmp_path).stdout
        assert "usage:" in out, out


def test_colcon_build_of_a_workspace(tmp_path: Path) -> None:
    colcon = Path(sys.prefix) / "bin" / "colcon"
    if not colcon.exists():
        pytest.fail("colcon is missing from the venv: run scripts/setup.sh (requirements/dev.txt installs it)")
    ws = tmp_path / "ws"
    _copy_sources(ws / "src" / "impatient_ros")
    env = _clean_env()
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = sys.prefix
    _run([str(colcon), "build", "--event-handlers", "console_direct-"], cwd=ws, env=env)
    installed = ws / "install" / "impatient_ros"
    assert (installed / "lib" / "impatient_ros" / "impatient_node").exists(), "ros2 run entry point missing"
    assert (installed / "share" / "impatient_ros" / "package.xml").exists()
    check = f"source {ws}/install/setup.bash && cd {tmp_path} && python -c \"$CHECK\""
    env["CHECK"] = CHECK_MESSAGES
    out = _run(["bash", "-c", check], env=env).stdout
    assert str(installed) in out, out  # the message module came from the workspace
