"""Which time budget applies to the next image, and when its deadline falls (pure, no ROS).

The node asks this module, for every image it starts to process, for the
*effective budget* and turns it into a deadline on its ``time.monotonic()`` clock:

    deadline = reference time of the image + effective budget

Sources of the budget, first match wins:

1. ``topic``: the latest ``impatient_ros/Budget`` message, while it is fresh
   (received less than ``budget_timeout_s`` ago; 0 = never stale). Freshness is
   measured from the message's *arrival* on the node's monotonic clock, not from
   its header stamp, so a sender with a skewed clock cannot make a budget
   immortal or dead on arrival. Its ``max_stage`` (0 = no cap) caps the exits
   while it is in force. A budget of zero means "unlimited".
2. ``energy``: the latest ``sensor_msgs/BatteryState`` while fresh (received
   less than ``battery_timeout_s`` ago; 0 = never stale), mapped through the
   table ``energy_soc_levels`` -> ``energy_budgets_ms``: the budget of the first
   level that is >= the state of charge (``percentage``, 0..1); a charge above
   the last level takes the last entry. An entry of 0 means "no energy limit at
   this charge": the default below applies. Only ``percentage`` is used. The
   current draw is deliberately ignored: it is dominated by the robot's motors
   and largely *caused* by this node's own budget (more stages, more current),
   so feeding it back would make the budget oscillate; the state of charge is
   the slow, integrated quantity that says how much energy is left.
3. ``default``: ``default_budget_ms`` (0 = unlimited).

Inputs are validated here, and every rejection is counted by reason
(``budget_nan``, ``budget_negative``, ``budget_too_large``, ``battery_nan``,
``battery_out_of_range``): a NaN or negative budget, a budget above
``max_budget_ms`` (an absurd value, e.g. seconds sent as milliseconds), and a
battery percentage that is NaN (the message's "unmeasured") or outside 0..1 are
ignored; the previous valid value stays in force until it goes stale.

Reference time (``reference_time`` = ``stamp`` or ``arrival``): ``stamp`` uses
the image header stamp, which lives on the ROS clock (system or simulation
time), while deadlines live on ``time.monotonic()``. At the image's arrival the
node reads both clocks; their difference is the offset that maps the stamp onto
the monotonic clock (:func:`stamp_to_monotonic`). The image's age at arrival
(camera exposure, driver, transport) thereby counts against its budget, which
is what a deadline on the stamp means: a stamp 250 ms old with a 100 ms budget
leaves no time for stage 1, and nothing is published for that image.

A stamp is trusted only while it is plausible for a live camera. It falls back
to the arrival time, counted by reason (:data:`REFERENCE_FALLBACKS`), when it is

* unset (zero): ``stamp_unset``;
* more than :data:`STAMP_SKEW_TOLERANCE_S` (10 ms) after the arrival:
  ``stamp_in_future`` (the clocks of two machines disagree). Within the
  tolerance (NTP-level skew) the arrival time is used without counting: an
  image cannot be younger than its arrival;
* older than ``max_age_s`` at arrival (the node's ``max_stamp_age_s``, default
  :data:`DEFAULT_MAX_STAMP_AGE_S` = 0.5 s; 0 = no bound): ``stamp_too_old``.
  Camera pipelines deliver within tens to a few hundred milliseconds; a stamp
  seconds old means unsynchronised clocks, a replayed bag or a driver stamping
  with another clock, and honouring it would silence the node (every deadline
  past on arrival). A pipeline that is really slower raises the bound.

All classes are thread-safe: the node updates them from subscription callbacks
while the inference thread reads them.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BATTERY_REJECTIONS",
    "BUDGET_REJECTIONS",
    "REFERENCE_TIMES",
    "SOURCES",
    "BudgetPolicy",
    "BudgetPolicyConfig",
    "DEFAULT_MAX_STAMP_AGE_S",
    "EffectiveBudget",
    "REFERENCE_FALLBACKS",
    "STAMP_SKEW_TOLERANCE_S",
    "ReferenceTime",
    "combine_stage_caps",
    "energy_budget_s",
    "reference_time",
    "stamp_to_monotonic",
    "validate_energy_table",
]

REFERENCE_TIMES = ("stamp", "arrival")
SOURCES = ("topic", "energy", "default")
BUDGET_REJECTIONS = ("budget_nan", "budget_negative", "budget_too_large")
BATTERY_REJECTIONS = ("battery_nan", "battery_out_of_range")
REFERENCE_FALLBACKS = ("stamp_unset", "stamp_in_future", "stamp_too_old")
DEFAULT_MAX_STAMP_AGE_S = 0.5   # a stamp older than this at arrival is not trusted (max_stamp_age_s)
STAMP_SKEW_TOLERANCE_S = 0.01   # a stamp up to this far after its arrival is clock skew: use the arrival


def validate_energy_table(levels: Sequence[float], budgets_ms: Sequence[float]) -> str | None:
    """Why an energy table is invalid, or None. Levels strictly increasing in (0, 1], budgets >= 0, same length."""
    if len(levels) != len(budgets_ms):
        return (f"energy_soc_levels has {len(levels)} entries but energy_budgets_ms has {len(budgets_ms)}; "
                "give one budget per level (set both at once with set_parameters_atomically)")
    if not levels:
        return "the energy table needs at least one level (use [1.0] with budget [0.0] to disable it)"
    for level in levels:
        if not (math.isfinite(level) and 0.0 < level <= 1.0):
            return f"energy_soc_levels must lie in (0, 1] (state of charge as a fraction), got {level}"
    if any(b <= a for a, b in zip(levels, levels[1:])):
        return f"energy_soc_levels must be strictly increasing, got {list(levels)}"
    for budget in budgets_ms:
        if not (math.isfinite(budget) and budget >= 0.0):
            return f"energy_budgets_ms must be finite and >= 0 (0 = no energy limit), got {budget}"
    return None


@dataclass(frozen=True)
class BudgetPolicyConfig:
    """The policy's parameters, in seconds; see the module docstring for their meaning."""

    default_budget_s: float = 0.0          # 0 = unlimited
    budget_timeout_s: float = 2.0          # 0 = a topic budget never goes stale
    battery_timeout_s: float = 10.0        # 0 = a battery reading never goes stale
    energy_soc_levels: tuple[float, ...] = (0.2, 0.5, 1.0)
    energy_budgets_s: tuple[float, ...] = (0.0, 0.0, 0.0)
    max_budget_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("default_budget_s", "budget_timeout_s", "battery_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.max_budget_s) and self.max_budget_s > 0.0):
            raise ValueError(f"max_budget_s must be finite and > 0, got {self.max_budget_s}")
        if self.default_budget_s > self.max_budget_s:
            raise ValueError(f"default_budget_s ({self.default_budget_s}) exceeds max_budget_s ({self.max_budget_s})")
        reason = validate_energy_table(self.energy_soc_levels, [1e3 * b for b in self.energy_budgets_s])
        if reason:
            raise ValueError(reason)


@dataclass(frozen=True)
class EffectiveBudget:
    """The budget for the next image: ``budget_s`` None = unlimited; ``max_stage`` 0 = no cap."""

    budget_s: float | None
    max_stage: int
    source: str        # one of SOURCES
    detail: str = ""   # e.g. the Budget message's own source string, or the state of charge

    @property
    def budget_ms(self) -> float:
        """Milliseconds, 0 for unlimited (the convention of parameters and messages)."""
        return 0.0 if self.budget_s is None else 1e3 * self.budget_s

    def deadline(self, reference: float) -> float | None:
        """Deadline on the monotonic clock for an image whose reference time is ``reference``."""
        return None if self.budget_s is None else reference + self.budget_s


def energy_budget_s(soc: float, levels: Sequence[float], budgets_s: Sequence[float]) -> float:
    """Budget (s) for state of charge ``soc`` from the table; 0 = no energy limit at this charge."""
    for level, budget in zip(levels, budgets_s):
        if soc <= level:
            return budget
    return budgets_s[-1]


def combine_stage_caps(*caps: int) -> int:
    """The tightest of several stage caps, where 0 means "no cap"; 0 if none caps."""
    active = [int(c) for c in caps if c and c > 0]
    return min(active) if active else 0


class BudgetPolicy:
    """Holds the latest budget and battery inputs and answers :meth:`effective` (thread-safe)."""

    def __init__(self, config: BudgetPolicyConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._config = config or BudgetPolicyConfig()
        self._topic: tuple[float, int, str, float] | None = None  # (budget_s, max_stage, source, arrival)
        self._battery: tuple[float, float] | None = None           # (soc, arrival)
        self._rejections: Counter[str] = Counter()
        self._accepted = Counter({"budget": 0, "battery": 0})

    @property
    def config(self) -> BudgetPolicyConfig:
        """The configuration in force."""
        return self._config

    def configure(self, config: BudgetPolicyConfig) -> None:
        """Replace the configuration (parameter change); inputs already received are kept."""
        with self._lock:
            self._config = config

    def on_budget(self, budget_s: float, max_stage: int, source: str, now: float) -> str | None:
        """Take a Budget message received at ``now`` (monotonic s); return the rejection reason or None.

        ``budget_s`` is the message's duration in seconds (0 = unlimited).
        """
        with self._lock:
            reason = None
            if math.isnan(budget_s):
                reason = "budget_nan"
            elif budget_s < 0.0:
                reason = "budget_negative"
            elif budget_s > self._config.max_budget_s:
                reason = "budget_too_large"
            if reason:
                self._rejections[reason] += 1
                return reason
            self._topic = (float(budget_s), max(0, int(max_stage)), str(source), now)
            self._accepted["budget"] += 1
            return None

    def on_battery(self, percentage: float, now: float) -> str | None:
        """Take a BatteryState ``percentage`` (0..1) received at ``now``; return the rejection reason or None."""
        with self._lock:
            reason = None
            if math.isnan(percentage):
                reason = "battery_nan"
            elif not 0.0 <= percentage <= 1.0:
                reason = "battery_out_of_range"
            if reason:
                self._rejections[reason] += 1
                return reason
            self._battery = (float(percentage), now)
            self._accepted["battery"] += 1
            return None

    def effective(self, now: float) -> EffectiveBudget:
        """The budget in force at ``now`` (monotonic s)."""
        with self._lock:
            cfg = self._config
            if self._topic is not None:
                budget_s, max_stage, source, arrival = self._topic
                if _fresh(arrival, now, cfg.budget_timeout_s):
                    return EffectiveBudget(budget_s if budget_s > 0.0 else None, max_stage, "topic", source)
            if self._battery is not None:
                soc, arrival = self._battery
                if _fresh(arrival, now, cfg.battery_timeout_s):
                    budget_s = energy_budget_s(soc, cfg.energy_soc_levels, cfg.energy_budgets_s)
                    if budget_s > 0.0:
                        return EffectiveBudget(budget_s, 0, "energy", f"soc={soc:.2f}")
            default = cfg.default_budget_s
            return EffectiveBudget(default if default > 0.0 else None, 0, "default")

    def rejections(self) -> dict[str, int]:
        """Rejected inputs so far, by reason (every reason present, zeros included)."""
        with self._lock:
            return {r: self._rejections[r] for r in (*BUDGET_REJECTIONS, *BATTERY_REJECTIONS)}

    def accepted(self) -> dict[str, int]:
        """Accepted Budget and BatteryState inputs so far."""
        with self._lock:
            return dict(self._accepted)

    def battery_soc(self, now: float) -> float | None:
        """The latest state of charge if it is still fresh, else None."""
        with self._lock:
            if self._battery is None or not _fresh(self._battery[1], now, self._config.battery_timeout_s):
                return None
            return self._battery[0]


def _fresh(arrival: float, now: float, timeout_s: float) -> bool:
    return timeout_s <= 0.0 or now - arrival < timeout_s


# --------------------------------------------------------------------------- reference time


def stamp_to_monotonic(stamp_s: float, ros_now_s: float, monotonic_now: float) -> float:
    """Map a ROS-clock time onto ``time.monotonic()`` using both clocks read at the same moment.

    ``ros_now_s`` and ``monotonic_now`` are read together at the image's arrival;
    their difference is the offset between the clocks, so the result is when,
    on the monotonic clock, the stamp happened.
    """
    return monotonic_now - (ros_now_s - stamp_s)


@dataclass(frozen=True)
class ReferenceTime:
    """An image's reference time on the monotonic clock, and why it is not the stamp when it is not."""

    monotonic: float
    fallback: str = ""        # "" or one of REFERENCE_FALLBACKS
    age_s: float = math.nan   # the stamp's age at arrival (negative: in the future); NaN without a stamp


def reference_time(mode: str, stamp_s: float, ros_now_s: float, monotonic_now: float, *,
                   max_age_s: float = DEFAULT_MAX_STAMP_AGE_S) -> ReferenceTime:
    """The reference time of an image that arrived at ``monotonic_now`` (ROS time ``ros_now_s``).

    ``mode`` "arrival" -> the arrival time. "stamp" -> the header stamp mapped
    to the monotonic clock, unless it is unset, more than
    :data:`STAMP_SKEW_TOLERANCE_S` in the future or older than ``max_age_s``
    (0 = no bound): then the arrival time, with the reason in ``fallback``
    (see the module docstring).
    """
    if mode == "arrival":
        return ReferenceTime(monotonic_now)
    if mode != "stamp":
        raise ValueError(f"reference_time must be one of {REFERENCE_TIMES}, got {mode!r}")
    if not stamp_s > 0.0:  # also NaN
        return ReferenceTime(monotonic_now, "stamp_unset")
    age_s = ros_now_s - stamp_s
    if age_s < -STAMP_SKEW_TOLERANCE_S:
        return ReferenceTime(monotonic_now, "stamp_in_future", age_s)
    if age_s <= 0.0:
        return ReferenceTime(monotonic_now, "", age_s)
    if max_age_s > 0.0 and age_s > max_age_s:
        return ReferenceTime(monotonic_now, "stamp_too_old", age_s)
    return ReferenceTime(stamp_to_monotonic(stamp_s, ros_now_s, monotonic_now), "", age_s)
