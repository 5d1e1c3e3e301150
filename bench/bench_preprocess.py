"""Measure the Preprocessor's CPU paths against plain OpenCV, and the peak memory of one huge frame.

Prints measured figures (this is not a test; nothing is asserted). Two parts:

1. Latency, interleaved (every round runs each variant once, in a fresh random
   order) so load drift hits all variants alike; medians, p90 and the ratio of
   each median to the plain-OpenCV floor of the same case:

   * ``opencv floor``: ``cv2.cvtColor`` (gray networks) + ``cv2.resize``
     ``INTER_AREA`` on the uint8 frame + ``astype(float32)`` of the small
     result: the least any preprocessing must do (it does not even normalise
     or make a tensor).
   * ``Preprocessor opencv``: the CPU default (``backend="auto"`` on the CPU).
   * ``Preprocessor torch``: the torch path (the CUDA path, and the CPU
     default before the OpenCV path existed).

   Cases: 640x480 rgb8 -> the embedded model's input (32x32 gray), 1920x1080
   rgb8 -> 224x224 rgb (ImageNet statistics); ``--all`` adds other layouts.
2. ``--accuracy N``: the embedded model on the first N Fashion-MNIST test
   images, each enlarged to a 640x480 rgb8 frame exactly as the camera tool
   sends it (``impatient_ros.tools.sources.convert_frame``: ``INTER_LINEAR``,
   gray repeated to R, G, B), preprocessed frame by frame by each path; top-1
   accuracy of every exit, beside the training transform on the 28x28 originals
   (what the reported test accuracy measures), and how far each path's inputs
   are from the training transform's.
3. ``--memory``: peak resident set (``ru_maxrss``) of a fresh subprocess that
   imports everything, builds the frame, then preprocesses it once, per path:
   7000x7000 rgba16 (392 MB, what a 381 KB PNG decodes to) -> 32x32 gray.

    python bench/bench_preprocess.py                     # part 1, the two target cases
    python bench/bench_preprocess.py --all --memory      # every layout, and the memory part
    python bench/bench_preprocess.py --accuracy 3000     # and the accuracy part
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from _common import interleaved, median_p90_ms, print_table  # also puts the checkout on sys.path
from impatient_ros.runtime.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "fashion_mnist_smallcnn.pt"
RGB_224 = {"input_size": [224, 224], "channels": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_TO_GRAY = {"rgb": cv2.COLOR_RGB2GRAY, "bgr": cv2.COLOR_BGR2GRAY,
            "rgba": cv2.COLOR_RGBA2GRAY, "bgra": cv2.COLOR_BGRA2GRAY}


def embedded_preprocessing() -> dict:
    if EMBEDDED.is_file():
        from impatient_ros.runtime.checkpoint import load_checkpoint

        return dict(load_checkpoint(EMBEDDED).preprocessing)
    return {"input_size": [32, 32], "channels": "gray", "mean": [0.286], "std": [0.353]}


def frame(height: int, width: int, channels: int, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """A camera-like frame: smooth shading plus texture (random noise alone is not what cameras see)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    planes = [base + 0.1 * c + 0.1 * rng.standard_normal((height, width), np.float32) for c in range(channels)]
    image = np.clip(np.stack(planes, -1), 0, 1) * top
    return image.astype(dtype)


def opencv_floor(image: np.ndarray, order: str, spec: dict):
    height, width = spec["input_size"]

    def run() -> np.ndarray:
        x = cv2.cvtColor(image, _TO_GRAY[order]) if spec["channels"] == "gray" and order != "gray" else image
        return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)

    return run


def latency(cases: list[tuple[str, np.ndarray, str, dict]], reps: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, image, order, spec in cases:
        new = Preprocessor(spec, backend="opencv")
        old = Preprocessor(spec, backend="torch")
        variants = {
            "opencv floor": opencv_floor(image, order, spec),
            "Preprocessor opencv": lambda: new(image, order),
            "Preprocessor torch": lambda: old(image, order),
        }
        with torch.inference_mode():
            samples = interleaved(variants, reps=reps, warmup=5)
        floor = float(np.median(samples["opencv floor"]))
        for variant, values in samples.items():
            median, p90 = median_p90_ms(values)
            rows.append([name, variant, median, p90, round(float(np.median(values)) / floor, 2)])
    return rows


_MEMORY_CHILD = r"""
import json, resource, sys
import numpy as np, torch
from impatient_ros.runtime.preprocess import Preprocessor
backend = sys.argv[1]
pre = Preprocessor({"input_size": [32, 32], "channels": "gray", "mean": [0.286], "std": [0.353]}, backend=backend)
pre(np.zeros((64, 64, 4), np.uint16), "bgra")                    # warm-up: kernels, thread pools
image = np.full((7000, 7000, 4), 30000, np.uint16)               # 392 MB, touched (np.full writes it)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = pre(image, "bgra")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"backend": backend, "frame_mib": image.nbytes / 2**20, "before_mib": before / 1024,
                  "peak_mib": after / 1024, "extra_mib": (after - before) / 1024}))
"""


def memory() -> list[list[object]]:
    rows: list[list[object]] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for backend in ("opencv", "torch"):
        done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, backend], capture_output=True, text=True,
                              env=env, cwd=ROOT, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append([f"7000x7000 bgra16 -> 32x32 gray, {backend}", result["frame_mib"], result["before_mib"],
                     result["peak_mib"], result["extra_mib"]])
    return rows


