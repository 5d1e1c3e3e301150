"""Screen candidate levers of OURS on the validation split of one seed, before they enter the reproduction.

Each candidate is a set of TrainConfig overrides on top of a regime of
``bench/reproduce_paper.py`` (same data, splits, schedule and rate). Per
scheme and candidate, the network is trained as OURS would be trained there
(a backbone without pretrained weights: the paper recipe's joint training,
then the impatient recipe's post-hoc refit and exit ensemble on its chosen
epoch; a pretrained one: ``--recipe impatient`` end to end) and the script
prints the validation E[acc] of the scheme before and after refit and
ensemble. Only validation figures are computed: a screen chooses, the test
split is left to the reproduction.

    python bench/screen_ours.py --regime smallcnn --schemes ILIN IPOLY \\
        --candidate plain: \\
        --candidate ens_distill:distill=true,distill_teacher=ensemble,distill_weight=0.5

A candidate is ``NAME:KEY=VALUE,...`` with TrainConfig's dotted keys
(``optim.lr``, ``model.head``, ``distill_teacher``...); values are read as
JSON where they parse (numbers, true/false), else as text. The regime's own
rate is used unless a candidate sets ``optim.lr``; ``--lr`` replaces it.
Finished identical runs in ``--work`` are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reproduce_paper as rp  # noqa: E402  (the regimes and their configs have one owner)
from _common import result_path  # noqa: E402


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` -> (name, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"candidate {text!r}: expected NAME:KEY=VALUE,... (NAME: for none)")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"candidate {name!r}: {item!r} is not KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def candidate_config(regime: Any, scheme: str, seed: int, work: Path, name: str, overrides: dict[str, Any],
                     lr: float, recipe: str) -> Any:
    """The TrainConfig of one candidate (its own folder under ``work``)."""
    ov = {"optim.lr": lr, **overrides}
    distill = bool(ov.pop("distill", False))
    out = work / regime.name / f"seed{seed}" / f"{scheme}_{name}" / recipe
    return rp.train_config(regime, scheme, seed, distill, out, ov, recipe=recipe)


def finalize_record(best: Path) -> dict[str, Any]:
    """The impatient recipe's finalize line of a run folder."""
    lines = (best.parent / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"finalize"' in line][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", default="smallcnn", choices=sorted(rp.PLANS["full"]))
    parser.add_argument("--schemes", nargs="+", default=["ILIN", "IPOLY"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="the rate of every candidate that sets none "
                        "(default: the regime's own)")
    parser.add_argument("--candidate", type=parse_candidate, action="append", required=True, metavar="NAME:K=V,...")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (one torch thread each)")
    parser.add_argument("--work", type=Path, default=Path("runs/screen_ours"))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines to STEM.jsonl", metavar="STEM")
    args = parser.parse_args(argv)
    regime = rp.PLANS["full"][args.regime]
    lr = args.lr if args.lr is not None else regime.lr
    clock = rp.Clock()
    clock.jobs = args.jobs
    # Without pretrained weights the impatient recipe trains exactly the paper recipe's network (no LP-FT
    # start), so that run is trained and finalized in a copy, as the reproduction does.
    recipe = "impatient" if regime.pretrained else "paper"
    cfgs = {(s, n): candidate_config(regime, s, args.seed, args.work, n, ov, lr, recipe)
            for s in args.schemes for n, ov in args.candidate}
    t0 = time.perf_counter()
    rp.train_many(list(cfgs.values()), clock)
    rows = []
    overrides_of = dict(args.candidate)
    for (scheme, name), cfg in cfgs.items():
        best = rp.train_network(cfg, clock)
        if recipe == "paper":
            fin_cfg = candidate_config(regime, scheme, args.seed, args.work, name, overrides_of[name], lr, "impatient")
            best = rp.finalized_copy(fin_cfg, lambda best=best: best, clock)
        rec = finalize_record(best)
        row = {"regime": regime.name, "scheme": scheme, "candidate": name, "seed": args.seed,
               "overrides": overrides_of[name],
               "val_expected_plain": rec["val_expected_accuracy"],
               "val_expected_ensemble": rec["val_ensemble_expected_accuracy"],
               "val_exit_accuracy": rec["val_exit_accuracy"], "val_ensemble_exit_accuracy": rec["ensemble"]["val_accuracy"]}
        rows.append(row)
    print(f"\n{regime.name}, seed {args.seed}: validation E[acc] % after refit (plain) and with the exit ensemble "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"{'scheme':<7} {'candidate':<22} {'plain':>6} {'ensemble':>8}  ensemble per exit")
    for r in rows:
        per_exit = " / ".join(f"{100 * a:.1f}" for a in r["val_ensemble_exit_accuracy"])
        print(f"{r['scheme']:<7} {r['candidate']:<22} {100 * r['val_expected_plain']:6.2f} "
              f"{100 * r['val_expected_ensemble']:8.2f}  {per_exit}")
    if args.out is not None:
        path = result_path(args.out, ".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
