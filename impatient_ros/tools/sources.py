"""Image sources for the camera tool: an IDX data set split, a folder of images, a video file.

Pure numpy/OpenCV (no rclpy), so the sources are tested without ROS. Every source
yields :class:`Frame` objects whose ``image`` is a (H, W, C) uint8 array in
``"gray"`` (C = 1) or ``"rgb"`` (C = 3) order, whatever the file held; the
camera tool then converts it to the requested ROS encoding with
:func:`convert_frame`. Iterating a source gives one pass over it;
:func:`iterate_frames` adds looping and a frame limit.

Spec strings (the camera's ``source`` parameter), parsed by :func:`open_source`:

* ``fashion-mnist`` or ``fashion-mnist:test`` / ``fashion-mnist:train`` - the
  gzipped (or plain) IDX files in ``dataset_dir``; any MNIST-style folder with the
  same file names works (e.g. MNIST itself). Labels are known.
* ``folder:PATH`` - image files (png, jpg, bmp, ...) read in sorted order. With
  class sub-folders (``PATH/<class>/<image>``, the torchvision ImageFolder
  layout) the label is the index of the class folder in sorted order and files
  directly in ``PATH`` are ignored; a flat folder gives unlabelled frames.
* ``video:PATH`` - any file OpenCV's VideoCapture opens; frames are unlabelled.
* a bare path - a folder or a video file, decided by what the path is.

IDX files are read by :mod:`impatient_ros.core.idx`, the reader the training
data uses too (the runtime package must not import the training package).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import cv2
import numpy as np

from impatient_ros.core import idx as _idx
from impatient_ros.core.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_SPLITS, default_fashion_mnist_dir

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "ENCODINGS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "FolderSource",
    "Frame",
    "IdxDatasetSource",
    "ImageSource",
    "SPEC_FORMS",
    "SourceError",
    "VideoSource",
    "convert_frame",
    "iterate_frames",
    "open_source",
    "read_idx",
]

DEFAULT_FASHION_MNIST_DIR = default_fashion_mnist_dir()
# Encodings the camera publishes; the node accepts more, but these three cover
# grey and colour in both channel orders a consumer may expect.
ENCODINGS: tuple[str, ...] = ("mono8", "rgb8", "bgr8")
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}
)
_SPLIT_FILES = FASHION_MNIST_SPLITS


class SourceError(ValueError):
    """An image source that cannot be opened or read; the message says what to fix."""


@dataclass(frozen=True, eq=False)  # eq would compare arrays
class Frame:
    """One image of a source: ``image`` (H, W, C) uint8, ``order`` "gray" or "rgb"."""

    image: np.ndarray
    order: str
    label: int | None  # class index, None when the source has no labels
    index: int  # position in one pass over the source
    name: str  # where it came from, for logs (file name, "test[17]", "frame 3")


class ImageSource(Protocol):
    """What the camera needs from a source: one pass per ``iter()``."""

    class_names: tuple[str, ...] | None
    labelled: bool  # whether frames carry labels

    def __iter__(self) -> Iterator[Frame]: ...

    def describe(self) -> str: ...


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-order array: :func:`impatient_ros.core.idx.read_idx`.

    Raises :class:`SourceError` ("cannot read IDX file: " + the reader's message).
    """
    try:
        return _idx.read_idx(path)
    except _idx.IdxError as exc:
        raise SourceError(f"cannot read IDX file: {exc}") from None


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise SourceError(
        f"{stem}(.gz) not found in {directory}; install the Debian package dataset-fashion-mnist "
        "or point dataset_dir at a folder holding the IDX files"
    )


