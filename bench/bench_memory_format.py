"""Training step and eval pass in NCHW against channels-last (training.layout), one torch thread.

Rounds alternate the two layouts on the same network and batch, and each keeps
its fastest round, so both see the machine in the same state. The networks are
those of bench/reproduce_paper.py's regimes: the small CNN (28x28 gray, batch
128) and EfficientNet-Lite0 (64x64 gray, batch 32, pretrained when installed).

    python bench/bench_memory_format.py [--rounds 5] [--steps 5] [--out bench/results/training_memory_format.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import machine_info  # noqa: E402
from impatient_ros.runtime.backbones import list_backbones  # noqa: E402
from impatient_ros.runtime.model import NetConfig, build_network  # noqa: E402
from training.layout import fast_layout  # noqa: E402

CASES = (("smallcnn_tiny", (28, 28), 128, False), ("efficientnet_lite0", (64, 64), 32, True))


def _time_train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(z, y) for z in net(x))
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN picks its kernels on the first call
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


@torch.inference_mode()
def _time_eval(net: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    net.eval()
    net(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        net(x)
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--out", type=Path, help="write the table here too (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for backbone, size, batch, pretrained in CASES:
        if backbone not in list_backbones():
            print(f"{backbone}: not installed, skipped")
            continue
        torch.manual_seed(0)
        base = build_network(NetConfig(backbone=backbone, num_classes=10, in_channels=1, input_size=size,
                                       pretrained=pretrained))
        nets = {"NCHW": copy.deepcopy(base), "channels-last": fast_layout(copy.deepcopy(base), "cpu")}
        x, y = torch.randn(batch, 1, *size), torch.randint(0, 10, (batch,))
        best = {(layout, what): float("inf") for layout in nets for what in ("train", "eval")}
        for _ in range(args.rounds):
            for layout, net in nets.items():
                best[(layout, "train")] = min(best[(layout, "train")], _time_train(net, x, y, args.steps))
                best[(layout, "eval")] = min(best[(layout, "eval")], _time_eval(net, x, args.steps))
        for what in ("train", "eval"):
            a, b = best[("NCHW", what)], best[("channels-last", what)]
            rows.append(f"| {backbone} {size[0]}x{size[1]}, batch {batch} | {what} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    table = ["| network | pass | NCHW ms | channels-last ms | ratio |", "|---|---|---|---|---|", *rows]
    head = [f"- command: `python {' '.join(['bench/bench_memory_format.py', *(argv or sys.argv[1:])])}`",
            f"- machine: {machine_info()['cpu_model']}, {torch.get_num_threads()} of {os.cpu_count()} cores used, "
            f"torch {torch.__version__}, {args.rounds} alternating rounds of {args.steps} steps, fastest kept", ""]
    text = "\n".join(head + table)
    print(text)
    if args.out:
        args.out.write_text("# Training's memory layout: NCHW against channels-last on the CPU\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
