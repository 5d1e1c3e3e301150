"""The probes' L-BFGS stopping rule: time, iterations and validation accuracy along the C grid per setting.

On a trained network's pooled features (every candidate grid of the head refit), the C grid
(training.baselines.DEFAULT_CS) is fitted as select_probe fits it (small to large C, warm-started) once per
setting (gradient tolerance : iteration cap); the table shows what each setting costs and chooses on
validation data.

    python bench/bench_probe_solver.py --checkpoint runs/reproduce/full/smallcnn/seed0/EQ_lr0.1/best.pt \
        [--settings 1e-6:200 1e-6:100 1e-4:200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from impatient_ros.runtime.checkpoint import load_checkpoint  # noqa: E402
from training.baselines import DEFAULT_CS, fit_linear_probe  # noqa: E402
from training.data import load_data  # noqa: E402
from training.features import collect_pooled  # noqa: E402
from training.probes import pooling_candidates, probe_exits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained Fashion-MNIST network (best.pt)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["1e-6:200", "1e-6:100", "1e-4:200"],
                        help="gradient tolerance : iteration cap, per setting")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint)
    pre = loaded.preprocessing
    bundle = load_data("fashion-mnist", None, input_size=pre["input_size"], channels=pre["channels"], mean=pre["mean"],
                       std=pre["std"], val_split=args.val_per_class, train_per_class=args.train_per_class,
                       test_per_class=1, augmentation="none", seed=args.seed)
    net = loaded.net
    poolings = {k: pooling_candidates(net, k) for k in probe_exits(net)}
    tr, y_tr = collect_pooled(net, DataLoader(bundle.train, batch_size=256), poolings)
    va, y_va = collect_pooled(net, DataLoader(bundle.val, batch_size=256), poolings)
    classes = loaded.config.num_classes
    print(f"checkpoint {args.checkpoint}; {len(y_tr)} train / {len(y_va)} val images; C grid {list(DEFAULT_CS)}")
    settings = [(float(t), int(m)) for t, m in (s.split(":") for s in args.settings)]
    print("| exit | pooling | features | tol : cap | seconds | iterations per C | val acc % per C | chosen C |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {setting: 0.0 for setting in settings}
    for key in tr:
        for setting in settings:
            tol, cap = setting
            t0 = time.perf_counter()
            previous, iters, accs = None, [], []
            for c in sorted(DEFAULT_CS):
                previous = fit_linear_probe(tr[key], y_tr, c, num_classes=classes, tol=tol, max_iter=cap,
                                            init=previous)
                iters.append(previous.iterations)
                accs.append(100 * previous.accuracy(va[key], y_va))
            seconds = time.perf_counter() - t0
            totals[setting] += seconds
            chosen = sorted(DEFAULT_CS)[max(range(len(accs)), key=lambda i: (accs[i], -i))]
            print(f"| {key[0] + 1} | {key[1]} | {tr[key].shape[1]} | {tol:g} : {cap} | {seconds:.1f} | "
                  f"{' / '.join(map(str, iters))} | {' / '.join(f'{a:.1f}' for a in accs)} | {chosen:g} |", flush=True)
    print("total seconds per setting: " + ", ".join(f"{t:g} : {m}: {s:.1f}" for (t, m), s in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
