"""Engine results -> StagePrediction fields, without a node: fill, check, serialize."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Duration, Time
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header

from impatient_ros.runtime.engine import StageResult, StopReason
from impatient_ros.ros.messages import (
    MAX_FRAME_ID_BYTES,
    build_stage_prediction,
    duration_fields,
    fill_duration,
    fill_stage_prediction,
    header_problem,
    resolve_labels,
    stage_accuracy,
)
from impatient_ros.msg import StagePrediction

REPO = Path(__file__).resolve().parents[1]
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
          "ankle boot – Stiefel"]


def _result(stage: int = 2, *, is_final: bool = False, stop: StopReason = StopReason.NONE,
            class_id: int = 9) -> StageResult:
    probs = np.full(10, 0.02, dtype=np.float32)
    probs[class_id] = 0.7
    probs[(class_id + 1) % 10] = 0.14
    order = np.argsort(-probs, kind="stable")[:3]
    return StageResult(stage=stage, num_stages=4, class_id=class_id, label=str(class_id),
                       score=float(probs[class_id]), top_ids=[int(i) for i in order],
                       top_scores=[float(probs[i]) for i in order], ratio_1v2=0.7 / 0.14, probs=probs,
                       ready_time=123.0, elapsed_s=0.004, is_final=is_final, stop_reason=stop)


def _header() -> Header:
    return Header(stamp=Time(sec=1_700_000_000, nanosec=999_999_999), frame_id="camera_optical")


@pytest.mark.parametrize(
    ("seconds", "fields"),
    [
        (0.0, (0, 0)),
        (1e-9, (0, 1)),
        (0.0125, (0, 12_500_000)),
        (1.25, (1, 250_000_000)),
        (0.9999999999, (1, 0)),        # rounds up into the next second, never nanosec == 1e9
        (59.000000001, (59, 1)),
        (-0.5, (0, 0)),                # clamped: a duration is never negative here
        (math.nan, (0, 0)),
        (1e12, (2**31 - 1, 999_999_999)),  # int32 seconds saturate
    ],
)
def test_duration_fields(seconds: float, fields: tuple[int, int]) -> None:
    assert duration_fields(seconds) == fields
    d = fill_duration(Duration(), seconds)
    assert (d.sec, d.nanosec) == fields


def test_fill_every_field_from_a_stage_result() -> None:
    result = _result(stage=3, is_final=True, stop=StopReason.DEADLINE)
    msg = fill_stage_prediction(StagePrediction(), result, header=_header(), image_seq=2**40 + 5, labels=LABELS,
                                accuracy=0.875, latency_s=0.0042, budget_s=0.02)
    assert msg.header == _header()
    assert msg.image_seq == 2**40 + 5
    assert (msg.stage, msg.num_stages, msg.is_final) == (3, 4, True)
    assert msg.stop_reason == StagePrediction.STOP_DEADLINE
    assert (msg.class_id, msg.label) == (9, LABELS[9])
    assert msg.score == pytest.approx(0.7)
    assert msg.ratio_1v2 == pytest.approx(5.0)
    assert list(msg.top_ids) == result.top_ids
    assert list(msg.top_scores) == pytest.approx(result.top_scores)
    assert msg.ensemble is False  # an exit's own answer
    assert msg.stage_accuracy == pytest.approx(0.875)
    assert (msg.latency.sec, msg.latency.nanosec) == (0, 4_200_000)
    assert (msg.budget.sec, msg.budget.nanosec) == (0, 20_000_000)
    # The wire format accepts every value (float32 ranges, uint8 stage, int32 arrays), and a message read
    # back survives another round trip unchanged, field by field. (Not byte by byte: CDR alignment padding
    # is not zeroed by the serializer, so two serializations of one message may differ there.)
    wire = serialize_message(msg)
    again = deserialize_message(wire, StagePrediction)
    assert deserialize_message(serialize_message(again), StagePrediction) == again
    assert again.label == LABELS[9] and again.image_seq == 2**40 + 5 and again.ratio_1v2 == pytest.approx(5.0)


def test_ensemble_flag_is_the_results() -> None:
    import dataclasses

    result = dataclasses.replace(_result(), ensemble=True)
    msg = build_stage_prediction(StagePrediction, result, header=_header(), image_seq=1, labels=LABELS,
                                 accuracy=math.nan, latency_s=0.001, budget_s=None)
    assert msg.ensemble is True
    again = deserialize_message(serialize_message(msg), StagePrediction)
    assert again.ensemble is True
    assert build_stage_prediction(StagePrediction, _result(), header=_header(), image_seq=1, labels=LABELS,
                                  accuracy=math.nan, latency_s=0.001, budget_s=None).ensemble is False


def test_stop_reasons_map_onto_the_message_constants() -> None:
    pairs = [(StopReason.DEADLINE, StagePrediction.STOP_DEADLINE),
             (StopReason.CONFIDENT, StagePrediction.STOP_CONFIDENT),
             (StopReason.MAX_STAGE, StagePrediction.STOP_MAX_STAGE),
             (StopReason.COMPLETE, StagePrediction.STOP_COMPLETE),
             (StopReason.ERROR, StagePrediction.STOP_ERROR)]
    for reason, constant in pairs:
        msg = build_stage_prediction(StagePrediction, _result(is_final=True, stop=reason), header=_header(),
                                     image_seq=1, labels=LABELS, accuracy=math.nan, latency_s=0.001, budget_s=None)
        assert msg.stop_reason == constant and msg.is_final
    msg = build_stage_prediction(StagePrediction, _result(), header=_header(), image_seq=1, labels=LABELS,
                                 accuracy=math.nan, latency_s=0.001, budget_s=None)
    assert msg.stop_reason == StagePrediction.STOP_NONE and not msg.is_final
    assert math.isnan(msg.stage_accuracy)
    assert (msg.budget.sec, msg.budget.nanosec) == (0, 0)  # unlimited


def test_header_is_copied_not_shared() -> None:
    header = _header()
    msg = build_stage_prediction(StagePrediction, _result(), header=header, image_seq=1, labels=LABELS,
                                 accuracy=0.5, latency_s=0.0, budget_s=None)
    header.frame_id = "changed"
    header.stamp.sec = 1
    assert msg.header.frame_id == "camera_optical" and msg.header.stamp.sec == 1_700_000_000


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        (_result(is_final=True, stop=StopReason.NO_TIME), "no StagePrediction value"),
        (_result(is_final=True, stop=StopReason.NONE), "inconsistent"),
        (_result(is_final=False, stop=StopReason.COMPLETE), "inconsistent"),
        (_result(stage=5, is_final=True, stop=StopReason.COMPLETE), "outside 1..4"),
        (_result(stage=0), "outside 1..4"),
    ],
)
def test_invalid_results_are_refused(result, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_stage_prediction(StagePrediction, result, header=_header(), image_seq=1, labels=LABELS,
                               accuracy=0.5, latency_s=0.0, budget_s=None)


def test_label_of_an_id_without_a_name_is_the_id() -> None:
    msg = build_stage_prediction(StagePrediction, _result(class_id=9), header=_header(), image_seq=1,
                                 labels=LABELS[:5], accuracy=0.5, latency_s=0.0, budget_s=None)
    assert msg.label == "9"


def test_resolve_labels() -> None:
    assert resolve_labels(LABELS, None, 10) == LABELS
    assert resolve_labels(LABELS, [], 10) == LABELS
    override = [f"class {i}" for i in range(10)]
    assert resolve_labels(LABELS, override, 10) == override
    assert resolve_labels(["a", "b"], None, 4) == ["a", "b", "2", "3"]
    with pytest.raises(ValueError, match="3 entries but the network has 10"):
        resolve_labels(LABELS, ["x", "y", "z"], 10)


@pytest.mark.parametrize(
    ("accuracies", "stage", "expected"),
    [([0.5, 0.75], 1, 0.5), ([0.5, 0.75], 2, 0.75), ([0.5, 0.75], 3, math.nan), (None, 1, math.nan),
     ([], 1, math.nan), ([None, 0.5], 1, math.nan), ([0.5], 0, math.nan)],
)
def test_stage_accuracy(accuracies, stage, expected) -> None:
    got = stage_accuracy(accuracies, stage)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_pure_modules_do_not_import_rclpy() -> None:
    code = ("import sys; import impatient_ros.ros.messages, impatient_ros.ros.budget_policy, impatient_ros.ros.diagnostics; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'rclpy' or m == 'impatient_ros.msg'];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("frame_id", "problem"),
    [
        ("", None),
        ("camera_optical_frame", None),
        ("f" * MAX_FRAME_ID_BYTES, None),                  # the limit itself
        ("é" * (MAX_FRAME_ID_BYTES // 2), None),            # 256 bytes in 128 characters
        ("f" * (MAX_FRAME_ID_BYTES + 1), "frame_id_too_long"),
        ("é" * (MAX_FRAME_ID_BYTES // 2 + 1), "frame_id_too_long"),  # 258 bytes in 129 characters
        ("x" * (8 * 2**20), "frame_id_too_long"),           # the red-team's 8 MB
    ],
)
def test_header_problem_bounds_the_frame_id_in_bytes(frame_id, problem) -> None:
    assert header_problem(Header(frame_id=frame_id)) == problem


def test_header_problem_is_cheap_for_a_huge_frame_id() -> None:
    import time

    header = Header(frame_id="x" * (64 * 2**20))
    start = time.perf_counter()
    for _ in range(1000):
        header_problem(header)
    assert time.perf_counter() - start < 0.05  # no encoding or scanning of the 64 MB string
