"""Several cameras, one model: EDF stage scheduling against round robin and against one process per camera.

Prints and writes measured figures (not a test; nothing is asserted). Three parts:

1. **One engine, N cameras, in process** (what ``impatient_node`` with
   ``cameras`` does, without ROS transport): N simulated cameras at ``--rate``
   Hz with random phases put frames into newest-frame slots (a newer frame
   replaces a waiting one: dropped); before every stage the waiting frames of
   idle cameras start a run (preprocessing included) and
   :class:`impatient_ros.core.scheduler.StageScheduler` picks the stage, with
   the ``edf`` and the ``round_robin`` policy. Budgets fixed (``--budget-ms``)
   or drawn per frame (uniform in ``--drawn-ms``). Real clock, real stages.
2. **N processes, one camera each** (what users run today): the same
   simulation with one camera in each of N processes started together, each
   with its own model and one torch thread.
3. **Node RSS** (``--node-rss``): real ``impatient_node`` processes, one with
   ``cameras`` of N names and one single-camera node, resident memory once
   active and idle (no frames: the model, torch and rclpy dominate).
4. **Node load** (``--node-load``): real node processes over DDS, N camera
   streams from this process into one node with ``cameras`` and into N
   single-camera nodes: per camera hit rate (final answer's latency from the
   image stamp within the budget), answered share, mean exit; the node
   processes' CPU time and RSS.

Per camera: deadline hit rate (final answer ready by the deadline, over all
frames the camera produced, dropped ones included), answered share (a final
answer at all), mean exit reached (over answered frames); per run: CPU time
and peak RSS of the process(es), late answers, and stages that started past
their admission (must be 0: the engine refuses them).

resnet18 runs with random weights (timing does not depend on training).

    nice -n 10 python bench/bench_multicam.py                       # the issue's grid, ~3-4 min
    nice -n 10 python bench/bench_multicam.py --quick              # 2 s per run, fewer configs
    nice -n 10 python bench/bench_multicam.py --resnet-cameras --processes --node-rss   # embedded only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EMBEDDED = REPO / "models" / "fashion_mnist_smallcnn.pt"


# --------------------------------------------------------------------------- the simulation


def _engine(model: str):
    import torch

    from _common import random_checkpoint  # bench/ is on sys.path when this script runs
    from impatient_ros.runtime.checkpoint import load_checkpoint
    from impatient_ros.runtime.engine import StagedEngine

    torch.set_num_threads(1)
    checkpoint = load_checkpoint(EMBEDDED) if model == "embedded" else random_checkpoint(model)
    engine = StagedEngine(checkpoint, "cpu")
    engine.calibrate()
    return engine


def _image(engine, seed: int) -> tuple[np.ndarray, str]:
    h, w = engine.input_size
    rng = np.random.default_rng(seed)
    if engine.preprocessor.output_shape[1] == 1:
        return rng.integers(0, 256, size=(h, w), dtype=np.uint8), "gray"
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "rgb"


def simulate(engine, cameras: int, seconds: float, rate: float, budget: tuple[str, float, float], policy: str,
             seed: int, phases: list[float] | None = None, t0: float | None = None,
             clock=time.monotonic, sleep=time.sleep) -> dict:
    """Run ``cameras`` simulated cameras through one engine for ``seconds``; per-camera figures.

    ``clock``/``sleep``: the real ones, or a simulated clock's (``replayed``), which must be the engine's.
    """
    import torch

    from impatient_ros.core.scheduler import StageScheduler

    rng = np.random.default_rng(seed)
    period = 1.0 / rate
    phases = list(rng.uniform(0.0, period, cameras)) if phases is None else phases
    images = [_image(engine, seed + i) for i in range(cameras)]
    kind, lo_ms, hi_ms = budget
    t0 = clock() + 0.05 if t0 is None else t0
    end = t0 + seconds
    next_at = [t0 + p for p in phases]
    waiting: list[tuple[float, float] | None] = [None] * cameras      # (arrival, deadline) in the slot
    cam = [{"frames": 0, "dropped": 0, "answered": 0, "in_time": 0, "late": 0, "no_time": 0, "exits": [],
            "inadmissible_starts": 0} for _ in range(cameras)]
    sched = StageScheduler(list(range(cameras)), clock, policy=policy)
    budget_rng = np.random.default_rng(seed + 1000)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def account(i: int, run) -> None:
        report, c = run.report, cam[i]
        for result, start, predicted in zip(report.results, report.started_at, report.predicted_s):
            if not result.repeated and report.deadline is not None and start + predicted > report.deadline + 1e-9:
                c["inadmissible_starts"] += 1
        final = report.final
        if final is None:
            c["no_time"] += 1
            return
        c["answered"] += 1
        c["exits"].append(final.stage)
        if report.deadline is None or final.ready_time <= report.deadline:
            c["in_time"] += 1
        else:
            c["late"] += 1

    with torch.inference_mode():
        while True:
            now = clock()
            for i in range(cameras):
                while next_at[i] <= now and next_at[i] < end:
                    if waiting[i] is not None:
                        cam[i]["dropped"] += 1
                    b_ms = lo_ms if kind == "fixed" else float(budget_rng.uniform(lo_ms, hi_ms))
                    waiting[i] = (next_at[i], next_at[i] + b_ms / 1e3)
                    cam[i]["frames"] += 1
                    next_at[i] += period
            for i in range(cameras):
                if waiting[i] is not None and not sched.busy(i):
                    _, deadline = waiting[i]
                    waiting[i] = None
                    image, order = images[i]
                    sched.add(i, engine.start_run(image, order, deadline=deadline))
            if sched.idle:
                upcoming = [t for t in next_at if t < end]
                if not upcoming:
                    break
                sleep(max(0.0, min(upcoming) - clock()))
                continue
            for i, run in sched.step().finished:
                account(i, run)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    loads = os.getloadavg()
    for c in cam:
        c["mean_exit"] = float(np.mean(c["exits"])) if c["exits"] else None
        c["hit_rate"] = c["in_time"] / c["frames"] if c["frames"] else None
        c["answered_share"] = c["answered"] / c["frames"] if c["frames"] else None
        del c["exits"]
    return {"cameras": cam, "cpu_s": (usage.ru_utime + usage.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
            "max_rss_mib": usage.ru_maxrss / 1024.0, "aged": sum(s.aged for s in sched.stats.values()),
            "load_1min": loads[0],
            "stage_ms_p50_p99": [[round(1e3 * engine.timing.stage_cost(k, q), 2) for q in (0.5, 0.99)]
                                 for k in range(engine.num_stages)]}


class _SimClock:
    """Simulated seconds for ``replayed``: advanced by the stages' drawn costs and by sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += max(0.0, dt)


