"""The timing-calibration file ("impatient_ros.timing", version 1): its one reader and writer.

The staged engine measures every stage's block and head
(``StagedEngine.calibrate``) and saves its timing model as this JSON document;
the node writes one at start-up, training reads its ready times for Eq. 5 and
evaluation its stage costs. Layout (stages are 1-based, times in ms)::

    {"format": "impatient_ros.timing", "version": 1,
     "device": "cpu|fp32|threads=1", "input_size": [H, W],
     "stages": [{"stage": 1, "mean_ms": .., "p50_ms": .., "p90_ms": .., "p99_ms": .., "samples": n,
                 "block_mean_ms": .., "head_mean_ms": ..,
                 "block_samples_ms": [...], "head_samples_ms": [...],
                 "stage_samples_ms": [...], "path_samples_ms": [...]}, ...]}

* ``block_samples_ms`` / ``head_samples_ms``: the raw measurements of the two
  parts, what a timing model is rebuilt from and what ready times are computed
  from (:mod:`impatient_ros.core.ready_times`: one statistic per part, summed).
* ``stage_samples_ms`` / ``path_samples_ms`` (optional, absent in older files):
  sums measured within one run, block + head of the stage and blocks 1..k.
* ``mean_ms``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``samples``,
  ``block_mean_ms``, ``head_mean_ms``: a summary of block + head of that stage
  alone, for people and for hand-written files; a file without samples gives
  its ready times as the cumulative sum of one of ``mean_ms``/``p50_ms``/``p99_ms``.

Stage entries are identified by their ``"stage"`` number (1..K, no gaps, no
duplicates), not by their position in the list. ``device`` and ``input_size``
say what the numbers were measured on; :meth:`Calibration.check` refuses a file
measured for another network, device or input size.

Errors are :class:`CalibrationError` (a ValueError); the timing model wraps them
in its ``TimingError`` and the budget code in its ``BudgetError``. Pure
standard library + numpy: no torch, no rclpy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .ready_times import DEFAULT_STATISTIC, ReadyTimeError, anytime_ready_times, apriori_ready_times, summarise

__all__ = [
    "DEFAULT_KEY",
    "FORMAT",
    "KEY_STATISTICS",
    "READY_TIME_KEYS",
    "VERSION",
    "Calibration",
    "CalibrationError",
    "StageTiming",
    "load_json",
    "parse_calibration",
    "read_calibration",
    "write_calibration",
]

FORMAT = "impatient_ros.timing"
VERSION = 1

# The per-stage statistics a ready time can be built from, by their summary key.
KEY_STATISTICS: dict[str, str] = {"mean_ms": "mean", "p50_ms": "median", "p99_ms": "p99"}
READY_TIME_KEYS: tuple[str, ...] = tuple(KEY_STATISTICS)
DEFAULT_KEY = next(k for k, s in KEY_STATISTICS.items() if s == DEFAULT_STATISTIC)  # "p50_ms"

_SUMMARY_MS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "block_mean_ms", "head_mean_ms")
_SAMPLE_KEYS = ("block_samples_ms", "head_samples_ms", "stage_samples_ms", "path_samples_ms")


class CalibrationError(ValueError):
    """A missing, unreadable, malformed or mismatched calibration; the message says what to do."""


@dataclass(frozen=True)
class StageTiming:
    """One stage's entry: its 1-based number, the sample lists (ms) and the summary numbers as written."""

    stage: int
    block_ms: tuple[float, ...] = ()
    head_ms: tuple[float, ...] = ()
    stage_ms: tuple[float, ...] = ()  # block + head measured within one run
    path_ms: tuple[float, ...] = ()  # blocks 1..stage measured within one run
    summary: Mapping[str, float | int] = field(default_factory=dict)

    @property
    def has_samples(self) -> bool:
        return bool(self.block_ms) and bool(self.head_ms)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"stage": self.stage, **self.summary}
        for key, values in zip(_SAMPLE_KEYS, (self.block_ms, self.head_ms, self.stage_ms, self.path_ms)):
            entry[key] = list(values)
        return entry