class IdxDatasetSource:
    """One split of an MNIST-style IDX data set (Fashion-MNIST by default), labelled."""

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_DIR,
        split: str = "test",
        class_names: tuple[str, ...] | None = FASHION_MNIST_CLASSES,
    ) -> None:
        if split not in _SPLIT_FILES:
            raise SourceError(f"unknown split {split!r}; valid: {', '.join(_SPLIT_FILES)}")
        self.directory = Path(directory)
        self.split = split
        self.labelled = True
        images_stem, labels_stem = _SPLIT_FILES[split]
        images = read_idx(_find_idx(self.directory, images_stem))
        labels = read_idx(_find_idx(self.directory, labels_stem))
        if images.ndim != 3 or images.dtype != np.uint8:
            raise SourceError(f"{self.directory}: images must be N x H x W uint8, got {images.shape} {images.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise SourceError(f"{self.directory}: {len(images)} images but labels of shape {labels.shape}")
        if len(images) == 0:
            raise SourceError(f"{self.directory}: the {split} split holds no images")
        self.images = images
        self.labels = labels.astype(np.int64)
        if class_names is not None and int(self.labels.max()) >= len(class_names):
            class_names = None  # not Fashion-MNIST after all (e.g. a data set with more classes)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self.images)):
            yield Frame(self.images[i][:, :, np.newaxis], "gray", int(self.labels[i]), i, f"{self.split}[{i}]")

    def describe(self) -> str:
        """One line for the log."""
        return f"{self.directory} {self.split} split, {len(self)} labelled images"


# --------------------------------------------------------------------------- folders


def _to_gray_or_rgb(decoded: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    # OpenCV order in: gray / BGR / BGRA, 8 or 16 bit. Out: uint8 gray or RGB.
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)  # keep the top 8 bits: a display-range image
    elif decoded.dtype != np.uint8:
        raise SourceError(f"{where}: {decoded.dtype} pixels are not supported (8- or 16-bit images only)")
    if decoded.ndim == 2:
        return decoded[:, :, np.newaxis], "gray"
    channels = decoded.shape[2]
    if channels == 1:
        return decoded, "gray"
    if channels == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), "rgb"
    if channels == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB), "rgb"
    raise SourceError(f"{where}: images with {channels} channels are not supported")


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderSource:
    """Image files of a folder in sorted order; labelled when laid out as ``PATH/<class>/<image>``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SourceError(f"image folder {self.directory} does not exist or is not a folder")
        class_dirs = sorted(p for p in self.directory.iterdir() if p.is_dir() and _image_files(p))
        if class_dirs:
            self.class_names: tuple[str, ...] | None = tuple(p.name for p in class_dirs)
            self.items: list[tuple[Path, int | None]] = [
                (path, label) for label, d in enumerate(class_dirs) for path in _image_files(d)
            ]
        else:
            self.class_names = None
            self.items = [(path, None) for path in _image_files(self.directory)]
        self.labelled = self.class_names is not None
        if not self.items:
            raise SourceError(
                f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.directory} "
                "or in its immediate sub-folders"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Frame]:
        for i, (path, label) in enumerate(self.items):
            # np.fromfile + imdecode instead of imread: works for any path encoding
            # and tells "unreadable" apart from "missing".
            try:
                decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            except (OSError, cv2.error) as exc:
                raise SourceError(f"cannot read image {path}: {exc}") from exc
            if decoded is None:
                raise SourceError(f"{path} is not an image OpenCV can decode; remove it from {self.directory}")
            image, order = _to_gray_or_rgb(decoded, str(path))
            yield Frame(image, order, label, i, path.name)

    def describe(self) -> str:
        """One line for the log."""
        what = f"{len(self.class_names)} classes" if self.class_names else "unlabelled"
        return f"folder {self.directory}, {len(self)} images, {what}"


# --------------------------------------------------------------------------- video


class VideoSource:
    """Frames of a video file through cv2.VideoCapture (unlabelled)."""

    class_names: tuple[str, ...] | None = None
    labelled = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist")
        capture = self._open()
        self.frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # a container's estimate
        capture.release()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"OpenCV cannot open video {self.path} (unknown container or codec?)")
        return capture

    def __iter__(self) -> Iterator[Frame]:
        capture = self._open()  # a fresh capture per pass: seeking is unreliable for many codecs
        try:
            index = 0
            while True:
                ok, decoded = capture.read()
                if not ok or decoded is None:
                    return
                image, order = _to_gray_or_rgb(decoded, f"{self.path} frame {index}")
                yield Frame(image, order, None, index, f"frame {index}")
                index += 1
        finally:
            capture.release()

    def describe(self) -> str:
        """One line for the log."""
        return f"video {self.path}, about {self.frame_count} frames"


# --------------------------------------------------------------------------- spec and helpers

_VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v"})
SPEC_FORMS = "fashion-mnist[:test|train], folder:PATH, video:PATH, or a folder/video path"


def open_source(spec: str, dataset_dir: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_DIR) -> ImageSource:
    """Open the source a spec string names (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty source spec; expected {SPEC_FORMS}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "fashion-mnist":
        return IdxDatasetSource(dataset_dir, rest.strip() or "test")
    if sep and kind == "folder":
        return FolderSource(rest)
    if sep and kind == "video":
        return VideoSource(rest)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file() and path.suffix.lower() in _VIDEO_SUFFIXES:
        return VideoSource(path)
    raise SourceError(f"cannot tell what source {spec!r} is; expected {SPEC_FORMS}")


def iterate_frames(source: ImageSource, *, loop: bool = False, max_frames: int = 0) -> Iterator[Frame]:
    """Frames of ``source``, again from the start when ``loop``, at most ``max_frames`` (0 = no limit)."""
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 (0 = no limit), got {max_frames}")
    sent = 0
    while True:
        yielded_this_pass = False
        for frame in source:
            yielded_this_pass = True
            sent += 1
            yield frame
            if max_frames and sent >= max_frames:
                return  # before asking the source for one more frame it would read for nothing
        if not loop:
            return
        if not yielded_this_pass:
            # A source that became empty (e.g. an unreadable video) would spin forever.
            raise SourceError(f"{source.describe()} gave no frames; cannot loop over it")


def convert_frame(frame: Frame, encoding: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Return the frame's pixels as a contiguous (H, W, C) array in ``encoding``'s order.

    ``encoding`` is one of :data:`ENCODINGS`; ``size`` is (width, height) to resize
    to, or None / (0, 0) to keep the source's size.
    """
    if encoding not in ENCODINGS:
        raise SourceError(f"unsupported encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    image = frame.image
    if size is not None and tuple(size) != (0, 0):
        width, height = (int(v) for v in size)
        if width <= 0 or height <= 0:
            raise SourceError(f"resize needs a positive width and height, got {width}x{height}")
        if (image.shape[1], image.shape[0]) != (width, height):
            # INTER_AREA averages when shrinking (no aliasing), INTER_LINEAR when enlarging.
            shrinking = width * height < image.shape[0] * image.shape[1]
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
            if image.ndim == 2:
                image = image[:, :, np.newaxis]
    if encoding == "mono8":
        if frame.order == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, np.newaxis]
    else:
        if frame.order == "gray":
            image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
        if encoding == "bgr8":
            image = image[:, :, ::-1]
    return np.ascontiguousarray(image)
