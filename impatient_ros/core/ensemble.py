"""Exit ensembles (Zero Time Waste, Wolczyk et al., NeurIPS 2021): exit k answers with a weighted
geometric mean of the class probabilities of exits 1..k.

Torch-free (numpy only): the one owner of the combination rule, imported by
training/evaluation and by the runtime engine alike.

The checkpoint stores the weights as plain lists (``checkpoint["ensemble"]``)::

    {"kind": "geometric", "weights": [[w_11], [w_21, w_22], ..., [w_K1, ..., w_KK]],
     "val_accuracy": [a_1, ..., a_K]}

``val_accuracy`` (optional; files before it lack it) is the validation accuracy
of every exit's ensemble answer, what a node publishes as ``stage_accuracy``
when it answers with the ensemble (:func:`answer_accuracy`).

Exit k's combined answer is ``softmax(sum_{j<=k} w_kj * log p_j)``, with
``p_j`` exit j's softmax probabilities. ``[0, ..., 0, 1]`` in row k is exit k
alone; a row's scale acts as a temperature (argmax depends only on the
ratios). Only the first k exits are needed for exit k, so the combination is
available anytime: an interrupted network answers with the ensemble of the
exits it has reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ENSEMBLE_KINDS",
    "EnsembleError",
    "answer_accuracy",
    "identity_weights",
    "validate_ensemble",
    "log_softmax",
    "combine_log_probs",
    "combine_probabilities",
    "ensemble_log_probs",
]

ENSEMBLE_KINDS: tuple[str, ...] = ("geometric",)


class EnsembleError(ValueError):
    """An invalid ensemble description or input shape; the message says what is wrong."""


def identity_weights(num_exits: int) -> list[list[float]]:
    """Weights under which every exit answers alone (the plain network)."""
    return [[0.0] * k + [1.0] for k in range(num_exits)]


def validate_ensemble(spec: Any, num_exits: int | None = None) -> dict[str, Any]:
    """Check an ensemble description; return it as plain types ``{"kind", "weights"}`` (plus kept extra keys).

    Row k (0-based) must hold k + 1 finite non-negative numbers, at least one
    positive; with ``num_exits`` there must be exactly that many rows.
    """
    if not isinstance(spec, Mapping):
        raise EnsembleError(f"ensemble must be a dict with 'kind' and 'weights', got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in ENSEMBLE_KINDS:
        raise EnsembleError(f"unknown ensemble kind {kind!r}; valid: {', '.join(ENSEMBLE_KINDS)}")
    rows = spec.get("weights")
    if not isinstance(rows, (list, tuple)) or not rows:
        raise EnsembleError("ensemble['weights'] must be a non-empty list of rows, one per exit")
    if num_exits is not None and len(rows) != num_exits:
        raise EnsembleError(f"ensemble has {len(rows)} weight rows for a network with {num_exits} exits")
    clean: list[list[float]] = []
    for k, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != k + 1:
            raise EnsembleError(f"ensemble weight row {k + 1} must list {k + 1} numbers (exits 1..{k + 1}), got {row!r}")
        values = []
        for w in row:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise EnsembleError(f"ensemble weight row {k + 1} must hold finite numbers >= 0, got {row!r}")
            values.append(float(w))
        if not any(v > 0 for v in values):
            raise EnsembleError(f"ensemble weight row {k + 1} is all zero: exit {k + 1} would have no answer")
        clean.append(values)
    out = {key: value for key, value in spec.items() if key not in ("kind", "weights")}
    out.update(kind=kind, weights=clean)
    if spec.get("val_accuracy") is not None:
        accuracy = spec["val_accuracy"]
        if (not isinstance(accuracy, (list, tuple)) or len(accuracy) != len(clean)
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0
                           for a in accuracy)):
            raise EnsembleError(f"ensemble['val_accuracy'] must list one fraction in [0, 1] per exit "
                                f"({len(clean)}), got {accuracy!r}")
        out["val_accuracy"] = [float(a) for a in accuracy]
    return out


def answer_accuracy(exit_accuracy: Sequence[float] | None, spec: Mapping[str, Any] | None,
                    num_exits: int) -> list[float]:
    """Validation accuracy of the answer published at every exit (NaN where unknown).

    Without an ensemble that is each exit's own (``exit_accuracy``, the
    checkpoint's). With one it is the ensemble's ``val_accuracy``; a file
    without it still knows the rows that are the exit alone (their own
    accuracy) but not the combined ones (NaN: a head's accuracy would
    misdescribe a combined answer).
    """
    own = [float(a) for a in exit_accuracy] if exit_accuracy and len(exit_accuracy) == num_exits \
        else [math.nan] * num_exits
    if spec is None:
        return own
    spec = validate_ensemble(spec, num_exits)
    if "val_accuracy" in spec:
        return list(spec["val_accuracy"])
    return [own[k] if row[k] > 0 and not any(row[:k]) else math.nan for k, row in enumerate(spec["weights"])]


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def combine_log_probs(log_probs: Any, weights: Sequence[Sequence[float]]) -> np.ndarray:
    """Ensemble log-probabilities (K', N, C) from per-exit log-probabilities (K, N, C).

    ``weights`` has one row per exit to answer (K' <= K rows; row k has k + 1
    entries). A batch of one image may be given as (K, C). Output rows are
    normalised (log-softmax of the weighted sum).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    single = lp.ndim == 2
    if single:
        lp = lp[:, None, :]
    if lp.ndim != 3:
        raise EnsembleError(f"expected per-exit log-probabilities (K, N, C) or (K, C), got shape {lp.shape}")
    if len(weights) > lp.shape[0]:
        raise EnsembleError(f"{len(weights)} weight rows but only {lp.shape[0]} exits' outputs")
    out = np.empty((len(weights),) + lp.shape[1:], dtype=np.float64)
    for k, row in enumerate(weights):
        if len(row) != k + 1:
            raise EnsembleError(f"weight row {k + 1} must list {k + 1} numbers, got {list(row)!r}")
        w = np.asarray(row, dtype=np.float64)
        out[k] = log_softmax(np.tensordot(w, lp[: k + 1], axes=(0, 0)))
    return out[:, 0, :] if single else out


def combine_probabilities(probs: Any, weights: Sequence[Sequence[float]], eps: float = 1e-12) -> np.ndarray:
    """Ensemble probabilities (K', N, C) from per-exit probabilities (K, N, C) (or (K, C) for one image).

    Exit k: the normalised weighted geometric mean ``prod_j p_j^{w_kj}``.
    Probabilities are floored at ``eps`` before the log.
    """
    p = np.asarray(probs, dtype=np.float64)
    return np.exp(combine_log_probs(np.log(np.maximum(p, eps)), weights))


def ensemble_log_probs(logits: Any, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Per-exit logits (K, N, C) -> the ensemble's log-probabilities (K, N, C); no spec: plain log-softmax."""
    lp = log_softmax(logits)
    if spec is None:
        return lp
    spec = validate_ensemble(spec, lp.shape[0])
    return combine_log_probs(lp, spec["weights"])
