"""Budget distributions -> loss weights for the early-prediction exits (paper Eq. 5).

The paper trains all K exits jointly with the loss ``sum_k w_k L(f_k(x), y)``.
The weights come either from an index *scheme* (Sect. 3, "Weighting schemes":
STD, EQ, LIN, POLY, ILIN, IPOLY, NORM) or from a *time-budget distribution*
p(t) together with the times t_k at which each exit is ready (Eq. 5)::

    w_k = integral_{t_k}^{t_{k+1}} p(t) dt   for k < K
    w_K = integral_{t_K}^{inf}     p(t) dt

Budgets below t_1 get no answer at all; that mass is reported separately as
``BudgetWeights.mass_before_first`` instead of being folded into any exit.

Conventions (documented once here, relied on by the tests):

* Times are milliseconds.
* A budget exactly equal to t_k gets exit k's answer (paper Eq. 3:
  ``t_k <= t < t_{k+1}``), which matters only for the empirical distribution,
  the one with point masses.
* ``normal`` is NOT truncated at 0: its mass at negative times is simply part of
  the mass below t_1 ("no answer"), so Eq. 5 is applied to the distribution as
  written and the weights plus ``mass_before_first`` still sum to 1.
* ``exponential`` is parametrised by its mean in ms (rate = 1 / mean), the
  quantity a user can read off a log of budgets.
* The gamma CDF uses ``torch.special.gammainc`` (regularised lower incomplete
  gamma), imported lazily: torch is already a hard dependency of the training
  package, whereas scipy would be a new one for a single function; the lazy
  import keeps ``import impatient_ros.core.budget`` (and CLI parsing) fast.

Everything here is pure: no global state, no rclpy, no torch at import time.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .calibration import DEFAULT_KEY, READY_TIME_KEYS, CalibrationError, load_json, parse_calibration

__all__ = [
    "SCHEMES",
    "DISTRIBUTION_KINDS",
    "BudgetError",
    "BudgetDistribution",
    "UniformBudget",
    "NormalBudget",
    "ExponentialBudget",
    "GammaBudget",
    "EmpiricalBudget",
    "BudgetWeights",
    "scheme_weights",
    "parse_distribution",
    "check_ready_times",
    "budget_weights",
    "ready_times_from_calibration",
    "expected_accuracy",
]

SCHEMES: tuple[str, ...] = ("STD", "EQ", "LIN", "POLY", "ILIN", "IPOLY", "NORM")

# Which per-stage statistic a calibration's ready times are built from (impatient_ros.core.calibration).
CALIBRATION_KEYS: tuple[str, ...] = READY_TIME_KEYS


class BudgetError(ValueError):
    """Invalid budget input (scheme, distribution, ready times, file); the message says how to fix it."""


# --------------------------------------------------------------------------- schemes


def _check_num_exits(num_exits: int) -> int:
    # bool is an int subclass; True exits would be a silent bug.
    if isinstance(num_exits, bool) or not isinstance(num_exits, (int, np.integer)) or num_exits < 1:
        raise BudgetError(f"num_exits must be an integer >= 1, got {num_exits!r}")
    return int(num_exits)


def scheme_weights(name: str, num_exits: int, gamma: float = 2.0, beta: float = 0.34) -> np.ndarray:
    """Return the paper's index-scheme weights w_1..w_K (float64, sum 1).

    ``name`` is one of ``SCHEMES`` (case-insensitive). ``gamma`` (> 1) is used by
    POLY/IPOLY, ``beta`` (> 0) by NORM; they are only checked where used.
    """
    if not isinstance(name, str) or name.strip().upper() not in SCHEMES:
        raise BudgetError(f"unknown weighting scheme {name!r}; valid schemes: {', '.join(SCHEMES)}")
    scheme = name.strip().upper()
    k_max = _check_num_exits(num_exits)
    k = np.arange(1, k_max + 1, dtype=np.float64)

    if scheme in ("POLY", "IPOLY") and not (math.isfinite(gamma) and gamma > 1.0):
        raise BudgetError(f"{scheme} needs a finite gamma > 1 (paper Sect. 3), got {gamma!r}")
    if scheme == "NORM" and not (math.isfinite(beta) and beta > 0.0):
        raise BudgetError(f"NORM needs a finite beta > 0 (paper uses 0.34), got {beta!r}")

    if scheme == "STD":
        raw = np.zeros(k_max)
        raw[-1] = 1.0
    elif scheme == "EQ":
        raw = np.ones(k_max)
    elif scheme in ("LIN", "ILIN"):
        raw = k.copy()
    elif scheme in ("POLY", "IPOLY"):
        raw = k**gamma
    else:  # NORM
        raw = np.exp(-beta * (k - (k_max + 1) / 2.0) ** 2)

    weights = raw / raw.sum()
    if scheme in ("ILIN", "IPOLY"):
        # Paper: w_k = w'_{K+1-k}, the increasing scheme read backwards. Reversing
        # after normalising keeps IPOLY bit-identical to POLY reversed.
        weights = weights[::-1].copy()
    return weights


# --------------------------------------------------------------------------- distributions


def _check_finite(kind: str, **params: float) -> None:
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise BudgetError(f"{kind}: {key} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise BudgetError(f"{kind}: {key} must be finite, got {value!r}")


def _check_sample_size(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise BudgetError(f"sample size must be an integer >= 0, got {n!r}")
    return int(n)


def _fmt(value: float) -> str:
    # repr() of a float round-trips exactly through float(), so specs round-trip too.
    return repr(float(value))


class BudgetDistribution:
    """Base of the budget distributions (milliseconds).

    Subclasses implement ``cdf(t) = P(T <= t)``, ``sample(n, rng)``, ``to_spec()``
    and ``to_dict()``. ``mass_below(t) = P(T < t)`` equals ``cdf`` for the
    continuous ones; the empirical distribution overrides it because its atoms
    sit exactly on the interval edges of Eq. 5.
    """

    kind: str = ""

    def cdf(self, t_ms: Any) -> np.ndarray:
        """P(T <= t) element-wise, as a float64 array shaped like ``t_ms``."""
        raise NotImplementedError

    def mass_below(self, t_ms: Any) -> np.ndarray:
        """P(T < t) element-wise; equals ``cdf`` for distributions without atoms."""
        return self.cdf(t_ms)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` budgets (ms) with the numpy generator ``rng``."""
        raise NotImplementedError

    def to_spec(self) -> str:
        """The CLI string that ``parse_distribution`` turns back into this object."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain-type description for checkpoints and reports."""
        raise NotImplementedError


