"""StageScheduler (impatient_ros.core.scheduler) with scripted jobs: known stage costs on a fake clock.

Each job "runs" a stage by advancing the fake clock by that stage's cost, and
predicts exactly that cost, so every EDF, admission, aging and round-robin
decision follows from the numbers alone.
"""

from __future__ import annotations

import math

import pytest

from impatient_ros.core.scheduler import SchedulerError, StageScheduler
from tests.fake_clock import FakeClock

MS = 1e-3


class ScriptedJob:
    """A run of ``len(costs)`` stages; stage k takes (and is predicted to take) ``costs[k]`` seconds."""

    def __init__(self, name: str, clock: FakeClock, costs, deadline: float | None, log: list,
                 handover: float = 0.0) -> None:
        self.name, self.clock, self.costs, self._deadline, self.log = name, clock, list(costs), deadline, log
        self.handover = handover   # seconds each answer's hand-over (publication) takes after its stage
        self.k = 0
        self.done = False
        self.final_exit: int | None = None   # 1-based exit that ended up final (0: none, NO_TIME)
        self.expired = False
        self.quiet = True
        self.quiet_seen: list[bool] = []   # quiet at each step/expiry, as the scheduler set it

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def next_cost(self) -> float:
        return self.costs[self.k]

    @property
    def step_cost(self) -> float:
        return self.costs[self.k] + self.handover

    @property
    def answered(self) -> bool:
        return self.k > 0

    def fits(self, now: float) -> bool:
        return self._deadline is None or now + self.costs[self.k] <= self._deadline

    def step(self) -> bool:
        self.quiet_seen.append(self.quiet)
        start = self.clock.now()
        assert self.fits(start), f"{self.name}: a stage started that does not fit"
        self.log.append((self.name, self.k + 1, start))
        self.clock.advance(self.costs[self.k] + self.handover)
        self.k += 1
        if self.k == len(self.costs):
            self.done, self.final_exit = True, self.k
        return not self.done

    def expire(self) -> None:
        self.quiet_seen.append(self.quiet)
        self.done, self.expired, self.final_exit = True, True, self.k


def _scheduler(sources, clock, **kwargs) -> StageScheduler:
    return StageScheduler(sources, clock.now, **kwargs)


def test_edf_gives_the_stage_to_the_earliest_deadline():
    clock, log = FakeClock(), []
    sched = _scheduler(["front", "rear"], clock)
    t0 = clock.now()
    front = ScriptedJob("front", clock, [2 * MS] * 3, t0 + 20 * MS, log)
    rear = ScriptedJob("rear", clock, [2 * MS] * 3, t0 + 10 * MS, log)
    sched.add("front", front)
    sched.add("rear", rear)
    sched.drain()
    # rear (deadline 10 ms) runs all of its stages first, then front.
    assert [(name, k) for name, k, _ in log] == [("rear", 1), ("rear", 2), ("rear", 3),
                                                 ("front", 1), ("front", 2), ("front", 3)]
    assert front.final_exit == rear.final_exit == 3


def test_a_frame_whose_next_stage_no_longer_fits_ends_with_its_last_exit():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b"], clock)
    t0 = clock.now()
    a = ScriptedJob("a", clock, [3 * MS] * 4, t0 + 8 * MS, log)   # 3 ms stages, 8 ms: fits 2 alone
    b = ScriptedJob("b", clock, [3 * MS] * 4, t0 + 30 * MS, log)
    sched.add("a", a)
    sched.add("b", b)
    finished = sched.drain()
    assert a.expired and a.final_exit == 2          # stage 3 would end at 9 ms > 8 ms
    assert b.final_exit == 4 and not b.expired
    assert [s for s, _ in finished] == ["a", "b"]
    assert sched.stats["a"].expired == 1 and sched.stats["b"].expired == 0
    # No stage of any frame started past what its admission allows (ScriptedJob.step asserts it too).
    for name, k, start in log:
        job = a if name == "a" else b
        assert start + job.costs[k - 1] <= job.deadline


def test_a_deeper_stage_never_costs_another_frame_its_first_answer():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b"], clock)
    t0 = clock.now()
    slack = 1e-9
    a = ScriptedJob("a", clock, [3 * MS] * 3, t0 + 10 * MS + slack, log)
    b = ScriptedJob("b", clock, [3 * MS] * 3, t0 + 11 * MS + slack, log)
    sched.add("a", a)
    sched.add("b", b)
    sched.drain()
    # Plain EDF would run a1 a2 a3 (0-9 ms) and leave b (deadline 11 ms) no time for any stage.
    # After a2 (6 ms), a3 would push b's first stage to 9-12 ms > 11: b gets the slot.
    assert [(name, k) for name, k, _ in log] == [("a", 1), ("a", 2), ("b", 1)]
    assert a.final_exit == 2 and b.final_exit == 1