def replayed(measured, cameras: int, seconds: float, rate: float, budget, policy: str, seed: int) -> dict:
    """``simulate`` on a simulated clock: each stage takes a block + head time drawn from ``measured``'s samples.

    The scheduling policies compared without this machine's contention deciding the outcome: the
    same engine code (admission, timing model, probes) runs the embedded network for its answers,
    but every stage costs a measured sample of ``measured``'s stage (resnet18's for resnet18) and
    preprocessing and publishing cost nothing.
    """
    from impatient_ros.runtime.checkpoint import load_checkpoint
    from impatient_ros.runtime.engine import StagedEngine
    from impatient_ros.runtime.timing import TimingModel

    sim = _SimClock()
    assert measured.num_stages == 4, "the embedded network stands in for a 4-stage model"
    samples = [list(zip(measured.timing.block_samples(k), measured.timing.head_samples(k)))
               for k in range(measured.num_stages)]
    timing = TimingModel(measured.num_stages)
    for k, pairs in enumerate(samples):
        for block_s, head_s in pairs:
            timing.record(k, block_s, head_s)
    engine = StagedEngine(load_checkpoint(EMBEDDED), "cpu", timing=timing, clock=sim.now)
    rng = np.random.default_rng(seed + 7)
    drawn = [0.0] * measured.num_stages

    def block_hook(k):
        def hook(module, inputs, output):
            block_s, drawn[k] = samples[k][rng.integers(len(samples[k]))]
            sim.sleep(block_s)
        return hook

    def head_hook(k):
        return lambda module, inputs, output: sim.sleep(drawn[k])

    for k, (block, head) in enumerate(zip(engine.net.blocks, engine.net.heads)):
        block.register_forward_hook(block_hook(k))
        head.register_forward_hook(head_hook(k))
    return simulate(engine, cameras, seconds, rate, budget, policy, seed, clock=sim.now, sleep=sim.sleep)


