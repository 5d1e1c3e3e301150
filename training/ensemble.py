"""Fitting exit-ensemble weights on the validation split (the rule itself: impatient_ros.core.ensemble).

Per exit k, the k non-negative weights of ``softmax(sum_j w_kj log p_j)``
minimise the validation negative log-likelihood (L-BFGS-B from "exit k
alone", so the fit can only lower the NLL). The ensemble is kept at exit k
only where the validation split supports it: its validation accuracy must be
at least exit k's own; otherwise row k stays "exit k alone".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from impatient_ros.core.ensemble import combine_log_probs, identity_weights, log_softmax

__all__ = ["fit_geometric_row", "fit_geometric_ensemble", "ensemble_accuracy"]

MAX_WEIGHT = 20.0


def _nll_and_grad(w: np.ndarray, lp: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """lp: (k, N, C) per-exit log-probabilities; NLL of softmax(sum_j w_j lp_j) and its gradient in w."""
    z = np.tensordot(w, lp, axes=(0, 0))  # (N, C)
    q = log_softmax(z)
    n = y.size
    nll = -float(q[np.arange(n), y].mean())
    prob = np.exp(q)
    # d nll / d w_j = mean_i (sum_c prob_ic lp_jic - lp_jiy)
    expected_lp = np.einsum("nc,knc->kn", prob, lp)
    grad = (expected_lp - lp[:, np.arange(n), y]).mean(axis=1)
    return nll, grad


def fit_geometric_row(log_probs: np.ndarray, labels: np.ndarray, k: int, max_iter: int = 200) -> list[float]:
    """The k + 1 weights of exit k (0-based) minimising the NLL on (log_probs[:k+1], labels)."""
    from scipy.optimize import minimize

    lp = np.asarray(log_probs[: k + 1], dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    w0 = np.zeros(k + 1)
    w0[k] = 1.0
    if k == 0:
        # One exit: only a temperature, which does not change the answer; keep the exit as it is.
        return [1.0]
    res = minimize(_nll_and_grad, w0, args=(lp, y), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, MAX_WEIGHT)] * (k + 1), options={"maxiter": max_iter})
    w = np.asarray(res.x, dtype=np.float64)
    if not np.all(np.isfinite(w)) or w.sum() <= 0 or _nll_and_grad(w, lp, y)[0] > _nll_and_grad(w0, lp, y)[0]:
        w = w0
    return [float(v) for v in w]


def ensemble_accuracy(logits: np.ndarray, labels: np.ndarray, weights: list[list[float]]) -> np.ndarray:
    """Accuracy (K,) of every exit's ensemble answer."""
    comb = combine_log_probs(log_softmax(logits), weights)
    return (comb.argmax(axis=2) == np.asarray(labels)[None, :]).mean(axis=1)


def fit_geometric_ensemble(val_logits: Any, val_labels: Any, *, require_gain: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every exit's row on the validation logits (K, N, C); keep a row only where val accuracy allows.

    Returns (the checkpoint's ensemble dict, a report with the val accuracy
    of every exit alone and as an ensemble and which rows were kept).
    """
    z = np.asarray(val_logits, dtype=np.float64)
    y = np.asarray(val_labels, dtype=np.int64)
    lp = log_softmax(z)
    k_max = z.shape[0]
    plain = (z.argmax(axis=2) == y[None, :]).mean(axis=1)
    fitted = [fit_geometric_row(lp, y, k) for k in range(k_max)]
    fitted_acc = ensemble_accuracy(z, y, fitted)
    rows = identity_weights(k_max)
    kept = []
    for k in range(k_max):
        use = fitted_acc[k] >= plain[k] if require_gain else True
        use = use and fitted[k] != rows[k]
        if use:
            rows[k] = fitted[k]
        kept.append(bool(use))
    final_acc = ensemble_accuracy(z, y, rows)
    # val_accuracy: what a node publishes as stage_accuracy when it answers with this ensemble.
    spec = {"kind": "geometric", "weights": rows, "val_accuracy": final_acc.tolist()}
    report = {"val_plain_accuracy": plain.tolist(), "val_fitted_accuracy": fitted_acc.tolist(),
              "val_accuracy": final_acc.tolist(), "kept": kept, "fitted_weights": fitted}
    return spec, report
