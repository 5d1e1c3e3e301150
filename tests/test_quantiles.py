"""core.quantiles: numpy's linear quantile rule in plain Python, and the diagnostics that use it."""

from __future__ import annotations

import numpy as np
import pytest

from impatient_ros.core.quantiles import quantiles, sorted_quantile
from impatient_ros.ros.diagnostics import NodeStats

QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 256, 301])
def test_same_values_as_numpy(n) -> None:
    values = np.random.default_rng(n).exponential(1e-3, n)
    expected = np.quantile(values, QS)
    np.testing.assert_allclose(quantiles(values.tolist(), QS), expected, rtol=1e-12, atol=0)
    ordered = sorted(values.tolist())
    for m in {1, max(1, n // 2), n}:  # the first m values of a sorted list (the timing model's outlier limit)
        np.testing.assert_allclose([sorted_quantile(ordered, q, m) for q in QS], np.quantile(ordered[:m], QS),
                                   rtol=1e-12, atol=0)


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        quantiles([], (0.5,))


def test_diagnostics_latency_quantiles_are_those_of_the_window() -> None:
    stats = NodeStats()
    rng = np.random.default_rng(0)
    sent = {1: rng.uniform(1e-3, 5e-3, 300), 3: rng.uniform(4e-3, 9e-3, 10)}
    for stage, latencies in sent.items():
        for value in latencies:
            stats.stage_published(stage, float(value))
    snap = stats.snapshot()
    assert set(snap.stage_latency_ms) == {1, 3}
    # Stage 1 keeps its newest 256 only (the window), stage 3 all of its 10.
    np.testing.assert_allclose(snap.stage_latency_ms[1], 1e3 * np.quantile(sent[1][-256:], (0.5, 0.9, 0.99)))
    np.testing.assert_allclose(snap.stage_latency_ms[3], 1e3 * np.quantile(sent[3], (0.5, 0.9, 0.99)))
