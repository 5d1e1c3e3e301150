"""TimingModel: quantiles, sliding window, predictions, calibration file round trip and rejection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from impatient_ros.runtime.timing import FORMAT, VERSION, TimingError, TimingModel


def _fed(num_stages: int = 3, block=(0.010, 0.020, 0.030), head=(0.001, 0.002, 0.003), n: int = 10) -> TimingModel:
    model = TimingModel(num_stages, device="cpu", input_size=(28, 28))
    for _ in range(n):
        for k in range(num_stages):
            model.record(k, block[k], head[k])
    return model


def test_constant_costs_give_exact_predictions():
    model = _fed()
    assert model.is_calibrated
    assert model.block_cost(1, 0.99) == pytest.approx(0.020)
    assert model.head_cost(2, 0.5) == pytest.approx(0.003)
    assert model.stage_cost(0) == pytest.approx(0.011)
    assert model.predict_anytime_completion(2) == pytest.approx(0.033)
    # a-priori exit 2: blocks 0, 1, 2 and head 2 only
    assert model.predict_exit_cost(2) == pytest.approx(0.010 + 0.020 + 0.030 + 0.003)
    assert model.predict_exit_cost(0) == pytest.approx(0.011)


def test_quantiles_follow_numpy():
    model = TimingModel(1)
    samples = np.random.default_rng(0).exponential(0.01, size=200)
    for value in samples:
        model.record(0, block_s=value, head_s=value / 10)
    for q in (0.5, 0.9, 0.99):
        assert model.block_cost(0, q) == pytest.approx(np.quantile(samples, q))
        assert model.stage_cost(0, q) == pytest.approx(1.1 * np.quantile(samples, q))


def test_quantiles_above_p99_follow_an_exponential_tail_and_ignore_one_outlier():
    model = TimingModel(1)
    samples = list(np.random.default_rng(1).exponential(0.001, size=255) + 0.002)
    for value in samples:
        model.record(0, block_s=value, head_s=0.0)
    p90, p99 = np.quantile(samples, 0.9), np.quantile(samples, 0.99)
    assert model.block_cost(0, 0.999) == pytest.approx(p99 + (p99 - p90))
    assert model.block_cost(0, 0.9999) == pytest.approx(p99 + 2 * (p99 - p90))
    assert model.block_cost(0, 1.0) == pytest.approx(max(samples))  # the maximum stays the maximum
    # For exponential samples the extrapolation lands near the true p99.9 (2 ms + 1 ms * ln 1000 = 8.9 ms).
    assert model.block_cost(0, 0.999) == pytest.approx(0.002 + 0.001 * np.log(1000), rel=0.25)

    # One preemption of 50 ms: the empirical p99.9 of the window jumps towards it, the tail barely moves.
    before = model.block_cost(0, 0.999)
    model.record(0, block_s=0.050, head_s=0.0)
    assert np.quantile(samples + [0.050], 0.999) > 0.02
    assert model.block_cost(0, 0.999) == pytest.approx(before, rel=0.2)  # p99 moves up by one rank, no more


def test_window_drops_old_samples_and_follows_drift():
    model = TimingModel(1, window=8)
    for _ in range(8):
        model.record(0, 0.001, 0.001)
    assert model.stage_cost(0, 0.99) == pytest.approx(0.002)
    for _ in range(8):  # the device got slower (thermal throttling)
        model.record(0, 0.005, 0.001)
    assert model.block_cost(0, 0.0) == pytest.approx(0.005)
    assert model.sample_counts(0) == (8, 8)


def test_cache_invalidated_on_record():
    model = TimingModel(1)
    model.record(0, 0.001, 0.001)
    assert model.block_cost(0) == pytest.approx(0.001)
    model.record(0, block_s=0.1)  # block only, as the a-priori mode records skipped heads
    assert model.block_cost(0, 1.0) == pytest.approx(0.1)
    assert model.sample_counts(0) == (2, 1)


def test_unknown_cost_is_an_error_not_a_guess():
    model = TimingModel(2)
    assert not model.is_calibrated
    with pytest.raises(TimingError, match="calibrate"):
        model.stage_cost(0)
    model.record(0, 0.001, 0.001)
    with pytest.raises(TimingError, match="stage 2"):
        model.predict_exit_cost(1)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_samples_and_arguments_rejected(bad):
    model = TimingModel(2)
    with pytest.raises(TimingError):
        model.record(0, bad, 0.001)
    with pytest.raises(TimingError, match="out of range"):
        model.record(2, 0.001, 0.001)
    model.record(0, 0.001, 0.001)
    with pytest.raises(TimingError, match="quantile"):
        model.block_cost(0, 1.5)
    with pytest.raises(TimingError):
        TimingModel(0)


def test_summary_reports_stage_totals():
    model = _fed()
    rows = model.summary()
    assert [row["stage"] for row in rows] == [1, 2, 3]
    assert rows[1]["mean_ms"] == pytest.approx(22.0)
    assert rows[1]["p50_ms"] == pytest.approx(22.0)
    assert rows[1]["p90_ms"] == pytest.approx(22.0)
    assert rows[1]["p99_ms"] == pytest.approx(22.0)
    assert rows[1]["samples"] == 10
    assert math.isnan(TimingModel(1).summary()[0]["mean_ms"])


def test_save_load_round_trip(tmp_path):
    model = _fed()
    model.record(1, 0.025, 0.004)
    path = model.save(tmp_path / "calib" / "timing.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["device"] == "cpu" and data["input_size"] == [28, 28]
    stage2 = data["stages"][1]
    assert stage2["stage"] == 2 and stage2["samples"] == 11
    assert stage2["block_mean_ms"] == pytest.approx(1e3 * (10 * 0.020 + 0.025) / 11)
    # Ready times are the cumulative sum of mean_ms (what another module reads).
    assert stage2["mean_ms"] == pytest.approx(stage2["block_mean_ms"] + stage2["head_mean_ms"])
    loaded = TimingModel.load(path, num_stages=3, device="cpu", input_size=(28, 28))
    for k in range(3):
        assert loaded.block_samples(k) == pytest.approx(model.block_samples(k))
        assert loaded.head_samples(k) == pytest.approx(model.head_samples(k))
        assert loaded.stage_cost(k) == pytest.approx(model.stage_cost(k))
    assert loaded.device == "cpu" and loaded.input_size == (28, 28)
    assert not list(tmp_path.glob("calib/*.tmp"))  # atomic write leaves no temp file


def test_load_rejects_foreign_and_mismatched_files(tmp_path):
    path = _fed().save(tmp_path / "timing.json")
    with pytest.raises(TimingError, match="3 stages but the network has 4"):
        TimingModel.load(path, num_stages=4)
    with pytest.raises(TimingError, match="device"):
        TimingModel.load(path, device="cuda:NVIDIA H100")
    with pytest.raises(TimingError, match="input size"):
        TimingModel.load(path, input_size=(224, 224))
    data = json.loads(path.read_text())
    cases = {
        "foreign.json": {"format": "something.else", "stages": []},
        "version.json": {**data, "version": 99},
        "repeat.json": {**data, "stages": [data["stages"][0], data["stages"][0], data["stages"][2]]},
        "empty.json": {**data, "stages": [{**data["stages"][0], "block_samples_ms": []}]},
        "negative.json": {**data, "stages": [{**data["stages"][0], "head_samples_ms": [-1.0]}]},
    }
    messages = {"foreign.json": "not an impatient_ros timing", "version.json": "version 99",
                "repeat.json": "without gaps or repeats", "empty.json": "non-empty", "negative.json": "not a time"}
    for name, content in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(TimingError, match=messages[name]):
            TimingModel.load(tmp_path / name)
    # Entries are identified by their "stage" number, not their position (the budget reader always did so).
    (tmp_path / "reversed.json").write_text(json.dumps({**data, "stages": data["stages"][::-1]}))
    reversed_model = TimingModel.load(tmp_path / "reversed.json")
    for k in range(3):
        assert reversed_model.block_samples(k) == pytest.approx(_fed().block_samples(k))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TimingError, match="JSON"):
        TimingModel.load(tmp_path / "broken.json")
    with pytest.raises(TimingError, match="does not exist"):
        TimingModel.load(tmp_path / "missing.json")


def test_uncalibrated_model_cannot_be_saved(tmp_path):
    with pytest.raises(TimingError, match="calibrate"):
        TimingModel(2).save(tmp_path / "t.json")


def _correlated_runs(model: TimingModel, runs: int, seed: int = 0) -> np.ndarray:
    """Feed ``runs`` runs whose blocks share a per-run load factor (as on a loaded CPU); the paths' totals."""
    rng = np.random.default_rng(seed)
    block = np.array([0.010, 0.020, 0.030])
    totals = []
    for _ in range(runs):
        load = rng.lognormal(0.0, 0.3)  # the whole run slows down together...
        parts = block * load * rng.lognormal(0.0, 0.2, size=3)  # ...with independent jitter on top
        path = 0.0
        for k, b in enumerate(parts):
            model.record(k, b, 0.001)
            path += b
            model.record_sums(k, stage_s=b + 0.001, path_s=path)
        totals.append(path)
    return np.asarray(totals)