def _child(model: str, seconds: float, rate: float, budget, seed: int, phase: float, ready, go, t0_value, out) -> None:
    engine = _engine(model)  # the node's own calibration (rounds until stable), as each node would run it
    ready.put(os.getpid())
    go.wait()
    result = simulate(engine, 1, seconds, rate, budget, "edf", seed, phases=[phase], t0=t0_value.value)
    out.put(result)


def separate_processes(model: str, cameras: int, seconds: float, rate: float, budget, seed: int) -> dict:
    """The same cameras, one process (own engine, one torch thread) each, started together."""
    ctx = mp.get_context("spawn")
    phases = list(np.random.default_rng(seed).uniform(0.0, 1.0 / rate, cameras))
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    t0_value = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_child, args=(model, seconds, rate, budget, seed + i, phases[i], ready, go,
                                              t0_value, out)) for i in range(cameras)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0_value.value = time.monotonic() + 1.0  # every child is past its calibration and waiting
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return {"cameras": [r["cameras"][0] for r in results], "cpu_s": sum(r["cpu_s"] for r in results),
            "max_rss_mib": sum(r["max_rss_mib"] for r in results), "aged": 0,
            "load_1min": os.getloadavg()[0], "stage_ms_p50_p99": results[0]["stage_ms_p50_p99"]}


# --------------------------------------------------------------------------- node RSS


