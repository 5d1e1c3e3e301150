"""The one definition of exit ready times and the one calibration-file reader (impatient_ros.core).

Training (Eq. 5 from a calibration file), evaluation (t_A / t_B from the same
file) and the timing model must agree on the numbers a file gives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from impatient_ros.core.budget import BudgetError, ready_times_from_calibration
from impatient_ros.core.calibration import (
    DEFAULT_KEY,
    FORMAT,
    VERSION,
    Calibration,
    CalibrationError,
    StageTiming,
    parse_calibration,
    read_calibration,
    write_calibration,
)
from impatient_ros.core.ready_times import (
    DEFAULT_STATISTIC,
    ReadyTimeError,
    anytime_ready_times,
    apriori_ready_times,
    summarise,
)


def test_anytime_and_apriori_definitions():
    block, head = [1.0, 2.0, 4.0], [0.5, 0.25, 1.0]
    np.testing.assert_allclose(anytime_ready_times(block, head), [1.5, 3.75, 8.75])
    np.testing.assert_allclose(apriori_ready_times(block, head), [1.5, 3.25, 8.0])
    with pytest.raises(ReadyTimeError, match="one block and one head"):
        anytime_ready_times([1.0], [1.0, 2.0])
    with pytest.raises(ReadyTimeError, match="finite"):
        apriori_ready_times([1.0, float("nan")], [1.0, 1.0])


def test_the_statistic_is_the_median_and_ignores_a_stall():
    samples = [0.3] * 49 + [15.0]  # one stall of a shared machine
    assert DEFAULT_STATISTIC == "median" and DEFAULT_KEY == "p50_ms"
    assert summarise(samples) == pytest.approx(0.3)
    assert summarise(samples, "mean") == pytest.approx(0.594)
    assert summarise([1.0, 2.0, 3.0, 4.0], "p99") == pytest.approx(np.quantile([1, 2, 3, 4], 0.99))
    with pytest.raises(ReadyTimeError, match="valid: median, mean, p99"):
        summarise(samples, "p90")
    with pytest.raises(ReadyTimeError, match="no latency samples"):
        summarise([])


def _document(num_stages: int = 3) -> dict:
    rng = np.random.default_rng(0)
    stages = []
    for k in range(num_stages):
        block = (rng.lognormal(0.0, 0.5, size=21) * (k + 1)).tolist()
        head = (rng.lognormal(-2.0, 0.5, size=21)).tolist()
        stages.append({"stage": k + 1, "mean_ms": float(np.mean(block) + np.mean(head)), "p50_ms": 123.0,
                       "p99_ms": 456.0, "samples": 21, "block_samples_ms": block, "head_samples_ms": head})
    return {"format": FORMAT, "version": VERSION, "device": "cpu|fp32|threads=1", "input_size": [28, 28],
            "stages": stages}


def test_training_evaluation_and_the_timing_model_agree_on_one_file(tmp_path):
    from impatient_ros.runtime.timing import TimingModel
    from training.evaluate import costs_from_calibration

    doc = _document()
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(doc))
    block = [float(np.median(s["block_samples_ms"])) for s in doc["stages"]]
    head = [float(np.median(s["head_samples_ms"])) for s in doc["stages"]]
    expected = anytime_ready_times(block, head)

    # Training: Eq. 5 ready times from the samples (not the summary's 123 ms).
    np.testing.assert_allclose(ready_times_from_calibration(path), expected)
    # Evaluation: t_A and t_B of the same file.
    costs = costs_from_calibration(path, num_stages=3, input_size=(28, 28))
    np.testing.assert_allclose(costs.anytime_ms, expected)
    np.testing.assert_allclose(costs.apriori_ms, apriori_ready_times(block, head))
    # The timing model's medians are the same numbers.
    model = TimingModel.load(path)
    np.testing.assert_allclose([1e3 * (model.block_cost(k, 0.5) + model.head_cost(k, 0.5)) for k in range(3)],
                               np.diff(expected, prepend=0.0))
    # The mean is available by name and is exactly additive.
    mean = ready_times_from_calibration(path, key="mean_ms")
    np.testing.assert_allclose(mean, np.cumsum([s["mean_ms"] for s in doc["stages"]]))


def test_summary_only_documents_give_anytime_ready_times_only():
    doc = _document()
    for s in doc["stages"]:
        del s["block_samples_ms"], s["head_samples_ms"]
    cal = parse_calibration(doc)
    assert not cal.has_samples
    np.testing.assert_allclose(cal.ready_times("p99_ms"), [456.0, 912.0, 1368.0])
    with pytest.raises(CalibrationError, match="a-priori ready times need the parts"):
        cal.ready_times("p50_ms", kind="apriori")
    with pytest.raises(CalibrationError, match="needs a non-empty \"block_samples_ms\""):
        parse_calibration(doc, require_samples=True)
    with pytest.raises(CalibrationError, match="no block and head samples"):
        cal.stage_costs()


def test_write_read_round_trip_and_checks(tmp_path):
    cal = parse_calibration(_document())
    path = write_calibration(tmp_path / "sub" / "t.json", cal)
    back = read_calibration(path, require_samples=True)
    assert back.to_dict() == cal.to_dict() and back.source == f"calibration file {path}"
    assert back.check(num_stages=3, device="cpu|fp32|threads=1", input_size=[28, 28]) is back
    with pytest.raises(CalibrationError, match="3 stages but the network has 4"):
        back.check(num_stages=4)
    with pytest.raises(CalibrationError, match="device"):
        back.check(device="cuda:X|fp32|graphs")
    with pytest.raises(CalibrationError, match="input size"):
        back.check(input_size=(32, 32))
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # A document is validated before it is written.
    with pytest.raises(CalibrationError, match="not an impatient_ros timing calibration"):
        write_calibration(tmp_path / "bad.json", {"format": "other"})
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(version=True), "unsupported timing file version"),
    (lambda d: d.update(input_size=[28]), "input_size"),
    (lambda d: d["stages"].append(dict(d["stages"][0])), "without gaps or repeats"),
    (lambda d: d["stages"][0].update(stage="1"), "integer 'stage'"),
    (lambda d: d["stages"][1].update(mean_ms="fast"), "expected a number"),
    (lambda d: d["stages"][1].update(samples=-1), "count >= 0"),
    (lambda d: d["stages"][2].update(head_samples_ms=[0.1, True]), "not a time"),
    (lambda d: d["stages"][2].update(stage_samples_ms="0.1"), "must be a list"),
])
def test_malformed_documents(change, match):
    doc = _document()
    change(doc)
    with pytest.raises(CalibrationError, match=match):
        parse_calibration(doc)


def test_wrappers_keep_their_error_types(tmp_path):
    from impatient_ros.runtime.timing import TimingError, TimingModel

    with pytest.raises(TimingError, match="not found"):
        TimingModel.load(tmp_path / "missing.json")
    with pytest.raises(BudgetError, match="not found"):
        ready_times_from_calibration(tmp_path / "missing.json")
    assert issubclass(CalibrationError, ValueError)


def test_timing_model_writes_what_the_reader_reads(tmp_path):
    from impatient_ros.runtime.timing import TimingModel

    model = TimingModel(2, device="cpu", input_size=(28, 28))
    for i in range(5):
        model.record(0, 0.001 * (i + 1), 0.0001)
        model.record(1, 0.002, 0.0002 * (i + 1))
    cal = model.to_calibration()
    assert isinstance(cal, Calibration) and all(isinstance(s, StageTiming) for s in cal.stages)
    path = model.save(tmp_path / "t.json")
    assert read_calibration(path, require_samples=True).to_dict() == json.loads(path.read_text())
    block, head = read_calibration(path).stage_costs()
    np.testing.assert_allclose(block, [3.0, 2.0])
    np.testing.assert_allclose(head, [0.1, 0.6])
