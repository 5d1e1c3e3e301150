"""Regularised linear probes as EP heads: the LP-FT start and the post-hoc head refit.

A probe (``training.baselines``) is fitted on the pooled features a head
reads (``training.features``), with C chosen per exit on the validation
split, and written into the head so that the network's logits equal the
probe's scores exactly (in eval mode).

Unlike ``baselines.install_probe`` (batch norm set to the identity), the
head's batch norm here carries the training features' own statistics, and
the probe's standardisation is folded into the Linear layer around it:

    head(x) = W' ((x - mu) / sqrt(var + eps)) + b'   with   W' = W sigma / s,  b' = b + W (mu - m) / s

(``m``, ``s``: the probe's standardisation; ``mu``, ``var``: the batch norm's
statistics, per feature for BN1d, per channel for the fc head's BN2d). So the
head keeps the same output when it goes on training: in training mode its
batch norm normalises with batch statistics close to ``mu``/``var``, which
is what an LP-FT start (Kumar et al., ICLR 2022) needs.

A ``conv`` head (3x3 conv + BN + ReLU, then the avg4x4 head) is refit and
started the same way on its OWN pooled features (``ConvHead.features``, the
``conv`` pooling of ``training.features``): only its final batch norm and
Linear layer become the probe, its convolution stays as trained. Why not a
probe on the stage output instead: that would throw away the head's one
trained layer, and a probe of a different shape does not fit its Linear
layer. So for a conv head, refit means "re-solve the last layer on the
trained convolution's features", chosen per exit on val like any other.
For the LP-FT start the convolution is still its random initialisation:
:func:`linear_probe_start` first gives its batch norm the training
features' statistics (one pass, :func:`settle_conv_norms`), so that the
head's output does not jump when fine-tuning starts with batch statistics,
then fits the probes on the features of that random convolution (the start
is validated as epoch 0 like any other, so val decides whether it is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from impatient_ros.runtime.heads import AVG_GRIDS, ConvHead

from .baselines import DEFAULT_CS, BaselineError, LinearProbe, is_probe_head, select_probe
from .features import collect_outputs, collect_pooled
from .layout import fast_layout

__all__ = ["head_statistics", "set_head_from_probe", "settle_conv_norms", "probe_exits", "pooling_candidates",
           "HeadProbes", "fit_head_probes", "linear_probe_start", "refit_heads"]


def head_statistics(net: Any, k: int, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) variance of ``features`` (N, D) in the shape of exit k's batch norm."""
    norm = net.heads[k].norm
    x = np.asarray(features, dtype=np.float64)
    if isinstance(norm, nn.BatchNorm2d):
        channels = norm.num_features
        if x.shape[1] % channels:
            raise BaselineError(f"{x.shape[1]} features do not split into {channels} channels")
        per = x.reshape(x.shape[0], channels, -1)
        return per.mean(axis=(0, 2)), per.var(axis=(0, 2))
    return x.mean(axis=0), x.var(axis=0)


def set_head_from_probe(net: Any, k: int, probe: LinearProbe, features: np.ndarray) -> None:
    """Write ``probe`` into exit k's head; its batch norm gets the statistics of ``features`` (the probe's training features)."""
    head = net.heads[k]
    if not is_probe_head(head):
        raise BaselineError(f"exit {k + 1} is not an EP head with batch norm and a Linear layer; cannot install")
    fc, norm = head.fc, head.norm
    if probe.weight.shape != tuple(fc.weight.shape):
        raise BaselineError(f"probe of shape {probe.weight.shape} does not fit exit {k + 1}'s head {tuple(fc.weight.shape)}")
    mu, var = head_statistics(net, k, features)
    sigma = np.sqrt(var + norm.eps)
    d = probe.weight.shape[1]
    repeat = d // mu.size  # BN2d: every channel covers H*W flattened features (channel-major)
    mu_f, sigma_f = np.repeat(mu, repeat), np.repeat(sigma, repeat)
    w = probe.weight.astype(np.float64)
    s = probe.scale.astype(np.float64)
    m = probe.mean.astype(np.float64)
    w_new = w * (sigma_f / s)[None, :]
    b_new = probe.bias.astype(np.float64) + w @ ((mu_f - m) / s)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(w_new).to(fc.weight))
        fc.bias.copy_(torch.from_numpy(b_new).to(fc.bias))
        norm.running_mean.copy_(torch.from_numpy(mu).to(norm.running_mean))
        norm.running_var.copy_(torch.from_numpy(var).to(norm.running_var))
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.zero_()


