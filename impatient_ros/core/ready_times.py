"""Exit ready times t_k from per-stage block and head costs: the one definition of the package.

Stage k (1-based here, as in the paper) is backbone block k followed by the
early-prediction head k. With ``b_j`` and ``h_j`` the costs of block j and head j:

* **anytime** (the network runs stage after stage and may be interrupted at any
  time; every head that is reached runs)::

      t_A(k) = sum_{j<=k} (b_j + h_j)

  This is when exit k's answer exists in the anytime and cascade modes, and it is
  the t_k of paper Eq. 5 that training uses: the budget interrupts a network that
  computes every exit on the way.
* **a-priori** (the budget is known before the image: run blocks 1..k and only
  head k)::

      t_B(k) = sum_{j<=k} b_j + h_k

Both are built from ONE statistic of each part's measured samples,
:data:`DEFAULT_STATISTIC` = the **median**, everywhere: the training loss
weights (Eq. 5 from a calibration file), the evaluation report (t_A, t_B and the
budget rows) and the checkpoint's ``exit_cost``. Why the median: t_k is the
time at which one run's exit is ready, a point on the time axis that Eq. 5
integrates the budget distribution up to; the expectation in Eq. 5 is over
budgets, not over latencies, so t_k should be the typical run, not the average
one. Latency samples are right-skewed by rare stalls that are not the network's
cost (another process takes the core, a page fault, a clock change): a single
15 ms stall among 50 runs of a 0.3 ms stage doubles that stage's mean but leaves
its median where it was, and the mean would carry it into the Eq. 5 weights and
t_A/t_B. The mean (exactly additive over stages) and the p99 (pessimistic when
summed: it equals the p99 of the sum when the parts slow down together and
usually over-estimates it otherwise) stay available by name.

Pure numpy: no torch, no rclpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_STATISTIC",
    "STATISTICS",
    "ReadyTimeError",
    "anytime_ready_times",
    "apriori_ready_times",
    "summarise",
]

STATISTICS: tuple[str, ...] = ("median", "mean", "p99")
DEFAULT_STATISTIC = "median"
_QUANTILES = {"median": 0.5, "p99": 0.99}


class ReadyTimeError(ValueError):
    """Costs that cannot give ready times (empty, negative, not finite, unknown statistic)."""


def summarise(samples_ms: Sequence[float] | np.ndarray, statistic: str = DEFAULT_STATISTIC) -> float:
    """One number for one part's latency samples (ms): ``median``, ``mean`` or ``p99``.

    Quantiles interpolate linearly between order statistics (numpy's default,
    the same as :class:`impatient_ros.runtime.timing.TimingModel`'s windows).
    """
    if statistic not in STATISTICS:
        raise ReadyTimeError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}")
    values = np.asarray(samples_ms, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ReadyTimeError("no latency samples to summarise")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ReadyTimeError(f"latency samples must be finite and >= 0 ms, got {values.tolist()}")
    if statistic == "mean":
        return math.fsum(values.tolist()) / values.size
    return float(np.quantile(values, _QUANTILES[statistic]))


def _costs(block_ms: Sequence[float] | np.ndarray, head_ms: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(block_ms, dtype=np.float64)
    h = np.asarray(head_ms, dtype=np.float64)
    if b.ndim != 1 or b.size < 1 or b.shape != h.shape:
        raise ReadyTimeError(f"need one block and one head cost per stage, got {b.size} and {h.size}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(h))) or np.any(b < 0) or np.any(h < 0):
        raise ReadyTimeError(f"stage costs must be finite and >= 0 ms, got blocks {b.tolist()}, heads {h.tolist()}")
    return b, h


def anytime_ready_times(block_ms: Sequence[float] | np.ndarray, head_ms: Sequence[float] | np.ndarray) -> np.ndarray:
    """t_A(k) = sum_{j<=k} (block_j + head_j), ms: exit k is ready when every stage up to k ran with its head."""
    b, h = _costs(block_ms, head_ms)
    return np.cumsum(b + h)


def apriori_ready_times(block_ms: Sequence[float] | np.ndarray, head_ms: Sequence[float] | np.ndarray) -> np.ndarray:
    """t_B(k) = sum_{j<=k} block_j + head_k, ms: blocks up to k, then only head k."""
    b, h = _costs(block_ms, head_ms)
    return np.cumsum(b) + h
