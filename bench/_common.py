"""Shared helpers of the benchmark scripts: networks to time, interleaved timing, statistics, tables.

Not a test module: the scripts print measured figures only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Run from a source checkout: `python bench/<script>.py` puts bench/ (not the root) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from impatient_ros.runtime.checkpoint import LoadedCheckpoint, load_checkpoint  # noqa: E402
from impatient_ros.runtime.model import NetConfig, build_network  # noqa: E402

# Backbone -> (input size, input channels, classes) of the figures in the README/FACTS.
DEFAULT_SETUPS: dict[str, tuple[tuple[int, int], int, int]] = {
    "smallcnn": ((28, 28), 1, 10),
    "resnet18": ((224, 224), 3, 1000),
    "resnet50": ((224, 224), 3, 1000),
    "vgg19_bn": ((224, 224), 3, 1000),
    "mobilenet_v3_large": ((224, 224), 3, 1000),
}


def checkpoint_file(path: str | None, workdir: Path) -> Path:
    """The given checkpoint, else the embedded model, else a random-weight smallcnn saved in ``workdir``.

    The node benchmarks measure time, which does not need a trained network.
    """
    if path:
        return Path(path)
    embedded = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_smallcnn.pt"
    if embedded.is_file():
        return embedded
    from impatient_ros.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=(28, 28)))
    out = workdir / "random_smallcnn.pt"
    save_checkpoint(out, net, class_names=[str(i) for i in range(10)],
                    preprocessing={"input_size": [28, 28], "channels": "gray", "mean": [0.5], "std": [0.5]})
    return out


def random_checkpoint(backbone: str, seed: int = 0, head: str = "avg4x4") -> LoadedCheckpoint:
    """A LoadedCheckpoint of ``backbone`` with random weights (timing does not depend on training)."""
    size, channels, classes = DEFAULT_SETUPS[backbone]
    torch.manual_seed(seed)
    config = NetConfig(backbone=backbone, num_classes=classes, head=head, in_channels=channels, input_size=size)
    net = build_network(config).eval()
    gray = channels == 1
    preprocessing = {"input_size": list(size), "channels": "gray" if gray else "rgb",
                     "mean": [0.5] * channels, "std": [0.25] * channels}
    return LoadedCheckpoint(net=net, config=config, class_names=[str(i) for i in range(classes)],
                            preprocessing=preprocessing, budget=None, exit_accuracy=None, exit_cost=None,
                            train_config=None, meta={"source": "random weights"})


def checkpoint_for(name_or_path: str, seed: int = 0) -> LoadedCheckpoint:
    """A checkpoint file (if the argument is a path that exists) or random weights of a backbone name."""
    if Path(name_or_path).is_file():
        return load_checkpoint(name_or_path)
    if name_or_path not in DEFAULT_SETUPS:
        raise SystemExit(f"{name_or_path!r} is neither a checkpoint file nor one of {sorted(DEFAULT_SETUPS)}")
    return random_checkpoint(name_or_path, seed)


def plain_network(net: nn.Module) -> nn.Module:
    """The backbone alone: every block, then only the last exit's head (no EP heads in between)."""
    return nn.Sequential(*net.blocks, net.heads[-1]).eval()


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Time each variant ``reps`` times (seconds), in a fresh random order every round.

    Interleaving spreads clock/thermal drift and background load over all
    variants equally instead of biasing whichever ran last.
    """
    names = list(variants)
    rng = random.Random(seed)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            variants[name]()
            sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            sync()
            t0 = time.perf_counter()
            variants[name]()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: np.asarray(values) for name, values in samples.items()}


def median_p90_ms(samples: np.ndarray) -> tuple[float, float]:
    """Median and 90th percentile in milliseconds."""
    return 1e3 * float(np.median(samples)), 1e3 * float(np.quantile(samples, 0.9))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table; floats with three decimals."""
    text = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()


# --------------------------------------------------------------------------- node processes and the machine


def add_node_param_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--node-param NAME:=VALUE`` (repeatable): extra parameters of the node processes a script starts."""

    def node_param(text: str) -> str:
        if not text.partition(":=")[0] or ":=" not in text:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:=VALUE")
        return text

    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE", type=node_param,
                        help=help_text)


def node_param_args(params: Sequence[str]) -> list[str]:
    """``--ros-args`` words for ``params`` (NAME:=VALUE each): ["-p", NAME:=VALUE, ...]."""
    return [word for param in params for word in ("-p", param)]


def result_path(stem: Path, extension: str) -> Path:
    """``stem`` + ``extension`` ("soak_1.5min" + ".json"): Path.with_suffix would cut "soak_1.5min" at its dot."""
    return stem.with_name(stem.name + extension)


def machine_info() -> dict[str, object]:
    """CPU model, core count, load average (1/5/15 min) and OMP_NUM_THREADS of this machine, now."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)")}


def start_node_process(ros_args: Sequence[str], log_path: Path, extra_env: Mapping[str, str] | None = None):
    """Start ``python -m impatient_ros.ros.node --ros-args <ros_args>`` from the repository root.

    Output (unbuffered, ROS log lines included) goes to ``log_path``; the source
    tree comes first on PYTHONPATH, as in the node tests.
    Returns the Popen; stop it with :func:`stop_process`.
    """
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_LOGGING_BUFFERED_STREAM="0", **(extra_env or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", *ros_args],
                                cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` s; the exit status (None if it could not be reaped)."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode
