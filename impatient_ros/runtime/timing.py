"""Per-stage latency model of a staged network: sliding windows, quantiles, calibration file.

The staged engine decides before every stage whether that stage can still finish
before the deadline. It needs, per stage, the time of the backbone block and the
time of the early-prediction (EP) head, as a high quantile rather than a mean, so
that a deadline is rarely overrun. Those times drift (GPU clocks, thermal
throttling, other processes on the CPU), so the model keeps a sliding window of
the most recent measurements per stage and part and every engine run feeds it.

Stages are 0-based in this API (as in the model contract) and 1-based in the
calibration file (as in the ROS messages).

The calibration file (JSON, "impatient_ros.timing" version 1) is read, validated
and written by :mod:`impatient_ros.core.calibration`, the one owner of that format
(training and evaluation read it there too); its raw sample lists are what
:meth:`TimingModel.load` restores. Ready times for reports and Eq. 5 come from
:mod:`impatient_ros.core.ready_times`, not from this model's admission quantiles.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from impatient_ros.core.calibration import (
    FORMAT,
    VERSION,
    Calibration,
    CalibrationError,
    StageTiming,
    parse_calibration,
    read_calibration,
    write_calibration,
)
from impatient_ros.core.quantiles import sorted_quantile

__all__ = ["FORMAT", "VERSION", "TimingError", "TimingModel", "latency_quantile", "tail_quantile"]


class TimingError(ValueError):
    """Raised for missing timings (calibrate first) or a bad/mismatched calibration file.

    Calibration-file problems are the core reader's CalibrationError, re-raised as this type
    with the same message.
    """


# Quantiles above p99 (an admission_quantile of 0.999, say) are extrapolated, not read off the window.
# Of 256 samples only two or three lie above the p99, so the empirical p99.9 is about the window's
# maximum: one slow sample (a preemption) then refuses the stage until it leaves the window, and the
# engine answered 26.6 % of the frames at p99.9 against 65.1 % at p99 (bench/results/engine_cpu.md).
# Latency tails of a CPU stage fall off about exponentially, and under an exponential tail every
# tenfold rarer quantile lies the same distance further out: p99.9 = p99 + (p99 - p90). The two
# quantiles it rests on each have 25 and 2.5 samples beyond them, so no single sample moves it much.
TAIL_BASE, TAIL_FROM = 0.90, 0.99


def tail_quantile(p90: float, p99: float, q: float) -> float:
    """Quantile ``q`` (p99 < q < 1) of an exponential tail through ``p90`` and ``p99``."""
    return p99 + (p99 - p90) * math.log10((1.0 - TAIL_FROM) / (1.0 - q))


def _sorted_latency_quantile(ordered: Sequence[float], q: float, n: int) -> float:
    """The model's rule on the first ``n`` values of ``ordered`` (ascending): numpy's up to p99 and at 1.0, else the tail."""
    if q <= TAIL_FROM or q >= 1.0:
        return sorted_quantile(ordered, q, n)
    return tail_quantile(sorted_quantile(ordered, TAIL_BASE, n), sorted_quantile(ordered, TAIL_FROM, n), q)


def latency_quantile(values: Sequence[float], q: float) -> float:
    """Quantile ``q`` of latency samples by the model's rule: numpy's up to p99 and at 1.0, the tail fit between."""
    ordered = sorted(values)
    return _sorted_latency_quantile(ordered, q, len(ordered))


class _Window:
    """The latest ``size`` samples in arrival order with their times, the same samples sorted, and a recent peak.

    The engine asks for quantiles before every stage and records after every
    stage, so a quantile must be cheap right after an update: with a sorted copy
    it is an O(log n) lookup (numpy's "linear" interpolation) instead of a sort.
    ``peaks`` holds (serial, time, value) with decreasing values (a monotonic
    queue): its front is the largest *recent* sample in amortised O(1), which the
    ageing rule of :class:`TimingModel` compares old samples against.

    Adding only appends to ``pending``; the sorted copy and the peaks take the
    pending samples in when the window is next read. A window read after every
    sample (the stage sums the admission asks for) pays one sorted insertion per
    sample; one read rarely (the parts, in anytime mode) is rebuilt by one sort
    when read with a quarter of its size pending, and at the latest when a full
    window's worth is pending (so what waits stays bounded), O(log n) per sample.
    So recording after every exit costs a few appends.
    """

    __slots__ = ("size", "recent", "times", "ordered", "peaks", "serial", "pending")

    def __init__(self, size: int) -> None:
        self.size = size
        self.recent: deque[float] = deque(maxlen=size)
        self.times: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []
        self.peaks: deque[tuple[int, float, float]] = deque()
        self.serial = 0  # samples ever taken in (pending ones not yet)
        self.pending: list[tuple[float, float]] = []

    def add(self, value: float, at: float) -> None:
        pending = self.pending
        pending.append((value, at))
        if len(pending) >= self.size:  # a window nobody reads: keep what waits bounded
            self._sync()

    def _sync(self) -> None:
        """Take the pending samples into the window, the sorted copy and the peaks."""
        pending = self.pending
        if not pending:
            return
        recent, times, peaks, ordered = self.recent, self.times, self.peaks, self.ordered
        if len(pending) * 4 >= self.size:  # many at once: append all, sort once
            for value, at in pending:
                recent.append(value)
                times.append(at)
            self.serial += len(pending)
            ordered[:] = sorted(recent)
            peaks.clear()
            first = self.serial - len(recent)
            for i, (value, at) in enumerate(zip(recent, times)):
                while peaks and peaks[-1][2] <= value:
                    peaks.pop()
                peaks.append((first + i, at, value))
        else:
            for value, at in pending:
                if len(recent) == self.size:  # the oldest sample leaves the window
                    del ordered[bisect_left(ordered, recent[0])]
                recent.append(value)
                times.append(at)
                insort(ordered, value)
                while peaks and peaks[-1][2] <= value:
                    peaks.pop()
                peaks.append((self.serial, at, value))
                self.serial += 1
        pending.clear()

    def recent_peak(self, now: float, recent_s: float, min_recent: int) -> float:
        """Largest sample of the last ``recent_s`` seconds, or of the newest ``min_recent`` if that is more."""
        if self.pending:
            self._sync()
        peaks = self.peaks
        keep_from = self.serial - min_recent      # the newest min_recent samples always count as recent
        in_window = self.serial - len(self.recent)
        horizon = now - recent_s
        while len(peaks) > 1 and (peaks[0][0] < in_window or (peaks[0][1] < horizon and peaks[0][0] < keep_from)):
            peaks.popleft()
        return peaks[0][2]

    def quantile(self, q: float, limit: float = math.inf) -> float:
        """Quantile ``q`` of the samples <= ``limit`` (all of them by default); above p99 see TAIL_FROM."""
        if self.pending:
            self._sync()
        ordered = self.ordered
        n = len(ordered)
        if limit < ordered[-1]:
            n = max(1, bisect_right(ordered, limit))
        return _sorted_latency_quantile(ordered, q, n)

    def mean(self) -> float:
        self._sync()
        return math.fsum(self.recent) / len(self.recent)

    def restamp(self, at: float) -> None:
        """Every sample measured at ``at`` (samples from a file, or from another clock)."""
        self._sync()
        values = list(self.recent)
        self.clear()
        for value in values:
            self.add(value, at)

    def clear(self) -> None:
        self.recent.clear()
        self.times.clear()
        self.ordered.clear()
        self.peaks.clear()
        self.pending.clear()

    def __len__(self) -> int:
        if self.pending:
            self._sync()
        return len(self.recent)

    def __bool__(self) -> bool:
        return bool(self.recent) or bool(self.pending)

    def __iter__(self) -> Iterator[float]:
        self._sync()
        return iter(self.recent)


class TimingModel:
    """Sliding windows of block and head latencies (seconds) for each stage, with an ageing rule.

    Besides the parts, the model keeps windows of two sums measured within one
    run: a stage's block + head (the anytime cost of that stage) and the blocks
    0..k of one run (the a-priori path to exit k). A quantile of such a window is
    the quantile of the sum itself, so it keeps the parts' correlation: on a
    loaded CPU consecutive blocks slow down together, and independent jitter
    averages out along a path. Adding per-part quantiles instead over-estimated
    the p99 of the 4-block path by 22-34 %. Until a sum window holds
    ``min_sum_samples`` samples the prediction falls back to the sum of the
    parts' quantiles: conservative for latencies (it equals the quantile of the
    sum when the parts slow down together and over-estimates it otherwise,
    though quantiles are not subadditive for every distribution). Parts may be
    measured a different number of times: the a-priori mode runs blocks whose
    heads it skips. ``bench/bench_engine.py`` measures the p99 prediction error.

    Ageing rule (following load both ways). Every sample carries the time it was
    measured (``clock``, the engine's clock). A sample is *recent* when it is
    younger than ``recent_s`` or among the newest ``min_recent`` of its window.
    A quantile counts every recent sample and every older one that is at most
    ``outlier_factor`` times the largest recent sample; older, larger samples no
    longer count (they stay in the window and count again if the load comes
    back). So when the load rises, its slow samples count at once (the p99
    follows up within a few samples); when a spike ends, its samples stop
    counting ``recent_s`` after it, as soon as ``min_recent`` quiet samples were
    measured; and under a steady load nothing changes: the full window (256
    samples) holds the p99, since an old sample more than twice the recent
    maximum is itself far beyond the p99 of a stationary distribution. A smaller
    slow-down than ``outlier_factor`` leaves through the window (count-based), so
    the model over-estimates for a while rather than under-estimates.
    """

    def __init__(
        self,
        num_stages: int,
        window: int = 256,
        *,
        device: str = "unknown",
        input_size: tuple[int, int] | None = None,
        min_sum_samples: int = 20,
        recent_s: float = 0.5,
        min_recent: int = 8,
        outlier_factor: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_stages < 1:
            raise TimingError(f"num_stages must be >= 1, got {num_stages}")
        if window < 1:
            raise TimingError(f"window must be >= 1, got {window}")
        if not recent_s > 0.0 or min_recent < 1 or not outlier_factor >= 1.0:
            raise TimingError(f"need recent_s > 0, min_recent >= 1 and outlier_factor >= 1, got {recent_s}, "
                              f"{min_recent} and {outlier_factor}")
        self.num_stages = int(num_stages)
        self.window = int(window)
        self.device = str(device)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.min_sum_samples = max(1, int(min_sum_samples))
        self.recent_s = float(recent_s)
        self.min_recent = min(int(min_recent), self.window)
        self.outlier_factor = float(outlier_factor)
        self.clock = clock
        self._block = [_Window(self.window) for _ in range(self.num_stages)]
        self._head = [_Window(self.window) for _ in range(self.num_stages)]
        self._stage = [_Window(self.window) for _ in range(self.num_stages)]  # block k + head k, one run
        self._path = [_Window(self.window) for _ in range(self.num_stages)]  # blocks 0..k, one run
        self._windows = {"block": self._block, "head": self._head, "stage": self._stage, "path": self._path}
        self._complete = False  # every stage has block and head samples (is_calibrated)

    # ------------------------------------------------------------------ updates
    def record(self, stage: int, block_s: float | None = None, head_s: float | None = None, *,
               at: float | None = None) -> None:
        """Add one measurement of stage ``stage`` (0-based): block and/or head time in seconds.

        Either part may be ``None`` (the a-priori mode runs blocks whose head it skips).
        ``at`` is when it was measured (default: now on ``clock``). The oldest
        sample of a full window is dropped; see the class note for how old ones age.
        """
        self._check_stage(stage)
        at = self.clock() if at is None else float(at)
        self._add("block", stage, block_s, at)
        self._add("head", stage, head_s, at)

    def record_sums(self, stage: int, *, stage_s: float | None = None, path_s: float | None = None,
                    at: float | None = None) -> None:
        """Add sums measured within one run: block + head of ``stage``, and/or blocks 0..``stage``."""
        self._check_stage(stage)
        at = self.clock() if at is None else float(at)
        self._add("stage", stage, stage_s, at)
        self._add("path", stage, path_s, at)

    def record_run(self, stage: int, block_s: float, head_s: float | None, stage_s: float | None,
                   path_s: float | None, at: float) -> None:
        """The engine's per-exit update in one call: every window of ``stage`` measured at ``at``.

        Same checks as :meth:`record`, with one call per exit instead of four
        (the engine updates the model after every stage).
        """
        if not 0 <= stage < self.num_stages:
            self._check_stage(stage)
        if not 0.0 <= block_s < math.inf:  # also rejects NaN
            raise TimingError(f"block time of stage {stage} must be a finite number >= 0 s, got {block_s!r}")
        self._block[stage].add(float(block_s), at)
        if head_s is not None:
            if not 0.0 <= head_s < math.inf:
                self._add("head", stage, head_s, at)  # raises the usual error
            self._head[stage].add(float(head_s), at)
        if stage_s is not None:
            if not 0.0 <= stage_s < math.inf:
                self._add("stage", stage, stage_s, at)
            self._stage[stage].add(float(stage_s), at)
        if path_s is not None:
            if not 0.0 <= path_s < math.inf:
                self._add("path", stage, path_s, at)
            self._path[stage].add(float(path_s), at)

    def _add(self, part: str, stage: int, value: float | None, at: float) -> None:
        """One sample (seconds) into the ``part`` window of ``stage``; None adds nothing."""
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value) or value < 0.0:
            raise TimingError(f"{part} time of stage {stage} must be a finite number >= 0 s, got {value!r}")
        self._windows[part][stage].add(value, at)

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Measure sample ages on ``clock`` from now on; the samples held count as measured now.

        Their times on the previous clock mean nothing on the new one (the engine
        adopts a model built elsewhere, or one loaded from a file).
        """
        if clock is self.clock:
            return
        self.clock = clock
        now = clock()
        for store in (*self._block, *self._head, *self._stage, *self._path):
            store.restamp(now)

    def reset(self) -> None:
        """Forget every sample (e.g. before re-calibrating on a changed device)."""
        for store in (*self._block, *self._head, *self._stage, *self._path):
            store.clear()
        self._complete = False

    # ------------------------------------------------------------------ queries
    @property
    def is_calibrated(self) -> bool:
        """True once every stage has at least one block and one head sample."""
        if not self._complete:  # windows only lose every sample through reset(): remember a True
            self._complete = all(self._block) and all(self._head)
        return self._complete

    def sample_counts(self, stage: int) -> tuple[int, int]:
        """(block samples, head samples) currently in the window of ``stage``."""
        self._check_stage(stage)
        return len(self._block[stage]), len(self._head[stage])

    def block_samples(self, stage: int) -> list[float]:
        """Copy of the block samples (seconds) of ``stage``, oldest first."""
        self._check_stage(stage)
        return list(self._block[stage])

    def head_samples(self, stage: int) -> list[float]:
        """Copy of the head samples (seconds) of ``stage``, oldest first."""
        self._check_stage(stage)
        return list(self._head[stage])

    def block_cost(self, stage: int, q: float = 0.99) -> float:
        """Quantile ``q`` of the block time of ``stage`` in seconds."""
        return self._quantile("block", stage, q)

    def head_cost(self, stage: int, q: float = 0.99) -> float:
        """Quantile ``q`` of the head time of ``stage`` in seconds."""
        return self._quantile("head", stage, q)

    def stage_cost(self, stage: int, q: float = 0.99) -> float:
        """Block + head of ``stage`` at quantile ``q`` in seconds (see the class note on sums)."""
        self._check_q(q)
        joint = self._stage[stage] if 0 <= stage < self.num_stages else None
        if joint is not None and len(joint) >= self.min_sum_samples:
            return self._aged(joint, q)
        return self.block_cost(stage, q) + self.head_cost(stage, q)

    def predict_anytime_completion(self, stage: int, q: float = 0.99) -> float:
        """Time from now until exit ``stage`` is ready when the previous stage just finished.

        The anytime and cascade modes run block and head of each stage in turn,
        so this is block + head of that stage at quantile ``q``. (The engine asks
        before every stage: this is :meth:`stage_cost` with its checks done once.)
        """
        joint = self._stage[stage] if 0 <= stage < self.num_stages else None
        if (joint is not None and 0.0 <= q <= 1.0
                and min(len(joint.recent) + len(joint.pending), self.window) >= self.min_sum_samples):
            return self._aged(joint, q)
        return self.stage_cost(stage, q)

    def predict_exit_cost(self, stage: int, q: float = 0.99) -> float:
        """A-priori cost of exit ``stage``: blocks 0..stage plus only head ``stage``, at quantile ``q``.

        The path's own quantile (blocks 0..stage measured in one run) plus the
        head's, once the path window is full enough; before that the sum of every
        part's quantile (see the class note).
        """
        self._check_stage(stage)
        self._check_q(q)
        path = self._path[stage]
        if len(path) >= self.min_sum_samples:
            return self._aged(path, q) + self.head_cost(stage, q)
        return sum(self.block_cost(j, q) for j in range(stage + 1)) + self.head_cost(stage, q)

    def predict_ensemble_exit_cost(self, stage: int, q: float = 0.99) -> float:
        """A-priori cost of exit ``stage`` with an exit ensemble: blocks 0..stage plus heads 0..stage.

        The ensemble's answer at exit k needs every exit up to k, so this is the
        anytime completion of exit k counted from the start: the sum of
        :meth:`predict_anytime_completion` over stages 0..stage (a sum of
        quantiles, so as conservative as the a-priori fallback above).
        """
        self._check_stage(stage)
        self._check_q(q)
        return sum(self.predict_anytime_completion(j, q) for j in range(stage + 1))

    def summary(self) -> list[dict[str, float | int]]:
        """Per stage (1-based): mean, p50, p90, p99 of block + head in ms, and sample counts."""
        rows = []
        for k in range(self.num_stages):
            block, head = self._block[k], self._head[k]
            row: dict[str, float | int] = {
                "stage": k + 1,
                "samples": min(len(block), len(head)),
                "block_samples": len(block),
                "head_samples": len(head),
            }
            if block and head:
                row["mean_ms"] = 1e3 * (block.mean() + head.mean())
                for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
                    row[name] = 1e3 * self.stage_cost(k, q)
            else:
                for name in ("mean_ms", "p50_ms", "p90_ms", "p99_ms"):
                    row[name] = math.nan
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ file I/O
    def to_calibration(self) -> Calibration:
        """The calibration document of this model (impatient_ros.core.calibration)."""
        if not self.is_calibrated:
            raise TimingError("cannot save an uncalibrated timing model: every stage needs block and head samples "
                              "(run StagedEngine.calibrate() first)")
        stages = []
        for k, row in enumerate(self.summary()):
            summary = {key: row[key] for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "samples")}
            summary["block_mean_ms"] = 1e3 * self._block[k].mean()
            summary["head_mean_ms"] = 1e3 * self._head[k].mean()
            stages.append(StageTiming(
                stage=k + 1,
                block_ms=tuple(1e3 * v for v in self._block[k]),
                head_ms=tuple(1e3 * v for v in self._head[k]),
                stage_ms=tuple(1e3 * v for v in self._stage[k]),
                path_ms=tuple(1e3 * v for v in self._path[k]),
                summary=summary,
            ))
        return Calibration(tuple(stages), device=self.device, input_size=self.input_size, source="timing model")

    def to_dict(self) -> dict[str, Any]:
        """The calibration file content (see impatient_ros.core.calibration)."""
        return self.to_calibration().to_dict()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration file atomically (impatient_ros.core.atomic) and return its path."""
        return write_calibration(path, self.to_calibration())

    @classmethod
    def from_calibration(cls, calibration: Calibration, *, window: int = 256) -> TimingModel:
        """A model holding the latest ``window`` samples of every window of a validated calibration."""
        if not calibration.has_samples:
            raise TimingError(f"{calibration.source} has no block and head samples to rebuild a timing model from; "
                              "re-run the calibration")
        model = cls(calibration.num_stages, window=window, device=calibration.device,
                    input_size=calibration.input_size)
        now = model.clock()  # a file has no measurement times: its samples count as measured now
        for k, stage in enumerate(calibration.stages):
            for part, values in (("block", stage.block_ms), ("head", stage.head_ms),
                                 ("stage", stage.stage_ms), ("path", stage.path_ms)):
                for value in values[-window:]:
                    model._add(part, k, value / 1e3, now)
        return model

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        num_stages: int | None = None,
        device: str | None = None,
        input_size: tuple[int, int] | None = None,
        window: int = 256,
        source: str = "calibration data",
    ) -> TimingModel:
        """Rebuild a model from :meth:`to_dict` output, checking it against the expected network.

        ``num_stages``, ``device`` and ``input_size``, when given, must match the
        file; latencies measured on another device or input size would make the
        admission decisions wrong, so a mismatch is an error, not a warning.
        """
        try:
            calibration = parse_calibration(data, source=source, require_samples=True)
            calibration.check(num_stages=num_stages, device=device, input_size=input_size)
        except CalibrationError as exc:
            raise TimingError(str(exc)) from None
        return cls.from_calibration(calibration, window=window)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        num_stages: int | None = None,
        device: str | None = None,
        input_size: tuple[int, int] | None = None,
        window: int = 256,
    ) -> TimingModel:
        """Read a calibration file written by :meth:`save` (see :meth:`from_dict` for the checks)."""
        try:
            calibration = read_calibration(path, require_samples=True)
            calibration.check(num_stages=num_stages, device=device, input_size=input_size)
        except CalibrationError as exc:
            raise TimingError(str(exc)) from None
        return cls.from_calibration(calibration, window=window)

    # ------------------------------------------------------------------ helpers
    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise TimingError(f"stage {stage} is out of range: this model has stages 0..{self.num_stages - 1}")

    @staticmethod
    def _check_q(q: float) -> None:
        if not 0.0 <= q <= 1.0:
            raise TimingError(f"quantile must lie in [0, 1], got {q}")

    def _quantile(self, part: str, stage: int, q: float) -> float:
        self._check_stage(stage)
        self._check_q(q)
        samples = (self._block if part == "block" else self._head)[stage]
        if not samples:
            raise TimingError(f"no {part} timing for stage {stage + 1} yet: calibrate the engine "
                              "(StagedEngine.calibrate()) or load a calibration file before running under a deadline")
        return self._aged(samples, q)

    def _aged(self, samples: _Window, q: float) -> float:
        """Quantile ``q`` of the samples that count now under the ageing rule (class note)."""
        if samples.pending:
            samples._sync()
        peak = samples.recent_peak(self.clock(), self.recent_s, self.min_recent)
        return samples.quantile(q, self.outlier_factor * peak)

    def __repr__(self) -> str:
        counts = [min(len(b), len(h)) for b, h in zip(self._block, self._head)]
        return f"TimingModel(num_stages={self.num_stages}, window={self.window}, device={self.device!r}, samples={counts})"