def _loader(dataset: Any, batch_size: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def settle_conv_norms(net: Any, dataset: Any, *, device: str | torch.device = "cpu", batch_size: int = 256) -> int:
    """Set every conv head's BN2d (``conv_norm``) to the statistics of ``dataset``'s features; how many it set.

    One pass with only those batch norms in training mode and a cumulative
    average (momentum None), as torch.optim.swa_utils.update_bn does; the
    backbone and every other layer stay in eval mode and keep their weights.
    """
    norms = [head.conv_norm for head in net.heads if isinstance(head, ConvHead)]
    if not norms:
        return 0
    fast_layout(net, device)  # the layout the probes' feature passes run in: the same statistics
    was_training = net.training
    net.eval()
    saved = [norm.momentum for norm in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for images, _ in _loader(dataset, batch_size):
            net(images.to(device))
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        net.train(was_training)
    return len(norms)


def probe_exits(net: Any) -> list[int]:
    """The exits (0-based) whose head a probe can be written into (``baselines.is_probe_head``).

    The backbone's own classifier as the last exit (``own_classifier_last``,
    the paper's original output layer) is not one: it keeps its weights, and
    the LP-FT start and the refit leave it as it is.
    """
    return [k for k, head in enumerate(net.heads) if is_probe_head(head)]


def pooling_candidates(net: Any, k: int) -> list[str]:
    """The poolings exit k's head may take when its pooling is chosen on validation data.

    An average-pooling head (``avg``, ``avg2x2``, ``avg4x4``, ``avg7x7``, ``avg8x8``) may
    become any of them whose grid fits the stage's feature map (a grid larger
    than the map only repeats cells), its own kind always included; ``fc`` and
    ``conv`` heads keep their kind.
    """
    kind = net.head_kinds()[k]
    if kind not in AVG_GRIDS:
        return [kind]
    _, h, w = net.stage_output_shapes()[k]
    return [p for p, grid in AVG_GRIDS.items() if p == kind or grid <= min(h, w)]


@dataclass
class HeadProbes:
    """One val-tuned probe per probe exit: its pooling, its C and its validation accuracy.

    ``val_scores[k][pooling]`` is the best validation accuracy over the C grid for that pooling.
    """

    exits: list[int]
    probes: list[LinearProbe]
    poolings: list[str]
    val_accuracy: list[float]
    val_scores: list[dict[str, float]]
    train_features: list[np.ndarray]

    @property
    def chosen_C(self) -> list[float]:
        return [p.C for p in self.probes]


def fit_head_probes(net: Any, train_set: Any, val_set: Any, *, Cs: Sequence[float] = DEFAULT_CS,
                    choose_pooling: bool = False, device: str | torch.device = "cpu",
                    batch_size: int = 256) -> HeadProbes:
    """Probes on ``net``'s pooled features for the exits of :func:`probe_exits`, C per exit on val.

    With ``choose_pooling`` every exit also tries the poolings of
    :func:`pooling_candidates` and keeps the one with the best validation
    accuracy (ties: its head's own kind, else the coarser grid, which has fewer
    weights); without it each exit pools as its head does.
    """
    exits = probe_exits(net)
    if not exits:
        raise BaselineError("the network has no EP head a probe can be written into")
    kinds = net.head_kinds()
    poolings = {k: (pooling_candidates(net, k) if choose_pooling else [kinds[k]]) for k in exits}
    tr, y_tr = collect_pooled(net, _loader(train_set, batch_size), poolings, device=device)
    va, y_va = collect_pooled(net, _loader(val_set, batch_size), poolings, device=device)
    num_classes = net.config.num_classes
    out = HeadProbes(exits, [], [], [], [], [])
    for k in exits:
        # Own kind first, then coarse to fine: max() keeps the first of equal scores.
        order = sorted(poolings[k], key=lambda p: (p != kinds[k], AVG_GRIDS.get(p, 0)))
        fitted = {p: select_probe(tr[(k, p)], y_tr, va[(k, p)], y_va, Cs, num_classes=num_classes) for p in order}
        scores = {p: max(val.values()) for p, (_, val) in fitted.items()}
        best = max(order, key=lambda p: scores[p])
        out.probes.append(fitted[best][0])
        out.poolings.append(best)
        out.val_accuracy.append(scores[best])
        out.val_scores.append(scores)
        out.train_features.append(tr[(k, best)])
    return out


def _install(net: Any, k: int, pooling: str, probe: LinearProbe, features: np.ndarray) -> None:
    """Exit k's head becomes ``probe`` on ``pooling`` (a new head of that kind where it pools otherwise)."""
    if net.head_kinds()[k] != pooling:
        net.replace_head(k, pooling)
    set_head_from_probe(net, k, probe, features)


def linear_probe_start(net: Any, train_set: Any, val_set: Any, *, Cs: Sequence[float] = DEFAULT_CS,
                       choose_pooling: bool = False, device: str | torch.device = "cpu",
                       batch_size: int = 256) -> dict[str, Any]:
    """LP-FT start: every EP head becomes the val-tuned probe on the (frozen) network's features.

    With ``choose_pooling`` each head also takes the pooling its probe chose on val. Conv heads first get their
    convolution's batch-norm statistics from the training images (module note).
    """
    settle_conv_norms(net, train_set, device=device, batch_size=batch_size)
    fitted = fit_head_probes(net, train_set, val_set, Cs=Cs, choose_pooling=choose_pooling, device=device,
                             batch_size=batch_size)
    # An exit that keeps its head (the backbone's own classifier) starts at that head's val accuracy, C None.
    chosen: list[float | None] = [None] * net.num_stages
    accuracy: list[float | None] = [None] * net.num_stages
    pooling: list[str | None] = net.head_kinds()
    for i, k in enumerate(fitted.exits):
        _install(net, k, fitted.poolings[i], fitted.probes[i], fitted.train_features[i])
        chosen[k], accuracy[k], pooling[k] = fitted.chosen_C[i], fitted.val_accuracy[i], fitted.poolings[i]
    if any(a is None for a in accuracy):
        va = collect_outputs(net, _loader(val_set, batch_size), device=device)
        own = (va.logits.argmax(axis=2) == va.labels[None, :]).mean(axis=1)
        accuracy = [float(own[k]) if a is None else a for k, a in enumerate(accuracy)]
    return {"chosen_C": chosen, "val_accuracy": accuracy, "pooling": pooling,
            "val_pooling_scores": _scores_by_exit(net, fitted)}


def refit_heads(net: Any, train_set: Any, val_set: Any, *, Cs: Sequence[float] = DEFAULT_CS,
                choose_pooling: bool = False, device: str | torch.device = "cpu",
                batch_size: int = 256) -> dict[str, Any]:
    """Post-hoc refit: exit k's head becomes the val-tuned probe on the final features where that is better on val.

    Better means a strictly higher validation accuracy than the trained head;
    otherwise the trained head stays. With ``choose_pooling`` the probe may
    pool on another grid than the head (:func:`pooling_candidates`); the head
    then becomes one of that kind. A conv head keeps its convolution: the
    probe is fitted on, and replaces only the layer that reads, its pooled
    features (module note).
    """
    va = collect_outputs(net, _loader(val_set, batch_size), device=device)
    head_acc = (va.logits.argmax(axis=2) == va.labels[None, :]).mean(axis=1)
    fitted = fit_head_probes(net, train_set, val_set, Cs=Cs, choose_pooling=choose_pooling, device=device,
                             batch_size=batch_size)
    # Exits without an EP head (the backbone's own classifier) are never refit: C and probe accuracy None.
    refit = [False] * net.num_stages
    chosen: list[float | None] = [None] * net.num_stages
    probe_acc: list[float | None] = [None] * net.num_stages
    for i, k in enumerate(fitted.exits):
        chosen[k], probe_acc[k] = fitted.chosen_C[i], fitted.val_accuracy[i]
        if probe_acc[k] > head_acc[k]:
            _install(net, k, fitted.poolings[i], fitted.probes[i], fitted.train_features[i])
            refit[k] = True
    return {"refit": refit, "chosen_C": chosen, "val_probe_accuracy": probe_acc,
            "val_head_accuracy": head_acc.tolist(), "pooling": net.head_kinds(),
            "val_pooling_scores": _scores_by_exit(net, fitted)}


def _scores_by_exit(net: Any, fitted: HeadProbes) -> list[dict[str, float] | None]:
    """Validation accuracy of every pooling tried, per exit (None where no probe was fitted)."""
    scores: list[dict[str, float] | None] = [None] * net.num_stages
    for i, k in enumerate(fitted.exits):
        scores[k] = fitted.val_scores[i]
    return scores
