"""StagedEngine: run an ImpatientNet stage by stage under a deadline (no ROS).

Three modes (paper, Fig. 1 and Sect. 4):

* ``anytime``: run stage after stage, hand every exit's answer over the moment
  it is ready (``on_result``) and stop when the next stage cannot finish before
  the deadline.
* ``apriori``: the budget is known before the image: pick the deepest exit
  whose predicted cost fits, run blocks 0..k and only head k (one answer;
  heads 0..k with an exit ensemble, see below).
* ``cascade``: like anytime, but stop as soon as an exit is confident
  (1-vs-2 ratio of its top two probabilities >= threshold).

Rules that hold in every mode:

* A stage that has started always completes (PyTorch kernels cannot be
  interrupted safely); the engine instead decides *before* each stage: it starts
  stage k only if ``now + predicted completion <= deadline``, the prediction
  being the :class:`~impatient_ros.runtime.timing.TimingModel` quantile
  ``admission_quantile`` (p99.9 by default, from the model's exponential tail fit)
  of that stage's block + head.
* Nothing is guessed: with a deadline and no timings the run raises
  :class:`~impatient_ros.runtime.timing.TimingError` (calibrate or load a file first).
* Every run's measured block and head times update the timing model (online,
  sliding window with an ageing rule), so the model follows thermal and load
  drift both ways; after a run the deadline stopped, the refused stages are
  re-measured under a duty cycle (see :class:`StagedEngine`).
* Stage numbers are 1-based in results (as in the messages), 0-based in code.
* Every run that hands over any answer hands over exactly one final one
  (``is_final``), the last. When an exit went out as not final and the run
  cannot go on (the ``on_result`` callback took so long that the next stage no
  longer fits, or a stage or the callback raised), the engine hands that exit
  over once more as a *repeated* final answer (``StageResult.repeated``, stop
  reason DEADLINE or ERROR; after an error it then re-raises the error).
* Time is read from the engine's ``clock`` (``time.monotonic`` by default):
  deadlines, ready times and measured CPU stage times are in that clock's
  seconds. Tests pass a fake clock to run the real network with known costs.

An exit's answer (its ranking computed when first read, ``ratio_1v2`` floored)
is built by :mod:`impatient_ros.runtime.stage_results`.

How a stage runs on the device is :mod:`impatient_ros.runtime.executors`; this
module is the policy around it. It stays one file: admission, the modes, the
one-final-answer guarantee, probing and calibration rounds all read and write
the same run state, and they read better side by side than spread over modules.

On CUDA the executor captures one CUDA graph per block and per head (static
input/output buffers, captured after warm-up on a side stream), optionally runs
in float16, copies each exit's probabilities ``non_blocking`` into a pinned host
buffer and records a CUDA event, so in anytime mode stage k+1's kernels are
already queued when the host waits for exit k. Probabilities equal the eager
model's ``softmax(net(x))`` within ``atol=1e-4`` in float32 (kernel choice in
graphs vs. eager) and ``atol=1e-2`` in float16. On the CPU the engine runs the
eager model itself (identical up to float rounding, ``atol=1e-6``).

Exit ensembles: when the checkpoint carries ensemble weights
(``checkpoint.ensemble``, :mod:`impatient_ros.core.ensemble`) and ``use_ensemble``
allows it, exit k answers with the weighted geometric mean of exits 1..k's
probabilities (``StageResult.ensemble`` is then true). Anytime and cascade have
those exits already, so it costs one (k, C) combination per exit; the cascade's
1-vs-2 ratio is the combined answer's. A-priori then runs heads 0..k too and
admits exit k by its anytime completion (blocks 0..k + heads 0..k).

The engine is not thread-safe: one thread drives it. That thread may keep several
images in flight (:class:`StagedRun`, one stage per step, e.g. in the order
:mod:`impatient_ros.core.scheduler` picks); ``run`` is one such run stepped to its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from impatient_ros.core.ensemble import answer_accuracy, validate_ensemble
# The result types live in the torch-free core (the node's pure helpers and the tools use them);
# they are re-exported here, so ``from impatient_ros.runtime.engine import StopReason`` keeps working.
from impatient_ros.core.results import EngineError, Mode, RunReport, StageResult, StopReason
from impatient_ros.runtime.executors import Clock, CpuExecutor, CudaExecutor, StageOutput
from impatient_ros.runtime.device import DeviceFallbackWarning, DeviceUnavailableError, resolve_device
from impatient_ros.runtime.fusion import fuse_blocks as fuse_blocks_of
from impatient_ros.runtime.fusion import fuse_heads as fuse_heads_of
from impatient_ros.runtime.preprocess import Preprocessor
from impatient_ros.runtime.stage_results import RATIO_EPSILON, made_final, stage_result
from impatient_ros.runtime.timing import TimingError, TimingModel, latency_quantile

if TYPE_CHECKING:  # the engine only reads .net, .preprocessing, .class_names (and .ensemble if present)
    from impatient_ros.runtime.checkpoint import LoadedCheckpoint

__all__ = [
    "DEFAULT_CASCADE_THRESHOLD",
    "CalibrationRounds",
    "RATIO_EPSILON",
    "DeviceFallbackWarning",
    "DeviceUnavailableError",
    "EngineError",
    "Mode",
    "RunReport",
    "StageResult",
    "StagedEngine",
    "StagedRun",
    "StopReason",
    "resolve_device",
]

# 1-vs-2 ratio at which the cascade stops by default: a starting point only; fit it
# on validation data for the accuracy/time trade-off you need (paper, Fig. 6).
DEFAULT_CASCADE_THRESHOLD = 3.0
# Host-side cost per CUDA stage (graph launch, event wait, wake-up) that device-time
# measurements miss; used until calibrate() measures it on the actual machine.
_DEFAULT_CUDA_OVERHEAD_S = 50e-6
_ENSEMBLE_EPS = 1e-12  # probability floor before the log, as impatient_ros.core.ensemble.combine_probabilities
_PY_ENSEMBLE_MAX_CLASSES = 64  # up to here the exit ensemble combines Python floats, above in numpy (_answer)


# p99.9, not p99: at p99 about one answered frame in a thousand came late on a quiet CPU (a stage a few
# microseconds past its p99), and the node's count of admitted frames in time stayed near 97-98 %; the
# tail-fit p99.9 removed the former and halved the node's misses for a few percent fewer frames answered
# (bench/results/engine_cpu_tail_quantile.md, soak_admission_quantile_ab.md).
DEFAULT_ADMISSION_QUANTILE = 0.999


def _own_log_probs(probs: np.ndarray, in_python: bool) -> list[float] | np.ndarray:
    """An exit's floored log-probabilities for the later ensemble rows, in the form _answer combines."""
    if in_python:
        return [math.log(v if v > _ENSEMBLE_EPS else _ENSEMBLE_EPS) for v in probs.tolist()]
    return np.log(np.maximum(probs, _ENSEMBLE_EPS))


