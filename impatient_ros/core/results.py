"""What a staged run answers: modes, stop reasons, per-exit results and the run report (no torch).

These types are shared by the engine (:mod:`impatient_ros.runtime.engine`, which
re-exports them), the node's pure helpers (messages, diagnostics) and the
tools, so they live here, free of torch and rclpy.

Times (``ready_time``, ``began_at``, ``deadline``, ``started_at``) are seconds on
the engine's clock (``time.monotonic`` unless the engine was given another one).
Stage numbers are 1-based in results, as in the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

import numpy as np

__all__ = [
    "EngineError",
    "Mode",
    "RunReport",
    "StageResult",
    "StopReason",
]


class EngineError(RuntimeError):
    """Base class of the engine's errors (bad arguments, unusable device)."""


class StopReason(IntEnum):
    """Why no further stage follows; 0-5 equal StagePrediction.STOP_* in msg/StagePrediction.msg."""

    NONE = 0        # more stages follow
    DEADLINE = 1    # the next stage could not finish before the deadline
    CONFIDENT = 2   # cascade: the 1-vs-2 ratio reached the threshold
    MAX_STAGE = 3   # the stage cap was reached
    COMPLETE = 4    # the last exit of the network was reached
    ERROR = 5       # a later stage failed: the engine repeats the last answer as final, then raises
    NO_TIME = 6     # not even stage 1 fits the budget: nothing ran (engine only, no message value)


class Mode(str, Enum):
    """How the engine spends a budget."""

    ANYTIME = "anytime"
    APRIORI = "apriori"
    CASCADE = "cascade"

    @classmethod
    def parse(cls, value: Mode | str) -> Mode:
        """``Mode`` from its name ("anytime", "apriori"/"a-priori", "cascade"), case-insensitive."""
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "").replace("_", "")
            for mode in cls:
                if mode.value == key:
                    return mode
        raise EngineError(f"unknown mode {value!r}; valid modes: {', '.join(m.value for m in cls)}")


@dataclass(frozen=True)
class StageResult:
    """One exit's answer for one image."""

    stage: int                 # 1-based exit index
    num_stages: int
    class_id: int
    label: str                 # class name from the checkpoint (the id as text if it has none)
    score: float               # softmax probability of class_id
    top_ids: list[int]         # top-k class ids, best first
    top_scores: list[float]    # their probabilities
    ratio_1v2: float           # p1 / max(p2, RATIO_EPSILON), >= 1
    probs: np.ndarray          # (num_classes,) float32 softmax probabilities
    ready_time: float          # engine clock when the answer was available on the host
    elapsed_s: float           # ready_time minus the start of the run (preprocessing included)
    is_final: bool             # no further result follows for this image
    stop_reason: StopReason    # StopReason.NONE unless is_final
    # Re-announces the previous exit as final; no new stage ran. The engine hands one over when
    # it had handed that exit over as not final and then could not go on: the next stage no longer
    # fitted (DEADLINE) or a stage or the callback raised (ERROR). Every field but is_final,
    # stop_reason and repeated is the previous result's.
    repeated: bool = False
    # The answer (probs and the ranking from them) is the exit ensemble's: exits 1..stage combined by the
    # checkpoint's ensemble weights (impatient_ros.core.ensemble), not this exit's own probabilities.
    ensemble: bool = False


@dataclass
class RunReport:
    """Everything one run did; ``results`` hold the answers in the order they were handed over.

    ``predicted_s[i]``/``actual_s[i]``/``started_at[i]`` belong to ``results[i]``:
    the admission prediction (seconds, at the admission quantile; NaN for a run
    without deadline before any timing exists), the measured time of that
    stage's block + head (a-priori: of blocks 0..k + head k, + heads 0..k-1 with an
    exit ensemble; the engine's clock
    on the CPU, CUDA events on a GPU), and when it started (engine clock; on CUDA
    with queued stages, the predicted moment the device begins it). For a
    repeated result (``StageResult.repeated``) no stage ran: its prediction is
    NaN, its measured time 0 and its start the moment it was handed over.

    Exactly one result is final (``is_final``), the last one, unless nothing
    ran (NO_TIME) and ``results`` is empty.
    """

    mode: Mode
    results: list[StageResult]
    stop_reason: StopReason
    stages_run: int            # backbone blocks executed
    predicted_s: list[float]
    actual_s: list[float]
    started_at: list[float]
    began_at: float            # engine clock when run() was called
    deadline: float | None     # engine clock seconds, None = unlimited
    overran: bool              # the last answer was ready after the deadline
    overrun_s: float           # by how much (0 if not)
    # True when the final answer repeats the exit before it (StageResult.repeated): the on_result
    # callback took so much longer than its recent maximum that the next stage no longer fitted
    # after that exit had been handed over as not final.
    final_repeated: bool = False
    probed_stages: tuple[int, ...] = ()   # every 0-based stage measured after the run, first..deepest

    @property
    def probed_stage(self) -> int | None:
        """The first (refused) stage measured after the run, or None (see StagedEngine.probe_interval_s)."""
        return self.probed_stages[0] if self.probed_stages else None

    @property
    def final(self) -> StageResult | None:
        """The last answer, or None when nothing ran (NO_TIME)."""
        return self.results[-1] if self.results else None
