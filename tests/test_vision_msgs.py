"""vision_msgs output of a real impatient_node, received by a subscriber in another process.

vision_msgs is not installable here; tests/ros/vision_msgs_fixture.py builds its
real definitions (ros-perception/vision_msgs 4.1.1) with the project's rosidl
pipeline, cached across sessions. The node and a listener process
(tests/ros/vision_listener.py) get that build through their environment; the
test process only speaks impatient_ros messages, and compares what the listener
received on the vision_msgs topics with the StagePrediction of the same exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch

from impatient_ros.runtime.checkpoint import save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from tests.ros.node_harness import NodeProbe, gray_image, start_node, stop_node, wait_for
from tests.ros.vision_msgs_fixture import build_vision_msgs, vision_msgs_env

REPO = Path(__file__).resolve().parents[1]
LISTENER = REPO / "tests" / "ros" / "vision_listener.py"
SIZE = (32, 32)
K = 4
CLASS_NAMES = [f"class {i}" for i in range(10)]
NS = "/vtest"
FQN = f"{NS}/impatient_node"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=SIZE))
    path = tmp_path_factory.mktemp("vision") / "smallcnn32.pt"
    save_checkpoint(path, net, class_names=CLASS_NAMES,
                    preprocessing={"input_size": list(SIZE), "channels": "gray", "mean": [0.5], "std": [0.25]})
    return path


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_vision_msgs_required_without_the_package_fails_configure_clearly(checkpoint: Path, tmp_path: Path) -> None:
    proc = start_node(["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "vision_msgs:=required",
                       "-r", "__ns:=/vmissing"], tmp_path / "node.log")
    try:
        proc.wait(timeout=120)
    finally:
        output = stop_node(proc)
    assert proc.returncode == 1, output
    assert "vision_msgs:=required but the vision_msgs messages cannot be imported" in output, output


def test_classification_per_exit_matches_stage_prediction(checkpoint: Path, tmp_path: Path) -> None:
    prefix = build_vision_msgs()
    env = vision_msgs_env(prefix)
    node = start_node(["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "vision_msgs:=required",
                       "-p", "top_k:=3", "-p", "diagnostics_period_s:=0.2", "-r", f"__ns:={NS}"],
                      tmp_path / "node.log", env=env)
    out = tmp_path / "vision.jsonl"
    listener = None
    rclpy.init()
    probe = None
    try:
        probe = NodeProbe(NS, f"{NS}/image", num_stages=K, probe_name="vision_probe")
        probe.wait_ready(proc=node)
        probe.wait_round_trip(gray_image(SIZE, 99))  # before the listener starts, so it never sees this frame
        assert probe.latest_diagnostics().get("vision_msgs") == "publishing"
        # Started after the node has published its class map: transient local must still deliver it.
        listener = subprocess.Popen([sys.executable, str(LISTENER), "--node", FQN, "--stages", str(K),
                                     "--out", str(out)], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def listener_ready() -> bool:
            if listener.poll() is not None:
                raise AssertionError(f"listener exited: {listener.stdout.read().decode(errors='replace')}")
            return any(r.get("ready") for r in _records(out))

        wait_for(listener_ready, 60, "the vision_msgs listener to match the node's topics", interval=0.1)
        wait_for(lambda: probe.node.count_subscribers(f"{FQN}/classification") > 0, 10, "listener in the graph")

        predictions = {}
        for seed in range(3):
            frame_id = probe.next_frame_id("v")
            predictions[frame_id] = probe.classify(gray_image(SIZE, seed), frame_id=frame_id)
            assert [m.stage for m in predictions[frame_id]] == list(range(1, K + 1))

        def received() -> list[dict]:
            records = [r for r in _records(out) if r.get("frame_id") in predictions]
            return records if len(records) >= 2 * K * len(predictions) else []

        records = wait_for(received, 20, "a Classification per exit on the stage topics and ~/classification")
        for frame_id, msgs in predictions.items():
            aggregate = [r for r in records if r["frame_id"] == frame_id and r["topic"] == "classification"]
            assert len(aggregate) == K, aggregate
            for k, (pred, agg) in enumerate(zip(msgs, aggregate), start=1):
                on_stage = [r for r in records if r["frame_id"] == frame_id and r["topic"] == f"stage_{k}"]
                assert len(on_stage) == 1, on_stage
                # ~/classification carries every exit in order, the same message as the stage topic.
                assert agg["results"] == on_stage[0]["results"]
                results = on_stage[0]["results"]
                assert on_stage[0]["stamp"] == [pred.header.stamp.sec, pred.header.stamp.nanosec]
                assert results[0][0] == str(pred.class_id)
                assert np.float32(results[0][1]) == np.float32(pred.score)
                assert [cid for cid, _ in results] == [str(i) for i in pred.top_ids]
                assert np.allclose(np.float32([s for _, s in results]), pred.top_scores)
                scores = [s for _, s in results]
                assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)

        labels = [r for r in _records(out) if r.get("topic") == "label_info"]
        assert labels[0]["class_map"] == [[i, name] for i, name in enumerate(CLASS_NAMES)]
        assert labels[0]["threshold"] == 0.0

        # A new class-name override goes out as a new LabelInfo.
        renamed = [f"renamed {i}" for i in range(10)]
        probe.set_ok(labels=renamed)
        wait_for(lambda: any(r.get("topic") == "label_info" and r["class_map"][0][1] == "renamed 0"
                             for r in _records(out)), 10, "the LabelInfo after the labels change")
    finally:
        if probe is not None:
            probe.close()
        rclpy.try_shutdown()
        if listener is not None:
            listener.terminate()
            try:
                listener.wait(timeout=10)
            except subprocess.TimeoutExpired:
                listener.kill()
        output = stop_node(node)
        if node.returncode not in (0, -15):
            print(output)
