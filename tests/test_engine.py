"""StagedEngine on the CPU with a real smallcnn network: modes, admission rule, calibration, devices.

The deadline tests run the real network through the real engine on a fake
clock (tests/fake_clock.py): forward hooks make every block and head take a
known time, so which stages run, the stop reasons, ready times and overruns are
exact and do not depend on how fast or busy the machine is.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.engine import (
    DeviceFallbackWarning,
    DeviceUnavailableError,
    EngineError,
    Mode,
    StagedEngine,
    StopReason,
)
from impatient_ros.runtime.model import NetConfig, build_network
from impatient_ros.runtime.timing import TimingError, TimingModel
from tests.fake_clock import FakeClock, set_stage_costs

CLASSES = [f"class{i}" for i in range(10)]
# The smallest smallcnn at 16x16 (four stages at 16/8/4/2 pixels): the fake-clock
# simulations run thousands of real stages, and their cost does not depend on the
# network's size, only the wall time of the suite does.
SIDE = 16
PREPROCESSING = {"input_size": [SIDE, SIDE], "channels": "gray", "mean": [0.286], "std": [0.353]}
MS = 1e-3



@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=10, in_channels=1, input_size=(SIDE, SIDE)))
    # Non-trivial batch-norm statistics, so eval-mode outputs differ between exits.
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, SIDE, SIDE))
    path = tmp_path_factory.mktemp("ckpt") / "smallcnn.pt"
    return save_checkpoint(path, net, class_names=CLASSES, preprocessing=PREPROCESSING,
                           exit_accuracy=[0.7, 0.8, 0.85, 0.9])


@pytest.fixture
def checkpoint(checkpoint_path):
    return load_checkpoint(checkpoint_path)  # a fresh network per engine: the engine owns it


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, size=(SIDE, SIDE), endpoint=True).astype(np.uint8)


def _known_costs(num_stages: int, block_ms, head_ms, n: int = 50) -> TimingModel:
    """A timing model whose every quantile is the given constant cost per stage."""
    model = TimingModel(num_stages)
    for _ in range(n):
        for k in range(num_stages):
            model.record(k, block_ms[k] * MS, head_ms[k] * MS)
    return model


def _engine(checkpoint, **kwargs) -> StagedEngine:
    return StagedEngine(checkpoint, "cpu", **kwargs)


def _timed_engine(checkpoint, block_ms, head_ms, *, predicted: TimingModel | None = None,
                  **kwargs) -> tuple[StagedEngine, FakeClock]:
    """An engine on a fake clock whose real blocks and heads take ``block_ms``/``head_ms`` each.

    Its timing model predicts exactly those costs unless ``predicted`` says otherwise.
    """
    clock = FakeClock()
    timing = predicted if predicted is not None else _known_costs(len(block_ms), block_ms, head_ms)
    engine = _engine(checkpoint, timing=timing, clock=clock.now, **kwargs)
    set_stage_costs(engine.net, clock, [b * MS for b in block_ms], [h * MS for h in head_ms])
    return engine, clock


def _seen(results) -> list[tuple[int, bool, StopReason, bool]]:
    """(stage, is_final, stop_reason, repeated) of each result."""
    return [(r.stage, r.is_final, r.stop_reason, r.repeated) for r in results]


# --------------------------------------------------------------------------- modes


def test_anytime_without_deadline_runs_every_stage(checkpoint, image):
    engine = _engine(checkpoint)
    seen = []
    report = engine.run(image, "gray", on_result=seen.append)
    assert engine.num_stages == 4
    assert [r.stage for r in report.results] == [1, 2, 3, 4] and seen == report.results
    assert report.stop_reason is StopReason.COMPLETE and report.stages_run == 4
    assert [r.is_final for r in report.results] == [False, False, False, True]
    assert [r.stop_reason for r in report.results] == [StopReason.NONE] * 3 + [StopReason.COMPLETE]
    first = report.results[0]
    assert first.num_stages == 4 and first.label == CLASSES[first.class_id]
    assert len(first.top_ids) == 5 and first.top_ids[0] == first.class_id
    assert first.top_scores == sorted(first.top_scores, reverse=True)
    assert first.score == pytest.approx(first.probs.max()) and first.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert first.ratio_1v2 == pytest.approx(first.top_scores[0] / first.top_scores[1])
    ready = [r.ready_time for r in report.results]
    assert ready == sorted(ready) and all(r.elapsed_s > 0 for r in report.results)
    assert not report.overran and report.deadline is None
    # Every run feeds the timing model (online update), even without a deadline.
    assert engine.timing.sample_counts(3) == (1, 1)


def test_engine_probs_equal_eager_network(checkpoint, image):
    engine = _engine(checkpoint)
    x = engine.preprocessor(image, "gray")
    with torch.inference_mode():
        eager = [torch.softmax(logits, -1)[0].numpy() for logits in engine.net(x)]
        eager_exit = torch.softmax(engine.net.forward_exit(x, 2), -1)[0].numpy()
    report = engine.run(image, "gray")
    for result, expected in zip(report.results, eager):
        np.testing.assert_allclose(result.probs, expected, atol=1e-6)
    apriori = engine.run(image, "gray", mode="apriori", max_stage=3)
    np.testing.assert_allclose(apriori.final.probs, eager_exit, atol=1e-6)


def test_blocks_and_heads_called_directly_still_run_hooks_registered_later(checkpoint, image):
    # The CPU executor calls forward directly while no hook could run (executors.call_module): a hook on a
    # block or head, or a global one, registered after the engine was built, must still run, and the
    # answers must not change either way.
    from impatient_ros.runtime.executors import call_module

    engine = _engine(checkpoint)
    plain = engine.run(image, "gray")
    calls: list[str] = []
    handles = [engine.net.blocks[1].register_forward_hook(lambda m, i, o: calls.append("block 2")),
               engine.net.heads[2].register_forward_pre_hook(lambda m, i: calls.append("head 3"))]
    hooked = engine.run(image, "gray")
    for h in handles:
        h.remove()
    assert calls == ["block 2", "head 3"]
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        engine.run(image, "gray")
    finally:
        handle.remove()
    assert len(seen) >= 2 * engine.num_stages  # every block and head (and their inner modules)
    calls.clear()
    engine.run(image, "gray")
    assert calls == []  # removed hooks are gone: the direct path again
    for a, b in zip(plain.results, hooked.results):
        np.testing.assert_array_equal(a.probs, b.probs)
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(call_module(layer, x), layer(x))


def test_cascade_threshold_one_stops_at_stage_one_and_inf_never(checkpoint, image):
    engine = _engine(checkpoint)
    report = engine.run(image, "gray", mode=Mode.CASCADE, cascade_threshold=1.0)
    assert len(report.results) == 1 and report.stop_reason is StopReason.CONFIDENT
    assert report.final.is_final and report.final.stop_reason is StopReason.CONFIDENT
    report = engine.run(image, "gray", mode="cascade", cascade_threshold=math.inf)
    assert len(report.results) == 4 and report.stop_reason is StopReason.COMPLETE
    # A threshold between the exits' ratios stops at the first exit that reaches it.
    ratios = [r.ratio_1v2 for r in report.results]
    threshold = max(ratios[:3]) if max(ratios[:3]) > ratios[0] else None
    if threshold is not None:
        expected_stage = next(i for i, r in enumerate(ratios) if r >= threshold) + 1
        stopped = engine.run(image, "gray", mode="cascade", cascade_threshold=threshold)
        assert stopped.final.stage == expected_stage and stopped.stop_reason is StopReason.CONFIDENT
    with pytest.raises(EngineError, match="cascade_threshold"):
        engine.run(image, "gray", mode="cascade", cascade_threshold=0.5)


@pytest.mark.parametrize("mode", ["anytime", "cascade", "apriori"])
def test_max_stage_cap(checkpoint, image, mode):
    engine = _engine(checkpoint)
    report = engine.run(image, "gray", mode=mode, max_stage=2, cascade_threshold=math.inf)
    assert report.final.stage == 2 and report.stop_reason is StopReason.MAX_STAGE
    assert report.stages_run == 2
    assert len(report.results) == (1 if mode == "apriori" else 2)
    full = engine.run(image, "gray", mode=mode, max_stage=4, cascade_threshold=math.inf)
    assert full.stop_reason is StopReason.COMPLETE  # the cap at the last exit is just completion
    assert engine.run(image, "gray", mode=mode, max_stage=0, cascade_threshold=math.inf).final.stage == 4
    assert engine.run(image, "gray", mode=mode, max_stage=9, cascade_threshold=math.inf).final.stage == 4
    with pytest.raises(EngineError, match="max_stage"):
        engine.run(image, "gray", mode=mode, max_stage=-1)


def test_mode_parsing():
    assert Mode.parse("ANYTIME") is Mode.ANYTIME
    assert Mode.parse("a-priori") is Mode.APRIORI and Mode.parse(Mode.CASCADE) is Mode.CASCADE
    with pytest.raises(EngineError, match="valid modes: anytime, apriori, cascade"):
        Mode.parse("greedy")


def test_result_types_live_in_the_torch_free_core():
    from impatient_ros.core import results

    assert (Mode, StopReason, EngineError) == (results.Mode, results.StopReason, results.EngineError)
    # The node's pure helpers and the tools use them without paying for torch.
    code = ("import sys; import impatient_ros.core.results, impatient_ros.ros.messages, impatient_ros.ros.diagnostics, "
            "impatient_ros.tools.monitor_stats; bad = [m for m in sys.modules if m.split('.')[0] == 'torch'];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_stop_reason_values_match_message_constants():
    from impatient_ros.msg import StagePrediction

    assert [int(s) for s in StopReason] == [0, 1, 2, 3, 4, 5, 6]
    for reason in StopReason:
        if reason is not StopReason.NO_TIME:  # engine only: never on the wire
            assert getattr(StagePrediction, f"STOP_{reason.name}") == int(reason)
    assert StopReason.NO_TIME == 6 and not hasattr(StagePrediction, "STOP_NO_TIME")


# --------------------------------------------------------------------------- deadlines


def test_admission_admits_exactly_the_stages_that_fit(checkpoint, image):
    # Stages 1-2 take 2 ms each, stages 3-4 10 ms; with 5 ms left stages 1 and 2 run
    # (ready at 2 and 4 ms) and stage 3 (4 + 10 > 5 ms) is refused.
    engine, clock = _timed_engine(checkpoint, block_ms=[1.5, 1.5, 9, 9], head_ms=[0.5, 0.5, 1, 1],
                                  online_update=False)
    t0 = clock.now()
    deadline = t0 + 5 * MS
    seen = []
    report = engine.run(image, "gray", deadline=deadline, on_result=seen.append)
    assert seen == report.results
    assert _seen(report.results) == [(1, False, StopReason.NONE, False), (2, True, StopReason.DEADLINE, False)]
    assert report.stop_reason is StopReason.DEADLINE and report.stages_run == 2 and not report.final_repeated
    assert report.began_at == t0 and report.deadline == deadline
    assert report.predicted_s == pytest.approx([2 * MS, 2 * MS])
    assert report.actual_s == pytest.approx([2 * MS, 2 * MS])
    assert report.started_at == pytest.approx([t0, t0 + 2 * MS])
    assert [r.ready_time for r in report.results] == pytest.approx([t0 + 2 * MS, t0 + 4 * MS])
    assert [r.elapsed_s for r in report.results] == pytest.approx([2 * MS, 4 * MS])
    assert not report.overran and report.overrun_s == 0.0
    assert clock.now() == pytest.approx(t0 + 4 * MS)  # nothing ran after stage 2 (no probe without online update)
    assert engine.timing.sample_counts(0) == (50, 50)  # online_update=False left the known costs alone


def test_a_stage_that_just_fits_is_admitted(checkpoint, image):
    # Binary fractions of a second: the sums are exact, so this is the rule's boundary itself.
    engine, clock = _timed_engine(checkpoint, block_ms=[250] * 4, head_ms=[250] * 4, online_update=False)
    report = engine.run(image, "gray", deadline=clock.now() + 0.5)  # stage 1 ends exactly at the deadline
    assert _seen(report.results) == [(1, True, StopReason.DEADLINE, False)] and not report.overran
    report = engine.run(image, "gray", deadline=math.nextafter(clock.now() + 0.5, 0.0))  # one ulp less
    assert report.stop_reason is StopReason.NO_TIME and report.results == []


def test_admission_uses_the_quantile(checkpoint, image):
    # Stages take 6 ms (5 + 1); the model also holds one slow sample of block 1 (100 s):
    # at p100 stage 1 is predicted at 100.001 s, at p50 at 6 ms.
    timing = _known_costs(4, block_ms=[5] * 4, head_ms=[1] * 4, n=99)
    timing.record(0, 100.0, 0.0)
    engine, clock = _timed_engine(checkpoint, block_ms=[5] * 4, head_ms=[1] * 4, predicted=timing,
                                  online_update=False, admission_quantile=1.0)
    report = engine.run(image, "gray", deadline=clock.now() + 200.0)
    assert report.stop_reason is StopReason.COMPLETE
    assert report.predicted_s == pytest.approx([100.001, 6 * MS, 6 * MS, 6 * MS])
    assert report.actual_s == pytest.approx([6 * MS] * 4)
    assert engine.run(image, "gray", deadline=clock.now() + 2.0).stop_reason is StopReason.NO_TIME
    engine.admission_quantile = 0.5
    report = engine.run(image, "gray", deadline=clock.now() + 2.0)
    assert report.stop_reason is StopReason.COMPLETE and report.predicted_s == pytest.approx([6 * MS] * 4)


@pytest.mark.parametrize("mode", ["anytime", "cascade", "apriori"])
@pytest.mark.parametrize("ago_s", [0.0, 1.0], ids=["now", "past"])
def test_deadline_now_or_in_the_past_is_no_time(checkpoint, image, mode, ago_s):
    engine, clock = _timed_engine(checkpoint, [1] * 4, [1] * 4, online_update=False)
    t0 = clock.now()
    seen = []
    report = engine.run(image, "gray", deadline=t0 - ago_s, mode=mode, on_result=seen.append)
    assert report.stop_reason is StopReason.NO_TIME
    assert report.results == [] and seen == [] and report.stages_run == 0 and report.final is None
    assert not report.overran and clock.now() == t0  # no block ran


def test_deadline_without_timings_is_an_error(checkpoint, image):
    engine = _engine(checkpoint)
    with pytest.raises(TimingError, match="calibrate"):
        engine.run(image, "gray", deadline=time.monotonic() + 1.0)


@pytest.mark.parametrize(
    "budget_ms, exit_stage, reason",
    [
        (10, None, StopReason.NO_TIME),
        (25, 1, StopReason.DEADLINE),
        (50, 2, StopReason.DEADLINE),
        (85, 3, StopReason.DEADLINE),
        (200, 4, StopReason.COMPLETE),
    ],
)
def test_apriori_picks_deepest_exit_that_fits(checkpoint, image, budget_ms, exit_stage, reason):
    # Exit costs (blocks 0..k + head k): 15, 35, 65, 105 ms.
    engine, clock = _timed_engine(checkpoint, block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5],
                                  online_update=False)
    assert [round(engine.timing.predict_exit_cost(k) / MS) for k in range(4)] == [15, 35, 65, 105]
    exit_ms = [15, 35, 65, 105]
    seen = []
    t0 = clock.now()
    deadline = t0 + budget_ms * MS
    report = engine.run(image, "gray", deadline=deadline, mode="apriori", on_result=seen.append)
    assert report.stop_reason is reason
    if exit_stage is None:
        assert report.results == [] and seen == [] and clock.now() == t0
        return
    assert seen == report.results
    assert _seen(report.results) == [(exit_stage, True, reason, False)]
    assert report.stages_run == exit_stage
    assert report.predicted_s == pytest.approx([exit_ms[exit_stage - 1] * MS])
    assert report.actual_s == pytest.approx([exit_ms[exit_stage - 1] * MS])  # blocks 0..k and head k only
    assert report.final.ready_time == pytest.approx(t0 + exit_ms[exit_stage - 1] * MS)
    assert not report.overran


def test_apriori_cap_and_online_update_of_skipped_heads(checkpoint, image):
    engine, clock = _timed_engine(checkpoint, block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5])
    timing = engine.timing
    report = engine.run(image, "gray", deadline=clock.now() + 10.0, mode="apriori", max_stage=2)
    assert report.final.stage == 2 and report.stop_reason is StopReason.MAX_STAGE
    # Blocks 0 and 1 ran and were measured; only head 1 ran.
    assert timing.sample_counts(0) == (51, 50) and timing.sample_counts(1) == (51, 51)
    assert timing.sample_counts(2) == (50, 50)
    assert timing.block_samples(1)[-1] == pytest.approx(20 * MS) and timing.head_samples(1)[-1] == pytest.approx(5 * MS)


def test_overrun_is_reported(checkpoint, image):
    # Predictions far below the truth (1 us per stage; stage 1 really takes 1 ms) and 300 us
    # left: stage 1 is admitted, is ready 700 us after the deadline, and nothing follows.
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4,
                                  predicted=_known_costs(4, block_ms=[1e-3] * 4, head_ms=[0.0] * 4),
                                  online_update=False)
    x = engine.preprocessor(image, "gray")
    deadline = clock.now() + 300e-6
    report = engine.run_tensor(x, deadline=deadline)
    assert _seen(report.results) == [(1, True, StopReason.DEADLINE, False)]
    assert report.predicted_s == pytest.approx([1e-6]) and report.actual_s == pytest.approx([1 * MS])
    assert report.overran and report.overrun_s == pytest.approx(700e-6)
    assert report.overrun_s == pytest.approx(report.final.ready_time - deadline)


def test_slow_callback_is_reserved_before_the_next_stage(checkpoint, image):
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4, online_update=False)
    engine.run(image, "gray", on_result=lambda r: clock.advance(0.6))  # teaches the engine: 600 ms per callback
    report = engine.run(image, "gray", deadline=clock.now() + 0.4, on_result=lambda r: None)
    # 1 ms stage + 600 ms callback reserve > 400 ms: stage 2 is refused before stage 1's result is handed over.
    assert _seen(report.results) == [(1, True, StopReason.DEADLINE, False)] and not report.final_repeated
    assert report.stop_reason is StopReason.DEADLINE


# --------------------------------------------------------------------------- one final answer per image


def test_callback_slower_than_reserved_gets_a_repeated_final_answer(checkpoint, image):
    # Stages take 1 ms, 10 ms are left and no callback was seen yet (nothing reserved): stage 2
    # fits when stage 1 is ready, so stage 1 goes out as not final. The callback then takes
    # 20 ms, stage 2 no longer fits, and the engine hands stage 1 over again as the final answer.
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4, online_update=False)
    seen = []

    def slow_publish(result):
        seen.append(result)
        clock.advance(20 * MS)

    t0 = clock.now()
    report = engine.run(image, "gray", deadline=t0 + 10 * MS, on_result=slow_publish)
    assert seen == report.results
    assert _seen(seen) == [(1, False, StopReason.NONE, False), (1, True, StopReason.DEADLINE, True)]
    assert sum(r.is_final for r in seen) == 1
    assert report.final_repeated and report.stop_reason is StopReason.DEADLINE and report.stages_run == 1
    first, repeat = seen
    # The same answer, ready when it was first ready: the frame's answer was in time.
    assert repeat.probs is first.probs and repeat.class_id == first.class_id
    assert repeat.ready_time == first.ready_time == pytest.approx(t0 + 1 * MS) and not report.overran
    assert report.actual_s == pytest.approx([1 * MS, 0.0]) and math.isnan(report.predicted_s[1])
    assert report.started_at == pytest.approx([t0, t0 + 21 * MS])  # handed over after the first callback
    assert clock.now() == pytest.approx(t0 + 41 * MS)  # the repeat went through the same callback
    # The engine learnt the callback's cost: the next frame stops at stage 1 before handing it over.
    seen.clear()
    report = engine.run(image, "gray", deadline=clock.now() + 10 * MS, on_result=slow_publish)
    assert _seen(seen) == [(1, True, StopReason.DEADLINE, False)] and not report.final_repeated


class _OutOfMemoryOnce(nn.Module):
    """A real block that fails its next ``failures`` calls as a CUDA allocation would, then works."""

    def __init__(self, block: nn.Module, failures: int = 1) -> None:
        super().__init__()
        self.block, self.failures = block, failures

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.block(h)


@pytest.mark.parametrize("queued", [False, True], ids=["stepwise", "queued"])
def test_failing_stage_ends_the_answers_with_a_repeated_error_final(checkpoint, image, queued):
    checkpoint.net.blocks[2] = _OutOfMemoryOnce(checkpoint.net.blocks[2])  # stage 3 fails once
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4)
    engine._executor.is_async = queued
    seen = []
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run(image, "gray", deadline=clock.now() + 1.0, on_result=seen.append)
    # Step by step, stage 3 fails after exit 2 went out; queued (as on CUDA), stage 3 is
    # launched before exit 2 is read, so exit 1 is the last answer out.
    last = 1 if queued else 2
    assert _seen(seen) == [(k, False, StopReason.NONE, False) for k in range(1, last + 1)] + [
        (last, True, StopReason.ERROR, True)]
    assert seen[-1].probs is seen[-2].probs
    # The engine is usable again: the next image gets every stage.
    assert _seen(engine.run(image, "gray", on_result=seen.append).results)[-1] == (
        4, True, StopReason.COMPLETE, False)


def test_failing_callback_ends_the_answers_with_a_repeated_error_final(checkpoint, image):
    engine = _engine(checkpoint)
    seen = []

    def publish(result):
        seen.append(result)
        if result.stage == 2:  # the first and the repeated hand-over of stage 2 both fail
            raise ValueError(f"publisher failure {len(seen)}")

    with pytest.raises(ValueError, match="publisher failure 2"):  # the first error, not the repeat's
        engine.run(image, "gray", on_result=publish)
    assert _seen(seen) == [(1, False, StopReason.NONE, False), (2, False, StopReason.NONE, False),
                           (2, True, StopReason.ERROR, True)]


@pytest.mark.parametrize("mode", ["anytime", "apriori"])
def test_failure_before_any_answer_hands_nothing_over(checkpoint, image, mode):
    checkpoint.net.blocks[0] = _OutOfMemoryOnce(checkpoint.net.blocks[0])
    engine = _engine(checkpoint)
    seen = []
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run(image, "gray", mode=mode, on_result=seen.append)
    assert seen == []


def test_queued_anytime_loop_logic(checkpoint, image):
    # On CUDA, anytime runs queue stage k+1 before reading exit k. That loop's admission and
    # stop logic is device independent: the CPU executor completes each launch at once, so
    # marking it asynchronous runs the CUDA loop here with the real network.
    engine, clock = _timed_engine(checkpoint, block_ms=[1.5, 1.5, 9, 9], head_ms=[0.5, 0.5, 1, 1],
                                  online_update=False)
    engine._executor.is_async = True
    seen = []
    t0 = clock.now()
    report = engine.run(image, "gray", deadline=t0 + 5 * MS, on_result=seen.append)
    assert seen == report.results
    assert _seen(report.results) == [(1, False, StopReason.NONE, False), (2, True, StopReason.DEADLINE, False)]
    # Stage 2 was queued when exit 1 was done (2 ms), before exit 1 was handed over.
    assert report.started_at == pytest.approx([t0, t0 + 2 * MS])
    assert report.predicted_s == pytest.approx([2 * MS, 2 * MS])
    assert [r.ready_time for r in report.results] == pytest.approx([t0 + 2 * MS, t0 + 4 * MS])
    assert engine.run(image, "gray").stop_reason is StopReason.COMPLETE
    assert engine.run(image, "gray", max_stage=3).stop_reason is StopReason.MAX_STAGE
    assert engine.run(image, "gray", deadline=clock.now()).stop_reason is StopReason.NO_TIME
    reference = _engine(load_checkpoint(checkpoint.meta["path"])).run(image, "gray")
    for queued, stepwise in zip(engine.run(image, "gray").results, reference.results):
        np.testing.assert_allclose(queued.probs, stepwise.probs, atol=1e-6)


# --------------------------------------------------------------------------- calibration


def test_calibrate_save_load_round_trip(checkpoint, checkpoint_path, tmp_path, image):
    engine = _engine(checkpoint)
    timing = engine.calibrate(warmup=1, iterations=5)
    assert engine.is_calibrated and timing.sample_counts(3) == (5, 5)
    assert all(engine.timing.stage_cost(k) > 0 for k in range(4))
    path = engine.save_calibration(tmp_path / "timing.json")
    other = _engine(load_checkpoint(checkpoint_path))
    other.load_calibration(path)
    for k in range(4):
        assert other.timing.stage_cost(k) == pytest.approx(engine.timing.stage_cost(k))
        assert other.timing.predict_exit_cost(k) == pytest.approx(engine.timing.predict_exit_cost(k))
    # On a clock that stands still, the loaded costs alone decide: each stage fits in 1 s.
    clock = FakeClock()
    other.clock = clock.now
    assert other.run(image, "gray", deadline=clock.now() + 1.0).stop_reason is StopReason.COMPLETE
    # A file from another device is refused unless strict=False.
    foreign = TimingModel.load(path)
    foreign.device = "cuda:Some GPU|fp32|graphs"
    foreign.save(tmp_path / "foreign.json")
    with pytest.raises(TimingError, match="device"):
        other.load_calibration(tmp_path / "foreign.json")
    other.load_calibration(tmp_path / "foreign.json", strict=False)
    # A file for another network (different stage count) is refused.
    TimingModel.from_dict({**foreign.to_dict(), "stages": foreign.to_dict()["stages"][:3]}).save(tmp_path / "k3.json")
    with pytest.raises(TimingError, match="3 stages"):
        other.load_calibration(tmp_path / "k3.json", strict=False)


def test_timing_model_with_wrong_stage_count_rejected(checkpoint):
    with pytest.raises(TimingError, match="stages"):
        _engine(checkpoint, timing=TimingModel(3))


# --------------------------------------------------------------------------- devices and arguments


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_falls_back_or_raises(checkpoint, checkpoint_path):
    with pytest.warns(DeviceFallbackWarning, match="running on the CPU"):
        engine = StagedEngine(checkpoint, "cuda")
    assert engine.device.type == "cpu"
    with pytest.raises(DeviceUnavailableError, match="cuda:1"):
        StagedEngine(load_checkpoint(checkpoint_path), "cuda:1", allow_cpu_fallback=False)


def test_device_names_have_one_owner(monkeypatch):
    # The engine falls back to the CPU, the trainer refuses: both through runtime.device.
    from impatient_ros.runtime import device as device_module
    from impatient_ros.runtime import engine as engine_module
    from training.config import ConfigError
    from training.distributed import DistContext
    from training.trainer import resolve_device as trainer_device

    assert engine_module.resolve_device is device_module.resolve_device
    assert engine_module.DeviceUnavailableError is device_module.DeviceUnavailableError
    assert issubclass(device_module.DeviceUnavailableError, EngineError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA, also where there is one
    with pytest.warns(DeviceFallbackWarning, match="CUDA is not available"):
        assert device_module.resolve_device("cuda") == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        device_module.resolve_device("cuda:0", allow_cpu_fallback=False)
    assert trainer_device("auto") == trainer_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:1' asked for but CUDA is not available here; use --device cpu"):
        trainer_device("cuda:1")
    with pytest.raises(ConfigError, match="invalid device 'tpu'"):
        trainer_device("tpu")
    # Two GPUs (faked: only device objects are made): indices are checked; torchrun takes the local rank.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert trainer_device("auto") == trainer_device("cuda") == torch.device("cuda", 0)
    assert trainer_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        trainer_device("cuda:2")
    ddp = DistContext(rank=1, world_size=2, local_rank=1, backend="nccl")
    assert trainer_device("auto", ddp) == trainer_device("cuda:7", ddp) == torch.device("cuda", 1)
    assert trainer_device("cpu", ddp) == torch.device("cpu")


def test_auto_device_and_bad_arguments(checkpoint, checkpoint_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = StagedEngine(checkpoint, "auto")
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    fresh = lambda: load_checkpoint(checkpoint_path)  # noqa: E731
    with pytest.raises(EngineError, match="device"):
        StagedEngine(fresh(), "tpu")
    with pytest.raises(EngineError, match="admission_quantile"):
        StagedEngine(fresh(), "cpu", admission_quantile=0.0)
    with pytest.raises(EngineError, match="top_k"):
        StagedEngine(fresh(), "cpu", top_k=0)
    with pytest.raises(EngineError, match="shape"):
        engine.run_tensor(torch.zeros(1, 3, SIDE, SIDE))


def test_run_tensor_and_top_k(checkpoint, image):
    engine = _engine(checkpoint, top_k=3)
    x = engine.preprocessor(image, "gray")
    report = engine.run_tensor(x, max_stage=1)
    assert len(report.final.top_ids) == 3 and report.final.stage == 1
    np.testing.assert_allclose(report.final.probs, engine.run(image, "gray", max_stage=1).final.probs, atol=1e-7)


def test_results_ranked_when_read_equal_eager_ones(checkpoint, image):
    # The engine builds results whose ranking is computed from probs on first read (cheaper per exit);
    # every field must read as in a StageResult built with all of them.
    import dataclasses

    from impatient_ros.core.results import StageResult

    engine = _engine(checkpoint, top_k=4)
    for result in engine.run(image, "gray").results:
        probs = result.probs
        order = np.argsort(-probs, kind="stable")
        eager = StageResult(result.stage, result.num_stages, int(order[0]), CLASSES[order[0]],
                            float(probs[order[0]]), order[:4].tolist(), probs[order[:4]].tolist(),
                            float(probs[order[0]]) / max(float(probs[order[1]]), 1e-12), probs, result.ready_time,
                            result.elapsed_s, result.is_final, result.stop_reason)
        assert isinstance(result, StageResult) and result == eager and eager == result
        assert dataclasses.asdict(result).keys() == dataclasses.asdict(eager).keys()
        assert type(result.top_ids[0]) is int and type(result.score) is float
        final = dataclasses.replace(result, is_final=True, repeated=True)
        assert final.top_ids == eager.top_ids and final.repeated and final.label == eager.label
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.class_id = 3
    # ties keep the lower id first, as a stable argsort does
    from impatient_ros.runtime.stage_results import rank
    assert rank(np.array([0.25, 0.5, 0.25, 0.0], dtype=np.float32), 3)[0] == [1, 0, 2]


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp16, graphs, atol", [(False, True, 1e-4), (False, False, 1e-4), (True, True, 1e-2)],
                         ids=["fp32-graphs", "fp32-eager", "fp16-graphs"])
def test_cuda_engine_matches_eager_model(checkpoint_path, image, fp16, graphs, atol):
    engine = StagedEngine(load_checkpoint(checkpoint_path), "cuda", fp16=fp16, cuda_graphs=graphs)
    assert engine.device.type == "cuda" and engine.cuda_graphs == graphs
    reference = load_checkpoint(checkpoint_path).net.to(engine.device).eval()
    x = torch.from_numpy(image).float().div(255).sub(0.286).div(0.353)[None, None].to(engine.device)
    with torch.inference_mode():
        eager = [torch.softmax(logits, -1)[0].cpu().numpy() for logits in reference(x)]
    for _ in range(3):  # replays reuse the static buffers: every image must give fresh answers
        report = engine.run(image, "gray")  # anytime: stage k+1 queued before exit k is read
        assert [r.stage for r in report.results] == [1, 2, 3, 4]
        for result, expected in zip(report.results, eager):
            np.testing.assert_allclose(result.probs, expected, atol=atol)
    other = engine.run(255 - image, "gray")
    assert not np.allclose(other.final.probs, report.final.probs)
    apriori = engine.run(image, "gray", mode="apriori", max_stage=2)
    np.testing.assert_allclose(apriori.final.probs, eager[1], atol=atol)
    assert engine.run(image, "gray", mode="cascade", cascade_threshold=1.0).final.stage == 1
    engine.calibrate(warmup=2, iterations=10)
    assert engine.overhead_s >= 0.0 and engine.is_calibrated
    report = engine.run(image, "gray", deadline=time.monotonic() + 1.0)
    assert report.stop_reason is StopReason.COMPLETE and not report.overran
    assert engine.run(image, "gray", deadline=time.monotonic() - 1.0).stop_reason is StopReason.NO_TIME
    # The queued anytime path honours the admission rule too.
    engine.online_update = False
    for k in range(4):
        engine.timing.record(k, 0.5 if k == 2 else 1e-4, 1e-4)
    engine.admission_quantile = 1.0
    deadline = time.monotonic() + 0.2
    report = engine.run(image, "gray", deadline=deadline)
    assert [r.stage for r in report.results] == [1, 2] and report.stop_reason is StopReason.DEADLINE
    for started, predicted in zip(report.started_at, report.predicted_s):
        assert started + predicted <= deadline


def _variable_costs(net: nn.Module, clock: FakeClock, cost) -> None:
    """Block k and head k of ``net`` take ``cost("block"|"head", k)`` seconds on ``clock``, asked at each call."""
    for kind, modules in (("block", net.blocks), ("head", net.heads)):
        for k, module in enumerate(modules):
            module.register_forward_hook(lambda m, i, o, kind=kind, k=k: clock.advance(cost(kind, k)))


def _probe_time(engine: StagedEngine, clock: FakeClock) -> list[tuple[float, float]]:
    """(start, end) on the fake clock of every probe the engine runs from now on."""
    spans: list[tuple[float, float]] = []
    original = engine._probe_refused_stages

    def timed(report):
        t0 = clock.now()
        original(report)
        if report.probed_stages:
            spans.append((t0, clock.now()))

    engine._probe_refused_stages = timed
    return spans


QUIET_BLOCK_MS, QUIET_HEAD_MS = [1.0, 1.5, 1.0, 1.2], [0.2, 0.2, 0.3, 0.3]


def test_refused_stages_are_probed_down_to_the_deepest_stale_one(checkpoint, checkpoint_path, image):
    # A start-up calibration under load: every window holds 10 s per stage; stages really take 1 ms.
    # Only stages that run are measured, so without probes the engine would answer NO_TIME for ever.
    # One stopped run probes the refused stage and every deeper one (not only the first).
    spiked = TimingModel(4)
    for k in range(4):
        for _ in range(40):
            spiked.record(k, 10.0, 0.0)
            spiked.record_sums(k, stage_s=10.0)
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4, predicted=spiked)
    first = engine.run(image, "gray", deadline=clock.now() + 0.1)
    assert first.stop_reason is StopReason.NO_TIME and first.probed_stage == 0
    assert first.probed_stages == (0, 1, 2, 3)
    reports = []
    for _ in range(60):  # a 30 Hz camera, 2 s
        clock.advance(1 / 30)
        reports.append(engine.run(image, "gray", deadline=clock.now() + 0.1))
    for report in reports:  # probing never bends the admission rule for the frame's own stages
        for started, predicted in zip(report.started_at, report.predicted_s):
            assert started + predicted <= report.deadline
    # The spike's samples stop counting recent_s (0.5 s) after they were measured, once
    # min_recent (8) quiet samples exist: the probes bring those at the duty cycle's pace.
    complete = [i for i, r in enumerate(reports) if r.stop_reason is StopReason.COMPLETE]
    assert complete and (complete[0] + 1) / 30 <= 1.0
    assert all(r.stop_reason is StopReason.COMPLETE for r in reports[complete[0]:])
    # A stage measured less than probe_interval_s ago is not probed again; without online
    # updates (known costs held fixed) nothing is probed.
    engine, clock = _timed_engine(load_checkpoint(checkpoint_path), [1] * 4, [0] * 4,
                                  predicted=_known_costs(4, [10_000] * 4, [0] * 4), probe_interval_s=0.2,
                                  probe_duty=1.0)
    probed = []
    for _ in range(4):
        probed.append(engine.run(image, "gray", deadline=clock.now() + 1.0).probed_stages)
        clock.advance(0.15)
    assert probed == [(0, 1, 2, 3), (), (0, 1, 2, 3), ()]
    frozen, clock = _timed_engine(load_checkpoint(checkpoint_path), [1] * 4, [0] * 4,
                                  predicted=_known_costs(4, [10_000] * 4, [0] * 4), online_update=False)
    assert frozen.run(image, "gray", deadline=clock.now() + 1.0).probed_stage is None


def test_probe_runs_after_the_final_answer_and_keeps_its_duty_cycle(checkpoint, image):
    # Stage 3 is predicted at 10 s, so every frame stops after stage 2 (DEADLINE) and probes stages 3, 4.
    predicted = _known_costs(4, [1, 1, 10_000, 1], [0] * 4)
    engine, clock = _timed_engine(checkpoint, block_ms=[2] * 4, head_ms=[0] * 4, predicted=predicted,
                                  probe_duty=0.1)
    spans = _probe_time(engine, clock)
    handed: list[tuple[float, bool]] = []
    began = clock.now()
    reports = []
    for _ in range(300):  # 100 Hz for 3 s
        reports.append(engine.run(image, "gray", deadline=clock.now() + 0.005,
                                  on_result=lambda r: handed.append((clock.now(), r.is_final))))
        clock.advance(0.01)
    elapsed = clock.now() - began
    assert all(r.stop_reason is StopReason.DEADLINE and len(r.results) == 2 for r in reports)
    # The answers are out before a probe starts: the final one is handed over at its ready
    # time, before the deadline, and the probe starts after that.
    finals = [t for t, final in handed if final]
    probed = [r for r in reports if r.probed_stages]
    assert probed and all(r.probed_stages == (2, 3) for r in probed)
    assert all(not r.overran for r in reports)
    for (start, _), report in zip(spans, probed):
        assert report.final.ready_time <= report.deadline
        assert max(t for t in finals if t <= start + 1e-12) == pytest.approx(report.final.ready_time)
    # Duty cycle: after probes that took d, none for d * (1 - duty) / duty; overall <= duty.
    durations = [end - start for start, end in spans]
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 - e0 >= (e0 - s0) * 0.9 / 0.1 - 1e-9
    assert sum(durations) / elapsed <= 0.1 + max(durations) / elapsed
    assert len(spans) >= 5  # ... and it does probe


def test_probe_never_runs_after_a_failed_run(checkpoint, image):
    engine, clock = _timed_engine(checkpoint, block_ms=[1] * 4, head_ms=[0] * 4,
                                  predicted=_known_costs(4, [1, 1, 10_000, 1], [0] * 4))

    def failing(result):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        engine.run(image, "gray", deadline=clock.now() + 1.0, on_result=failing)
    assert engine._probe_free_at == -math.inf  # no probe ran


def _spike_scenario(checkpoint, spike_factor: float, spike_s: float, seed: int = 0, preempted: float = 0.0):
    """Frames at 30 Hz: 2 s quiet, ``spike_s`` with every cost times ``spike_factor``, then quiet.

    With ``preempted``, that share of the spike's blocks and heads takes 20 ms
    more (other runnable processes holding the core for their time slices).

    The budget is 4x the quiet full-path p99. Returns (engine, clock, per-frame
    (time, number of answers, stop reason), spike end time).
    """
    clock = FakeClock()
    rng = np.random.default_rng(seed)
    state = {"factor": 1.0}

    def cost(kind, k):
        base = (QUIET_BLOCK_MS if kind == "block" else QUIET_HEAD_MS)[k] * MS
        factor = state["factor"]
        slice_s = 20 * MS if factor > 1.0 and rng.uniform() < preempted else 0.0
        return factor * base * rng.uniform(0.9, 1.1) + slice_s

    engine = _engine(checkpoint, clock=clock.now)
    _variable_costs(engine.net, clock, cost)
    engine.calibrate(warmup=1, iterations=30)
    quiet_p99 = sum(engine.timing.stage_cost(k, 0.99) for k in range(4))
    budget = 4 * quiet_p99
    frames = []
    spike_end = None
    for phase, duration, factor in (("quiet", 2.0, 1.0), ("spike", spike_s, spike_factor), ("after", 3.0, 1.0)):
        state["factor"] = factor
        end = clock.now() + duration
        while clock.now() < end:
            t = clock.now()
            report = engine.run(image_for_spike, "gray", deadline=t + budget)
            frames.append((phase, t, len(report.results), report.stop_reason))
            clock.advance(max(0.0, t + 1 / 30 - clock.now()))
        if phase == "spike":
            spike_end = clock.now()
    return engine, frames, spike_end


image_for_spike = np.random.default_rng(1).integers(0, 255, size=(SIDE, SIDE), endpoint=True).astype(np.uint8)


@pytest.mark.parametrize("spike_factor, spike_s, preempted", [(20.0, 7.0, 0.0), (100.0, 6.0, 0.0), (2.0, 6.0, 0.05)])
def test_after_a_load_spike_admission_recovers_within_2_s(checkpoint, spike_factor, spike_s, preempted):
    # 3 busy processes on 2 cores: 2x slower with time-slice preemptions; or 20x, 100x slower.
    # Without the ageing rule (outlier_factor=inf) none of these recovers within 3 s.
    engine, frames, spike_end = _spike_scenario(checkpoint, spike_factor, spike_s, preempted=preempted)
    quiet = [n for phase, _, n, _ in frames if phase == "quiet"]
    assert quiet[-30:] == [4] * 30  # pre-spike admission: every exit within 4x the quiet p99
    # The spike itself: stages no longer fit (the budget is 4x the quiet p99); the probes keep measuring.
    spiked = [n for phase, _, n, _ in frames if phase == "spike"][-30:]
    assert max(spiked) <= (1 if preempted else 0)
    after = [(t - spike_end, n) for phase, t, n, _ in frames if phase == "after"]
    recovered = next(i for i, (_, n) in enumerate(after) if all(m == 4 for _, m in after[i:]))
    assert after[recovered][0] <= 2.0, after[recovered]


def test_steady_load_keeps_p99_admission(checkpoint, image):
    # A stationary cost distribution (log-normal per block and head, seeded): the ageing rule
    # only drops old samples far above the recent ones, so the 256-sample p99 holds. At most
    # 1 % of admitted stages end after the deadline; slightly more than 1 % take longer than
    # their p99 prediction (a 256-sample p99 of a skewed distribution is biased low, and
    # stages are admitted more often when their estimate happens to be low): 1.5-1.7 % with
    # these seeds, with or without the ageing rule.
    clock = FakeClock()
    rng = np.random.default_rng(7)

    def cost(kind, k):
        base = (QUIET_BLOCK_MS if kind == "block" else QUIET_HEAD_MS)[k] * MS
        return base * rng.lognormal(0.0, 0.35)

    engine = _engine(checkpoint, clock=clock.now)
    _variable_costs(engine.net, clock, cost)
    engine.calibrate(warmup=1, iterations=30)
    full = sum(engine.timing.stage_cost(k, 0.5) for k in range(4))
    budgets = np.random.default_rng(8).uniform(0.3 * full, 1.6 * full, 1500)
    admitted = above = late = overran = answered = 0
    for budget in budgets:
        t = clock.now()
        report = engine.run(image, "gray", deadline=t + budget)
        for predicted, actual, result in zip(report.predicted_s, report.actual_s, report.results):
            if not result.repeated:
                admitted += 1
                above += actual > predicted
                late += result.ready_time > report.deadline
        answered += bool(report.results)
        overran += report.overran
        clock.advance(max(0.0, t + 1 / 30 - clock.now()))
    assert admitted > 2000
    assert late / admitted <= 0.01, (late, admitted)
    assert overran / answered <= 0.01, (overran, answered)
    assert above / admitted <= 0.02, (above, admitted)


def test_calibration_under_a_transient_load_repeats_and_ends_stable(checkpoint, checkpoint_path):
    clock = FakeClock()
    began = clock.now()

    def cost(kind, k):  # another process starting: 5x slower during the first 250 ms (warm-up, round 1)
        base = (QUIET_BLOCK_MS if kind == "block" else QUIET_HEAD_MS)[k] * MS
        return base * (5.0 if clock.now() - began < 0.25 else 1.0)

    engine = _engine(checkpoint, clock=clock.now)
    _variable_costs(engine.net, clock, cost)
    engine.calibrate(warmup=1, iterations=20)
    report = engine.last_calibration
    assert report.stable and report.rounds >= 3
    # The kept samples are the quiet ones only: the p99 is the quiet cost.
    for k in range(4):
        assert engine.timing.stage_cost(k, 0.99) == pytest.approx((QUIET_BLOCK_MS[k] + QUIET_HEAD_MS[k]) * MS)
        assert engine.timing.sample_counts(k) == (20, 20)
    # Quiet from the start: two rounds, stable.
    quiet = _engine(load_checkpoint(checkpoint_path), clock=clock.now)
    set_stage_costs(quiet.net, clock, [b * MS for b in QUIET_BLOCK_MS], [h * MS for h in QUIET_HEAD_MS])
    quiet.calibrate(warmup=1, iterations=20)
    assert quiet.last_calibration.stable and quiet.last_calibration.rounds == 2


def test_calibration_that_never_settles_says_so(checkpoint):
    clock = FakeClock()
    calls = {"n": 0}

    def cost(kind, k):  # the load alternates every 10 passes (one round): medians never agree
        calls["n"] += 1
        return (1.0 if (calls["n"] // 80) % 2 == 0 else 3.0) * MS

    engine = _engine(checkpoint, clock=clock.now)
    _variable_costs(engine.net, clock, cost)
    engine.calibrate(warmup=0, iterations=20, max_rounds=5)
    assert not engine.last_calibration.stable and engine.last_calibration.rounds == 5
    assert engine.is_calibrated  # still usable: the last two rounds are kept
    # max_time_s bounds it as well (checked after each round of 10 passes, 80-240 ms here)
    engine.calibrate(warmup=0, iterations=20, max_rounds=100, max_time_s=0.3)
    assert not engine.last_calibration.stable and engine.last_calibration.rounds == 2


def test_calibration_and_runs_record_the_path_and_stage_sums(checkpoint, image):
    engine = StagedEngine(checkpoint, "cpu")
    engine.calibrate(warmup=1, iterations=25)
    model = engine.timing
    for k in range(engine.num_stages):
        path = model._path[k]
        assert len(path) == 25 and len(model._stage[k]) == 25
        # A path sample is blocks 0..k of one run: at least the fastest of each block added up.
        assert min(path) >= sum(min(model.block_samples(j)) for j in range(k + 1)) - 1e-12
    before = len(model._path[1])
    engine.run(image, "gray", mode=Mode.APRIORI, max_stage=2)  # blocks 0, 1 back to back, then head 1
    assert len(model._path[1]) == before + 1 and len(model._path[0]) == before + 1
    assert len(model._path[2]) == before  # not run


# --------------------------------------------------------------------------- exit ensembles

# Exit 2 answers with exit 1's probabilities alone; the other exits with their own.
_ECHO_EXIT_1 = {"kind": "geometric", "weights": [[1.0], [1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]}


def _with_ensemble(checkpoint, spec):
    import dataclasses

    return dataclasses.replace(checkpoint, ensemble=spec)


@pytest.mark.parametrize("mode", ["anytime", "cascade"])
def test_ensemble_changes_the_published_answer(checkpoint_path, mode):
    plain = _engine(load_checkpoint(checkpoint_path), use_ensemble=False)
    ens = _engine(_with_ensemble(load_checkpoint(checkpoint_path), _ECHO_EXIT_1))
    assert ens.use_ensemble and not plain.use_ensemble
    # An image on which exits 1 and 2 disagree: the ensemble then changes exit 2's published class.
    rng = np.random.default_rng(1)
    for _ in range(50):
        img = rng.integers(0, 255, size=(SIDE, SIDE), endpoint=True).astype(np.uint8)
        own = plain.run(img, "gray", mode=mode, cascade_threshold=math.inf).results
        if own[0].class_id != own[1].class_id:
            break
    else:
        pytest.fail("no image on which exits 1 and 2 disagree")
    combined = ens.run(img, "gray", mode=mode, cascade_threshold=math.inf).results
    assert [r.ensemble for r in combined] == [True] * 4 and not any(r.ensemble for r in own)
    assert combined[1].class_id == own[0].class_id != own[1].class_id
    np.testing.assert_allclose(combined[1].probs, own[0].probs, atol=1e-6)
    assert combined[1].probs.dtype == np.float32
    assert combined[1].ratio_1v2 == pytest.approx(own[0].ratio_1v2, rel=1e-4)  # the cascade reads this one
    for k in (0, 2, 3):  # weight 1 on the exit itself: its own answer
        np.testing.assert_allclose(combined[k].probs, own[k].probs, atol=1e-6)
    # A-priori at exit 2 answers with the ensemble as well.
    apriori = ens.run(img, "gray", mode="apriori", max_stage=2).final
    assert apriori.ensemble and apriori.class_id == own[0].class_id


# Exits 1-2 alone (as validation often keeps them), exits 3-4 real geometric combinations.
_MIXED = {"kind": "geometric", "weights": [[1.0], [0.0, 1.0], [0.3, 0.0, 0.9], [0.2, 0.4, 0.5, 1.1]]}


def test_answer_accuracy_follows_what_the_engine_publishes(checkpoint_path):
    # The checkpoint's exit_accuracy is the heads' own ([0.7, 0.8, 0.85, 0.9]); with an ensemble
    # answering, stage_accuracy must describe the ensemble's answers instead.
    loaded = load_checkpoint(checkpoint_path)
    assert _engine(loaded, use_ensemble=False).answer_accuracy == [0.7, 0.8, 0.85, 0.9]
    known = dict(_MIXED, val_accuracy=[0.7, 0.8, 0.87, 0.93])
    ens = _engine(_with_ensemble(load_checkpoint(checkpoint_path), known))
    assert ens.answer_accuracy == [0.7, 0.8, 0.87, 0.93] and ens.exit_accuracy == [0.7, 0.8, 0.85, 0.9]
    assert _engine(_with_ensemble(load_checkpoint(checkpoint_path), known), use_ensemble=False).answer_accuracy == \
        [0.7, 0.8, 0.85, 0.9]
    unknown = _engine(_with_ensemble(load_checkpoint(checkpoint_path), _MIXED)).answer_accuracy
    assert unknown[:2] == [0.7, 0.8] and all(math.isnan(a) for a in unknown[2:])


@pytest.mark.parametrize("mode", ["anytime", "apriori"])
@pytest.mark.parametrize("max_python_classes", [64, 0], ids=["python-floats", "numpy"])
def test_ensemble_answers_equal_the_core_rule(checkpoint_path, image, mode, max_python_classes, monkeypatch):
    # The engine skips the rows that are an exit alone and combines only the exits a row reads;
    # every published answer must still equal impatient_ros.core.ensemble's rule on the own answers,
    # in both of its forms (Python floats up to 64 classes, numpy above; 0 takes the numpy one here).
    import impatient_ros.runtime.engine as engine_module
    from impatient_ros.core.ensemble import combine_probabilities

    monkeypatch.setattr(engine_module, "_PY_ENSEMBLE_MAX_CLASSES", max_python_classes)

    own = _engine(load_checkpoint(checkpoint_path), use_ensemble=False).run(image, "gray").results
    expected = combine_probabilities(np.stack([r.probs for r in own]), _MIXED["weights"])
    ens = _engine(_with_ensemble(load_checkpoint(checkpoint_path), _MIXED))
    if mode == "anytime":
        answers = [r.probs for r in ens.run(image, "gray").results]
    else:
        answers = [ens.run(image, "gray", mode="apriori", max_stage=k).final.probs for k in range(1, 5)]
    for k, probs in enumerate(answers):
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected[k], atol=1e-6)
    assert not np.allclose(expected[3], own[3].probs, atol=1e-3)  # the combination does change exit 4


def test_ensemble_cascade_stops_on_the_combined_ratio(checkpoint_path, image):
    ens = _engine(_with_ensemble(load_checkpoint(checkpoint_path), _ECHO_EXIT_1))
    own = _engine(load_checkpoint(checkpoint_path), use_ensemble=False).run(image, "gray").results
    # A threshold exit 1 misses but exit 2's combined (= exit 1's) ratio cannot reach either,
    # while exit 2's own might: the ensemble cascade must not stop at exit 2 on its own ratio.
    threshold = own[0].ratio_1v2 * 1.0001
    report = ens.run(image, "gray", mode="cascade", cascade_threshold=threshold)
    assert all(r.stage != 2 or r.stop_reason is StopReason.NONE for r in report.results)
    assert report.results[1].ratio_1v2 == pytest.approx(own[0].ratio_1v2, rel=1e-4)


@pytest.mark.parametrize(("budget_ms", "plain_stage", "ensemble_stage"), [(37, 2, 1), (70, 3, 2), (125, 4, 4)])
def test_apriori_with_ensemble_admits_by_the_anytime_completion(checkpoint_path, image, budget_ms, plain_stage,
                                                                ensemble_stage):
    # Blocks 10, 20, 30, 40 ms, heads 5 ms: exit costs without the ensemble (blocks 0..k + head k)
    # 15, 35, 65, 105 ms; with it (blocks and heads 0..k) 15, 40, 75, 120 ms.
    stages = {}
    for use in (False, True):
        engine, clock = _timed_engine(_with_ensemble(load_checkpoint(checkpoint_path), _ECHO_EXIT_1),
                                      block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5], online_update=False,
                                      use_ensemble=use)
        assert [round(engine.timing.predict_ensemble_exit_cost(k) / MS) for k in range(4)] == [15, 40, 75, 120]
        t0 = clock.now()
        report = engine.run(image, "gray", deadline=t0 + budget_ms * MS, mode="apriori")
        final = report.final
        stages[use] = final.stage
        assert final.ensemble is use and report.stages_run == final.stage
        expected_ms = ([15, 40, 75, 120] if use else [15, 35, 65, 105])[final.stage - 1]
        assert report.predicted_s == pytest.approx([expected_ms * MS])
        assert report.actual_s == pytest.approx([expected_ms * MS])  # every head 0..k ran with the ensemble
        assert final.ready_time == pytest.approx(t0 + expected_ms * MS) and not report.overran
    assert stages == {False: plain_stage, True: ensemble_stage}


def test_apriori_with_ensemble_records_every_head(checkpoint_path, image):
    engine, clock = _timed_engine(_with_ensemble(load_checkpoint(checkpoint_path), _ECHO_EXIT_1),
                                  block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5])
    engine.run(image, "gray", deadline=clock.now() + 10.0, mode="apriori", max_stage=2)
    # Blocks 0, 1 and heads 0, 1 ran and were measured, as in anytime; stages 3-4 did not run.
    assert engine.timing.sample_counts(0) == (51, 51) and engine.timing.sample_counts(1) == (51, 51)
    assert engine.timing.sample_counts(2) == (50, 50)


def test_without_ensemble_nothing_changes(checkpoint, image):
    assert checkpoint.ensemble is None
    engine = _engine(checkpoint)
    assert not engine.use_ensemble and engine.ensemble_weights is None
    x = engine.preprocessor(image, "gray")
    with torch.inference_mode():
        eager = [torch.softmax(logits, -1)[0].numpy() for logits in engine.net(x)]
    for mode in ("anytime", "cascade", "apriori"):
        report = engine.run(image, "gray", mode=mode, cascade_threshold=math.inf)
        assert not any(r.ensemble for r in report.results)
        np.testing.assert_allclose(report.final.probs, eager[report.final.stage - 1], atol=1e-6)


def test_invalid_ensemble_is_refused(checkpoint):
    from impatient_ros.core.ensemble import EnsembleError

    with pytest.raises(EnsembleError, match="weight rows"):
        _engine(_with_ensemble(checkpoint, {"kind": "geometric", "weights": [[1.0]]}))


def test_ensemble_read_from_a_saved_checkpoint(checkpoint, tmp_path, image):
    # The weights travel in the file (checkpoint["ensemble"]); the engine uses them unless told not to.
    path = save_checkpoint(tmp_path / "ens.pt", checkpoint.net, class_names=CLASSES, preprocessing=PREPROCESSING,
                           ensemble=_ECHO_EXIT_1)
    engine = _engine(load_checkpoint(path))
    assert engine.use_ensemble and all(r.ensemble for r in engine.run(image, "gray").results)
    assert not _engine(load_checkpoint(path), use_ensemble=False).use_ensemble
