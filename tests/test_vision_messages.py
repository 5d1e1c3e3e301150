"""Engine results -> vision_msgs field values, without a node (the pure rules of ros/vision_messages.py).

vision_msgs cannot be installed here, so the message classes are exercised end
to end in tests/test_vision_msgs.py (a build of the real definitions, a real
node, a subscriber in another process). Here: the rules behind the fields, and
the parameter's behaviour with the package really absent.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from impatient_ros.core.results import StageResult, StopReason
from impatient_ros.ros.vision_messages import (
    UNLABELED_CLASS_ID,
    VISION_MSGS_CHOICES,
    class_map,
    hypotheses,
    load_vision_msgs,
)

VISION_MSGS_ABSENT = importlib.util.find_spec("vision_msgs") is None


def _result(probs: list[float], k: int = 3) -> StageResult:
    p = np.asarray(probs, dtype=np.float32)
    order = np.argsort(-p, kind="stable")[:k]
    return StageResult(stage=1, num_stages=2, class_id=int(order[0]), label=str(order[0]), score=float(p[order[0]]),
                       top_ids=[int(i) for i in order], top_scores=[float(p[i]) for i in order], ratio_1v2=2.0,
                       probs=p, ready_time=0.0, elapsed_s=0.0, is_final=False, stop_reason=StopReason.NONE)


def test_hypotheses_are_the_top_k_best_first_with_string_ids() -> None:
    result = _result([0.05, 0.6, 0.05, 0.3])
    pairs = hypotheses(result.top_ids, result.top_scores)
    assert [cid for cid, _ in pairs] == ["1", "3", "0"]
    assert pairs[0] == (str(result.class_id), pytest.approx(result.score))
    assert all(isinstance(cid, str) and isinstance(score, float) for cid, score in pairs)


def test_hypotheses_sort_keeps_ties_in_engine_order_and_clamps_to_unit_interval() -> None:
    # Out-of-order input is sorted; a tie keeps the given order (the engine's arg max first).
    assert hypotheses([7, 2, 5], [0.25, 0.5, 0.25]) == [("2", 0.5), ("7", 0.25), ("5", 0.25)]
    # float32 softmax can land an ulp outside [0, 1]; vision_msgs asks for [0, 1].
    assert hypotheses([0, 1], [1.0000001, -1e-9]) == [("0", 1.0), ("1", 0.0)]


def test_hypotheses_refuse_nan_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="NaN"):
        hypotheses([0, 1], [math.nan, 0.1])
    with pytest.raises(ValueError, match="2 class ids but 1 scores"):
        hypotheses([0, 1], [0.9])


def test_class_map_is_every_label_in_id_order() -> None:
    assert class_map(["cat", "dog", 3]) == [(0, "cat"), (1, "dog"), (2, "3")]
    assert class_map([]) == []
    with pytest.raises(ValueError, match="uint16"):
        class_map(["x"] * (UNLABELED_CLASS_ID + 1))


def test_vision_msgs_disabled_never_imports() -> None:
    def must_not_import(name: str):
        raise AssertionError(f"imported {name}")

    assert load_vision_msgs("disabled", import_module=must_not_import) is None
    assert VISION_MSGS_CHOICES == ("auto", "required", "disabled")
    with pytest.raises(ValueError, match="one of auto, required, disabled"):
        load_vision_msgs("yes")


@pytest.mark.skipif(not VISION_MSGS_ABSENT, reason="vision_msgs is installed here; this checks its absence")
def test_vision_msgs_absent_auto_is_off_and_required_is_a_clear_error() -> None:
    assert load_vision_msgs("auto") is None
    with pytest.raises(RuntimeError) as excinfo:
        load_vision_msgs("required")
    text = str(excinfo.value)
    assert "vision_msgs:=required" in text and "cannot be imported" in text and "vision_msgs:=auto" in text