@dataclass(frozen=True)
class UniformBudget(BudgetDistribution):
    """Budget uniform on [low, high) ms."""

    low: float
    high: float
    kind = "uniform"

    def __post_init__(self) -> None:
        _check_finite("uniform", low=self.low, high=self.high)
        if not self.high > self.low:
            raise BudgetError(f"uniform: need high > low, got low={self.low!r}, high={self.high!r}")

    def cdf(self, t_ms: Any) -> np.ndarray:
        t = np.asarray(t_ms, dtype=np.float64)
        return np.clip((t - self.low) / (self.high - self.low), 0.0, 1.0)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.low, self.high, size=_check_sample_size(n))

    def to_spec(self) -> str:
        return f"uniform:{_fmt(self.low)},{_fmt(self.high)}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low_ms": float(self.low), "high_ms": float(self.high)}


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


@dataclass(frozen=True)
class NormalBudget(BudgetDistribution):
    """Normal budget N(mean, std^2) ms, not truncated: negative-time mass counts as "no answer"."""

    mean: float
    std: float
    kind = "normal"

    def __post_init__(self) -> None:
        _check_finite("normal", mean=self.mean, std=self.std)
        if not self.std > 0:
            raise BudgetError(f"normal: std must be > 0, got {self.std!r}")

    def cdf(self, t_ms: Any) -> np.ndarray:
        t = np.asarray(t_ms, dtype=np.float64)
        # erfc form keeps relative precision in the lower tail, where the
        # mass-below-t_1 of an early exit lives.
        return 0.5 * _erfc(-(t - self.mean) / (self.std * math.sqrt(2.0)))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(self.mean, self.std, size=_check_sample_size(n))

    def to_spec(self) -> str:
        return f"normal:{_fmt(self.mean)},{_fmt(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean_ms": float(self.mean), "std_ms": float(self.std)}


