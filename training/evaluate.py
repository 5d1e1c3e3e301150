"""impatient-eval: offline evaluation of a checkpoint from cached per-exit logits and measured stage costs.

One pass over the data stores every exit's logits (``logits.npz``); the stage
costs are measured on the evaluation device with the staged engine's own
calibration (``StagedEngine.calibrate``: batch 1, block and head of every
stage timed separately) or read from a calibration file. Everything in the
report is then computed from those two inputs (``training.metrics``):

* accuracy of every exit;
* expected accuracy under the paper's index schemes (EQ, LIN, POLY, ILIN,
  IPOLY, NORM; STD too) and under time-budget distributions (``--budget``,
  Eq. 5 weights from the measured ready times), with the expected time per
  image t_B (a-priori: only the chosen exit's head runs) and t_A (anytime:
  every head up to the interruption) -- paper Table 1;
* the cascade: stop at the first exit whose 1-vs-2 ratio (or max
  probability, or entropy) passes a threshold, swept into an accuracy vs
  mean-cost curve and compared with fixed-depth exits at equal cost
  (paper Fig. 6); thresholds fitted on the validation split for target mean
  costs (``--target-cost``);
* per image, the first exit that classifies it correctly (histogram and a
  grid of examples per exit, paper Fig. 7).

Usage::

    impatient-eval runs/lin/best.pt --data fashion-mnist --split test --out eval/lin \\
        --budget uniform:0.2,2 --budget exponential:0.5 --target-cost 0.6
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from impatient_ros.core.budget import SCHEMES, BudgetError, budget_weights, parse_distribution, scheme_weights
from .metrics import (
    CRITERIA,
    ExitCosts,
    MetricsError,
    cascade_sweep,
    compare_with_fixed_depth,
    gain_over_fixed_depth,
    exit_accuracy,
    expected_time,
    first_correct_exit,
    first_correct_histogram,
    fit_threshold,
    fixed_depth_points,
    cascade_point,
)

__all__ = [
    "EvalError",
    "DataSpec",
    "parse_data_spec",
    "load_split",
    "compute_logits",
    "save_logits",
    "load_logits",
    "measure_costs",
    "costs_from_calibration",
    "scheme_rows",
    "budget_rows",
    "cascade_section",
    "fit_targets",
    "first_correct_section",
    "evaluate_logits",
    "build_parser",
    "main",
]

log = logging.getLogger("impatient.eval")


class EvalError(ValueError):
    """A bad evaluation input (data spec, split, calibration, target); the message says what to do."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSpec:
    """``fashion-mnist[:DIR]`` or ``imagefolder:PATH``."""

    dataset: str
    root: str | None

    def __str__(self) -> str:
        return self.dataset if self.root is None else f"{self.dataset}:{self.root}"


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``--data``: ``fashion-mnist``, ``fashion-mnist:DIR`` or ``imagefolder:PATH``."""
    kind, sep, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if kind == "fashion-mnist":
        return DataSpec(kind, rest.strip() or None)
    if kind == "imagefolder":
        if not rest.strip():
            raise EvalError("imagefolder needs a path: --data imagefolder:PATH (one sub-folder per class, "
                            "or train/ and test/ laid out that way)")
        return DataSpec(kind, rest.strip())
    raise EvalError(f"unknown data {text!r}; use fashion-mnist, fashion-mnist:DIR or imagefolder:PATH")


def load_split(loaded: Any, spec: DataSpec, split: str, max_per_class: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``split`` ("test" or "val") of ``spec``, preprocessed exactly as the checkpoint says.

    The validation split is re-drawn as training drew it: ``val_split``,
    ``train_per_class`` and the seed come from the checkpoint's train_config
    (defaults 0.1 and seed 0 when it has none; the returned info says so).
    """
    from .data import DataError, cap_per_class, load_data

    if split not in ("test", "val"):
        raise EvalError(f"unknown split {split!r}; valid splits: test, val")
    tc = loaded.train_config or {}
    data_cfg = tc.get("data") or {}
    info: dict[str, Any] = {"data": str(spec), "split": split}
    val_split = data_cfg.get("val_split", 0.1)
    seed = int(tc.get("seed", 0))
    if not tc:
        info["note"] = "checkpoint has no train_config: validation split re-drawn with val_split 0.1, seed 0"
    pre = loaded.preprocessing
    try:
        bundle = load_data(spec.dataset, spec.root, input_size=pre["input_size"], channels=pre["channels"],
                           mean=pre["mean"], std=pre["std"], val_split=val_split,
                           train_per_class=data_cfg.get("train_per_class"),
                           test_per_class=max_per_class if split == "test" else None,
                           augmentation="none", seed=seed)
    except DataError as exc:
        raise EvalError(str(exc)) from None
    if bundle.class_names != list(loaded.class_names):
        raise EvalError(f"the data's classes {bundle.class_names} differ from the checkpoint's "
                        f"{list(loaded.class_names)}; evaluate on the dataset the network was trained for")
    dataset = bundle.test if split == "test" else bundle.val
    if dataset is None or len(dataset) == 0:
        raise EvalError(f"the {split} split of {spec} is empty or missing (test needs test files / a test/ folder; "
                        f"val needs a validation split > 0 in training)")
    if split == "val" and max_per_class is not None:
        from torch.utils.data import Subset

        keep = cap_per_class(np.asarray(dataset.targets), max_per_class)
        dataset = Subset(dataset, keep.tolist())
        dataset.targets = [bundle.val.targets[i] for i in keep]  # type: ignore[attr-defined]
    info.update(images=len(dataset), val_split=val_split, seed=seed)
    return dataset, info


