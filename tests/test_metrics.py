"""training.metrics against hand-computed cases on tiny logits arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    NEVER_CORRECT,
    ExitCosts,
    MetricsError,
    accuracy_at_cost,
    cascade_exits,
    cascade_point,
    cascade_sweep,
    check_logits,
    compare_with_fixed_depth,
    cost_at_accuracy,
    gain_over_fixed_depth,
    confidence_scores,
    exit_accuracy,
    expected_time,
    first_correct_exit,
    first_correct_histogram,
    fit_threshold,
    scheme_expected_accuracy,
    score_threshold,
    summarize,
)

# Three exits, four images, three classes. Labels: 0, 1, 2, 0.
#   image 0: exit 1 right (confident), exit 2 right, exit 3 right
#   image 1: exit 1 wrong,             exit 2 right (confident), exit 3 right
#   image 2: exit 1 wrong,             exit 2 wrong,             exit 3 right
#   image 3: never right
LOGITS = np.array([
    [[4.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.5], [0.0, 1.0, 0.0]],   # exit 1
    [[2.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0]],   # exit 2
    [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 1.0]],   # exit 3
])
LABELS = np.array([0, 1, 2, 0])
ANYTIME = np.array([1.0, 3.0, 6.0])
APRIORI = np.array([0.8, 2.5, 5.5])


def test_exit_accuracy_by_hand():
    assert exit_accuracy(LOGITS, LABELS).tolist() == [0.25, 0.5, 0.75]


def test_scheme_expected_accuracy_by_hand():
    got = scheme_expected_accuracy([0.25, 0.5, 0.75], schemes=("STD", "EQ", "LIN", "ILIN", "POLY"))
    assert got["STD"] == pytest.approx(0.75)
    assert got["EQ"] == pytest.approx(0.5)
    assert got["LIN"] == pytest.approx((1 * 0.25 + 2 * 0.5 + 3 * 0.75) / 6)
    assert got["ILIN"] == pytest.approx((3 * 0.25 + 2 * 0.5 + 1 * 0.75) / 6)
    assert got["POLY"] == pytest.approx((1 * 0.25 + 4 * 0.5 + 9 * 0.75) / 14)


def test_expected_time_normalises_weights():
    assert expected_time([1, 1, 2], [1.0, 2.0, 4.0]) == pytest.approx((1 + 2 + 8) / 4)
    with pytest.raises(MetricsError):
        expected_time([0, 0, 0], [1.0, 2.0, 4.0])
    with pytest.raises(MetricsError):
        expected_time([1, 1], [1.0, 2.0, 4.0])


def test_exit_costs_apriori_and_anytime():
    c = ExitCosts(block_ms=(1.0, 2.0, 3.0), head_ms=(0.5, 0.25, 0.125))
    assert c.apriori_ms.tolist() == [1.5, 3.25, 6.125]
    assert c.anytime_ms.tolist() == [1.5, 3.75, 6.875]
    with pytest.raises(MetricsError):
        ExitCosts(block_ms=(1.0,), head_ms=(0.5, 0.5))
    with pytest.raises(MetricsError):
        ExitCosts(block_ms=(-1.0,), head_ms=(0.5,))


def test_confidence_scores():
    ratio = confidence_scores(LOGITS, "ratio")
    assert ratio[0].tolist() == [4.0, 0.5, 0.5, 1.0]  # log(p1/p2) = z1 - z2
    maxprob = confidence_scores(LOGITS, "maxprob")
    assert maxprob[0, 0] == pytest.approx(math.exp(4) / (math.exp(4) + 2))
    neg_entropy = confidence_scores(LOGITS, "entropy")
    p = np.exp(LOGITS[2, 3]) / np.exp(LOGITS[2, 3]).sum()
    assert neg_entropy[2, 3] == pytest.approx(float((p * np.log(p)).sum()))
    uniform = confidence_scores(np.zeros((1, 1, 4)), "entropy")
    assert uniform[0, 0] == pytest.approx(-math.log(4))
    with pytest.raises(MetricsError, match="valid"):
        confidence_scores(LOGITS, "margin")


def test_score_threshold_units():
    assert score_threshold(math.e, "ratio") == pytest.approx(1.0)
    assert score_threshold(0.0, "ratio") == -math.inf
    assert score_threshold(math.inf, "ratio") == math.inf
    assert score_threshold(0.3, "entropy") == -0.3
    assert score_threshold(0.9, "maxprob") == 0.9
    with pytest.raises(MetricsError):
        score_threshold(-1.0, "ratio")


def test_cascade_exits_first_confident_or_last():
    scores = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]])
    assert cascade_exits(scores, 1.0).tolist() == [0, 1, 2]
    assert cascade_exits(scores, -np.inf).tolist() == [0, 0, 0]
    assert cascade_exits(scores, np.inf).tolist() == [2, 2, 2]
    assert cascade_exits(scores, np.array([1.0, np.inf])).tolist() == [[0, 1, 2], [2, 2, 2]]


def test_cascade_point_by_hand():
    # ratio threshold e^1.5 (log-ratio 1.5): image 0 stops at exit 1 (log-ratio 4), image 1 at
    # exit 2 (5), image 3 at exit 2 (2, wrongly), image 2 runs to exit 3 (exit 2 only has 1).
    # Correct: images 0, 1, 2 -> 3/4; cost (1 + 3 + 6 + 3) / 4.
    point = cascade_point(LOGITS, LABELS, ANYTIME, math.exp(1.5), "ratio")
    assert point.accuracy == pytest.approx(0.75)
    assert point.exit_share == (0.25, 0.5, 0.25)
    assert point.mean_cost_ms == pytest.approx((1.0 + 3.0 + 6.0 + 3.0) / 4)


def test_cascade_sweep_spans_both_extremes_and_is_sorted():
    curve = cascade_sweep(LOGITS, LABELS, ANYTIME, "ratio", num_thresholds=10)
    assert curve.mean_cost_ms[0] == pytest.approx(1.0)  # everything leaves at exit 1
    assert curve.accuracy[0] == pytest.approx(0.25)
    assert curve.mean_cost_ms[-1] == pytest.approx(6.0)  # everything runs to the end
    assert curve.accuracy[-1] == pytest.approx(0.75)
    assert np.all(np.diff(curve.mean_cost_ms) >= 0)
    assert np.allclose(curve.exit_share.sum(axis=1), 1.0)
    # The hand-computed operating point above is on the sweep.
    assert any(np.isclose(a, 0.75) and np.isclose(c, 3.25) for a, c in zip(curve.accuracy, curve.mean_cost_ms))
    # log-ratio threshold in (0.5, 1]: images 0 and 2 stop at exit 1, images 1 and 3 at exit 2.
    assert any(np.isclose(a, 0.5) and np.isclose(c, 2.0) for a, c in zip(curve.accuracy, curve.mean_cost_ms))


def test_accuracy_at_cost_upper_envelope():
    costs = [1.0, 2.0, 3.0, 4.0]
    accs = [0.5, 0.6, 0.9, 0.8]  # (2, 0.6) lies below the hull of (1, .5)-(3, .9); (4, .8) is dominated
    assert accuracy_at_cost(costs, accs, 2.0) == pytest.approx(0.7)
    assert accuracy_at_cost(costs, accs, 3.5) == pytest.approx(0.9)
    assert math.isnan(accuracy_at_cost(costs, accs, 0.5))
    assert accuracy_at_cost(costs, accs, 1.0) == pytest.approx(0.5)


def test_fit_threshold_picks_best_within_target():
    curve = cascade_sweep(LOGITS, LABELS, ANYTIME, "ratio", num_thresholds=10)
    point = fit_threshold(curve, 4.0)
    assert point.mean_cost_ms <= 4.0
    assert point.accuracy == pytest.approx(0.75)
    assert point.mean_cost_ms == pytest.approx(3.25)  # the cheapest of the 75 % points
    assert fit_threshold(curve, 3.0).accuracy == pytest.approx(0.5)
    # Replaying the fitted threshold reproduces the point.
    again = cascade_point(LOGITS, LABELS, ANYTIME, point.threshold, "ratio")
    assert again.accuracy == pytest.approx(point.accuracy)
    assert again.mean_cost_ms == pytest.approx(point.mean_cost_ms)
    with pytest.raises(MetricsError, match="cheapest"):
        fit_threshold(curve, 0.5)


def test_compare_with_fixed_depth():
    curve = cascade_sweep(LOGITS, LABELS, ANYTIME, "ratio", num_thresholds=10)
    rows = compare_with_fixed_depth(curve, [0.25, 0.5, 0.75], APRIORI)
    assert [r["exit"] for r in rows] == [1, 2, 3]
    assert math.isnan(rows[0]["cascade_accuracy"])  # 0.8 ms is cheaper than any cascade point (1 ms)
    # Sweep points (1 ms, 25 %), (2 ms, 50 %), (3.25 ms, 75 %): at 2.5 ms the envelope gives 60 %.
    assert rows[1]["cascade_accuracy"] == pytest.approx(0.5 + 0.25 * 0.5 / 1.25)
    assert rows[1]["gain"] == pytest.approx(0.1)
    assert rows[2]["cascade_accuracy"] == pytest.approx(0.75)
    # The other way round: the cascade reaches exit 2's 50 % at 2 ms and exit 3's 75 % at 3.25 ms.
    assert [r["cascade_cost_at_same_accuracy_ms"] for r in rows] == pytest.approx([1.0, 2.0, 3.25])


def test_gain_over_fixed_depth_between_exits():
    curve = cascade_sweep(LOGITS, LABELS, ANYTIME, "ratio", num_thresholds=10)
    g = gain_over_fixed_depth(curve, [0.25, 0.5, 0.75], APRIORI, num=471)  # grid step 0.01 ms
    # Largest gap at 3.25 ms: cascade 75 %, fixed depth mixes exits 2 and 3: 50 % + 25 % * 0.75 / 3.
    assert g["max_gain"] == pytest.approx(0.75 - (0.5 + 0.25 * 0.75 / 3.0), abs=1e-3)
    assert g["max_gain_at_ms"] == pytest.approx(3.25, abs=0.01)
    # At 1 ms the cascade only has its exit-1 point (25 %) while fixed depth already mixes in exit 2.
    assert g["min_gain"] == pytest.approx(0.25 - (0.25 + 0.25 * 0.2 / 1.7), abs=1e-3)
    assert 0.0 < g["mean_gain"] < g["max_gain"]


def test_cost_at_accuracy():
    assert cost_at_accuracy([1.0, 2.0, 3.0], [0.5, 0.9, 0.8], 0.8) == pytest.approx(2.0)
    assert math.isnan(cost_at_accuracy([1.0, 2.0], [0.5, 0.6], 0.7))


def test_first_correct_exit_and_histogram():
    first = first_correct_exit(LOGITS, LABELS)
    assert first.tolist() == [0, 1, 2, NEVER_CORRECT]
    assert first_correct_histogram(first, 3) == {"1": 1, "2": 1, "3": 1, "never": 1}
    with pytest.raises(MetricsError):
        first_correct_histogram(np.array([3]), 3)


def test_first_correct_counts_a_later_fix_after_a_relapse():
    # Right at exit 2, wrong again at exit 3: the first correct exit is still 2.
    logits = np.array([[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    assert first_correct_exit(logits, [0]).tolist() == [1]


def test_check_logits_rejects_bad_input():
    with pytest.raises(MetricsError, match="shape"):
        check_logits(np.zeros((3, 4)))
    with pytest.raises(MetricsError, match="NaN"):
        check_logits(np.full((1, 2, 3), np.nan))
    with pytest.raises(MetricsError, match="label"):
        check_logits(LOGITS, [0, 1, 2])
    with pytest.raises(MetricsError, match="labels"):
        check_logits(LOGITS, [0, 1, 2, 3])


def test_summarize_mean_std():
    s = summarize({"a": [1.0, 2.0, 3.0], "b": [5.0]})
    assert s["a"]["mean"] == pytest.approx(2.0)
    assert s["a"]["std"] == pytest.approx(1.0)
    assert s["b"] == {"mean": 5.0, "std": 0.0, "n": 1}
