"""Both launch files run for real with ros2/launch and ros2/launch_ros, where those can be imported.

``launch``, ``launch_ros`` and ``ros2launch`` are pure Python but on no package
registry, so the project's venv does not have them and these tests skip there
(and in CI), saying why. To run them, put the three (from the public
ros2/launch and ros2/launch_ros sources, plus osrf-pycommon and lark) into a
folder and name it:

    pip install --target /tmp/launch-pkgs osrf-pycommon lark
    pip install --no-deps --target /tmp/launch-pkgs <ros2/launch>/launch <ros2/launch_ros>/{launch_ros,ros2launch}
    IMPATIENT_LAUNCH_PATH=/tmp/launch-pkgs pytest tests/test_launch.py

(launch_ros imports ``composition_interfaces`` at start, which is not on PyPI
either: that folder needs it too, built or as a stand-in module; only
LoadComposableNodes uses it.)

A launch is run the way ``ros2 launch`` runs it (``ros2launch.api.launch_a_launch_file``)
in its own process. Its packages come from an ament prefix made here that
points at the source tree: ``lib/impatient_ros/<executable>`` runs ``bin/<executable>``
with this Python, ``share/impatient_ros/{launch,config}`` are the repository's
(the pip layout itself is checked by tests/test_build.py). To launch an
installed package instead (a pip install's venv or prefix, a colcon
``install/impatient_ros``), name its prefix in ``IMPATIENT_LAUNCH_PREFIX``; the
source tree then stays off the launched processes' path (give the prefix's
site-packages in PYTHONPATH if it is not the running venv). Make such a
prefix with a fresh venv, not ``pip install --prefix`` from the project's venv:
pip then uninstalls the venv's own impatient_ros first.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import rclpy
import torch
import yaml
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.srv import GetParameters
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from impatient_ros.msg import StagePrediction
from impatient_ros.ros.image_convert import array_to_image_fields
from impatient_ros.runtime.checkpoint import save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from tests.ros.node_harness import RELIABLE, NodeProbe, gray_image, wait_for

REPO = Path(__file__).resolve().parents[1]
EXECUTABLES = ["impatient_node", "impatient-camera", "impatient-budget", "impatient-monitor"]
SIZE = (32, 32)
RUN_LAUNCH = (
    "import sys\n"
    "from ros2launch.api import launch_a_launch_file\n"
    "sys.exit(launch_a_launch_file(launch_file_path=sys.argv[1], launch_file_arguments=sys.argv[2:],"
    " noninteractive=True))\n"
)
SHOW_ARGS = (
    "import sys\n"
    "from ros2launch.api import print_arguments_of_launch_file\n"
    "print_arguments_of_launch_file(launch_file_path=sys.argv[1])\n"
)


INSTALLED_PREFIX = os.environ.get("IMPATIENT_LAUNCH_PREFIX", "")


def _launch_pythonpath() -> str:
    extra = [p for p in os.environ.get("IMPATIENT_LAUNCH_PATH", "").split(os.pathsep) if p]
    source = [] if INSTALLED_PREFIX else [str(REPO)]
    return os.pathsep.join([*extra, *source, *filter(None, [os.environ.get("PYTHONPATH", "")])])


@functools.cache
def _launch_import_error() -> str | None:
    env = {**os.environ, "PYTHONPATH": _launch_pythonpath()}
    probe = subprocess.run([sys.executable, "-c", "import launch, launch_ros.actions, ros2launch.api"],
                           env=env, capture_output=True, text=True, cwd=REPO)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
    return last


@pytest.fixture(scope="module", autouse=True)
def _needs_launch() -> None:
    # A fixture, not a skipif mark: the import probe (a Python start) runs only when a test here runs.
    error = _launch_import_error()
    if error is not None:
        pytest.skip(f"launch/launch_ros/ros2launch cannot be imported ({error}); they are on no package "
                    "registry: set IMPATIENT_LAUNCH_PATH to a folder holding them (see this module's docstring)")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ament prefix whose impatient_ros is the source tree (what FindPackageShare and Node() look up)."""
    if INSTALLED_PREFIX:
        return Path(INSTALLED_PREFIX)
    root = tmp_path_factory.mktemp("ament_prefix")
    index = root / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / "impatient_ros").touch()
    share = root / "share" / "impatient_ros"
    share.mkdir()
    for name in ("launch", "config", "models", "package.xml"):
        if (REPO / name).exists():
            (share / name).symlink_to(REPO / name)
    lib = root / "lib" / "impatient_ros"
    lib.mkdir(parents=True)
    for exe in EXECUTABLES:
        shim = lib / exe
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "bin" / exe}" "$@"\n')
        shim.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=SIZE))
    path = tmp_path_factory.mktemp("launch_ckpt") / "smallcnn32.pt"
    save_checkpoint(path, net, class_names=[f"c{i}" for i in range(10)],
                    preprocessing={"input_size": list(SIZE), "channels": "gray", "mean": [0.5], "std": [0.25]})
    return path


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


