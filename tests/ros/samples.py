"""Messages with every field set to a distinctive value, shared by the
publishing process and the checking test."""

from __future__ import annotations

from builtin_interfaces.msg import Duration, Time
from std_msgs.msg import Header

from impatient_ros.msg import Budget, StagePrediction


def sample_stage_prediction(seq: int = 7) -> StagePrediction:
    msg = StagePrediction()
    msg.header = Header(stamp=Time(sec=1_700_000_000, nanosec=123_456_789), frame_id="camera_optical")
    msg.image_seq = 2**40 + seq  # beyond 32 bits: proves the uint64 survives
    msg.stage = 3
    msg.num_stages = 4
    msg.is_final = True
    msg.stop_reason = StagePrediction.STOP_DEADLINE
    msg.class_id = 9
    msg.label = "ankle boot – Stiefelette"  # non-ASCII survives the wire
    msg.score = 0.75
    msg.ratio_1v2 = 6.5
    msg.top_ids = [9, 7, 5]
    msg.top_scores = [0.75, 0.125, 0.0625]
    msg.stage_accuracy = 0.875
    msg.latency = Duration(sec=0, nanosec=4_500_000)
    msg.budget = Duration(sec=0, nanosec=20_000_000)
    return msg


def sample_budget() -> Budget:
    msg = Budget()
    msg.header = Header(stamp=Time(sec=1_700_000_001, nanosec=5), frame_id="planner")
    msg.budget = Duration(sec=1, nanosec=250_000_000)
    msg.max_stage = 2
    msg.source = "schedule"
    return msg
