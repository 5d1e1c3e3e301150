"""One pass over a dataset: every exit's logits and, for the linear-probe baselines, pooled features.

The probes of the FT/ORIG baselines (paper Sect. 4, "Does joint training of
EP layers help?") must see exactly what an EP head sees, so the features are
pooled the way the head pools:

* ``avg4x4`` -- average pooling into a 4x4 grid, flattened (16 * C values);
* ``avg``    -- global average pooling (C values);
* ``fc``     -- the whole feature map, flattened (C * H * W values);
* ``conv``   -- the conv head's own pooled features (``ConvHead.features``:
  its 3x3 conv + BN + ReLU, then the 4x4 grid; 16 * width values), i.e. what
  its batch norm and Linear layer read. So a probe on them (LP-FT start, head
  refit) replaces only the head's final linear layer and keeps its trained
  convolution. These depend on the head, not only on the stage output; a
  frozen-backbone baseline that should not see a head's convolution asks for
  ``avg4x4`` instead.

By default the pooling follows the network's own head kind. The heads'
batch norm is not part of the features: the probes standardise their inputs
themselves (``training.baselines``), which is the same affine freedom.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from impatient_ros.runtime.heads import HEAD_KINDS, ConvHead
from impatient_ros.runtime.model import ImpatientNet

__all__ = ["POOLINGS", "ExitOutputs", "pool_features", "collect_outputs"]

POOLINGS: tuple[str, ...] = HEAD_KINDS  # ("fc", "avg", "avg4x4", "conv")


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
    if pooling == "avg4x4":
        return torch.flatten(F.adaptive_avg_pool2d(h, 4), 1)  # (N, 16*C)
    if pooling == "avg":
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # (N, C)
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

    ``pooling`` defaults to the network's head kind; ``exits`` (0-based)
    restricts which exits' features are kept (all by default; logits are
    always kept for every exit). The network's train/eval mode is restored.
    """
    device = torch.device(device)
    pooling = pooling or net.config.head
    if features and pooling not in POOLINGS:
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
                    feats[k].append(pool_features(h, pooling, net.heads[k]).float().cpu().numpy())
            labels.append(np.asarray(target, dtype=np.int64).reshape(-1))
    finally:
        net.train(was_training)
    if not labels:
        raise ValueError("the dataset yielded no batches; nothing to evaluate")
    out = ExitOutputs(
        logits=np.stack([np.concatenate(z) for z in logits]),
        labels=np.concatenate(labels),
        pooling=pooling if features else None,
    )
    if features:
        out.features = [np.concatenate(f) if f else np.zeros((out.num_images, 0), np.float32) for f in feats]
    return out