def node_rss(cameras: int, timeout: float = 120.0) -> dict:
    """VmRSS (MiB) of an active, idle impatient_node with ``cameras`` names (0: the single-camera node)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", "-p", "device:=cpu",
            "-p", "vision_msgs:=disabled", "-r", f"__ns:=/rss{cameras}_{os.getpid()}"]
    if cameras:
        args += ["-p", "cameras:=[" + ", ".join(f"cam{i}" for i in range(cameras)) + "]"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = time.monotonic()
        for line in proc.stdout:
            if "active:" in line:
                break
            if time.monotonic() - started > timeout:
                raise RuntimeError("node did not become active")
        time.sleep(1.0)
        rss = _vm_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"cameras": cameras, "rss_mib": rss}


def _start_node(ns: str, cameras: list[str], budget_ms: float, params: Sequence[str] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", "-p", "device:=cpu",
            "-p", "vision_msgs:=disabled", "-p", f"default_budget_ms:={budget_ms}", "-p", "reference_time:=stamp",
            "-p", "image_reliability:=reliable", "-r", f"__ns:={ns}"]
    if cameras:
        args += ["-p", "cameras:=[" + ", ".join(cameras) + "]"]
    from _common import node_param_args  # bench/ is on sys.path when this script runs

    args += node_param_args(params)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def node_load(cameras: int, separate: bool, seconds: float, rate: float, budget_ms: float,
              params: Sequence[str] = ()) -> dict:
    """Real node processes over DDS: ``cameras`` camera streams at ``rate`` Hz into one node or N nodes.

    Images (28x28 mono8, reliable, stamped at publication; the node counts its budget from the stamp)
    come from this process; a frame is in time when its final StagePrediction's latency is within
    its budget. CPU time and VmRSS are the node processes' own (their sum for N nodes).
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from impatient_ros.msg import StagePrediction
    from impatient_ros.ros.image_convert import array_to_image_fields

    names = [f"cam{i}" for i in range(cameras)]
    tag = f"load{os.getpid()}_{cameras}_{int(separate)}"
    if separate:   # what users run today: one single-camera node per camera
        procs = [_start_node(f"/{tag}_{name}", [], budget_ms, params) for name in names]
        image_topics = [f"/{tag}_{name}/image" for name in names]
        result_topics = [f"/{tag}_{name}/impatient_node/prediction" for name in names]
    else:
        procs = [_start_node(f"/{tag}", names, budget_ms, params)]
        image_topics = [f"/{tag}/{name}/image" for name in names]
        result_topics = [f"/{tag}/impatient_node/{name}/prediction" for name in names]
    rclpy.init()
    node = rclpy.create_node(f"bench_{tag}")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pubs = [node.create_publisher(Image, t, qos) for t in image_topics]
    finals: list[dict[str, tuple[float, float, int]]] = [{} for _ in names]

    def on_result(i: int, msg) -> None:
        if msg.is_final:
            latency = msg.latency.sec + msg.latency.nanosec * 1e-9
            budget = msg.budget.sec + msg.budget.nanosec * 1e-9
            finals[i][msg.header.frame_id] = (latency, budget, msg.stage)

    for i, topic in enumerate(result_topics):
        node.create_subscription(StagePrediction, topic, lambda m, i=i: on_result(i, m), qos)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    fields = array_to_image_fields(image, "mono8")

    def publish(i: int, frame_id: str) -> None:
        msg = Image(**fields)
        msg.header.frame_id = frame_id
        msg.header.stamp = node.get_clock().now().to_msg()
        pubs[i].publish(msg)

    try:
        # Ready once every camera answered a warm-up frame (the node is active and matched both ways).
        started = time.monotonic()
        k = 0
        while not all(any(f.startswith("w") for f in finals[i]) for i in range(cameras)):
            if time.monotonic() - started > 240:
                raise RuntimeError("nodes did not answer")
            for i in range(cameras):
                if not any(f.startswith("w") for f in finals[i]):
                    publish(i, f"w{k}")
            k += 1
            executor.spin_once(timeout_sec=0.5)
        time.sleep(1.0)
        cpu0 = sum(_cpu_s(p.pid) for p in procs)
        period = 1.0 / rate
        phases = np.random.default_rng(cameras).uniform(0.0, period, cameras)
        t0 = time.monotonic() + 0.1
        sent = [0] * cameras
        next_at = [t0 + ph for ph in phases]
        while time.monotonic() < t0 + seconds:
            i = int(np.argmin(next_at))
            while (wait := next_at[i] - time.monotonic()) > 0:
                executor.spin_once(timeout_sec=min(wait, 0.005))
            publish(i, f"f{sent[i]}")
            sent[i] += 1
            next_at[i] += period
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        cpu = sum(_cpu_s(p.pid) for p in procs) - cpu0
        rss = sum(_vm_rss_mib(p.pid) for p in procs)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    per_camera = []
    for i in range(cameras):
        got = [v for f, v in finals[i].items() if f.startswith("f")]
        in_time = sum(1 for latency, budget, _ in got if budget == 0.0 or latency <= budget)
        per_camera.append({"frames": sent[i], "answered_share": len(got) / sent[i], "hit_rate": in_time / sent[i],
                           "mean_exit": float(np.mean([s for _, _, s in got])) if got else None})
    return {"cameras": cameras, "setup": f"{cameras} nodes" if separate else "1 node", "cpu_s": cpu,
            "rss_mib": rss, "per_camera": per_camera, "node_params": list(params)}


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- report


