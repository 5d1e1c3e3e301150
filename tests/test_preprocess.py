"""Preprocessor: every channel order, uint8/uint16, strided views, resizing, errors; both paths.

The layout tests run on both paths (``backend`` fixture); the OpenCV path is
checked against the torch path (and both against training's transform) within
the bounds the module docstring states.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impatient_ros.runtime.preprocess import BACKENDS, BT601_WEIGHTS, PreprocessError, Preprocessor

RGB_SPEC = {"input_size": [6, 8], "channels": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GRAY_SPEC = {"input_size": [6, 8], "channels": "gray", "mean": [0.2860], "std": [0.3530]}


@pytest.fixture(params=["opencv", "torch"])
def backend(request) -> str:
    return request.param


def _rgb_image(h: int = 6, w: int = 8, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top, size=(h, w, 3), endpoint=True).astype(dtype)


def _reference(rgb: np.ndarray, spec: dict, full_scale: float) -> np.ndarray:
    """Textbook order in float64 numpy: scale, convert channels, normalise (no resize)."""
    x = rgb.astype(np.float64) / full_scale
    if spec["channels"] == "gray":
        x = (x * np.asarray(BT601_WEIGHTS)).sum(-1, keepdims=True)
    x = (x - np.asarray(spec["mean"])) / np.asarray(spec["std"])
    return x.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("order", ["rgb", "bgr", "rgba", "bgra"])
@pytest.mark.parametrize("spec", [RGB_SPEC, GRAY_SPEC], ids=["to_rgb", "to_gray"])
def test_colour_orders_match_reference(order, spec, backend):
    rgb = _rgb_image()
    layouts = {"rgb": rgb, "bgr": rgb[..., ::-1]}
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    layouts["rgba"] = np.concatenate([rgb, alpha], axis=-1)
    layouts["bgra"] = np.concatenate([rgb[..., ::-1], alpha], axis=-1)
    out = Preprocessor(spec, backend=backend)(np.ascontiguousarray(layouts[order]), order)
    assert out.shape == (1, len(spec["mean"]), 6, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference(rgb, spec, 255.0), atol=1e-5)


def test_gray_image_two_and_three_dims(backend):
    gray = np.random.default_rng(1).integers(0, 255, size=(6, 8), endpoint=True).astype(np.uint8)
    pre = Preprocessor(GRAY_SPEC, backend=backend)
    expected = ((gray / 255.0 - 0.2860) / 0.3530)[None, None]
    np.testing.assert_allclose(pre(gray, "gray").numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(pre(gray[..., None], "gray").numpy(), expected, atol=1e-5)


def test_gray_image_to_colour_network_repeats_channel(backend):
    gray = np.random.default_rng(2).integers(0, 255, size=(6, 8), endpoint=True).astype(np.uint8)
    out = Preprocessor(RGB_SPEC, backend=backend)(gray, "gray")
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(out.numpy(), _reference(as_rgb, RGB_SPEC, 255.0), atol=1e-5)


@pytest.mark.parametrize("spec", [RGB_SPEC, GRAY_SPEC], ids=["to_rgb", "to_gray"])
def test_uint16_scaled_by_65535(spec, backend):
    rgb = _rgb_image(dtype=np.uint16, seed=3)
    out = Preprocessor(spec, backend=backend)(rgb, "rgb")
    np.testing.assert_allclose(out.numpy(), _reference(rgb, spec, 65535.0), atol=1e-5)
    # Big-endian 16-bit data (a ROS image with is_bigendian) decodes to the same values.
    swapped = Preprocessor(spec, backend=backend)(rgb.astype(">u2"), "rgb")
    np.testing.assert_allclose(swapped.numpy(), out.numpy(), atol=0)


def test_uint16_gray_full_range(backend):
    gray = np.array([[0, 65535]], dtype=np.uint16)
    spec = {"input_size": [1, 2], "channels": "gray", "mean": 0.0, "std": 1.0}
    np.testing.assert_allclose(Preprocessor(spec, backend=backend)(gray, "gray").numpy().ravel(), [0.0, 1.0], atol=1e-7)


def test_step_padded_view_is_read_in_place(backend):
    # A ROS Image with step > width * 3: rows padded to 32 bytes; the view is not contiguous.
    h, w, step = 6, 8, 32
    buffer = np.random.default_rng(4).integers(0, 255, size=h * step, endpoint=True).astype(np.uint8)
    view = buffer.reshape(h, step)[:, : w * 3].reshape(h, w, 3)
    assert not view.flags.c_contiguous and np.shares_memory(view, buffer)
    assert torch.from_numpy(view).data_ptr() == view.ctypes.data  # the premise: no copy on the CPU
    pre = Preprocessor(RGB_SPEC, backend=backend)
    np.testing.assert_allclose(pre(view, "bgr").numpy(), pre(np.ascontiguousarray(view), "bgr").numpy(), atol=0)
    before = buffer.copy()
    pre(view, "bgr")
    np.testing.assert_array_equal(buffer, before)  # the caller's memory is never written


def test_flipped_and_read_only_views(backend):
    rgb = _rgb_image(seed=5)
    pre = Preprocessor(RGB_SPEC, backend=backend)
    flipped = rgb[::-1]                                  # negative stride: torch cannot view it
    np.testing.assert_allclose(pre(flipped, "rgb").numpy(), pre(np.ascontiguousarray(flipped), "rgb").numpy())
    read_only = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.shape)
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(pre(read_only, "rgb").numpy(), pre(rgb, "rgb").numpy())


def test_downscale_uses_antialias_and_keeps_mean(backend):
    # One bright pixel in every 4x4 cell: plain bilinear 4x downscaling samples between
    # pixels 1 and 2 and sees only black; an antialiased (or area) resize keeps the mean brightness.
    gray = np.zeros((24, 32), np.uint8)
    gray[::4, ::4] = 255
    spec = {"input_size": [6, 8], "channels": "gray", "mean": 0.0, "std": 1.0}
    out = Preprocessor(spec, backend=backend)(gray, "gray")
    assert out.shape == (1, 1, 6, 8)
    assert out.mean().item() == pytest.approx(gray.mean() / 255.0, rel=0.05)
    aliased = F.interpolate(torch.from_numpy(gray)[None, None].float() / 255, size=(6, 8), mode="bilinear")
    assert aliased.max().item() == 0.0  # what the antialias avoids


def _textbook(rgb: np.ndarray, size: tuple[int, int], backend: str) -> np.ndarray:
    """Scale, resize, normalise in float64, with each path's resize filter (RGB_SPEC, 6x8)."""
    x = rgb.astype(np.float64) / 255.0
    if backend == "torch":   # antialiased bilinear, as in training/data.py
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
        downscale = size[0] > 6 or size[1] > 8
        x = F.interpolate(t, size=(6, 8), mode="bilinear", align_corners=False, antialias=downscale)[0]
        x = x.permute(1, 2, 0).numpy()
    else:                    # pixel-area average for the shrinking axes, then bilinear for the others
        shrunk = (min(size[0], 6), min(size[1], 8))
        x = cv2.resize(x, shrunk[::-1], interpolation=cv2.INTER_AREA)
        x = cv2.resize(x, (8, 6), interpolation=cv2.INTER_LINEAR)
    x = (x - np.asarray(RGB_SPEC["mean"])) / np.asarray(RGB_SPEC["std"])
    return x.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("size", [(30, 40), (3, 5), (12, 4), (6, 20)], ids=["down", "up", "mixed", "width_only"])