def test_the_hand_over_after_a_stage_counts_when_a_first_answer_is_at_risk():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b"], clock)
    t0 = clock.now()
    # Stages of 3 ms, each answer's hand-over (publication) 0.5 ms more.
    a = ScriptedJob("a", clock, [3 * MS] * 3, t0 + 11.5 * MS, log, handover=0.5 * MS)
    b = ScriptedJob("b", clock, [3 * MS] * 3, t0 + 13.2 * MS, log, handover=0.5 * MS)
    sched.add("a", a)
    sched.add("b", b)
    sched.drain()
    # At 7 ms (a1, a2 and their hand-overs done), a3 ends at 10 ms and its hand-over at 10.5 ms, when
    # b's first stage would end at 13.5 > 13.2 ms. Counting the stage alone (10 + 3 = 13 <= 13.2)
    # would give a its third exit and b no answer at all.
    assert [(name, k) for name, k, _ in log] == [("a", 1), ("a", 2), ("b", 1)]
    assert a.final_exit == 2 and b.final_exit == 1


def test_a_frame_that_waited_too_long_for_its_first_stage_ends_with_no_answer():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b"], clock)
    t0 = clock.now()
    sched.add("a", ScriptedJob("a", clock, [5 * MS] * 2, t0 + 10 * MS, log))
    late = ScriptedJob("b", clock, [8 * MS] * 2, t0 + 12 * MS, log)
    sched.add("b", late)
    sched.drain()
    # Only one of the two first stages fits (5 + 8 > 10 and > 12): EDF gives it to a (0-5 ms); at 5 ms
    # b's first stage would end at 13 > 12, so b expires with no exit; a goes on (5-10 ms).
    assert late.expired and late.final_exit == 0
    assert [name for name, _, _ in log] == ["a", "a"]


def test_deadline_less_frames_only_take_idle_slots_until_they_age():
    clock, log = FakeClock(), []
    sched = _scheduler(["timed", "free"], clock, max_wait_s=10 * MS)
    t0 = clock.now()
    free = ScriptedJob("free", clock, [1 * MS] * 6, None, log)
    sched.add("free", free)
    sched.add("timed", ScriptedJob("timed", clock, [2 * MS] * 3, t0 + 50 * MS, log))
    sched.drain()
    names = [name for name, _, _ in log]
    # The timed frame takes every slot while it is in flight (6 ms < max_wait_s), then free runs.
    assert names == ["timed"] * 3 + ["free"] * 6
    assert free.final_exit == 6


def test_deadline_less_frames_are_not_starved_by_a_stream_of_deadline_frames():
    clock, log = FakeClock(), []
    max_wait = 10 * MS
    sched = _scheduler(["cam0", "cam1", "free"], clock, max_wait_s=max_wait)
    free = ScriptedJob("free", clock, [1 * MS] * 5, None, log)
    sched.add("free", free)
    frames = 0
    # Two cameras keep a deadline frame in flight at all times (overload: the slot is never idle).
    while not free.done:
        for cam in ("cam0", "cam1"):
            if not sched.busy(cam):
                frames += 1
                sched.add(cam, ScriptedJob(cam, clock, [2 * MS] * 4, clock.now() + 12 * MS, log))
        sched.step()
        assert clock.now() < 1000.0 + 1.0, "the deadline-less frame never finished"
    free_starts = [start for name, _, start in log if name == "free"]
    assert len(free_starts) == 5
    # Its first stage came within max_wait_s of its arrival and then one at least every max_wait_s
    # (plus the one stage in progress when it aged: stages are not interrupted).
    gaps = [b - a for a, b in zip([1000.0, *free_starts], free_starts)]
    assert max(gaps) <= max_wait + 2 * MS + 1 * MS + 1e-9
    assert sched.stats["free"].aged >= 4
    # The deadline frames kept running in between: the free frame got only its aged stages.
    assert sum(1 for name, _, _ in log if name != "free") > 4 * len(free_starts)


def test_deadline_less_stages_never_break_a_deadline_frames_admission():
    clock, log = FakeClock(), []
    sched = _scheduler(["timed", "free"], clock, max_wait_s=1 * MS)   # ages at once
    t0 = clock.now()
    timed = ScriptedJob("timed", clock, [2 * MS] * 4, t0 + 7 * MS, log)
    sched.add("free", ScriptedJob("free", clock, [3 * MS] * 4, None, log))
    sched.add("timed", timed)
    sched.drain()
    # Aged free stages take slots, and the timed frame loses depth, but it never starts a stage that
    # would end after its deadline (ScriptedJob.step asserts it) and still ends with an answer.
    assert timed.expired and timed.final_exit >= 1
    for name, k, start in log:
        if name == "timed":
            assert start + 2 * MS <= t0 + 7 * MS


def test_round_robin_alternates_between_sources_in_their_order():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b", "c"], clock, policy="round_robin")
    t0 = clock.now()
    for name, deadline in (("c", 7), ("a", 100), ("b", 100)):  # c is most urgent: ignored
        sched.add(name, ScriptedJob(name, clock, [1 * MS] * 2, t0 + deadline * MS, log))
    sched.drain()
    assert [name for name, _, _ in log] == ["a", "b", "c", "a", "b", "c"]


