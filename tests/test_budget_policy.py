"""The budget policy without ROS: which budget applies, rejections, freshness, reference times."""

from __future__ import annotations

import math
import threading

import pytest

from impatient_ros.ros.budget_policy import (
    BudgetPolicy,
    BudgetPolicyConfig,
    DEFAULT_MAX_STAMP_AGE_S,
    REFERENCE_FALLBACKS,
    STAMP_SKEW_TOLERANCE_S,
    EffectiveBudget,
    ReferenceTime,
    combine_stage_caps,
    energy_budget_s,
    reference_time,
    stamp_to_monotonic,
    validate_energy_table,
)

TABLE = BudgetPolicyConfig(
    default_budget_s=0.050,
    budget_timeout_s=1.0,
    battery_timeout_s=5.0,
    energy_soc_levels=(0.2, 0.5, 1.0),
    energy_budgets_s=(0.010, 0.030, 0.0),
    max_budget_s=10.0,
)


@pytest.mark.parametrize(
    ("soc", "budget_s"),
    [(0.0, 0.010), (0.1, 0.010), (0.2, 0.010), (0.2001, 0.030), (0.5, 0.030), (0.75, 0.0), (1.0, 0.0)],
)
def test_energy_table_lookup(soc: float, budget_s: float) -> None:
    assert energy_budget_s(soc, TABLE.energy_soc_levels, TABLE.energy_budgets_s) == budget_s


def test_energy_table_above_the_last_level_takes_the_last_entry() -> None:
    assert energy_budget_s(0.9, (0.2, 0.5), (0.01, 0.02)) == 0.02


