"""Drive a real impatient_node process from a test: start it, feed it, listen to it, set its parameters.

The node runs as ``python -m impatient_ros.ros.node --ros-args ...`` in its own
process; :class:`NodeProbe` is an rclpy node in the test process whose
executor spins in a background thread, so tests can publish and wait without
spinning by hand. Images carry a unique ``header.frame_id`` per frame, which the
node copies into every StagePrediction, so results are matched to frames
exactly.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import BatteryState, CompressedImage, Image

from impatient_ros.ros.image_convert import array_to_compressed, array_to_image_fields
from impatient_ros.msg import Budget, StagePrediction

REPO = Path(__file__).resolve().parents[2]
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def start_node(ros_args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m impatient_ros.ros.node --ros-args <ros_args>`` from the repo root, output to ``log_path``.

    ``env`` replaces this process's environment (e.g. one that makes an extra interface package importable).
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # The source tree first (the modules under test); impatient_ros.msg still comes from the venv.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_node
    proc = subprocess.Popen([sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", *ros_args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_file = log  # type: ignore[attr-defined]
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def stop_node(proc: subprocess.Popen) -> str:
    """SIGTERM (rclpy shuts down cleanly), then kill if needed; return the node's output."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    proc.log_file.close()  # type: ignore[attr-defined]
    return node_log(proc)


