"""Tests for impatient_ros.core.budget: index schemes, budget distributions and paper Eq. 5."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impatient_ros.core.budget import (
    SCHEMES,
    BudgetError,
    BudgetWeights,
    EmpiricalBudget,
    ExponentialBudget,
    GammaBudget,
    NormalBudget,
    UniformBudget,
    budget_weights,
    check_ready_times,
    expected_accuracy,
    parse_distribution,
    ready_times_from_calibration,
    scheme_weights,
)

# Hypothesis examples are cheap here; a fixed budget keeps the file fast and deterministic.
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

ms = st.floats(min_value=0.01, max_value=200.0, allow_nan=False, allow_infinity=False)


@st.composite
def ready_times(draw, min_size: int = 1, max_size: int = 8) -> list[float]:
    """Strictly increasing, non-negative ready times built from positive gaps."""
    start = draw(st.floats(min_value=0.0, max_value=50.0))
    gaps = draw(st.lists(st.floats(min_value=0.05, max_value=40.0), min_size=min_size - 1, max_size=max_size - 1))
    return list(np.cumsum([start, *gaps]))


@st.composite
def distributions(draw):
    kind = draw(st.sampled_from(["uniform", "normal", "exponential", "gamma", "empirical"]))
    if kind == "uniform":
        low = draw(st.floats(min_value=-20.0, max_value=100.0))
        return UniformBudget(low, low + draw(ms))
    if kind == "normal":
        return NormalBudget(draw(st.floats(min_value=-20.0, max_value=150.0)), draw(ms))
    if kind == "exponential":
        return ExponentialBudget(draw(ms))
    if kind == "gamma":
        return GammaBudget(draw(st.floats(min_value=0.1, max_value=20.0)), draw(st.floats(min_value=0.1, max_value=30.0)))
    return EmpiricalBudget(draw(st.lists(st.floats(min_value=0.0, max_value=300.0), min_size=1, max_size=40)))


# --------------------------------------------------------------------------- schemes


def test_scheme_names_and_hand_values():
    assert SCHEMES == ("STD", "EQ", "LIN", "POLY", "ILIN", "IPOLY", "NORM")
    np.testing.assert_allclose(scheme_weights("STD", 4), [0, 0, 0, 1])
    np.testing.assert_allclose(scheme_weights("EQ", 4), [0.25] * 4)
    np.testing.assert_allclose(scheme_weights("LIN", 3), [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(scheme_weights("POLY", 3), [1 / 14, 4 / 14, 9 / 14])
    np.testing.assert_allclose(scheme_weights("POLY", 3, gamma=3.0), [1 / 36, 8 / 36, 27 / 36])
    np.testing.assert_allclose(scheme_weights("ILIN", 3), [3 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(scheme_weights("IPOLY", 3), [9 / 14, 4 / 14, 1 / 14])
    raw = np.exp(-0.34 * (np.arange(1, 4) - 2.0) ** 2)
    np.testing.assert_allclose(scheme_weights("NORM", 3), raw / raw.sum())
    for name in SCHEMES:
        np.testing.assert_allclose(scheme_weights(name, 1), [1.0])


def test_scheme_names_are_case_insensitive():
    np.testing.assert_array_equal(scheme_weights("ipoly", 5), scheme_weights("IPOLY", 5))
    np.testing.assert_array_equal(scheme_weights(" Norm ", 5), scheme_weights("NORM", 5))


@FAST
@given(name=st.sampled_from(SCHEMES), k=st.integers(1, 40),
       gamma=st.floats(1.01, 6.0), beta=st.floats(0.01, 3.0))
def test_scheme_weights_are_a_distribution(name, k, gamma, beta):
    w = scheme_weights(name, k, gamma=gamma, beta=beta)
    assert w.shape == (k,)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert abs(w.sum() - 1.0) < 1e-12


@FAST
@given(k=st.integers(2, 40), gamma=st.floats(1.01, 6.0))
def test_increasing_and_decreasing_schemes(k, gamma):
    for name in ("LIN", "POLY"):
        assert np.all(np.diff(scheme_weights(name, k, gamma=gamma)) > 0), name
    for name in ("ILIN", "IPOLY"):
        assert np.all(np.diff(scheme_weights(name, k, gamma=gamma)) < 0), name
    # The inverse schemes are the increasing ones read backwards (w_k = w'_{K+1-k}).
    np.testing.assert_array_equal(scheme_weights("IPOLY", k, gamma=gamma), scheme_weights("POLY", k, gamma=gamma)[::-1])


@FAST
@given(k=st.integers(1, 40), beta=st.floats(0.01, 3.0))
def test_norm_is_symmetric_and_peaks_in_the_middle(k, beta):
    w = scheme_weights("NORM", k, beta=beta)
    np.testing.assert_allclose(w, w[::-1], rtol=1e-12)
    assert w[(k - 1) // 2] == pytest.approx(w.max())


@pytest.mark.parametrize("args, match", [
    (("FOO", 3), "valid schemes: STD, EQ, LIN, POLY, ILIN, IPOLY, NORM"),
    ((None, 3), "unknown weighting scheme"),
    (("EQ", 0), "num_exits"),
    (("EQ", 2.0), "num_exits"),
    (("EQ", True), "num_exits"),
])
def test_scheme_errors(args, match):
    with pytest.raises(BudgetError, match=match):
        scheme_weights(*args)
    assert issubclass(BudgetError, ValueError)


def test_scheme_parameter_errors():
    with pytest.raises(ValueError, match="gamma > 1"):
        scheme_weights("POLY", 3, gamma=1.0)
    with pytest.raises(ValueError, match="gamma > 1"):
        scheme_weights("IPOLY", 3, gamma=float("nan"))
    with pytest.raises(ValueError, match="beta > 0"):
        scheme_weights("NORM", 3, beta=0.0)
    scheme_weights("EQ", 3, gamma=0.5, beta=-1.0)  # unused parameters are not checked


# --------------------------------------------------------------------------- Eq. 5 properties


@FAST
@given(dist=distributions(), t=ready_times())
def test_eq5_weights_are_probabilities_of_some_answer(dist, t):
    bw = budget_weights(dist, t)
    assert bw.weights.shape == (len(t),)
    assert np.all(np.isfinite(bw.weights)) and np.all(bw.weights >= 0)
    assert 0.0 <= bw.mass_before_first <= 1.0
    assert abs(bw.weights.sum() - (1.0 - bw.mass_before_first)) < 1e-9
    json.dumps(bw.to_dict())  # plain types only


@FAST
@given(t=ready_times(min_size=1), data=st.data(), copies=st.integers(1, 5))
def test_point_mass_lands_on_one_exit(t, data, copies):
    k = data.draw(st.integers(0, len(t) - 1))
    if k < len(t) - 1:
        v = data.draw(st.floats(min_value=t[k], max_value=t[k + 1], exclude_max=True))
    else:
        v = data.draw(st.floats(min_value=t[k], max_value=t[k] + 100.0))
    bw = budget_weights(EmpiricalBudget([v] * copies), t)
    expected = np.zeros(len(t))
    expected[k] = 1.0
    np.testing.assert_array_equal(bw.weights, expected)
    assert bw.mass_before_first == 0.0


def test_point_mass_before_first_exit_gives_no_answer():
    bw = budget_weights(EmpiricalBudget([1.0, 1.0]), [2.0, 5.0])
    assert bw.mass_before_first == 1.0
    np.testing.assert_array_equal(bw.weights, [0.0, 0.0])
    with pytest.raises(BudgetError, match="no exit can ever answer"):
        bw.normalized()


def test_budget_exactly_at_ready_time_is_answered_by_that_exit():
    # Paper Eq. 3: t_k <= t < t_{k+1} gets f_k.
    bw = budget_weights(EmpiricalBudget([2.0, 5.0, 8.0, 9.0]), [2.0, 5.0, 8.0])
    np.testing.assert_array_equal(bw.weights, [0.25, 0.25, 0.5])
    assert bw.mass_before_first == 0.0


# --------------------------------------------------------------------------- hand-computed cases


def test_uniform_hand_computed():
    bw = budget_weights(parse_distribution("uniform:0,10"), [2, 5, 8])
    assert bw.mass_before_first == pytest.approx(0.2, abs=1e-12)
    np.testing.assert_allclose(bw.weights, [0.3, 0.3, 0.2], atol=1e-12)
    np.testing.assert_allclose(bw.normalized(), [0.375, 0.375, 0.25], atol=1e-12)
    assert bw.num_exits == 3


def test_exponential_hand_computed():
    bw = budget_weights(ExponentialBudget(8.0), [2, 5, 8])
    e = math.exp
    assert bw.mass_before_first == pytest.approx(1 - e(-2 / 8), abs=1e-14)
    np.testing.assert_allclose(bw.weights, [e(-2 / 8) - e(-5 / 8), e(-5 / 8) - e(-1), e(-1)], atol=1e-14)


def test_normal_hand_computed_and_negative_mass_is_no_answer():
    bw = budget_weights(NormalBudget(10.0, 3.0), [10.0])
    assert bw.mass_before_first == pytest.approx(0.5, abs=1e-15)
    # Not truncated at 0: N(0, 1) has half its mass at negative budgets, which no exit answers.
    bw = budget_weights(NormalBudget(0.0, 1.0), [0.0, 1.0])
    assert bw.mass_before_first == pytest.approx(0.5, abs=1e-15)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    np.testing.assert_allclose(bw.weights, [phi1 - 0.5, 1 - phi1], atol=1e-15)


def test_gamma_shape_one_is_exponential():
    t = np.array([0.0, 0.5, 3.0, 7.0, 40.0])
    np.testing.assert_allclose(GammaBudget(1.0, 7.0).cdf(t), ExponentialBudget(7.0).cdf(t), atol=1e-14)
    # Shape 2: P(T <= t) = 1 - (1 + x) e^-x with x = t / scale.
    x = t / 4.0
    np.testing.assert_allclose(GammaBudget(2.0, 4.0).cdf(t), 1 - (1 + x) * np.exp(-x), atol=1e-14)


def test_gamma_matches_scipy_when_available():
    special = pytest.importorskip("scipy.special")
    t = np.linspace(0.0, 60.0, 31)
    for shape, scale in [(0.3, 2.0), (2.5, 4.0), (9.0, 1.5)]:
        np.testing.assert_allclose(GammaBudget(shape, scale).cdf(t), special.gammainc(shape, t / scale), atol=1e-12)


def test_empirical_hand_computed():
    bw = budget_weights(EmpiricalBudget([1.0, 2.0, 3.0, 4.0]), [2.0, 4.0])
    assert bw.mass_before_first == 0.25
    np.testing.assert_array_equal(bw.weights, [0.5, 0.25])


def test_cdf_is_vectorised_and_bounded():
    t = np.array([[-5.0, 0.0], [3.0, 1e9]])
    for dist in (UniformBudget(0, 10), NormalBudget(5, 2), ExponentialBudget(3), GammaBudget(2, 2),
                 EmpiricalBudget([1, 2, 3])):
        c = dist.cdf(t)
        assert c.shape == (2, 2)
        assert np.all((c >= 0) & (c <= 1))
        assert c[1, 1] == pytest.approx(1.0)
        assert float(dist.cdf(3.0)) == pytest.approx(c[1, 0])
    assert ExponentialBudget(3).cdf(-1.0) == 0.0 and GammaBudget(2, 2).cdf(-1.0) == 0.0


@pytest.mark.parametrize("dist", [
    UniformBudget(2.0, 20.0), NormalBudget(10.0, 3.0), ExponentialBudget(8.0), GammaBudget(2.0, 4.0),
    EmpiricalBudget([1.0, 4.0, 4.0, 9.0, 12.5]),
], ids=lambda d: d.kind)
def test_cdf_agrees_with_sampling(dist):
    n = 20_000
    x = np.sort(dist.sample(n, np.random.default_rng(1234)))
    assert x.shape == (n,)
    grid = np.quantile(x, np.linspace(0.01, 0.99, 41))
    ecdf = np.searchsorted(x, grid, side="right") / n
    # DKW: P(sup |ecdf - cdf| > 0.02) <= 2 exp(-2 n 0.02^2) ~ 2e-7, and the seed is fixed.
    assert np.max(np.abs(ecdf - dist.cdf(grid))) < 0.02


# --------------------------------------------------------------------------- parsing


@FAST
@given(dist=distributions().filter(lambda d: d.kind != "empirical"))
def test_parse_round_trip(dist):
    again = parse_distribution(dist.to_spec())
    assert again == dist and type(again) is type(dist)


def test_parse_forms_and_case():
    assert parse_distribution("uniform:2,20") == UniformBudget(2.0, 20.0)
    assert parse_distribution(" Normal : 10 , 3 ") == NormalBudget(10.0, 3.0)
    assert parse_distribution("EXPONENTIAL:8") == ExponentialBudget(8.0)
    assert parse_distribution("gamma:2,4") == GammaBudget(2.0, 4.0)


def test_parse_empirical_round_trip(tmp_path):
    path = tmp_path / "budgets.csv"
    path.write_text("4.5\n2\n\n9\n")
    dist = parse_distribution(f"empirical:{path}")
    assert dist == EmpiricalBudget([2.0, 4.5, 9.0])
    assert parse_distribution(dist.to_spec()) == dist
    with pytest.raises(BudgetError, match="no source file"):
        EmpiricalBudget([1.0]).to_spec()


@pytest.mark.parametrize("spec, match", [
    ("", "expected one of"),
    ("uniform", "expected one of"),
    ("uniform:", r"uniform:LOW_MS,HIGH_MS"),
    ("uniform:1", r"2 number"),
    ("uniform:1,2,3", r"2 number"),
    ("uniform:1,", r"uniform:LOW_MS,HIGH_MS"),
    ("uniform:a,b", "must be numbers"),
    ("uniform:5,1", "high > low"),
    ("uniform:1,inf", "finite"),
    ("normal:nan,1", "finite"),
    ("normal:10,0", "std must be > 0"),
    ("normal:10,-1", "std must be > 0"),
    ("exponential:0", "mean must be > 0"),
    ("exponential:1,2", "1 number"),
    ("gamma:0,1", "shape and scale must be > 0"),
    ("gamma:1,-1", "shape and scale must be > 0"),
    ("weibull:1,2", "valid: uniform, normal, exponential, gamma, empirical"),
    ("empirical:", "empirical:PATH"),
    ("empirical:/no/such/budgets.csv", "not found"),
])
def test_parse_errors(spec, match):
    with pytest.raises(BudgetError, match=match):
        parse_distribution(spec)


def test_parse_rejects_non_string():
    with pytest.raises(BudgetError, match="malformed"):
        parse_distribution(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- empirical files


def test_empirical_file_formats(tmp_path):
    expected = EmpiricalBudget([3.0, 5.0, 7.5])
    (tmp_path / "a.csv").write_text("frame,budget_ms,note\n1,3,x\n2, 5 ,y\n3,7.5,z\n")
    (tmp_path / "b.json").write_text("[3, 5, 7.5]")
    (tmp_path / "c.json").write_text(json.dumps({"budget_ms": [3, 5, 7.5], "robot": "r1"}))
    (tmp_path / "d.txt").write_text("3\n5\n7.5\n")
    for name in ("a.csv", "b.json", "c.json", "d.txt"):
        dist = EmpiricalBudget.from_file(tmp_path / name)
        assert dist == expected, name
        assert dist.source == str(tmp_path / name)


@pytest.mark.parametrize("name, text, match", [
    ("nan.csv", "1\nnan\n3\n", "must be finite"),
    ("neg.csv", "1\n-2\n", "negative"),
    ("empty.csv", "\n\n", "no budget values"),
    ("header_only.csv", "budget_ms\n", "no budget values"),
    ("wrong_col.csv", "time,value\n1,2\n", "no 'budget_ms' column"),
    ("two_cols.csv", "1,2\n3,4\n", "one number per line"),
    ("word.csv", "budget_ms\n1\nfast\n", "row 3: expected a number"),
    ("short.csv", "a,budget_ms\n1\n", "missing"),
    ("empty.json", "[]", "no budget values"),
    ("key.json", '{"budgets": [1, 2]}', '"budget_ms"'),
    ("str.json", '["1", 2]', "string"),
    ("obj.json", '[{"x": 1}]', "expected a number"),
    ("broken.json", "[1, 2", "not valid JSON"),
    ("neg.json", '{"budget_ms": [1, -0.5]}', "negative"),
])
def test_empirical_file_errors(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(BudgetError, match=match):
        EmpiricalBudget.from_file(tmp_path / name)


@pytest.mark.parametrize("values, match", [
    ([], "no budget values"),
    ([1.0, float("nan")], "finite"),
    ([1.0, float("inf")], "finite"),
    ([2.0, -1.0], "negative"),
])
def test_empirical_value_errors(values, match):
    with pytest.raises(BudgetError, match=match):
        EmpiricalBudget(values)


# --------------------------------------------------------------------------- ready times and zero mass


@pytest.mark.parametrize("t, match", [
    ([], "non-empty"),
    ([[1.0, 2.0]], "1-D"),
    ([1.0, float("nan")], "finite"),
    ([1.0, float("inf")], "finite"),
    ([-1.0, 2.0], ">= 0"),
    ([3.0, 2.0], "strictly increasing"),
    ([1.0, 1.0], "strictly increasing"),
    (["a"], "numbers"),
])
def test_invalid_ready_times(t, match):
    with pytest.raises(BudgetError, match=match):
        budget_weights(UniformBudget(0, 10), t)


def test_check_ready_times_accepts_zero_start():
    np.testing.assert_array_equal(check_ready_times((0, 1.5, 2)), [0.0, 1.5, 2.0])


def test_zero_total_mass():
    bw = budget_weights(UniformBudget(0.0, 1.0), [5.0, 6.0])
    assert bw.mass_before_first == 1.0
    np.testing.assert_array_equal(bw.weights, [0.0, 0.0])
    with pytest.raises(BudgetError, match="no exit can ever answer under this distribution"):
        bw.normalized()


def test_budget_weights_rejects_non_distribution():
    with pytest.raises(BudgetError, match="parse_distribution"):
        budget_weights("uniform:0,10", [1.0])  # type: ignore[arg-type]


def test_budget_weights_are_read_only():
    bw = budget_weights(UniformBudget(0, 10), [2.0])
    with pytest.raises(ValueError):
        bw.weights[0] = 5.0


# --------------------------------------------------------------------------- calibration


def _timing(stages, **over):
    doc = {"format": "impatient_ros.timing", "version": 1, "device": "cpu", "input_size": [28, 28],
           "stages": stages}
    doc.update(over)
    return doc


def _stage(k, mean, p50=None, p99=None):
    return {"stage": k, "mean_ms": mean, "p50_ms": p50 if p50 is not None else mean,
            "p99_ms": p99 if p99 is not None else 2 * mean, "samples": 100}


def test_calibration_file_cumulative_ready_times(tmp_path):
    path = tmp_path / "timing.json"
    # Stage order in the file does not matter; stage numbers do.
    path.write_text(json.dumps(_timing([_stage(2, 2.5, p50=2.0), _stage(1, 1.0, p50=0.75), _stage(3, 0.5)])))
    np.testing.assert_allclose(ready_times_from_calibration(path, key="mean_ms"), [1.0, 3.5, 4.0])
    np.testing.assert_allclose(ready_times_from_calibration(path, key="p50_ms"), [0.75, 2.75, 3.25])
    np.testing.assert_allclose(ready_times_from_calibration(str(path), key="p99_ms"), [2.0, 7.0, 8.0])
    # The median is the package's one statistic for ready times (impatient_ros.core.ready_times).
    np.testing.assert_allclose(ready_times_from_calibration(path), [0.75, 2.75, 3.25])
    # And straight into Eq. 5.
    bw = budget_weights(UniformBudget(0.0, 8.0), ready_times_from_calibration(path, key="mean_ms"))
    np.testing.assert_allclose(bw.weights, [2.5 / 8, 0.5 / 8, 4.0 / 8])


def test_calibration_plain_list(tmp_path):
    path = tmp_path / "ready.json"
    path.write_text("[1.5, 3, 6]")
    np.testing.assert_array_equal(ready_times_from_calibration(path), [1.5, 3.0, 6.0])


@pytest.mark.parametrize("doc, match", [
    (_timing([_stage(1, 1.0)], format="other"), "expected 'impatient_ros.timing'"),
    (_timing([_stage(1, 1.0)], version=2), "unsupported timing file version"),
    (_timing([]), "non-empty"),
    (_timing([_stage(1, 1.0), _stage(3, 1.0)]), "without gaps"),
    (_timing([{"mean_ms": 1.0}]), "integer 'stage'"),
    (_timing([_stage(1, 0.0)]), "latency > 0"),
    (_timing([_stage(1, float("nan"))]), "latency > 0"),
    ([3.0, 1.0], "strictly increasing"),
    (["1"], "numbers"),
    ({"stages": []}, "format"),
    ("hello", "calibration object"),
])
def test_calibration_errors(tmp_path, doc, match):
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BudgetError, match=match):
        ready_times_from_calibration(path)


def test_calibration_key_and_missing_file(tmp_path):
    with pytest.raises(BudgetError, match="valid: mean_ms, p50_ms, p99_ms"):
        ready_times_from_calibration(tmp_path / "x.json", key="p90_ms")
    with pytest.raises(BudgetError, match="not found"):
        ready_times_from_calibration(tmp_path / "x.json")


# --------------------------------------------------------------------------- expected accuracy


def test_expected_accuracy():
    acc = [0.5, 0.7, 0.9]
    bw = budget_weights(UniformBudget(0.0, 10.0), [2.0, 5.0, 8.0])
    # Raw Eq. 5 weights: the 20 % no-answer mass counts as wrong.
    assert expected_accuracy(acc, bw) == pytest.approx(0.3 * 0.5 + 0.3 * 0.7 + 0.2 * 0.9)
    assert expected_accuracy(acc, bw.weights) == pytest.approx(expected_accuracy(acc, bw))
    assert expected_accuracy(acc, bw.normalized()) == pytest.approx((0.3 * 0.5 + 0.3 * 0.7 + 0.2 * 0.9) / 0.8)
    assert expected_accuracy(acc, scheme_weights("STD", 3)) == pytest.approx(0.9)


@pytest.mark.parametrize("acc, w, match", [
    ([0.5, 0.6], [1.0], "one accuracy per exit"),
    ([], [], "one accuracy per exit"),
    ([1.5], [1.0], r"\[0, 1\]"),
    ([0.5], [-1.0], ">= 0"),
    ([0.5], [float("nan")], "finite"),
])
def test_expected_accuracy_errors(acc, w, match):
    with pytest.raises(BudgetError, match=match):
        expected_accuracy(acc, w)


def test_budget_weights_to_dict_describes_source():
    d = budget_weights(GammaBudget(2.0, 4.0), [1.0, 2.0]).to_dict()
    assert d["distribution"] == {"kind": "gamma", "shape": 2.0, "scale_ms": 4.0}
    assert d["ready_times_ms"] == [1.0, 2.0]
    assert isinstance(d["weights"][0], float) and isinstance(d["mass_before_first"], float)
    assert isinstance(budget_weights(EmpiricalBudget([1.0]), [0.5]), BudgetWeights)
