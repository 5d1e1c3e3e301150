"""Preprocessor: every channel order, uint8/uint16, strided views, resizing, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impatient_ros.runtime.preprocess import BT601_WEIGHTS, PreprocessError, Preprocessor

RGB_SPEC = {"input_size": [6, 8], "channels": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GRAY_SPEC = {"input_size": [6, 8], "channels": "gray", "mean": [0.2860], "std": [0.3530]}


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
def test_colour_orders_match_reference(order, spec):
    rgb = _rgb_image()
    layouts = {"rgb": rgb, "bgr": rgb[..., ::-1]}
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    layouts["rgba"] = np.concatenate([rgb, alpha], axis=-1)
    layouts["bgra"] = np.concatenate([rgb[..., ::-1], alpha], axis=-1)
    out = Preprocessor(spec)(np.ascontiguousarray(layouts[order]), order)
    assert out.shape == (1, len(spec["mean"]), 6, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference(rgb, spec, 255.0), atol=1e-5)


def test_gray_image_two_and_three_dims():
    gray = np.random.default_rng(1).integers(0, 255, size=(6, 8), endpoint=True).astype(np.uint8)
    pre = Preprocessor(GRAY_SPEC)
    expected = ((gray / 255.0 - 0.2860) / 0.3530)[None, None]
    np.testing.assert_allclose(pre(gray, "gray").numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(pre(gray[..., None], "gray").numpy(), expected, atol=1e-5)


def test_gray_image_to_colour_network_repeats_channel():
    gray = np.random.default_rng(2).integers(0, 255, size=(6, 8), endpoint=True).astype(np.uint8)
    out = Preprocessor(RGB_SPEC)(gray, "gray")
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(out.numpy(), _reference(as_rgb, RGB_SPEC, 255.0), atol=1e-5)


@pytest.mark.parametrize("spec", [RGB_SPEC, GRAY_SPEC], ids=["to_rgb", "to_gray"])
def test_uint16_scaled_by_65535(spec):
    rgb = _rgb_image(dtype=np.uint16, seed=3)
    out = Preprocessor(spec)(rgb, "rgb")
    np.testing.assert_allclose(out.numpy(), _reference(rgb, spec, 65535.0), atol=1e-5)
    # Big-endian 16-bit data (a ROS image with is_bigendian) decodes to the same values.
    np.testing.assert_allclose(Preprocessor(spec)(rgb.astype(">u2"), "rgb").numpy(), out.numpy(), atol=0)


def test_uint16_gray_full_range():
    gray = np.array([[0, 65535]], dtype=np.uint16)
    spec = {"input_size": [1, 2], "channels": "gray", "mean": 0.0, "std": 1.0}
    np.testing.assert_allclose(Preprocessor(spec)(gray, "gray").numpy().ravel(), [0.0, 1.0], atol=1e-7)


def test_step_padded_view_is_read_in_place():
    # A ROS Image with step > width * 3: rows padded to 32 bytes; the view is not contiguous.
    h, w, step = 6, 8, 32
    buffer = np.random.default_rng(4).integers(0, 255, size=h * step, endpoint=True).astype(np.uint8)
    view = buffer.reshape(h, step)[:, : w * 3].reshape(h, w, 3)
    assert not view.flags.c_contiguous and np.shares_memory(view, buffer)
    assert torch.from_numpy(view).data_ptr() == view.ctypes.data  # the premise: no copy on the CPU
    pre = Preprocessor(RGB_SPEC)
    np.testing.assert_allclose(pre(view, "bgr").numpy(), pre(np.ascontiguousarray(view), "bgr").numpy(), atol=0)
    before = buffer.copy()
    pre(view, "bgr")
    np.testing.assert_array_equal(buffer, before)  # the caller's memory is never written


def test_flipped_and_read_only_views():
    rgb = _rgb_image(seed=5)
    pre = Preprocessor(RGB_SPEC)
    flipped = rgb[::-1]                                  # negative stride: torch cannot view it
    np.testing.assert_allclose(pre(flipped, "rgb").numpy(), pre(np.ascontiguousarray(flipped), "rgb").numpy())
    read_only = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.shape)
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(pre(read_only, "rgb").numpy(), pre(rgb, "rgb").numpy())


def test_downscale_uses_antialias_and_keeps_mean():
    # One bright pixel in every 4x4 cell: plain bilinear 4x downscaling samples between
    # pixels 1 and 2 and sees only black; an antialiased resize keeps the mean brightness.
    gray = np.zeros((24, 32), np.uint8)
    gray[::4, ::4] = 255
    spec = {"input_size": [6, 8], "channels": "gray", "mean": 0.0, "std": 1.0}
    out = Preprocessor(spec)(gray, "gray")
    assert out.shape == (1, 1, 6, 8)
    assert out.mean().item() == pytest.approx(gray.mean() / 255.0, rel=0.05)
    aliased = F.interpolate(torch.from_numpy(gray)[None, None].float() / 255, size=(6, 8), mode="bilinear")
    assert aliased.max().item() == 0.0  # what the antialias avoids


@pytest.mark.parametrize("size", [(30, 40), (3, 5), (12, 4)], ids=["down", "up", "mixed"])
def test_resize_matches_textbook_order(size):
    rgb = _rgb_image(*size, seed=6)
    out = Preprocessor(RGB_SPEC)(rgb, "bgr")
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1)[None].double() / 255.0
    downscale = size[0] > 6 or size[1] > 8
    x = F.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False, antialias=downscale)
    mean = torch.tensor(RGB_SPEC["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(RGB_SPEC["std"], dtype=torch.float64).view(1, 3, 1, 1)
    np.testing.assert_allclose(out.numpy(), ((x - mean) / std).numpy(), atol=1e-4)


def test_half_output_and_shape():
    pre = Preprocessor(RGB_SPEC, dtype=torch.float16)
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
def test_unsupported_images_raise(image, order, message):
    with pytest.raises(PreprocessError, match=message):
        Preprocessor(RGB_SPEC)(image, order)


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
        on_gpu = Preprocessor(spec, "cuda")(image, order)
        assert on_gpu.device.type == "cuda"
        np.testing.assert_allclose(on_gpu.cpu().numpy(), Preprocessor(spec)(image, order).numpy(), atol=1e-4)