def node_log(proc: subprocess.Popen) -> str:
    """What the node process printed so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def stamp_now(offset_s: float = 0.0) -> Time:
    """The wall clock (what the node's ROS clock reads) plus ``offset_s``, as a Time message."""
    ns = time.time_ns() + int(offset_s * 1e9)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def gray_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """A deterministic uint8 test picture (a gradient plus noise)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.add.outer(np.arange(h), np.arange(w)) * (255.0 / max(1, h + w - 2))
    return np.clip(base + rng.normal(0, 30, size), 0, 255).astype(np.uint8)


class NodeProbe:
    """Test-side rclpy node talking to one impatient_node (namespace ``ns``, node name ``name``)."""

    def __init__(self, ns: str, image_topic: str, *, compressed: bool = False, name: str = "impatient_node",
                 num_stages: int = 4, probe_name: str = "impatient_probe") -> None:
        self.fqn = f"{ns.rstrip('/')}/{name}"
        self.ns = ns.rstrip("/")
        self.node = rclpy.create_node(probe_name)
        self._lock = threading.Lock()
        self.predictions: dict[str, list[StagePrediction]] = defaultdict(list)
        self.stage_messages: dict[int, dict[str, list[StagePrediction]]] = defaultdict(lambda: defaultdict(list))
        self.diagnostics: list[dict[str, str]] = []
        self.compressed = compressed
        self.num_stages = num_stages
        self.image_pub = self.node.create_publisher(CompressedImage if compressed else Image, image_topic, RELIABLE)
        self.budget_pub = self.node.create_publisher(Budget, f"{self.ns}/budget", RELIABLE)
        self.battery_pub = self.node.create_publisher(BatteryState, f"{self.ns}/battery_state", RELIABLE)
        self.node.create_subscription(StagePrediction, f"{self.fqn}/prediction", self._on_prediction, RELIABLE)
        for k in range(1, num_stages + 1):
            self.node.create_subscription(StagePrediction, f"{self.fqn}/stage_{k}",
                                          lambda m, k=k: self._on_stage(k, m), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self._set_params = self.node.create_client(SetParameters, f"{self.fqn}/set_parameters")
        self._get_params = self.node.create_client(GetParameters, f"{self.fqn}/get_parameters")
        self._get_state = self.node.create_client(GetState, f"{self.fqn}/get_state")
        self._change_state = self.node.create_client(ChangeState, f"{self.fqn}/change_state")
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._running = True
        self._thread.start()
        self._frame_counter = 0

    # ------------------------------------------------------------------ plumbing
    def _spin(self) -> None:
        while self._running:
            try:
                self._executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - the context may be shut down under us at teardown
                if self._running and rclpy.ok():
                    raise
                return

    def close(self) -> None:
        """Stop spinning and destroy the probe node."""
        self._running = False
        self._thread.join(timeout=10)
        self._executor.remove_node(self.node)
        self.node.destroy_node()

    def _on_prediction(self, msg: StagePrediction) -> None:
        with self._lock:
            self.predictions[msg.header.frame_id].append(msg)

    def _on_stage(self, k: int, msg: StagePrediction) -> None:
        with self._lock:
            self.stage_messages[k][msg.header.frame_id].append(msg)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self.fqn + ":"):
                values = {kv.key: kv.value for kv in status.values}
                values["_level"] = str(int.from_bytes(status.level, "little"))
                values["_message"] = status.message
                with self._lock:
                    self.diagnostics.append(values)

    def _call(self, client: Any, request: Any, timeout: float = 10.0) -> Any:
        wait_for(lambda: client.service_is_ready(), timeout, f"service {client.srv_name}")
        future = client.call_async(request)
        wait_for(future.done, timeout, f"reply of {client.srv_name}")
        return future.result()

    # ------------------------------------------------------------------ readiness
    def wait_ready(self, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
        """Until the node is active and our image publisher and result subscription are matched."""
        def ready() -> bool:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{node_log(proc)}")
            return (self.latest_diagnostics().get("state") == "active"
                    and self.image_pub.get_subscription_count() > 0
                    and self.node.count_publishers(f"{self.fqn}/prediction") > 0
                    and self.budget_pub.get_subscription_count() > 0)
        wait_for(ready, timeout, f"{self.fqn} to become active", interval=0.1)

    def wait_round_trip(self, array: np.ndarray, timeout: float = 60.0, every: float = 1.0) -> None:
        """Until one image sent now gets its final answer: both directions of the path are matched.

        ``wait_ready`` sees the node's publishers and that our image publisher matched the node's
        subscription; whether the node's result writers have matched our subscriptions yet is not
        visible from here, and a reliable volatile writer drops what it sends before that. Only for
        tests that do not count frames: each try is one more frame for the node's statistics.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame_id = self.send_image(array, frame_id=self.next_frame_id("warmup"))
            try:
                self.wait_final(frame_id, timeout=min(every, max(0.0, deadline - time.monotonic())))
                return
            except AssertionError:
                continue
        raise AssertionError(f"no answer from {self.fqn} within {timeout:.1f} s")

    # ------------------------------------------------------------------ inputs
    def next_frame_id(self, tag: str = "f") -> str:
        """A frame id never used before in this probe."""
        self._frame_counter += 1
        return f"{tag}{self._frame_counter}"

    def send_image(self, array: np.ndarray, *, frame_id: str | None = None, encoding: str = "mono8",
                   stamp: Time | None = None, fields: dict[str, Any] | None = None) -> str:
        """Publish ``array`` as Image (or CompressedImage as JPEG); ``fields`` override message fields."""
        frame_id = frame_id or self.next_frame_id()
        if self.compressed:
            msg = CompressedImage(**array_to_compressed(array, "jpeg"))
        else:
            msg = Image(**array_to_image_fields(array, encoding))
        for key, value in (fields or {}).items():
            setattr(msg, key, value)
        msg.header.frame_id = frame_id
        msg.header.stamp = stamp if stamp is not None else stamp_now()
        self.image_pub.publish(msg)
        return frame_id

    def send_budget(self, budget_s: float | None = None, max_stage: int = 0, source: str = "test",
                    sec: int | None = None, nanosec: int | None = None) -> None:
        """Publish a Budget (``budget_s`` seconds, or raw ``sec``/``nanosec`` fields)."""
        msg = Budget(max_stage=max_stage, source=source)
        if budget_s is not None:
            ns = round(budget_s * 1e9)
            msg.budget = Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        else:
            msg.budget = Duration(sec=sec or 0, nanosec=nanosec or 0)
        self.budget_pub.publish(msg)

    def send_battery(self, percentage: float) -> None:
        """Publish a BatteryState with this state of charge (0..1)."""
        msg = BatteryState(percentage=percentage, present=True)
        self.battery_pub.publish(msg)

    # ------------------------------------------------------------------ outputs
    def frame(self, frame_id: str) -> list[StagePrediction]:
        """Messages received on ~/prediction for a frame so far (arrival order)."""
        with self._lock:
            return list(self.predictions.get(frame_id, []))

    def wait_final(self, frame_id: str, timeout: float = 20.0) -> list[StagePrediction]:
        """All ~/prediction messages of a frame once its final one arrived."""
        wait_for(lambda: any(m.is_final for m in self.frame(frame_id)), timeout, f"final result of {frame_id}")
        return self.frame(frame_id)

    def classify(self, array: np.ndarray, timeout: float = 20.0, **kwargs: Any) -> list[StagePrediction]:
        """Send one image and return its messages (waits for the final one)."""
        return self.wait_final(self.send_image(array, **kwargs), timeout)

    def stage_topic(self, k: int, frame_id: str) -> list[StagePrediction]:
        """Messages received on ~/stage_k for a frame."""
        with self._lock:
            return list(self.stage_messages[k].get(frame_id, []))

    def latest_diagnostics(self) -> dict[str, str]:
        """The newest status of this node from /diagnostics ({} before the first)."""
        with self._lock:
            return dict(self.diagnostics[-1]) if self.diagnostics else {}

    def fresh_diagnostics(self, timeout: float = 10.0) -> dict[str, str]:
        """A status published after this call (counters include everything before it)."""
        with self._lock:
            seen = len(self.diagnostics)
        wait_for(lambda: len(self.diagnostics) > seen + 1, timeout, "a fresh diagnostics status")
        return self.latest_diagnostics()

    def counter(self, key: str, diag: dict[str, str] | None = None) -> int:
        """An integer diagnostics value (0 if absent)."""
        diag = diag if diag is not None else self.latest_diagnostics()
        return int(diag.get(key, "0"))

    # ------------------------------------------------------------------ services
    def set_parameters(self, **values: Any) -> list[Any]:
        """SetParameters service: one result (successful, reason) per parameter, in order."""
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        return list(self._call(self._set_params, request).results)

    def set_ok(self, **values: Any) -> None:
        """Set parameters and assert every one was accepted."""
        for name, result in zip(values, self.set_parameters(**values)):
            assert result.successful, f"{name}: {result.reason}"

    def get_parameters(self, *names: str) -> dict[str, Any]:
        """GetParameters service: name -> Python value (None if unset)."""
        reply = self._call(self._get_params, GetParameters.Request(names=list(names)))
        values: dict[str, Any] = dict.fromkeys(names)  # an unset parameter may be left out of the reply
        for name, value in zip(names, reply.values):
            plain = Parameter.from_parameter_msg(ParameterMsg(name=name, value=value)).value
            values[name] = list(plain) if isinstance(plain, (array.array, tuple)) else plain  # arrays -> lists
        return values

    def lifecycle_state(self) -> str:
        """The node's lifecycle state label."""
        return self._call(self._get_state, GetState.Request()).current_state.label

    def change_state(self, transition_id: int) -> bool:
        """Trigger a lifecycle transition (lifecycle_msgs/Transition id); True on success."""
        return bool(self._call(self._change_state, ChangeState.Request(transition=Transition(id=transition_id)))
                    .success)
