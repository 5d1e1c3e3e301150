"""Node statistics and their ``diagnostic_msgs`` key/values (pure: no ROS import).

:class:`NodeStats` is filled by the node (image callback, inference thread) and
read by its diagnostics timer, so every method takes a lock. :func:`build_report`
turns a snapshot into a level, a one-line message and ``(key, value)`` strings;
the node copies those into a ``diagnostic_msgs/DiagnosticStatus``.

Definitions:

* received = every image message that arrived; dropped = replaced in the
  single-slot mailbox by a newer one before inference started; rejected = not
  decodable (counted per :data:`impatient_ros.ros.image_convert.REASONS` code, plus
  ``preprocess_failed`` / ``engine_error``); processed = reached the engine
  (including NO_TIME images, for which nothing was published).
* A frame *hits* its deadline when its final message was published no later
  than the deadline. NO_TIME frames have a deadline and no answer: they count
  as misses. Frames without a deadline (unlimited budget) are not counted.
* Latency quantiles are per stage, from the image's reference time to the
  publication of that stage's message, over the last :data:`LATENCY_WINDOW`
  messages of the stage.
* Stamp age: how old an image's header stamp was on the node's ROS clock when
  its callback ran (the camera's own delay, transport, and the wait for the
  executor; plus any offset between the two clocks), over the last
  :data:`LATENCY_WINDOW` images with a stamp set, whatever ``reference_time``
  is. With ``reference_time: arrival`` none of it counts against the budget.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from impatient_ros.core.quantiles import quantiles
from impatient_ros.core.results import StopReason

__all__ = [
    "ERROR",
    "LATENCY_WINDOW",
    "OK",
    "RECENT_FRAMES",
    "STALE",
    "WARN",
    "DiagnosticReport",
    "NodeStats",
    "StatsSnapshot",
    "build_report",
]

# Levels as in diagnostic_msgs/DiagnosticStatus (byte constants).
OK, WARN, ERROR, STALE = 0, 1, 2, 3
LATENCY_WINDOW = 256
RECENT_FRAMES = 100           # window of the recent deadline hit rate
WARN_HIT_RATE = 0.95          # recent hit rate below this: WARN
STOP_NAMES = {int(reason): reason.name.lower() for reason in StopReason}  # 0 "none" .. 6 "no_time"
NO_TIME = int(StopReason.NO_TIME)


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of the counters at one moment."""

    received: int
    processed: int
    dropped: int
    rejected: dict[str, int]
    no_time: int
    engine_errors: int
    deadline_frames: int
    deadline_hits: int
    recent_hits: int
    recent_deadline_frames: int
    max_recent_overrun_s: float
    stops: dict[str, int]
    reference_fallbacks: dict[str, int]
    final_announcements_repaired: int
    stage_published: dict[int, int]
    stage_latency_ms: dict[int, tuple[float, float, float]]  # stage -> (p50, p90, p99)
    stamp_age_ms: tuple[float, float] | None = None  # (p50, p99) of the recent stamped images' age at arrival

    @property
    def rejected_total(self) -> int:
        """All rejected frames, whatever the reason."""
        return sum(self.rejected.values())

    @property
    def hit_rate(self) -> float | None:
        """Share of frames with a deadline that hit it, since start; None before the first such frame."""
        return self.deadline_hits / self.deadline_frames if self.deadline_frames else None

    @property
    def recent_hit_rate(self) -> float | None:
        """The same over the last :data:`RECENT_FRAMES` frames with a deadline."""
        return self.recent_hits / self.recent_deadline_frames if self.recent_deadline_frames else None


