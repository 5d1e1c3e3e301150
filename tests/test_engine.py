"""StagedEngine on the CPU with the real smallcnn network: modes, admission rule, calibration, devices."""

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

CLASSES = [f"class{i}" for i in range(10)]
PREPROCESSING = {"input_size": [28, 28], "channels": "gray", "mean": [0.286], "std": [0.353]}
MS = 1e-3


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=(28, 28)))
    # Non-trivial batch-norm statistics, so eval-mode outputs differ between exits.
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 28, 28))
    path = tmp_path_factory.mktemp("ckpt") / "smallcnn.pt"
    return save_checkpoint(path, net, class_names=CLASSES, preprocessing=PREPROCESSING,
                           exit_accuracy=[0.7, 0.8, 0.85, 0.9])


@pytest.fixture
def checkpoint(checkpoint_path):
    return load_checkpoint(checkpoint_path)  # a fresh network per engine: the engine owns it


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, size=(28, 28), endpoint=True).astype(np.uint8)


def _known_costs(num_stages: int, block_ms, head_ms, n: int = 50) -> TimingModel:
    """A timing model whose every quantile is the given constant cost per stage."""
    model = TimingModel(num_stages)
    for _ in range(n):
        for k in range(num_stages):
            model.record(k, block_ms[k] * MS, head_ms[k] * MS)
    return model


def _engine(checkpoint, **kwargs) -> StagedEngine:
    return StagedEngine(checkpoint, "cpu", **kwargs)


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
    # Stages 1-2 are predicted at 2 ms each, stage 3 at 10 s: with 5 s left,
    # stages 1 and 2 are admitted and stage 3 is not. The margins are wide so a
    # busy CI machine (a stall of seconds) cannot change the outcome.
    timing = _known_costs(4, block_ms=[1.5, 1.5, 9000, 9000], head_ms=[0.5, 0.5, 1000, 1000])
    engine = _engine(checkpoint, timing=timing, online_update=False)
    deadline = time.monotonic() + 5.0
    report = engine.run(image, "gray", deadline=deadline)
    assert [r.stage for r in report.results] == [1, 2]
    assert report.stop_reason is StopReason.DEADLINE and report.final.is_final
    assert report.final.stop_reason is StopReason.DEADLINE and not report.results[0].is_final
    assert report.predicted_s == pytest.approx([2 * MS, 2 * MS])
    for started, predicted in zip(report.started_at, report.predicted_s):
        assert started + predicted <= deadline  # no stage started past its predicted completion
    # Stage 3 would not have fitted at the moment stage 2 was ready.
    assert report.final.ready_time + timing.predict_anytime_completion(2) > deadline
    assert not report.overran and report.overrun_s == 0.0
    assert timing.sample_counts(0) == (50, 50)  # online_update=False left the known costs alone


def test_admission_uses_the_quantile(checkpoint, image):
    # 99 fast samples and one slow one (100 s): p50 admits stage 1 within 2 s, p100 does not.
    timing = _known_costs(4, block_ms=[5] * 4, head_ms=[1] * 4, n=99)
    timing.record(0, 100.0, 0.0)
    engine = _engine(checkpoint, timing=timing, online_update=False, admission_quantile=1.0)
    assert engine.run(image, "gray", deadline=time.monotonic() + 200.0).final.stage == 4
    assert engine.run(image, "gray", deadline=time.monotonic() + 2.0).stop_reason is StopReason.NO_TIME
    engine.admission_quantile = 0.5
    assert engine.run(image, "gray", deadline=time.monotonic() + 2.0).results


@pytest.mark.parametrize("mode", ["anytime", "cascade", "apriori"])
def test_deadline_in_the_past_is_no_time(checkpoint, image, mode):
    engine = _engine(checkpoint, timing=_known_costs(4, [1] * 4, [1] * 4))
    seen = []
    report = engine.run(image, "gray", deadline=time.monotonic() - 1.0, mode=mode, on_result=seen.append)
    assert report.stop_reason is StopReason.NO_TIME
    assert report.results == [] and seen == [] and report.stages_run == 0 and report.final is None
    assert not report.overran


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
    timing = _known_costs(4, block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5])
    assert [round(timing.predict_exit_cost(k) / MS) for k in range(4)] == [15, 35, 65, 105]
    engine = _engine(checkpoint, timing=timing, online_update=False)
    seen = []
    deadline = time.monotonic() + budget_ms * MS
    report = engine.run(image, "gray", deadline=deadline, mode="apriori", on_result=seen.append)
    assert report.stop_reason is reason
    if exit_stage is None:
        assert report.results == [] and seen == []
        return
    assert seen == report.results and len(report.results) == 1
    assert report.final.stage == exit_stage and report.final.is_final
    assert report.stages_run == exit_stage
    assert report.started_at[0] + report.predicted_s[0] <= deadline


def test_apriori_cap_and_online_update_of_skipped_heads(checkpoint, image):
    timing = _known_costs(4, block_ms=[10, 20, 30, 40], head_ms=[5, 5, 5, 5])
    engine = _engine(checkpoint, timing=timing)
    report = engine.run(image, "gray", deadline=time.monotonic() + 10.0, mode="apriori", max_stage=2)
    assert report.final.stage == 2 and report.stop_reason is StopReason.MAX_STAGE
    # Blocks 0 and 1 ran and were measured; only head 1 ran.
    assert timing.sample_counts(0) == (51, 50) and timing.sample_counts(1) == (51, 51)
    assert timing.sample_counts(2) == (50, 50)


