"""The fused forms of an average-pooling EP head at batch 1: pooled, separable and dense, per map shape.

One head (pool to a grid -> BN1d -> Linear, 10 classes, random statistics) per shape is fused three ways
(runtime.fusion's FusedHead: adaptive pool + product; rows pooled by a product with the columns folded in;
one dense product on the flattened map), the forms checked against each other, then timed in alternating
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

# (channels, H, W, grid): the embedded model's and the reproduction networks' stage maps with 7x7 / 4x4 / 2x2 grids.
SHAPES = ((16, 32, 32, 7), (32, 16, 16, 7), (64, 8, 8, 7), (40, 8, 8, 7), (128, 8, 8, 7),
          (16, 32, 32, 4), (32, 16, 16, 4), (64, 8, 8, 4), (16, 32, 32, 2), (112, 4, 4, 2))


def _forms(c: int, h: int, w: int, grid: int) -> tuple[str, dict[str, torch.nn.Module]]:
    head = make_head(f"avg{grid}x{grid}", c, (h, w), 10)
    with torch.no_grad():
        head.norm.running_mean.uniform_(-1.0, 1.0)
        head.norm.running_var.uniform_(0.5, 2.0)
    head.eval()
    wt, b = _folded(head.norm, head.fc, 1)
    forms = {"pooled": FusedHead(wt, b, grid, "pooled"),
             "separable": separable_head(wt, b, grid, (c, h, w), "separable"),
             "dense": FusedHead(_dense_through_pool(wt, grid, (c, h, w)), b, None, "dense")}
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
    print("| map C x H x W | grid | even windows | pooled us | separable us | dense us | fuse_head picks |")
    print("|---|---|---|---|---|---|---|")
    for c, h, w, grid in SHAPES:
        picked, forms = _forms(c, h, w, grid)
        x = torch.randn(1, c, h, w)
        with torch.inference_mode():
            best = _time(forms, x, args.rounds, args.calls)
        even = "yes" if h % grid == 0 and w % grid == 0 else "no"
        print(f"| {c}x{h}x{w} | {grid}x{grid} | {even} | {best['pooled']:.1f} | {best['separable']:.1f} | "
              f"{best['dense']:.1f} | {picked} |", flush=True)
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