class NodeStats:
    """Thread-safe counters of what the node did with its images."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero everything (on cleanup: a re-configured node may run another network)."""
        with self._lock:
            self._received = 0
            self._processed = 0
            self._dropped = 0
            self._rejected: Counter[str] = Counter()
            self._no_time = 0
            self._engine_errors = 0
            self._deadline_frames = 0
            self._deadline_hits = 0
            self._recent: deque[tuple[bool, float]] = deque(maxlen=RECENT_FRAMES)  # (hit, overrun_s)
            self._stops: Counter[str] = Counter()
            self._fallbacks: Counter[str] = Counter()
            self._repaired = 0
            self._stage_published: Counter[int] = Counter()
            self._latency: dict[int, deque[float]] = {}
            self._stamp_age: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # ------------------------------------------------------------------ updates
    def frame_received(self) -> None:
        """An image message arrived."""
        with self._lock:
            self._received += 1

    def frame_dropped(self, count: int = 1) -> None:
        """Images replaced in the mailbox (or discarded on deactivation) before inference."""
        with self._lock:
            self._dropped += count

    def frame_rejected(self, reason: str) -> None:
        """An image that could not be used, by reason code."""
        with self._lock:
            self._rejected[reason] += 1
            if reason == "engine_error":
                self._engine_errors += 1

    def stamp_age(self, age_s: float) -> None:
        """An image arrived whose header stamp was ``age_s`` old on the node's ROS clock (negative: ahead)."""
        with self._lock:
            self._stamp_age.append(age_s)

    def reference_fallback(self, reason: str) -> None:
        """The stamp could not serve as reference time (``budget_policy.REFERENCE_FALLBACKS``)."""
        with self._lock:
            self._fallbacks[reason] += 1

    def stage_published(self, stage: int, latency_s: float) -> None:
        """A stage message went out ``latency_s`` after the image's reference time."""
        with self._lock:
            self._stage_published[stage] += 1
            window = self._latency.setdefault(stage, deque(maxlen=LATENCY_WINDOW))
            window.append(latency_s)

    def frame_processed(self, stop_reason: int, deadline: float | None, final_published_at: float | None,
                        repaired_final: bool = False) -> None:
        """A frame went through the engine.

        ``stop_reason`` is the engine's StopReason value (6 = NO_TIME), ``deadline``
        and ``final_published_at`` are monotonic seconds (None = unlimited /
        nothing published). ``repaired_final``: the final message repeated an earlier
        exit because the next stage no longer fitted after it went out as not final
        (``RunReport.final_repeated``); counted as ``final_announcements_repaired``.
        """
        with self._lock:
            self._processed += 1
            self._stops[STOP_NAMES.get(int(stop_reason), str(stop_reason))] += 1
            if int(stop_reason) == NO_TIME:
                self._no_time += 1
            if repaired_final:
                self._repaired += 1
            if deadline is None:
                return
            hit = final_published_at is not None and final_published_at <= deadline
            overrun = 0.0 if final_published_at is None else max(0.0, final_published_at - deadline)
            self._deadline_frames += 1
            self._deadline_hits += hit
            self._recent.append((hit, overrun))

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> StatsSnapshot:
        """Copy the counters and compute the latency quantiles."""
        with self._lock:
            latency = {stage: list(window) for stage, window in self._latency.items()}
            stamp_ages = list(self._stamp_age)
            recent = list(self._recent)
            snap = dict(
                received=self._received, processed=self._processed, dropped=self._dropped,
                rejected=dict(self._rejected), no_time=self._no_time, engine_errors=self._engine_errors,
                deadline_frames=self._deadline_frames, deadline_hits=self._deadline_hits,
                stops=dict(self._stops), reference_fallbacks=dict(self._fallbacks),
                final_announcements_repaired=self._repaired, stage_published=dict(self._stage_published),
            )
        # Quantiles outside the lock: the inference thread must not wait for them.
        latency_ms = {
            stage: tuple(1e3 * v for v in quantiles(values, (0.5, 0.9, 0.99)))
            for stage, values in sorted(latency.items()) if values
        }
        return StatsSnapshot(
            **snap,
            recent_hits=sum(hit for hit, _ in recent),
            recent_deadline_frames=len(recent),
            max_recent_overrun_s=max((overrun for _, overrun in recent), default=0.0),
            stage_latency_ms=latency_ms,
            stamp_age_ms=tuple(1e3 * v for v in quantiles(stamp_ages, (0.5, 0.99))) if stamp_ages else None,
        )