class Launch:
    """One ``ros2 launch``-equivalent process; output to a file."""

    def __init__(self, prefix: Path, launch_file: str, arguments: list[str], cwd: Path) -> None:
        env = dict(os.environ)
        env["AMENT_PREFIX_PATH"] = os.pathsep.join(
            [str(prefix), *filter(None, [env.get("AMENT_PREFIX_PATH", ""), sys.prefix])])
        env["PYTHONPATH"] = _launch_pythonpath()
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("OMP_NUM_THREADS", None)  # the launch files set the node's threads themselves
        self.log_path = cwd / f"{Path(launch_file).stem}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        path = prefix / "share" / "impatient_ros" / "launch" / launch_file
        self.proc = subprocess.Popen([sys.executable, "-c", RUN_LAUNCH, str(path), *arguments], cwd=cwd, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """executable -> pid, from launch's 'process started with pid' lines."""
        found = re.findall(r"\[INFO\] \[([\w-]+?)-\d+\]: process started with pid \[(\d+)\]", self.output)
        return {name: int(pid) for name, pid in found}

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch still running after {timeout} s:\n{self.output[-6000:]}") from None

    def stop(self) -> int:
        """Ctrl-C (SIGINT), as a user stops ``ros2 launch``; kill the whole group if that hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def _get_parameters(probe: NodeProbe, fqn: str, names: list[str]) -> dict:
    client = probe.node.create_client(GetParameters, f"{fqn}/get_parameters")
    try:
        wait_for(client.service_is_ready, 30, f"{fqn}/get_parameters")
        future = client.call_async(GetParameters.Request(names=names))
        wait_for(future.done, 10, f"reply of {fqn}/get_parameters")
        return {name: Parameter.from_parameter_msg(ParameterMsg(name=name, value=value)).value
                for name, value in zip(names, future.result().values)}
    finally:
        probe.node.destroy_client(client)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by launch) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_both_launch_files_list_described_arguments(prefix: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": _launch_pythonpath(), "AMENT_PREFIX_PATH": str(prefix)}
    for name in ("impatient.launch.py", "demo.launch.py"):
        out = subprocess.run([sys.executable, "-c", SHOW_ARGS, str(prefix / "share/impatient_ros/launch" / name)],
                             env=env, capture_output=True, text=True, cwd=tmp_path, check=True).stdout
        arguments = re.findall(r"^    '(\w+)':\n        (.*)$", out, flags=re.MULTILINE)
        assert len(arguments) >= 8, out
        for argument, description in arguments:
            assert description.strip() and "no description given" not in description, (name, argument)
        assert "'num_threads'" in out, out


def test_params_file_setting_all_five_is_obeyed_without_launch_arguments(
        prefix: Path, checkpoint: Path, tmp_path: Path, ros) -> None:
    file_values = {"checkpoint": str(checkpoint), "device": "cpu", "mode": "cascade", "default_budget_ms": 30.0,
                   "input_transport": "compressed", "num_threads": 2}
    params = tmp_path / "robot.yaml"
    params.write_text(yaml.safe_dump({"/**/impatient_node": {"ros__parameters": file_values}}))
    launch = Launch(prefix, "impatient.launch.py", [f"params_file:={params}", "namespace:=lfile"], tmp_path)
    probe = NodeProbe("/lfile", "/lfile/image/compressed", compressed=True, probe_name="launch_file_probe")
    try:
        probe.wait_ready(timeout=120, proc=launch.proc)
        assert probe.get_parameters(*file_values) == file_values
        assert probe.latest_diagnostics()["torch_threads"] == "2"
    finally:
        probe.close()
        code = launch.stop()
    assert code == 0, launch.output


def test_launch_arguments_override_the_file_typed(prefix: Path, checkpoint: Path, tmp_path: Path, ros) -> None:
    # "15" and "1" look like integers and "123" like a number: typed, they reach the node as a double,
    # an integer and a path. The file's other settings stay.
    (tmp_path / "123").write_bytes(checkpoint.read_bytes())
    params = tmp_path / "robot.yaml"
    params.write_text(yaml.safe_dump({"/**/impatient_node": {"ros__parameters": {
        "checkpoint": "/nonexistent.pt", "device": "cpu", "mode": "cascade", "default_budget_ms": 30.0,
        "top_k": 3}}}))
    launch = Launch(prefix, "impatient.launch.py", [f"params_file:={params}", "namespace:=largs",
                                                    "checkpoint:=123", "budget:=15", "num_threads:=1"], tmp_path)
    probe = NodeProbe("/largs", "/largs/image", probe_name="launch_args_probe")
    try:
        probe.wait_ready(timeout=120, proc=launch.proc)
        values = probe.get_parameters("checkpoint", "default_budget_ms", "num_threads", "mode", "top_k", "device")
        assert values == {"checkpoint": "123", "default_budget_ms": 15.0, "num_threads": 1, "mode": "cascade",
                          "top_k": 3, "device": "cpu"}
        assert len(probe.classify(gray_image(SIZE, 0))) >= 1
    finally:
        probe.close()
        code = launch.stop()
    assert code == 0, launch.output


def test_cameras_argument_serves_each_camera_on_its_own_topics(
        prefix: Path, checkpoint: Path, tmp_path: Path, ros) -> None:
    # The README's multi-camera launch line: one node, two cameras, each camera's image remapped to its
    # driver's topic by camera_topics; every answer comes back on that camera's own prediction topic.
    cameras = ("front", "rear")
    drivers = {name: f"/drivers_lcam/{name}_raw" for name in cameras}
    launch = Launch(prefix, "impatient.launch.py", [
        "namespace:=lcam", f"checkpoint:={checkpoint}", "device:=cpu",
        f"cameras:=[{', '.join(cameras)}]", f"camera_topics:=[{', '.join(drivers.values())}]"], tmp_path)
    probe = NodeProbe("/lcam", "/lcam/unused_image", probe_name="launch_cameras_probe")
    lock = threading.Lock()
    finals: dict[str, set[str]] = defaultdict(set)   # camera topic -> frame ids answered (final)
    seen: dict[str, set[str]] = defaultdict(set)     # camera topic -> every frame id on it
    images = {name: probe.node.create_publisher(Image, topic, RELIABLE) for name, topic in drivers.items()}
    results = {name: f"/lcam/impatient_node/{name}/prediction" for name in cameras}

    def on_result(name: str, msg: StagePrediction) -> None:
        with lock:
            seen[name].add(msg.header.frame_id)
            if msg.is_final:
                finals[name].add(msg.header.frame_id)

    for name, topic in results.items():
        probe.node.create_subscription(StagePrediction, topic, lambda m, n=name: on_result(n, m), RELIABLE)
    try:
        def ready() -> bool:
            if launch.proc.poll() is not None:
                raise AssertionError(f"launch exited with {launch.proc.returncode}:\n{launch.output[-6000:]}")
            return (probe.latest_diagnostics().get("state") == "active"
                    and all(pub.get_subscription_count() > 0 for pub in images.values())
                    and all(probe.node.count_publishers(topic) > 0 for topic in results.values()))

        wait_for(ready, 120, "the launched node to serve both cameras", interval=0.1)
        assert probe.get_parameters("cameras") == {"cameras": list(cameras)}
        fields = array_to_image_fields(gray_image(SIZE, 0), "mono8")
        deadline, n = time.monotonic() + 60.0, 0
        while not all(any(f.startswith(name) for f in finals[name]) for name in cameras):
            assert time.monotonic() < deadline, f"no answer on every camera's topic: {dict(finals)}\n{launch.output[-4000:]}"
            for name in cameras:
                msg = Image(**fields)
                msg.header.frame_id = f"{name}-{n}"
                images[name].publish(msg)
            n += 1
            time.sleep(0.5)
        with lock:
            for name in cameras:  # a camera's answers name only its own frames
                assert seen[name] and all(f.startswith(f"{name}-") for f in seen[name]), dict(seen)
    finally:
        probe.close()
        code = launch.stop()
    assert code == 0, launch.output


def test_node_launch_exits_non_zero_when_the_node_fails_to_start(prefix: Path, tmp_path: Path) -> None:
    launch = Launch(prefix, "impatient.launch.py", ["checkpoint:=/nonexistent/model.pt", "device:=cpu"], tmp_path)
    code = launch.wait(120)
    launch.stop()
    assert code != 0, launch.output
    assert "impatient_node exited with code 1" in launch.output, launch.output
    assert "cannot load checkpoint" in launch.output, launch.output


def test_demo_takes_integer_looking_arguments_and_stops_as_a_whole(
        prefix: Path, checkpoint: Path, tmp_path: Path, ros) -> None:
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), gray_image((48, 48), i))
    (tmp_path / "123").write_bytes(checkpoint.read_bytes())
    summary = tmp_path / "summary.json"
    launch = Launch(prefix, "demo.launch.py", [
        f"source:=folder:{images}", "rate_hz:=15", "schedule:=10", "checkpoint:=123", "device:=cpu",
        f"summary_path:={summary}", f"plot_path:={tmp_path / 'monitor.png'}"], tmp_path)
    probe = NodeProbe("", "/unused_image", probe_name="demo_probe")
    try:
        def budgeted() -> bool:  # schedule 10 = a constant 10 ms budget, once the first Budget arrived
            if launch.proc.poll() is not None:
                return True
            messages = [m for frame_id in list(probe.predictions) for m in probe.frame(frame_id)]
            return any(m.budget.sec == 0 and m.budget.nanosec == 10_000_000 for m in messages)

        wait_for(budgeted, 150, "predictions under the 10 ms budget from the demo's impatient_node", interval=0.2)
        assert launch.proc.poll() is None, launch.output
        assert _get_parameters(probe, "/impatient_camera", ["rate_hz"]) == {"rate_hz": 15.0}
        assert _get_parameters(probe, "/impatient_budget", ["schedule"]) == {"schedule": "10"}
        assert _get_parameters(probe, "/impatient_node", ["checkpoint", "num_threads"]) == {
            "checkpoint": "123", "num_threads": 1}
        pids = launch.pids()
        assert set(pids) == set(EXECUTABLES), launch.output
        assert all(_alive(pid) for pid in pids.values()), launch.output

        # One process dies: the launch stops the rest, says which one ended it, and exits non-zero.
        os.kill(pids["impatient-budget"], signal.SIGKILL)
        code = launch.wait(60)
    finally:
        probe.close()
        launch.stop()
    output = launch.output
    assert code != 0, output
    assert "impatient_budget exited with code -9; stopping the demo" in output, output
    assert not any(_alive(pid) for pid in pids.values()), output
    assert "failed to terminate" not in output, "a process had to be killed on shutdown:\n" + output
    assert summary.exists(), f"the monitor did not write its summary on shutdown:\n{output}"