def test_path_quantile_is_the_quantile_of_the_sum():
    model = TimingModel(3, min_sum_samples=20)
    totals = _correlated_runs(model, 200)
    summed = sum(model.block_cost(k, 0.99) for k in range(3)) + model.head_cost(2, 0.99)
    assert model.predict_exit_cost(2, 0.99) == pytest.approx(np.quantile(totals, 0.99) + 0.001)
    # Summing the parts' p99 over-estimates the path's p99 when their jitter is partly independent.
    assert summed > model.predict_exit_cost(2, 0.99) * 1.02
    assert model.stage_cost(1, 0.5) == pytest.approx(np.quantile(model.block_samples(1), 0.5) + 0.001)


def test_sums_need_enough_samples_before_they_are_used():
    model = TimingModel(3, min_sum_samples=20)
    _correlated_runs(model, 19)
    fallback = sum(model.block_cost(k, 0.99) for k in range(3)) + model.head_cost(2, 0.99)
    assert model.predict_exit_cost(2, 0.99) == pytest.approx(fallback)
    _correlated_runs(model, 1, seed=1)
    assert model.predict_exit_cost(2, 0.99) != pytest.approx(fallback)


def test_sums_round_trip_and_old_files_still_load(tmp_path):
    model = TimingModel(3, device="cpu", input_size=(28, 28))
    _correlated_runs(model, 50)
    data = model.to_dict()
    loaded = TimingModel.from_dict(data)
    for k in range(3):
        assert loaded.predict_exit_cost(k) == pytest.approx(model.predict_exit_cost(k))
        assert loaded.stage_cost(k) == pytest.approx(model.stage_cost(k))
    for entry in data["stages"]:  # a file written before the sums existed
        del entry["stage_samples_ms"], entry["path_samples_ms"]
    old = TimingModel.from_dict(data)
    assert old.predict_exit_cost(2) == pytest.approx(
        sum(model.block_cost(k) for k in range(3)) + model.head_cost(2))
    data["stages"][0]["path_samples_ms"] = [1.0, float("nan")]
    with pytest.raises(TimingError, match="path_samples_ms"):
        TimingModel.from_dict(data)
    with pytest.raises(TimingError, match="finite"):
        model.record_sums(0, path_s=-1.0)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_ageing_drops_a_spike_recent_s_after_it_once_quiet_samples_exist():
    clock = _Clock()
    model = TimingModel(1, recent_s=0.5, min_recent=8, clock=clock)
    for _ in range(200):  # quiet, then a spike of 40 samples 100x slower
        model.record(0, 0.001, 0.0)
        clock.t += 0.01
    for _ in range(40):
        model.record(0, 0.1, 0.0)
        clock.t += 0.01
    assert model.block_cost(0, 0.99) == pytest.approx(0.1)
    for i in range(7):  # quiet again: too few quiet samples to outvote the spike
        model.record(0, 0.001, 0.0)
        clock.t += 0.1
        assert model.block_cost(0, 0.99) == pytest.approx(0.1)
    model.record(0, 0.001, 0.0)  # 8 quiet samples, the spike 0.8 s old: it no longer counts
    assert model.block_cost(0, 0.99) == pytest.approx(0.001)
    assert model.sample_counts(0) == (248, 248)  # ... but stays in the window (and in a saved file)
    model.record(0, 0.1, 0.0)  # the load is back: its samples count at once, and so do the old ones
    assert model.block_cost(0, 0.99) == pytest.approx(0.1)


