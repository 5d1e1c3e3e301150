#!/usr/bin/env python3
"""EP head kinds side by side: per-exit accuracy (val and test) and head cost, one regime, one seed.

Trains one network per head kind with the same data, schedule and budget
scheme (bench/reproduce_paper.py's regime definitions; by default its full
``smallcnn`` regime: smallcnn_tiny from scratch, Fashion-MNIST 500 train /
100 val images per class, the full test set), with the shipped recipe
(``impatient``: for a backbone without pretrained weights, the paper
recipe's joint training, then head refit and exit ensemble where val says so;
``--recipe paper`` stops after the training). Reports per exit, for the
network as trained and after the recipe's post-hoc levers:

* accuracy on val and test, and the scheme's expected accuracy;
* the engine's calibration of each head (median ms at batch 1, fused heads)
  and the ready times t_B / t_A built from it (impatient_ros.core.ready_times).

The costs of all networks are measured here, interleaved round by round with
the same calibration, so that a load change on a shared machine hits every
head kind alike.

    nice -n 10 python bench/compare_heads.py --heads avg4x4 conv --epochs 4 --out bench/results/conv_head.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from impatient_ros.core.ready_times import anytime_ready_times, apriori_ready_times  # noqa: E402
from impatient_ros.runtime.checkpoint import load_checkpoint  # noqa: E402
from impatient_ros.runtime.engine import StagedEngine  # noqa: E402
from impatient_ros.runtime.model import list_heads  # noqa: E402
from reproduce_paper import PLANS, Clock, expected, load_splits, machine, run_outputs, train_config, train_network  # noqa: E402


def _accuracy(outs) -> list[float]:
    return (outs.logits.argmax(axis=2) == outs.labels[None, :]).mean(axis=1).tolist()


def _ensemble_accuracy(loaded, outs) -> list[float] | None:
    from impatient_ros.core.ensemble import ensemble_log_probs

    if loaded.ensemble is None:
        return None
    log_probs = ensemble_log_probs(outs.logits, loaded.ensemble)
    return (log_probs.argmax(axis=2) == outs.labels[None, :]).mean(axis=1).tolist()


def impatient_levers(regime, scheme: str, seed: int, paper_out: Path, lr: float) -> Path:
    """best.pt after the impatient recipe's post-hoc levers (refit, ensemble) on the paper run's chosen epoch.

    For a backbone without pretrained weights the impatient recipe trains what the paper recipe trains (no
    LP-FT start), so, as bench/reproduce_paper.py does, the paper run is copied and only finalized.
    """
    from training.recipe import finalize_run_dir

    if regime.pretrained:
        raise SystemExit("compare_heads.py finalizes paper runs: pretrained regimes need the LP-FT start")
    out = paper_out.with_name(paper_out.name + "_impatient")
    if not (out / "best_trained.pt").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "best.pt.sha256"):
            shutil.copyfile(paper_out / name, out / name)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        finalize_run_dir(out, train_config(regime, scheme, seed, False, out, {"optim.lr": lr}, recipe="impatient"))
    return out / "best.pt"


def measure_heads(paths: dict[str, Path], rounds: int, iterations: int) -> dict[str, dict[str, list[float]]]:
    """Block and head medians (ms) per head kind, calibrated in alternating rounds; each round's medians, then their median."""
    engines = {kind: StagedEngine(load_checkpoint(p), "cpu") for kind, p in paths.items()}
    per_round: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {kind: [] for kind in paths}
    for _ in range(rounds):
        for kind, engine in engines.items():
            block, head = engine.calibrate(warmup=5, iterations=iterations).to_calibration().stage_costs("median")
            per_round[kind].append((block, head))
    out = {}
    for kind, samples in per_round.items():
        block = np.median(np.stack([b for b, _ in samples]), axis=0)
        head = np.median(np.stack([h for _, h in samples]), axis=0)
        out[kind] = {"heads": engines[kind].head_kinds, "block_ms": block.tolist(), "head_ms": head.tolist(),
                     "anytime_ms": anytime_ready_times(block, head).tolist(),
                     "apriori_ms": apriori_ready_times(block, head).tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=["avg4x4", "conv"], choices=list_heads())
    parser.add_argument("--regime", default="smallcnn", choices=sorted(PLANS["full"]))
    parser.add_argument("--scheme", default="EQ", help="budget scheme of the loss weights (and of E[acc])")
    parser.add_argument("--epochs", type=int, help="override the regime's epochs")
    parser.add_argument("--lr", type=float, help="override the regime's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="impatient", choices=["impatient", "paper"])
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-iterations", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/compare_heads")
    parser.add_argument("--out", default="bench/results/compare_heads.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    regime = PLANS["full"][args.regime]
    if args.epochs:
        regime = replace(regime, epochs=args.epochs)
    if args.lr:
        regime = replace(regime, lr=args.lr)
    clock = Clock()
    results: dict = {"command": " ".join(sys.argv), "machine": machine(), "regime": regime.name,
                     "backbone": regime.backbone, "epochs": regime.epochs, "lr": regime.lr, "scheme": args.scheme,
                     "seed": args.seed, "recipe": args.recipe, "train_per_class": regime.train_per_class,
                     "val_per_class": regime.val_per_class, "test_per_class": regime.test_per_class, "heads": {}}
    best: dict[str, Path] = {}
    splits = None
    for kind in args.heads:
        t0 = time.perf_counter()
        out = Path(args.work) / f"{regime.name}_{kind}_{args.scheme}_seed{args.seed}"
        config = replace(regime, head=kind)
        cfg = train_config(config, args.scheme, args.seed, False, out, {"optim.lr": regime.lr}, recipe="paper")
        best[kind] = train_network(cfg, clock)
        final = best[kind]
        if args.recipe == "impatient":
            final = impatient_levers(config, args.scheme, args.seed, out, regime.lr)
        seconds = time.perf_counter() - t0
        record = {"train_seconds": seconds}
        for stage, path in (("trained", best[kind]), ("final", final)):
            loaded = load_checkpoint(path)
            if splits is None:
                splits = load_splits(regime, args.seed, loaded.preprocessing)
            o = run_outputs(loaded.net, splits, ("val", "test"), False, clock)
            record[stage] = {"val": _accuracy(o["val"]), "test": _accuracy(o["test"]),
                             "ensemble_val": _ensemble_accuracy(loaded, o["val"]),
                             "ensemble_test": _ensemble_accuracy(loaded, o["test"]),
                             "refit": ((loaded.meta.get("extra") or {}).get("recipe") or {}).get("refit")}
            record[stage]["E_val"] = expected(record[stage]["val"], args.scheme)
            record[stage]["E_test"] = expected(record[stage]["test"], args.scheme)
        record["params"] = sum(p.numel() for p in loaded.net.heads.parameters())
        results["heads"][kind] = record
        print(f"{kind}: trained in {seconds:.0f} s; val {record['final']['val']} test {record['final']['test']}",
              flush=True)
    results["costs"] = measure_heads(best, args.timing_rounds, args.timing_iterations)
    results["elapsed_s"] = clock.total()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results["costs"], indent=1))
    print(f"wrote {args.out} after {clock.total() / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
