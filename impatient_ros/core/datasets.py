"""Facts about the data sets the package knows by name (no torch, no rclpy).

Fashion-MNIST's labels are indices 0..9 into :data:`FASHION_MNIST_CLASSES`
(the order of the data set's documentation, https://github.com/zalandoresearch/fashion-mnist).
Training stores these names in the checkpoint and the camera tool labels its
frames with them, so both must use this one tuple.
"""

from __future__ import annotations

__all__ = ["FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
