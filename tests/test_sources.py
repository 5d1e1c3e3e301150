"""Image sources of the camera tool: IDX data sets, folders, videos, spec strings, conversion.

Pure (no ROS). Every source reads tiny files the test writes itself; one test
reads the real Fashion-MNIST test split when the Debian package is installed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import cv2
import numpy as np
import pytest

from impatient_ros.tools.sources import (
    FASHION_MNIST_CLASSES,
    FolderSource,
    Frame,
    IdxDatasetSource,
    SourceError,
    VideoSource,
    convert_frame,
    iterate_frames,
    open_source,
    read_idx,
)
from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """An IDX file as the format defines it: 0, 0, type, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_idx_dataset(directory: Path, images: np.ndarray, labels: np.ndarray, split: str = "test") -> Path:
    stem = "t10k" if split == "test" else "train"
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{stem}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{stem}-labels-idx1-ubyte.gz", labels)
    return directory


def write_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


# --------------------------------------------------------------------------- IDX


# The format itself is tested once, in tests/test_idx.py (impatient_ros.core.idx); here only that
# the camera's read_idx is that reader and reports SourceError.


def test_read_idx_is_the_core_reader_with_source_errors(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    back = read_idx(write_idx(tmp_path / "x.idx.gz", array))
    assert back.dtype == np.uint8 and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    (tmp_path / "magic").write_bytes(b"\x08\x03\x00\x01" + bytes(8))
    with pytest.raises(SourceError, match="cannot read IDX file: .* not an IDX file"):
        read_idx(tmp_path / "magic")
    with pytest.raises(SourceError, match="cannot read IDX file: IDX file not found"):
        read_idx(tmp_path / "missing")


def test_idx_dataset_source_yields_grey_labelled_frames(tmp_path: Path) -> None:
    images = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    source = IdxDatasetSource(write_idx_dataset(tmp_path, images, labels), "test")
    frames = list(source)
    assert len(source) == 5 and source.labelled and source.class_names == FASHION_MNIST_CLASSES
    assert [f.label for f in frames] == [3, 1, 4, 1, 5]
    assert [f.index for f in frames] == list(range(5)) and frames[2].name == "test[2]"
    for frame, image in zip(frames, images):
        assert frame.order == "gray" and frame.image.shape == (4, 3, 1)
        np.testing.assert_array_equal(frame.image[:, :, 0], image)


def test_idx_dataset_source_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="dataset-fashion-mnist"):
        IdxDatasetSource(tmp_path, "test")
    with pytest.raises(SourceError, match="unknown split 'val'; valid: train, test"):
        IdxDatasetSource(tmp_path, "val")
    write_idx_dataset(tmp_path, np.zeros((3, 2, 2), np.uint8), np.zeros(2, np.uint8), "train")
    with pytest.raises(SourceError, match="3 images but labels"):
        IdxDatasetSource(tmp_path, "train")


def test_idx_dataset_with_more_classes_drops_the_fashion_names(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, np.zeros((2, 2, 2), np.uint8), np.array([0, 11], np.uint8))
    source = IdxDatasetSource(tmp_path)
    assert source.class_names is None and source.labelled


@requires_fashion_mnist
def test_real_fashion_mnist_test_split() -> None:
    source = open_source("fashion-mnist", FASHION_MNIST_DIR)
    assert len(source) == 10_000  # type: ignore[arg-type]
    first = next(iter(source))
    # The first test image of Fashion-MNIST is an ankle boot (class 9).
    assert first.image.shape == (28, 28, 1) and first.label == 9
    assert FASHION_MNIST_CLASSES[first.label] == "Ankle boot"


# --------------------------------------------------------------------------- folders


