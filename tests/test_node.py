"""impatient_node end to end: real node processes, real DDS on this host, a probe node in the test.

Two node processes serve the whole module (started together, so their start-up
overlaps): the main one with a namespace, a camera remap and the shipped
params file, and one with the compressed transport. Run-time parameters are
changed through the nodes' set_parameters service, and every test puts back
what it changed. The checkpoint is a random-weight smallcnn at 64x64 (timing
and transport do not depend on training); decisions that depend on timing
read the node's own calibrated stage costs from /diagnostics.

The first tests need no process: parameter rules, the params file against the
declared defaults (the mailbox and the log throttle: tests/test_node_helpers.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch
import yaml
from lifecycle_msgs.msg import Transition

from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.ros.diagnostics import OK, WARN, NodeStats, build_report
from impatient_ros.ros.image_convert import array_to_compressed
from impatient_ros.runtime.model import NetConfig, build_network
from impatient_ros.msg import StagePrediction
from impatient_ros.ros.node_params import (
    DEFAULT_MODEL_NAME,
    PARAMETERS,
    check_parameters,
    default_checkpoint_candidates,
)
from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from tests.ros.node_harness import NodeProbe, gray_image, stamp_now, start_node, stop_node, wait_for

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "config" / "impatient.yaml"
SIZE = (64, 64)
K = 4
CLASS_NAMES = [f"c{i}" for i in range(10)]
EXIT_ACCURACY = [0.25, 0.5, 0.625, 0.75]
DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}
_SPEC_BY_NAME = {spec.name: spec for spec in PARAMETERS}


# --------------------------------------------------------------------------- no process needed


def _valid(**changes):
    values = dict(DEFAULTS)
    values.update(changes)
    return values


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mode": "fastest"}, "mode must be one of"),
        ({"device": "gpu0"}, "device must be"),
        ({"device": "cuda:x"}, "device must be"),
        ({"reference_time": "header"}, "reference_time"),
        ({"input_transport": "theora"}, "input_transport"),
        ({"default_budget_ms": 20000.0}, "exceeds max_budget_ms"),
        ({"default_budget_ms": math.nan}, "finite"),
        ({"energy_budgets_ms": [1.0, 2.0]}, "one budget per level"),
        ({"energy_soc_levels": [0.5, 0.2, 1.0]}, "strictly increasing"),
        ({"energy_soc_levels": [0.2, 0.5, 1.5]}, "(0, 1]"),
        ({"energy_budgets_ms": [5.0, -1.0, 0.0]}, ">= 0"),
        ({"energy_budgets_ms": [5.0, 20000.0, 0.0]}, "above max_budget_ms"),
        # Within rclpy's relative 1e-6 of a range edge (rclpy accepts them): the exact range decides.
        ({"admission_quantile": 1.0000005}, "admission_quantile must lie in [0.5, 1.0], got 1.0000005"),
        ({"mode": "cascade", "cascade_threshold": 0.9999995}, "cascade_threshold must lie in [1.0, "),
        ({"max_stage": 256}, "max_stage must lie in [0, 255]"),
    ],
)
def test_check_parameters_rejects_with_reason(changes, fragment) -> None:
    reason = check_parameters(_valid(**changes))
    assert reason is not None and fragment in reason


def test_check_parameters_network_dependent_rules() -> None:
    assert check_parameters(_valid()) is None
    assert check_parameters(_valid(admission_quantile=1.0, cascade_threshold=1.0)) is None  # the edges
    assert check_parameters(_valid(device="cuda:1", mode="cascade")) is None
    assert check_parameters(_valid(max_stage=9)) is None  # unknown network: checked at configure
    assert "exceeds the network's 4 stages" in check_parameters(_valid(max_stage=9), num_stages=4)
    assert check_parameters(_valid(max_stage=4), num_stages=4) is None
    assert "3 entries" in check_parameters(_valid(labels=["a", "b", "c"]), num_classes=10)
    assert check_parameters(_valid(labels=CLASS_NAMES), num_classes=10) is None


def test_params_file_lists_every_parameter_at_its_default() -> None:
    data = yaml.safe_load(PARAMS_FILE.read_text())
    params = data["/**/impatient_node"]["ros__parameters"]
    assert set(params) == set(DEFAULTS)
    for name, default in DEFAULTS.items():
        expected = [] if default is None else default
        assert params[name] == expected, name
        assert type(params[name]) is type(expected), f"{name}: YAML type differs from the declared one"


def test_parameter_specs_have_descriptions_and_ranges() -> None:
    for spec in PARAMETERS:
        desc = spec.descriptor()
        assert len(desc.description) > 20, spec.name
        if isinstance(spec.default, float):
            assert desc.floating_point_range, f"{spec.name} has no range"
        if isinstance(spec.default, int) and not isinstance(spec.default, bool):
            assert desc.integer_range, f"{spec.name} has no range"
    read_only = {spec.name for spec in PARAMETERS if spec.read_only}
    assert {"checkpoint", "device", "input_transport", "image_reliability", "autostart"} <= read_only


def test_default_checkpoint_is_looked_up_next_to_the_package() -> None:
    candidates = default_checkpoint_candidates()
    assert all(path.name == DEFAULT_MODEL_NAME for path in candidates)
    assert REPO / "models" / DEFAULT_MODEL_NAME in candidates


def test_stats_and_report_count_what_the_node_did() -> None:
    stats = NodeStats()
    for _ in range(5):
        stats.frame_received()
    stats.frame_dropped()
    stats.frame_rejected("short_data")
    stats.frame_rejected("short_data")
    stats.frame_rejected("truncated")
    for stage, latency in ((1, 0.002), (2, 0.004), (1, 0.003)):
        stats.stage_published(stage, latency)
    for age in [0.001] * 98 + [0.004, 0.5]:  # one straggler in a hundred stamped images
        stats.stamp_age(age)
    stats.frame_processed(4, deadline=10.0, final_published_at=9.5)        # hit
    stats.frame_processed(1, deadline=10.0, final_published_at=10.25)      # late
    stats.frame_processed(6, deadline=10.0, final_published_at=None)       # NO_TIME: a miss
    stats.frame_processed(4, deadline=None, final_published_at=3.0)        # unlimited: not counted
    snap = stats.snapshot()
    assert (snap.received, snap.dropped, snap.processed, snap.rejected_total, snap.no_time) == (5, 1, 4, 3, 1)
    assert (snap.deadline_frames, snap.deadline_hits) == (3, 1)
    assert snap.hit_rate == pytest.approx(1 / 3) and snap.recent_hit_rate == pytest.approx(1 / 3)
    assert snap.max_recent_overrun_s == pytest.approx(0.25)
    assert snap.stage_latency_ms[1][0] == pytest.approx(2.5) and snap.stage_latency_ms[2] == pytest.approx((4, 4, 4))

    report = build_report(snap, None, budget_ms=20.0, budget_source="topic", budget_detail="planner",
                          input_rejections={"budget_nan": 2}, extra=[("device", "cpu")], num_stages=3)
    values = dict(report.values)
    assert report.level == WARN and "3 image(s) rejected" in report.message
    assert values["device"] == "cpu" and values["frames_rejected_short_data"] == "2"
    assert values["frames_no_time"] == "1" and values["deadline_hit_rate"] == "0.333"
    assert values["budget_ms"] == "20.000" and values["budget_source"] == "topic"
    assert values["input_rejected_budget_nan"] == "2" and values["stop_no_time"] == "1"
    assert values["stage_3_published"] == "0" and values["stage_3_latency_p50_ms"] == "n/a"
    assert values["image_stamp_age_p50_ms"] == "1.000" and 4.0 <= float(values["image_stamp_age_p99_ms"]) <= 500.0
    assert len(report.values) == len(values), "keys must be unique"

    # Nothing new since the last report and every deadline hit: OK.
    calm = NodeStats()
    calm.frame_processed(4, deadline=1.0, final_published_at=0.5)
    first = calm.snapshot()
    assert build_report(first, first).level == OK
    assert dict(build_report(first, first).values)["image_stamp_age_p99_ms"] == "n/a"  # no stamped image yet
    assert build_report(first, first, active=False).level == WARN


# --------------------------------------------------------------------------- node processes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=SIZE))
    path = tmp_path_factory.mktemp("node") / "smallcnn64.pt"
    save_checkpoint(path, net, class_names=CLASS_NAMES, exit_accuracy=EXIT_ACCURACY,
                    preprocessing={"input_size": list(SIZE), "channels": "gray", "mean": [0.5], "std": [0.25]})
    return path


@pytest.fixture(scope="module")
def nodes(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(main probe, compressed probe): both node processes started at once, stopped at the end."""
    logs = tmp_path_factory.mktemp("node_logs")
    common = ["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "diagnostics_period_s:=0.2"]
    main = start_node(["--params-file", str(PARAMS_FILE), *common, "-r", "__ns:=/itest",
                       "-r", "image:=camera/image_raw", "-p", "budget_timeout_s:=1.0"], logs / "main.log")
    # num_threads:=2 against OMP_NUM_THREADS=1 in the harness's environment: the parameter must win.
    compressed = start_node([*common, "-r", "__ns:=/ctest", "-r", "image:=cam", "-p", "input_transport:=compressed",
                             "-p", "image_reliability:=reliable", "-p", "num_threads:=2",
                             "-p", "realtime_priority:=3"], logs / "compressed.log")
    rclpy.init()
    probes = []
    try:
        probes.append(NodeProbe("/itest", "/itest/camera/image_raw", probe_name="main_probe"))
        probes.append(NodeProbe("/ctest", "/ctest/cam/compressed", compressed=True, probe_name="compressed_probe"))
        probes[0].wait_ready(proc=main)
        probes[1].wait_ready(proc=compressed)
        probes[0].proc, probes[1].proc = main, compressed
        yield probes[0], probes[1]
    finally:
        for probe in probes:
            probe.close()
        rclpy.try_shutdown()
        for proc in (main, compressed):
            output = stop_node(proc)
            if proc.returncode not in (0, -15):
                print(output)


@pytest.fixture()
def main_node(nodes) -> NodeProbe:
    return nodes[0]


def _image(seed: int = 0) -> np.ndarray:
    return gray_image(SIZE, seed)


def test_params_file_namespace_and_remaps(main_node: NodeProbe) -> None:
    data = yaml.safe_load(PARAMS_FILE.read_text())["/**/impatient_node"]["ros__parameters"]
    # labels and cameras: [] leaves them unset, and GetParameters leaves unset ones out of its reply.
    overridden = {"checkpoint", "device", "diagnostics_period_s", "budget_timeout_s", "labels", "cameras"}
    names = [name for name in data if name not in overridden]
    values = main_node.get_parameters(*names)
    for name in names:
        assert values[name] == data[name], name
    node = main_node.node
    assert node.count_subscribers("/itest/camera/image_raw") >= 1, "remap image:=camera/image_raw"
    assert node.count_subscribers("/itest/budget") >= 1 and node.count_subscribers("/itest/battery_state") >= 1
    for k in range(1, K + 1):
        assert node.count_publishers(f"/itest/impatient_node/stage_{k}") == 1
    assert main_node.lifecycle_state() == "active"


def test_num_threads_is_applied_and_vision_msgs_auto_stays_off_without_the_package(nodes) -> None:
    main, compressed = nodes
    assert main.get_parameters("num_threads") == {"num_threads": 1}  # the params file's default
    assert main.fresh_diagnostics()["torch_threads"] == "1"
    assert compressed.fresh_diagnostics()["torch_threads"] == "2"
    if importlib.util.find_spec("vision_msgs") is None:  # tests/test_vision_msgs.py covers it present
        assert main.latest_diagnostics()["vision_msgs"] == "off"
        assert main.node.count_publishers("/itest/impatient_node/classification") == 0
        assert main.node.count_publishers("/itest/impatient_node/label_info") == 0


def _fifo_threads(pid: int) -> list[tuple[int, int]]:
    """(thread id, SCHED_FIFO priority) of every thread of process ``pid`` under SCHED_FIFO, from the kernel."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            if os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO:
                found.append((tid, os.sched_getparam(tid).sched_priority))
        except ProcessLookupError:  # a thread that just ended
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_FIFO and /proc are Linux's")
def test_realtime_priority_applies_to_the_inference_thread_only(nodes) -> None:
    main, compressed = nodes
    assert main.fresh_diagnostics()["inference_scheduling"] == "SCHED_OTHER"
    assert _fifo_threads(main.proc.pid) == []
    scheduling = compressed.fresh_diagnostics()["inference_scheduling"]
    fifo = _fifo_threads(compressed.proc.pid)
    if scheduling == "SCHED_FIFO 3":  # permitted here (root or an rtprio limit): exactly one thread got it
        assert [priority for _, priority in fifo] == [3]
    else:  # refused: the node says why, and no thread runs under SCHED_FIFO
        assert scheduling.startswith("SCHED_OTHER (realtime priority 3 not applied: "), scheduling
        assert fifo == []
    # It infers either way (the real-time thread publishes every stage as before).
    messages = compressed.classify(_image(3))
    assert messages[-1].is_final and [m.stage for m in messages] == list(range(1, len(messages) + 1))


def test_every_stage_in_order_with_one_final(main_node: NodeProbe) -> None:
    seqs = []
    for seed in range(4):
        stamp = stamp_now(-0.001)
        frame_id = main_node.send_image(_image(seed), stamp=stamp)
        msgs = main_node.wait_final(frame_id)
        assert [m.stage for m in msgs] == list(range(1, K + 1))
        assert [m.is_final for m in msgs] == [False] * (K - 1) + [True]
        assert [m.stop_reason for m in msgs] == [StagePrediction.STOP_NONE] * (K - 1) + [StagePrediction.STOP_COMPLETE]
        assert len({m.image_seq for m in msgs}) == 1
        seqs.append(msgs[0].image_seq)
        latencies = [m.latency.sec + m.latency.nanosec * 1e-9 for m in msgs]
        assert latencies == sorted(latencies) and latencies[0] > 0
        for m in msgs:
            assert m.header.stamp == stamp and m.header.frame_id == frame_id
            assert m.num_stages == K
            assert m.label == CLASS_NAMES[m.class_id]
            assert m.top_ids[0] == m.class_id and len(m.top_ids) == len(m.top_scores) == 5
            assert m.score == pytest.approx(m.top_scores[0]) and 0 < m.score <= 1
            assert list(m.top_scores) == sorted(m.top_scores, reverse=True)
            assert m.ratio_1v2 >= 1.0
            assert m.stage_accuracy == pytest.approx(EXIT_ACCURACY[m.stage - 1])
            assert not m.ensemble  # the checkpoint has no ensemble weights: each exit's own answer
            assert m.budget.sec == 0 and m.budget.nanosec == 0
        # The per-stage topics carry the same messages, one each.
        wait_for(lambda: all(main_node.stage_topic(k, frame_id) for k in range(1, K + 1)), 5, "stage topics")
        for k in range(1, K + 1):
            (only,) = main_node.stage_topic(k, frame_id)
            assert only == msgs[k - 1]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _median_stage_costs(probe: NodeProbe) -> list[float]:
    """The node's predicted per-stage cost at the median, from its latest diagnostics."""
    diag = probe.fresh_diagnostics()
    return [float(diag[f"stage_{k}_median_ms"]) for k in range(1, K + 1)]


def _latency_ms(msg: StagePrediction) -> float:
    return 1e3 * (msg.latency.sec + msg.latency.nanosec * 1e-9)


def test_tight_budget_runs_fewer_stages_than_a_loose_one(main_node: NodeProbe) -> None:
    # Admission at the median: the test does not hinge on latency spikes in the p99.
    main_node.set_ok(admission_quantile=0.5)
    try:
        loose = [main_node.classify(_image(s)) for s in range(5)]
        assert [len(msgs) for msgs in loose] == [K] * 5
        q = _median_stage_costs(main_node)  # what the engine predicts per stage
        path_ms = float(np.median([_latency_ms(msgs[K - 2]) for msgs in loose]))  # now -> exit K-1 ready
        # Stage 1 is admitted when queueing + q[0] <= budget; all K stages would need about
        # path_ms + q[-1] <= budget. The midpoint leaves half that window on either side,
        # whatever the machine's current speed (both ends move with it).
        tight_ms = 0.5 * (q[0] + path_ms + q[-1])
        main_node.set_ok(default_budget_ms=tight_ms)
        counts = []
        for seed in range(8):
            frame_id = main_node.send_image(_image(seed))
            time.sleep(0.15)  # NO_TIME frames publish nothing: wait a while instead of for a final
            msgs = main_node.frame(frame_id)
            counts.append(len(msgs))
            if msgs:
                assert msgs[-1].is_final and msgs[-1].stop_reason == StagePrediction.STOP_DEADLINE
                budget_ms = 1e3 * (msgs[-1].budget.sec + msgs[-1].budget.nanosec * 1e-9)
                assert budget_ms == pytest.approx(tight_ms, abs=1e-3)
    finally:
        main_node.set_ok(default_budget_ms=0.0, admission_quantile=0.99)
    why = f"{counts} stages with {tight_ms:.2f} ms; predicted stage medians {q} ms, loose path {path_ms:.2f} ms"
    # One frame may still finish every stage if it ran far faster than the frames just before it.
    assert counts.count(K) <= 1 and np.mean(counts) < K - 0.5, why
    assert any(counts), why


def test_no_time_for_stage_1_is_counted_and_nothing_published(main_node: NodeProbe) -> None:
    before = main_node.fresh_diagnostics()
    main_node.set_ok(reference_time="stamp", default_budget_ms=100.0)
    try:
        stale = []
        # 250 ms old: a plausible stamp (under max_stamp_age_s) is honoured, and the 100 ms budget ran out
        # before arrival. (Implausibly old stamps fall back to the arrival: tests/test_node_limits.py.)
        for seed in range(2):
            stale.append(main_node.send_image(_image(seed), stamp=stamp_now(-0.25)))
            # Apart, so the camera subscription (keep last 1) cannot replace one by the next in DDS.
            time.sleep(0.3)
        fresh = main_node.classify(_image(2), stamp=stamp_now())  # a current stamp still gets answers
        assert fresh[-1].is_final
        after = main_node.fresh_diagnostics()
    finally:
        main_node.set_ok(reference_time="arrival", default_budget_ms=0.0)
    for frame_id in stale:
        assert main_node.frame(frame_id) == []
    assert main_node.counter("frames_no_time", after) - main_node.counter("frames_no_time", before) == 2
    assert main_node.counter("stop_no_time", after) >= 2
    assert int(after["deadline_frames"]) - int(before["deadline_frames"]) == 3
    assert int(after["deadline_hits"]) - int(before["deadline_hits"]) <= 1


def test_budget_message_applies_to_the_next_frame_and_expires(main_node: NodeProbe) -> None:
    main_node.send_budget(0.0, max_stage=2, source="planner")  # unlimited time, at most 2 exits
    time.sleep(0.05)
    msgs = main_node.classify(_image(0))
    assert [m.stage for m in msgs] == [1, 2] and msgs[-1].stop_reason == StagePrediction.STOP_MAX_STAGE
    assert main_node.fresh_diagnostics()["budget_source"] == "topic"

    main_node.send_budget(0.5, source="planner")
    time.sleep(0.05)
    msgs = main_node.classify(_image(1))
    assert msgs[-1].budget.sec == 0 and msgs[-1].budget.nanosec == 500_000_000
    assert len(msgs) == K  # 500 ms is plenty

    time.sleep(1.1)  # budget_timeout_s = 1.0: the budget is stale, the default (unlimited) applies
    msgs = main_node.classify(_image(2))
    assert (msgs[-1].budget.sec, msgs[-1].budget.nanosec) == (0, 0) and len(msgs) == K
    assert main_node.fresh_diagnostics()["budget_source"] == "default"


def test_invalid_budget_and_battery_inputs_are_rejected_and_counted(main_node: NodeProbe) -> None:
    before = main_node.fresh_diagnostics()
    main_node.send_budget(sec=-1, nanosec=0)        # negative
    main_node.send_budget(sec=100, nanosec=0)       # above max_budget_ms = 10 s
    main_node.send_battery(float("nan"))
    main_node.send_battery(1.5)
    expected = {"input_rejected_budget_negative": 1, "input_rejected_budget_too_large": 1,
                "input_rejected_battery_nan": 1, "input_rejected_battery_out_of_range": 1}

    def all_counted():
        diag = main_node.latest_diagnostics()
        return all(main_node.counter(k, diag) - main_node.counter(k, before) >= n for k, n in expected.items())

    try:
        wait_for(all_counted, 10, f"rejections {expected}")
    except AssertionError:
        raise AssertionError(f"{before} -> {main_node.latest_diagnostics()}") from None
    msgs = main_node.classify(_image(0))
    assert (msgs[-1].budget.sec, msgs[-1].budget.nanosec) == (0, 0) and len(msgs) == K


def test_battery_level_changes_the_budget(main_node: NodeProbe) -> None:
    # The shipped table: SoC <= 0.2 -> 5 ms, <= 0.5 -> 20 ms, above -> no energy limit (default).
    for soc, budget_ms, source in ((0.1, 5.0, "energy"), (0.4, 20.0, "energy"), (0.9, 0.0, "default")):
        main_node.send_battery(soc)
        wait_for(lambda s=soc: main_node.latest_diagnostics().get("battery_soc") == f"{s:.3f}", 10,
                 f"battery {soc} taken")
        frame_id = main_node.send_image(_image(0))
        time.sleep(0.3)
        msgs = main_node.frame(frame_id)
        diag = main_node.fresh_diagnostics()
        assert diag["budget_source"] == source
        assert float(diag["budget_ms"]) == pytest.approx(budget_ms)
        if msgs:  # 5 ms may be too little for stage 1 on a busy machine (then NO_TIME, nothing sent)
            got_ms = 1e3 * (msgs[-1].budget.sec + msgs[-1].budget.nanosec * 1e-9)
            assert got_ms == pytest.approx(budget_ms, abs=1e-3)
        else:
            assert budget_ms > 0.0


def test_cascade_stops_at_stage_1_with_threshold_1(main_node: NodeProbe) -> None:
    main_node.set_ok(mode="cascade", cascade_threshold=1.0)
    try:
        for seed in range(3):
            msgs = main_node.classify(_image(seed))
            assert len(msgs) == 1
            assert msgs[0].stage == 1 and msgs[0].is_final
            assert msgs[0].stop_reason == StagePrediction.STOP_CONFIDENT
        main_node.set_ok(cascade_threshold=1e9)  # never confident enough: every exit runs
        msgs = main_node.classify(_image(5))
        assert len(msgs) == K and msgs[-1].stop_reason == StagePrediction.STOP_COMPLETE
    finally:
        main_node.set_ok(mode="anytime", cascade_threshold=3.0)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("admission_quantile", 0.3, ""),            # outside the descriptor's range
        ("cascade_threshold", 0.5, ""),
        ("top_k", 0, ""),
        ("mode", "fastest", "mode must be one of"),
        ("reference_time", "header", "reference_time must be one of"),
        ("max_stage", 7, "exceeds the network's 4 stages"),
        ("labels", ["a", "b", "c"], "3 entries"),
        ("energy_budgets_ms", [1.0, 2.0], "one budget per level"),
        ("default_budget_ms", 20000.0, "exceeds max_budget_ms"),
        ("checkpoint", "/tmp/other.pt", ""),        # read-only
        ("device", "cuda", ""),                     # read-only
        ("mode", 3, ""),                            # wrong type
    ],
)
def test_out_of_range_parameters_are_rejected_with_a_reason(main_node: NodeProbe, name, value, fragment) -> None:
    before = main_node.get_parameters(name)[name]
    (result,) = main_node.set_parameters(**{name: value})
    assert not result.successful
    assert result.reason and fragment in result.reason
    assert main_node.get_parameters(name)[name] == before


