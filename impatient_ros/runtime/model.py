"""ImpatientNet: a backbone cut into stages with one early-prediction (EP) head per stage.

The network is a chain ``x -> block 0 -> block 1 -> ... -> block K-1`` with
``head k`` reading block k's output. The runtime can stop between any two
stages (anytime prediction) or run only up to a chosen exit (a-priori budget):

    h = x
    for k in range(net.num_stages):
        h = net.run_block(k, h)        # (N, C_k, H_k, W_k)
        logits = net.run_head(k, h)    # (N, num_classes)

``forward(x)`` returns every exit's logits (used for joint training),
``forward_exit(x, k)`` runs blocks 0..k and only head k.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from impatient_ros.runtime.backbones import build_backbone, known_backbone_names, list_backbones
from impatient_ros.runtime.heads import HEAD_KINDS, head_kind, make_head

__all__ = ["NetConfig", "ImpatientNet", "build_network", "list_backbones", "list_heads"]


def list_heads() -> list[str]:
    """Valid EP head kinds."""
    return list(HEAD_KINDS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class NetConfig:
    """Everything needed to rebuild an ImpatientNet (stored in checkpoints as a dict).

    ``input_size`` is (height, width) of the images the network is built for:
    the head sizes are derived from it, and the "fc" head only accepts it.
    ``pretrained`` asks for the backbone's pretrained weights at build time;
    ``own_classifier_last`` makes the last exit the backbone's own pooling +
    classifier (re-sized to ``num_classes``) instead of an EP head.
    ``exit_heads``, when given, is the head kind of every EP head in exit order
    (one per stage, the own classifier excluded), overriding ``head``: the
    impatient recipe chooses the pooling grid per exit on validation data.
    """

    backbone: str
    num_classes: int
    head: str = "avg4x4"
    in_channels: int = 3
    input_size: tuple[int, int] = (224, 224)
    pretrained: bool = False
    own_classifier_last: bool = False
    exit_heads: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.input_size, (list, tuple)):
            self.input_size = tuple(self.input_size)  # lists come from JSON/YAML/checkpoints
        if isinstance(self.exit_heads, list):
            self.exit_heads = tuple(self.exit_heads)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what it accepts."""
        if not isinstance(self.backbone, str) or self.backbone not in known_backbone_names():
            raise ValueError(
                f"unknown backbone {self.backbone!r}; valid backbones: {', '.join(known_backbone_names())}"
            )
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; valid heads: {', '.join(HEAD_KINDS)}")
        if not _is_int(self.in_channels) or self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB), got {self.in_channels!r}")
        size = self.input_size
        if not (isinstance(size, tuple) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
            raise ValueError(f"input_size must be two positive integers (height, width), got {size!r}")
        for name in ("pretrained", "own_classifier_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.exit_heads is not None:
            if not isinstance(self.exit_heads, tuple) or not self.exit_heads:
                raise ValueError(f"exit_heads must be a non-empty list of head kinds, got {self.exit_heads!r}")
            bad = [k for k in self.exit_heads if k not in HEAD_KINDS]
            if bad:
                raise ValueError(f"unknown head kind(s) {bad} in exit_heads; valid heads: {', '.join(HEAD_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (input_size as a list) for checkpoints and config files."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        if self.exit_heads is None:
            del data["exit_heads"]  # a network with one head kind keeps the dict older readers know
        else:
            data["exit_heads"] = list(self.exit_heads)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetConfig:
        """Inverse of to_dict; rejects unknown and missing keys with ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"net config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown net config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        missing = [n for n in ("backbone", "num_classes") if n not in data]
        if missing:
            raise ValueError(f"net config is missing required key(s) {missing}")
        return cls(**dict(data))


class ImpatientNet(nn.Module):
    """Backbone stages (``blocks``) with one exit head per stage (``heads``)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = replace(config)  # a private copy: later edits to the caller's config change nothing
        parts = build_backbone(
            config.backbone,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            pretrained=config.pretrained,
            own_classifier=config.own_classifier_last,
            input_size=config.input_size,
        )
        self.blocks = nn.ModuleList(parts.stages)
        self._stage_shapes = self._dry_run(parts.channels)
        ep_shapes = self._stage_shapes[:-1] if config.own_classifier_last else self._stage_shapes
        kinds = config.exit_heads or (config.head,) * len(ep_shapes)
        if len(kinds) != len(ep_shapes):
            raise ValueError(f"exit_heads names {len(kinds)} head kinds, but backbone {config.backbone!r} has "
                             f"{len(ep_shapes)} EP heads")
        heads: list[nn.Module] = [make_head(kind, c, (h, w), config.num_classes)
                                  for kind, (c, h, w) in zip(kinds, ep_shapes)]
        if config.own_classifier_last:
            assert parts.own_classifier is not None
            heads.append(parts.own_classifier)  # the paper's last exit: the original output layer
        self.heads = nn.ModuleList(heads)

    def _dry_run(self, channels: list[int]) -> list[tuple[int, int, int]]:
        """Run a zero image of config.input_size through the blocks to learn each stage's output shape."""
        cfg = self.config
        shapes: list[tuple[int, int, int]] = []
        self.blocks.eval()  # eval: batch norm on a batch of one, and no running-stat updates
        try:
            with torch.no_grad():
                h = torch.zeros(1, cfg.in_channels, *cfg.input_size)  # (1, C_in, H, W)
                for k, block in enumerate(self.blocks):
                    try:
                        h = block(h)  # (1, C_k, H_k, W_k)
                    except RuntimeError as exc:
                        raise ValueError(
                            f"input_size {cfg.input_size[0]}x{cfg.input_size[1]} is too small for backbone "
                            f"{cfg.backbone!r}: stage {k} failed ({exc}); use larger images"
                        ) from exc
                    if h.dim() != 4 or h.shape[1] != channels[k]:
                        raise RuntimeError(
                            f"backbone {cfg.backbone!r} stage {k} gave shape {tuple(h.shape)}, "
                            f"expected {channels[k]} channels"
                        )
                    shapes.append((int(h.shape[1]), int(h.shape[2]), int(h.shape[3])))
        finally:
            self.blocks.train()
        return shapes

    @property
    def num_stages(self) -> int:
        """Number of stages K (= number of exits)."""
        return len(self.blocks)

    def head_kinds(self) -> list[str | None]:
        """The kind of every exit's head (None for the backbone's own classifier)."""
        return [head_kind(head) for head in self.heads]

    def replace_head(self, k: int, kind: str) -> nn.Module:
        """Give exit k a new, untrained EP head of ``kind`` (same device and dtype); return it.

        The config's ``exit_heads`` records the change, so a checkpoint of the
        network rebuilds with the new head.
        """
        self._check_stage(k)
        kinds = self.head_kinds()
        if kinds[k] is None:
            raise ValueError(f"exit {k + 1} is the backbone's own classifier, not an EP head; it cannot be replaced")
        c, h, w = self._stage_shapes[k]
        old = self.heads[k]
        ref = next(old.parameters(), None)
        head = make_head(kind, c, (h, w), self.config.num_classes)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        head.train(old.training)
        self.heads[k] = head
        kinds[k] = kind
        ep = tuple(kind for kind in kinds if kind is not None)
        self.config = replace(self.config, exit_heads=None if len(set(ep)) == 1 and ep[0] == self.config.head else ep)
        return head

    def stage_output_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each stage's output for config.input_size."""
        return list(self._stage_shapes)

    def _check_stage(self, k: int) -> None:
        # Negative indices would silently pick a late stage: the runtime must ask for what it means.
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 0 <= k < len(self.blocks):
            raise IndexError(f"stage index must be an integer in 0..{len(self.blocks) - 1}, got {k!r}")

    def run_block(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Stage k's backbone block: (N, C_{k-1}, H, W) -> (N, C_k, H_k, W_k); stage 0 takes the image."""
        self._check_stage(k)
        return self.blocks[k](h)

    def run_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Exit k's logits (N, num_classes) from stage k's output (N, C_k, H_k, W_k)."""
        self._check_stage(k)
        return self.heads[k](h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All exits: x (N, C_in, H, W) -> K tensors of logits (N, num_classes)."""
        outputs: list[torch.Tensor] = []
        h = x
        for block, head in zip(self.blocks, self.heads):
            h = block(h)  # (N, C_k, H_k, W_k)
            outputs.append(head(h))  # (N, num_classes)
        return outputs

    def forward_exit(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """A-priori path: blocks 0..k then only head k; x (N, C_in, H, W) -> (N, num_classes)."""
        self._check_stage(k)
        h = x
        for j in range(k + 1):
            h = self.blocks[j](h)  # (N, C_j, H_j, W_j)
        return self.heads[k](h)


def build_network(config: NetConfig) -> ImpatientNet:
    """Build the ImpatientNet described by ``config`` (in training mode)."""
    if not isinstance(config, NetConfig):
        raise TypeError(f"build_network expects a NetConfig, got {type(config).__name__}")
    return ImpatientNet(config)
