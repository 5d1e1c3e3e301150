"""Facts about the data sets the package knows by name (no torch, no rclpy).

Fashion-MNIST's labels are indices 0..9 into :data:`FASHION_MNIST_CLASSES`
(the order of the data set's documentation, https://github.com/zalandoresearch/fashion-mnist).
Training stores these names in the checkpoint and the camera tool labels its
frames with them, so both must use this one tuple.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_SPLITS", "default_fashion_mnist_dir"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# IDX file stems per split (the files may be gzipped: readers detect it by magic bytes).
FASHION_MNIST_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_fashion_mnist_dir() -> Path:
    """``$IMPATIENT_FASHION_MNIST`` if set, else the Debian package ``dataset-fashion-mnist``'s folder."""
    return Path(os.environ.get("IMPATIENT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
