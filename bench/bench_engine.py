"""Measure the staged engine: EP-head overhead, deadline hit rate, timing-model p99 error.

Prints measured figures (this is not a test; nothing is asserted). Three parts
per network:

1. Latency of a plain forward (the backbone alone: blocks + last head), t_B
   (``forward_exit`` at the last exit: the same path through the ImpatientNet
   API), t_A (``forward``: every EP head), and the engine doing the same (anytime
   with every head, a-priori at the last exit), median and p90 over interleaved
   repetitions, with ratios to the plain forward.
2. Deadlines: budgets drawn from uniform / normal / exponential distributions
   around the calibrated stage costs (and "p99": from stage 1's p99 to 1.25x the
   sum of every stage's p99); per mode the share of images answered,
   NO_TIME, the mean exit reached, how often and by how much the last answer
   came after the deadline, and the hit rate of the frames whose budget is at
   least the p99 of stage 1 (the target is >= 99.9 %). Every late answer is
   attributed: did its stage take longer than its own p99 prediction, did a
   garbage collection start inside the run, how long was the preprocessing.
3. The timing model's p99 prediction error: p99 predicted after calibration
   versus p99 measured on held-out runs (model frozen), per stage and for the
   a-priori path to the last exit.

    OMP_NUM_THREADS=1 python bench/bench_engine.py                    # smallcnn 28x28, resnet18 224x224
    python bench/bench_engine.py --models path/to/model.pt --threads 4
    python bench/bench_engine.py --device cuda --models resnet50      # parts 2-3 on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from _common import checkpoint_for, interleaved, median_p90_ms, plain_network, print_table
from impatient_ros.runtime.engine import DEFAULT_ADMISSION_QUANTILE, Mode, StagedEngine, StopReason
from impatient_ros.runtime.realtime import use_realtime_priority


def part_latency(engine: StagedEngine, reps: int, unfused: torch.nn.Module | None = None) -> None:
    """Plain forward vs t_B vs t_A, network and engine; with ``unfused`` also the network as trained.

    The engine's network has its heads and blocks fused (impatient_ros.runtime.fusion); the plain
    forward of that same network is the first base, the unfused network (the checkpoint as trained:
    what a user runs without the engine) the second.
    """
    net, k_last = engine.net, engine.num_stages - 1
    plain = plain_network(net)
    x = torch.randn(engine.preprocessor.output_shape, device=engine.device, dtype=engine.preprocessor.dtype)
    sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" else None
    base_of: dict[str, str] = {}
    with torch.inference_mode():
        variants = {
            "plain forward (blocks + last head)": lambda: plain(x),
            "t_B forward_exit(last)": lambda: net.forward_exit(x, k_last),
            "t_A forward (every head)": lambda: net(x),
            "engine apriori, last exit (t_B)": lambda: engine.run_tensor(x, mode=Mode.APRIORI),
            "engine anytime, every exit (t_A)": lambda: engine.run_tensor(x, mode=Mode.ANYTIME),
        }
        if unfused is not None:  # heads and blocks as trained (batch norms unfolded): what fusion saves
            unfused = unfused.to(engine.device).eval()
            plain_unfused = plain_network(unfused)
            variants["unfused: plain forward"] = lambda: plain_unfused(x)
            variants["unfused: t_A forward (every head)"] = lambda: unfused(x)
            base_of = {"unfused: plain forward": "unfused: plain forward",
                       "unfused: t_A forward (every head)": "unfused: plain forward"}
        times = interleaved(variants, reps=reps, sync=sync)
    rows = []
    trained = times.get("unfused: plain forward")
    for name, samples in times.items():
        base_samples = times[base_of.get(name, "plain forward (blocks + last head)")]
        median, p90 = median_p90_ms(samples)
        # Paired: each round's time over the same round's plain forward (rounds are interleaved),
        # so a load that changes between rounds (a shared machine) cancels out.
        row = (name, median, p90, float(np.median(samples) / np.median(base_samples)),
               float(np.median(samples / base_samples)))
        if trained is not None:  # against the network as trained (what a user runs without the engine)
            row += (float(np.median(samples / trained)),)
        rows.append(row)
    headers = ["variant", "median ms", "p90 ms", "x plain (same modules)", "x plain, paired by round"]
    if trained is not None:
        headers.append("x plain as trained, paired")
    print_table(headers, rows)


def _budgets(kind: str, total_s: float, n: int, rng: np.random.Generator,
             p99_range: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Budgets (seconds) around the full-network cost ``total_s``; "p99" spans ``p99_range``."""
    if kind == "p99":  # stage 1's p99 .. 1.25 x every stage's p99: the range of the hit-rate target
        return rng.uniform(p99_range[0], 1.25 * p99_range[1], n)
    if kind == "uniform":
        return rng.uniform(0.0, 1.25 * total_s, n)
    if kind == "normal":
        return np.clip(rng.normal(0.5 * total_s, 0.25 * total_s, n), 0.0, None)
    if kind == "exponential":
        return rng.exponential(0.5 * total_s, n)
    raise ValueError(kind)