def test_edf_meets_deadlines_that_round_robin_misses():
    def run(policy: str) -> dict[str, int]:
        clock, log = FakeClock(), []
        sched = _scheduler(["near", "far"], clock, policy=policy)
        t0 = clock.now()
        slack = 1e-9  # 9 ms is three 3 ms stages exactly: keep float rounding out of the admission
        jobs = {"near": ScriptedJob("near", clock, [3 * MS] * 3, t0 + 9 * MS + slack, log),
                "far": ScriptedJob("far", clock, [3 * MS] * 3, t0 + 18 * MS + slack, log)}
        for name in ("far", "near"):
            sched.add(name, jobs[name])
        sched.drain()
        return {name: job.final_exit for name, job in jobs.items()}

    assert run("edf") == {"near": 3, "far": 3}            # near 0-9 ms, far 9-18 ms: both complete
    rr = run("round_robin")
    assert rr["near"] < 3 and sum(rr.values()) < 6        # interleaving pushes near past its deadline


def test_an_idle_scheduler_runs_nothing():
    clock = FakeClock()
    sched = _scheduler(["a"], clock)
    outcome = sched.step()
    assert outcome.ran is None and outcome.finished == () and sched.idle


def test_a_job_that_raises_leaves_the_scheduler():
    clock, log = FakeClock(), []
    sched = _scheduler(["a"], clock)

    class Broken(ScriptedJob):
        def step(self) -> bool:
            raise RuntimeError("stage failed")

    sched.add("a", Broken("a", clock, [1 * MS], None, log))
    with pytest.raises(RuntimeError, match="stage failed"):
        sched.step()
    assert not sched.busy("a") and sched.stats["a"].finished == 1
    assert sched.failed == "a" and sched.last_finished == {}


@pytest.mark.parametrize("kwargs, message", [
    ({"sources": []}, "at least one source"),
    ({"sources": ["a", "a"]}, "duplicate source 'a'"),
    ({"policy": "fifo"}, "unknown policy 'fifo'; valid policies: edf, round_robin"),
    ({"max_wait_s": 0.0}, "max_wait_s must be a finite number > 0"),
    ({"max_wait_s": math.nan}, "max_wait_s must be a finite number > 0"),
    ({"max_wait_s": -1.0}, "max_wait_s must be a finite number > 0"),
])
def test_bad_arguments_are_refused_with_a_reason(kwargs, message):
    clock = FakeClock()
    args = {"sources": ["a", "b"], "clock": clock.now, **kwargs}
    with pytest.raises(SchedulerError, match=message):
        StageScheduler(**args)


def test_unknown_busy_and_nan_deadline_images_are_refused():
    clock, log = FakeClock(), []
    sched = _scheduler(["a"], clock)
    with pytest.raises(SchedulerError, match="unknown source 'x'; sources: a"):
        sched.add("x", ScriptedJob("x", clock, [1 * MS], None, log))
    with pytest.raises(SchedulerError, match="deadline is NaN"):
        sched.add("a", ScriptedJob("a", clock, [1 * MS], math.nan, log))
    sched.add("a", ScriptedJob("a", clock, [1 * MS], None, log))
    with pytest.raises(SchedulerError, match="already has an image in flight"):
        sched.add("a", ScriptedJob("a", clock, [1 * MS], None, log))


def test_jobs_are_told_when_no_other_deadline_frame_is_in_flight():
    clock, log = FakeClock(), []
    sched = _scheduler(["a", "b", "free"], clock)
    t0 = clock.now()
    a = ScriptedJob("a", clock, [1 * MS] * 2, t0 + 10 * MS, log)
    b = ScriptedJob("b", clock, [1 * MS] * 2, t0 + 20 * MS, log)
    free = ScriptedJob("free", clock, [1 * MS], None, log)
    for name, job in (("a", a), ("b", b), ("free", free)):
        sched.add(name, job)
    sched.drain()
    # a runs while b waits: never quiet; b's stages after a has gone are; a deadline-less frame does
    # not count (probes may delay it).
    assert a.quiet_seen == [False, False] and b.quiet_seen == [True, True] and free.quiet_seen == [True]


def test_when_only_one_first_answer_fits_the_loss_rotates_between_cameras():
    def answered(policy_clock_rounds: int) -> dict[str, int]:
        clock, log = FakeClock(), []
        sched = _scheduler(["early", "late"], clock)
        got = {"early": 0, "late": 0}
        for _ in range(policy_clock_rounds):
            t0 = clock.now()
            # Both arrive together; 8 ms first stages, deadlines 10 and 11 ms: only one of them fits.
            jobs = {"early": ScriptedJob("early", clock, [8 * MS], t0 + 10 * MS, log),
                    "late": ScriptedJob("late", clock, [8 * MS], t0 + 11 * MS, log)}
            for name, job in jobs.items():
                sched.add(name, job)
            sched.drain()
            for name, job in jobs.items():
                got[name] += job.final_exit > 0
            clock.advance(30 * MS)
        return got

    # Plain EDF would answer "early" every time; the unanswered streak lets "late" take every other one.
    assert answered(10) == {"early": 5, "late": 5}
