"""Which in-flight image gets the next stage: earliest deadline first, with admission (no torch, no rclpy).

One node serving several cameras has one model and one inference thread, so at
most one stage runs at a time. Stages cannot be interrupted, but a staged run
can stop between any two of them, so the order of stages across images is a
choice. :class:`StageScheduler` makes it before every stage, over at most one
in-flight image per source (camera); its jobs are runs that can be stepped
(:class:`impatient_ros.runtime.engine.StagedRun`, or anything with the
:class:`StageJob` methods).

The rule (``policy="edf"``), applied before every stage at the time ``now``:

1. **Expire.** Every image with a deadline whose next stage no longer fits
   (``now + predicted cost > deadline``, the engine's own admission at its
   quantile) ends now: its last exit becomes its final answer, or NO_TIME
   when no stage ran. So no stage ever starts past its predicted deadline.
2. **Aging.** A deadline-less image that has waited ``max_wait_s`` or longer
   since it last ran a stage (or since it arrived) gets this stage; the one
   waiting longest first. Deadline-less images therefore run at least one
   stage per ``max_wait_s`` whatever the load: they are not starved.
3. **EDF, answers first.** Otherwise the image with the earliest deadline
   whose next stage fits gets the stage (ties: the one that arrived first),
   unless that image already has an answer and another image that has none
   yet would, after that stage (and the hand-over of its answer: the job's
   ``step_cost``), no longer fit its first one: then the
   earliest-deadline such image gets it. Admission uses a pessimistic
   quantile (p99) while stages mostly take their median, so plain EDF would
   spend the slack of the earliest frame on its deeper exits while a frame
   that arrived a moment later loses its only chance of an answer: one
   camera of two with close phases went unanswered that way. When two
   images that both have no answer yet cannot both get one (the later one's
   first stage no longer fits after the earlier one's; with deadlines in that
   order the reverse order cannot work either), the source with more images
   in a row left unanswered goes first, then EDF: under contention the loss
   rotates between the cameras instead of falling on the one whose frames
   arrive just after another's.
4. **Idle slot.** Otherwise (no image with a deadline in flight) the
   deadline-less image waiting longest gets it.

What deadline-less images can cost the others: outside rule 2 they only use
slots no image with a deadline could use (rule 4). Through rule 2 each of them
takes at most one stage per ``max_wait_s``; a deadline image delayed by such a
stage still follows admission (rule 1: it ends with the exit it has rather
than start a stage that would miss its deadline), so the cost is a shallower
exit, never a late one.

Work that can wait: the engine re-measures refused stages when a run ends
(its starvation probe, up to that frame's budget of stages). The scheduler
tells each job, before its step, whether it is ``quiet`` (no other image with
a deadline in flight); a StagedRun probes only then, so a probe never spends
another camera's slack.

``policy="round_robin"`` keeps rule 1 and then gives the stage to the next
source after the last one served, in the order the sources were given, that
has an image in flight (the order a loop over the cameras would take), for
comparison in ``bench/bench_multicam.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["POLICIES", "SchedulerError", "SourceStats", "StageJob", "StageScheduler", "StepOutcome"]

POLICIES = ("edf", "round_robin")


class SchedulerError(ValueError):
    """A bad scheduler argument: an unknown or duplicate source, a busy source, a bad bound or policy."""


class StageJob(Protocol):
    """One image's run as the scheduler sees it (StagedRun has these)."""

    @property
    def deadline(self) -> float | None: ...   # clock seconds; None = no deadline

    @property
    def done(self) -> bool: ...

    @property
    def next_cost(self) -> float: ...         # predicted seconds of the next stage (its admission)

    @property
    def step_cost(self) -> float: ...         # next_cost plus the hand-over of that stage's answer

    @property
    def answered(self) -> bool: ...           # an exit's answer has gone out

    # Set by the scheduler before each step and expiry: True when no other image with a deadline is in
    # flight, so work that can wait (the engine's re-measuring probe when a run ends) may run now.
    quiet: bool

    def fits(self, now: float) -> bool: ...   # the next stage, started at now, ends by the deadline

    def step(self) -> bool: ...               # run the next stage; False once the run has ended

    def expire(self) -> None: ...             # end now, the last exit as final


