"""``impatient-train``: train an impatient network, or evaluate a checkpoint (``--eval-only``).

Examples::

    impatient-train --out runs/fmnist --epochs 10 --scheme LIN
    impatient-train --config configs/fashion_mnist_smallcnn.yaml --lr 0.05
    impatient-train --dataset imagefolder --data-dir ~/data/scenes15 --backbone resnet18 \\
        --input-size 224 --budget-distribution uniform:5,40 --calibration timing.json
    torchrun --nproc_per_node 2 -m impatient_ros.training --out runs/ddp        # data parallel
    impatient-train --eval-only runs/fmnist/best.pt               # per-exit test accuracy

Options given on the command line override the ``--config`` YAML file, which
overrides the defaults. The final config is written to ``<out>/config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full parser: run options, then the config groups (model, data, optimisation, budget, training)."""
    from .config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="impatient-train",
        description="Train a CNN with an early-prediction exit after every stage, all exits jointly with "
                    "budget-derived loss weights (Amthor et al., BMVC 2016); or evaluate a checkpoint.",
        epilog="Precedence: defaults < --config YAML < command-line options.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="YAML", help="config file (the layout of <out>/config.yaml)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its resume.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --out (its checkpoints and metrics are deleted)")
    run.add_argument("--eval-only", metavar="CKPT", help="only report per-exit accuracy of this checkpoint")
    run.add_argument("--split", default="test", metavar="SPLIT",
                     help="split for --eval-only: test or val (default: test)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")
    debug = parser.add_argument_group("debugging")
    debug.add_argument("--stop-after", type=int, metavar="EPOCH",
                       help="stop after this epoch as if interrupted (continue with --resume)")
    debug.add_argument("--debug-checksum", metavar="FILE",
                       help="every process writes FILE.rank<R>.json with its final parameter checksum")
    add_config_arguments(parser)
    return parser


def _setup_logging() -> None:
    log = logging.getLogger("training")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def _eval_only(args: argparse.Namespace) -> int:
    from .trainer import evaluate_checkpoint

    opts = vars(args)
    stats = evaluate_checkpoint(
        args.eval_only, split=args.split, data_dir=opts.get("data.data_dir"),
        test_per_class=opts.get("data.test_per_class"), batch_size=opts.get("data.eval_batch_size", 512),
        device=opts.get("device", "auto"), workers=opts.get("data.workers"))
    print(f"{stats['checkpoint']}: {stats['split']} split, {stats['samples']} images")
    for k, (acc, loss) in enumerate(zip(stats["exit_accuracy"], stats["exit_loss"]), start=1):
        print(f"  exit {k}: accuracy {100 * acc:6.2f} %   loss {loss:.4f}")
    if stats["expected_accuracy"] is not None:
        print(f"  budget-weighted expected accuracy: {100 * stats['expected_accuracy']:.2f} %")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``impatient-train`` and ``python -m training``; returns the exit status."""
    from impatient_ros.runtime.checkpoint import CheckpointError
    from impatient_ros.core.budget import BudgetError
    from .config import ConfigError, config_from_args
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        if args.eval_only:
            return _eval_only(args)
        from .trainer import train

        cfg = config_from_args(args)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                       checksum_file=args.debug_checksum, progress=args.progress)
    except (ConfigError, DataError, BudgetError, CheckpointError) as exc:
        print(f"impatient-train: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"impatient-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("impatient-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if result.last is not None:  # rank 0 only
        print(f"outputs in {result.out}/: last.pt" + (", best.pt" if result.best else "")
              + ", resume.pt, config.yaml, metrics.jsonl")
    return 0
