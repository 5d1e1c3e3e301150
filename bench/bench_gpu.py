"""GPU latency of plain vs staged inference at batch 1 (prints measured figures; not a test).

Per backbone (224x224, random weights) and precision (fp32, fp16):

* eager plain: the backbone alone (blocks + last head), PyTorch eager
* CUDA-graph plain: the same captured as one CUDA graph
* eager stage-by-stage: block, head, softmax and a synchronize after every stage
* engine t_A: StagedEngine anytime through every exit (per-stage CUDA graphs, queued)
* engine t_B: StagedEngine a-priori at the last exit (blocks + last head only)
* engine eager t_A: the engine without CUDA graphs

Also the largest difference between the engine's probabilities and the eager
model's softmax (the tolerance the engine documents: fp32 1e-4, fp16 1e-2).

    python bench/bench_gpu.py --models vgg19_bn resnet50 mobilenet_v3_large --reps 200
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from _common import interleaved, median_p90_ms, plain_network, print_table, random_checkpoint
from impatient_ros.runtime.engine import Mode, StagedEngine

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def graphed(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Capture ``module(x)`` as one CUDA graph (warm-up on a side stream first); return its replay."""
    static_in = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(static_in)
    return graph.replay


def bench_model(backbone: str, precision: str, reps: int) -> list[tuple]:
    fp16 = precision == "fp16"
    dtype = torch.float16 if fp16 else torch.float32
    device = torch.device("cuda")
    net = random_checkpoint(backbone, seed=0).net.to(device).to(dtype).eval()
    plain = plain_network(net)
    engine = StagedEngine(random_checkpoint(backbone, seed=0), "cuda", fp16=fp16, cuda_graphs=True)
    engine_eager = StagedEngine(random_checkpoint(backbone, seed=0), "cuda", fp16=fp16, cuda_graphs=False)
    x = torch.randn(engine.preprocessor.output_shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize

    def stage_by_stage() -> None:
        h = x
        for k in range(net.num_stages):
            h = net.run_block(k, h)
            torch.softmax(net.run_head(k, h).float(), -1)
            torch.cuda.synchronize()

    with torch.inference_mode():
        replay_plain = graphed(plain, x)
        eager_probs = [torch.softmax(logits.float(), -1)[0].cpu().numpy() for logits in net(x)]
        variants = {
            "eager plain": lambda: plain(x),
            "CUDA-graph plain": replay_plain,
            "eager stage-by-stage, every head, sync": stage_by_stage,
            "engine t_A (graphs, every exit)": lambda: engine.run_tensor(x, mode=Mode.ANYTIME),
            "engine t_B (graphs, a-priori last exit)": lambda: engine.run_tensor(x, mode=Mode.APRIORI),
            "engine eager t_A": lambda: engine_eager.run_tensor(x, mode=Mode.ANYTIME),
        }
        times = interleaved(variants, reps=reps, warmup=10, sync=sync)
    report = engine.run_tensor(x)
    diff = max(float(np.abs(r.probs - p).max()) for r, p in zip(report.results, eager_probs))
    base = np.median(times["eager plain"])
    rows = []
    for name, samples in times.items():
        median, p90 = median_p90_ms(samples)
        rows.append((backbone, precision, name, median, p90, float(np.median(samples) / base)))
    verdict = "within" if diff <= TOLERANCE[precision] else "EXCEEDS"
    print(f"{backbone} {precision}: {engine.num_stages} stages, graphs={engine.cuda_graphs}, "
          f"max |engine - eager| probability = {diff:.2e} ({verdict} {TOLERANCE[precision]:g})")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg19_bn", "resnet50", "mobilenet_v3_large"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run bench/bench_engine.py for the CPU figures")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, batch 1, {args.reps} interleaved repetitions\n")
    rows = []
    for backbone in args.models:
        for precision in args.precisions:
            rows += bench_model(backbone, precision, args.reps)
            torch.cuda.empty_cache()
    print()
    print_table(["model", "precision", "variant", "median ms", "p90 ms", "x eager plain"], rows)


if __name__ == "__main__":
    main()
