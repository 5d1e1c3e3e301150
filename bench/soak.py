"""Soak test of impatient_node (not in CI): N minutes of camera frames with the budget changing every second.

A node process runs the checkpoint; this script is its camera (``--rate`` Hz,
best effort, keep last 1, like a camera driver) and its planner (one Budget a
second, drawn uniformly from ``--budget-ms``, seeded). It records every answer
on ``~/prediction``, the node's ``/diagnostics`` and, every 5 s, the node
process's resident memory and thread count from ``/proc/<pid>/status``.

Reported (``<out>.json`` and ``<out>.md``, default bench/results/soak.*):
frames sent / received / processed / dropped / rejected / without time for
stage 1, answers, the deadline hit rate as the node counts it (a frame with a
deadline hits it when its final message went out in time; a frame with no time
for stage 1 is a miss), resident memory and threads at start and end, and every
error seen (engine errors, rejected frames, publication failures, ERROR lines in
the node's log, the node dying).

"Start" is the first sample after the warm-up (``--warmup-s``, default 10 s:
allocator and DDS buffers settle), "end" the last sample before the node is
stopped. The run passes when the node ran to the end, logged no error,
counted no engine error or rejected frame, and its resident memory grew by
less than ``--max-growth`` (5 %) from start to end; the exit status is 0 then,
1 otherwise.

Budget range: first ``--probe-s`` seconds of frames without budgets (not
counted), so the engine's online timing settles under a running camera; then,
unless ``--budget-ms`` is given, budgets are drawn from half the predicted time
of stage 1 to 1.5 times that of all stages, the predictions being the node's
own at its admission quantile (``stage_k_predicted_ms`` in /diagnostics), so the
run spans "no time for stage 1" to "every stage". Counts are those of the
timed run only.

Run with the project venv (scripts/setup.sh), from the repository root:

    OMP_NUM_THREADS=1 python bench/soak.py                    # 10 minutes
    OMP_NUM_THREADS=1 python bench/soak.py --minutes 1.5      # a short check
    python bench/soak.py --checkpoint my_model.pt --device cuda --budget-ms 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _common import add_node_param_argument, node_param_args, result_path, start_node_process, stop_process  # noqa: E402  (bench/ is on sys.path when run as a script)
NAMESPACE = "/soak"
NODE_FQN = f"{NAMESPACE}/impatient_node"
SAMPLE_PERIOD_S = 5.0


# --------------------------------------------------------------------------- set-up


def camera_images(count: int = 256) -> tuple[list[Any], str]:
    """Frames to publish: Fashion-MNIST test images if installed, else synthetic 28x28 gray pictures."""
    import numpy as np

    from impatient_ros.tools.sources import SourceError, iterate_frames, open_source

    try:
        source = open_source("fashion-mnist:test")
        images = [frame.image for frame, _ in zip(iterate_frames(source), range(count))]
        return images, source.describe()
    except SourceError:
        rng = np.random.default_rng(0)
        base = np.add.outer(np.arange(28), np.arange(28)) * (255.0 / 54)
        images = [np.clip(base + rng.normal(0, 40, (28, 28)), 0, 255).astype(np.uint8)[:, :, None]
                  for _ in range(count)]
        return images, "synthetic 28x28 gray (Fashion-MNIST not installed)"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads of a process from /proc (empty once it is gone)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return values


# --------------------------------------------------------------------------- the run


@dataclass
class Observations:
    """What the driver saw; filled from the executor thread, the camera thread and the main thread."""

    sent: int = 0
    budgets: list[float] = field(default_factory=list)                  # ms, in the order sent
    answers: int = 0                                                     # frames with a final message
    final_stages: Counter = field(default_factory=Counter)              # stage of each final message
    late_stages: Counter = field(default_factory=Counter)               # ... of each final message past its budget
    late_ms: list[float] = field(default_factory=list)                  # by how much each was late
    diagnostics: dict[str, str] = field(default_factory=dict)           # the latest status of the node
    baseline: dict[str, str] = field(default_factory=dict)              # its status when the timed run began
    samples: list[dict[str, float]] = field(default_factory=list)       # t, rss_mib, threads
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def run(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> tuple[Observations, dict[str, Any]]:
    """Start the node, drive it for ``args.minutes``, stop it; return what was observed and the set-up."""
    import numpy as np
    import rclpy
    from builtin_interfaces.msg import Duration
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from impatient_ros.ros.image_convert import array_to_image_fields
    from impatient_ros.msg import Budget, StagePrediction

    log_path = workdir / "node.log"
    ros_args = ["-r", f"__ns:={NAMESPACE}", "-p", f"checkpoint:={checkpoint}", "-p", f"device:={args.device}",
                "-p", "diagnostics_period_s:=1.0", "-p", "budget_timeout_s:=3.0"]
    ros_args += node_param_args(args.node_param)
    proc = start_node_process(ros_args, log_path)
    obs = Observations()
    rclpy.init()
    node = rclpy.create_node("soak_driver")
    camera_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    image_pub = node.create_publisher(Image, f"{NAMESPACE}/image", camera_qos)
    budget_pub = node.create_publisher(Budget, f"{NAMESPACE}/budget", reliable)

    def on_prediction(msg: StagePrediction) -> None:
        if msg.is_final and msg.header.frame_id.startswith("f"):  # frames of the timed run
            # Late as the node counts it: published (latency from the image's reference time) after its budget.
            latency = msg.latency.sec + 1e-9 * msg.latency.nanosec
            budget = msg.budget.sec + 1e-9 * msg.budget.nanosec
            with obs.lock:
                obs.answers += 1
                obs.final_stages[int(msg.stage)] += 1
                if budget > 0.0 and latency > budget:
                    obs.late_stages[int(msg.stage)] += 1
                    obs.late_ms.append(1e3 * (latency - budget))

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE_FQN + ":"):
                with obs.lock:
                    obs.diagnostics = {kv.key: kv.value for kv in status.values}

    node.create_subscription(StagePrediction, f"{NODE_FQN}/prediction", on_prediction, reliable)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, reliable)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinning = threading.Event()
    spinning.set()

    def spin() -> None:
        while spinning.is_set():
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    setup: dict[str, Any] = {}
    try:
        end = time.monotonic() + 180
        while not (obs.diagnostics.get("state") == "active" and image_pub.get_subscription_count() > 0
                   and budget_pub.get_subscription_count() > 0):
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the node did not come up; its log:\n{log_path.read_text()}")
            time.sleep(0.1)
        images, source = camera_images()
        messages = [Image(**array_to_image_fields(image, "mono8")) for image in images]
        stop = threading.Event()

        def camera(start: float, seconds: float, tag: str, count: bool) -> None:
            period = 1.0 / args.rate
            for i in range(int(seconds * args.rate)):
                if stop.is_set():
                    return
                time.sleep(max(0.0, start + i * period - time.monotonic()))
                msg = messages[i % len(messages)]
                msg.header.frame_id = f"{tag}{i}"
                msg.header.stamp = node.get_clock().now().to_msg()
                image_pub.publish(msg)
                if count:
                    obs.sent += 1

        # A few seconds without budgets first: the engine's online timing settles to the load of a running
        # camera (the calibration at start-up may have run on a busier machine), and its predictions set the range.
        camera(time.monotonic(), args.probe_s, "p", False)
        time.sleep(2.5)  # the last probe frames and a diagnostics status that counts them
        stages = int(obs.diagnostics["num_stages"])
        # At the admission quantile: what the engine itself requires before it starts a stage.
        predicted = [float(obs.diagnostics[f"stage_{k}_predicted_ms"]) for k in range(1, stages + 1)]
        low, high = args.budget_ms or (0.5 * predicted[0], 1.5 * sum(predicted))
        with obs.lock:
            obs.baseline = dict(obs.diagnostics)
        setup = {"checkpoint": str(checkpoint), "device": obs.diagnostics.get("device"), "stages": stages,
                 "predicted_stage_ms": predicted, "budget_ms_range": [low, high], "images": source,
                 "rate_hz": args.rate, "minutes": args.minutes, "node_log": str(log_path),
                 "node_params": list(args.node_param),
                 "inference_scheduling": obs.diagnostics.get("inference_scheduling", "n/a")}
        print(f"soak: {json.dumps(setup)}", flush=True)

        duration = 60.0 * args.minutes
        start = time.monotonic()
        camera_thread = threading.Thread(target=camera, args=(start, duration, "f", True), daemon=True)
        camera_thread.start()
        rng = random.Random(args.seed)
        next_sample = start
        second = 0
        while time.monotonic() - start < duration:
            now = time.monotonic()
            if now >= start + second:  # a new budget every second
                budget_ms = rng.uniform(low, high)
                ns = round(budget_ms * 1e6)
                budget_pub.publish(Budget(budget=Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000),
                                          source="soak"))
                obs.budgets.append(budget_ms)
                second += 1
            if now >= next_sample:
                status = proc_status(proc.pid)
                if status:
                    obs.samples.append({"t": round(now - start, 1), "rss_mib": status["VmRSS"] / 1024,
                                        "threads": status["Threads"]})
                next_sample += SAMPLE_PERIOD_S
            if proc.poll() is not None:
                obs.errors.append(f"the node exited with status {proc.returncode} after {now - start:.0f} s")
                break
            time.sleep(0.05)
        stop.set()
        camera_thread.join(timeout=5)
        status = proc_status(proc.pid)
        if status:
            obs.samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": status["VmRSS"] / 1024,
                                "threads": status["Threads"]})
        time.sleep(2.5)  # the last answers and a diagnostics status that counts them
    finally:
        spinning.clear()
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown()
        if stop_process(proc, timeout=30) == -signal.SIGKILL:
            obs.errors.append("the node did not stop within 30 s of SIGTERM")
    if proc.returncode not in (0, -15):
        obs.errors.append(f"the node's exit status was {proc.returncode}")
    error_lines = [line for line in log_path.read_text(errors="replace").splitlines() if "[ERROR]" in line
                   or "Traceback" in line]
    obs.errors += [f"node log: {line}" for line in error_lines[:20]]
    setup["mean_budget_ms"] = float(np.mean(obs.budgets)) if obs.budgets else None
    return obs, setup


# --------------------------------------------------------------------------- report


def summarise(obs: Observations, setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Figures and the verdict as one JSON-able dict."""
    diag = obs.diagnostics

    def count(key: str) -> int:  # during the timed run only
        return int(diag.get(key, "0")) - int(obs.baseline.get(key, "0"))

    settled = [s for s in obs.samples if s["t"] >= args.warmup_s] or obs.samples
    start, end = (settled[0], obs.samples[-1]) if settled else ({}, {})
    growth = (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"] if settled else None
    hits, frames = count("deadline_hits"), count("deadline_frames")
    errors = list(obs.errors)
    if count("engine_errors"):
        errors.append(f"{count('engine_errors')} engine error(s)")
    if count("frames_rejected"):
        rejected = {k: v for k, v in diag.items() if k.startswith("frames_rejected_") and v != "0"}
        errors.append(f"{count('frames_rejected')} rejected frame(s): {rejected}")
    if not diag:
        errors.append("no diagnostics received from the node")
    checks = {
        "node ran to the end without errors": not errors,
        f"resident memory growth < {100 * args.max_growth:g} %": growth is not None and growth < args.max_growth,
        "frames were answered": obs.answers > 0,
    }
    return {
        "setup": setup,
        "frames": {"sent": obs.sent, "received": count("frames_received"), "processed": count("frames_processed"),
                   "dropped": count("frames_dropped"), "rejected": count("frames_rejected"),
                   "no_time": count("frames_no_time"), "answered": obs.answers,
                   "final_stage_histogram": {str(k): v for k, v in sorted(obs.final_stages.items())},
                   # Where the late answers come from: the stage of each late final and by how much it was late.
                   "late_final_stage_histogram": {str(k): v for k, v in sorted(obs.late_stages.items())},
                   "late_ms_p50_p90_max": ([late[round(q * (len(late) - 1))] for q in (0.5, 0.9, 1.0)]
                                           if (late := sorted(obs.late_ms)) else None)},
        # NO_TIME frames count as misses; among the frames whose stage 1 was admitted, the hit rate
        # says how well the admission (at its quantile of measured stage times) kept its promise.
        "deadline": {"frames": frames, "hits": hits, "hit_rate": hits / frames if frames else None,
                     "admitted_hit_rate": hits / (frames - count("frames_no_time"))
                     if frames > count("frames_no_time") else None,
                     "max_overrun_recent_ms": float(diag.get("deadline_max_overrun_recent_ms", "nan"))},
        "budgets_sent": len(obs.budgets),
        "memory": {"start_mib": start.get("rss_mib"), "end_mib": end.get("rss_mib"),
                   "max_mib": max((s["rss_mib"] for s in obs.samples), default=None),
                   "growth": growth, "threads_start": start.get("threads"), "threads_end": end.get("threads"),
                   "start_at_s": start.get("t"), "end_at_s": end.get("t")},
        # How old the camera's stamps were when the node's callback ran: time the node's count
        # (reference_time arrival) does not charge to the budget.
        "image_stamp_age_ms": {k: float(v) for k, v in diag.items() if k.startswith("image_stamp_age_")
                               and v != "n/a"},
        "latency_ms": {k: float(v) for k, v in diag.items() if k.startswith("stage_") and "latency" in k
                       and v != "n/a"},
        "errors": errors,
        "checks": checks,
        "passed": all(checks.values()),
        "samples": obs.samples,
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report."""
    s, f, d, m = result["setup"], result["frames"], result["deadline"], result["memory"]
    fmt = (lambda v, spec=".1f": "n/a" if v is None else format(v, spec))
    lines = [
        "# impatient_node soak test",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}, {result['machine']}",
        "",
        f"{s.get('minutes')} min at {s.get('rate_hz')} Hz, a new budget every second drawn uniformly from "
        f"{fmt(s.get('budget_ms_range', [None])[0], '.2f')}..{fmt(s.get('budget_ms_range', [None, None])[1], '.2f')}"
        f" ms (mean {fmt(s.get('mean_budget_ms'), '.2f')} ms); checkpoint `{s.get('checkpoint')}` on "
        f"`{s.get('device')}`, {s.get('stages')} stages; images: {s.get('images')}; inference thread "
        f"{s.get('inference_scheduling', 'n/a')}"
        + (f" (node parameters {', '.join(s['node_params'])})" if s.get("node_params") else "") + ".",
        "",
        "| figure | value |",
        "|---|---|",
        f"| frames sent / received by the node | {f['sent']} / {f['received']} |",
        f"| processed / dropped (mailbox) / rejected | {f['processed']} / {f['dropped']} / {f['rejected']} |",
        f"| no time for stage 1 (nothing published) | {f['no_time']} |",
        f"| answered (final message received) | {f['answered']} |",
        f"| final stage histogram | {f['final_stage_histogram']} |",
        f"| late finals (published after the budget) by stage | {f.get('late_final_stage_histogram')} |",
        f"| late by, ms: p50 / p90 / max | {' / '.join(f'{v:.2f}' for v in f['late_ms_p50_p90_max']) if f.get('late_ms_p50_p90_max') else 'none late'} |",
        f"| deadline hit rate | {fmt(None if d['hit_rate'] is None else 100 * d['hit_rate'], '.2f')} % "
        f"({d['hits']} of {d['frames']}; frames without time for stage 1 count as misses) |",
        f"| deadline hit rate of frames whose stage 1 was admitted | "
        f"{fmt(None if d['admitted_hit_rate'] is None else 100 * d['admitted_hit_rate'], '.2f')} % |",
        f"| resident memory start -> end (max) | {fmt(m['start_mib'])} -> {fmt(m['end_mib'])} MiB "
        f"({fmt(m['max_mib'])}), at {m['start_at_s']} s and {m['end_at_s']} s |",
        f"| memory growth | {fmt(None if m['growth'] is None else 100 * m['growth'], '.2f')} % |",
        f"| threads start -> end | {m['threads_start']} -> {m['threads_end']} |",
        f"| image stamps' age at the node's callback, ms: p50 / p99 (last 256) | "
        f"{' / '.join(f'{v:.2f}' for _, v in sorted(age.items())) if (age := result.get('image_stamp_age_ms')) else 'n/a'} |",
        f"| errors | {len(result['errors'])} |",
        "",
        "Checks: " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in result["checks"].items())
        + f". **{'PASSED' if result['passed'] else 'FAILED'}**",
    ]
    if result["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in result["errors"]]
    if result["latency_ms"]:
        lines += ["", "Latency from arrival to each stage's message (last 256 per stage), ms:", "",
                  "| key | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in sorted(result["latency_ms"].items())]
    lines += ["", "Memory samples (s: MiB, threads): "
              + ", ".join(f"{s['t']:g}: {s['rss_mib']:.1f}, {s['threads']}" for s in result["samples"]), ""]
    return "\n".join(lines)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind through run()'s finally, which stops the node process


def main() -> int:
    """Parse arguments, run the soak, write the JSON and Markdown results; 0 if every check passed."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz (default 30)")
    parser.add_argument("--budget-ms", type=lambda t: tuple(float(v) for v in t.split(",")),
                        help="LOW,HIGH range of the budgets in ms (default: from the node's calibration)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the budget draws")
    parser.add_argument("--checkpoint", help="checkpoint to run (default: embedded model or random smallcnn)")
    parser.add_argument("--device", default="cpu", help="node device parameter (auto, cpu, cuda, cuda:N)")
    add_node_param_argument(parser, "an extra node parameter (repeatable), e.g. realtime_priority:=10")
    parser.add_argument("--probe-s", type=float, default=5.0,
                        help="seconds of frames without budgets before the timed run (sets the budget range)")
    parser.add_argument("--warmup-s", type=float, default=10.0,
                        help="memory 'start' is the first sample this long into the timed run")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed memory growth (default 0.05)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak"),
                        help="results path without extension (.json and .md are written)")
    args = parser.parse_args()
    if args.budget_ms is not None and (len(args.budget_ms) != 2 or not 0 < args.budget_ms[0] <= args.budget_ms[1]):
        parser.error("--budget-ms takes LOW,HIGH with 0 < LOW <= HIGH")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 101)))
    from _common import checkpoint_file  # bench/ is on sys.path: this script's own folder

    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        workdir = Path(tmp)
        checkpoint = checkpoint_file(args.checkpoint, workdir)
        obs, setup = run(args, checkpoint, workdir)
        result = summarise(obs, setup, args)
        result["setup"]["node_log"] = "(temporary, removed)"
    result["command"] = " ".join(["python", "bench/soak.py", *sys.argv[1:]])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["machine"] = f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps(result, indent=2) + "\n")
    result_path(out, ".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
