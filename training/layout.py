"""The memory layout training and offline passes run a network in: channels-last on the CPU.

oneDNN's CPU convolutions, depthwise ones included, run faster on NHWC
(channels-last) tensors than on NCHW, for a training step and an eval pass
of both of bench/reproduce_paper.py's networks (``bench/bench_memory_format.py``,
figures in ``bench/results/training_memory_format.md``). A network's
layout is a property of its 4-D parameters; with channels-last weights every
convolution returns channels-last outputs whatever the input's layout, so
the inputs need no conversion (a 1-channel image has both layouts at once).

The conversion is in place and keeps the Parameter objects, so an optimiser
built on them stays valid. Checkpoints are written contiguous
(``runtime.checkpoint``) and the runtime engine runs NCHW, as it was
measured; only training and the offline passes (evaluation, features for
probes) use this layout. On a GPU the layout is left as it is: not measured.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fast_layout", "runtime_layout"]


def fast_layout(net: nn.Module, device: str | torch.device) -> nn.Module:
    """``net`` in the layout its passes are fastest in on ``device`` (channels-last on the CPU), in place."""
    if torch.device(device).type == "cpu":
        net.to(memory_format=torch.channels_last)
    return net


def runtime_layout(net: nn.Module) -> nn.Module:
    """``net`` in the runtime's layout (contiguous NCHW), in place: what the engine runs and checkpoints hold."""
    return net.to(memory_format=torch.contiguous_format)
