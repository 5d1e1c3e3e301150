"""Aggregation and plotting for the monitor tool: predictions joined with true labels.

Pure (no rclpy): the monitor turns each ``impatient_ros/StagePrediction`` into a
:class:`PredictionRecord` and each camera label into ``add_label(stamp_ns,
class_id)``; :class:`MonitorStats` joins the two by the image's header stamp
and keeps per-stage counts, accuracy, latency quantiles, the distribution of
final stages and stop reasons, deadline overruns and frame counts.

Labels and predictions travel on different topics, so either may arrive first.
A prediction whose label has not arrived yet waits (at most ``label_wait_s``
of the caller's clock) before it is counted as unlabelled; :meth:`flush`
settles the waiting ones, :meth:`summary` settles all of them.

Definitions used in the summary (and the table):

* ``accuracy`` - correct / labelled messages of that stage (None when no label).
* ``late`` - messages whose latency exceeded their non-zero budget: the
  deadline was really missed.
* ``stopped_by_deadline`` - final messages with ``stop_reason`` DEADLINE: the
  node stopped early *to keep* the deadline, which is the intended behaviour.
* ``frames.unanswered`` - labelled frames (the camera sent them) with no
  prediction at all after ``label_wait_s``: dropped on the way or by the node.

Memory stays bounded on long runs: latency samples, the timeline and the
label table keep only their most recent ``max_samples`` entries.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from impatient_ros.core.results import StopReason

__all__ = [
    "STOP_REASONS",
    "MonitorStats",
    "PredictionRecord",
    "format_table",
    "write_plot",
    "write_summary",
]

# Names of impatient_ros/StagePrediction's STOP_* constants, by value (the engine's stop reasons that go
# on the wire: NONE .. ERROR; NO_TIME never does).
STOP_REASONS: dict[int, str] = {int(r): r.name for r in StopReason if r <= StopReason.ERROR}
_STOP_DEADLINE = int(StopReason.DEADLINE)
SUMMARY_FORMAT = "impatient_ros.monitor_summary"
SUMMARY_VERSION = 1


@dataclass(frozen=True)
class PredictionRecord:
    """The fields of one StagePrediction the monitor uses (times in ms, stamp in ns)."""

    stamp_ns: int  # header stamp of the source image: the join key with the labels
    image_seq: int
    stage: int  # 1-based
    num_stages: int
    is_final: bool
    stop_reason: int
    class_id: int
    latency_ms: float
    budget_ms: float  # 0 = unlimited
    received_s: float  # the monitor's clock when it arrived (for the timeline)


@dataclass
class _StageStats:
    count: int = 0
    labelled: int = 0
    correct: int = 0
    late: int = 0
    final: int = 0
    latencies_ms: deque[float] = field(default_factory=deque)


class MonitorStats:
    """Running statistics of one monitor session (see the module docstring)."""

    def __init__(self, *, label_wait_s: float = 2.0, max_samples: int = 100_000) -> None:
        if not label_wait_s >= 0:
            raise ValueError(f"label_wait_s must be >= 0, got {label_wait_s!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.label_wait_s = float(label_wait_s)
        self.max_samples = int(max_samples)
        self._labels: OrderedDict[int, int] = OrderedDict()  # stamp_ns -> class id
        # stamp_ns -> arrival, in arrival order, until it is known whether the frame was answered.
        self._label_arrival: OrderedDict[int, float] = OrderedDict()
        self._answered: OrderedDict[int, None] = OrderedDict()  # an ordered set of answered stamps
        self._pending: deque[PredictionRecord] = deque()  # waiting for their label
        self._stages: dict[int, _StageStats] = {}
        self._stop_reasons: Counter[str] = Counter()
        self._final_correct = 0
        self._final_labelled = 0
        self._final_late = 0
        self.labels_received = 0
        self.unanswered = 0
        self.num_stages = 0
        self.first_received_s: float | None = None
        self.last_received_s: float | None = None
        # (received_s, budget_ms, final stage) of each final message, for the plot.
        self.timeline: deque[tuple[float, float, int]] = deque(maxlen=self.max_samples)

    # ------------------------------------------------------------------ input

    def add_label(self, stamp_ns: int, class_id: int, received_s: float) -> None:
        """Record the true class of the image stamped ``stamp_ns``."""
        self.labels_received += 1
        self._labels[int(stamp_ns)] = int(class_id)
        self._label_arrival[int(stamp_ns)] = float(received_s)
        while len(self._labels) > self.max_samples:
            self._labels.popitem(last=False)

    def add_prediction(self, record: PredictionRecord) -> None:
        """Count one stage message; it waits for its label if none has arrived yet."""
        if self.first_received_s is None:
            self.first_received_s = record.received_s
        self.last_received_s = record.received_s
        self._answered[record.stamp_ns] = None
        while len(self._answered) > self.max_samples:  # unlabelled sources never settle their stamps
            self._answered.popitem(last=False)
        if record.stamp_ns in self._labels:
            self._fold(record, self._labels[record.stamp_ns])
        else:
            self._pending.append(record)

    def flush(self, now_s: float, *, final: bool = False) -> None:
        """Fold in waiting predictions whose label came, and settle what is older than ``label_wait_s``.

        Settling means: a prediction still without a label counts as unlabelled, a
        label without any prediction counts as an unanswered frame. ``final``
        settles everything.
        """
        still_waiting: deque[PredictionRecord] = deque()
        for record in self._pending:  # few: at most the messages of the last label_wait_s
            label = self._labels.get(record.stamp_ns)
            if label is not None or final or now_s - record.received_s >= self.label_wait_s:
                self._fold(record, label)
            else:
                still_waiting.append(record)
        self._pending = still_waiting
        # Labels arrive in time order, so the settled ones are at the front.
        while self._label_arrival:
            stamp, arrived = next(iter(self._label_arrival.items()))
            if not (final or now_s - arrived >= self.label_wait_s):
                break
            del self._label_arrival[stamp]
            if stamp in self._answered:
                del self._answered[stamp]  # settled: no longer needed
            else:
                self.unanswered += 1

    def _fold(self, record: PredictionRecord, label: int | None) -> None:
        stage = self._stages.setdefault(record.stage, _StageStats(latencies_ms=deque(maxlen=self.max_samples)))
        stage.count += 1
        stage.latencies_ms.append(record.latency_ms)
        late = record.budget_ms > 0 and record.latency_ms > record.budget_ms
        stage.late += late
        correct = label is not None and record.class_id == label
        if label is not None:
            stage.labelled += 1
            stage.correct += correct
        self.num_stages = max(self.num_stages, record.num_stages, record.stage)
        if record.is_final:
            stage.final += 1
            self._stop_reasons[STOP_REASONS.get(record.stop_reason, str(record.stop_reason))] += 1
            self._final_late += late
            if label is not None:
                self._final_labelled += 1
                self._final_correct += correct
            self.timeline.append((record.received_s, record.budget_ms, record.stage))

    # ------------------------------------------------------------------ output

    def summary(self, now_s: float | None = None, *, final: bool = False) -> dict[str, Any]:
        """A JSON-ready summary; ``final`` first settles everything still waiting."""
        if final or now_s is not None:
            self.flush(now_s if now_s is not None else math.inf, final=final)
        stages = []
        for k in range(1, self.num_stages + 1):
            s = self._stages.get(k, _StageStats())
            latencies = np.asarray(s.latencies_ms, dtype=np.float64)
            stages.append(
                {
                    "stage": k,
                    "count": s.count,
                    "labelled": s.labelled,
                    "accuracy": s.correct / s.labelled if s.labelled else None,
                    "latency_ms": _quantiles(latencies),
                    "late": s.late,
                    "final": s.final,
                }
            )
        finals = sum(s.final for s in self._stages.values())
        duration = (
            self.last_received_s - self.first_received_s
            if self.first_received_s is not None and self.last_received_s is not None
            else 0.0
        )
        return {
            "format": SUMMARY_FORMAT,
            "format_version": SUMMARY_VERSION,
            "num_stages": self.num_stages,
            "duration_s": duration,
            "frames": {
                "labels_received": self.labels_received,
                "predicted": finals,  # every answered image ends with exactly one final message
                "unanswered": self.unanswered,
                "waiting": len(self._pending),
            },
            "stages": stages,
            "final": {
                "count": finals,
                "labelled": self._final_labelled,
                "accuracy": self._final_correct / self._final_labelled if self._final_labelled else None,
                "stage_histogram": {str(k): s["final"] for k, s in enumerate(stages, start=1)},
                "stop_reasons": dict(sorted(self._stop_reasons.items())),
                "stopped_by_deadline": self._stop_reasons.get(STOP_REASONS[_STOP_DEADLINE], 0),
                "late": self._final_late,
            },
        }


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, "p50": None, "p99": None, "max": None}
    return {
        "mean": float(values.mean()),
        "p50": float(np.quantile(values, 0.5)),
        "p99": float(np.quantile(values, 0.99)),
        "max": float(values.max()),
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summary: dict[str, Any]) -> str:
    """The live table: one row per stage, then the final answers and the frame counts."""
    lines = [
        f"{'stage':>5} {'msgs':>7} {'acc':>6} {'p50 ms':>8} {'p99 ms':>8} {'final':>7} {'late':>5}",
    ]
    for s in summary["stages"]:
        lat = s["latency_ms"]
        lines.append(
            f"{s['stage']:>5} {s['count']:>7} {_cell(s['accuracy'], '6.1%'):>6} "
            f"{_cell(lat['p50'], '8.2f'):>8} {_cell(lat['p99'], '8.2f'):>8} {s['final']:>7} {s['late']:>5}"
        )
    final, frames = summary["final"], summary["frames"]
    reasons = ", ".join(f"{k} {v}" for k, v in final["stop_reasons"].items()) or "-"
    lines.append(
        f"final answers {final['count']} (accuracy {_cell(final['accuracy'], '.1%')}, late {final['late']}); "
        f"stop reasons: {reasons}"
    )
    lines.append(
        f"frames: {frames['labels_received']} labelled by the camera, {frames['predicted']} predicted, "
        f"{frames['unanswered']} unanswered"
    )
    return "\n".join(lines)


def _atomic_write(path: Path, write: Any) -> None:
    # A reader never sees half a file; the one atomic-replace of the package (fsync included).
    from impatient_ros.core.atomic import atomic_write_path

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_path(path, write)


def write_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the summary as indented JSON (atomically); returns the path."""
    path = Path(path)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def write_plot(
    summary: dict[str, Any],
    timeline: Iterable[tuple[float, float, int]],
    path: str | os.PathLike[str],
    title: str = "impatient_ros monitor",
) -> Path:
    """PNG with accuracy per stage, latency per stage and budget vs stage reached over time."""
    # The object-oriented API with an explicit Agg canvas: no pyplot global state,
    # no display needed, and it does not change the process-wide backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = summary["stages"]
    ks = [s["stage"] for s in stages]
    fig = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_lat, ax_time = fig.subplots(1, 3, width_ratios=[1, 1, 2])

    accs = [s["accuracy"] for s in stages]
    ax_acc.bar(ks, [a * 100 if a is not None else 0.0 for a in accs], color="tab:blue")
    for k, a in zip(ks, accs):
        ax_acc.annotate("n/a" if a is None else f"{a:.0%}", (k, (a or 0) * 100), ha="center", va="bottom", fontsize=8)
    ax_acc.set(title="accuracy per stage", xlabel="stage", ylabel="accuracy (%)", ylim=(0, 105), xticks=ks)

    p50 = [s["latency_ms"]["p50"] or 0.0 for s in stages]
    p99 = [s["latency_ms"]["p99"] or 0.0 for s in stages]
    width = 0.4
    ax_lat.bar([k - width / 2 for k in ks], p50, width, label="p50", color="tab:green")
    ax_lat.bar([k + width / 2 for k in ks], p99, width, label="p99", color="tab:red")
    ax_lat.set(title="latency per stage", xlabel="stage", ylabel="latency (ms)", xticks=ks)
    ax_lat.legend(fontsize=8)

    points = list(timeline)
    if points:
        t0 = points[0][0]
        times = [p[0] - t0 for p in points]
        ax_time.plot(times, [p[1] for p in points], ".", color="tab:gray", markersize=3, label="budget (0 = unlimited)")
        ax_stage = ax_time.twinx()
        ax_stage.plot(times, [p[2] for p in points], ".", color="tab:orange", markersize=3, label="final stage")
        ax_stage.set_ylabel("final stage reached", color="tab:orange")
        ax_stage.set_yticks(ks or [1])
        ax_stage.set_ylim(0.5, max(ks or [1]) + 0.5)
        ax_time.legend(loc="upper left", fontsize=8)
    else:
        ax_time.text(0.5, 0.5, "no final predictions received", ha="center", va="center", transform=ax_time.transAxes)
    ax_time.set(title="budget vs stage reached", xlabel="time (s)", ylabel="budget (ms)")
    fig.suptitle(title)

    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