def test_labels_override_applies_to_messages(main_node: NodeProbe) -> None:
    renamed = [f"L{i}" for i in range(10)]
    main_node.set_ok(labels=renamed)
    try:
        msgs = main_node.classify(_image(0))
        assert all(m.label == renamed[m.class_id] for m in msgs)
    finally:
        main_node.set_ok(labels=CLASS_NAMES)


def test_malformed_images_are_counted_and_skipped(main_node: NodeProbe) -> None:
    h, w = SIZE
    bad = [
        ({"data": b""}, "short_data"),                               # empty data
        ({"step": w + 1}, "short_data"),                             # data too small for the step
        ({"data": bytes(w * h + 7)}, "long_data"),                   # data too large for the step
        ({"step": w - 1, "data": bytes((w - 1) * h)}, "bad_step"),   # step shorter than a row
        ({"encoding": "yuv_weird"}, "unknown_encoding"),
    ]
    before = main_node.fresh_diagnostics()
    for seed, (fields, reason) in enumerate(bad):
        main_node.send_image(_image(seed), fields=fields)
        time.sleep(0.1)  # let the bad frame be taken before the next one could replace it
        msgs = main_node.classify(_image(seed))
        assert [m.stage for m in msgs] == list(range(1, K + 1)), reason
    after = main_node.fresh_diagnostics()
    for reason in {reason for _, reason in bad}:
        key = f"frames_rejected_{reason}"
        expected = sum(r == reason for _, r in bad)
        assert main_node.counter(key, after) - main_node.counter(key, before) == expected, key
    assert main_node.counter("frames_processed", after) - main_node.counter("frames_processed", before) == len(bad)
    assert main_node.counter("frames_rejected", after) - main_node.counter("frames_rejected", before) == len(bad)


