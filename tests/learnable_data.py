"""A tiny 4-class gray 16x16 dataset with a learnable signal, for the recipe and head tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

__all__ = ["learnable_gray16"]


def learnable_gray16(n: int, seed: int) -> TensorDataset:
    """``n`` images (labels 0..3 in turn): noise, plus a top-left 8x8 patch brighter by 0.4 per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    x[:, :, :8, :8] += y.view(-1, 1, 1, 1).float() * 0.4
    return TensorDataset(x, y)
