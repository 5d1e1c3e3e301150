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
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterator
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

__all__ = ["FORMAT", "VERSION", "TimingError", "TimingModel"]


class TimingError(ValueError):
    """Raised for missing timings (calibrate first) or a bad/mismatched calibration file.

    Calibration-file problems are the core reader's CalibrationError, re-raised as this type
    with the same message.
    """


class _Window:
    """The latest ``size`` samples in arrival order, and the same samples kept sorted.

    The engine asks for quantiles before every stage and records after every
    stage, so a quantile must be cheap right after an update: with a sorted copy
    it is an O(1) lookup (numpy's "linear" interpolation) instead of a sort.
    """

    __slots__ = ("recent", "ordered")

    def __init__(self, size: int) -> None:
        self.recent: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        if len(self.recent) == self.recent.maxlen:  # the oldest sample leaves the window
            del self.ordered[bisect_left(self.ordered, self.recent[0])]
        self.recent.append(value)
        insort(self.ordered, value)

    def quantile(self, q: float) -> float:
        position = q * (len(self.ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(self.ordered) - 1)
        return self.ordered[low] + (position - low) * (self.ordered[high] - self.ordered[low])

    def mean(self) -> float:
        return math.fsum(self.recent) / len(self.recent)

    def clear(self) -> None:
        self.recent.clear()
        self.ordered.clear()

    def __len__(self) -> int:
        return len(self.recent)

    def __iter__(self) -> Iterator[float]:
        return iter(self.recent)


class TimingModel:
    """Sliding windows of block and head latencies (seconds) for each stage.

    Besides the parts, the model keeps windows of two sums measured within one
    run: a stage's block + head (the anytime cost of that stage) and the blocks
    0..k of one run (the a-priori path to exit k). A quantile of such a window is
    the quantile of the sum itself, so it keeps the parts' correlation: on a
    loaded CPU consecutive blocks slow down together, and independent jitter
    averages out along a path. Adding per-part quantiles instead over-estimated
    the p99 of the 4-block path by 22-34 % here. Until a sum window holds
    ``min_sum_samples`` samples the prediction falls back to the sum of the
    parts' quantiles: conservative for latencies (it equals the quantile of the
    sum when the parts slow down together and over-estimates it otherwise,
    though quantiles are not subadditive for every distribution). Parts may be
    measured a different number of times: the a-priori mode runs blocks whose
    heads it skips. ``bench/bench_engine.py`` measures the p99 prediction error.
    """

    def __init__(
        self,
        num_stages: int,
        window: int = 256,
        *,
        device: str = "unknown",
        input_size: tuple[int, int] | None = None,
        min_sum_samples: int = 20,
    ) -> None:
        if num_stages < 1:
            raise TimingError(f"num_stages must be >= 1, got {num_stages}")
        if window < 1:
            raise TimingError(f"window must be >= 1, got {window}")
        self.num_stages = int(num_stages)
        self.window = int(window)
        self.device = str(device)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.min_sum_samples = max(1, int(min_sum_samples))
        self._block = [_Window(self.window) for _ in range(self.num_stages)]
        self._head = [_Window(self.window) for _ in range(self.num_stages)]
        self._stage = [_Window(self.window) for _ in range(self.num_stages)]  # block k + head k, one run
        self._path = [_Window(self.window) for _ in range(self.num_stages)]  # blocks 0..k, one run
        self._windows = {"block": self._block, "head": self._head, "stage": self._stage, "path": self._path}

    # ------------------------------------------------------------------ updates
    def record(self, stage: int, block_s: float | None = None, head_s: float | None = None) -> None:
        """Add one measurement of stage ``stage`` (0-based): block and/or head time in seconds.

        Either part may be ``None`` (the a-priori mode runs blocks whose head it skips).
        The oldest sample of a full window is dropped, so the model follows drift.
        """
        self._check_stage(stage)
        self._add("block", stage, block_s)
        self._add("head", stage, head_s)

    def record_sums(self, stage: int, *, stage_s: float | None = None, path_s: float | None = None) -> None:
        """Add sums measured within one run: block + head of ``stage``, and/or blocks 0..``stage``."""
        self._check_stage(stage)
        self._add("stage", stage, stage_s)
        self._add("path", stage, path_s)

    def _add(self, part: str, stage: int, value: float | None) -> None:
        """One sample (seconds) into the ``part`` window of ``stage``; None adds nothing."""
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value) or value < 0.0:
            raise TimingError(f"{part} time of stage {stage} must be a finite number >= 0 s, got {value!r}")
        self._windows[part][stage].add(value)

    def reset(self) -> None:
        """Forget every sample (e.g. before re-calibrating on a changed device)."""
        for store in (*self._block, *self._head, *self._stage, *self._path):
            store.clear()

    # ------------------------------------------------------------------ queries
    @property
    def is_calibrated(self) -> bool:
        """True once every stage has at least one block and one head sample."""
        return all(self._block) and all(self._head)

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
            return joint.quantile(q)
        return self.block_cost(stage, q) + self.head_cost(stage, q)

    def predict_anytime_completion(self, stage: int, q: float = 0.99) -> float:
        """Time from now until exit ``stage`` is ready when the previous stage just finished.

        The anytime and cascade modes run block and head of each stage in turn,
        so this is block + head of that stage at quantile ``q``.
        """
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
            return path.quantile(q) + self.head_cost(stage, q)
        return sum(self.block_cost(j, q) for j in range(stage + 1)) + self.head_cost(stage, q)

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
        for k, stage in enumerate(calibration.stages):
            for part, values in (("block", stage.block_ms), ("head", stage.head_ms),
                                 ("stage", stage.stage_ms), ("path", stage.path_ms)):
                for value in values[-window:]:
                    model._add(part, k, value / 1e3)
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
        return samples.quantile(q)

    def __repr__(self) -> str:
        counts = [min(len(b), len(h)) for b, h in zip(self._block, self._head)]
        return f"TimingModel(num_stages={self.num_stages}, window={self.window}, device={self.device!r}, samples={counts})"
