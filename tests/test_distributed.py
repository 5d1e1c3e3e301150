"""Data-parallel training: two CPU processes under torchrun (gloo) must end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from tests.conftest import FASHION_MNIST_DIR, REPO, requires_fashion_mnist
from training.distributed import DistContext, ShardSampler

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def test_shard_sampler_covers_every_index_once() -> None:
    shards = [list(ShardSampler(11, DistContext(rank=r, world_size=3, backend="gloo"))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(ShardSampler(11, DistContext(rank=r, world_size=3, backend="gloo"))) for r in range(3)] == [4, 4, 3]


@requires_fashion_mnist
def test_two_process_run_agrees_across_ranks(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training", "--device", "cpu", "--out", str(out), "--debug-checksum", str(out / "sum"),
        "--backbone", "smallcnn_tiny", "--data-dir", str(FASHION_MNIST_DIR), "--train-per-class", "16",
        "--val-split", "3", "--test-per-class", "3", "--epochs", "1", "--batch-size", "16",
        "--max-steps-per-epoch", "3", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sums = [json.loads((out / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert [s["world_size"] for s in sums] == [2, 2]
    assert sums[0]["sha256"] == sums[1]["sha256"], "DDP ranks ended with different weights"

    # Only rank 0 writes the outputs; evaluation counts are summed over both shards exactly once.
    assert (out / "last.pt").is_file() and (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # One epoch line, the default recipe's finalize line (refit + ensemble of best.pt), the test line.
    assert [r.get("epoch") for r in records] == [1, None, None]
    assert [r.get("event") for r in records[1:]] == ["finalize", "test"]
    assert records[-1]["samples"] == 30
    assert proc.stdout.count("epoch 1/1") == 1  # one log line, from rank 0


def _lp_start_rank(rank: int, out: str, port: int, argv: list[str]) -> None:
    """One rank of a 2-process run whose LP-FT start gives exit 1 a 2x2 grid (spawned by the test below)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch as _torch

    from training import probes
    from training.cli import build_parser
    from training.config import config_from_args
    from training.trainer import train

    _torch.set_num_threads(1)
    # Which grid val prefers on a split this small is chance: exit 1 must take 2x2 here, so that rank 1 has to
    # adopt a head rank 0 chose (the narrowing only matters on rank 0, where the probes are fitted).
    own = probes.pooling_candidates
    probes.pooling_candidates = lambda net, k: ["avg2x2"] if k == 0 else own(net, k)
    cfg = config_from_args(build_parser().parse_args(["--out", out, *argv]))
    train(cfg, progress=False, checksum_file=f"{out}/sum")


@requires_fashion_mnist
def test_ranks_adopt_the_heads_the_lp_ft_start_chose(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from impatient_ros.runtime.checkpoint import load_checkpoint
    from impatient_ros.runtime.model import list_backbones

    if "efficientnet_lite0" not in list_backbones():
        pytest.skip("needs efficientnet_lite0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    argv = ["--backbone", "efficientnet_lite0", "--pretrained", "--data-dir", str(FASHION_MNIST_DIR), "--input-size",
            "32", "--channels", "gray", "--train-per-class", "6", "--val-split", "3", "--test-per-class", "1",
            "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "10", "--lr", "0.01", "--augmentation",
            "none", "--device", "cpu", "--no-progress"]
    mp.start_processes(_lp_start_rank, args=(str(out), port, argv), nprocs=2, join=True, start_method="spawn")
    sums = [json.loads((out / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert sums[0]["sha256"] == sums[1]["sha256"], "DDP ranks ended with different weights"
    assert load_checkpoint(out / "last.pt").net.head_kinds()[0] == "avg2x2"