@dataclass(frozen=True)
class ExponentialBudget(BudgetDistribution):
    """Exponential budget with the given mean in ms (rate = 1 / mean)."""

    mean: float
    kind = "exponential"

    def __post_init__(self) -> None:
        _check_finite("exponential", mean=self.mean)
        if not self.mean > 0:
            raise BudgetError(f"exponential: mean must be > 0 ms, got {self.mean!r}")

    def cdf(self, t_ms: Any) -> np.ndarray:
        t = np.asarray(t_ms, dtype=np.float64)
        # -expm1(-x) == 1 - exp(-x) without cancellation for small x.
        return np.where(t > 0, -np.expm1(-np.maximum(t, 0.0) / self.mean), 0.0)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.exponential(self.mean, size=_check_sample_size(n))

    def to_spec(self) -> str:
        return f"exponential:{_fmt(self.mean)}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean_ms": float(self.mean)}


@dataclass(frozen=True)
class GammaBudget(BudgetDistribution):
    """Gamma budget with ``shape`` k and ``scale`` theta in ms (mean k * theta)."""

    shape: float
    scale: float
    kind = "gamma"

    def __post_init__(self) -> None:
        _check_finite("gamma", shape=self.shape, scale=self.scale)
        if not (self.shape > 0 and self.scale > 0):
            raise BudgetError(f"gamma: shape and scale must be > 0, got shape={self.shape!r}, scale={self.scale!r}")

    def cdf(self, t_ms: Any) -> np.ndarray:
        import torch  # lazy: see module docstring

        t = np.asarray(t_ms, dtype=np.float64)
        # gammainc is undefined (nan) for negative x; the budget has no mass there.
        x = torch.from_numpy(np.ascontiguousarray(np.maximum(t, 0.0) / self.scale))
        a = torch.tensor(float(self.shape), dtype=torch.float64)
        out = torch.special.gammainc(a, x).numpy()
        # Keep NaN inputs NaN instead of silently mapping them to 0.
        return np.where(np.isnan(t), np.nan, out).reshape(t.shape)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.gamma(self.shape, self.scale, size=_check_sample_size(n))

    def to_spec(self) -> str:
        return f"gamma:{_fmt(self.shape)},{_fmt(self.scale)}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": float(self.shape), "scale_ms": float(self.scale)}


