"""Offline metrics of an Impatient DNN from cached per-exit logits (pure numpy).

Everything here works on arrays computed once: ``logits`` of shape (K, N, C)
(exit, image, class), ``labels`` (N,) and per-exit costs in ms. Nothing runs
a network, so every number of a report can be recomputed from the saved
``logits.npz`` and the measured stage costs.

Costs (paper Table 1, last two columns):

* ``t_B(k)`` -- *a-priori* cost of exit k: blocks 1..k and only head k.
* ``t_A(k)`` -- *anytime* cost of exit k: blocks and heads 1..k (every head
  runs, because the run may be interrupted after any of them).

A cascade (paper Sect. 4, "Cascaded prediction") runs stage after stage and
stops at the first exit whose confidence passes a threshold (the last exit
always answers), so an image leaving at exit k costs ``t_A(k)``. Three
confidence criteria are offered:

* ``ratio``   -- 1-vs-2: p1 / p2 of the two largest probabilities (the paper's),
  computed as ``exp(z1 - z2)`` of the logits, which is exact where p2
  underflows;
* ``maxprob`` -- p1;
* ``entropy`` -- stop when the entropy (nats) is *at most* the threshold.

Internally every criterion is a *score*, larger = more confident (log ratio,
p1, minus entropy); thresholds in the API are in the criterion's own units.
Exits are 0-based in arrays and 1-based in reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from impatient_ros.core.budget import SCHEMES, expected_accuracy, scheme_weights
from impatient_ros.core.ready_times import anytime_ready_times, apriori_ready_times

__all__ = [
    "CRITERIA",
    "NEVER_CORRECT",
    "MetricsError",
    "ExitCosts",
    "CascadePoint",
    "CascadeCurve",
    "check_logits",
    "softmax",
    "exit_predictions",
    "exit_accuracy",
    "scheme_expected_accuracy",
    "expected_time",
    "confidence_scores",
    "score_threshold",
    "cascade_exits",
    "cascade_point",
    "cascade_sweep",
    "fixed_depth_points",
    "accuracy_at_cost",
    "cost_at_accuracy",
    "fit_threshold",
    "compare_with_fixed_depth",
    "gain_over_fixed_depth",
    "first_correct_exit",
    "first_correct_histogram",
    "summarize",
]

CRITERIA: tuple[str, ...] = ("ratio", "maxprob", "entropy")
NEVER_CORRECT = -1  # first_correct_exit of an image no exit classifies correctly


class MetricsError(ValueError):
    """Inconsistent arrays or arguments; the message names the offending input."""


# --------------------------------------------------------------------------- inputs


def check_logits(logits: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate per-exit logits (K, N, C) and optional labels (N,); return them as float64 / int64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3 or min(z.shape) < 1:
        raise MetricsError(f"logits must have shape (exits, images, classes) with no empty axis, got {z.shape}")
    if z.shape[2] < 2:
        raise MetricsError(f"need at least 2 classes, got logits of shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise MetricsError("logits contain NaN or inf; the network diverged or the cache is corrupt")
    if labels is None:
        return z, None
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[1]:
        raise MetricsError(f"need one label per image: logits have {z.shape[1]} images, labels shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[2]):
        raise MetricsError(f"labels must be integers in 0..{z.shape[2] - 1}")
    return z, y.astype(np.int64)


def _check_costs(costs: Any, num_exits: int, what: str) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (num_exits,) or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise MetricsError(f"{what} must be {num_exits} finite costs >= 0 (one per exit), got {c.tolist()}")
    return c


@dataclass(frozen=True)
class ExitCosts:
    """Measured cost of each part, ms: ``block`` and ``head`` per stage, and the source of the numbers.

    The ready times are the package's one definition (impatient_ros.core.ready_times);
    evaluation fills the costs with the median of each part's samples, as everywhere.
    """

    block_ms: tuple[float, ...]
    head_ms: tuple[float, ...]
    source: str = "measured"
    device: str = "unknown"

    def __post_init__(self) -> None:
        b = np.asarray(self.block_ms, dtype=np.float64)
        h = np.asarray(self.head_ms, dtype=np.float64)
        if b.ndim != 1 or b.size < 1 or b.shape != h.shape:
            raise MetricsError(f"need one block and one head cost per stage, got {b.size} and {h.size}")
        if not (np.all(np.isfinite(b)) and np.all(np.isfinite(h))) or np.any(b < 0) or np.any(h < 0):
            raise MetricsError("stage costs must be finite and >= 0 ms")
        object.__setattr__(self, "block_ms", tuple(float(v) for v in b))
        object.__setattr__(self, "head_ms", tuple(float(v) for v in h))

    @property
    def num_exits(self) -> int:
        """K."""
        return len(self.block_ms)

    @property
    def apriori_ms(self) -> np.ndarray:
        """t_B(k): blocks 1..k plus head k only."""
        return apriori_ready_times(self.block_ms, self.head_ms)

    @property
    def anytime_ms(self) -> np.ndarray:
        """t_A(k): blocks and heads 1..k."""
        return anytime_ready_times(self.block_ms, self.head_ms)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for JSON reports."""
        return {"block_ms": list(self.block_ms), "head_ms": list(self.head_ms),
                "apriori_ms": self.apriori_ms.tolist(), "anytime_ms": self.anytime_ms.tolist(),
                "source": self.source, "device": self.device}


