"""Publisher process for the cross-process message test.

Publishes the sample StagePrediction and Budget every 50 ms until killed or
until --seconds pass. Run as:  python tests/ros/publish_samples.py --seconds 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ros.samples import sample_budget, sample_stage_prediction  # noqa: E402

from impatient_ros.msg import Budget, StagePrediction  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rclpy.init()
    node = rclpy.create_node("sample_publisher")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pred_pub = node.create_publisher(StagePrediction, "samples/prediction", qos)
    budget_pub = node.create_publisher(Budget, "samples/budget", qos)
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        pred_pub.publish(sample_stage_prediction())
        budget_pub.publish(sample_budget())

    node.create_timer(0.05, tick)
    end = node.get_clock().now().nanoseconds + int(args.seconds * 1e9)
    try:
        while rclpy.ok() and node.get_clock().now().nanoseconds < end:
            rclpy.spin_once(node, timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    print(f"published {count} pairs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
