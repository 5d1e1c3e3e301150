"""impatient_node with ``cameras``: one real node process serving two cameras, budgets of their own.

The node runs as a process (tests/ros/node_harness.py); the test side is a plain
rclpy node. The two cameras' budgets differ in what a Budget message can fix
exactly, whatever the machine's speed: ``front`` gets one with max_stage 1
(answers end at exit 1), ``rear`` none (the node's default: unlimited, every
exit). Each answer must arrive on its own camera's topics only.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import rclpy
import torch
import yaml
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import Image

from impatient_ros.msg import Budget, StagePrediction
from impatient_ros.ros.cameras import camera_names_problem
from impatient_ros.ros.node_params import PARAMETERS, check_parameters
from impatient_ros.ros.image_convert import array_to_image_fields
from impatient_ros.runtime.checkpoint import save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from tests.ros.node_harness import RELIABLE, REPO, gray_image, start_node, stop_node, wait_for

SIZE = (32, 32)
K = 4
NS = "/mcam"
FQN = f"{NS}/impatient_node"
CAMERAS = ("front", "rear")


# --------------------------------------------------------------------------- no process needed


@pytest.mark.parametrize(("names", "fragment"), [
    (["front", "front"], "appears twice"),
    (["front", "rear/left"], "not a ROS name token"),
    (["1cam"], "not a ROS name token"),
    ([""], "not a ROS name token"),
])
def test_bad_camera_names_are_refused_with_a_reason(names, fragment) -> None:
    assert fragment in camera_names_problem(names)


def test_good_camera_names_and_no_cameras_pass() -> None:
    assert camera_names_problem(["front", "rear_2"]) is None
    assert camera_names_problem([]) is None and camera_names_problem(None) is None


def test_the_multicam_params_file_example_is_valid() -> None:
    data = yaml.safe_load((REPO / "config" / "multicam.yaml").read_text())["/**/impatient_node"]["ros__parameters"]
    declared = {spec.name: spec.default for spec in PARAMETERS}
    assert set(data) <= set(declared) and data["cameras"] == ["front", "rear"]
    assert check_parameters({**declared, **data}) is None


# --------------------------------------------------------------------------- a node process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=SIZE))
    path = tmp_path_factory.mktemp("mcam") / "smallcnn32.pt"
    save_checkpoint(path, net, class_names=[f"c{i}" for i in range(10)],
                    preprocessing={"input_size": list(SIZE), "channels": "gray", "mean": [0.5], "std": [0.25]})
    return path


class _Probe:
    """Publishes each camera's images and budgets; records every answer by (topic, frame id)."""

    def __init__(self) -> None:
        self.node = rclpy.create_node("multicam_probe")
        self.lock = threading.Lock()
        self.got: dict[str, dict[str, list[StagePrediction]]] = defaultdict(lambda: defaultdict(list))
        self.diag: dict[str, dict[str, str]] = {}
        self.images = {c: self.node.create_publisher(Image, f"{NS}/{c}/image", RELIABLE) for c in CAMERAS}
        self.budgets = {c: self.node.create_publisher(Budget, f"{NS}/{c}/budget", RELIABLE) for c in CAMERAS}
        for camera in CAMERAS:
            topics = [f"{FQN}/{camera}/prediction", *(f"{FQN}/{camera}/stage_{k}" for k in range(1, K + 1))]
            for topic in topics:
                self.node.create_subscription(StagePrediction, topic, lambda m, t=topic: self._on(t, m), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, RELIABLE)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.running = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        while self.running:
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shut down under us at teardown
                return

    def _on(self, topic: str, msg: StagePrediction) -> None:
        with self.lock:
            self.got[topic][msg.header.frame_id].append(msg)

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if status.name.startswith(FQN + ":") and "camera" in values:
                with self.lock:
                    self.diag[values["camera"]] = values

    def messages(self, topic: str, frame_id: str) -> list[StagePrediction]:
        with self.lock:
            return list(self.got[topic].get(frame_id, []))

    def send(self, camera: str, frame_id: str, seed: int) -> None:
        msg = Image(**array_to_image_fields(gray_image(SIZE, seed), "mono8"))
        msg.header.frame_id = frame_id
        self.images[camera].publish(msg)

    def final(self, camera: str, frame_id: str, timeout: float = 20.0) -> list[StagePrediction]:
        topic = f"{FQN}/{camera}/prediction"
        wait_for(lambda: any(m.is_final for m in self.messages(topic, frame_id)), timeout, f"{camera} {frame_id}")
        return self.messages(topic, frame_id)

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        self.node.destroy_node()