def test_deactivate_stops_inference_and_activate_resumes(main_node: NodeProbe) -> None:
    assert main_node.change_state(Transition.TRANSITION_DEACTIVATE)
    try:
        assert main_node.lifecycle_state() == "inactive"
        wait_for(lambda: main_node.image_pub.get_subscription_count() == 0, 10, "image subscription removed")
        frame_id = main_node.send_image(_image(0))
        time.sleep(0.3)
        assert main_node.frame(frame_id) == []
    finally:
        assert main_node.change_state(Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: main_node.image_pub.get_subscription_count() > 0, 10, "image subscription back")
    assert main_node.classify(_image(1))[-1].is_final


def test_compressed_transport_skips_corrupt_jpegs(nodes) -> None:
    probe = nodes[1]
    assert probe.node.count_subscribers("/ctest/cam/compressed") >= 1, "image remap must move image/compressed"
    jpeg = array_to_compressed(_image(0), "jpeg")["data"]
    bad = {
        "empty_data": {"data": b""},
        "truncated": {"data": jpeg[: len(jpeg) // 2]},
        "decode_failed": {"data": b"\xff\xd8\xff" + bytes(200)},
        "format_mismatch": {"format": "png"},
    }
    before = probe.fresh_diagnostics()
    for seed, (reason, fields) in enumerate(bad.items()):
        probe.send_image(_image(seed), fields=fields)
        time.sleep(0.1)
        msgs = probe.classify(_image(seed))
        assert [m.stage for m in msgs] == list(range(1, K + 1)), reason
    after = probe.fresh_diagnostics()
    for reason in bad:
        key = f"frames_rejected_{reason}"
        assert probe.counter(key, after) - probe.counter(key, before) == 1, key
    assert probe.counter("frames_processed", after) - probe.counter("frames_processed", before) == len(bad)


def _fashion_mnist_test_images(count: int) -> np.ndarray:
    import gzip

    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = f.read(16 + count * 28 * 28)  # IDX header: magic, count, rows, cols
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 28, 28)


EMBEDDED_MODEL = REPO / "models" / DEFAULT_MODEL_NAME


@pytest.mark.skipif(not EMBEDDED_MODEL.is_file(), reason=f"{EMBEDDED_MODEL} not trained yet")
@requires_fashion_mnist
def test_embedded_model_cascade_stops_early_on_confident_images(nodes, tmp_path: Path) -> None:
    # No checkpoint parameter: the node finds the embedded model next to the package.
    proc = start_node(["-p", "device:=cpu", "-p", "diagnostics_period_s:=0.2", "-r", "__ns:=/dtest",
                       "-p", "mode:=cascade", "-p", "cascade_threshold:=3.0"], tmp_path / "embedded.log")
    probe = None
    try:
        probe = NodeProbe("/dtest", "/dtest/image", probe_name="embedded_probe")
        probe.wait_ready(proc=proc)
        probe.wait_round_trip(gray_image((28, 28), 0))  # this test counts no frames
        finals = []
        for image in _fashion_mnist_test_images(20):
            msgs = probe.classify(image)
            assert [m.stage for m in msgs] == list(range(1, len(msgs) + 1))
            finals.append(msgs[-1])
        early = [m for m in finals if m.stop_reason == StagePrediction.STOP_CONFIDENT]
        assert early and any(m.stage < m.num_stages for m in early), [(m.stage, m.ratio_1v2) for m in finals]
        assert all(m.ratio_1v2 >= 3.0 for m in early)
        assert all(m.stop_reason == StagePrediction.STOP_COMPLETE for m in finals if m not in early)
        # stage_accuracy describes the answer published: the exit ensemble's where it answers.
        published = load_checkpoint(EMBEDDED_MODEL).ensemble["val_accuracy"]
        assert all(m.ensemble for m in finals)
        assert all(m.stage_accuracy == pytest.approx(published[m.stage - 1], rel=1e-6) for m in finals), \
            [(m.stage, m.stage_accuracy) for m in finals]
    finally:
        if probe is not None:
            probe.close()
        stop_node(proc)
