"""One pass over a dataset: every exit's logits and, for the linear-probe baselines, pooled features.

The probes of the FT/ORIG baselines (paper Sect. 4, "Does joint training of
EP layers help?") must see exactly what an EP head sees, so the features are
pooled the way the head pools:

* ``avg4x4`` -- average pooling into a 4x4 grid, flattened (16 * C values);
  ``avg2x2``, ``avg7x7`` and ``avg8x8`` alike on their grids;
* ``avg``    -- global average pooling (C values);
* ``fc``     -- the whole feature map, flattened (C * H * W values);
* ``conv``   -- the conv head's own pooled features (``ConvHead.features``:
  its 3x3 conv + BN + ReLU, then the 4x4 grid; 16 * width values), i.e. what
  its batch norm and Linear layer read. So a probe on them (LP-FT start, head
  refit) replaces only the head's final linear layer and keeps its trained
  convolution. These depend on the head, not only on the stage output; a
  frozen-backbone baseline that should not see a head's convolution asks for
  ``avg4x4`` instead.

By default the pooling follows each exit's own head kind. The heads'
batch norm is not part of the features: the probes standardise their inputs
themselves (``training.baselines``), which is the same affine freedom.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from impatient_ros.runtime.heads import AVG_GRIDS, HEAD_KINDS, ConvHead
from impatient_ros.runtime.model import ImpatientNet

from .layout import fast_layout

__all__ = ["POOLINGS", "ExitOutputs", "pool_features", "collect_outputs", "collect_pooled"]

POOLINGS: tuple[str, ...] = HEAD_KINDS  # ("fc", "avg", "avg2x2", "avg4x4", "avg7x7", "avg8x8", "conv")


def pool_features(h: torch.Tensor, pooling: str, head: torch.nn.Module | None = None) -> torch.Tensor:
    """A stage output (N, C, H, W) -> the features its EP head kind reads, (N, D).

    ``conv`` needs the exit's ``head`` (a ConvHead): its features come from its own convolution.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    if h.dim() != 4:
        raise ValueError(f"expected a feature map (N, C, H, W), got shape {tuple(h.shape)}")
    if pooling == "conv":
        if not isinstance(head, ConvHead):
            raise ValueError(f"conv pooling reads a ConvHead's own features, got head {type(head).__name__}")
        return head.features(h)  # (N, 16*width)
    if pooling in AVG_GRIDS:
        return torch.flatten(F.adaptive_avg_pool2d(h, AVG_GRIDS[pooling]), 1)  # (N, g*g*C); "avg": (N, C)
    return torch.flatten(h, 1)  # (N, C*H*W)


@dataclass
class ExitOutputs:
    """Results of one pass: ``logits`` (K, N, C) float32, ``labels`` (N,), ``features`` K arrays (N, D_k) or None."""

    logits: np.ndarray
    labels: np.ndarray
    features: list[np.ndarray] | None = None
    pooling: str | None = None

    @property
    def num_exits(self) -> int:
        """K."""
        return int(self.logits.shape[0])

    @property
    def num_images(self) -> int:
        """N."""
        return int(self.labels.shape[0])


@torch.inference_mode()
def collect_outputs(
    net: ImpatientNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    features: bool = False,
    pooling: str | None = None,
    exits: Sequence[int] | None = None,
) -> ExitOutputs:
    """Run ``net`` (eval mode) over ``batches`` of (images, labels) once; keep logits and optionally features.

    ``pooling`` defaults to each exit's head kind (``config.head`` for the backbone's own classifier);
    ``exits`` (0-based) restricts which exits' features are kept (all by default; logits are
    always kept for every exit). The network's train/eval mode is restored; its memory layout becomes
    the fast one for ``device`` (``training.layout``).
    """
    device = torch.device(device)
    fast_layout(net, device)
    kinds = net.head_kinds()
    per_exit = [pooling or kind or net.config.head for kind in kinds]
    if features and any(p not in POOLINGS for p in per_exit):
        raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    keep = set(range(net.num_stages)) if exits is None else {int(k) for k in exits}
    if not keep <= set(range(net.num_stages)):
        raise ValueError(f"exits must lie in 0..{net.num_stages - 1}, got {sorted(keep)}")
    was_training = net.training
    net.eval()
    logits: list[list[np.ndarray]] = [[] for _ in range(net.num_stages)]
    feats: list[list[np.ndarray]] = [[] for _ in range(net.num_stages)]
    labels: list[np.ndarray] = []
    try:
        for images, target in batches:
            h = images.to(device, non_blocking=True)
            for k in range(net.num_stages):
                h = net.run_block(k, h)  # (B, C_k, H_k, W_k)
                logits[k].append(net.run_head(k, h).float().cpu().numpy())
                if features and k in keep:
                    feats[k].append(pool_features(h, per_exit[k], net.heads[k]).float().cpu().numpy())
            labels.append(np.asarray(target, dtype=np.int64).reshape(-1))
    finally:
        net.train(was_training)
    if not labels:
        raise ValueError("the dataset yielded no batches; nothing to evaluate")
    out = ExitOutputs(
        logits=np.stack([np.concatenate(z) for z in logits]),
        labels=np.concatenate(labels),
        pooling=(pooling or (per_exit[0] if len(set(per_exit)) == 1 else "per exit")) if features else None,
    )
    if features:
        out.features = [np.concatenate(f) if f else np.zeros((out.num_images, 0), np.float32) for f in feats]
    return out


@torch.inference_mode()
def collect_pooled(
    net: ImpatientNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    poolings: dict[int, Sequence[str]],
    *,
    device: str | torch.device = "cpu",
) -> tuple[dict[tuple[int, str], np.ndarray], np.ndarray]:
    """Several poolings of some exits' stage outputs in one pass: ({(exit, pooling): (N, D)}, labels (N,)).

    ``poolings`` maps a 0-based exit to the poolings wanted there (the head
    pooling choice of ``training.probes`` fits one probe per candidate grid).
    The blocks run only as deep as the deepest exit asked for. The network's memory layout becomes the
    fast one for ``device`` (``training.layout``).
    """
    device = torch.device(device)
    fast_layout(net, device)
    for k, names in poolings.items():
        if not 0 <= k < net.num_stages:
            raise ValueError(f"exits must lie in 0..{net.num_stages - 1}, got {k}")
        bad = [p for p in names if p not in POOLINGS]
        if bad:
            raise ValueError(f"unknown pooling(s) {bad}; valid: {', '.join(POOLINGS)}")
    deepest = max(poolings, default=-1)
    was_training = net.training
    net.eval()
    feats: dict[tuple[int, str], list[np.ndarray]] = {(k, p): [] for k, names in poolings.items() for p in names}
    labels: list[np.ndarray] = []
    try:
        for images, target in batches:
            h = images.to(device, non_blocking=True)
            for k in range(deepest + 1):
                h = net.run_block(k, h)  # (B, C_k, H_k, W_k)
                for p in poolings.get(k, ()):
                    feats[(k, p)].append(pool_features(h, p, net.heads[k]).float().cpu().numpy())
            labels.append(np.asarray(target, dtype=np.int64).reshape(-1))
    finally:
        net.train(was_training)
    if not labels:
        raise ValueError("the dataset yielded no batches; nothing to evaluate")
    return {key: np.concatenate(parts) for key, parts in feats.items()}, np.concatenate(labels)
