"""StagePrediction and Budget cross a real process boundary through rclpy and
Fast DDS on loopback, and every field arrives intact."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy

from impatient_ros.msg import Budget, StagePrediction
from tests.ros.samples import sample_budget, sample_stage_prediction

HERE = Path(__file__).resolve().parent


def test_messages_cross_process_every_field() -> None:
    publisher = subprocess.Popen(
        [sys.executable, str(HERE / "ros" / "publish_samples.py"), "--seconds", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    received: dict[str, object] = {}
    rclpy.init()
    try:
        node = rclpy.create_node("sample_checker")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(StagePrediction, "samples/prediction", lambda m: received.setdefault("prediction", m), qos)
        node.create_subscription(Budget, "samples/budget", lambda m: received.setdefault("budget", m), qos)
        deadline = time.monotonic() + 25.0
        while len(received) < 2 and time.monotonic() < deadline and publisher.poll() is None:
            rclpy.spin_once(node, timeout_sec=0.1)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        publisher.terminate()
        output, _ = publisher.communicate(timeout=10)
    assert set(received) == {"prediction", "budget"}, f"nothing received; publisher said:\n{output}"
    prediction, budget = received["prediction"], received["budget"]
    expected_prediction, expected_budget = sample_stage_prediction(), sample_budget()
    # Field by field, so a failure names the field; then the generated __eq__ as a whole.
    for field in StagePrediction.get_fields_and_field_types():
        assert getattr(prediction, field) == getattr(expected_prediction, field), field
    for field in Budget.get_fields_and_field_types():
        assert getattr(budget, field) == getattr(expected_budget, field), field
    assert prediction == expected_prediction and budget == expected_budget
    assert StagePrediction.STOP_COMPLETE == 4 and StagePrediction.STOP_NONE == 0
