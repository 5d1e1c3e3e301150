"""Subscriber process for tests/test_vision_msgs.py: record every vision_msgs message of one node.

    python tests/ros/vision_listener.py --node /vtest/impatient_node --stages 4 --out messages.jsonl

Runs in its own process because vision_msgs (the test fixture build) is only
importable with the environment it was started with. Writes one JSON line per
message (flushed at once), and a line ``{"ready": true}`` once every topic has
a publisher and the class map arrived. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from vision_msgs.msg import Classification, LabelInfo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--node", required=True, help="fully qualified name of the impatient_node")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rclpy.init()
    node = rclpy.create_node("vision_listener")
    out = open(args.out, "a", encoding="utf-8")  # noqa: SIM115 - closed at exit

    def write(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    def on_classification(topic: str, msg: Classification) -> None:
        write({"topic": topic, "frame_id": msg.header.frame_id,
               "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec],
               "results": [[h.class_id, h.score] for h in msg.results]})

    def on_label_info(msg: LabelInfo) -> None:
        write({"topic": "label_info", "class_map": [[c.class_id, c.class_name] for c in msg.class_map],
               "threshold": msg.threshold})

    results_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    topics = {f"{args.node}/classification": "classification"}
    topics.update({f"{args.node}/classification/stage_{k}": f"stage_{k}" for k in range(1, args.stages + 1)})
    for topic, short in topics.items():
        node.create_subscription(Classification, topic, lambda m, short=short: on_classification(short, m),
                                 results_qos)
    got_labels = []
    node.create_subscription(
        LabelInfo, f"{args.node}/label_info", lambda m: (got_labels.append(1), on_label_info(m)),
        QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    stopping = []  # set from the signal handler; the loop ends after the current spin_once
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    ready = False
    try:
        while not stopping and rclpy.ok():
            executor.spin_once(timeout_sec=0.05)
            if not ready and got_labels and all(node.count_publishers(t) > 0 for t in topics):
                ready = True
                write({"ready": True})
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        out.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