@dataclass(frozen=True)
class EmpiricalBudget(BudgetDistribution):
    """Empirical distribution of recorded budgets (ms): each value has mass 1/n.

    ``values`` (any sequence of numbers; stored as a sorted tuple) must be
    non-empty, finite and non-negative. ``source`` (the file it
    came from, if any) does not take part in equality.
    """

    values: tuple[float, ...]
    source: str | None = field(default=None, compare=False)
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)
    kind = "empirical"

    def __post_init__(self) -> None:
        where = f" (from {self.source})" if self.source else ""
        try:
            arr = np.asarray(self.values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise BudgetError(f"empirical: budgets must be numbers{where}: {exc}") from None
        if arr.size == 0:
            raise BudgetError(f"empirical: no budget values{where}; record at least one budget in ms")
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise BudgetError(f"empirical: budget #{bad + 1} is {arr[bad]!r}{where}; all budgets must be finite")
        if np.any(arr < 0):
            bad = int(np.flatnonzero(arr < 0)[0])
            raise BudgetError(f"empirical: budget #{bad + 1} is negative ({arr[bad]!r} ms){where}; budgets are durations")
        sorted_arr = np.sort(arr)
        # Stored sorted: the order of a log carries no meaning for the distribution,
        # so two logs with the same budgets compare equal.
        object.__setattr__(self, "values", tuple(float(v) for v in sorted_arr))
        sorted_arr.setflags(write=False)
        object.__setattr__(self, "_sorted", sorted_arr)

    def __repr__(self) -> str:
        # Recorded logs can hold thousands of budgets; a summary is what a reader needs.
        return f"EmpiricalBudget(num_values={self._sorted.size}, source={self.source!r})"

    @classmethod
    def from_file(cls, path: str | Path) -> "EmpiricalBudget":
        """Load recorded budgets from a CSV or JSON file (see ``_read_budget_file``)."""
        return cls(tuple(_read_budget_file(Path(path))), source=str(path))

    def cdf(self, t_ms: Any) -> np.ndarray:
        t = np.asarray(t_ms, dtype=np.float64)
        out = np.searchsorted(self._sorted, t, side="right") / self._sorted.size
        return np.where(np.isnan(t), np.nan, out)

    def mass_below(self, t_ms: Any) -> np.ndarray:
        # Strict: a budget equal to t_k is answered by exit k (paper Eq. 3).
        t = np.asarray(t_ms, dtype=np.float64)
        out = np.searchsorted(self._sorted, t, side="left") / self._sorted.size
        return np.where(np.isnan(t), np.nan, out)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self._sorted, size=_check_sample_size(n), replace=True)

    def to_spec(self) -> str:
        if not self.source:
            raise BudgetError("empirical: this sample has no source file, so it has no spec; save it to a file first")
        return f"empirical:{self.source}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "num_values": int(self._sorted.size),
            "mean_ms": float(self._sorted.mean()),
            "min_ms": float(self._sorted[0]),
            "max_ms": float(self._sorted[-1]),
        }


def _number(cell: Any, where: str) -> float:
    if isinstance(cell, bool) or not isinstance(cell, (int, float, str)):
        raise BudgetError(f"{where}: expected a number, got {cell!r}")
    try:
        return float(cell)
    except ValueError:
        raise BudgetError(f"{where}: expected a number, got {cell!r}") from None