def accuracy(count: int) -> tuple[list[list[object]], list[list[object]]]:
    from impatient_ros.runtime.checkpoint import load_checkpoint
    from impatient_ros.tools.sources import Frame, convert_frame
    from training.data import load_fashion_mnist, make_transform

    checkpoint = load_checkpoint(EMBEDDED)
    net, spec = checkpoint.net.eval(), dict(checkpoint.preprocessing)
    images, labels = load_fashion_mnist(split="test")
    images, labels = images[:count], labels[:count]
    training = make_transform(spec).batch(images.unsqueeze(1))            # (N, 1, 32, 32)
    inputs = {"training transform (28x28 originals)": training}
    for backend in ("opencv", "torch"):
        pre = Preprocessor(spec, backend=backend)
        frames = []
        for i, image in enumerate(images.numpy()):
            rgb = convert_frame(Frame(image[:, :, None], "gray", None, i, f"test[{i}]"), "rgb8", (640, 480))
            frames.append(pre(rgb, "rgb"))
        inputs[f"640x480 rgb8 frames, Preprocessor {backend}"] = torch.cat(frames)
    acc_rows, diff_rows = [], []
    with torch.inference_mode():
        for name, x in inputs.items():
            correct = np.zeros(net.num_stages)
            for start in range(0, count, 500):
                outputs = net(x[start:start + 500])
                for k, logits in enumerate(outputs):
                    correct[k] += int((logits.argmax(1) == labels[start:start + 500]).sum())
            acc_rows.append([name, *(round(100.0 * c / count, 2) for c in correct)])
            if x is not training:
                d = (x - training).abs() * float(spec["std"][0])                # back on the 0..1 scale
                diff_rows.append([name, float(d.mean()), float(d.max())])
    return acc_rows, diff_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300, help="interleaved rounds per case (default 300)")
    parser.add_argument("--all", action="store_true", help="also bgra8, mono8, mono16, rgb16 and upscaling cases")
    parser.add_argument("--accuracy", type=int, default=0, metavar="N",
                        help="also the accuracy part on the first N Fashion-MNIST test images")
    parser.add_argument("--memory", action="store_true", help="also the peak-memory part (two subprocesses)")
    args = parser.parse_args()

    small = embedded_preprocessing()
    cases = [
        ("640x480 rgb8 -> 32x32 gray", frame(480, 640, 3), "rgb", small),
        ("1920x1080 rgb8 -> 224x224 rgb", frame(1080, 1920, 3), "rgb", RGB_224),
    ]
    if args.all:
        cases += [
            ("640x480 bgra8 -> 32x32 gray", frame(480, 640, 4), "bgra", small),
            ("640x480 mono8 -> 32x32 gray", frame(480, 640, 1)[:, :, 0], "gray", small),
            ("640x480 mono16 -> 32x32 gray", frame(480, 640, 1, np.uint16)[:, :, 0], "gray", small),
            ("1920x1080 bgr8 -> 224x224 rgb", frame(1080, 1920, 3), "bgr", RGB_224),
            ("1920x1080 rgb16 -> 224x224 rgb", frame(1080, 1920, 3, np.uint16), "rgb", RGB_224),
            ("28x28 mono8 -> 32x32 gray (enlarge)", frame(28, 28, 1)[:, :, 0], "gray", small),
        ]
    print(f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"embedded model preprocessing: {small}\n")
    print(f"-- latency ({args.reps} interleaved rounds; ratio = median / median of the opencv floor)")
    print_table(["case", "variant", "median ms", "p90 ms", "x floor"], latency(cases, args.reps))
    if args.accuracy:
        torch.set_num_threads(1)   # the frames are preprocessed one by one; one thread keeps that fast
        acc_rows, diff_rows = accuracy(args.accuracy)
        stages = len(acc_rows[0]) - 1
        print(f"-- embedded model, first {args.accuracy} Fashion-MNIST test images: top-1 accuracy %")
        print_table(["input", *(f"exit {k + 1}" for k in range(stages))], acc_rows)
        print("-- network inputs vs the training transform's, on the 0..1 scale (|difference| * std)")
        print_table(["input", "mean", "max"], diff_rows)
    if args.memory:
        print("-- peak resident set of one frame (fresh subprocess per path; MiB)")
        print_table(["case", "frame", "RSS before", "peak RSS", "peak - before"], memory())


if __name__ == "__main__":
    main()