# --------------------------------------------------------------------------- per-exit accuracy


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def exit_predictions(logits: Any) -> np.ndarray:
    """Predicted class of every exit and image, (K, N)."""
    z, _ = check_logits(logits)
    return z.argmax(axis=2)


def exit_accuracy(logits: Any, labels: Any) -> np.ndarray:
    """Accuracy (fraction) of every exit, (K,)."""
    z, y = check_logits(logits, labels)
    if z.shape[1] == 0:
        raise MetricsError("no images")
    return (z.argmax(axis=2) == y[None, :]).mean(axis=1)


def scheme_expected_accuracy(
    exit_acc: Sequence[float] | np.ndarray,
    schemes: Sequence[str] = SCHEMES,
    gamma: float = 2.0,
    beta: float = 0.34,
) -> dict[str, float]:
    """Expected accuracy sum_k w_k acc_k under each index scheme (paper Table 1)."""
    acc = np.asarray(exit_acc, dtype=np.float64)
    return {s: expected_accuracy(acc, scheme_weights(s, acc.size, gamma=gamma, beta=beta)) for s in schemes}


def expected_time(weights: Sequence[float] | np.ndarray, exit_ms: Sequence[float] | np.ndarray) -> float:
    """Expected time per image, sum_k w_k t_k / sum_k w_k (the time given that some exit answers)."""
    w = np.asarray(weights, dtype=np.float64)
    t = _check_costs(exit_ms, w.size, "exit times")
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise MetricsError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return float(np.dot(w, t) / w.sum())


# --------------------------------------------------------------------------- confidence and cascades