@dataclass
class SourceStats:
    """What the scheduler did for one source (all counts since it was made)."""

    stages: int = 0      # stages given to this source's images
    expired: int = 0     # images ended by rule 1 (their next stage no longer fitted)
    aged: int = 0        # stages given by the aging rule (deadline-less images only)
    finished: int = 0    # images that left the scheduler (any reason)
    unanswered_streak: int = 0  # images in a row that ended without any answer (rule 3's tie-break)


@dataclass(frozen=True)
class StepOutcome:
    """One :meth:`StageScheduler.step`: which source ran a stage and which images left."""

    ran: Hashable | None                       # the source given the stage (None: nothing to run)
    finished: tuple[tuple[Hashable, StageJob], ...] = ()   # (source, job) of every image that ended
    expired: tuple[Hashable, ...] = ()         # the sources whose image rule 1 ended


@dataclass
class _Slot:
    job: StageJob
    seq: int              # arrival order (ties in EDF, order among deadline-less images)
    waiting_since: float  # clock when it arrived or last ran a stage


@dataclass
class StageScheduler:
    """Before every stage, pick the in-flight image that gets it (module docstring: the rule).

    ``sources`` are the camera names (or any hashable keys), each with at most
    one image in flight. ``clock`` must be the one the jobs' deadlines are on.
    """

    sources: Sequence[Hashable]
    clock: Callable[[], float]
    policy: str = "edf"
    max_wait_s: float = 0.1
    stats: dict[Hashable, SourceStats] = field(init=False)
    _slots: dict[Hashable, _Slot] = field(init=False, default_factory=dict)
    _seq: int = field(init=False, default=0)
    _last_served: int = field(init=False, default=-1)  # round robin: index of the source served last
    # The last step's: the source whose job raised (None if none did), every image that ended in it.
    # A step that raises returns nothing, so its caller reads them to account for those images.
    failed: Hashable | None = field(init=False, default=None)
    last_finished: dict[Hashable, StageJob] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        if not self.sources:
            raise SchedulerError("need at least one source")
        seen: set[Hashable] = set()
        for source in self.sources:
            if source in seen:
                raise SchedulerError(f"duplicate source {source!r}")
            seen.add(source)
        if self.policy not in POLICIES:
            raise SchedulerError(f"unknown policy {self.policy!r}; valid policies: {', '.join(POLICIES)}")
        if not (isinstance(self.max_wait_s, (int, float)) and math.isfinite(self.max_wait_s)
                and self.max_wait_s > 0.0):
            raise SchedulerError(f"max_wait_s must be a finite number > 0, got {self.max_wait_s!r}")
        self._index = {source: i for i, source in enumerate(self.sources)}
        self.stats = {source: SourceStats() for source in self.sources}

    # ------------------------------------------------------------------ images in and out
    def add(self, source: Hashable, job: StageJob) -> None:
        """Put ``source``'s next image in flight (the source must have none)."""
        if source not in self._index:
            raise SchedulerError(f"unknown source {source!r}; sources: {', '.join(map(str, self.sources))}")
        if source in self._slots:
            raise SchedulerError(f"source {source!r} already has an image in flight")
        deadline = job.deadline
        if deadline is not None and math.isnan(deadline):
            raise SchedulerError(f"source {source!r}: the deadline is NaN")
        self._seq += 1
        self._slots[source] = _Slot(job, self._seq, self.clock())

    def busy(self, source: Hashable) -> bool:
        """Whether ``source`` has an image in flight (then its next image waits in its mailbox)."""
        return source in self._slots

    @property
    def idle(self) -> bool:
        """No image in flight."""
        return not self._slots

    def in_flight(self) -> dict[Hashable, StageJob]:
        return {source: slot.job for source, slot in self._slots.items()}

    # ------------------------------------------------------------------ the rule
    def choose(self, now: float) -> tuple[list[Hashable], Hashable | None]:
        """The decision alone: (sources whose image expires now, the source that gets the stage or None)."""
        expire = [s for s, slot in self._slots.items() if slot.job.deadline is not None and not slot.job.fits(now)]
        live = [(s, slot) for s, slot in self._slots.items() if s not in expire]
        if not live:
            return expire, None
        if self.policy == "round_robin":
            n = len(self.sources)
            order = sorted(live, key=lambda item: (self._index[item[0]] - self._last_served - 1) % n)
            return expire, order[0][0]
        free = [(s, slot) for s, slot in live if slot.job.deadline is None]
        aged = [(s, slot) for s, slot in free if now - slot.waiting_since >= self.max_wait_s]
        if aged:
            return expire, min(aged, key=lambda item: (item[1].waiting_since, item[1].seq))[0]
        timed = [(s, slot) for s, slot in live if slot.job.deadline is not None]
        if timed:
            def edf(item: tuple[Hashable, _Slot]) -> tuple[float, int]:
                return item[1].job.deadline, item[1].seq

            chosen, slot = min(timed, key=edf)
            # The next decision comes once the stage ran and its answer was handed over (published):
            # a projection without the hand-over let a frame lose its only answer to deeper stages.
            after = now + slot.job.step_cost
            at_risk = [(s, other) for s, other in timed
                       if s != chosen and not other.job.answered and not other.job.fits(after)]
            if at_risk and slot.job.answered:  # answers first (rule 3): a deeper stage never costs a first one
                chosen = min(at_risk, key=edf)[0]
            elif at_risk:  # only one of these first answers fits: the longest unanswered source first
                streak = self.stats

                def fair(item: tuple[Hashable, _Slot]) -> tuple[int, float, int]:
                    return (-streak[item[0]].unanswered_streak, *edf(item))

                chosen = min([(chosen, slot), *at_risk], key=fair)[0]
            return expire, chosen
        return expire, min(free, key=lambda item: (item[1].waiting_since, item[1].seq))[0]

    def step(self) -> StepOutcome:
        """Apply the rule once: expire what no longer fits, run one stage of the chosen image.

        A job whose ``step`` raises has ended (a StagedRun hands over its final answer first): it
        leaves the scheduler and the error propagates.
        """
        now = self.clock()
        self.failed, self.last_finished = None, {}
        expire, chosen = self.choose(now)
        finished: list[tuple[Hashable, StageJob]] = []
        for source in expire:
            slot = self._slots.pop(source)
            self.stats[source].expired += 1
            self.stats[source].finished += 1
            slot.job.quiet = self._quiet(source)
            try:
                slot.job.expire()
            except Exception:
                self.failed = source
                raise
            finished.append((source, slot.job))
            self.last_finished[source] = slot.job
            self._count_answer(source, slot.job)
        if chosen is None:
            return StepOutcome(None, tuple(finished), tuple(expire))
        slot = self._slots[chosen]
        stats = self.stats[chosen]
        if slot.job.deadline is None and now - slot.waiting_since >= self.max_wait_s and self._timed_waiting(chosen):
            stats.aged += 1
        stats.stages += 1
        self._last_served = self._index[chosen]
        try:
            slot.job.quiet = self._quiet(chosen)
            more = slot.job.step()
        except Exception:
            del self._slots[chosen]
            stats.finished += 1
            self.failed = chosen
            raise
        slot.waiting_since = self.clock()
        if not more or slot.job.done:
            del self._slots[chosen]
            stats.finished += 1
            finished.append((chosen, slot.job))
            self.last_finished[chosen] = slot.job
            self._count_answer(chosen, slot.job)
        return StepOutcome(chosen, tuple(finished), tuple(expire))

    def _count_answer(self, source: Hashable, job: StageJob) -> None:
        stats = self.stats[source]
        stats.unanswered_streak = 0 if job.answered or job.deadline is None else stats.unanswered_streak + 1

    def _quiet(self, source: Hashable) -> bool:
        """No image with a deadline in flight besides ``source``'s (and none expiring)."""
        return not any(s != source and slot.job.deadline is not None for s, slot in self._slots.items())

    def _timed_waiting(self, chosen: Hashable) -> bool:
        """Whether an image with a deadline is in flight besides ``chosen`` (the aging rule mattered)."""
        return any(s != chosen and slot.job.deadline is not None for s, slot in self._slots.items())

    def drain(self) -> list[tuple[Hashable, StageJob]]:
        """Step until no image is in flight; every (source, job) that ended, in order."""
        done: list[tuple[Hashable, StageJob]] = []
        while self._slots:
            done.extend(self.step().finished)
        return done