def test_folder_with_class_subfolders_is_labelled_and_converted(tmp_path: Path) -> None:
    grey = np.full((6, 5), 77, np.uint8)
    bgr = np.zeros((6, 5, 3), np.uint8)
    bgr[:, :, 2] = 200  # red in OpenCV's BGR order
    bgra = np.dstack([bgr, np.full((6, 5), 9, np.uint8)])
    deep = np.full((6, 5), 0x1234, np.uint16)
    write_image(tmp_path / "b_cat" / "2.png", grey)
    write_image(tmp_path / "b_cat" / "1.png", bgr)
    write_image(tmp_path / "a_dog" / "x.png", bgra)
    write_image(tmp_path / "a_dog" / "y.png", deep)
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "top_level_is_ignored.png", grey)

    source = FolderSource(tmp_path)
    frames = list(source)
    assert source.class_names == ("a_dog", "b_cat") and source.labelled
    assert [(f.name, f.label) for f in frames] == [("x.png", 0), ("y.png", 0), ("1.png", 1), ("2.png", 1)]
    x, y, one, two = frames
    assert x.order == "rgb" and x.image.shape == (6, 5, 3)
    assert x.image[0, 0].tolist() == [200, 0, 0]  # BGRA -> RGB, alpha dropped
    assert y.order == "gray" and y.image.dtype == np.uint8 and int(y.image[0, 0, 0]) == 0x12  # 16 -> 8 bit
    assert one.image[0, 0].tolist() == [200, 0, 0]
    assert two.order == "gray" and two.image.shape == (6, 5, 1) and int(two.image[0, 0, 0]) == 77


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / f"img{i}.jpg", np.full((4, 4, 3), 40 * i, np.uint8))
    source = FolderSource(tmp_path)
    assert source.class_names is None and not source.labelled
    assert [(f.name, f.label) for f in source] == [("img0.jpg", None), ("img1.jpg", None), ("img2.jpg", None)]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(tmp_path / "nope")
    with pytest.raises(SourceError, match="no image files"):
        FolderSource(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    source = FolderSource(tmp_path)
    with pytest.raises(SourceError, match="broken.png is not an image"):
        list(source)


# --------------------------------------------------------------------------- video


def write_video(path: Path, colours_bgr: list[tuple[int, int, int]], size: tuple[int, int] = (32, 24)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for colour in colours_bgr:
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:] = colour
        writer.write(frame)
    writer.release()
    return path


def test_video_source_yields_rgb_frames_and_restarts(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", [(0, 0, 255), (0, 255, 0), (255, 0, 0)])
    source = VideoSource(path)
    assert not source.labelled and source.frame_count == 3
    for _ in range(2):  # a second pass starts from the first frame again
        frames = list(source)
        assert len(frames) == 3
        assert all(f.order == "rgb" and f.image.shape == (24, 32, 3) and f.label is None for f in frames)
        # Dominant channel per frame in RGB order: red, green, blue (MJPG is lossy: compare, do not equal).
        assert [int(np.argmax(f.image[12, 16])) for f in frames] == [0, 1, 2]


def test_video_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        VideoSource(tmp_path / "missing.avi")
    (tmp_path / "junk.avi").write_bytes(b"definitely not a video" * 10)
    with pytest.raises(SourceError, match="cannot open video"):
        VideoSource(tmp_path / "junk.avi")


# --------------------------------------------------------------------------- specs and helpers


def test_open_source_forms(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "fm", np.zeros((2, 3, 3), np.uint8), np.array([1, 2], np.uint8), "train")
    write_image(tmp_path / "pics" / "a.png", np.zeros((3, 3), np.uint8))
    video = write_video(tmp_path / "v.avi", [(1, 2, 3)])
    assert isinstance(open_source("fashion-mnist:train", data), IdxDatasetSource)
    assert isinstance(open_source(f"folder:{tmp_path / 'pics'}"), FolderSource)
    assert isinstance(open_source(str(tmp_path / "pics")), FolderSource)
    assert isinstance(open_source(f"video:{video}"), VideoSource)
    assert isinstance(open_source(str(video)), VideoSource)
    with pytest.raises(SourceError, match="cannot tell what source"):
        open_source(str(tmp_path / "v.txt"))
    with pytest.raises(SourceError, match="empty source spec"):
        open_source("  ")
    with pytest.raises(SourceError, match="unknown split"):
        open_source("fashion-mnist:validation", data)


class _ListSource:
    class_names = None
    labelled = False

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # noqa: ANN204
        for i in range(self.n):
            yield Frame(np.zeros((1, 1, 1), np.uint8), "gray", None, i, str(i))

    def describe(self) -> str:
        return f"{self.n} frames"


@pytest.mark.parametrize(
    ("n", "loop", "max_frames", "expected"),
    [
        (3, False, 0, [0, 1, 2]),
        (3, False, 2, [0, 1]),
        (3, False, 5, [0, 1, 2]),
        (3, True, 7, [0, 1, 2, 0, 1, 2, 0]),
        (1, True, 3, [0, 0, 0]),
    ],
)
def test_iterate_frames_loops_and_limits(n: int, loop: bool, max_frames: int, expected: list[int]) -> None:
    assert [f.index for f in iterate_frames(_ListSource(n), loop=loop, max_frames=max_frames)] == expected


def test_iterate_frames_refuses_to_loop_over_nothing() -> None:
    with pytest.raises(SourceError, match="gave no frames"):
        list(iterate_frames(_ListSource(0), loop=True))
    assert list(iterate_frames(_ListSource(0), loop=False)) == []
    with pytest.raises(ValueError, match="max_frames"):
        list(iterate_frames(_ListSource(1), max_frames=-1))


def _frame(image: np.ndarray, order: str) -> Frame:
    return Frame(image, order, None, 0, "t")


def test_convert_frame_channel_orders() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    grey = np.full((2, 3, 1), 50, np.uint8)
    assert convert_frame(_frame(rgb, "rgb"), "rgb8")[0, 0].tolist() == [10, 20, 30]
    assert convert_frame(_frame(rgb, "rgb"), "bgr8")[0, 0].tolist() == [30, 20, 10]
    mono = convert_frame(_frame(rgb, "rgb"), "mono8")
    # OpenCV's BT.601 weights: 0.299 R + 0.587 G + 0.114 B
    assert mono.shape == (2, 3, 1) and int(mono[0, 0, 0]) == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)
    assert convert_frame(_frame(grey, "gray"), "rgb8")[1, 2].tolist() == [50, 50, 50]
    assert convert_frame(_frame(grey, "gray"), "mono8").shape == (2, 3, 1)
    for encoding in ("mono8", "rgb8", "bgr8"):
        assert convert_frame(_frame(rgb, "rgb"), encoding).flags.c_contiguous


def test_convert_frame_resizes_and_validates() -> None:
    grey = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28, 1).astype(np.uint8)
    assert convert_frame(_frame(grey, "gray"), "mono8", (56, 14)).shape == (14, 56, 1)
    assert convert_frame(_frame(grey, "gray"), "rgb8", (7, 7)).shape == (7, 7, 3)
    assert convert_frame(_frame(grey, "gray"), "mono8", (0, 0)).shape == (28, 28, 1)
    np.testing.assert_array_equal(convert_frame(_frame(grey, "gray"), "mono8", (28, 28)), grey)
    with pytest.raises(SourceError, match="positive width and height"):
        convert_frame(_frame(grey, "gray"), "mono8", (10, 0))
    with pytest.raises(SourceError, match="unsupported encoding 'rgba8'"):
        convert_frame(_frame(grey, "gray"), "rgba8")
