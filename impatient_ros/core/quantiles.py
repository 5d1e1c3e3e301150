"""Quantiles of an already sorted sequence, by numpy's default ("linear") rule, in plain Python.

The timing model asks for a quantile before every stage and the node's
diagnostics for three per stage and camera every period, over windows of a
few hundred samples: a Python sort plus an interpolation is several times
cheaper than ``np.quantile`` at that size, and holds the interpreter lock for
less time beside the inference thread. Same values as ``np.quantile``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["sorted_quantile", "quantiles"]


def sorted_quantile(ordered: Sequence[float], q: float, n: int | None = None) -> float:
    """Quantile ``q`` (0..1) of the first ``n`` values of ``ordered`` (ascending; all by default)."""
    if n is None:
        n = len(ordered)
    position = q * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def quantiles(values: Iterable[float], qs: Sequence[float]) -> tuple[float, ...]:
    """The quantiles ``qs`` of ``values`` (at least one), sorted once."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantiles of no values")
    return tuple(sorted_quantile(ordered, q) for q in qs)