@dataclass(frozen=True)
class Calibration:
    """A validated calibration document (see the module docstring)."""

    stages: tuple[StageTiming, ...]
    device: str = "unknown"
    input_size: tuple[int, int] | None = None
    source: str = "calibration data"  # where it came from, for error messages

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def has_samples(self) -> bool:
        """True when every stage holds block and head samples (what a timing model needs)."""
        return all(s.has_samples for s in self.stages)

    def check(
        self,
        *,
        num_stages: int | None = None,
        device: str | None = None,
        input_size: Sequence[int] | None = None,
    ) -> Calibration:
        """Refuse a calibration of another network, device or input size; return self.

        Latencies measured elsewhere would make every admission decision and
        every ready time wrong, so a mismatch is an error, not a warning.
        """
        if num_stages is not None and self.num_stages != num_stages:
            raise CalibrationError(f"{self.source} describes {self.num_stages} stages but the network has "
                                   f"{num_stages}: it belongs to another network; re-run the calibration")
        if device is not None and self.device != device:
            raise CalibrationError(f"{self.source} was measured on device {self.device!r}, not {device!r}: "
                                   "re-run the calibration on this device")
        if input_size is not None and self.input_size != tuple(input_size):
            raise CalibrationError(f"{self.source} was measured at input size {self.input_size} but the network "
                                   f"takes {tuple(input_size)}: re-run the calibration")
        return self

    def stage_costs(self, statistic: str = DEFAULT_STATISTIC) -> tuple[np.ndarray, np.ndarray]:
        """Per stage, ``statistic`` (median by default) of the block samples and of the head samples, ms."""
        missing = [s.stage for s in self.stages if not s.has_samples]
        if missing:
            raise CalibrationError(f"{self.source}: stage(s) {missing} have no block and head samples, so no "
                                   "stage costs; re-run the calibration (StagedEngine.calibrate())")
        try:
            block = np.array([summarise(s.block_ms, statistic) for s in self.stages])
            head = np.array([summarise(s.head_ms, statistic) for s in self.stages])
        except ReadyTimeError as exc:
            raise CalibrationError(f"{self.source}: {exc}") from None
        return block, head

    def ready_times(self, key: str = DEFAULT_KEY, kind: str = "anytime") -> np.ndarray:
        """Exit ready times t_k (ms) by the one definition (:mod:`impatient_ros.core.ready_times`).

        ``key`` names the statistic: ``p50_ms`` (median, the default), ``mean_ms``
        or ``p99_ms``. With samples, the statistic of each part, combined as
        ``kind`` ("anytime": t_A, "apriori": t_B). A file without samples only
        has block + head per stage, so only anytime ready times: the cumulative
        sum of that stage summary.
        """
        if key not in KEY_STATISTICS:
            raise CalibrationError(f"unknown calibration key {key!r}; valid: {', '.join(READY_TIME_KEYS)}")
        if kind not in ("anytime", "apriori"):
            raise CalibrationError(f"unknown ready-time kind {kind!r}; valid: anytime, apriori")
        if self.has_samples:
            block, head = self.stage_costs(KEY_STATISTICS[key])
            for stage, total in zip(self.stages, block + head):
                if not total > 0:
                    raise CalibrationError(f"{self.source}: stage {stage.stage} has block + head {key}={total!r}; "
                                           "need a finite latency > 0 ms")
            return (anytime_ready_times if kind == "anytime" else apriori_ready_times)(block, head)
        if kind != "anytime":
            raise CalibrationError(f"{self.source} has no block and head samples, only block + head per stage: "
                                   "a-priori ready times need the parts; re-run the calibration")
        totals = []
        for stage in self.stages:
            value = stage.summary.get(key)
            if value is None or not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"{self.source}: stage {stage.stage} has {key}={value!r}; "
                                       "need a finite latency > 0 ms")
            totals.append(float(value))
        return anytime_ready_times(totals, np.zeros(len(totals)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (plain types)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "device": self.device,
            "input_size": None if self.input_size is None else list(self.input_size),
            "stages": [s.to_dict() for s in self.stages],
        }


# --------------------------------------------------------------------------- reading


def load_json(path: str | os.PathLike[str]) -> Any:
    """The JSON content of a calibration file (whatever it holds), or a CalibrationError saying why not."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"calibration file not found: {path} does not exist; run the calibration first "
                               "(StagedEngine.calibrate(), or the node writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"calibration file {path} cannot be read as JSON: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _samples(entry: Mapping[str, Any], key: str, required: bool, where: str) -> tuple[float, ...]:
    values = entry.get(key)
    if values is None and not required:
        return ()
    if required and (not isinstance(values, list) or not values):
        raise CalibrationError(f"{where} needs a non-empty \"{key}\" list")
    if not isinstance(values, list):
        raise CalibrationError(f"{where} \"{key}\" must be a list")
    for value in values:
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise CalibrationError(f"{where} \"{key}\" holds {value!r}, not a time >= 0 ms")
    return tuple(float(v) for v in values)


def parse_calibration(data: Any, *, source: str = "calibration data", require_samples: bool = False) -> Calibration:
    """Validate a calibration document (a dict as :meth:`Calibration.to_dict` writes it).

    ``require_samples``: every stage must hold non-empty block and head sample
    lists (a timing model needs them); without it a summary-only document
    (hand-written, or trimmed for a report) is accepted.
    """
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise CalibrationError(f"{source} is not an impatient_ros timing calibration: format is {found!r}, "
                               f"expected {FORMAT!r}")
    version = data.get("version")
    if not _is_number(version) or version != VERSION:
        raise CalibrationError(f"{source} has unsupported timing file version {version!r} (this code reads "
                               f"version {VERSION}): re-run the calibration")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise CalibrationError(f"{source}: \"stages\" must be a non-empty list")
    for index, entry in enumerate(stages):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("stage"), int) or isinstance(entry["stage"], bool):
            raise CalibrationError(f"{source}: every stage entry needs an integer 'stage' number "
                                   f"(entry {index} is {entry!r:.80})")
    ordered = sorted(stages, key=lambda e: e["stage"])
    numbers = [e["stage"] for e in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise CalibrationError(f"{source}: stage numbers must be 1..{len(ordered)} without gaps or repeats, "
                               f"got {sorted(numbers)}")

    size = data.get("input_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise CalibrationError(f"{source}: \"input_size\" must be [H, W], got {size!r}")
        size = (size[0], size[1])

    parsed = []
    for entry in ordered:
        where = f"{source}: stage {entry['stage']}"
        summary: dict[str, float | int] = {}
        for key in _SUMMARY_MS:
            if key in entry:
                if not _is_number(entry[key]):
                    raise CalibrationError(f"{where} has {key}={entry[key]!r}; expected a number of ms")
                summary[key] = entry[key]
        if "samples" in entry:
            count = entry["samples"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise CalibrationError(f"{where} has samples={count!r}; expected a count >= 0")
            summary["samples"] = count
        block, head, stage_sums, path_sums = (
            _samples(entry, key, require_samples and key in _SAMPLE_KEYS[:2], where) for key in _SAMPLE_KEYS)
        parsed.append(StageTiming(entry["stage"], block, head, stage_sums, path_sums, summary))
    return Calibration(tuple(parsed), device=str(data.get("device", "unknown")), input_size=size, source=source)


def read_calibration(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    require_samples: bool = False,
) -> Calibration:
    """Read and validate a calibration from a file path or an already-loaded document."""
    if isinstance(source, Mapping):
        return parse_calibration(source, require_samples=require_samples)
    return parse_calibration(load_json(source), source=f"calibration file {source}", require_samples=require_samples)


# --------------------------------------------------------------------------- writing


def write_calibration(path: str | os.PathLike[str], calibration: Calibration | Mapping[str, Any]) -> Path:
    """Write a calibration atomically (impatient_ros.core.atomic) and return the path.

    A document is validated first, so what is written can be read back.
    """
    if not isinstance(calibration, Calibration):
        calibration = parse_calibration(calibration, source=f"calibration for {path}")
    path = Path(path)
    text = json.dumps(calibration.to_dict(), indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)