@dataclass(frozen=True)
class DiagnosticReport:
    """What goes into one DiagnosticStatus: level (OK/WARN/ERROR), message, key/value strings."""

    level: int
    message: str
    values: list[tuple[str, str]] = field(default_factory=list)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def build_report(
    snap: StatsSnapshot,
    previous: StatsSnapshot | None = None,
    *,
    active: bool = True,
    budget_ms: float = 0.0,
    budget_source: str = "default",
    budget_detail: str = "",
    input_rejections: dict[str, int] | None = None,
    extra: Iterable[tuple[str, str]] = (),
    num_stages: int = 0,
) -> DiagnosticReport:
    """Level, message and key/values for ``snap``; ``previous`` (the last report's) gives the recent deltas.

    ``input_rejections`` are the budget policy's counts (budget_* / battery_*),
    ``extra`` key/values the node adds (device, mode, predicted stage costs...).
    Stages 1..``num_stages`` are always listed, so a stage that never ran shows 0.
    """
    values: list[tuple[str, str]] = list(extra)
    values += [
        ("frames_received", str(snap.received)),
        ("frames_processed", str(snap.processed)),
        ("frames_dropped", str(snap.dropped)),
        ("frames_rejected", str(snap.rejected_total)),
    ]
    values += [(f"frames_rejected_{reason}", str(count)) for reason, count in sorted(snap.rejected.items())]
    values += [
        ("frames_no_time", str(snap.no_time)),
        ("engine_errors", str(snap.engine_errors)),
        ("deadline_frames", str(snap.deadline_frames)),
        ("deadline_hits", str(snap.deadline_hits)),
        ("deadline_hit_rate", _fmt(snap.hit_rate)),
        ("deadline_hit_rate_recent", _fmt(snap.recent_hit_rate)),
        ("deadline_max_overrun_recent_ms", _fmt(1e3 * snap.max_recent_overrun_s)),
        ("budget_ms", _fmt(budget_ms)),
        ("budget_source", budget_source),
        ("budget_detail", budget_detail),
    ]
    rejections = input_rejections or {}
    values += [(f"input_rejected_{reason}", str(count)) for reason, count in sorted(rejections.items())]
    values += [(f"stop_{name}", str(count)) for name, count in sorted(snap.stops.items())]
    values += [(f"reference_fallback_{r}", str(c)) for r, c in sorted(snap.reference_fallbacks.items())]
    values.append(("final_announcements_repaired", str(snap.final_announcements_repaired)))
    age = snap.stamp_age_ms or (None, None)
    values += [("image_stamp_age_p50_ms", _fmt(age[0])), ("image_stamp_age_p99_ms", _fmt(age[1]))]
    stages = sorted(set(range(1, num_stages + 1)) | set(snap.stage_published) | set(snap.stage_latency_ms))
    for stage in stages:
        values.append((f"stage_{stage}_published", str(snap.stage_published.get(stage, 0))))
        p50, p90, p99 = snap.stage_latency_ms.get(stage, (None, None, None))
        values += [(f"stage_{stage}_latency_p50_ms", _fmt(p50)), (f"stage_{stage}_latency_p90_ms", _fmt(p90)),
                   (f"stage_{stage}_latency_p99_ms", _fmt(p99))]

    level, problems = OK, []
    if not active:
        level = max(level, WARN)
        problems.append("not active")
    new_rejected = snap.rejected_total - (previous.rejected_total if previous else 0)
    if new_rejected > 0:
        level = max(level, WARN)
        problems.append(f"{new_rejected} image(s) rejected")
    new_no_time = snap.no_time - (previous.no_time if previous else 0)
    if new_no_time > 0:
        level = max(level, WARN)
        problems.append(f"{new_no_time} image(s) without time for stage 1")
    rate = snap.recent_hit_rate
    if rate is not None and rate < WARN_HIT_RATE:
        level = max(level, WARN)
        problems.append(f"deadline hit rate {rate:.0%} over the last {snap.recent_deadline_frames} frames")
    if problems:
        message = "; ".join(problems)
    else:
        message = f"ok: {snap.processed} frames processed" + (f", hit rate {rate:.0%}" if rate is not None else "")
    return DiagnosticReport(level, message, values)