def part_deadlines(engine: StagedEngine, image: np.ndarray, order: str, runs: int, seed: int = 0,
                   quantiles: Sequence[float] | None = None) -> None:
    """Run every budget once per admission quantile (default: the engine's), interleaved (the VM's speed drifts:
    compare within a budget); the engine keeps its own quantile afterwards."""
    own_quantile = engine.admission_quantile
    quantiles = tuple(quantiles or (own_quantile,))
    summary = engine.timing.summary()
    ready_ms = engine.timing.to_calibration().ready_times()  # the one t_k: impatient_ros.core.ready_times
    print("calibrated stage costs (block+head) mean / p99 ms:",
          ", ".join(f"{row['mean_ms']:.2f}/{row['p99_ms']:.2f}" for row in summary),
          f"| anytime ready times (medians of the parts): {', '.join(f'{v:.2f}' for v in ready_ms)}")
    collections: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(time.monotonic())

    gc.callbacks.append(on_gc)
    rng = np.random.default_rng(seed)
    rows, late_rows = [], []
    # The "p99" distribution's range: stage 1's p99 to the sum of every stage's p99 (the module note).
    p99_range = (engine.timing.stage_cost(0, 0.99),
                 sum(engine.timing.stage_cost(k, 0.99) for k in range(engine.num_stages)))
    totals = {q: [0, 0] for q in quantiles}  # eligible hits, eligible frames over every row
    for kind in ("uniform", "normal", "exponential", "p99"):
        budgets = _budgets(kind, ready_ms[-1] / 1e3, runs, rng, p99_range)
        for mode in (Mode.ANYTIME, Mode.APRIORI):
            acc = {q: {"answered": 0, "no_time": 0, "stages": [], "overruns": [], "eligible": 0, "hits": 0,
                       "late": 0, "over_prediction": 0, "gc_inside": 0, "preprocess_ms": []} for q in quantiles}
            for budget in budgets:
                for q in quantiles:
                    a = acc[q]
                    engine.admission_quantile = q
                    stage1_p99 = engine.timing.stage_cost(0, 0.99)  # the target's eligibility: stage 1's p99 now
                    del collections[:]
                    began = time.monotonic()
                    report = engine.run(image, order, deadline=began + budget, mode=mode)
                    ended = time.monotonic()
                    if budget >= stage1_p99 and report.results:  # answered frames with at least stage 1's p99
                        a["eligible"] += 1
                        a["hits"] += not report.overran
                    if report.stop_reason is StopReason.NO_TIME:
                        a["no_time"] += 1
                        continue
                    a["answered"] += 1
                    a["stages"].append(report.final.stage)
                    a["overruns"].append(report.overrun_s)
                    if report.overran:
                        a["late"] += 1
                        last = max(i for i, r in enumerate(report.results) if not r.repeated)
                        a["over_prediction"] += report.actual_s[last] > report.predicted_s[last]
                        a["gc_inside"] += any(began <= t <= ended for t in collections)
                        a["preprocess_ms"].append(1e3 * (report.started_at[0] - report.began_at))
            for q in quantiles:
                a = acc[q]
                totals[q][0] += a["hits"]
                totals[q][1] += a["eligible"]
                over = np.asarray(a["overruns"]) if a["overruns"] else np.zeros(1)
                stages = a["stages"]
                rows.append((kind, mode.value, f"p{100 * q:g}", f"{np.median(budgets) * 1e3:.2f}",
                             f"{100 * a['answered'] / runs:.1f}", f"{100 * a['no_time'] / runs:.1f}",
                             f"{np.mean(stages) if stages else float('nan'):.2f}",
                             f"{100 * np.count_nonzero(over > 0) / max(a['answered'], 1):.1f}",
                             f"{1e3 * float(over.max()):.3f}",
                             f"{1e3 * float(over[over > 0].mean()) if (over > 0).any() else 0.0:.3f}",
                             f"{100 * a['hits'] / max(a['eligible'], 1):.2f} ({a['hits']}/{a['eligible']})"))
                if a["late"]:
                    late_rows.append((kind, mode.value, f"p{100 * q:g}", a["late"], a["over_prediction"],
                                      a["gc_inside"], f"{max(a['preprocess_ms']):.3f}"))
    engine.admission_quantile = own_quantile
    gc.callbacks.remove(on_gc)
    print_table(["budget", "mode", "admission", "median budget ms", "answered %", "NO_TIME %", "mean exit",
                 "overrun % of answered", "max overrun ms", "mean overrun ms",
                 "hit % of answered, budget >= stage-1 p99"], rows)
    print("all rows: " + "; ".join(f"p{100 * q:g} {100 * h / max(n, 1):.2f} % in time ({h}/{n})"
                                   for q, (h, n) in totals.items()))
    if late_rows:
        print("late answers: the last stage's own time above its prediction / a GC started in the run / "
              "max preprocessing ms (before the first admission, so inside the prediction)")
        print_table(["budget", "mode", "admission", "late", "stage above its prediction", "GC inside the run",
                     "max preprocessing ms"], late_rows)


