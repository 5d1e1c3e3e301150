"""Budget schedules for the budget tool: time since start -> the next budget in ms.

Pure (no rclpy), table-tested. Spec strings, parsed by :func:`parse_schedule`:

* ``constant:20`` or just ``20`` - always 20 ms; ``constant:0`` means "unlimited"
  (a zero budget in impatient_ros/Budget).
* ``sweep:start_ms,end_ms,period_s`` - from start to end linearly over
  ``period_s`` seconds, then again from start (a saw tooth). Tight to loose is
  ``start < end``; the reverse order sweeps loose to tight.
* ``steps:10,20,40@2`` - each value (ms) held for 2 s, in order, repeating.
* any budget distribution ``impatient_ros.core.budget.parse_distribution`` understands
  (``uniform:2,20``, ``normal:10,3``, ``exponential:8``, ``gamma:2,5``,
  ``empirical:budgets.csv``) - a fresh random draw for every message, from a
  seeded generator so a run can be repeated.

Drawn budgets below :data:`MIN_DRAWN_BUDGET_MS` are raised to it: a normal
distribution can draw negative times, and a zero budget would mean the
opposite (unlimited) of what such a draw says (no time at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = [
    "MIN_DRAWN_BUDGET_MS",
    "SPEC_FORMS",
    "BudgetSchedule",
    "ConstantSchedule",
    "DistributionSchedule",
    "ScheduleError",
    "StepsSchedule",
    "SweepSchedule",
    "parse_schedule",
]

MIN_DRAWN_BUDGET_MS = 1e-3  # 1 microsecond: the tightest budget a draw can give
SPEC_FORMS = (
    "constant:MS (or just MS; 0 = unlimited), sweep:START_MS,END_MS,PERIOD_S, "
    "steps:MS,MS,...@HOLD_S, or a budget distribution such as uniform:LOW,HIGH, "
    "normal:MEAN,STD, exponential:MEAN, gamma:SHAPE,SCALE, empirical:FILE"
)


class ScheduleError(ValueError):
    """A schedule spec that cannot be parsed or has invalid values; the message lists the valid forms."""


class BudgetSchedule(Protocol):
    """Budget in ms for a message sent ``elapsed_s`` seconds after the schedule started."""

    def budget_ms(self, elapsed_s: float) -> float: ...

    def describe(self) -> str: ...


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ScheduleError(f"{name} must be finite, got {value!r}")
    return value


def _check_elapsed(elapsed_s: float) -> float:
    elapsed_s = float(elapsed_s)
    if not elapsed_s >= 0:  # also catches NaN
        raise ScheduleError(f"elapsed time must be >= 0 s, got {elapsed_s!r}")
    return elapsed_s


@dataclass(frozen=True)
class ConstantSchedule:
    """The same budget every time (0 = unlimited)."""

    value_ms: float

    def __post_init__(self) -> None:
        if _finite("constant budget", self.value_ms) < 0:
            raise ScheduleError(f"constant budget must be >= 0 ms (0 = unlimited), got {self.value_ms!r}")

    def budget_ms(self, elapsed_s: float) -> float:
        """The constant value."""
        _check_elapsed(elapsed_s)
        return float(self.value_ms)

    def describe(self) -> str:
        """One line for the log."""
        return "unlimited" if self.value_ms == 0 else f"constant {self.value_ms:g} ms"


@dataclass(frozen=True)
class SweepSchedule:
    """Linear from ``start_ms`` to ``end_ms`` over ``period_s``, repeating (saw tooth)."""

    start_ms: float
    end_ms: float
    period_s: float

    def __post_init__(self) -> None:
        for name in ("start_ms", "end_ms"):
            # A sweep through zero would hit "unlimited" in the middle of a tight phase.
            if not _finite(name, getattr(self, name)) > 0:
                raise ScheduleError(f"sweep: {name} must be > 0 ms, got {getattr(self, name)!r}")
        if not _finite("period_s", self.period_s) > 0:
            raise ScheduleError(f"sweep: period_s must be > 0 s, got {self.period_s!r}")

    def budget_ms(self, elapsed_s: float) -> float:
        """Position in the current period, mapped linearly onto [start, end)."""
        phase = math.fmod(_check_elapsed(elapsed_s), self.period_s) / self.period_s
        return float(self.start_ms + (self.end_ms - self.start_ms) * phase)

    def describe(self) -> str:
        """One line for the log."""
        return f"sweep {self.start_ms:g} -> {self.end_ms:g} ms every {self.period_s:g} s"


@dataclass(frozen=True)
class StepsSchedule:
    """Each value (ms) held for ``hold_s`` seconds, in order, repeating."""

    values_ms: tuple[float, ...]
    hold_s: float

    def __post_init__(self) -> None:
        values = tuple(_finite("step value", v) for v in self.values_ms)
        if not values:
            raise ScheduleError("steps: give at least one value, e.g. steps:10,20,40@2")
        if any(v < 0 for v in values):
            raise ScheduleError(f"steps: values must be >= 0 ms (0 = unlimited), got {list(values)}")
        if not _finite("hold_s", self.hold_s) > 0:
            raise ScheduleError(f"steps: hold time must be > 0 s, got {self.hold_s!r}")
        object.__setattr__(self, "values_ms", values)

    def budget_ms(self, elapsed_s: float) -> float:
        """The value whose hold interval contains ``elapsed_s``."""
        index = int(_check_elapsed(elapsed_s) // self.hold_s) % len(self.values_ms)
        return self.values_ms[index]

    def describe(self) -> str:
        """One line for the log."""
        return f"steps {', '.join(f'{v:g}' for v in self.values_ms)} ms, {self.hold_s:g} s each"


@dataclass
class DistributionSchedule:
    """A fresh draw from a budget distribution for every message (seeded, so repeatable)."""

    distribution: object  # a impatient_ros.core.budget.BudgetDistribution: has sample(n, rng) and to_spec()
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def budget_ms(self, elapsed_s: float) -> float:
        """One draw, raised to MIN_DRAWN_BUDGET_MS (see the module docstring)."""
        _check_elapsed(elapsed_s)
        value = float(self.distribution.sample(1, self._rng)[0])  # type: ignore[attr-defined]
        return max(value, MIN_DRAWN_BUDGET_MS)

    def describe(self) -> str:
        """One line for the log."""
        return f"random {self.distribution.to_spec()} (seed {self.seed})"  # type: ignore[attr-defined]


def _numbers(text: str, spec: str, form: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise ScheduleError(f"malformed schedule {spec!r}; expected {form}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ScheduleError(f"malformed schedule {spec!r}: values must be numbers; expected {form}") from None


def parse_schedule(spec: str, seed: int = 0) -> BudgetSchedule:
    """Turn a spec string into a schedule; ``seed`` seeds the distribution forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScheduleError(f"empty budget schedule; expected one of: {SPEC_FORMS}")
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep:
        try:
            return ConstantSchedule(float(text))
        except ValueError:
            raise ScheduleError(f"unknown budget schedule {spec!r}; expected one of: {SPEC_FORMS}") from None
    if kind == "constant":
        values = _numbers(rest, spec, "constant:MS")
        if len(values) != 1:
            raise ScheduleError(f"malformed schedule {spec!r}; expected constant:MS (one number)")
        return ConstantSchedule(values[0])
    if kind == "sweep":
        values = _numbers(rest, spec, "sweep:START_MS,END_MS,PERIOD_S")
        if len(values) != 3:
            raise ScheduleError(f"malformed schedule {spec!r}; expected sweep:START_MS,END_MS,PERIOD_S (3 numbers)")
        return SweepSchedule(*values)
    if kind == "steps":
        values_text, at, hold_text = rest.rpartition("@")
        if not at:
            raise ScheduleError(f"malformed schedule {spec!r}; expected steps:MS,MS,...@HOLD_S (hold time missing)")
        values = _numbers(values_text, spec, "steps:MS,MS,...@HOLD_S")
        hold = _numbers(hold_text, spec, "steps:MS,MS,...@HOLD_S")
        if len(hold) != 1:
            raise ScheduleError(f"malformed schedule {spec!r}; expected one hold time after '@'")
        return StepsSchedule(tuple(values), hold[0])
    # Everything else is a budget distribution. Imported here, not at the top:
    # the distributions belong to the training package, which only this form needs.
    from impatient_ros.core.budget import BudgetError, parse_distribution

    try:
        distribution = parse_distribution(text)
    except BudgetError as exc:
        raise ScheduleError(f"{exc}. Budget schedules: {SPEC_FORMS}") from exc
    return DistributionSchedule(distribution, seed)
