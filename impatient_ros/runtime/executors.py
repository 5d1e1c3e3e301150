"""How one stage runs on a device: the engine's CPU and CUDA executors (no policy here).

An executor runs block k (and head k) of a network on the input of the current
image and hands back a :class:`StageOutput`: the exit's probabilities and the
measured block and head times. It decides nothing: which stage runs, and whether
it still fits the deadline, is :class:`~impatient_ros.runtime.engine.StagedEngine`'s
business. ``launch`` starts a stage and returns a handle, ``wait`` turns the handle
into the output; the CPU executor is synchronous (``is_async`` false), the CUDA one
queues per-stage CUDA graphs so the device can run ahead of the host.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.modules import module as _module_impl

__all__ = ["Clock", "CpuExecutor", "CudaExecutor", "StageOutput", "call_module", "cpu_exit_probs", "exit_probs"]

Clock = Callable[[], float]  # what StagedEngine(clock=...) takes: seconds, never going back


@dataclass(slots=True)
class StageOutput:
    """What an executor hands back for one exit."""

    stage: int
    probs: np.ndarray
    block_s: list[tuple[int, float]]   # (stage, seconds) of every block run for this exit
    head_s: float
    ready_time: float

    @property
    def device_s(self) -> float:
        return sum(s for _, s in self.block_s) + self.head_s


# torch's registries of forward hooks for every module: while both are empty and the module has none of its own,
# nn.Module.__call__ only calls forward (backward hooks never run: the engine runs in inference mode). Read by
# name on every call: registering a hook mutates them. Without them (another torch) every call goes through __call__.
_CAN_CALL_FORWARD = all(isinstance(getattr(_module_impl, name, None), dict)
                        for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def call_module(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, calling ``module.forward`` directly where ``__call__`` would run no forward hook.

    ``nn.Module.__call__`` passes through two Python frames (a traced block's
    GraphModule through a third) before its forward; on a 1 ms network the CPU
    executor makes eight such calls per image (``bench/results/engine_cpu_direct_forward_ab.md``).
    The check is made on every call, so forward hooks registered after the
    engine was built run as usual (the fake-clock tests time blocks and heads
    through them). Only for the engine's inference: no backward hooks, no
    ``torch.compile`` or JIT tracing of the engine's own modules.
    """
    try:
        hooked = module._forward_hooks or module._forward_pre_hooks
    except AttributeError:  # not an nn.Module: any callable (a test's injected fault) is called as it is
        return module(x)
    if _CAN_CALL_FORWARD and not (hooked or _module_impl._global_forward_hooks
                                  or _module_impl._global_forward_pre_hooks):
        return module.forward(x)
    return module(x)