def test_recent_samples_never_age_and_a_small_slow_down_leaves_by_count():
    clock = _Clock()
    model = TimingModel(1, window=16, recent_s=0.5, min_recent=4, clock=clock)
    for _ in range(16):  # 1.5x slower: within outlier_factor (2): not dropped by age
        model.record(0, 0.0015, 0.0)
    clock.t += 10.0
    for _ in range(4):
        model.record(0, 0.001, 0.0)
    assert model.block_cost(0, 1.0) == pytest.approx(0.0015)
    for _ in range(12):
        model.record(0, 0.001, 0.0)
    assert model.block_cost(0, 1.0) == pytest.approx(0.001)
    # samples within recent_s all count, however large
    clock.t += 10.0
    model.record(0, 0.01, 0.0)
    model.record(0, 0.001, 0.0)
    assert model.block_cost(0, 1.0) == pytest.approx(0.01)


def test_steady_load_quantiles_are_the_whole_window():
    clock = _Clock()
    model = TimingModel(1, clock=clock)
    samples = np.random.default_rng(3).lognormal(np.log(0.001), 0.35, size=256)
    for value in samples:
        model.record(0, value, 0.0)
        clock.t += 1 / 30
    assert model.block_cost(0, 0.99) == pytest.approx(np.quantile(samples, 0.99))


def test_use_clock_restamps_the_samples():
    model = _fed()
    clock = _Clock()
    model.use_clock(clock)
    assert model.clock is clock and model.stage_cost(0) == pytest.approx(0.011)
    assert model.sample_counts(2) == (10, 10)


def test_lazy_windows_match_eager_updates():
    # Samples wait in a pending list until read; many at once are merged by one sort.
    rng = np.random.default_rng(5)
    model = TimingModel(1, window=32)
    values = rng.exponential(0.01, size=500)
    for i, value in enumerate(values):
        model.record(0, block_s=value)
        if i % 7 == 0 or i > 450:
            window = values[max(0, i - 31):i + 1]
            assert model.block_cost(0, 0.9) == pytest.approx(np.quantile(window, 0.9))
    assert model.block_samples(0) == pytest.approx(list(values[-32:]))


def test_a_window_nobody_reads_stays_bounded():
    model = TimingModel(1, window=16)
    for i in range(1000):
        model.record_run(0, 0.001 * (i % 7), None, None, None, at=float(i))
    assert len(model._block[0].pending) < 16 and len(model._block[0].recent) == 16
