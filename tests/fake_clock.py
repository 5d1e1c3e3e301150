"""A clock that moves only when told, and a way to give a real network known stage costs on it.

The engine reads every time from its ``clock`` (``StagedEngine(..., clock=...)``).
With :class:`FakeClock` and :func:`set_stage_costs`, a real tiny ImpatientNet
runs through the real engine while each block and head "takes" a fixed time:
forward hooks advance the clock by that amount. Admission decisions, stop
reasons, ready times and overruns then follow from the numbers alone, however
fast or loaded the machine running the tests is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FakeClock", "set_stage_costs"]


class FakeClock:
    """Seconds that pass only through :meth:`advance`; pass :meth:`now` as the engine's clock."""

    def __init__(self, start: float = 1000.0) -> None:
        # Not zero: a run must not depend on its clock starting at zero.
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"a clock does not go back, got dt={dt}")
        self._now += dt


def set_stage_costs(net: nn.Module, clock: FakeClock, block_s: Sequence[float],
                    head_s: Sequence[float]) -> list[torch.utils.hooks.RemovableHandle]:
    """Make block k and head k of ``net`` take ``block_s[k]`` and ``head_s[k]`` seconds on ``clock``.

    Register on the engine's network after the engine was built: it replaces the
    heads by their fused form, and the hooks must sit on the modules it calls.
    Returns the hook handles (``handle.remove()`` takes a cost away again).
    """
    if len(block_s) != len(net.blocks) or len(head_s) != len(net.heads):
        raise ValueError(f"need one cost per block and head ({len(net.blocks)}), got {len(block_s)}, {len(head_s)}")

    def costs(seconds: float):
        return lambda module, inputs, output: clock.advance(seconds)

    handles = [block.register_forward_hook(costs(s)) for block, s in zip(net.blocks, block_s)]
    handles += [head.register_forward_hook(costs(s)) for head, s in zip(net.heads, head_s)]
    return handles