def part_p99_error(engine: StagedEngine, heldout: int, calibration: int) -> None:
    engine.calibrate(warmup=5, iterations=calibration)
    q = 0.99
    predicted = [engine.timing.stage_cost(k, q) for k in range(engine.num_stages)]
    predicted_exit = engine.timing.predict_exit_cost(engine.num_stages - 1, q)
    online = engine.online_update
    engine.online_update = False  # held-out runs must not leak into the prediction
    x = torch.randn(engine.preprocessor.output_shape, device=engine.device, dtype=engine.preprocessor.dtype)
    per_stage: list[list[float]] = [[] for _ in range(engine.num_stages)]
    exit_path = []
    for _ in range(heldout):
        report = engine.run_tensor(x)
        for result, actual in zip(report.results, report.actual_s):
            per_stage[result.stage - 1].append(actual)
        exit_path.append(engine.run_tensor(x, mode=Mode.APRIORI).actual_s[0])
    engine.online_update = online
    rows = []
    for k, (pred, measured) in enumerate(zip(predicted, per_stage)):
        measured = np.asarray(measured)
        p99 = float(np.quantile(measured, q))
        rows.append((f"stage {k + 1}", 1e3 * pred, 1e3 * p99, f"{100 * (pred - p99) / p99:+.1f}",
                     f"{100 * np.mean(measured > pred):.1f}"))
    measured = np.asarray(exit_path)
    p99 = float(np.quantile(measured, q))
    rows.append(("a-priori last exit", 1e3 * predicted_exit, 1e3 * p99,
                 f"{100 * (predicted_exit - p99) / p99:+.1f}", f"{100 * np.mean(measured > predicted_exit):.1f}"))
    print(f"p99 prediction ({calibration} calibration runs) vs held-out p99 ({heldout} runs, model frozen):")
    print_table(["part", "predicted p99 ms", "measured p99 ms", "error %", "held-out above prediction %"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"],
                        help="backbone names (random weights) or checkpoint paths")
    parser.add_argument("--checkpoint", help="a checkpoint file to benchmark instead of --models")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=0, help="latency repetitions (0 = per-model default)")
    parser.add_argument("--budget-runs", type=int, default=0, help="runs per budget distribution and mode")
    parser.add_argument("--heldout", type=int, default=0, help="held-out runs for the p99 error")
    parser.add_argument("--quick", action="store_true", help="a quarter of the default counts")
    parser.add_argument("--admission-quantiles", type=float, nargs="+", default=[DEFAULT_ADMISSION_QUANTILE], metavar="Q",
                        help="admission quantiles of the deadline part (default: the engine's); each budget runs once per quantile, "
                             "interleaved (above 0.99 the timing model extrapolates an exponential tail)")
    parser.add_argument("--realtime-priority", type=int, default=0,
                        help="run this (the measuring) thread under SCHED_FIFO at this priority, as the node's "
                             "realtime_priority does for its inference thread (0 = the normal scheduler)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights can produce denormals that slow CPU kernels
    models = [args.checkpoint] if args.checkpoint else args.models
    scheduling = use_realtime_priority(args.realtime_priority)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), device {args.device}, "
          f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs, "
          f"thread {scheduling.description}\n")
    for name in models:
        checkpoint = checkpoint_for(name)
        engine = StagedEngine(checkpoint, args.device)
        size = engine.input_size
        heavy = size[0] * size[1] > 64 * 64 and engine.device.type == "cpu"
        scale = 0.25 if args.quick else 1.0
        reps = args.reps or max(5, int((40 if heavy else 300) * scale))
        budget_runs = args.budget_runs or max(5, int((40 if heavy else 300) * scale))
        heldout = args.heldout or max(10, int((60 if heavy else 400) * scale))
        print(f"=== {checkpoint.config.backbone} {size[0]}x{size[1]}, {engine.num_stages} stages, "
              f"{engine.device_label} ===")
        print(f"-- latency ({reps} interleaved repetitions; engine heads: {', '.join(engine.head_kinds) or 'as trained'}; "
              f"blocks: {', '.join(engine.block_fusion) or 'as trained'})")
        part_latency(engine, reps, checkpoint_for(name).net)
        engine.calibrate(warmup=3, iterations=max(10, reps // 2))
        channels = 1 if checkpoint.preprocessing["channels"] == "gray" else 3
        image = np.random.default_rng(0).integers(0, 255, size=(*size, channels), endpoint=True).astype(np.uint8)
        order = "gray" if channels == 1 else "rgb"
        admission = ", ".join(f"p{100 * q:g}" for q in args.admission_quantiles)
        print(f"-- deadlines ({budget_runs} budgets per distribution, admission at {admission}, "
              "preprocessing included)")
        part_deadlines(engine, image, order, budget_runs, quantiles=args.admission_quantiles)
        print("-- timing model")
        part_p99_error(engine, heldout, calibration=max(30, heldout // 2))


if __name__ == "__main__":
    main()