def exit_probs(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An exit's softmax probabilities (num_classes,) from its head, in float32 even for a half network."""
    return torch.softmax(head(h).float(), dim=-1)[0]


def cpu_exit_probs(head: torch.nn.Module, h: torch.Tensor) -> np.ndarray:
    """:func:`exit_probs` of a float32 CPU network as numpy, in fewer operator calls (same values).

    Indexing the row after the conversion is a numpy view, not one more torch call.
    """
    logits = call_module(head, h)
    if logits.dtype != torch.float32:
        logits = logits.float()
    return logits.softmax(-1).numpy()[0]


class CpuExecutor:
    """Runs the eager network synchronously; times per block and head on the engine's clock.

    Calls the blocks and heads directly (the engine validated the stage index
    once): on a 1 ms network every per-exit call that is not arithmetic shows.
    """

    is_async = False

    def __init__(self, net: torch.nn.Module, clock: Clock = time.monotonic) -> None:
        self.net = net
        self._clock = clock
        self._blocks = list(net.blocks)
        self._heads = list(net.heads)
        self._h: torch.Tensor | None = None

    def start(self, x: torch.Tensor) -> None:
        self._h = x

    def suspend(self) -> torch.Tensor | None:
        """The current image's activation, to resume it after other images ran (no copy: a reference)."""
        return self._h

    def resume(self, state: torch.Tensor | None, next_stage: int) -> None:
        """Continue an image from :meth:`suspend`'s state; its next block is ``next_stage``."""
        self._h = state

    def launch(self, k: int) -> StageOutput:
        clock = self._clock
        t0 = clock()
        self._h = call_module(self._blocks[k], self._h)
        t1 = clock()
        probs = cpu_exit_probs(self._heads[k], self._h)
        t2 = clock()
        return StageOutput(k, probs, [(k, t1 - t0)], t2 - t1, t2)

    def launch_exit(self, k: int) -> StageOutput:
        blocks = []
        h = self._h
        clock = self._clock
        for j in range(k + 1):
            t0 = clock()
            h = call_module(self._blocks[j], h)
            blocks.append((j, clock() - t0))
        t1 = clock()
        probs = cpu_exit_probs(self._heads[k], h)
        t2 = clock()
        return StageOutput(k, probs, blocks, t2 - t1, t2)

    @staticmethod
    def done(handle: StageOutput) -> bool:
        return True

    @staticmethod
    def wait(handle: StageOutput) -> StageOutput:
        return handle


class CudaExecutor:
    """Queues blocks and heads on the current CUDA stream (as CUDA graphs or eagerly).

    Each exit ends with a non-blocking copy of its probabilities into a pinned
    host buffer and a CUDA event; ``wait`` blocks on that event only, so work
    queued after it keeps the device busy. Block and head times come from CUDA
    events (device time, not host time); only the ready time is read from the
    engine's clock.
    """

    is_async = True

    def __init__(self, net: torch.nn.Module, input_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, use_graphs: bool, clock: Clock = time.monotonic) -> None:
        self.net = net
        self._clock = clock
        self.device = device
        k_total = net.num_stages
        num_classes = net.config.num_classes
        self._pinned = [torch.empty(num_classes, dtype=torch.float32, pin_memory=True) for _ in range(k_total)]
        self._ev_start = [torch.cuda.Event(enable_timing=True) for _ in range(k_total)]
        self._ev_mid = [torch.cuda.Event(enable_timing=True) for _ in range(k_total)]
        self._ev_ready = [torch.cuda.Event(enable_timing=True) for _ in range(k_total)]
        self._exit_blocks: dict[int, list[int]] = {}  # stage -> blocks its pending exit ran
        self._h: torch.Tensor | None = None
        self._keep: list[torch.Tensor] = []  # eager outputs alive until their copies are queued
        self.graphs = False
        if use_graphs:
            try:
                self._capture(tuple(input_shape), dtype)
                self.graphs = True
            except RuntimeError as exc:  # an op that cannot be captured: eager still works
                warnings.warn(f"CUDA graph capture failed ({exc}); running eagerly", RuntimeWarning, stacklevel=3)

    def _capture(self, input_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Capture one graph per block and per head, after warm-up on a side stream (PyTorch CUDA graphs docs)."""
        net = self.net
        self._static_in = torch.zeros(input_shape, dtype=dtype, device=self.device)
        # Warm-up outside capture: cuDNN/cuBLAS pick algorithms and allocate workspaces here,
        # which must not happen during capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                h = self._static_in
                for k in range(net.num_stages):
                    h = net.run_block(k, h)
                    exit_probs(net.heads[k], h)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self._block_graphs: list[torch.cuda.CUDAGraph] = []
        self._head_graphs: list[torch.cuda.CUDAGraph] = []
        self._static_act: list[torch.Tensor] = []
        self._static_probs: list[torch.Tensor] = []
        h = self._static_in
        for k in range(net.num_stages):
            # Each graph keeps its own memory pool: exits are replayed in varying orders
            # (heads skipped in a-priori mode), so pools are not shared.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                h = net.run_block(k, h)           # reads the previous graph's static output
            self._block_graphs.append(graph)
            self._static_act.append(h)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                probs = exit_probs(net.heads[k], h)
            self._head_graphs.append(graph)
            self._static_probs.append(probs)
        torch.cuda.synchronize(self.device)

    def start(self, x: torch.Tensor) -> None:
        self._keep.clear()
        if self.graphs:
            self._static_in.copy_(x, non_blocking=True)
            self._h = self._static_in
        else:
            self._h = x

    def suspend(self) -> torch.Tensor | None:
        """The current image's activation, to resume it after other images ran.

        With graphs it lives in a static buffer that the next image's replays overwrite, so this is a
        device copy (one activation per suspended image); eager tensors are kept by reference.
        """
        if self.graphs and self._h is not None:
            return self._h.clone()
        return self._h

    def resume(self, state: torch.Tensor | None, next_stage: int) -> None:
        """Continue an image from :meth:`suspend`'s state: block ``next_stage``'s graph reads its input buffer."""
        if self.graphs and state is not None:
            buffer = self._static_in if next_stage == 0 else self._static_act[next_stage - 1]
            buffer.copy_(state, non_blocking=True)
            self._h = buffer
        else:
            self._h = state

    def _block(self, k: int) -> None:
        if self.graphs:
            self._block_graphs[k].replay()
            self._h = self._static_act[k]
        else:
            self._h = self.net.run_block(k, self._h)

    def _head(self, k: int) -> None:
        if self.graphs:
            self._head_graphs[k].replay()
            probs = self._static_probs[k]
        else:
            probs = exit_probs(self.net.heads[k], self._h)
            self._keep.append(probs)
        self._pinned[k].copy_(probs, non_blocking=True)
        self._ev_ready[k].record()

    def launch(self, k: int) -> int:
        self._ev_start[k].record()
        self._block(k)
        self._ev_mid[k].record()
        self._head(k)
        self._exit_blocks[k] = [k]
        return k

    def launch_exit(self, k: int) -> int:
        for j in range(k + 1):
            self._ev_start[j].record()
            self._block(j)
            self._ev_mid[j].record()
        self._head(k)
        self._exit_blocks[k] = list(range(k + 1))
        return k

    def done(self, k: int) -> bool:
        return self._ev_ready[k].query()

    def wait(self, k: int) -> StageOutput:
        self._ev_ready[k].synchronize()
        ready = self._clock()
        probs = self._pinned[k].numpy().copy()  # the buffer is reused by the next image
        blocks = [(j, self._ev_start[j].elapsed_time(self._ev_mid[j]) / 1e3) for j in self._exit_blocks[k]]
        head_s = self._ev_mid[k].elapsed_time(self._ev_ready[k]) / 1e3
        return StageOutput(k, probs, blocks, head_s, ready)