@pytest.fixture(scope="module")
def multicam(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("mcam_logs") / "node.log"
    proc = start_node(["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "diagnostics_period_s:=0.2",
                       "-p", "cameras:=[front, rear]", "-p", "vision_msgs:=disabled", "-r", f"__ns:={NS}"], log)
    rclpy.init()
    probe = _Probe()
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{stop_node(proc)}")
            return (all(p.get_subscription_count() > 0 for p in (*probe.images.values(), *probe.budgets.values()))
                    and set(probe.diag) == set(CAMERAS)
                    and all(d.get("state") == "active" for d in probe.diag.values()))
        wait_for(ready, 90.0, "the two-camera node to become active", interval=0.1)
        # Warm-up round trips: the node's result writers must have matched our readers.
        for camera in CAMERAS:
            for i in range(60):
                frame_id = f"warm_{camera}_{i}"
                probe.send(camera, frame_id, i)
                try:
                    probe.final(camera, frame_id, timeout=1.0)
                    break
                except AssertionError:
                    continue
            else:
                raise AssertionError(f"no answer for camera {camera}")
        yield probe, proc
    finally:
        probe.close()
        rclpy.try_shutdown()
        output = stop_node(proc)
        if proc.returncode not in (0, -15):
            print(output)


def test_two_cameras_with_different_budgets_answer_on_their_own_topics(multicam) -> None:
    probe, _ = multicam
    # front: a 5 s budget capped at exit 1; rear: no message, so the node's default (unlimited, every exit).
    budget = Budget(max_stage=1, source="front_test", budget=Duration(sec=5, nanosec=0))
    probe.budgets["front"].publish(budget)
    wait_for(lambda: probe.diag.get("front", {}).get("budget_source") == "topic", 10.0, "front's budget to apply")
    for i in range(3):
        ids = {camera: f"{camera}_{i}" for camera in CAMERAS}
        for camera in CAMERAS:   # both in flight together
            probe.send(camera, ids[camera], 100 + i)
        front, rear = probe.final("front", ids["front"]), probe.final("rear", ids["rear"])
        assert [(m.stage, m.is_final) for m in front] == [(1, True)]
        assert front[0].stop_reason == StagePrediction.STOP_MAX_STAGE
        assert [m.stage for m in rear] == [1, 2, 3, 4] and [m.is_final for m in rear] == [False] * 3 + [True]
        for k in range(1, K + 1):  # stage topics: each camera's answers there, none of the other's
            assert len(probe.messages(f"{FQN}/rear/stage_{k}", ids["rear"])) == 1
            assert len(probe.messages(f"{FQN}/front/stage_{k}", ids["front"])) == (1 if k == 1 else 0)
            assert probe.messages(f"{FQN}/front/stage_{k}", ids["rear"]) == []
            assert probe.messages(f"{FQN}/rear/stage_{k}", ids["front"]) == []
        assert probe.messages(f"{FQN}/front/prediction", ids["rear"]) == []
        assert probe.messages(f"{FQN}/rear/prediction", ids["front"]) == []
    # Diagnostics per camera: each its own budget and counters.
    wait_for(lambda: int(probe.diag["front"]["frames_processed"]) >= 4
             and int(probe.diag["rear"]["frames_processed"]) >= 4, 10.0, "diagnostics to count the frames")
    front_diag, rear_diag = probe.diag["front"], probe.diag["rear"]
    assert front_diag["budget_source"] == "topic" and front_diag["budget_ms"] == "5000.000"
    assert rear_diag["budget_source"] == "default" and rear_diag["budget_ms"] == "0.000"
    assert front_diag["scheduler"] == rear_diag["scheduler"] == "edf"
    # Stage 4 answers: front only its warm-up frame (before its budget), rear every frame.
    assert int(front_diag["stage_4_published"]) <= 1 and int(rear_diag["stage_4_published"]) >= 4


def test_a_negative_budget_on_one_camera_is_rejected_and_counted_there(multicam) -> None:
    probe, proc = multicam
    before = int(probe.diag["rear"].get("input_rejected_budget_negative", "0"))
    probe.budgets["rear"].publish(Budget(max_stage=0, source="bad", budget=Duration(sec=-1, nanosec=0)))
    wait_for(lambda: int(probe.diag["rear"].get("input_rejected_budget_negative", "0")) > before, 10.0,
             "the rejection to be counted")
    probe.send("rear", "after_bad_budget", 7)
    assert probe.final("rear", "after_bad_budget")[-1].is_final and proc.poll() is None


def test_duplicate_camera_names_stop_the_node_with_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    # The parameter check runs in the constructor, before the model loads: the process exits with 2.
    env_cmd = [sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", "-p", f"checkpoint:={checkpoint}",
               "-p", "cameras:=[front, front]", "-r", "__ns:=/mcam_bad"]
    done = subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "camera name 'front' appears twice" in done.stderr
