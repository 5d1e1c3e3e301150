"""Linear-probe baselines of paper Table 1: one linear classifier per exit on frozen features.

FT   -- the backbone trained the standard way (STD scheme: only the final
        loss), then one linear classifier per exit on the pooled features its
        EP head would see (``training.features``).
ORIG -- the same on a pretrained backbone that was never fine-tuned.

The paper learns SVMs on the features [DeCAF] with hyper-parameters tuned on
the validation split. Here a probe is a multinomial logistic regression
(``loss="logistic"``) or a one-vs-rest L2-loss linear SVM
(``loss="squared_hinge"``, the LinearSVC default), both with the usual
``C`` convention::

    minimise  C * sum_i loss_i(W x_i + b)  +  1/2 ||W||^2

on standardised features (mean 0, std 1 per dimension, statistics of the
training features; the EP heads' batch norm gives them the same freedom).
They are fitted in PyTorch with full-batch L-BFGS: no optional dependency,
and far faster than a generic solver on 10^4..10^5 x 10^3 features.
``C`` is chosen per exit on the validation split (largest accuracy; ties go to
the stronger regularisation), scanning the grid from small to large C with
warm starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "DEFAULT_CS",
    "BaselineError",
    "LinearProbe",
    "ExitProbes",
    "fit_linear_probe",
    "select_probe",
    "fit_exit_probes",
    "install_probe",
    "is_probe_head",
]

LOSSES: tuple[str, ...] = ("logistic", "squared_hinge")
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


class BaselineError(ValueError):
    """Invalid probe input (shapes, labels, C grid); the message says what to fix."""


def _as_xy(x: Any, y: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    xa = np.asarray(x, dtype=np.float32)
    if xa.ndim != 2 or xa.shape[0] == 0 or xa.shape[1] == 0:
        raise BaselineError(f"features must be a non-empty 2-D array (images, dims), got shape {xa.shape}")
    if not np.all(np.isfinite(xa)):
        raise BaselineError("features contain NaN or inf")
    if y is None:
        return xa, None
    ya = np.asarray(y)
    if ya.shape != (xa.shape[0],) or not np.issubdtype(ya.dtype, np.integer) or ya.min() < 0:
        raise BaselineError(f"need one non-negative integer label per feature row: {xa.shape[0]} rows, labels {ya.shape}")
    return xa, ya.astype(np.int64)


@dataclass
class LinearProbe:
    """A fitted linear classifier: ``scores = ((x - mean) / scale) @ weight.T + bias``."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    C: float
    loss: str
    iterations: int = 0

    def decision_function(self, x: Any) -> np.ndarray:
        """Class scores (N, C) for features (N, D); argmax is the prediction (logits for ``logistic``)."""
        xa, _ = _as_xy(x)
        if xa.shape[1] != self.mean.size:
            raise BaselineError(f"probe was fitted on {self.mean.size}-dim features, got {xa.shape[1]}")
        return ((xa - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class per row."""
        return self.decision_function(x).argmax(axis=1)

    def accuracy(self, x: Any, y: Any) -> float:
        """Fraction of rows classified correctly."""
        xa, ya = _as_xy(x, y)
        return float((self.predict(xa) == ya).mean())


def _objective(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float,
               loss: str) -> torch.Tensor:
    scores = x @ w.T + b  # (N, C)
    if loss == "logistic":
        data = F.cross_entropy(scores, y)
    else:  # one-vs-rest squared hinge: every class is a binary L2-SVM
        sign = torch.full_like(scores, -1.0)
        sign[torch.arange(y.numel()), y] = 1.0
        data = torch.clamp(1.0 - sign * scores, min=0.0).pow(2).sum(dim=1).mean()
    return data + 0.5 * lam * (w * w).sum()


def fit_linear_probe(
    x: Any,
    y: Any,
    C: float = 1.0,
    *,
    loss: str = "logistic",
    num_classes: int | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
    init: LinearProbe | None = None,
) -> LinearProbe:
    """Fit one probe with full-batch L-BFGS (see the module docstring for the objective).

    ``init`` warm-starts from another probe of the same shapes (used along a C grid).
    """
    if loss not in LOSSES:
        raise BaselineError(f"unknown probe loss {loss!r}; valid: {', '.join(LOSSES)}")
    if not (np.isfinite(C) and C > 0):
        raise BaselineError(f"C must be a finite number > 0, got {C!r}")
    xa, ya = _as_xy(x, y)
    n, d = xa.shape
    k = int(num_classes) if num_classes is not None else int(ya.max()) + 1
    if ya.max() >= k:
        raise BaselineError(f"label {int(ya.max())} is out of range for {k} classes")
    if init is not None:
        mean, scale = init.mean, init.scale
    else:
        mean = xa.mean(axis=0)
        # A constant feature carries nothing: scale 1 keeps it at 0 instead of dividing by 0.
        std = xa.std(axis=0)
        scale = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    xt = torch.from_numpy((xa - mean) / scale)
    yt = torch.from_numpy(ya)
    w = torch.zeros(k, d) if init is None else torch.from_numpy(init.weight.copy())
    b = torch.zeros(k) if init is None else torch.from_numpy(init.bias.copy())
    w.requires_grad_(True)
    b.requires_grad_(True)
    lam = 1.0 / (C * n)  # C * sum_i loss + ||w||^2 / 2, divided by C * n
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = _objective(w, b, xt, yt, lam, loss)
        value.backward()
        return value

    opt.step(closure)
    iterations = int(opt.state_dict()["state"].get(0, {}).get("n_iter", 0))
    return LinearProbe(w.detach().numpy().copy(), b.detach().numpy().copy(), np.asarray(mean, np.float32),
                       np.asarray(scale, np.float32), float(C), loss, iterations)


def select_probe(
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    loss: str = "logistic",
    num_classes: int | None = None,
    max_iter: int = 100,
) -> tuple[LinearProbe, dict[float, float]]:
    """Fit a probe for every C (small to large, warm-started) and keep the best on the validation split.

    Returns the chosen probe (fitted on the training features only) and the
    validation accuracy of every C. ``max_iter`` caps each fit of the grid: the
    warm start leaves the large-C fits near their optimum, and at 200 they took
    1.5x the time for the same choice in 14 of 15 grids (``bench/results/probe_solver.md``; a
    looser gradient tolerance instead would stop the large-C fits at their warm
    start, so that C beyond about 1 / (tol * n) could no longer differ).
    """
    grid = sorted(float(c) for c in Cs)
    if not grid:
        raise BaselineError("the C grid is empty; give at least one value")
    xt, yt = _as_xy(x_train, y_train)
    xv, yv = _as_xy(x_val, y_val)
    k = int(num_classes) if num_classes is not None else int(max(yt.max(), yv.max())) + 1
    best: LinearProbe | None = None
    best_acc = -1.0
    scores: dict[float, float] = {}
    previous: LinearProbe | None = None
    for c in grid:
        probe = fit_linear_probe(xt, yt, c, loss=loss, num_classes=k, max_iter=max_iter, init=previous)
        acc = probe.accuracy(xv, yv)
        scores[c] = acc
        if acc > best_acc:  # strict: ties keep the smaller C (stronger regularisation)
            best, best_acc = probe, acc
        previous = probe
    assert best is not None
    return best, scores


@dataclass
class ExitProbes:
    """One chosen probe per exit, with the validation scores of every C tried."""

    probes: list[LinearProbe]
    val_scores: list[dict[float, float]] = field(default_factory=list)

    @property
    def chosen_C(self) -> list[float]:
        """C of each exit's probe."""
        return [p.C for p in self.probes]

    @property
    def val_accuracy(self) -> list[float]:
        """Validation accuracy of each exit's chosen probe."""
        return [s[p.C] for p, s in zip(self.probes, self.val_scores)]

    def logits(self, features: Sequence[Any]) -> np.ndarray:
        """Scores of every exit, (K, N, C), from K feature arrays: the same shape as a network's logits."""
        if len(features) != len(self.probes):
            raise BaselineError(f"{len(features)} feature arrays for {len(self.probes)} probes")
        return np.stack([p.decision_function(f) for p, f in zip(self.probes, features)]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for reports."""
        return {"loss": self.probes[0].loss if self.probes else None, "chosen_C": self.chosen_C,
                "val_accuracy": self.val_accuracy,
                "val_scores": [{repr(c): a for c, a in s.items()} for s in self.val_scores]}


def is_probe_head(head: Any) -> bool:
    """A head a linear probe can be written into: batch norm, then a Linear layer (every EP head kind).

    The backbone's own classifier as the last exit (``own_classifier_last``) is not one.
    """
    return hasattr(head, "norm") and hasattr(head, "fc")


def install_probe(net: Any, k: int, probe: LinearProbe) -> None:
    """Write ``probe`` into exit ``k``'s EP head of ``net`` so the network's logits equal the probe's scores.

    A head is (pooling ->) batch norm -> Linear. The batch norm is set to the
    identity (eval mode) and the probe's standardisation is folded into the
    Linear layer: ``W' = W / scale``, ``b' = b - W' mean``. This turns a probe
    fitted on a jointly trained network's own features ("head refit") into a
    deployable network. Only the EP head kinds of impatient_ros.runtime.heads are supported.
    """
    from impatient_ros.runtime.heads import HEAD_KINDS

    head = net.heads[k]
    if net.config.head not in HEAD_KINDS or not is_probe_head(head):
        raise BaselineError(f"exit {k + 1} is not an EP head with batch norm and a Linear layer; cannot install")
    fc, norm = head.fc, head.norm
    if probe.weight.shape != tuple(fc.weight.shape):
        raise BaselineError(f"probe of shape {probe.weight.shape} does not fit exit {k + 1}'s head {tuple(fc.weight.shape)}")
    with torch.no_grad():
        w = torch.from_numpy(probe.weight / probe.scale[None, :]).to(fc.weight)
        b = torch.from_numpy(probe.bias - (probe.weight / probe.scale[None, :]) @ probe.mean).to(fc.bias)
        fc.weight.copy_(w)
        fc.bias.copy_(b)
        # Identity batch norm in eval mode: (x - 0) / sqrt(var + eps) * 1 + 0 with var + eps = 1.
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        norm.weight.fill_(1.0)
        norm.bias.zero_()


def fit_exit_probes(
    train_features: Sequence[Any],
    y_train: Any,
    val_features: Sequence[Any],
    y_val: Any,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    loss: str = "logistic",
    num_classes: int | None = None,
    max_iter: int = 200,
) -> ExitProbes:
    """One probe per exit (C chosen on validation for each exit separately)."""
    if len(train_features) != len(val_features) or not train_features:
        raise BaselineError(f"need the same number (>= 1) of train and val feature arrays, got "
                            f"{len(train_features)} and {len(val_features)}")
    probes, scores = [], []
    for xt, xv in zip(train_features, val_features):
        probe, s = select_probe(xt, y_train, xv, y_val, Cs, loss=loss, num_classes=num_classes, max_iter=max_iter)
        probes.append(probe)
        scores.append(s)
    return ExitProbes(probes, scores)