def test_resize_matches_textbook_order(size, backend):
    rgb = _rgb_image(*size, seed=6)
    out = Preprocessor(RGB_SPEC, backend=backend)(np.ascontiguousarray(rgb[..., ::-1]), "bgr")
    # OpenCV rounds its area average to the integer type: at most half a step, over the smallest std.
    rounding = 0.5 / 255 / min(RGB_SPEC["std"]) if backend == "opencv" and size != (3, 5) else 0.0
    np.testing.assert_allclose(out.numpy(), _textbook(rgb, size, backend), atol=rounding + 1e-4, rtol=0)


def test_half_output_and_shape(backend):
    pre = Preprocessor(RGB_SPEC, dtype=torch.float16, backend=backend)
    out = pre(_rgb_image(), "rgb")
    assert out.dtype == torch.float16 and tuple(out.shape) == pre.output_shape == (1, 3, 6, 8)


@pytest.mark.parametrize(
    "image, order, message",
    [
        (np.zeros((6, 8, 3), np.float32), "rgb", "uint8 or uint16"),
        (np.zeros((6, 8, 3), np.int16), "rgb", "uint8 or uint16"),
        (np.zeros((6, 8, 4), np.uint8), "rgb", "shape"),
        (np.zeros((6, 8), np.uint8), "bgr", "shape"),
        (np.zeros((6, 8, 3), np.uint8), "yuv422", "unsupported channel order"),
        (np.zeros((2, 6, 8, 3), np.uint8), "rgb", "shape"),
        (np.zeros((0, 8, 3), np.uint8), "rgb", "empty"),
        ([[0, 1]], "gray", "numpy array"),
    ],
)
def test_unsupported_images_raise(image, order, message, backend):
    with pytest.raises(PreprocessError, match=message):
        Preprocessor(RGB_SPEC, backend=backend)(image, order)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channels": "rgba"}, "channels"),
        ({"input_size": [6]}, "input_size"),
        ({"input_size": [0, 8]}, "input_size"),
        ({"mean": [0.5, 0.5]}, "mean has 2 values"),
        ({"std": [1.0, 0.0, 1.0]}, "std must be > 0"),
        ({"mean": "abc"}, "mean"),
    ],
)
def test_bad_preprocessing_spec_raises(change, message):
    with pytest.raises(PreprocessError, match=message):
        Preprocessor({**RGB_SPEC, **change})
    with pytest.raises(PreprocessError, match="lacks"):
        Preprocessor({"input_size": [6, 8]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("order", ["gray", "rgb", "bgr", "rgba", "bgra"])
def test_cuda_matches_cpu(order, dtype):
    channels = {"gray": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}[order]
    top = np.iinfo(dtype).max
    image = np.random.default_rng(7).integers(0, top, size=(30, 40, channels), endpoint=True).astype(dtype)
    for spec in (RGB_SPEC, GRAY_SPEC):
        on_gpu = Preprocessor(spec, "cuda")(image, order)                  # "auto" on CUDA: the torch path
        assert on_gpu.device.type == "cuda"
        cpu = Preprocessor(spec, backend="torch")(image, order)
        np.testing.assert_allclose(on_gpu.cpu().numpy(), cpu.numpy(), atol=1e-4)
        via_cpu = Preprocessor(spec, "cuda", backend="opencv")(image, order)  # OpenCV, result moved over
        assert via_cpu.device.type == "cuda"
        np.testing.assert_array_equal(via_cpu.cpu().numpy(), Preprocessor(spec)(image, order).numpy())


# ------------------------------------------------------------- the OpenCV path against the torch path

def _smooth_image(height: int, width: int, channels: int, dtype, detail: tuple[int, int], seed: int) -> np.ndarray:
    """Band-limited content: cubic interpolation of a random grid whose cells span ``detail`` pixels."""
    rng = np.random.default_rng(seed)
    cells = (max(1, height // detail[0]), max(1, width // detail[1]))
    grid = rng.random((cells[0] + 3, cells[1] + 3, channels))
    x = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    return np.round(np.clip(x, 0.0, 1.0) * np.iinfo(dtype).max).astype(dtype)


def _layout(image: np.ndarray, order: str, kind: str) -> np.ndarray:
    """The same pixels in ``order`` and a memory layout a ROS message can produce."""
    rgb = image
    if order == "gray":
        out = image[:, :, :1]
    else:
        out = rgb[..., ::-1] if order.startswith("bgr") else rgb
        if order.endswith("a"):
            out = np.concatenate([out, np.full(rgb.shape[:2] + (1,), 7, rgb.dtype)], axis=-1)
    out = np.ascontiguousarray(out)
    if kind == "2d":
        return out[:, :, 0]
    if kind == "padded":                                   # a ROS step with 5 spare elements per row
        padded = np.zeros((out.shape[0], out.shape[1] * out.shape[2] + 5), out.dtype)
        padded[:, : out.shape[1] * out.shape[2]] = out.reshape(out.shape[0], -1)
        return padded[:, : out.shape[1] * out.shape[2]].reshape(out.shape)
    if kind == "big_endian":
        return out.astype(out.dtype.newbyteorder(">"))
    return out


# (image size, network input size): shrink both axes, a 1080p-like ratio, enlarge, shrink one axis and
# enlarge the other, unchanged, and odd non-integer factors.
SIZES = [((240, 320), (32, 32)), ((135, 240), (28, 28)), ((20, 24), (32, 32)), ((12, 64), (32, 32)),
         ((32, 32), (32, 32)), ((97, 31), (32, 32))]
CASES = [("gray", "contiguous"), ("gray", "2d"), ("rgb", "contiguous"), ("bgr", "padded"),
         ("rgba", "contiguous"), ("bgra", "big_endian")]


@pytest.mark.parametrize("network", ["gray", "rgb"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("order, kind", CASES, ids=[f"{o}-{k}" for o, k in CASES])
@pytest.mark.parametrize("size, target", SIZES, ids=[f"{s[0]}x{s[1]}-to-{t[0]}x{t[1]}" for s, t in SIZES])
def test_opencv_path_matches_torch_path(size, target, order, kind, dtype, network):
    """The bounds of the module docstring, over every layout, both dtypes and both network kinds.

    Output on the 0..1 scale (mean 0, std 1). Enlarging or no resize: the same
    weights in both paths, float rounding only. Shrinking: area average vs
    antialiased bilinear on content whose finest detail spans 4 output pixels.
    """
    scale = (size[0] / target[0], size[1] / target[1])
    detail = (max(1, round(4 * scale[0])), max(1, round(4 * scale[1])))
    if kind == "big_endian" and dtype == np.uint8:
        kind = "contiguous"                                # one byte has no order
    image = _layout(_smooth_image(*size, 1 if order == "gray" else 3, dtype, detail, seed=sum(size)), order, kind)
    spec = {"input_size": list(target), "channels": network, "mean": 0.0, "std": 1.0}
    new = Preprocessor(spec, backend="opencv")(image, order)
    old = Preprocessor(spec, backend="torch")(image, order)
    assert new.shape == old.shape == (1, 1 if network == "gray" else 3, *target)
    assert new.dtype == old.dtype == torch.float32 and new.is_contiguous()
    diff = (new - old).abs()
    if size[0] <= target[0] and size[1] <= target[1]:
        assert diff.max().item() < 1e-5
    else:
        assert diff.max().item() < 0.04 and diff.mean().item() < 0.01


def test_plans_follow_the_layout_and_are_bounded():
    """One plan per (order, shape, dtype): a new size, order or byte order is never served an old plan."""
    pre = Preprocessor(GRAY_SPEC)
    small, large = _rgb_image(6, 8, seed=1), _rgb_image(60, 80, seed=2)
    first = pre(large, "rgb")
    assert pre(small, "rgb").shape == first.shape
    np.testing.assert_array_equal(pre(large, "rgb").numpy(), first.numpy())          # cached: same answer
    np.testing.assert_array_equal(pre(np.ascontiguousarray(large[..., ::-1]), "bgr").numpy(), first.numpy())
    np.testing.assert_array_equal(pre(np.ascontiguousarray(large[..., ::-1]), "BGR").numpy(), first.numpy())
    sixteen = large.astype(np.uint16) * 257
    np.testing.assert_allclose(pre(sixteen.astype(">u2"), "rgb").numpy(), pre(sixteen, "rgb").numpy(), atol=0)
    for width in range(1, 40):                             # a source whose size keeps changing
        pre(_rgb_image(6, width, seed=width), "rgb")
    assert len(pre._plans) <= 16
    with pytest.raises(PreprocessError, match="shape"):   # a cached layout never skips validation
        pre(np.zeros((60, 80, 4), np.uint8), "rgb")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lookup_table_path_equals_the_float32_arithmetic(dtype, out_dtype):
    """Gray network, shrinking integers: the table (cv2.LUT for uint8) holds exactly the float32 multiply-add."""
    image = (_rgb_image(60, 80, seed=8).astype(np.uint16) * (257 if dtype == np.uint16 else 1)).astype(dtype)
    full = Preprocessor(GRAY_SPEC)(image, "bgr")
    gain = 1.0 / (np.float32(np.iinfo(dtype).max) * np.float32(GRAY_SPEC["std"][0]))
    offset = -np.float32(GRAY_SPEC["mean"][0]) / np.float32(GRAY_SPEC["std"][0])
    small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (8, 6), interpolation=cv2.INTER_AREA)
    by_hand = small.astype(np.float32) * np.float32(gain) + np.float32(offset)
    np.testing.assert_array_equal(full.numpy()[0, 0], by_hand)
    other = Preprocessor(GRAY_SPEC, dtype=out_dtype)(image, "bgr")
    assert other.dtype == out_dtype
    torch.testing.assert_close(other, full.to(out_dtype), atol=0, rtol=0)


def test_backend_choice():
    assert Preprocessor(GRAY_SPEC).backend == "opencv"                       # "auto" on the CPU
    assert Preprocessor(GRAY_SPEC, backend="torch").backend == "torch"
    assert "backend='opencv'" in repr(Preprocessor(GRAY_SPEC))
    assert set(BACKENDS) == {"auto", "opencv", "torch"}
    with pytest.raises(PreprocessError, match="backend"):
        Preprocessor(GRAY_SPEC, backend="cv2")


# ------------------------------------------------------------- both paths against training's transform

def _fashion_mnist_like(count: int = 16) -> np.ndarray:
    """Real Fashion-MNIST test images when installed, else garment-like blobs (dark background)."""
    from impatient_ros.core.datasets import default_fashion_mnist_dir
    from impatient_ros.core.idx import read_idx

    path = default_fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz"
    if path.is_file():
        return read_idx(path)[:count]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    images = []
    for _ in range(count):
        cy, cx, ry, rx = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(5, 12), rng.uniform(4, 10)
        blob = np.clip(1.2 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, 1)
        images.append((blob * rng.uniform(120, 255) + rng.normal(0, 8, (28, 28)) * (blob > 0)).clip(0, 255))
    return np.asarray(images, np.uint8)


@pytest.fixture(scope="module")
def embedded_spec() -> dict:
    from impatient_ros.runtime.checkpoint import load_checkpoint

    path = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_smallcnn.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return dict(load_checkpoint(path).preprocessing)


def test_training_resolution_is_preprocessed_exactly_as_in_training(embedded_spec, backend):
    """A 28x28 image (what training saw) -> 32x32: both paths equal training's transform (1e-5)."""
    from training.data import make_transform

    images = _fashion_mnist_like()
    expected = make_transform(embedded_spec).batch(torch.from_numpy(images)[:, None])
    pre = Preprocessor(embedded_spec, backend=backend)
    for image, want in zip(images, expected):
        torch.testing.assert_close(pre(image, "gray")[0], want, atol=1e-5, rtol=0)
        as_rgb = np.repeat(image[:, :, None], 3, axis=2)                      # a gray scene from a colour camera
        torch.testing.assert_close(pre(as_rgb, "rgb")[0], want, atol=1e-5, rtol=0)


def test_camera_frames_stay_close_to_the_training_inputs(embedded_spec):
    """Fashion-MNIST sent as 640x480 rgb8 (as the camera tool enlarges it) vs training on the 28x28 original.

    Neither path can undo the enlarge-then-shrink round trip exactly; the
    bounds (0..1 scale, measured with the real test images: opencv mean 0.007,
    torch 0.012) say the OpenCV path is at least as close as the torch path.
    """
    from training.data import make_transform

    images = _fashion_mnist_like(32)
    expected = make_transform(embedded_spec).batch(torch.from_numpy(images)[:, None])
    std = float(embedded_spec["std"][0])
    mean_error = {}
    for backend_name in ("opencv", "torch"):
        pre = Preprocessor(embedded_spec, backend=backend_name)
        frames = [np.repeat(cv2.resize(img, (640, 480), interpolation=cv2.INTER_LINEAR)[:, :, None], 3, axis=2)
                  for img in images]
        got = torch.cat([pre(frame, "rgb") for frame in frames])
        mean_error[backend_name] = float((got - expected).abs().mean()) * std
    assert mean_error["opencv"] < 0.012
    assert mean_error["opencv"] <= mean_error["torch"] + 1e-3


# ------------------------------------------------------------- memory: no full-size float copy

_PEAK_CHILD = r"""
import json, sys
import numpy as np
from impatient_ros.runtime.preprocess import Preprocessor

# The kernel's high-water mark of this process, reset before each measurement: ru_maxrss
# cannot be reset and may already hold an earlier, higher peak (e.g. from importing torch).
def _status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024

def peak():
    return _status_kib("VmHWM") * 1024
spec = {"input_size": [32, 32], "channels": "gray", "mean": [0.286], "std": [0.353]}
new, old = Preprocessor(spec, backend="opencv"), Preprocessor(spec, backend="torch")
warm = np.zeros((64, 64, 4), np.uint16)
new(warm, "bgra"), old(warm, "bgra")
image = np.full((3000, 3000, 4), 30000, np.uint16)     # 72 MB, every page touched
base = reset_peak()
new(image, "bgra")
grown_new = peak() - base
base = reset_peak()
old(image, "bgra")
print(json.dumps({"frame": image.nbytes, "new": grown_new, "old": peak() - base}))
"""


@pytest.mark.slow  # peak RSS of a fresh process that imports torch and decodes a 72 MB frame
def test_opencv_path_adds_no_full_size_float_copy():
    """Peak RSS of one 3000x3000 bgra16 frame: the OpenCV path adds at most a uint16 plane (1/4 frame).

    The torch path, measured after it in the same process, makes float copies
    (3 planes of float32 = 1.5 frames), which shows the measurement can see one.
    """
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"), cwd=root)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["new"] < 0.35 * result["frame"], result
    assert result["old"] > 1.0 * result["frame"], result