def summarise(run: dict) -> dict:
    cams = run["cameras"]
    answered = [c["answered_share"] for c in cams]
    exits = [c["mean_exit"] for c in cams if c["mean_exit"] is not None]
    return {
        "min_hit_rate": min(c["hit_rate"] for c in cams),
        "mean_hit_rate": float(np.mean([c["hit_rate"] for c in cams])),
        "min_answered": min(answered),
        "answered_spread_points": 100.0 * (max(answered) - min(answered)),
        "mean_exit": float(np.mean(exits)) if exits else None,
        "late": sum(c["late"] for c in cams),
        "dropped": sum(c["dropped"] for c in cams),
        "frames": sum(c["frames"] for c in cams),
        "inadmissible_starts": sum(c["inadmissible_starts"] for c in cams),
        "cpu_s": run["cpu_s"],
        "max_rss_mib": run["max_rss_mib"],
        "load_1min": run.get("load_1min"),
        "stage_ms_p50_p99": run.get("stage_ms_p50_p99"),
    }


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(data: dict) -> str:
    lines = [
        "# Several cameras, one model: EDF stage scheduling",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']}  ",
        f"Date: {data['date']} (commit {data['commit']})",
        "",
        "Engine-level simulation (bench/bench_multicam.py docstring): real stages on the real clock, simulated "
        f"cameras at {data['rate']:g} Hz with random phases, {data['seconds']:g} s per real-clock run "
        f"({data['replay_seconds']:g} simulated s per replayed one), one torch thread; "
        "no ROS transport. `N procs` = the same cameras, one process each (own model). Hit rate = final answer "
        "by the deadline over all frames produced (dropped ones count as misses); answered = any final answer; "
        "spread = max - min answered share between cameras; RSS = peak of the process (sum over processes for "
        "`N procs`). resnet18 has random weights.",
        "",
        "`replayed` rows run the same loop and engine on a simulated clock, each stage taking a block + head "
        "time drawn from the samples the model's timing window held after its real-clock runs (the embedded "
        "network computes the answers; preprocessing and publishing cost nothing): the policies compared "
        "without this machine's contention deciding the outcome. `load` = 1-minute load average after the "
        "run (2 cores); `stage p50/p99` = the timing model's stage cost then (ms).",
        "",
        "| model | budget | cams | setup | min hit rate | mean hit rate | min answered | spread [pts] | "
        "mean exit | late | dropped | bad starts | CPU [s] | RSS [MiB] | load | stage 1 p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["runs"]:
        s = row["summary"]
        real = "replayed" not in row["setup"]
        cpu = f"{s['cpu_s']:.1f}" if real else "-"
        rss = f"{s['max_rss_mib']:.0f}" if real else "-"
        stage = s.get("stage_ms_p50_p99") or [[None, None]]
        lines.append(
            f"| {row['model']} | {row['budget']} | {row['n']} | {row['setup']} | {_fmt(s['min_hit_rate'], 4)} | "
            f"{_fmt(s['mean_hit_rate'], 4)} | {_fmt(s['min_answered'], 4)} | {s['answered_spread_points']:.1f} | "
            f"{_fmt(s['mean_exit'], 2)} | {s['late']} | {s['dropped']}/{s['frames']} | {s['inadmissible_starts']} | "
            f"{cpu} | {rss} | {_fmt(s.get('load_1min'), 1)} | {_fmt(stage[0][0], 1)}/{_fmt(stage[0][1], 1)} |")
    if data.get("node_rss"):
        lines += ["", "Node resident memory (real impatient_node processes, active, idle, embedded model):", "",
                  "| node | VmRSS [MiB] |", "|---|---|"]
        for row in data["node_rss"]:
            name = "single camera" if row["cameras"] == 0 else f"cameras: {row['cameras']} names"
            lines.append(f"| {name} | {row['rss_mib']:.0f} |")
    if data.get("node_load"):
        lines += ["", f"Real node processes over DDS (28x28 mono8 images, reliable, {data['rate']:g} Hz per camera, "
                  f"{data['node_seconds']:g} s, budget {data['node_budget_ms']:g} ms from the image stamp, in "
                  "time = the final answer's latency within it; CPU and RSS of the node processes"
                  + (f"; node parameters {', '.join(data['node_load'][0]['node_params'])}"
                     if data["node_load"][0].get("node_params") else "") + "):", "",
                  "| cameras | setup | min hit rate | min answered | mean exit | node CPU [s] | node RSS [MiB] |",
                  "|---|---|---|---|---|---|---|"]
        for row in data["node_load"]:
            cams = row["per_camera"]
            exits = [c["mean_exit"] for c in cams if c["mean_exit"] is not None]
            lines.append(f"| {row['cameras']} | {row['setup']} | {min(c['hit_rate'] for c in cams):.4f} | "
                         f"{min(c['answered_share'] for c in cams):.4f} | "
                         f"{_fmt(float(np.mean(exits)) if exits else None, 2)} | {row['cpu_s']:.1f} | "
                         f"{row['rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from _common import add_node_param_argument, result_path  # bench/ is on sys.path when this script runs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--replay-seconds", type=float, default=15.0,
                        help="simulated seconds per replayed run (cheap: only the embedded network computes)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz")
    parser.add_argument("--budget-ms", type=float, default=20.0, help="fixed budget, embedded model")
    parser.add_argument("--drawn-ms", type=float, nargs=2, default=(10.0, 40.0),
                        help="drawn budgets (uniform range), embedded model")
    # resnet18 on one CPU thread needs tens of ms per stage: budgets of its own (an overload at 30 Hz).
    parser.add_argument("--resnet-budget-ms", type=float, default=200.0, help="fixed budget, resnet18")
    parser.add_argument("--resnet-drawn-ms", type=float, nargs=2, default=(100.0, 300.0),
                        help="drawn budgets (uniform range), resnet18")
    parser.add_argument("--embedded-cameras", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--resnet-cameras", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--processes", type=str, nargs="*", default=["embedded:2", "embedded:4", "embedded:8",
                                                                     "resnet18:2"],
                        help="model:N runs compared with N single-camera processes (fixed budget)")
    parser.add_argument("--node-rss", type=int, nargs="*", default=[1, 4],
                        help="camera counts whose node RSS is measured (besides the single-camera node)")
    parser.add_argument("--node-load", type=int, nargs="*", default=[4],
                        help="camera counts run through real nodes: one node with cameras vs N single nodes")
    add_node_param_argument(parser, "an extra parameter of every node of the node-load runs (repeatable), e.g. "
                                    "realtime_priority:=10")
    parser.add_argument("--node-seconds", type=float, default=8.0, help="measured seconds per node-load run")
    parser.add_argument("--quick", action="store_true", help="2 s runs, embedded 1 and 4 cameras, resnet18 on 2")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "multicam"), help="output stem")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.replay_seconds = 2.0, 4.0
        args.embedded_cameras, args.resnet_cameras, args.processes = [1, 4], [2], ["embedded:4"]
    processes = {(m, int(n)) for m, n in (item.split(":") for item in args.processes)}
    runs = []
    for model, counts in (("embedded", args.embedded_cameras), ("resnet18", args.resnet_cameras)):
        if not counts:
            continue
        fixed_ms, drawn_ms = ((args.budget_ms, args.drawn_ms) if model == "embedded"
                              else (args.resnet_budget_ms, args.resnet_drawn_ms))
        budgets = {f"{fixed_ms:g} ms": ("fixed", fixed_ms, fixed_ms),
                   f"U({drawn_ms[0]:g}, {drawn_ms[1]:g}) ms": ("drawn", *drawn_ms)}
        # One calibration per model; the runs follow each other, so EDF and round robin alternate
        # under the same drift (the timing model keeps following the load online).
        engine = _engine(model)
        for name, budget in budgets.items():
            for n in counts:
                for policy in (["edf", "round_robin"] if n > 1 else ["edf"]):
                    result = simulate(engine, n, args.seconds, args.rate, budget, policy, seed=n)
                    runs.append({"model": model, "budget": name, "n": n, "setup": policy,
                                 "summary": summarise(result), "result": result})
                    print(f"{model} {name} {n} cams {policy}: {runs[-1]['summary']}", flush=True)
                for policy in (["edf", "round_robin"] if n > 1 else ["edf"]):
                    result = replayed(engine, n, args.replay_seconds, args.rate, budget, policy, seed=n)
                    runs.append({"model": model, "budget": name, "n": n, "setup": f"{policy}, replayed",
                                 "summary": summarise(result), "result": result})
                    print(f"{model} {name} {n} cams {policy} replayed: {runs[-1]['summary']}", flush=True)
                if (model, n) in processes and budget[0] == "fixed":
                    result = separate_processes(model, n, args.seconds, args.rate, budget, seed=n)
                    runs.append({"model": model, "budget": name, "n": n, "setup": f"{n} procs",
                                 "summary": summarise(result), "result": result})
                    print(f"{model} {name} {n} procs: {runs[-1]['summary']}", flush=True)
        del engine
    rss = []
    if args.node_rss:
        rss.append(node_rss(0))
        rss += [node_rss(n) for n in args.node_rss]
    load = []
    for n in args.node_load:
        for separate in (False, True):
            load.append(node_load(n, separate, args.node_seconds, args.rate, args.budget_ms, args.node_param))
            print(f"node load: {load[-1]}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    data = {"command": "python bench/bench_multicam.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
                       f"{platform.python_version()}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "rate": args.rate, "seconds": args.seconds, "replay_seconds": args.replay_seconds, "runs": runs,
            "node_rss": rss, "node_load": load, "node_seconds": args.node_seconds, "node_budget_ms": args.budget_ms}
    out = Path(args.out)
    result_path(out, ".json").write_text(json.dumps(data, indent=1) + "\n")
    result_path(out, ".md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