@dataclass(frozen=True)
class CalibrationRounds:
    """How :meth:`StagedEngine.calibrate` went: stable or not, after how many rounds and seconds.

    ``median_ms[r][k]`` is round r's median block + head time of stage k (0-based);
    the timing model keeps the samples of the last two rounds.
    """

    stable: bool
    rounds: int
    seconds: float
    median_ms: list[list[float]]


# --------------------------------------------------------------------------- the engine


class StagedEngine:
    """Deadline-aware staged inference of a loaded Impatient DNN checkpoint.

    The engine takes ownership of ``checkpoint.net`` (moves it to the device,
    sets eval mode, replaces its EP heads by their fused inference form unless
    ``fuse_heads`` is false and folds each block's batch norms into its
    convolutions unless ``fuse_blocks`` is false, converts it to half precision
    with ``fp16`` on CUDA).
    ``timing`` may be a model calibrated earlier; otherwise an empty one is made
    and :meth:`calibrate` or :meth:`load_calibration` must run before a run with
    a deadline. ``online_update`` feeds every run's measurements into it.

    ``clock`` is where the engine reads the time: deadlines, ready times, start
    times and the CPU's measured stage times are in its seconds (``time.monotonic``
    by default, so a deadline is a ``time.monotonic()`` value). Tests pass a fake
    clock that the network's own forward hooks advance by known amounts. The
    timing model ages its samples on the same clock (``TimingModel.use_clock``).

    Following load both ways: the timing model's ageing rule (see
    :class:`~impatient_ros.runtime.timing.TimingModel`) drops a spike's samples
    from the quantiles ``recent_s`` after it ends, once quiet samples exist; the
    starvation guard provides them. A stage is admitted only on its own measured
    cost and only stages that run are measured, so after a run that the deadline
    stopped (NO_TIME, or DEADLINE in anytime/cascade) the engine measures the
    refused stage and every deeper one whose newest sample is older than
    ``probe_interval_s``, one after the other (answers discarded; the frame's
    answers are already out: a probe only runs after the final answer was handed
    over), going deeper only while the probes took less than the frame's budget.
    Probing keeps a duty cycle of at most ``probe_duty``: after probes that took
    ``d`` seconds, none runs for ``d * (1 - probe_duty) / probe_duty`` seconds, so
    probing cannot take more than that share of the time the next frames need.

    ``use_ensemble`` (default true): answer with the checkpoint's exit ensemble
    when it has one (module note); false, or a checkpoint without one, answers
    with each exit's own probabilities. ``answer_accuracy`` is the validation
    accuracy of what each exit answers (``exit_accuracy`` is the heads' own).

    ``gc_during_run=False`` (default) disables Python's cyclic garbage collector
    while a run executes and re-enables it after the run's answers and probes: a
    collection that falls inside a stage is a pause the admission quantile does
    not expect (it then happens between frames, where it delays no answer).
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        device: str | torch.device = "auto",
        *,
        admission_quantile: float = DEFAULT_ADMISSION_QUANTILE,
        top_k: int = 5,
        fp16: bool = False,
        cuda_graphs: bool = True,
        allow_cpu_fallback: bool = True,
        timing: TimingModel | None = None,
        online_update: bool = True,
        probe_interval_s: float = 0.02,
        probe_duty: float = 0.1,
        fuse_heads: bool = True,
        fuse_blocks: bool = True,
        gc_during_run: bool = False,
        use_ensemble: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0.0 < admission_quantile <= 1.0:
            raise EngineError(f"admission_quantile must lie in (0, 1], got {admission_quantile}")
        if top_k < 1:
            raise EngineError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 < probe_duty <= 1.0:
            raise EngineError(f"probe_duty must lie in (0, 1], got {probe_duty}")
        self.device = resolve_device(device, allow_cpu_fallback)
        if fp16 and self.device.type != "cuda":
            warnings.warn("fp16 is only used on CUDA (CPU half-precision convolutions are slow or missing): "
                          "running in float32", RuntimeWarning, stacklevel=2)
            fp16 = False
        self.fp16 = fp16
        self.admission_quantile = float(admission_quantile)
        self.online_update = online_update
        # Starvation guard (class note): a load spike that inflates a stage's quantile would
        # otherwise refuse that stage (and all deeper ones) for ever, as only stages that run
        # are measured. probe_interval_s = 0 disables it.
        self.probe_interval_s = float(probe_interval_s)
        self.probe_duty = float(probe_duty)
        self._probe_free_at = -math.inf  # engine clock before which the duty cycle allows no probe
        self.gc_during_run = bool(gc_during_run)
        self.last_calibration: CalibrationRounds | None = None
        self.clock = clock
        self._last_measured: list[float] = []
        self.net = checkpoint.net
        self.num_stages: int = self.net.num_stages
        self._last_measured = [-math.inf] * self.num_stages
        self._path_next, self._path_s = -1, 0.0  # the run's next block in a path from block 0, its sum
        self.num_classes: int = self.net.config.num_classes
        self.top_k = min(int(top_k), self.num_classes)
        self.class_names: list[str] = list(checkpoint.class_names or [])
        self.exit_accuracy = list(getattr(checkpoint, "exit_accuracy", None) or [])
        spec = getattr(checkpoint, "ensemble", None) if use_ensemble else None
        # Row k of the weights as an array (exits 0..k), or None: each exit answers alone.
        self.ensemble_weights: list[np.ndarray] | None = (
            None if spec is None else
            [np.asarray(row, dtype=np.float64) for row in validate_ensemble(spec, self.num_stages)["weights"]])
        self.use_ensemble = self.ensemble_weights is not None
        # Validation accuracy of what exit k publishes (the ensemble's answer or the head's own; NaN unknown).
        self.answer_accuracy: list[float] = answer_accuracy(self.exit_accuracy, spec, self.num_stages)
        # This run's exits' own answers (log-probabilities, for the later ensemble rows).
        self._own_log_probs: list[list[float] | np.ndarray | None] = [None] * self.num_stages
        # Per exit, the exits its row combines (non-zero weights) and their weights; () for a row that is
        # the exit alone (validation kept the ensemble off there), which then answers with its own
        # probabilities. Exit j's log-probabilities are only computed when a later row reads them.
        # One form per engine (the class count is fixed): the own answers and their combination must match.
        self._ensemble_in_python = self.num_classes <= _PY_ENSEMBLE_MAX_CLASSES
        self._ensemble_terms: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        self._log_needed: list[bool] = [False] * self.num_stages
        for k, row in enumerate(self.ensemble_weights or []):
            alone = row[k] == 1.0 and not np.any(row[:k])
            support = () if alone else tuple(int(j) for j in np.flatnonzero(row))
            self._ensemble_terms.append((support, tuple(float(w) for w in row[list(support)])))
            for j in support:
                self._log_needed[j] = True
        dtype = torch.float16 if fp16 else torch.float32
        self.preprocessor = Preprocessor(checkpoint.preprocessing, self.device, dtype=dtype)
        self.input_size = self.preprocessor.input_size

        self.net.eval()
        # Batch norm folded into each head's linear layer (and small pooling into one product): exact up to
        # rounding, and a head costs one or two operator calls instead of four (see impatient_ros.runtime.fusion).
        self.head_kinds: list[str] = fuse_heads_of(self.net) if fuse_heads else []
        # The same for the blocks: conv + batch norm pairs folded, each block one traced function
        # (fewer operator and module calls on a small network; same output up to rounding).
        self.block_fusion: list[str] = fuse_blocks_of(self.net) if fuse_blocks else []
        self.net.to(self.device)
        if fp16:
            self.net.half()
        with self._device_scope(), torch.inference_mode():
            if self.device.type == "cuda":
                self._executor: CpuExecutor | CudaExecutor = CudaExecutor(
                    self.net, self.preprocessor.output_shape, dtype, self.device, cuda_graphs, clock)
            else:
                self._executor = CpuExecutor(self.net, clock)
        self.cuda_graphs = bool(getattr(self._executor, "graphs", False))
        self.device_label = self._describe_device()
        self.overhead_s = _DEFAULT_CUDA_OVERHEAD_S if self.device.type == "cuda" else 0.0
        self._callback_s: deque[float] = deque(maxlen=32)
        self._active_run: StagedRun | None = None  # the run whose image the executor holds

        if timing is None:
            timing = TimingModel(self.num_stages, device=self.device_label, input_size=self.input_size)
        elif timing.num_stages != self.num_stages:
            raise TimingError(f"the timing model has {timing.num_stages} stages but the network has "
                              f"{self.num_stages}")
        timing.use_clock(clock)  # sample ages on the engine's clock
        self.timing = timing

    # ------------------------------------------------------------------ calibration
    def calibrate(self, warmup: int = 5, iterations: int = 30, *, reset: bool = True,
                  tolerance: float = 0.15, max_rounds: int = 8, max_time_s: float = 20.0) -> TimingModel:
        """Measure every stage's block and head on this device and input size; return the timing model.

        Runs ``warmup`` unmeasured passes, then measured passes over all stages
        with a random input of the network's size, in rounds of
        ``ceil(iterations / 2)`` passes. It checks its own stability: it stops
        when two consecutive rounds agree (every stage's median block + head
        differs by at most ``tolerance`` of the smaller one, or by 5 us) and
        keeps only the newest ``iterations`` passes of those two rounds, so a
        transient load at start-up (another process starting) is
        measured again instead of kept. It gives up after ``max_rounds`` rounds
        or ``max_time_s`` seconds and then keeps the last two rounds;
        :attr:`last_calibration` says whether it was stable. On CUDA it also
        measures the host-side cost per stage (launch + event wait) that the
        device-time measurements miss (``overhead_s``, added to every prediction).
        """
        if warmup < 0 or iterations < 1:
            raise EngineError(f"need warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")
        if max_rounds < 2 or not tolerance >= 0.0:
            raise EngineError(f"need max_rounds >= 2 and tolerance >= 0, got {max_rounds} and {tolerance}")
        per_round = max(1, -(-iterations // 2))
        began = self.clock()
        rounds: list[list[list[StageOutput]]] = []   # round -> pass -> one output per stage
        overheads: list[list[float]] = []
        medians: list[list[float]] = []
        stable = False
        with self._device_scope(), torch.inference_mode():
            x = torch.randn(self.preprocessor.output_shape, device=self.device, dtype=self.preprocessor.dtype)
            for i in range(warmup):
                self._start(x)
                for k in range(self.num_stages):
                    self._executor.wait(self._executor.launch(k))
            while True:
                passes, round_overheads = [], []
                for _ in range(per_round):
                    self._start(x)
                    outs = []
                    for k in range(self.num_stages):
                        t0 = self.clock()
                        out = self._executor.wait(self._executor.launch(k))  # one stage at a time
                        outs.append(out)
                        round_overheads.append((out.ready_time - t0) - out.device_s)
                    passes.append(outs)
                rounds.append(passes)
                overheads.append(round_overheads)
                medians.append([float(np.median([p[k].device_s for p in passes])) for k in range(self.num_stages)])
                if len(medians) >= 2 and all(abs(a - b) <= max(tolerance * min(a, b), 5e-6)
                                             for a, b in zip(medians[-1], medians[-2])):
                    stable = True
                    break
                if len(rounds) >= max_rounds or self.clock() - began >= max_time_s:
                    break
        if len(rounds) == 1:  # max_time_s ran out after one round: nothing to compare it with
            stable = False
        if reset:
            self.timing.reset()
        # The samples describe this engine's device and input from now on (so a saved file says so).
        self.timing.device, self.timing.input_size = self.device_label, self.input_size
        kept = [outs for passes in rounds[-2:] for outs in passes][-iterations:]
        for outs in kept:  # calibration always records, whatever online_update says
            self._path_next, self._path_s = 0, 0.0
            for out in outs:
                self._record(out, force=True)
        if self.device.type == "cuda":
            host = [v for values in overheads[-2:] for v in values]
            self.overhead_s = max(0.0, latency_quantile(host, self.admission_quantile))
        self.last_calibration = CalibrationRounds(
            stable=stable, rounds=len(rounds), seconds=self.clock() - began,
            median_ms=[[1e3 * m for m in row] for row in medians])
        return self.timing

    def save_calibration(self, path: str | Path) -> Path:
        """Write the timing model as a calibration file (see impatient_ros.runtime.timing)."""
        return self.timing.save(path)

    def load_calibration(self, path: str | Path, *, strict: bool = True) -> TimingModel:
        """Replace the timing model by a calibration file's.

        The file must match this network's stage count and input size, and (with
        ``strict``) this engine's device label: latencies from another device or
        precision would make the admission decisions wrong. The file holds block
        and head times only: on CUDA the host-side overhead per stage keeps its
        default (50 us) until :meth:`calibrate` measures it.
        """
        timing = TimingModel.load(path, num_stages=self.num_stages, input_size=self.input_size,
                                  device=self.device_label if strict else None, window=self.timing.window)
        timing.use_clock(self.clock)
        self.timing = timing
        return self.timing

    @property
    def is_calibrated(self) -> bool:
        """True once every stage has block and head timings."""
        return self.timing.is_calibrated

    # ------------------------------------------------------------------ running
    def run(
        self,
        image: np.ndarray,
        channel_order: str,
        *,
        deadline: float | None = None,
        mode: Mode | str = Mode.ANYTIME,
        max_stage: int | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_result: Callable[[StageResult], Any] | None = None,
    ) -> RunReport:
        """Classify one camera image under ``deadline`` (seconds on the engine's clock; None = unlimited).

        ``max_stage`` caps the exits (1-based; None or 0 = no cap). ``on_result``
        is called with each :class:`StageResult` as soon as it is ready; the last
        one it gets has ``is_final`` set, also when a stage or ``on_result`` itself
        raises after an answer went out (a repeated final answer, stop reason
        ERROR, then the error propagates). The preprocessing time counts against
        the deadline.
        """
        return self._run(self.start_run(image, channel_order, deadline=deadline, mode=mode, max_stage=max_stage,
                                        cascade_threshold=cascade_threshold, on_result=on_result))

    def run_tensor(
        self,
        x: torch.Tensor,
        *,
        deadline: float | None = None,
        mode: Mode | str = Mode.ANYTIME,
        max_stage: int | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_result: Callable[[StageResult], Any] | None = None,
    ) -> RunReport:
        """:meth:`run` on an already preprocessed ``(1, C, H, W)`` tensor (benchmarks, tests)."""
        return self._run(self.start_run_tensor(x, deadline=deadline, mode=mode, max_stage=max_stage,
                                               cascade_threshold=cascade_threshold, on_result=on_result))

    def start_run(
        self,
        image: np.ndarray,
        channel_order: str,
        *,
        deadline: float | None = None,
        mode: Mode | str = Mode.ANYTIME,
        max_stage: int | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_result: Callable[[StageResult], Any] | None = None,
    ) -> StagedRun:
        """Preprocess one image and return its run without running a stage (see :class:`StagedRun`).

        The arguments are :meth:`run`'s; the preprocessing time counts against the deadline.
        Several runs may be in flight at once, stepped in any order from one thread
        (:mod:`impatient_ros.core.scheduler` picks the order).
        """
        began = self.clock()
        with self._device_scope(), torch.inference_mode():
            x = self.preprocessor(image, channel_order)
        return self._new_run(x, began, deadline, mode, max_stage, cascade_threshold, on_result)

    def start_run_tensor(
        self,
        x: torch.Tensor,
        *,
        deadline: float | None = None,
        mode: Mode | str = Mode.ANYTIME,
        max_stage: int | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        on_result: Callable[[StageResult], Any] | None = None,
    ) -> StagedRun:
        """:meth:`start_run` on an already preprocessed ``(1, C, H, W)`` tensor (benchmarks, tests)."""
        began = self.clock()
        expected = self.preprocessor.output_shape
        if tuple(x.shape) != expected:
            raise EngineError(f"input must have shape {expected}, got {tuple(x.shape)}")
        x = x.to(self.device, self.preprocessor.dtype)
        return self._new_run(x, began, deadline, mode, max_stage, cascade_threshold, on_result)

    def _new_run(self, x: torch.Tensor, began: float, deadline: float | None, mode: Mode | str,
                 max_stage: int | None, cascade_threshold: float,
                 on_result: Callable[[StageResult], Any] | None) -> StagedRun:
        mode = Mode.parse(mode)
        cap = self._stage_cap(max_stage)
        if deadline is not None and not self.timing.is_calibrated:
            raise TimingError("a deadline needs stage timings: call StagedEngine.calibrate() or "
                              "load_calibration(path) before running with a deadline")
        if deadline is not None and math.isnan(deadline):
            raise EngineError("deadline must be a clock value or None, got NaN")
        if mode is Mode.CASCADE and not cascade_threshold >= 1.0:
            raise EngineError(f"cascade_threshold must be >= 1 (ratio of top-1 to top-2), got {cascade_threshold}")
        report = RunReport(mode=mode, results=[], stop_reason=StopReason.NONE, stages_run=0, predicted_s=[],
                           actual_s=[], started_at=[], began_at=began, deadline=deadline, overran=False,
                           overrun_s=0.0)
        threshold = cascade_threshold if mode is Mode.CASCADE else math.inf
        return StagedRun(self, x, report, cap, threshold, on_result)

    def _run(self, run: StagedRun) -> RunReport:
        """Step ``run`` to its end (on CUDA in anytime mode with stages queued ahead) and return its report."""
        report = run.report
        pause_gc = not self.gc_during_run and gc.isenabled()
        if pause_gc:  # a collection inside a stage is a pause the admission does not expect (class note)
            gc.disable()
        try:
            with self._device_scope(), _inference_mode():
                if self._executor.is_async and report.mode is Mode.ANYTIME:
                    self._run_queued_to_end(run)
                else:  # the same steps a scheduler takes one at a time (StagedRun), back to back
                    while run._step():
                        pass
        finally:
            if pause_gc:
                gc.enable()
        return report

    def _run_queued_to_end(self, run: StagedRun) -> None:
        """Anytime on CUDA, stage k+1 queued before exit k is waited for (only whole runs; no stepping)."""
        report, on_result = run.report, run._on_result
        self._start(run._x)
        try:
            self._run_queued(report, run._cap, on_result)
        except Exception:
            self._final_after_error(report, on_result)
            raise
        finally:
            run.done, run._x = True, None
        self._probe_refused_stages(report)
        _close_report(report)

    def _run_queued(self, report: RunReport, cap: int, on_result: Callable[[StageResult], Any] | None) -> None:
        """Anytime on CUDA: queue stage k+1 before waiting for exit k, so the device never idles.

        The decision to go on is taken before exit k is handed over, and a queued
        stage always runs: a slow callback cannot leave a non-final answer last.
        """
        now = self.clock()
        predicted = self._admit(0, now, report.deadline)
        if predicted is None:
            report.stop_reason = StopReason.NO_TIME
            return
        k, started = 0, now
        handle = self._executor.launch(0)
        predicted_ready = started + predicted
        while True:
            next_predicted, next_started = None, 0.0
            if k == self.num_stages - 1:
                stop = StopReason.COMPLETE
            elif k + 1 >= cap:
                stop = StopReason.MAX_STAGE
            else:
                now = self.clock()
                # The device starts stage k+1 when exit k is done: now if it already is,
                # else (conservatively) when exit k is predicted to be ready.
                next_started = now if self._executor.done(handle) else max(now, predicted_ready)
                next_predicted = self._admit(k + 1, next_started, report.deadline)
                stop = StopReason.NONE if next_predicted is not None else StopReason.DEADLINE
            next_handle = self._executor.launch(k + 1) if next_predicted is not None else None
            out = self._executor.wait(handle)
            self._record(out)
            self._emit(report, out, None, stop, predicted, started, k, on_result)
            if next_handle is None:
                return
            k, handle, predicted, started = k + 1, next_handle, next_predicted, next_started
            predicted_ready = next_started + next_predicted

    def _run_apriori(self, report: RunReport, cap: int, on_result: Callable[[StageResult], Any] | None) -> None:
        """Pick the deepest exit whose blocks 0..k + head k fit the remaining time; run only that.

        With an exit ensemble the answer needs heads 0..k as well: the cost is the
        anytime completion of exit k, and the stages run one after the other.
        """
        now = self.clock()
        chosen, predicted = None, math.nan
        cost_of = self._apriori_cost
        if report.deadline is None:
            chosen = cap - 1
            if self.timing.is_calibrated:
                predicted = cost_of(chosen)
        else:
            costs = [cost_of(k) for k in range(cap)]
            # Choose, then check again at the start: the process can lose the CPU in between (a late
            # a-priori answer on a loaded machine came from an 8 ms pause there, its exit within its p99).
            for now in (now, self.clock()):
                chosen = next((k for k in range(cap - 1, -1, -1)
                               if now < report.deadline and now + costs[k] <= report.deadline), None)
                if chosen is None:
                    break
                predicted = costs[chosen]
        if chosen is None:
            report.stop_reason = StopReason.NO_TIME
            return
        started = self.clock()
        if self.ensemble_weights is None:
            out = self._executor.wait(self._executor.launch_exit(chosen))
            self._record(out)
        else:
            out = self._run_ensemble_exit(chosen)
        if chosen == self.num_stages - 1:
            stop = StopReason.COMPLETE
        elif chosen == cap - 1 and cap < self.num_stages:
            stop = StopReason.MAX_STAGE
        else:
            stop = StopReason.DEADLINE
        self._emit(report, out, None, stop, predicted, started, chosen, on_result)

    def _apriori_cost(self, k: int) -> float:
        """Predicted a-priori cost of exit k at the admission quantile (with the host overhead per launch)."""
        q = self.admission_quantile
        if self.ensemble_weights is None:
            return self.timing.predict_exit_cost(k, q) + self.overhead_s
        # k + 1 stages, each one launch and one wait on CUDA, as in anytime.
        return self.timing.predict_ensemble_exit_cost(k, q) + (k + 1) * self.overhead_s

    def _run_ensemble_exit(self, k: int) -> StageOutput:
        """A-priori with an ensemble: stages 0..k (block + head each), one output for exit k.

        Uses the executors' per-stage ``launch`` (the anytime path, CPU and CUDA alike) rather than
        ``launch_exit``: every head's probabilities are needed, and each stage is recorded as in anytime.
        All stages are queued before the first wait, so on CUDA the device does not idle between them.
        The returned output holds exit k's own probabilities, every block and the heads' summed time
        (what RunReport.actual_s reports); the earlier exits' own answers are kept for the combination.
        """
        launch, wait = self._executor.launch, self._executor.wait
        handles = [launch(j) for j in range(k + 1)]
        blocks, head_s = [], 0.0
        out = None
        for handle in handles:
            out = wait(handle)
            self._record(out)
            blocks += out.block_s
            head_s += out.head_s
            if out.stage < k and self._log_needed[out.stage]:  # exit k's own answer is kept when its result is built
                self._own_log_probs[out.stage] = _own_log_probs(out.probs, self._ensemble_in_python)
        assert out is not None
        return StageOutput(k, out.probs, blocks, head_s, out.ready_time)

    def _answer(self, out: StageOutput) -> np.ndarray:
        """Exit ``out.stage``'s published probabilities: its own, or the ensemble of exits 0..stage.

        Keeps the exit's own log-probabilities for the later exits' combinations; the combination is
        one weighted sum over the (k, C) stack (impatient_ros.core.ensemble's rule, inlined: only row k
        is needed, not the triangle combine_probabilities computes).
        """
        k = out.stage
        own = self._own_log_probs
        if self._log_needed[k]:
            own[k] = _own_log_probs(out.probs, self._ensemble_in_python)
        support, weights = self._ensemble_terms[k]
        if not support:  # the row is exit k alone: its own answer, no per-exit numpy work
            return out.probs
        if self._ensemble_in_python:
            # Python floats (float64, as the core's rule): for a few classes each numpy call on a
            # (C,) array costs more in dispatch than its arithmetic, and this runs after every exit.
            z = [weights[0] * v for v in own[support[0]]]
            for w, j in zip(weights[1:], support[1:]):
                z = [a + w * b for a, b in zip(z, own[j])]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            total = sum(e)
            return np.array([v / total for v in e], dtype=np.float32)
        z = weights[0] * own[support[0]]
        for w, j in zip(weights[1:], support[1:]):
            z = z + w * own[j]
        z -= z.max()
        p = np.exp(z)
        return (p / p.sum()).astype(np.float32)

    # ------------------------------------------------------------------ helpers
    def _predict(self, k: int) -> float:
        """Predicted block + head time of stage k at the admission quantile; NaN without timings."""
        if self.timing.is_calibrated:
            return self.timing.predict_anytime_completion(k, self.admission_quantile) + self.overhead_s
        return math.nan

    @staticmethod
    def _fits(start: float, cost: float, deadline: float | None) -> bool:
        """Admission: a stage of predicted ``cost`` started at ``start`` ends by ``deadline`` (None: always)."""
        return deadline is None or (start < deadline and start + cost <= deadline)

    def _admit(self, k: int, start: float, deadline: float | None) -> float | None:
        """Predicted completion time of stage k if it fits between ``start`` and ``deadline``, else None.

        Without a deadline every stage fits; its prediction is NaN when the model has no timings.
        """
        if deadline is not None and start >= deadline:  # no stage takes zero time: no need to ask the model
            return None
        cost = self._predict(k)
        return cost if self._fits(start, cost, deadline) else None

    def _park(self) -> None:
        """Keep the executor's in-flight run's state in that run before another image uses the executor."""
        run = self._active_run
        if run is not None:
            if not run.done:
                run._saved = (self._executor.suspend(), self._own_log_probs)
            self._active_run = None

    def _activate(self, run: StagedRun) -> None:
        """Make ``run`` the executor's current image: start it, or resume it where it stopped."""
        if self._active_run is run:
            return
        self._park()
        if run._x is not None:  # its first stage
            self._start(run._x)
            run._x = None
        else:
            state, self._own_log_probs = run._saved
            run._saved = None
            self._executor.resume(state, run._k)
            # Other images ran since this one's last block: its blocks are no longer measured back to
            # back, so they add no path sample (the path quantile describes uninterrupted runs).
            self._path_next = -1
        self._active_run = run

    def _start(self, x: torch.Tensor) -> None:
        """Begin a run on input ``x``: the executor's state and the path sum of this run."""
        self._park()
        self._executor.start(x)
        self._path_next, self._path_s = 0, 0.0
        if self.ensemble_weights is not None:
            self._own_log_probs = [None] * self.num_stages

    def _record(self, out: StageOutput, force: bool = False) -> None:
        """Feed one exit's measurements into the timing model, stamped with its ready time."""
        if not (self.online_update or force):
            self._path_next = -1  # a gap in the measured path: no path sums for the rest of this run
            return
        record, at, stage, head_s = self.timing.record_run, out.ready_time, out.stage, out.head_s
        head_recorded = False
        for j, block_s in out.block_s:
            path_s = None
            if j == self._path_next:  # blocks 0..j of this run, measured back to back: one path sample
                self._path_s += block_s
                path_s = self._path_s
                self._path_next += 1
            else:
                self._path_next = -1
            if j == stage:  # the head ran right after this block: one sample of the stage's total
                record(j, block_s, head_s, block_s + head_s, path_s, at)
                head_recorded = True
            else:
                record(j, block_s, None, None, path_s, at)
        if not head_recorded:
            self.timing.record(stage, head_s=head_s, at=at)
        self._last_measured[stage] = at

    def _probe_refused_stages(self, report: RunReport) -> None:
        """Measure the refused stage and the stale deeper ones, within the duty cycle (starvation guard)."""
        if not (self.online_update and self.probe_interval_s > 0.0):
            return
        if report.stop_reason is StopReason.NO_TIME:
            first = 0
        elif report.stop_reason is StopReason.DEADLINE and report.mode is not Mode.APRIORI:
            first = report.stages_run  # the executor holds block first-1's output: stage first can run next
        else:
            return
        now = self.clock()
        if first >= self.num_stages or now < self._probe_free_at:
            return
        stale = [k for k in range(first, self.num_stages) if now - self._last_measured[k] >= self.probe_interval_s]
        if not stale:
            return
        # Deeper stages need the blocks before them: run first..deepest stale one, one after the other,
        # but go deeper only while the probes took less than this frame's budget (a spike's stage can
        # take far longer than predicted before the spike, and the next frame is due).
        budget = report.deadline - report.began_at
        probed = []
        for k in range(first, stale[-1] + 1):
            self._record(self._executor.wait(self._executor.launch(k)))
            probed.append(k)
            if self.clock() - now >= budget:
                break
        probed = tuple(probed)
        end = self.clock()
        self._probe_free_at = end + (end - now) * (1.0 - self.probe_duty) / self.probe_duty
        report.probed_stages = probed

    def _callback_estimate(self) -> float:
        """Seconds reserved for handing one answer over: the longest of the recent ``on_result`` calls."""
        return max(self._callback_s) if self._callback_s else 0.0

    def _result(self, out: StageOutput, began: float, stop: StopReason) -> StageResult:
        """The StageResult of one exit (ranked from its probabilities when first read, see stage_results).

        Called once per exit that is handed over, in stage order (the ensemble relies on it).
        """
        ensemble = self.ensemble_weights is not None
        return stage_result(out.stage + 1, self.num_stages, self._answer(out) if ensemble else out.probs,
                            out.ready_time, out.ready_time - began, stop, ensemble, self.top_k, self.class_names)

    def _emit(self, report: RunReport, out: StageOutput, result: StageResult | None, stop: StopReason,
              predicted: float, started: float, deepest: int,
              on_result: Callable[[StageResult], Any] | None) -> None:
        """Add the exit's StageResult (built here unless given, with ``stop``) to the report and hand it over."""
        if result is None:
            result = self._result(out, report.began_at, stop)
        elif stop is not StopReason.NONE:  # built before the stop decision (the cascade reads its ratio)
            result = made_final(result, stop)  # not handed over yet: nobody saw it as not final
        report.results.append(result)
        report.predicted_s.append(predicted)
        blocks = out.block_s
        report.actual_s.append(blocks[0][1] + out.head_s if len(blocks) == 1 else out.device_s)
        report.started_at.append(started)
        if deepest >= report.stages_run:
            report.stages_run = deepest + 1
        report.stop_reason = stop
        if on_result is not None:
            self._hand_over(result, on_result)

    def _hand_over(self, result: StageResult, on_result: Callable[[StageResult], Any] | None) -> None:
        """Call ``on_result``; its duration is kept, as admission reserves the recent maximum for it."""
        if on_result is not None:
            t0 = self.clock()
            on_result(result)
            self._callback_s.append(self.clock() - t0)

    def _repeat_final(self, report: RunReport, stop: StopReason) -> StageResult:
        """Add a final copy of the last result (handed over as not final) to the report and return it.

        No stage ran for it: its prediction is NaN and its measured time 0; its
        ready time stays the answer's own, so the overrun is that of the answer.
        """
        result = dataclasses.replace(report.results[-1], is_final=True, stop_reason=stop, repeated=True)
        report.results.append(result)
        report.predicted_s.append(math.nan)
        report.actual_s.append(0.0)
        report.started_at.append(self.clock())
        report.stop_reason = stop
        report.final_repeated = True
        return result

    def _final_after_error(self, report: RunReport, on_result: Callable[[StageResult], Any] | None) -> None:
        """A stage or ``on_result`` raised: if the last answer went out as not final, repeat it as final (ERROR).

        The caller re-raises the original error; an error from handing the copy
        over is dropped, so the first failure is the one reported.
        """
        if not report.results or report.results[-1].is_final:
            return
        result = self._repeat_final(report, StopReason.ERROR)
        if on_result is not None:
            with contextlib.suppress(Exception):
                on_result(result)

    def _stage_cap(self, max_stage: int | None) -> int:
        """Number of exits allowed (1..K) from a 1-based cap; None or 0 = no cap, larger than K = K."""
        if max_stage is None or max_stage == 0:
            return self.num_stages
        if not isinstance(max_stage, (int, np.integer)) or isinstance(max_stage, bool) or max_stage < 0:
            raise EngineError(f"max_stage must be an integer >= 0 (0 = no cap), got {max_stage!r}")
        return min(int(max_stage), self.num_stages)

    def _device_scope(self) -> contextlib.AbstractContextManager[Any]:
        """Make this engine's CUDA device current (streams and events belong to a device)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else _NO_SCOPE

    def _describe_device(self) -> str:
        """Calibration files are only valid for the same device, precision and execution mode."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"cuda:{name}|{'fp16' if self.fp16 else 'fp32'}|{'graphs' if self.cuda_graphs else 'eager'}"
        return f"cpu|fp32|threads={torch.get_num_threads()}"

    def __repr__(self) -> str:
        return (f"StagedEngine(device={self.device_label!r}, num_stages={self.num_stages}, "
                f"input_size={self.input_size}, admission_quantile={self.admission_quantile}, "
                f"calibrated={self.is_calibrated})")


# --------------------------------------------------------------------------- a run, step by step


class StagedRun:
    """One image's run, one stage per :meth:`step`: what :meth:`StagedEngine.run` does, resumable.

    Made by :meth:`StagedEngine.start_run`. Every step applies the engine's own
    rules (there is one code path: ``run`` takes these steps back to back):
    admission at the engine's quantile before the stage, the online timing
    update, the exit ensemble, the stop reasons and the one final answer
    (handed over through ``on_result``). Several runs of one engine may be in
    flight, stepped from one thread in any order: between its steps a run keeps
    its activation (on the CPU a reference, no copy; with CUDA graphs a device
    copy, as the static buffers belong to the next image) and its exits' answers
    for the ensemble. A run that waited for others is admitted on the clock at
    its next step: if its next stage no longer fits, that step ends it with its
    last exit handed over again as the final answer (stop reason DEADLINE), or
    with NO_TIME when no stage ran. The engine's starvation probe runs when a run
    ends, as after ``run``, unless ``quiet`` was cleared (a scheduler does while
    other images with deadlines are in flight). On CUDA, stepped runs wait for each exit before the
    next stage is queued (``run`` in anytime mode queues ahead instead).

    Modes: anytime and cascade step stage by stage; a-priori is one step (the
    deepest exit that fits, chosen when the step starts).
    """

    def __init__(self, engine: StagedEngine, x: torch.Tensor, report: RunReport, cap: int, threshold: float,
                 on_result: Callable[[StageResult], Any] | None) -> None:
        self._engine = engine
        self._x: torch.Tensor | None = x    # the input until the first step starts the executor on it
        self._saved: tuple[Any, list[np.ndarray | None]] | None = None  # while another run holds the executor
        self.report = report
        self._cap = cap
        self._threshold = threshold
        self._on_result = on_result
        self._k = 0                          # the next 0-based stage
        if report.mode is not Mode.APRIORI:
            self._predicted = engine._predict(0)
        else:  # the shallowest exit it could choose; a-priori without timings runs without a deadline
            self._predicted = engine._apriori_cost(0) if engine.timing.is_calibrated else math.nan
        self.done = False
        # Whether the starvation probe may run when this run ends. A scheduler clears it while other
        # images with deadlines are in flight: a probe burst (up to this frame's budget) would spend
        # their slack on measurements; the probe then waits for a run that ends with the engine quiet.
        self.quiet = True

    @property
    def deadline(self) -> float | None:
        """Engine-clock deadline of this image (None: unlimited)."""
        return self.report.deadline

    @property
    def next_stage(self) -> int | None:
        """The 0-based stage the next step runs (a-priori: its shallowest choice), None once done."""
        return None if self.done else self._k

    @property
    def next_cost(self) -> float:
        """Predicted seconds of the next stage at the admission quantile (NaN without timings)."""
        return self._predicted

    @property
    def step_cost(self) -> float:
        """Predicted seconds until the next stage's answer has been handed over: :attr:`next_cost` plus
        the recent maximum duration of ``on_result`` (what a scheduler waits for before it chooses again)."""
        if self._on_result is None:
            return self._predicted
        return self._predicted + self._engine._callback_estimate()

    @property
    def answered(self) -> bool:
        """Whether an exit's answer has been handed over (the scheduler serves first answers first)."""
        return bool(self.report.results)

    def fits(self, now: float) -> bool:
        """Whether the next stage, started at ``now``, is predicted to end by the deadline (the admission rule)."""
        return not self.done and self._engine._fits(now, self._predicted, self.report.deadline)

    def step(self) -> bool:
        """Run the next stage (or end the run when it no longer fits); True while more steps may follow."""
        engine = self._engine
        pause_gc = not engine.gc_during_run and gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            with engine._device_scope(), _inference_mode():
                return self._step()
        finally:
            if pause_gc:
                gc.enable()

    def expire(self) -> None:
        """End the run now, its last exit as the final answer (or NO_TIME when none ran): no time is left."""
        if self.done:
            return
        engine = self._engine
        with engine._device_scope(), _inference_mode():
            engine._activate(self)  # the probe after the run needs this image's activation
            self._stop_before_next()
            self._end()

    def _stop_before_next(self) -> None:
        report = self.report
        if not report.results:
            report.stop_reason = StopReason.NO_TIME
        else:  # exit k-1 went out as not final: hand it over again as the final answer
            self._engine._hand_over(self._engine._repeat_final(report, StopReason.DEADLINE), self._on_result)

    def _end(self) -> None:
        self.done = True
        if self.quiet:
            self._engine._probe_refused_stages(self.report)
        _close_report(self.report)

    def _step(self) -> bool:
        if self.done:
            raise EngineError("this run has ended; start another one")
        engine, report, on_result = self._engine, self.report, self._on_result
        clock, deadline = engine.clock, report.deadline
        try:
            engine._activate(self)
            if report.mode is Mode.APRIORI:
                engine._run_apriori(report, self._cap, on_result)
                self._end()
                return False
            k, predicted = self._k, self._predicted
            # Admission now: right after the previous stage when stepped back to back (run()), or
            # after other images' stages when a scheduler interleaves them.
            if not engine._fits(clock(), predicted, deadline):
                self._stop_before_next()
                self._end()
                return False
            started = clock()
            out = engine._executor.wait(engine._executor.launch(k))
            engine._record(out)
            # The cascade needs the ratio now: build the result first (the stop reason is set below).
            result = (engine._result(out, report.began_at, StopReason.NONE)
                      if self._threshold < math.inf else None)
            next_predicted = math.nan
            if k == engine.num_stages - 1:
                stop = StopReason.COMPLETE
            elif result is not None and result.ratio_1v2 >= self._threshold:
                stop = StopReason.CONFIDENT
            elif k + 1 >= self._cap:
                stop = StopReason.MAX_STAGE
            else:
                # The callback runs before the next stage: reserve its recent maximum duration.
                next_predicted = engine._predict(k + 1)
                fits = engine._fits(clock() + engine._callback_estimate(), next_predicted, deadline)
                stop = StopReason.NONE if fits else StopReason.DEADLINE
            engine._emit(report, out, result, stop, predicted, started, k, on_result)
            if stop is not StopReason.NONE:
                self._end()
                return False
            self._k, self._predicted = k + 1, next_predicted
            return True
        except Exception:
            self.done, self._x, self._saved = True, None, None
            engine._final_after_error(report, on_result)
            raise


def _close_report(report: RunReport) -> None:
    """Fill in the overrun of the final answer (after the run's last step)."""
    if report.deadline is not None and report.results:
        report.overrun_s = max(0.0, report.results[-1].ready_time - report.deadline)
        report.overran = report.overrun_s > 0.0


_NO_SCOPE = contextlib.nullcontext()


def _inference_mode() -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode()``, or nothing when the caller already runs in it (benchmarks, the node)."""
    return _NO_SCOPE if torch.is_inference_mode_enabled() else torch.inference_mode()
