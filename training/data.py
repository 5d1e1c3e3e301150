"""Training data: Fashion-MNIST from its IDX files, any ImageFolder tree, per-class validation split.

Two sources:

* ``fashion-mnist``: the four gzipped IDX files (``train-images-idx3-ubyte.gz``
  etc.) read into memory as uint8 tensors; 10 named classes. Default folder:
  ``$IMPATIENT_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist`` (Debian
  package ``dataset-fashion-mnist``).
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` trees, one folder per
  class (how 15-Scenes, MIT-67 or a user's own classes come in). If the root
  holds ``train/`` the test split is ``test/`` (when present); otherwise the
  root itself is the training tree and there is no test split.

The validation split is always taken per class from the training data
(stratified, seeded), optionally with a cap of N training images per class
(the small-data regime).

Preprocessing contract (stored in the checkpoint, replayed by
``impatient_ros.runtime.preprocess.Preprocessor`` at run time): uint8 image -> /255 ->
resize to ``input_size`` (bilinear, antialiased when shrinking) -> ``(x - mean) /
std``. The evaluation transform here does the same steps; resizing is linear
and normalising affine, so the order of those two does not change the result
beyond float rounding. Colour images become gray with PIL's ``L`` mode, which
uses the same ITU-R BT.601 weights as the runtime.

Augmentation presets (training split only; validation and test never augment):

* ``none``: the evaluation transform.
* ``light``: random crop with zero padding (input_size // 8 pixels) + horizontal flip.
* ``standard``: RandomResizedCrop (scale 0.25..1) + horizontal flip + small colour jitter.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from impatient_ros.core import idx as _idx
from impatient_ros.core.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_SPLITS, default_fashion_mnist_dir

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "DataBundle",
    "TensorImageDataset",
    "FolderSubset",
    "ImageTransform",
    "default_fashion_mnist_dir",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "stratified_split",
    "cap_per_class",
    "parse_val_split",
    "mean_std_of",
    "make_transform",
    "load_data",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "imagefolder")
AUGMENTATIONS: tuple[str, ...] = ("none", "light", "standard")
CHANNELS: dict[str, int] = {"gray": 1, "rgb": 3}

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    split: (f"{images}.gz", f"{labels}.gz") for split, (images, labels) in FASHION_MNIST_SPLITS.items()
}
FASHION_MNIST_SIZE = (28, 28)

# Natural-image statistics for ImageFolder data when the user gives none.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

class DataError(ValueError):
    """Unreadable or inconsistent data, or an impossible split; the message says how to fix it."""


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-endian array: :func:`impatient_ros.core.idx.read_idx`.

    Raises :class:`DataError` (with the reader's message) for a missing or malformed file.
    """
    try:
        return _idx.read_idx(path)
    except _idx.IdxError as exc:
        raise DataError(str(exc)) from None


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file: :func:`impatient_ros.core.idx.write_idx` (DataError for what IDX cannot hold)."""
    try:
        return _idx.write_idx(path, array, compress)
    except _idx.IdxError as exc:
        raise DataError(str(exc)) from None


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") as uint8 images (N, 28, 28) and int64 labels (N,).

    Callers get fresh tensors; the decoded files are cached per process (keyed
    by path, size and modification time), since gunzipping 26 MB costs a
    second and a run, its evaluation and a test suite read them repeatedly.
    """
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(FASHION_MNIST_FILES)}")
    root = Path(root) if root is not None else default_fashion_mnist_dir()
    image_name, label_name = FASHION_MNIST_FILES[split]
    missing = [n for n in (image_name, label_name) if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST {split} files {missing} not found in {root}; install the Debian package "
            f"dataset-fashion-mnist or pass the folder holding the four *-ubyte.gz files (--data-dir)"
        )
    stamps = tuple((st.st_size, st.st_mtime_ns) for st in ((root / n).stat() for n in (image_name, label_name)))
    images, labels = _read_fashion_mnist(str(root.resolve()), split, stamps)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(root_text: str, split: str, stamps: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and check one split (cached; ``stamps`` invalidate the cache when the files change)."""
    root = Path(root_text)
    image_name, label_name = FASHION_MNIST_FILES[split]
    images = read_idx(root / image_name)
    labels = read_idx(root / label_name)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != FASHION_MNIST_SIZE:
        raise DataError(f"{root / image_name}: expected uint8 images of shape (N, 28, 28), "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{root / label_name}: expected a 1-D uint8 label file, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} files")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{root / label_name}: label {int(labels.max())} is out of range 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- splits


def parse_val_split(value: str | float | int) -> float | int:
    """A validation split: a fraction in [0, 1) per class (float) or a count per class (int >= 0)."""
    if isinstance(value, bool):
        raise DataError(f"validation split must be a fraction or a count, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise DataError(
                    f"validation split must be a fraction like 0.1 or a count like 500, got {text!r}") from None
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise DataError(f"validation count per class must be >= 0, got {value}")
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and 0.0 <= value < 1.0:
        return float(value)
    raise DataError(f"validation split {value!r}: give a fraction in [0, 1) or an integer count per class")


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    val_per_class: float | int,
    seed: int = 0,
    train_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class into (train, val), both sorted; seeded and independent of class order.

    ``val_per_class`` is a fraction (float, rounded per class, at least one
    image per class when > 0) or a count (int). ``train_per_class`` caps the
    training images kept per class after the validation images are taken.
    """
    labels = np.asarray(labels).reshape(-1)
    val_per_class = parse_val_split(val_per_class)
    if train_per_class is not None and (isinstance(train_per_class, bool) or int(train_per_class) < 1):
        raise DataError(f"training images per class must be >= 1, got {train_per_class!r}")
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if isinstance(val_per_class, int):
            n_val = val_per_class
        else:
            n_val = int(round(val_per_class * idx.size))
            if val_per_class > 0:
                n_val = max(n_val, 1)
        if n_val >= idx.size:
            raise DataError(
                f"class {c!r} has {idx.size} image(s), too few to hold out {n_val} for validation and keep one "
                f"for training; lower the validation split or add images"
            )
        val_parts.append(idx[:n_val])
        rest = idx[n_val:]
        train_parts.append(rest if train_per_class is None else rest[: int(train_per_class)])
    empty = np.zeros(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train.astype(np.int64), val.astype(np.int64)


def cap_per_class(labels: Sequence[int] | np.ndarray | torch.Tensor, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` images of every class, in file order (all when ``limit`` is None)."""
    labels = np.asarray(labels).reshape(-1)
    if limit is None:
        return np.arange(labels.size, dtype=np.int64)
    if isinstance(limit, bool) or int(limit) < 1:
        raise DataError(f"images per class must be >= 1, got {limit!r}")
    keep = [np.flatnonzero(labels == c)[: int(limit)] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


def mean_std_of(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale of uint8 images (N, H, W) or (N, C, H, W)."""
    x = images if images.dim() == 4 else images.unsqueeze(1)
    x = x.to(torch.float32).div_(255.0)  # float32 with torch's pairwise sums is exact enough here
    dims = (0, 2, 3)
    return [float(v) for v in x.mean(dims)], [float(v) for v in x.std(dims)]


# --------------------------------------------------------------------------- transforms


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size), exactly as the runtime Preprocessor resizes."""
    height, width = x.shape[-2:]
    if (height, width) == size:
        return x
    downscale = height > size[0] or width > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downscale)


class ImageTransform:
    """uint8 (C, H, W) tensor -> normalised float (C_out, *input_size), with an optional augmentation.

    Steps: /255, resize (or RandomResizedCrop for "standard"), gray -> rgb
    repeat when needed, augmentation, ``(x - mean) / std``. A picklable object
    (not a lambda) so DataLoader workers can use it.
    """

    def __init__(
        self,
        input_size: Sequence[int],
        channels: str,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: str = "none",
    ) -> None:
        if augmentation not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {augmentation!r}; valid presets: {', '.join(AUGMENTATIONS)}")
        if channels not in CHANNELS:
            raise DataError(f"unknown channels {channels!r}; valid: {', '.join(CHANNELS)}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channels = channels
        self.augmentation = augmentation
        n = CHANNELS[channels]
        mean = [float(v) for v in mean] * (n if len(mean) == 1 else 1)
        std = [float(v) for v in std] * (n if len(std) == 1 else 1)
        if len(mean) != n or len(std) != n or not all(s > 0 for s in std):
            raise DataError(f"mean/std need {n} value(s) for {channels!r} images and std > 0, got {mean} / {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(n, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(n, 1, 1)
        self.padding = max(1, min(self.input_size) // 8)
        self._v2: Callable[[torch.Tensor], torch.Tensor] | None = None
        if augmentation == "standard":
            from torchvision.transforms import v2

            jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2 if n == 3 else None)
            self._v2 = v2.Compose([
                v2.RandomResizedCrop(self.input_size, scale=(0.25, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                jitter,
            ])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 image (C, H, W) or (H, W) -> float (C_out, *input_size)."""
        if image.dim() == 2:
            image = image.unsqueeze(0)
        return self.batch(image.unsqueeze(0))[0]

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> float (B, C_out, *input_size), each augmented independently.

        The batched path exists for speed: on the in-memory Fashion-MNIST set a
        per-image pipeline costs ~0.1 ms of Python per image, more than a small
        CNN's own step on a batch.
        """
        x = images.to(torch.float32).div_(255.0)  # (B, C, H, W) in 0..1
        n = CHANNELS[self.channels]
        if x.shape[1] != n:
            if x.shape[1] == 1 and n == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise DataError(f"a {x.shape[1]}-channel image cannot feed a {self.channels!r} network")
        if self._v2 is not None:
            # v2 draws one set of parameters per call, so each image gets its own call.
            x = torch.stack([self._v2(img) for img in x]).clamp_(0.0, 1.0)
        else:
            x = _resize(x, self.input_size)
            if self.augmentation == "light":
                x = self._crop_flip(x)
        return (x - self.mean) / self.std

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: random crop of the zero-padded image back to its size, then a 50 % horizontal flip."""
        b, _, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))  # zero = black: Fashion-MNIST's background
        offsets = torch.randint(0, 2 * p + 1, (b, 2))
        rows = offsets[:, :1] + torch.arange(h)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(w)  # (B, W)
        batch = torch.arange(b)[:, None, None]
        crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        crops = crops.permute(0, 3, 1, 2)
        flip = (torch.rand(b) < 0.5)[:, None, None, None]
        return torch.where(flip, crops.flip(-1), crops).contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(input_size={self.input_size}, channels={self.channels!r}, "
                f"augmentation={self.augmentation!r})")


def make_transform(preprocessing: dict[str, Any], augmentation: str = "none") -> ImageTransform:
    """The transform for a preprocessing dict (``input_size``, ``channels``, ``mean``, ``std``)."""
    return ImageTransform(preprocessing["input_size"], preprocessing["channels"], preprocessing["mean"],
                          preprocessing["std"], augmentation)


# --------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, H, W) or (N, C, H, W) with int64 labels; ``transform`` maps one image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise DataError(f"images must be uint8 (N, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"need one label per image: {images.shape[0]} images, labels {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this when it exists): one batched transform."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index]
        if images.dim() == 3:
            images = images.unsqueeze(1)  # (B, 1, H, W)
        batch_fn = getattr(self.transform, "batch", None)
        x = batch_fn(images) if batch_fn is not None else torch.stack([self.transform(img) for img in images])
        return list(zip(x.unbind(0), self.labels[index].tolist()))

    @property
    def targets(self) -> list[int]:
        """Labels as a list (the ImageFolder attribute name)."""
        return self.labels.tolist()


def _load_image(path: str, channels: str) -> torch.Tensor:
    """Decode an image file to uint8 (C, H, W): PIL ``L`` (BT.601 luma) for gray, ``RGB`` otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == "gray" else "RGB")
            array = np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class FolderSubset(Dataset):
    """Selected samples of an ImageFolder, decoded with our loader and ``transform``."""

    def __init__(self, folder: Any, indices: Sequence[int], channels: str,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.samples = [folder.samples[int(i)] for i in indices]
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(_load_image(path, self.channels)), int(target)

    @property
    def targets(self) -> list[int]:
        """Labels as a list."""
        return [t for _, t in self.samples]


def _image_folder(root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; it must hold one sub-folder per class")
    try:
        # The loader is never called (we decode in FolderSubset); ImageFolder only scans the tree.
        return ImageFolder(str(root), loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: not a usable ImageFolder tree (one sub-folder of images per class): {exc}") from None


@dataclass
class DataBundle:
    """Datasets of one run and what the checkpoint must record about them."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    class_names: list[str]
    preprocessing: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # source, root, split sizes (for logs and config)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def load_data(
    dataset: str = "fashion-mnist",
    root: str | os.PathLike[str] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    channels: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    val_split: float | int = 0.1,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    augmentation: str = "none",
    seed: int = 0,
) -> DataBundle:
    """Build train/val/test datasets and the preprocessing dict.

    Defaults: Fashion-MNIST 28x28 gray with mean/std measured on the training
    images used; ImageFolder 224x224 RGB with ImageNet mean/std (averaged for
    gray). ``test_per_class`` caps the test split (quick checks only).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if augmentation not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augmentation!r}; valid presets: {', '.join(AUGMENTATIONS)}")
    if channels is not None and channels not in CHANNELS:
        raise DataError(f"unknown channels {channels!r}; valid: {', '.join(CHANNELS)}")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither")

    if dataset == "fashion-mnist":
        return _load_fashion_mnist_bundle(root, input_size, channels or "gray", mean, std, val_split,
                                          train_per_class, test_per_class, augmentation, seed)
    return _load_folder_bundle(root, input_size, channels or "rgb", mean, std, val_split,
                               train_per_class, test_per_class, augmentation, seed)


def _preprocessing(size: Sequence[int], channels: str, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    n = CHANNELS[channels]
    mean = [float(v) for v in mean] * (n if len(mean) == 1 else 1)
    std = [float(v) for v in std] * (n if len(std) == 1 else 1)
    if len(mean) != n or len(std) != n:
        raise DataError(f"mean/std need {n} value(s) for {channels!r} images, got {mean} / {std}")
    return {"input_size": [int(size[0]), int(size[1])], "channels": channels, "mean": mean, "std": std}


def _check_size(input_size: Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if input_size is None:
        return default
    size = tuple(int(v) for v in input_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"input size must be [height, width] positive integers, got {list(input_size)}")
    return size  # type: ignore[return-value]


def _load_fashion_mnist_bundle(root, input_size, channels, mean, std, val_split, train_per_class,
                               test_per_class, augmentation, seed) -> DataBundle:
    root = Path(root) if root is not None else default_fashion_mnist_dir()
    images, labels = load_fashion_mnist(root, "train")
    train_idx, val_idx = stratified_split(labels.numpy(), val_split, seed, train_per_class)
    train_t = torch.from_numpy(train_idx)
    if mean is None:
        m, s = mean_std_of(images[train_t])  # statistics of exactly the images trained on
        mean, std = m, s
    pre = _preprocessing(_check_size(input_size, FASHION_MNIST_SIZE), channels, mean, std)
    train = TensorImageDataset(images[train_t], labels[train_t], make_transform(pre, augmentation))
    val = None
    if val_idx.size:
        val_t = torch.from_numpy(val_idx)
        val = TensorImageDataset(images[val_t], labels[val_t], make_transform(pre))
    test = None
    if all((root / n).is_file() for n in FASHION_MNIST_FILES["test"]):
        test_images, test_labels = load_fashion_mnist(root, "test")
        keep = torch.from_numpy(cap_per_class(test_labels.numpy(), test_per_class))
        test = TensorImageDataset(test_images[keep], test_labels[keep], make_transform(pre))
    info = {"dataset": "fashion-mnist", "root": str(root), "train": len(train),
            "val": len(val) if val else 0, "test": len(test) if test else 0}
    return DataBundle(train, val, test, list(FASHION_MNIST_CLASSES), pre, info)


def _load_folder_bundle(root, input_size, channels, mean, std, val_split, train_per_class,
                        test_per_class, augmentation, seed) -> DataBundle:
    if root is None:
        raise DataError("the imagefolder dataset needs --data-dir: a folder with one sub-folder per class "
                        "(or train/ and test/ folders laid out that way)")
    root = Path(root)
    train_root = root / "train" if (root / "train").is_dir() else root
    folder = _image_folder(train_root)
    if mean is None:
        mean, std = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if channels == "rgb" else (
            [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
    pre = _preprocessing(_check_size(input_size, (224, 224)), channels, mean, std)
    train_idx, val_idx = stratified_split(folder.targets, val_split, seed, train_per_class)
    train = FolderSubset(folder, train_idx, channels, make_transform(pre, augmentation))
    val = FolderSubset(folder, val_idx, channels, make_transform(pre)) if val_idx.size else None
    test = None
    test_root = root / "test"
    if train_root != root and test_root.is_dir():
        test_folder = _image_folder(test_root)
        if test_folder.classes != folder.classes:
            only_train = sorted(set(folder.classes) - set(test_folder.classes))
            only_test = sorted(set(test_folder.classes) - set(folder.classes))
            raise DataError(f"{root}: train/ and test/ must hold the same class folders; only in train: "
                            f"{only_train}, only in test: {only_test}")
        keep = cap_per_class(test_folder.targets, test_per_class)
        test = FolderSubset(test_folder, keep, channels, make_transform(pre))
    info = {"dataset": "imagefolder", "root": str(root), "train": len(train),
            "val": len(val) if val else 0, "test": len(test) if test else 0}
    return DataBundle(train, val, test, list(folder.classes), pre, info)