def _check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise MetricsError(f"unknown confidence criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    return criterion


def confidence_scores(logits: Any, criterion: str = "ratio") -> np.ndarray:
    """Confidence of every exit and image, (K, N); larger = more confident.

    ``ratio``: log(p1 / p2) = z1 - z2; ``maxprob``: p1; ``entropy``: minus the entropy (nats).
    """
    _check_criterion(criterion)
    z, _ = check_logits(logits)
    if criterion == "ratio":
        top2 = np.partition(z, -2, axis=2)[:, :, -2:]
        return top2[:, :, 1] - top2[:, :, 0]
    p = softmax(z, axis=2)
    if criterion == "maxprob":
        return p.max(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return plogp.sum(axis=2)  # = -entropy


def score_threshold(threshold: float, criterion: str) -> float:
    """A threshold in the criterion's units -> the matching score threshold (see confidence_scores)."""
    _check_criterion(criterion)
    t = float(threshold)
    if np.isnan(t):
        raise MetricsError("threshold must not be NaN")
    if criterion == "ratio":
        if t < 0:
            raise MetricsError(f"a 1-vs-2 ratio threshold must be >= 0, got {t}")
        with np.errstate(divide="ignore"):
            return float(np.log(t))  # 0 -> -inf (always stop), inf -> inf (never stop early)
    if criterion == "entropy":
        return -t
    return t


def _threshold_from_score(score: float, criterion: str) -> float:
    if criterion == "ratio":
        return float(np.exp(score))
    if criterion == "entropy":
        return -float(score)
    return float(score)


def cascade_exits(scores: np.ndarray, score_thr: float | np.ndarray) -> np.ndarray:
    """Exit taken by each image: the first k < K-1 with score >= threshold, else the last exit.

    ``scores`` (K, N); ``score_thr`` a scalar, or (T,) for T thresholds at once -> (T, N).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise MetricsError(f"scores must have shape (exits, images), got {s.shape}")
    thr = np.asarray(score_thr, dtype=np.float64)
    k_max = s.shape[0]
    confident = s[None, : k_max - 1, :] >= thr.reshape(-1, 1, 1)  # (T, K-1, N)
    # argmax finds the first True; rows without any True go to the last exit.
    first = np.where(confident.any(axis=1), confident.argmax(axis=1), k_max - 1)
    return first[0] if thr.ndim == 0 else first


@dataclass(frozen=True)
class CascadePoint:
    """One operating point: threshold (criterion units), accuracy, mean cost (ms), share leaving at each exit."""

    criterion: str
    threshold: float
    accuracy: float
    mean_cost_ms: float
    exit_share: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain types for JSON reports."""
        return {"criterion": self.criterion, "threshold": self.threshold, "accuracy": self.accuracy,
                "mean_cost_ms": self.mean_cost_ms, "exit_share": list(self.exit_share)}


@dataclass(frozen=True)
class CascadeCurve:
    """A threshold sweep: arrays of thresholds, accuracies, mean costs (ms) and exit shares (T, K)."""

    criterion: str
    thresholds: np.ndarray
    accuracy: np.ndarray
    mean_cost_ms: np.ndarray
    exit_share: np.ndarray

    def point(self, i: int) -> CascadePoint:
        """The i-th operating point."""
        return CascadePoint(self.criterion, float(self.thresholds[i]), float(self.accuracy[i]),
                            float(self.mean_cost_ms[i]), tuple(float(v) for v in self.exit_share[i]))

    def to_dict(self) -> dict[str, Any]:
        """Plain types for JSON reports (inf thresholds as strings, which JSON lacks)."""
        return {"criterion": self.criterion,
                "thresholds": [v if np.isfinite(v) else str(v) for v in self.thresholds.tolist()],
                "accuracy": self.accuracy.tolist(), "mean_cost_ms": self.mean_cost_ms.tolist(),
                "exit_share": self.exit_share.tolist()}


def _cascade_stats(correct: np.ndarray, exits: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Accuracy, mean cost and exit shares (T, K) of exit choices ``exits`` (T, N); ``correct`` is (K, N)."""
    n = exits.shape[1]
    if n == 0:
        raise MetricsError("no images")
    hit = correct[exits, np.arange(n)[None, :]]  # (T, N): was the exit each image took right?
    share = np.stack([(exits == k).mean(axis=1) for k in range(costs.size)], axis=1)  # (T, K)
    return hit.mean(axis=1), share @ costs, share


def cascade_point(logits: Any, labels: Any, anytime_ms: Sequence[float], threshold: float,
                  criterion: str = "ratio") -> CascadePoint:
    """Accuracy and mean cost of the cascade with one threshold (in the criterion's units)."""
    z, y = check_logits(logits, labels)
    costs = _check_costs(anytime_ms, z.shape[0], "anytime costs")
    exits = cascade_exits(confidence_scores(z, criterion), score_threshold(threshold, criterion))[None, :]
    correct = z.argmax(axis=2) == y[None, :]
    acc, cost, share = _cascade_stats(correct, exits, costs)
    return CascadePoint(criterion, float(threshold), float(acc[0]), float(cost[0]), tuple(float(v) for v in share[0]))


def cascade_sweep(logits: Any, labels: Any, anytime_ms: Sequence[float], criterion: str = "ratio",
                  num_thresholds: int = 200, chunk: int = 64) -> CascadeCurve:
    """Sweep the threshold from "always stop at exit 1" to "always run to the end".

    Thresholds are quantiles of the early exits' scores (so points spread
    evenly over the images) plus both extremes; the curve is sorted by cost.
    """
    z, y = check_logits(logits, labels)
    costs = _check_costs(anytime_ms, z.shape[0], "anytime costs")
    scores = confidence_scores(z, criterion)
    if num_thresholds < 2:
        raise MetricsError(f"num_thresholds must be >= 2, got {num_thresholds}")
    early = scores[:-1].reshape(-1)
    if early.size:
        grid = np.unique(np.quantile(early, np.linspace(0.0, 1.0, num_thresholds)))
    else:  # a single exit: nothing to decide
        grid = np.zeros(0)
    score_thr = np.concatenate([[-np.inf], grid, [np.inf]])
    correct = z.argmax(axis=2) == y[None, :]
    accs, mean_costs, shares = [], [], []
    for start in range(0, score_thr.size, chunk):  # bounds memory at chunk * K * N booleans
        exits = cascade_exits(scores, score_thr[start:start + chunk])
        a, c, s = _cascade_stats(correct, exits, costs)
        accs.append(a)
        mean_costs.append(c)
        shares.append(s)
    acc, cost, share = np.concatenate(accs), np.concatenate(mean_costs), np.concatenate(shares)
    thresholds = np.array([_threshold_from_score(v, criterion) for v in score_thr])
    order = np.lexsort((acc, cost))  # by cost, ties by accuracy
    return CascadeCurve(criterion, thresholds[order], acc[order], cost[order], share[order])


def fixed_depth_points(exit_acc: Sequence[float], apriori_ms: Sequence[float]) -> list[dict[str, float]]:
    """The fixed-depth baseline: always answer at exit k, at its a-priori cost t_B(k) (only head k runs)."""
    acc = np.asarray(exit_acc, dtype=np.float64)
    t = _check_costs(apriori_ms, acc.size, "a-priori costs")
    return [{"exit": k + 1, "accuracy": float(acc[k]), "cost_ms": float(t[k])} for k in range(acc.size)]


def accuracy_at_cost(costs: Sequence[float], accuracy: Sequence[float], target_ms: float) -> float:
    """Best accuracy reachable at mean cost <= target, on the upper envelope of the points.

    Mixing two operating points at random (per image) reaches any cost
    between them at the linearly interpolated accuracy, so the reachable
    set is the upper concave hull; this evaluates it. Returns NaN when the
    target is below the cheapest point.
    """
    c = np.asarray(costs, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if c.shape != a.shape or c.ndim != 1 or c.size == 0:
        raise MetricsError("costs and accuracy must be equal-length 1-D arrays")
    hull = _upper_hull(c, a)
    hc, ha = c[hull], a[hull]
    if target_ms < hc[0]:
        return float("nan")
    if target_ms >= hc[-1]:
        return float(ha.max())
    return float(np.interp(target_ms, hc, ha))


def cost_at_accuracy(costs: Sequence[float], accuracy: Sequence[float], target_accuracy: float) -> float:
    """Cheapest mean cost among operating points with accuracy >= target (NaN if none reaches it)."""
    c = np.asarray(costs, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if c.shape != a.shape or c.ndim != 1 or c.size == 0:
        raise MetricsError("costs and accuracy must be equal-length 1-D arrays")
    ok = a >= target_accuracy - 1e-12
    return float(c[ok].min()) if ok.any() else float("nan")


def _upper_hull(c: np.ndarray, a: np.ndarray) -> list[int]:
    """Indices of the upper concave hull of points (c, a), by increasing cost, keeping only rising parts."""
    order = np.lexsort((-a, c))
    hull: list[int] = []
    for i in order:
        if hull and c[i] == c[hull[-1]]:
            continue  # same cost, lower accuracy (sorted by -a within a cost)
        if hull and a[i] <= a[hull[-1]]:
            continue  # costs more and is not better: never on the rising envelope
        while len(hull) >= 2:
            i1, i2 = hull[-2], hull[-1]
            # drop i2 if it lies on or below the segment i1 -> i
            cross = (c[i2] - c[i1]) * (a[i] - a[i1]) - (a[i2] - a[i1]) * (c[i] - c[i1])
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def fit_threshold(curve: CascadeCurve, target_ms: float) -> CascadePoint:
    """The operating point of ``curve`` (fitted on validation data) with the best accuracy at mean cost <= target.

    Ties go to the cheaper point. Raises MetricsError if no point is that cheap
    (the target is below exit 1's cost).
    """
    ok = np.flatnonzero(curve.mean_cost_ms <= target_ms + 1e-12)
    if ok.size == 0:
        raise MetricsError(f"no threshold reaches a mean cost <= {target_ms:.4g} ms; the cheapest operating point "
                           f"costs {float(curve.mean_cost_ms.min()):.4g} ms (exit 1 alone)")
    best = ok[np.lexsort((curve.mean_cost_ms[ok], -curve.accuracy[ok]))[0]]
    return curve.point(int(best))


def compare_with_fixed_depth(curve: CascadeCurve, exit_acc: Sequence[float],
                             apriori_ms: Sequence[float]) -> list[dict[str, float]]:
    """At each fixed exit's cost t_B(k): its accuracy vs the cascade's (upper envelope of ``curve``).

    Also the other way round: the cheapest cascade operating point that is at
    least as accurate as the fixed exit (``cascade_cost_at_same_accuracy_ms``).
    """
    rows = []
    for p in fixed_depth_points(exit_acc, apriori_ms):
        cascade = accuracy_at_cost(curve.mean_cost_ms, curve.accuracy, p["cost_ms"])
        cost = cost_at_accuracy(curve.mean_cost_ms, curve.accuracy, p["accuracy"])
        rows.append({**p, "cascade_accuracy": cascade, "gain": cascade - p["accuracy"],
                     "cascade_cost_at_same_accuracy_ms": cost})
    return rows


def gain_over_fixed_depth(curve: CascadeCurve, exit_acc: Sequence[float], apriori_ms: Sequence[float],
                          num: int = 201) -> dict[str, float]:
    """Cascade minus fixed depth at equal mean cost, over the range t_B(1)..t_B(K).

    Fixed depth at a cost between two exits means answering with a random
    mix of the two (the upper hull of the fixed points), the best a
    fixed-depth system can do at that mean cost; the cascade side is the
    upper envelope of its sweep. Costs below the cascade's cheapest point are
    skipped. Returns the mean and the largest gain and where it occurs.
    """
    acc = np.asarray(exit_acc, dtype=np.float64)
    t = _check_costs(apriori_ms, acc.size, "a-priori costs")
    grid = np.linspace(float(t.min()), float(t.max()), num)
    gains = np.array([accuracy_at_cost(curve.mean_cost_ms, curve.accuracy, c) - accuracy_at_cost(t, acc, c)
                      for c in grid])
    ok = np.isfinite(gains)
    if not ok.any():
        return {"mean_gain": float("nan"), "max_gain": float("nan"), "max_gain_at_ms": float("nan"),
                "min_gain": float("nan")}
    best = int(np.flatnonzero(ok)[np.argmax(gains[ok])])
    return {"mean_gain": float(gains[ok].mean()), "max_gain": float(gains[best]), "max_gain_at_ms": float(grid[best]),
            "min_gain": float(gains[ok].min())}


# --------------------------------------------------------------------------- first correct exit


def first_correct_exit(logits: Any, labels: Any) -> np.ndarray:
    """Per image, the first exit (0-based) whose prediction is correct, or NEVER_CORRECT (-1)."""
    z, y = check_logits(logits, labels)
    correct = z.argmax(axis=2) == y[None, :]  # (K, N)
    return np.where(correct.any(axis=0), correct.argmax(axis=0), NEVER_CORRECT)


def first_correct_histogram(first: Any, num_exits: int) -> dict[str, int]:
    """Counts per exit ("1".."K") and "never", from first_correct_exit's output."""
    f = np.asarray(first)
    if f.ndim != 1 or (f.size and (f.min() < NEVER_CORRECT or f.max() >= num_exits)):
        raise MetricsError(f"first-correct indices must be -1 or 0..{num_exits - 1}")
    counts = {str(k + 1): int((f == k).sum()) for k in range(num_exits)}
    counts["never"] = int((f == NEVER_CORRECT).sum())
    return counts


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof=1; 0 for one value) of each named list, e.g. over seeds."""
    out = {}
    for name, vals in values.items():
        v = np.asarray(vals, dtype=np.float64)
        out[name] = {"mean": float(v.mean()) if v.size else float("nan"),
                     "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
    return out