@pytest.mark.parametrize(
    ("levels", "budgets", "fragment"),
    [
        ((0.2, 0.5), (1.0,), "one budget per level"),
        ((), (), "at least one level"),
        ((0.5, 0.2), (1.0, 2.0), "strictly increasing"),
        ((0.5, 0.5), (1.0, 2.0), "strictly increasing"),
        ((0.0, 1.0), (1.0, 2.0), "(0, 1]"),
        ((0.5, 1.5), (1.0, 2.0), "(0, 1]"),
        ((math.nan,), (1.0,), "(0, 1]"),
        ((1.0,), (-1.0,), ">= 0"),
        ((1.0,), (math.inf,), ">= 0"),
    ],
)
def test_invalid_energy_tables(levels, budgets, fragment) -> None:
    reason = validate_energy_table(levels, budgets)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError, match="energy|level"):
        BudgetPolicyConfig(energy_soc_levels=levels, energy_budgets_s=budgets)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"default_budget_s": -1.0}, "default_budget_s"),
        ({"budget_timeout_s": math.nan}, "budget_timeout_s"),
        ({"max_budget_s": 0.0}, "max_budget_s"),
        ({"default_budget_s": 20.0}, "exceeds max_budget_s"),
    ],
)
def test_invalid_configs(changes, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        BudgetPolicyConfig(**changes)


# Each row: inputs (kind, value, time) fed in order, then the time of the question and the answer.
# ("budget", (seconds, max_stage), t) / ("battery", soc, t)
CASES = [
    ("nothing received: the default", [], 0.0, (0.050, 0, "default")),
    ("fresh topic budget wins", [("budget", (0.020, 0), 0.0), ("battery", 0.1, 0.0)], 0.5, (0.020, 0, "topic")),
    ("topic budget just before its timeout", [("budget", (0.020, 2), 0.0)], 0.999, (0.020, 2, "topic")),
    ("stale topic budget: energy", [("budget", (0.020, 2), 0.0), ("battery", 0.1, 0.5)], 1.0, (0.010, 0, "energy")),
    ("stale topic budget, no battery: default", [("budget", (0.020, 2), 0.0)], 1.5, (0.050, 0, "default")),
    ("zero topic budget means unlimited", [("budget", (0.0, 3), 0.0)], 0.1, (None, 3, "topic")),
    ("newest topic budget replaces the older", [("budget", (0.020, 0), 0.0), ("budget", (0.040, 1), 0.2)], 0.3,
     (0.040, 1, "topic")),
    ("battery picks its band", [("battery", 0.4, 0.0)], 1.0, (0.030, 0, "energy")),
    ("battery band without limit: default", [("battery", 0.9, 0.0)], 1.0, (0.050, 0, "default")),
    ("newest battery reading counts", [("battery", 0.1, 0.0), ("battery", 0.45, 1.0)], 2.0, (0.030, 0, "energy")),
    ("stale battery ignored", [("battery", 0.1, 0.0)], 5.0, (0.050, 0, "default")),
    ("rejected budget keeps the previous", [("budget", (0.020, 0), 0.0), ("budget", (-1.0, 0), 0.1)], 0.2,
     (0.020, 0, "topic")),
    ("rejected budget does not refresh", [("budget", (0.020, 0), 0.0), ("budget", (math.nan, 0), 0.9)], 1.2,
     (0.050, 0, "default")),
    ("rejected battery keeps the previous", [("battery", 0.1, 0.0), ("battery", math.nan, 0.1)], 0.2,
     (0.010, 0, "energy")),
    ("battery out of range ignored", [("battery", 42.0, 0.0)], 0.1, (0.050, 0, "default")),
]


@pytest.mark.parametrize(("what", "inputs", "now", "expected"), CASES, ids=[c[0] for c in CASES])
def test_effective_budget(what, inputs, now, expected) -> None:
    policy = BudgetPolicy(TABLE)
    for kind, value, t in inputs:
        if kind == "budget":
            policy.on_budget(value[0], value[1], "test", t)
        else:
            policy.on_battery(value, t)
    got = policy.effective(now)
    budget_s, max_stage, source = expected
    assert (got.budget_s, got.max_stage, got.source) == (budget_s, max_stage, source), what


@pytest.mark.parametrize(
    ("budget_s", "reason"),
    [(math.nan, "budget_nan"), (-0.001, "budget_negative"), (10.001, "budget_too_large"), (1e9, "budget_too_large")],
)
def test_bad_budgets_are_counted(budget_s, reason) -> None:
    policy = BudgetPolicy(TABLE)
    assert policy.on_budget(budget_s, 0, "x", 0.0) == reason
    assert policy.rejections()[reason] == 1
    assert sum(policy.rejections().values()) == 1
    assert policy.accepted()["budget"] == 0
    assert policy.on_budget(10.0, 0, "x", 0.0) is None  # exactly max_budget_s is fine


@pytest.mark.parametrize(
    ("soc", "reason"),
    [(math.nan, "battery_nan"), (-0.01, "battery_out_of_range"), (1.01, "battery_out_of_range"),
     (55.0, "battery_out_of_range")],
)
def test_bad_battery_readings_are_counted(soc, reason) -> None:
    policy = BudgetPolicy(TABLE)
    assert policy.on_battery(soc, 0.0) == reason
    assert policy.rejections()[reason] == 1
    assert policy.battery_soc(0.0) is None


def test_timeouts_of_zero_never_go_stale() -> None:
    policy = BudgetPolicy(BudgetPolicyConfig(budget_timeout_s=0.0, battery_timeout_s=0.0,
                                             energy_budgets_s=(0.01, 0.02, 0.03)))
    policy.on_battery(0.3, 0.0)
    assert policy.effective(1e6).source == "energy"
    policy.on_budget(0.005, 0, "planner", 0.0)
    got = policy.effective(1e6)
    assert (got.budget_s, got.source, got.detail) == (0.005, "topic", "planner")


def test_configure_keeps_inputs_and_applies_new_rules() -> None:
    policy = BudgetPolicy(TABLE)
    policy.on_battery(0.1, 0.0)
    assert policy.effective(1.0).budget_s == 0.010
    policy.configure(BudgetPolicyConfig(energy_soc_levels=(1.0,), energy_budgets_s=(0.002,), battery_timeout_s=5.0))
    assert policy.effective(1.0).budget_s == 0.002
    policy.configure(BudgetPolicyConfig(battery_timeout_s=0.5))
    assert policy.effective(1.0).source == "default"


def test_effective_budget_deadline_and_ms() -> None:
    assert EffectiveBudget(0.02, 0, "topic").deadline(100.0) == pytest.approx(100.02)
    assert EffectiveBudget(None, 0, "default").deadline(100.0) is None
    assert EffectiveBudget(None, 0, "default").budget_ms == 0.0
    assert EffectiveBudget(0.0125, 0, "energy").budget_ms == pytest.approx(12.5)


@pytest.mark.parametrize(("caps", "expected"), [((0, 0), 0), ((3, 0), 3), ((0, 2), 2), ((4, 2), 2), ((1, 5), 1)])
def test_combine_stage_caps(caps, expected) -> None:
    assert combine_stage_caps(*caps) == expected


@pytest.mark.parametrize(
    ("mode", "stamp", "ros_now", "mono_now", "expected", "fallback"),
    [
        ("arrival", 990.0, 1000.0, 50.0, 50.0, ""),
        ("stamp", 999.75, 1000.0, 50.0, 49.75, ""),       # 250 ms old at arrival: honoured, its age counts
        ("stamp", 999.5, 1000.0, 50.0, 49.5, ""),         # exactly DEFAULT_MAX_STAMP_AGE_S old: still honoured
        ("stamp", 1000.0, 1000.0, 50.0, 50.0, ""),
        ("stamp", 0.0, 1000.0, 50.0, 50.0, "stamp_unset"),
        ("stamp", math.nan, 1000.0, 50.0, 50.0, "stamp_unset"),
        ("stamp", 1000.005, 1000.0, 50.0, 50.0, ""),      # 5 ms ahead: clock skew, the arrival, not counted
        ("stamp", 1000.5, 1000.0, 50.0, 50.0, "stamp_in_future"),
        ("stamp", 999.0, 1000.0, 50.0, 50.0, "stamp_too_old"),     # 1 s old: not a live frame's stamp
        ("stamp", 990.0, 1000.0, 50.0, 50.0, "stamp_too_old"),     # 10 s (clocks apart, a replayed bag)
        ("stamp", 1.0, 1.7e9, 50.0, 50.0, "stamp_too_old"),        # a driver stamping with another clock
    ],
)
def test_reference_time(mode, stamp, ros_now, mono_now, expected, fallback) -> None:
    ref = reference_time(mode, stamp, ros_now, mono_now)
    assert ref.monotonic == pytest.approx(expected) and ref.fallback == fallback
    assert ref.fallback in ("", *REFERENCE_FALLBACKS)


def test_reference_time_age_bound_is_a_parameter() -> None:
    assert DEFAULT_MAX_STAMP_AGE_S == 0.5 and STAMP_SKEW_TOLERANCE_S == 0.01
    # A slower pipeline raises the bound; 0 trusts every past stamp.
    assert reference_time("stamp", 999.0, 1000.0, 50.0, max_age_s=2.0) == ReferenceTime(49.0, "", 1.0)
    assert reference_time("stamp", 990.0, 1000.0, 50.0, max_age_s=0.0).monotonic == pytest.approx(40.0)
    too_old = reference_time("stamp", 999.0, 1000.0, 50.0, max_age_s=0.2)
    assert too_old.fallback == "stamp_too_old" and too_old.age_s == pytest.approx(1.0)
    assert reference_time("stamp", 1000.5, 1000.0, 50.0).age_s == pytest.approx(-0.5)
    assert math.isnan(reference_time("arrival", 999.0, 1000.0, 50.0).age_s)


def test_reference_time_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="stamp"):
        reference_time("header", 1.0, 2.0, 3.0)


def test_stamp_to_monotonic_keeps_the_age() -> None:
    # An image stamped 40 ms before arrival is 40 ms old on the monotonic clock too, whatever the offset.
    for offset in (0.0, 1.7e9, -5.0):
        assert stamp_to_monotonic(offset + 9.96, offset + 10.0, 123.0) == pytest.approx(122.96)


def test_policy_is_thread_safe() -> None:
    policy = BudgetPolicy(TABLE)
    errors = []

    def writer() -> None:
        for i in range(2000):
            policy.on_budget(0.001 * (i % 50), i % 3, "w", float(i))
            policy.on_battery((i % 10) / 10, float(i))

    def reader() -> None:
        try:
            for i in range(2000):
                got = policy.effective(float(i))
                assert got.source in ("topic", "energy", "default")
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert policy.accepted() == {"budget": 2000, "battery": 2000}
