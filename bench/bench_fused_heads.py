"""The fused forms of an average-pooling EP head at batch 1: pooled, separable and dense, per map shape.

One head (pool to a grid -> BN1d -> Linear, random statistics) per shape and class count is fused three ways
(runtime.fusion's FusedHead: adaptive pool + product; rows pooled by a product with the columns folded in;
one dense product on the flattened map, left out above 4 M weights), the forms checked against each other, then timed in alternating
rounds (fastest round kept) on one thread. The kind fuse_head picks is shown beside them.

    python bench/bench_fused_heads.py [--rounds 7] [--calls 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402

from impatient_ros.runtime.fusion import (  # noqa: E402
    FusedHead, _dense_through_pool, _folded, fuse_head, separable_head)
from impatient_ros.runtime.heads import make_head  # noqa: E402

# (channels, H, W, grid, classes): the embedded model's and the reproduction networks' stage maps with 7x7 / 4x4 /
# 2x2 / 8x8 grids (10 classes), and resnet18's two deepest maps at 224x224 on 4x4 grids with 10 and 1000 classes
# (the separable form's linear layer reads g x W columns per channel instead of g x g: more classes, more weight).
SHAPES = ((16, 32, 32, 7, 10), (32, 16, 16, 7, 10), (64, 8, 8, 7, 10), (40, 8, 8, 7, 10), (128, 8, 8, 7, 10),
          (16, 32, 32, 4, 10), (32, 16, 16, 4, 10), (64, 8, 8, 4, 10), (16, 32, 32, 2, 10), (112, 4, 4, 2, 10),
          (16, 28, 28, 8, 10), (32, 14, 14, 8, 10), (256, 14, 14, 4, 10), (512, 7, 7, 4, 10),
          (256, 14, 14, 4, 1000), (512, 7, 7, 4, 1000))
DENSE_MAX_WEIGHTS = 4_000_000


def _forms(c: int, h: int, w: int, grid: int, classes: int) -> tuple[str, dict[str, torch.nn.Module]]:
    head = make_head(f"avg{grid}x{grid}", c, (h, w), classes)
    with torch.no_grad():
        head.norm.running_mean.uniform_(-1.0, 1.0)
        head.norm.running_var.uniform_(0.5, 2.0)
    head.eval()
    wt, b = _folded(head.norm, head.fc, 1)
    forms = {"pooled": FusedHead(wt, b, grid, "pooled"),
             "separable": separable_head(wt, b, grid, (c, h, w), "separable")}
    if c * h * w * classes <= DENSE_MAX_WEIGHTS:
        forms["dense"] = FusedHead(_dense_through_pool(wt, grid, (c, h, w)), b, None, "dense")
    return fuse_head(head, (c, h, w)).kind, {k: m.float() for k, m in forms.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500, help="calls per form and round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, batch 1, {args.rounds} alternating rounds of {args.calls} calls, "
          "fastest round kept (us per call)")
    print("| map C x H x W | grid | classes | even windows | pooled us | separable us | dense us | fuse_head picks |")
    print("|---|---|---|---|---|---|---|---|")
    for c, h, w, grid, classes in SHAPES:
        picked, forms = _forms(c, h, w, grid, classes)
        x = torch.randn(1, c, h, w)
        with torch.inference_mode():
            best = _time(forms, x, args.rounds, args.calls)
        even = "yes" if h % grid == 0 and w % grid == 0 else "no"
        dense = f"{best['dense']:.1f}" if "dense" in best else "-"
        print(f"| {c}x{h}x{w} | {grid}x{grid} | {classes} | {even} | {best['pooled']:.1f} | {best['separable']:.1f} | "
              f"{dense} | {picked} |", flush=True)
    return 0


def _time(forms: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Check the forms agree, then the fastest round's us per call of each."""
    ref = forms["pooled"](x)
    for m in forms.values():
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
        for _ in range(100):
            m(x)
    best = {k: float("inf") for k in forms}
    for _ in range(rounds):
        for k, m in forms.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                m(x)
            best[k] = min(best[k], (time.perf_counter() - t0) / calls * 1e6)
    return best


if __name__ == "__main__":
    sys.exit(main())