def _batches(dataset: Any, batch_size: int, workers: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def compute_logits(net: Any, dataset: Any, device: str = "cpu", batch_size: int = 256, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One pass: every exit's logits (K, N, C) float32 and the labels (N,)."""
    from .features import collect_outputs

    out = collect_outputs(net, _batches(dataset, batch_size, workers), device=device)
    return out.logits, out.labels


def save_logits(path: str | Path, logits: np.ndarray, labels: np.ndarray, **meta: Any) -> Path:
    """Write the logits cache (``.npz``: logits, labels, and JSON metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, logits=np.asarray(logits, np.float32), labels=np.asarray(labels, np.int64),
                        meta=np.array(json.dumps(meta)))
    return path


def load_logits(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a logits cache written by :func:`save_logits`."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"logits cache {path} does not exist; run impatient-eval without --logits first")
    with np.load(path, allow_pickle=False) as data:
        if "logits" not in data or "labels" not in data:
            raise EvalError(f"{path} is not a logits cache (needs 'logits' and 'labels' arrays)")
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        return data["logits"], data["labels"], meta


# --------------------------------------------------------------------------- costs


def measure_costs(loaded: Any, device: str = "cpu", iterations: int = 50, warmup: int = 5,
                  calibration_out: str | Path | None = None) -> ExitCosts:
    """Time every stage's block and head on ``device`` at batch 1 with the engine's calibration; medians in ms.

    The staged engine is what runs on the robot, so its own calibration (CUDA
    graphs on a GPU, the eager network with fused heads on the CPU) is the cost
    that matters. Medians: the package's one statistic for ready times
    (impatient_ros.core.ready_times says why). Note: the engine takes over
    ``loaded.net`` (eval mode, on ``device``).
    """
    from impatient_ros.runtime.engine import StagedEngine

    engine = StagedEngine(loaded, device, allow_cpu_fallback=False)
    timing = engine.calibrate(warmup=warmup, iterations=iterations)
    if calibration_out is not None:
        engine.save_calibration(calibration_out)
    return _costs_of(timing.to_calibration(),
                     source=f"measured: engine calibration, median of {iterations} runs at batch 1")


def costs_from_calibration(path: str | Path, num_stages: int, input_size: Sequence[int] | None = None) -> ExitCosts:
    """Stage costs (medians of the samples) from an engine calibration file (``impatient_ros.core.calibration``)."""
    from impatient_ros.core.calibration import CalibrationError, read_calibration

    try:
        calibration = read_calibration(path, require_samples=True).check(num_stages=num_stages, input_size=input_size)
    except CalibrationError as exc:
        raise EvalError(str(exc)) from None
    return _costs_of(calibration, source=f"calibration file {path} (median of its samples)")


def _costs_of(calibration: Any, source: str) -> ExitCosts:
    """Block and head cost per stage: the median of each part's samples (impatient_ros.core.ready_times)."""
    block, head = calibration.stage_costs()
    return ExitCosts(tuple(block.tolist()), tuple(head.tolist()), source=source, device=calibration.device)


# --------------------------------------------------------------------------- report sections


def scheme_rows(exit_acc: np.ndarray, costs: ExitCosts, schemes: Sequence[str] = SCHEMES,
                gamma: float = 2.0, beta: float = 0.34) -> list[dict[str, Any]]:
    """Paper Table 1 for one network: expected accuracy, t_B and t_A per index scheme."""
    rows = []
    for scheme in schemes:
        w = scheme_weights(scheme, exit_acc.size, gamma=gamma, beta=beta)
        rows.append({"scheme": scheme, "weights": w.tolist(), "expected_accuracy": float(np.dot(w, exit_acc)),
                     "t_B_ms": expected_time(w, costs.apriori_ms), "t_A_ms": expected_time(w, costs.anytime_ms)})
    return rows


def budget_rows(exit_acc: np.ndarray, costs: ExitCosts, specs: Sequence[str]) -> list[dict[str, Any]]:
    """Expected accuracy under time-budget distributions (Eq. 5 weights from the measured ready times).

    Two scenarios per distribution: *a-priori* (the budget is known, the
    deepest exit with t_B(k) <= budget runs alone) and *anytime* (interrupted
    at the budget; exit k is ready at t_A(k)). ``expected_accuracy`` counts
    budgets below the first ready time as wrong (no answer);
    ``expected_accuracy_answered`` is the accuracy given that an exit answered.
    """
    rows = []
    for spec in specs:
        try:
            dist = parse_distribution(spec)
        except BudgetError as exc:
            raise EvalError(f"--budget {spec!r}: {exc}") from None
        for scenario, ready in (("apriori", costs.apriori_ms), ("anytime", costs.anytime_ms)):
            row: dict[str, Any] = {"spec": spec, "scenario": scenario, "ready_times_ms": ready.tolist()}
            if np.any(np.diff(ready) <= 0):
                # An exit that is ready no later than an earlier one: a-priori would never pick the earlier one.
                row["error"] = "ready times not strictly increasing (a later exit is not slower); skipped"
                rows.append(row)
                continue
            bw = budget_weights(dist, ready)
            w = bw.weights
            row.update(weights=w.tolist(), mass_before_first=float(bw.mass_before_first),
                       expected_accuracy=float(np.dot(w, exit_acc)))
            if w.sum() > 0:
                row["expected_accuracy_answered"] = float(np.dot(w, exit_acc) / w.sum())
                key = "t_B_ms" if scenario == "apriori" else "t_A_ms"
                row[key] = expected_time(w, ready)
            rows.append(row)
    return rows


def cascade_section(logits: np.ndarray, labels: np.ndarray, costs: ExitCosts, exit_acc: np.ndarray,
                    criteria: Sequence[str] = CRITERIA, num_thresholds: int = 200) -> dict[str, Any]:
    """Threshold sweeps for every criterion, the fixed-depth points and the equal-cost comparison."""
    curves = {c: cascade_sweep(logits, labels, costs.anytime_ms, c, num_thresholds) for c in criteria}
    return {
        "curves": curves,
        "fixed_depth": fixed_depth_points(exit_acc, costs.apriori_ms),
        "comparison": {c: compare_with_fixed_depth(curve, exit_acc, costs.apriori_ms) for c, curve in curves.items()},
        "range_gain": {c: gain_over_fixed_depth(curve, exit_acc, costs.apriori_ms) for c, curve in curves.items()},
    }


def fit_targets(val_logits: np.ndarray, val_labels: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                costs: ExitCosts, targets_ms: Sequence[float], criteria: Sequence[str] = CRITERIA,
                num_thresholds: int = 200) -> list[dict[str, Any]]:
    """Fit each criterion's threshold on the validation logits for each target mean cost; score it on ``logits``."""
    rows = []
    for criterion in criteria:
        curve = cascade_sweep(val_logits, val_labels, costs.anytime_ms, criterion, num_thresholds)
        for target in targets_ms:
            try:
                fitted = fit_threshold(curve, float(target))
            except MetricsError as exc:
                rows.append({"criterion": criterion, "target_ms": float(target), "error": str(exc)})
                continue
            test = cascade_point(logits, labels, costs.anytime_ms, fitted.threshold, criterion)
            rows.append({"criterion": criterion, "target_ms": float(target), "threshold": fitted.threshold,
                         "val_accuracy": fitted.accuracy, "val_cost_ms": fitted.mean_cost_ms,
                         "accuracy": test.accuracy, "cost_ms": test.mean_cost_ms,
                         "exit_share": list(test.exit_share)})
    return rows


def first_correct_section(logits: np.ndarray, labels: np.ndarray, per_exit: int = 8,
                          only_class: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Histogram of the first correct exit, and example image indices per exit ("never" = no exit right)."""
    first = first_correct_exit(logits, labels)
    k_max = logits.shape[0]
    rng = np.random.default_rng(seed)
    pool = np.arange(labels.size) if only_class is None else np.flatnonzero(labels == only_class)
    examples: dict[str, list[int]] = {}
    for k in [*range(k_max), -1]:
        idx = pool[first[pool] == k]
        pick = np.sort(rng.choice(idx, size=min(per_exit, idx.size), replace=False)) if idx.size else idx
        examples[str(k + 1) if k >= 0 else "never"] = [int(i) for i in pick]
    return {"histogram": first_correct_histogram(first, k_max), "examples": examples,
            "class": only_class, "first_correct": first}


def evaluate_logits(
    logits: np.ndarray,
    labels: np.ndarray,
    costs: ExitCosts,
    *,
    budgets: Sequence[str] = (),
    val: tuple[np.ndarray, np.ndarray] | None = None,
    targets_ms: Sequence[float] = (),
    trained_weights: Sequence[float] | None = None,
    examples_per_exit: int = 8,
    example_class: int | None = None,
    gamma: float = 2.0,
    beta: float = 0.34,
    num_thresholds: int = 200,
    ensemble: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of the report from cached logits (K, N, C), labels and the stage costs.

    ``val`` (logits, labels) of the validation split is needed for ``targets_ms``.
    ``ensemble`` (a checkpoint's exit-ensemble weights) adds ``result["ensemble"]``: every exit's
    accuracy and the expected accuracy per scheme with exit k answering as the ensemble of exits 1..k.
    Returns a dict; arrays and curves are kept as objects here (``training.report``
    turns them into JSON and plots).
    """
    if logits.shape[0] != costs.num_exits:
        raise EvalError(f"{logits.shape[0]} exits in the logits but {costs.num_exits} in the stage costs; "
                        f"they belong to different networks")
    acc = exit_accuracy(logits, labels)
    result: dict[str, Any] = {
        "num_exits": int(logits.shape[0]),
        "num_images": int(labels.size),
        "exit_accuracy": acc.tolist(),
        "costs": costs.to_dict(),
        "schemes": scheme_rows(acc, costs, SCHEMES, gamma, beta),
        "budgets": budget_rows(acc, costs, budgets),
        "cascade": cascade_section(logits, labels, costs, acc, CRITERIA, num_thresholds),
        "first_correct": first_correct_section(logits, labels, examples_per_exit, example_class),
    }
    if trained_weights is not None:
        w = np.asarray(trained_weights, dtype=np.float64)
        result["trained_budget"] = {"weights": w.tolist(), "expected_accuracy": float(np.dot(w / w.sum(), acc)),
                                    "t_B_ms": expected_time(w, costs.apriori_ms),
                                    "t_A_ms": expected_time(w, costs.anytime_ms)}
    if ensemble is not None:
        result["ensemble"] = ensemble_section(logits, labels, costs, ensemble, trained_weights, gamma, beta)
    if targets_ms:
        if val is None:
            raise EvalError("--target-cost needs the validation split's logits to fit thresholds on")
        result["fitted"] = fit_targets(val[0], val[1], logits, labels, costs, targets_ms, CRITERIA, num_thresholds)
    return result


def ensemble_section(logits: np.ndarray, labels: np.ndarray, costs: ExitCosts, ensemble: dict[str, Any],
                     trained_weights: Sequence[float] | None = None, gamma: float = 2.0,
                     beta: float = 0.34) -> dict[str, Any]:
    """Per-exit accuracy and expected accuracy per scheme of the exit ensemble (impatient_ros.core.ensemble)."""
    from impatient_ros.core.ensemble import EnsembleError, ensemble_log_probs

    try:
        combined = ensemble_log_probs(logits, ensemble)
    except EnsembleError as exc:
        raise EvalError(f"the checkpoint's ensemble: {exc}") from None
    acc = exit_accuracy(combined, labels)
    section: dict[str, Any] = {"kind": ensemble["kind"], "weights": ensemble["weights"], "exit_accuracy": acc.tolist(),
                               "schemes": scheme_rows(acc, costs, SCHEMES, gamma, beta)}
    if trained_weights is not None:
        w = np.asarray(trained_weights, dtype=np.float64)
        section["trained_budget_expected_accuracy"] = float(np.dot(w / w.sum(), acc))
    return section


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The impatient-eval argument parser."""
    p = argparse.ArgumentParser(
        prog="impatient-eval",
        description="Evaluate an Impatient DNN checkpoint: per-exit accuracy, expected accuracy per budget "
                    "scheme/distribution with measured t_B/t_A, cascades, first-correct exits. Writes "
                    "report.md, report.json, PNG plots and the logits cache to --out.",
    )
    p.add_argument("checkpoint", help="checkpoint file written by impatient-train")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="fashion-mnist, fashion-mnist:DIR (folder of the IDX files) or imagefolder:PATH")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--budget", action="append", default=[], metavar="SPEC",
                   help="time-budget distribution (repeatable), e.g. uniform:0.2,2, normal:1,0.3, exponential:0.5, "
                        "gamma:2,0.3, empirical:budgets.csv (ms)")
    p.add_argument("--calibration", metavar="FILE",
                   help="engine calibration JSON to take the stage costs from instead of measuring them here")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where logits and costs are computed")
    p.add_argument("--timing-iterations", type=int, default=50, metavar="N",
                   help="measured batch-1 runs per stage (default: 50)")
    p.add_argument("--target-cost", type=float, action="append", default=[], metavar="MS",
                   help="fit cascade thresholds on the validation split for this mean cost per image (repeatable)")
    p.add_argument("--logits", metavar="NPZ", help="reuse a logits cache of this split instead of running the network")
    p.add_argument("--max-per-class", type=int, metavar="N", help="evaluate at most N images per class (quick checks)")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch size for the logits pass")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--examples-per-exit", type=int, default=8, metavar="N",
                   help="example images per exit in the first-correct grid (default: 8)")
    p.add_argument("--figure-class", metavar="NAME",
                   help="restrict the first-correct example grid to one class (name or index), as in paper Fig. 7")
    p.add_argument("--gamma", type=float, default=2.0, help="POLY/IPOLY exponent (default: 2)")
    p.add_argument("--beta", type=float, default=0.34, help="NORM width (default: 0.34)")
    p.add_argument("--no-plots", action="store_true", help="write report.md/json only")
    return p


def _class_index(name: str | None, class_names: Sequence[str]) -> int | None:
    if name is None:
        return None
    if name in class_names:
        return list(class_names).index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    raise EvalError(f"unknown class {name!r} for --figure-class; valid: {', '.join(class_names)} (or an index)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed CLI ``args``; return the report dict (also written to --out)."""
    from impatient_ros.runtime.checkpoint import CheckpointError, load_checkpoint
    from . import report as report_mod

    started = time.perf_counter()
    out = Path(args.out)
    spec = parse_data_spec(args.data)
    for target in args.target_cost:
        if not target > 0:
            raise EvalError(f"--target-cost must be > 0 ms, got {target}")
    try:
        loaded = load_checkpoint(args.checkpoint, map_location=args.device)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    except RuntimeError as exc:  # e.g. a CUDA device that does not exist
        raise EvalError(f"cannot load {args.checkpoint} on {args.device!r}: {exc}") from None
    class_names = list(loaded.class_names)
    example_class = _class_index(args.figure_class, class_names)
    dataset, data_info = load_split(loaded, spec, args.split, args.max_per_class)

    if args.logits:
        logits, labels, _ = load_logits(args.logits)
        if labels.size != len(dataset):
            raise EvalError(f"{args.logits} holds {labels.size} images but the {args.split} split has {len(dataset)}")
        log.info("logits from %s", args.logits)
    else:
        t0 = time.perf_counter()
        logits, labels = compute_logits(loaded.net, dataset, args.device, args.batch_size, args.workers)
        log.info("logits of %d images in %.1f s", labels.size, time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    save_logits(out / "logits.npz", logits, labels, split=args.split, data=str(spec), class_names=class_names,
                checkpoint=str(args.checkpoint))

    val = None
    if args.target_cost:
        if args.split == "val":
            val = (logits, labels)
        else:
            val_set, _ = load_split(loaded, spec, "val", args.max_per_class)
            val = compute_logits(loaded.net, val_set, args.device, args.batch_size, args.workers)
            save_logits(out / "val_logits.npz", *val, split="val", data=str(spec), class_names=class_names,
                        checkpoint=str(args.checkpoint))

    if args.calibration:
        costs = costs_from_calibration(args.calibration, loaded.net.num_stages, loaded.preprocessing["input_size"])
    else:
        costs = measure_costs(loaded, args.device, args.timing_iterations, calibration_out=out / "calibration.json")
    log.info("stage costs (ms): a-priori %s, anytime %s", np.round(costs.apriori_ms, 4).tolist(),
             np.round(costs.anytime_ms, 4).tolist())

    trained = (loaded.budget or {}).get("weights")
    result = evaluate_logits(logits, labels, costs, budgets=args.budget, val=val, targets_ms=args.target_cost,
                             trained_weights=trained, examples_per_exit=args.examples_per_exit,
                             example_class=example_class, gamma=args.gamma, beta=args.beta,
                             ensemble=loaded.ensemble)
    result["meta"] = {
        "checkpoint": str(args.checkpoint),
        "backbone": loaded.config.backbone,
        "head": loaded.config.head if loaded.config.exit_heads is None else "/".join(loaded.config.exit_heads),
        "trained_budget": loaded.budget,
        "class_names": class_names,
        "data": data_info,
        "device": args.device,
        "command": getattr(args, "command", None),
        "elapsed_s": time.perf_counter() - started,
    }
    images = None
    if not args.no_plots:
        images = report_mod.ExampleImages(dataset, loaded.preprocessing)
    result["files"] = report_mod.write_report(result, out, images=images, plots=not args.no_plots)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``impatient-eval``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(["impatient-eval", *argv])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(args)
    except (EvalError, MetricsError) as exc:
        print(f"impatient-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
