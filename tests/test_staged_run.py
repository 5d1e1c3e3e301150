"""StagedRun (resumable runs) and StageScheduler over the real smallcnn engine on a fake clock.

Several images in flight on one engine, stepped in the scheduler's order: each
keeps its activation between stages (answers equal the image run alone), EDF
order of real stages, admission at the engine's quantile, and a frame that runs
out of time ends with its last exit repeated as final, as ``run`` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impatient_ros.core.scheduler import StageScheduler
from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.engine import EngineError, StagedEngine, StopReason
from impatient_ros.runtime.model import NetConfig, build_network
from impatient_ros.runtime.timing import TimingModel
from tests.fake_clock import FakeClock, set_stage_costs

MS = 1e-3
BLOCK_MS, HEAD_MS = [2.0, 2.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5]   # 2.5 ms per stage
PREPROCESSING = {"input_size": [28, 28], "channels": "gray", "mean": [0.286], "std": [0.353]}


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=(28, 28)))
    net.train()
    with torch.no_grad():  # non-trivial batch-norm statistics: exits differ
        net(torch.randn(8, 1, 28, 28))
    path = tmp_path_factory.mktemp("ckpt") / "smallcnn.pt"
    return save_checkpoint(path, net, class_names=[f"c{i}" for i in range(10)], preprocessing=PREPROCESSING)


def _engine(checkpoint_path, probe_interval_s: float = 0.0) -> tuple[StagedEngine, FakeClock]:
    clock = FakeClock()
    timing = TimingModel(4)
    for _ in range(50):
        for k in range(4):
            timing.record(k, BLOCK_MS[k] * MS, HEAD_MS[k] * MS)
    # No probes by default: they would add stages to the order under test (they are tested in test_engine.py).
    engine = StagedEngine(load_checkpoint(checkpoint_path), "cpu", timing=timing, clock=clock.now,
                          probe_interval_s=probe_interval_s)
    set_stage_costs(engine.net, clock, [b * MS for b in BLOCK_MS], [h * MS for h in HEAD_MS])
    return engine, clock


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(n)]


def test_interleaved_runs_answer_as_each_image_alone(checkpoint_path):
    engine, clock = _engine(checkpoint_path)
    a_img, b_img = _images(2)
    alone = [engine.run(img, "gray").results for img in (a_img, b_img)]
    seen: list[tuple[str, int]] = []
    a = engine.start_run(a_img, "gray", on_result=lambda r: seen.append(("a", r.stage)))
    b = engine.start_run(b_img, "gray", on_result=lambda r: seen.append(("b", r.stage)))
    for run in (a, b, a, b, b, a, a, b):   # arbitrary interleaving, 4 stages each
        run.step()
    assert a.done and b.done
    assert seen == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3), ("a", 4), ("b", 4)]
    for run, expected in ((a, alone[0]), (b, alone[1])):
        assert [r.stage for r in run.report.results] == [1, 2, 3, 4]
        assert run.report.stop_reason is StopReason.COMPLETE
        for got, want in zip(run.report.results, expected):
            np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)


def test_run_is_the_stepper_back_to_back(checkpoint_path):
    engine, clock = _engine(checkpoint_path)
    (img,) = _images(1)
    t0 = clock.now()
    report = engine.run(img, "gray", deadline=t0 + 6 * MS)   # 2 stages of 2.5 ms fit, not 3
    engine2, clock2 = _engine(checkpoint_path)
    run = engine2.start_run(img, "gray", deadline=clock2.now() + 6 * MS)
    steps = 0
    while run.step():
        steps += 1
    assert [r.stage for r in run.report.results] == [r.stage for r in report.results] == [1, 2]
    assert run.report.stop_reason is report.stop_reason is StopReason.DEADLINE
    assert [s - report.began_at for s in report.started_at] == \
           [s - run.report.began_at for s in run.report.started_at]
    assert steps == 1 and run.next_stage is None
    with pytest.raises(EngineError, match="this run has ended"):
        run._step()


def test_edf_over_real_stages_and_a_frame_ending_with_its_last_exit(checkpoint_path):
    engine, clock = _engine(checkpoint_path)
    imgs = _images(2)
    order: list[tuple[str, int, bool, bool]] = []

    def log(name):
        return lambda r: order.append((name, r.stage, r.is_final, r.repeated))

    t0 = clock.now()
    sched = StageScheduler(["front", "rear"], clock.now)
    # rear: 6 ms (two 2.5 ms stages); front: 16 ms (six stage slots, but rear goes first).
    rear = engine.start_run(imgs[1], "gray", deadline=t0 + 6 * MS, on_result=log("rear"))
    front = engine.start_run(imgs[0], "gray", deadline=t0 + 16 * MS, on_result=log("front"))
    sched.add("front", front)
    sched.add("rear", rear)
    sched.drain()
    # EDF: rear's two stages first (the second is final: stage 3 cannot end by 6 ms); front then has
    # 5..16 ms: stages 1-4 (ending 7.5, 10, 12.5, 15 ms), complete.
    assert order == [("rear", 1, False, False), ("rear", 2, True, False),
                     ("front", 1, False, False), ("front", 2, False, False), ("front", 3, False, False),
                     ("front", 4, True, False)]
    assert not rear.report.overran and not front.report.overran
    # Every stage started with its predicted 2.5 ms fitting before its frame's deadline (admission).
    for run in (rear, front):
        for start, predicted in zip(run.report.started_at, run.report.predicted_s):
            assert start + predicted <= run.deadline + 1e-12


def test_a_frame_passed_over_by_edf_ends_with_a_repeated_final_answer(checkpoint_path):
    engine, clock = _engine(checkpoint_path)
    imgs = _images(2)
    seen: dict[str, list] = {"a": [], "b": []}
    t0 = clock.now()
    sched = StageScheduler(["a", "b"], clock.now)
    # a: 8 ms. a runs stage 1 alone, then b arrives with the earlier deadline (7.7 ms on the clock).
    a = engine.start_run(imgs[0], "gray", deadline=t0 + 8 * MS, on_result=seen["a"].append)
    sched.add("a", a)
    sched.step()                                   # a: stage 1, 0..2.5 ms; stage 2 still fits (5 <= 8)
    b = engine.start_run(imgs[1], "gray", deadline=clock.now() + 5.2 * MS, on_result=seen["b"].append)
    sched.add("b", b)
    sched.drain()
    # EDF: b's stages 1 and 2 (2.5..7.5 ms; stage 3 would end at 10 > 7.7: exit 2 is final).
    assert [(r.stage, r.is_final) for r in seen["b"]] == [(1, False), (2, True)]
    # After b's two stages (2.5..7.5 ms) a's stage 2 (2.5 ms) no longer fits by 8 ms: a ends with
    # exit 1, handed over again as the final answer (a repeat, stop reason DEADLINE).
    assert [(r.stage, r.is_final, r.repeated, r.stop_reason) for r in seen["a"]] == [
        (1, False, False, StopReason.NONE), (1, True, True, StopReason.DEADLINE)]
    assert a.report.final_repeated and sched.stats["a"].expired == 1
    assert sum(r.is_final for r in seen["a"]) == sum(r.is_final for r in seen["b"]) == 1


def test_interleaved_runs_keep_their_own_exits_for_the_ensemble(checkpoint_path):
    import dataclasses

    # Exit k answers with the mean of exits 1..k: an answer mixing in the other image's exits would show.
    spec = {"kind": "geometric", "weights": [[1.0], [0.5, 0.5], [1 / 3] * 3, [0.25] * 4]}
    checkpoint = dataclasses.replace(load_checkpoint(checkpoint_path), ensemble=spec)
    engine = StagedEngine(checkpoint, "cpu", probe_interval_s=0.0)
    assert engine.use_ensemble
    a_img, b_img = _images(2)
    alone = [engine.run(img, "gray").results for img in (a_img, b_img)]
    a, b = engine.start_run(a_img, "gray"), engine.start_run(b_img, "gray")
    for run in (a, b, b, a, a, b, b, a):
        run.step()
    for run, expected in ((a, alone[0]), (b, alone[1])):
        assert all(r.ensemble for r in run.report.results)
        for got, want in zip(run.report.results, expected, strict=True):
            np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)


def test_a_run_ending_beside_another_deadline_frame_leaves_the_probe_for_later(checkpoint_path):
    engine, clock = _engine(checkpoint_path, probe_interval_s=0.02)  # the starvation probe on: deeper stages never ran
    imgs = _images(2)
    t0 = clock.now()
    sched = StageScheduler(["a", "b"], clock.now)
    a = engine.start_run(imgs[0], "gray", deadline=t0 + 3 * MS)    # one stage fits: ends DEADLINE
    b = engine.start_run(imgs[1], "gray", deadline=t0 + 30 * MS)
    sched.add("a", a)
    sched.add("b", b)
    sched.step()
    # a ended while b (a deadline) was in flight: no probe, which would have run stages 2-4 on b's time.
    assert a.done and a.report.stop_reason is StopReason.DEADLINE and a.report.probed_stages == ()
    sched.drain()
    assert b.report.stop_reason is StopReason.COMPLETE
    # Alone, the same run probes as run() does (once b's measurements of stages 2-4 are stale).
    clock.advance(0.05)
    c = engine.start_run(imgs[0], "gray", deadline=clock.now() + 3 * MS)
    sched.add("a", c)
    sched.drain()
    assert c.report.stop_reason is StopReason.DEADLINE and c.report.probed_stages[0] == 1


def test_step_cost_adds_the_recent_hand_over_to_the_next_stage(checkpoint_path):
    engine, clock = _engine(checkpoint_path)
    img = _images(1)[0]
    silent = engine.start_run(img, "gray", deadline=clock.now() + 1.0)
    assert silent.step_cost == silent.next_cost  # nothing handed over: the stage alone

    def slow_publish(result) -> None:  # a hand-over (building and publishing the message) of 0.7 ms
        clock.advance(0.7 * MS)

    run = engine.start_run(img, "gray", deadline=clock.now() + 1.0, on_result=slow_publish)
    assert run.step_cost == run.next_cost  # no hand-over measured yet
    assert run.step()
    assert run.step_cost == pytest.approx(run.next_cost + 0.7 * MS)
    assert run.next_cost == pytest.approx(engine._predict(1))