def _read_budget_file(path: Path) -> list[float]:
    """Read recorded budgets (ms).

    CSV (any suffix but .json): one number per line, or a header row with a
    column named ``budget_ms``. JSON: a list of numbers or ``{"budget_ms": [...]}``.
    Validation of the numbers themselves (finite, >= 0, non-empty) is left to
    ``EmpiricalBudget`` so there is one place for it.
    """
    if not path.is_file():
        raise BudgetError(f"budget file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BudgetError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            if "budget_ms" not in data:
                raise BudgetError(f'{path}: JSON object needs a "budget_ms" list, found keys {sorted(data)}')
            data = data["budget_ms"]
        if not isinstance(data, list):
            raise BudgetError(f'{path}: expected a JSON list of budgets or {{"budget_ms": [...]}}')
        out = []
        for i, value in enumerate(data):
            # A JSON string is not a budget even if it looks numeric: it hints at a broken export.
            if isinstance(value, str):
                raise BudgetError(f"{path} item {i + 1}: expected a number, got the string {value!r}")
            out.append(_number(value, f"{path} item {i + 1}"))
        return out

    rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    try:
        [float(c) for c in header]
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        if "budget_ms" not in header:
            raise BudgetError(f"{path}: CSV header has no 'budget_ms' column (found {header})")
        col = header.index("budget_ms")
        body = rows[1:]
    else:
        if len(header) != 1:
            raise BudgetError(f"{path}: CSV without a header must hold one number per line; "
                              f"add a header row with a 'budget_ms' column")
        col = 0
        body = rows
    out = []
    for line_no, row in enumerate(body, start=2 if has_header else 1):
        if col >= len(row):
            raise BudgetError(f"{path} row {line_no}: missing the 'budget_ms' value")
        out.append(_number(row[col].strip(), f"{path} row {line_no}"))
    return out


# --------------------------------------------------------------------------- parsing

_SPEC_FORMS: dict[str, str] = {
    "uniform": "uniform:LOW_MS,HIGH_MS",
    "normal": "normal:MEAN_MS,STD_MS",
    "exponential": "exponential:MEAN_MS",
    "gamma": "gamma:SHAPE,SCALE_MS",
    "empirical": "empirical:PATH(.csv|.json)",
}
DISTRIBUTION_KINDS: tuple[str, ...] = tuple(_SPEC_FORMS)


def parse_distribution(spec: str) -> BudgetDistribution:
    """Parse a CLI budget spec such as ``"uniform:2,20"`` or ``"empirical:runs.csv"``.

    Kinds are case-insensitive; numbers are milliseconds (gamma's shape is unitless).
    """
    forms = "; ".join(_SPEC_FORMS.values())
    if not isinstance(spec, str) or ":" not in spec:
        raise BudgetError(f"malformed budget spec {spec!r}; expected one of: {forms}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in _SPEC_FORMS:
        raise BudgetError(f"unknown budget distribution {kind!r} in {spec!r}; valid: {', '.join(DISTRIBUTION_KINDS)}")
    if kind == "empirical":
        path = rest.strip()
        if not path:
            raise BudgetError(f"malformed budget spec {spec!r}; expected {_SPEC_FORMS[kind]}")
        return EmpiricalBudget.from_file(path)

    parts = [p.strip() for p in rest.split(",")]
    expected = _SPEC_FORMS[kind].count(",") + 1
    if len(parts) != expected or any(not p for p in parts):
        raise BudgetError(f"malformed budget spec {spec!r}; expected {_SPEC_FORMS[kind]} ({expected} number(s))")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise BudgetError(f"malformed budget spec {spec!r}; parameters must be numbers: {_SPEC_FORMS[kind]}") from None
    cls = {"uniform": UniformBudget, "normal": NormalBudget, "exponential": ExponentialBudget, "gamma": GammaBudget}
    return cls[kind](*nums)


# --------------------------------------------------------------------------- Eq. 5


def check_ready_times(ready_times_ms: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validate exit ready times t_1 < ... < t_K (ms) and return them as float64 array."""
    try:
        t = np.asarray(ready_times_ms, dtype=np.float64)
    except (TypeError, ValueError):
        raise BudgetError(f"ready times must be a list of numbers (ms), got {ready_times_ms!r}") from None
    if t.ndim != 1 or t.size == 0:
        raise BudgetError(f"ready times must be a non-empty 1-D list (one per exit), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise BudgetError(f"ready times must be finite, got {t.tolist()}")
    if np.any(t < 0):
        raise BudgetError(f"ready times must be >= 0 ms, got {t.tolist()}")
    if np.any(np.diff(t) <= 0):
        raise BudgetError(f"ready times must be strictly increasing (exit k+1 is ready after exit k), got {t.tolist()}")
    return t


@dataclass(frozen=True, eq=False)
class BudgetWeights:
    """Eq. 5 weights of one distribution for given ready times.

    ``weights`` are exactly Eq. 5 (not renormalised): they sum to
    ``1 - mass_before_first``, the probability that some exit can answer.
    """

    weights: np.ndarray
    mass_before_first: float
    ready_times_ms: np.ndarray
    distribution: dict[str, Any]

    @property
    def num_exits(self) -> int:
        """K, the number of exits."""
        return int(self.weights.size)

    def normalized(self) -> np.ndarray:
        """Weights divided by their sum, for the training loss (the no-answer term is constant, paper Sect. 2)."""
        total = float(self.weights.sum())
        if not total > 0:
            raise BudgetError(
                f"no exit can ever answer under this distribution: all budget mass lies before the first exit "
                f"is ready (t_1 = {float(self.ready_times_ms[0])} ms); use a larger budget or a faster first stage"
            )
        return self.weights / total

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return {
            "source": "distribution",
            "distribution": dict(self.distribution),
            "ready_times_ms": [float(v) for v in self.ready_times_ms],
            "weights": [float(v) for v in self.weights],
            "mass_before_first": float(self.mass_before_first),
        }


def budget_weights(dist: BudgetDistribution, ready_times_ms: Sequence[float] | np.ndarray) -> BudgetWeights:
    """Paper Eq. 5: probability that the budget falls into [t_k, t_{k+1}) (and [t_K, inf) for the last exit)."""
    if not isinstance(dist, BudgetDistribution):
        raise BudgetError(f"expected a budget distribution (see parse_distribution), got {type(dist).__name__}")
    t = check_ready_times(ready_times_ms)
    edges = np.append(dist.mass_below(t), 1.0)
    # A CDF is monotone, but a library CDF may wobble by an ulp; weights are probabilities.
    w = np.maximum(np.diff(edges), 0.0)
    w.setflags(write=False)
    t = t.copy()
    t.setflags(write=False)
    return BudgetWeights(weights=w, mass_before_first=float(edges[0]), ready_times_ms=t,
                         distribution=dist.to_dict())


# --------------------------------------------------------------------------- calibration


def ready_times_from_calibration(path: str | Path, key: str = DEFAULT_KEY) -> np.ndarray:
    """Anytime exit ready times t_k (ms) from a timing calibration JSON file, for Eq. 5.

    The file is the engine's (``impatient_ros.core.calibration``); t_k is the one
    definition of :mod:`impatient_ros.core.ready_times`: t_k = sum_{j<=k}
    (block_j + head_j), each part summarised by ``key``'s statistic: ``p50_ms``
    (the median of its samples, the default everywhere), ``mean_ms`` or
    ``p99_ms`` (summed, a pessimistic bound rather than the p99 of the sum). A
    file without samples contributes its per-stage summary ``key`` instead.
    A plain JSON list is taken as the ready times themselves.
    """
    path = Path(path)
    if key not in CALIBRATION_KEYS:
        raise BudgetError(f"unknown calibration key {key!r}; valid: {', '.join(CALIBRATION_KEYS)}")
    try:
        data = load_json(path)
        if isinstance(data, list):
            if any(isinstance(v, (bool, str)) or not isinstance(v, (int, float)) for v in data):
                raise BudgetError(f"{path}: a plain list must hold ready times in ms (numbers)")
            return check_ready_times(data)
        if not isinstance(data, dict):
            raise BudgetError(f"{path}: expected a timing calibration object or a list of ready times")
        return check_ready_times(parse_calibration(data, source=f"calibration file {path}").ready_times(key))
    except CalibrationError as exc:
        raise BudgetError(str(exc)) from None


# --------------------------------------------------------------------------- evaluation


def expected_accuracy(exit_accuracy: Sequence[float] | np.ndarray,
                      weights: BudgetWeights | Sequence[float] | np.ndarray) -> float:
    """Expected accuracy sum_k w_k acc_k, with the weights exactly as given.

    With raw Eq. 5 weights (a ``BudgetWeights`` or its ``.weights``) the budget
    mass before t_1 counts as wrong, since no answer exists there; pass
    ``.normalized()`` for the accuracy given that some exit answered, or scheme
    weights to reproduce the paper's Table 1.
    """
    w = weights.weights if isinstance(weights, BudgetWeights) else np.asarray(weights, dtype=np.float64)
    acc = np.asarray(exit_accuracy, dtype=np.float64)
    if acc.ndim != 1 or w.ndim != 1 or acc.size != w.size or acc.size == 0:
        raise BudgetError(f"need one accuracy per exit weight: got {acc.size} accuracies and {w.size} weights")
    if not np.all(np.isfinite(acc)) or np.any(acc < 0) or np.any(acc > 1):
        raise BudgetError(f"exit accuracies must be fractions in [0, 1], got {acc.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise BudgetError(f"weights must be finite and >= 0, got {w.tolist()}")
    return float(np.dot(w, acc))