def test_overrun_is_reported(checkpoint, image):
    # Predictions far below the truth (1 us per stage) and 300 us left: stage 1 is admitted,
    # takes longer (two 3x3 convolutions with 32 channels at 28x28), and the run overruns.
    timing = _known_costs(4, block_ms=[1e-3] * 4, head_ms=[0.0] * 4)
    engine = _engine(checkpoint, timing=timing, online_update=False)
    x = engine.preprocessor(image, "gray")
    for _ in range(5):  # retried only if the process was descheduled before stage 1 was admitted
        deadline = time.monotonic() + 300e-6
        report = engine.run_tensor(x, deadline=deadline)
        if report.results:
            break
    assert report.results and report.overran
    assert report.overrun_s == pytest.approx(report.final.ready_time - deadline)
    assert report.final.stop_reason is StopReason.DEADLINE  # nothing more is admitted after the overrun


def test_slow_callback_is_reserved_before_the_next_stage(checkpoint, image):
    timing = _known_costs(4, block_ms=[1] * 4, head_ms=[0.0] * 4)
    engine = _engine(checkpoint, timing=timing, online_update=False)
    engine.run(image, "gray", on_result=lambda r: time.sleep(0.6))  # teaches the engine: ~600 ms per callback
    report = engine.run(image, "gray", deadline=time.monotonic() + 0.4, on_result=lambda r: None)
    # 1 ms stage + 600 ms callback reserve > 400 ms: stage 2 is refused before stage 1's result is handed over.
    assert len(report.results) == 1 and report.final.is_final and report.final_announced
    assert report.stop_reason is StopReason.DEADLINE


def test_queued_anytime_loop_logic(checkpoint, image):
    # On CUDA, anytime runs queue stage k+1 before reading exit k. That loop's admission and
    # stop logic is device independent: the CPU executor completes each launch at once, so
    # marking it asynchronous runs the CUDA loop here with the real network.
    timing = _known_costs(4, block_ms=[1.5, 1.5, 9000, 9000], head_ms=[0.5, 0.5, 1000, 1000])
    engine = _engine(checkpoint, timing=timing, online_update=False)
    engine._executor.is_async = True
    seen = []
    deadline = time.monotonic() + 5.0  # wide margins: a busy CI machine cannot change the outcome
    report = engine.run(image, "gray", deadline=deadline, on_result=seen.append)
    assert [r.stage for r in report.results] == [1, 2] and seen == report.results
    assert report.stop_reason is StopReason.DEADLINE and [r.is_final for r in seen] == [False, True]
    for started, predicted in zip(report.started_at, report.predicted_s):
        assert started + predicted <= deadline
    assert engine.run(image, "gray").stop_reason is StopReason.COMPLETE
    assert engine.run(image, "gray", max_stage=3).stop_reason is StopReason.MAX_STAGE
    assert engine.run(image, "gray", deadline=time.monotonic() - 1).stop_reason is StopReason.NO_TIME
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
    assert other.run(image, "gray", deadline=time.monotonic() + 10.0).stop_reason is StopReason.COMPLETE
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
        engine.run_tensor(torch.zeros(1, 3, 28, 28))


def test_run_tensor_and_top_k(checkpoint, image):
    engine = _engine(checkpoint, top_k=3)
    x = engine.preprocessor(image, "gray")
    report = engine.run_tensor(x, max_stage=1)
    assert len(report.final.top_ids) == 3 and report.final.stage == 1
    np.testing.assert_allclose(report.final.probs, engine.run(image, "gray", max_stage=1).final.probs, atol=1e-7)


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


def test_refused_stage_is_probed_so_an_inflated_estimate_recovers(checkpoint, image):
    # A load spike (10 s per stage) fills every window: without measurements of the
    # refused stages the engine would answer NO_TIME for ever. Each stopped run
    # measures the refused stage once (answer discarded), so the windows refill
    # with real costs and, stage by stage, the network is admitted again.
    timing = TimingModel(4, window=8)
    for k in range(4):
        for _ in range(8):
            timing.record(k, 10.0, 0.0)
    engine = _engine(checkpoint, timing=timing, probe_interval_s=1e-9)
    first = engine.run(image, "gray", deadline=time.monotonic() + 1.0)
    assert first.stop_reason is StopReason.NO_TIME and not first.results and first.probed_stage == 0
    reports = [engine.run(image, "gray", deadline=time.monotonic() + 1.0) for _ in range(40)]
    assert reports[-1].stop_reason is StopReason.COMPLETE and reports[-1].probed_stage is None
    for report in reports:  # probing never bends the admission rule for the frame's own stages
        for started, predicted in zip(report.started_at, report.predicted_s):
            assert started + predicted <= report.deadline
    # Without online updates (known costs held fixed) nothing is probed.
    frozen = _engine(checkpoint, timing=_known_costs(4, [10_000] * 4, [0] * 4), online_update=False)
    assert frozen.run(image, "gray", deadline=time.monotonic() + 1.0).probed_stage is None


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
