"""Early-prediction (EP) heads: the small classifiers attached after each backbone stage.

The three kinds follow Amthor et al. (BMVC 2016, Fig. 2 right):

* ``"fc"``     -- one fully connected layer on the whole feature map,
* ``"avg"``    -- global average pooling, then a fully connected layer,
* ``"avg4x4"`` -- average pooling into 4x4 = 16 regions (keeps rough spatial
  layout), then a fully connected layer; the paper's choice,
* ``"avg2x2"``, ``"avg7x7"``, ``"avg8x8"`` -- the same on a 2x2 / 7x7 / 8x8 grid
  (:class:`AvgGridHead`): the paper's 4x4 grid was made for 224x224 images, whose
  stage maps are 56 to 7 pixels a side; on small inputs an early 28x28 or 32x32
  map averaged into 4x4 cells loses detail a finer grid keeps, and a deep 2x2 map
  copied into 4x4 cells only repeats itself. The impatient recipe chooses the
  grid per exit on validation data (``training.probes``). 8x8 divides the
  32/16/8-pixel maps of 64x64 inputs (EfficientNet-Lite0's first three stages),
  so it pools with the even kernel where 7x7 needs overlapping windows,
* ``"conv"``   -- an MSDNet-style head (Huang et al., ICLR 2018): one 3x3
  convolution + batch norm + ReLU in front of the ``avg4x4`` head, so an
  early exit gets a layer of its own instead of reading the backbone's
  features as they are (issue 12, "stronger heads where they pay for their time").

Every head normalises its input with batch norm before the linear layer: the
paper reports that without it joint training of the exits does not converge
in most cases (Sect. 4, Fig. 4).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_KINDS: tuple[str, ...] = ("fc", "avg", "avg2x2", "avg4x4", "avg7x7", "avg8x8", "conv")
# The average-pooling kinds and their grid (cells a side): "avg" pools globally.
AVG_GRIDS: dict[str, int] = {"avg": 1, "avg2x2": 2, "avg4x4": 4, "avg7x7": 7, "avg8x8": 8}


class FCHead(nn.Module):
    """BN2d on the feature map -> flatten -> Linear; tied to one feature map size."""

    def __init__(self, in_channels: int, feature_hw: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.feature_hw = (int(feature_hw[0]), int(feature_hw[1]))
        self.norm = nn.BatchNorm2d(in_channels)
        self.fc = nn.Linear(in_channels * self.feature_hw[0] * self.feature_hw[1], num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> logits (N, num_classes)
        if tuple(h.shape[-2:]) != self.feature_hw:
            # The Linear would fail with an opaque matmul message; say what is wrong instead.
            raise ValueError(
                f"fc head was built for {self.feature_hw[0]}x{self.feature_hw[1]} feature maps "
                f"but got {h.shape[-2]}x{h.shape[-1]}: feed images of the network's input_size "
                f"or use head 'avg'/'avg4x4', which accept any size"
            )
        return self.fc(torch.flatten(self.norm(h), 1))  # (N, C*H*W) -> (N, num_classes)


class AvgHead(nn.Module):
    """Global average pool -> BN1d -> Linear; independent of the feature map size."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm1d(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> pooled (N, C) -> logits (N, num_classes)
        return self.fc(self.norm(torch.flatten(self.pool(h), 1)))


class AvgGridHead(nn.Module):
    """Average pool into a ``grid`` x ``grid`` grid -> BN over the grid*grid*C features -> Linear.

    Feature maps smaller than the grid are accepted: adaptive pooling then
    repeats cells, so the head keeps one fixed size for every input resolution.
    """

    def __init__(self, in_channels: int, num_classes: int, grid: int = 4) -> None:
        super().__init__()
        self.grid = int(grid)
        features = in_channels * self.grid * self.grid
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.norm = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, num_classes)

    @property
    def kind(self) -> str:
        return f"avg{self.grid}x{self.grid}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> pooled (N, C, g, g) -> (N, g*g*C) -> logits (N, num_classes)
        return self.fc(self.norm(torch.flatten(self.pool(h), 1)))


class Avg4x4Head(AvgGridHead):
    """The paper's AVG4x4 head: :class:`AvgGridHead` on a 4x4 grid."""

    GRID = 4

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, self.GRID)


class ConvHead(nn.Module):
    """3x3 conv (no bias) -> BN2d -> ReLU -> average pool into a 4x4 grid -> BN1d -> Linear.

    Why this one default rather than MSDNet's two stride-2 convolutions: the
    head runs at every exit on the anytime path (t_A sums every head), so it
    gets the smallest change that gives an exit its own non-linear layer. One
    convolution to ``min(C, MAX_WIDTH)`` channels bounds its cost on wide
    backbones (a 2048-channel ResNet-50 stage gets 128, not 2048, filters).
    It is strided (2) on feature maps of at least ``STRIDE_FROM`` pixels a side,
    as MSDNet's are: the 4x4 pooling that follows keeps only a 4x4 grid, so a
    full-resolution convolution would pay 4x the arithmetic for detail the
    pooling averages away; smaller maps keep stride 1 so the grid still has
    distinct cells. The tail is exactly the ``avg4x4`` head (``pool``, ``norm``,
    ``fc``), so probes and fusion treat it as one: :meth:`features` is what its
    batch norm and Linear layer read.
    """

    GRID = 4
    MAX_WIDTH = 128
    STRIDE_FROM = 16

    def __init__(self, in_channels: int, feature_hw: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        width = min(int(in_channels), self.MAX_WIDTH)
        stride = 2 if min(feature_hw) >= self.STRIDE_FROM else 1
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.conv_norm = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)  # on the conv's own fresh output: nothing else holds it
        self.pool = nn.AdaptiveAvgPool2d(self.GRID)
        features = width * self.GRID * self.GRID
        self.norm = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, num_classes)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The pooled features the head's batch norm and Linear layer read: (N, C, H, W) -> (N, 16 * width)."""
        z = self.act(self.conv_norm(self.conv(h)))  # (N, width, H', W'), H' = ceil(H / stride)
        return torch.flatten(self.pool(z), 1)       # (N, width, 4, 4) -> (N, 16 * width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> features (N, 16 * width) -> logits (N, num_classes)
        return self.fc(self.norm(self.features(h)))


def make_head(kind: str, in_channels: int, feature_hw: tuple[int, int], num_classes: int) -> nn.Module:
    """Build the EP head ``kind`` for a stage output of shape (in_channels, *feature_hw).

    Raises ValueError for an unknown kind (listing the valid ones) or
    non-positive sizes.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")
    if in_channels < 1 or num_classes < 1 or min(feature_hw) < 1:
        raise ValueError(
            f"head sizes must be positive, got in_channels={in_channels}, "
            f"feature_hw={tuple(feature_hw)}, num_classes={num_classes}"
        )
    if kind == "fc":
        return FCHead(in_channels, feature_hw, num_classes)
    if kind == "avg":
        return AvgHead(in_channels, num_classes)
    if kind == "conv":
        return ConvHead(in_channels, feature_hw, num_classes)
    if kind == "avg4x4":
        return Avg4x4Head(in_channels, num_classes)
    return AvgGridHead(in_channels, num_classes, AVG_GRIDS[kind])


def head_kind(head: nn.Module) -> str | None:
    """The kind of an EP head module (None for a module that is not one, e.g. a backbone's own classifier)."""
    if isinstance(head, ConvHead):
        return "conv"
    if isinstance(head, AvgGridHead):
        return head.kind
    if isinstance(head, AvgHead):
        return "avg"
    if isinstance(head, FCHead):
        return "fc"
    return None
