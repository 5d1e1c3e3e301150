"""Camera image (numpy, uint8/uint16, any of five channel orders) -> normalised network input.

The checkpoint's ``preprocessing`` dict says what the network was trained on:
``input_size`` [H, W], ``channels`` ("gray" or "rgb"), ``mean`` and ``std`` (per
channel, on the 0..1 scale). :class:`Preprocessor` maps a camera image to a
``(1, C, H, W)`` float tensor on the inference device.

Two paths compute that map; ``backend="auto"`` takes the OpenCV path on the
CPU and the torch path on a CUDA device.

OpenCV path (``backend="opencv"``): integer work first, float only on the small image.

1. Colour -> gray (``cv2.cvtColor``, BT.601 weights) on the integers when the
   image is then shrunk (one plane to resize instead of three); OpenCV rounds
   that luma to the integer type.
2. Every axis longer than ``input_size`` is shrunk with ``cv2.resize``
   ``INTER_AREA`` (the exact pixel-area average) on the uint8/uint16 data.
   No float copy of the full frame ever exists: beyond the frame, the path
   holds one integer plane (colour frame, gray network) or nothing.
3. Axes shorter than ``input_size`` are enlarged afterwards, in float32, with
   ``INTER_LINEAR`` (half-pixel centres: the weights of torch's ``bilinear``
   with ``align_corners=False``); an image that is not shrunk gets its luma in
   float (no rounding).
4. One numpy pass converts to float, picks R, G, B (alpha dropped), goes from
   HWC to CHW and applies ``(x / full_scale - mean) / std``; for a gray network
   fed integers, a lookup table holding that same float32 arithmetic.

The decisions for a layout (channel order, shape, dtype) are made once and
kept as a plan, so a frame costs little more than the OpenCV calls themselves
(``bench/bench_preprocess.py``, ``bench/results/preprocess.md``).

Torch path (``backend="torch"``; the CUDA path, and the reference on the CPU):

1. ``torch.from_numpy`` (shares memory on the CPU: no copy, also for
   row-padded views of a ROS ``step``), then the raw integers are moved to the
   device first (uint8 is a quarter of float32 over the bus).
2. Channel reorder / alpha drop by indexing the uint8 tensor, then float
   (uint16 is made float first: not every torch build indexes uint16).
3. Colour -> gray with ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B);
   gray -> colour by repeating the single channel, done after resizing (the
   repeat is a free ``expand``, resizing one channel is a third of the work).
4. Resize with ``F.interpolate`` bilinear (``antialias=True`` when downscaling,
   so small inputs do not alias): the resize of training's transform
   (``training/data.py``), which this path replays to float rounding.
5. Scale by 1/255 or 1/65535 and normalise ``(x - mean) / std`` in one fused
   ``addcmul``. Both are affine and bilinear resizing is linear with weights
   summing to 1, so applying them after the resize gives the same result as the
   textbook order (scale, resize, normalise) up to float rounding.

How far the two paths differ, on the 0..1 scale (before ``(x - mean) / std``;
``tests/test_preprocess.py::test_opencv_path_matches_torch_path`` checks these
bounds over every channel order, uint8/uint16 and both network kinds):

* Enlarging or no resize (e.g. a 28x28 Fashion-MNIST image for a 32x32
  network): the same weights, below 1e-5. Both paths equal training's
  transform there.
* Shrinking: the area average weights each output pixel's footprint evenly
  (a box), the antialiased bilinear filter weights a footprint twice as wide
  with a triangle. On content whose finest detail spans at least four output
  pixels they differ by less than 0.04 per value and 0.01 on average (measured
  at most 0.031 and 0.0065), OpenCV's integer rounding included; on detail
  finer than an output pixel (noise) they differ more, as two different
  low-pass filters must. For the embedded model on Fashion-MNIST sent as
  640x480 camera frames, the OpenCV path's inputs are closer to training's
  than the torch path's and its accuracy is no lower
  (``bench/results/preprocess.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "CHANNEL_ORDERS", "TARGET_CHANNELS", "BT601_WEIGHTS", "PreprocessError", "Preprocessor"]

# Channel order of an incoming image -> number of channels it has.
CHANNEL_ORDERS: dict[str, int] = {"gray": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
# What a network can be trained on -> number of input channels.
TARGET_CHANNELS: dict[str, int] = {"gray": 1, "rgb": 3}
# Which implementation computes the map: "auto" = OpenCV on the CPU, torch on CUDA.
BACKENDS: tuple[str, ...] = ("auto", "opencv", "torch")
# Index of R, G, B in each colour order (alpha is dropped by not selecting it).
_RGB_INDEX: dict[str, list[int]] = {"rgb": [0, 1, 2], "bgr": [2, 1, 0], "rgba": [0, 1, 2], "bgra": [2, 1, 0]}
# The same selection as a slice of the last axis, for numpy views without a copy.
_RGB_SLICE: dict[str, slice] = {"rgb": slice(0, 3), "bgr": slice(2, None, -1),
                                "rgba": slice(0, 3), "bgra": slice(2, None, -1)}
_TO_GRAY: dict[str, int] = {"rgb": cv2.COLOR_RGB2GRAY, "bgr": cv2.COLOR_BGR2GRAY,
                            "rgba": cv2.COLOR_RGBA2GRAY, "bgra": cv2.COLOR_BGRA2GRAY}
# ITU-R BT.601 luma weights for R, G, B (the same as OpenCV's RGB2GRAY).
BT601_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
_FULL_SCALE: dict[np.dtype, float] = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_NUMPY_FLOATS: dict[torch.dtype, type] = {torch.float16: np.float16, torch.float32: np.float32,
                                          torch.float64: np.float64}
# Layouts (channel order, shape, dtype) remembered per Preprocessor; a camera has one.
_MAX_PLANS = 16


class PreprocessError(ValueError):
    """Raised for an image or preprocessing description this module cannot handle."""


class Preprocessor:
    """Turn ``HxWxC`` / ``HxW`` uint8 or uint16 numpy images into ``(1, C, H, W)`` tensors.

    ``preprocessing`` is the checkpoint's dict: ``input_size`` (H, W), ``channels``
    ("gray"/"rgb"), ``mean`` and ``std`` (one value, or one per channel, 0..1 scale).
    ``dtype`` is the output dtype (float16 for a half-precision network).
    ``backend`` picks the implementation (see the module docstring): "auto"
    (OpenCV on the CPU, torch on CUDA), "opencv" (on the CPU; the small result
    is moved to ``device``) or "torch" (everything on ``device``).
    """

    def __init__(
        self,
        preprocessing: Mapping[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        if not isinstance(preprocessing, Mapping):
            raise PreprocessError(f"preprocessing must be a dict, got {type(preprocessing).__name__}")
        missing = [key for key in ("input_size", "channels", "mean", "std") if key not in preprocessing]
        if missing:
            raise PreprocessError(f"preprocessing lacks {missing}; it needs input_size, channels, mean and std "
                                  "(as written into the checkpoint by training)")
        self.device = torch.device(device)
        if not dtype.is_floating_point:
            raise PreprocessError(f"output dtype must be a floating point type, got {dtype}")
        self.dtype = dtype
        if backend not in BACKENDS:
            raise PreprocessError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "auto":
            backend = "opencv" if self.device.type == "cpu" else "torch"
        self.backend: str = backend

        size = preprocessing["input_size"]
        if (not isinstance(size, Sequence) or len(size) != 2
                or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)):
            raise PreprocessError(f"input_size must be [H, W] with positive integers, got {size!r}")
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))

        channels = preprocessing["channels"]
        if channels not in TARGET_CHANNELS:
            raise PreprocessError(f"channels must be one of {sorted(TARGET_CHANNELS)}, got {channels!r}")
        self.channels: str = channels
        self.num_channels: int = TARGET_CHANNELS[channels]

        mean = self._per_channel("mean", preprocessing["mean"])
        std = self._per_channel("std", preprocessing["std"])
        if any(not s > 0 for s in std):
            raise PreprocessError(f"std must be > 0 for every channel, got {std}")
        self.mean: tuple[float, ...] = tuple(mean)
        self.std: tuple[float, ...] = tuple(std)

        # Per-channel affine terms for x_raw -> (x_raw / full_scale - mean) / std, one pair per input dtype,
        # on the device (torch path) and on the CPU (OpenCV path).
        self._affine: dict[np.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._affine_np: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        for np_dtype, full_scale in _FULL_SCALE.items():
            gain = 1.0 / (full_scale * std_t)
            offset = -mean_t / std_t
            self._affine_np[np_dtype] = (gain.numpy().reshape(-1, 1, 1), offset.numpy().reshape(-1, 1, 1))
            self._affine[np_dtype] = (gain.to(self.device), offset.to(self.device))
        self._luma = torch.tensor(BT601_WEIGHTS, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._rgb_index = {order: torch.tensor(index, device=self.device) for order, index in _RGB_INDEX.items()}
        self._plans: dict[tuple[Any, ...], Callable[[np.ndarray], torch.Tensor]] = {}
        self._tables: dict[np.dtype, np.ndarray] = {}

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """Shape of every tensor this preprocessor returns: (1, C, H, W)."""
        return (1, self.num_channels, *self.input_size)

    def __call__(self, image: np.ndarray, channel_order: str) -> torch.Tensor:
        """Return ``image`` (channel order ``channel_order``) as a normalised ``(1, C, H, W)`` tensor."""
        # Hot path: a camera sends one layout, so the checks and decisions for it are made once and
        # kept as a plan (a closure); on a 0.1 ms frame every Python-level operation shows.
        if type(image) is np.ndarray:
            plan = self._plans.get((channel_order, image.shape, image.dtype))
            if plan is not None:
                return plan(image)
        return self._plan_for(image, channel_order)(image)

    # ------------------------------------------------------------------ plans
    def _plan_for(self, image: Any, channel_order: Any) -> Callable[[np.ndarray], torch.Tensor]:
        """Validate ``image`` (PreprocessError if unusable) and return the plan for its layout."""
        order, dtype = self._validate(image, channel_order)
        shape = image.shape
        make = self._opencv_plan if self.backend == "opencv" else self._torch_plan
        plan = make(shape, order, dtype, image.dtype.byteorder == ">")
        if type(image) is np.ndarray and isinstance(channel_order, str):
            if len(self._plans) >= _MAX_PLANS:                    # a source whose size keeps changing
                self._plans.clear()
            self._plans[(channel_order, shape, image.dtype)] = plan
        return plan

    def _opencv_plan(self, shape: tuple[int, ...], order: str, dtype: np.dtype,
                     swap: bool) -> Callable[[np.ndarray], torch.Tensor]:
        """OpenCV on the CPU: shrink the integers, then float on the small image (module docstring)."""
        target_h, target_w = self.input_size
        height, width = shape[:2]
        shrunk = (min(height, target_h), min(width, target_w))
        shrink = (shrunk[1], shrunk[0]) if shrunk != (height, width) else None    # cv2 sizes are (W, H)
        enlarge = (target_w, target_h) if shrunk != self.input_size else None
        plane = len(shape) == 3 and order == "gray"                # (H, W, 1) -> (H, W) for OpenCV
        luma = _TO_GRAY[order] if order != "gray" and self.channels == "gray" else None
        # Luma on the integers when shrinking (one plane to resize), else in float (no rounding).
        luma_int = luma if shrink else None
        luma_float = None if shrink else luma
        one_plane = order == "gray" or luma is not None           # what is left after colour conversion
        pick = None if one_plane else _RGB_SLICE[order]           # R, G, B of the colour orders
        native = dtype
        gain, offset = self._affine_np[dtype]                     # (C, 1, 1) float32
        single = pick is None and self.num_channels == 1
        gain_1, offset_1 = gain[0, 0, 0], offset[0, 0, 0]          # float32 scalars
        out_dtype, device = self.dtype, (None if self.device.type == "cpu" else self.device)
        # uint8 result, one output plane: the affine map as a 256-entry table, one gather for convert +
        # scale (cv2.LUT when the table is float32, a little faster than numpy's gather).
        table = lut = None
        if enlarge is None and luma_float is None and self.num_channels == 1 and dtype == np.uint8:
            table = self._table(dtype)
            if table.dtype == np.float32:
                lut, table = table, None
        gather = lut if lut is not None else table
        produced = torch.float32 if gather is None else torch.from_numpy(gather[:0]).dtype
        convert = produced != out_dtype
        interp_area, interp_linear = cv2.INTER_AREA, cv2.INTER_LINEAR
        shape_out = (1, self.num_channels, target_h, target_w)

        def run(image: np.ndarray) -> torch.Tensor:
            if swap:                                              # OpenCV would misread big-endian data
                image = image.astype(native)
            if plane:
                image = image[:, :, 0]
            if luma_int is not None:
                image = cv2.cvtColor(image, luma_int)
            if shrink is not None:
                image = cv2.resize(image, shrink, interpolation=interp_area)
            if lut is not None:
                x = torch.from_numpy(cv2.LUT(image, lut).reshape(shape_out))
            elif table is not None:
                x = torch.from_numpy(table[image].reshape(shape_out))
            else:
                image = image.astype(np.float32)                  # small (at most input_size), ours
                if luma_float is not None:
                    image = cv2.cvtColor(image, luma_float)
                if enlarge is not None:
                    image = cv2.resize(image, enlarge, interpolation=interp_linear)
                if single:                                        # one plane in and out: scale in place
                    image *= gain_1
                    image += offset_1
                    x = torch.from_numpy(image.reshape(shape_out))
                else:
                    out = np.empty(shape_out, np.float32)
                    source = image[None] if pick is None else np.moveaxis(image[:, :, pick], -1, 0)
                    # numpy, not torch: torch splits element-wise work of a 224x224x3 size over its thread
                    # pool, which stalls whenever the other cores are busy. One pass converts, reorders to
                    # R, G, B, transposes HWC -> CHW and scales; a gray source broadcasts to 3 planes.
                    np.multiply(source, gain, out=out[0])
                    np.add(out[0], offset, out=out[0])
                    x = torch.from_numpy(out)
            if convert:
                x = x.to(out_dtype)
            return x if device is None else x.to(device)

        return run

    def _table(self, dtype: np.dtype) -> np.ndarray:
        """``(v / full_scale - mean) / std`` for every value v of ``dtype`` (uint8), in the output dtype.

        Computed as the float32 multiply-add of the other paths, so a lookup equals that arithmetic
        exactly (then rounded once to float16 for a half-precision network: the same as converting the
        float32 result).
        """
        table = self._tables.get(dtype)
        if table is None:
            gain, offset = (term[0, 0, 0] for term in self._affine_np[dtype])   # float32 scalars
            table = np.arange(np.iinfo(dtype).max + 1, dtype=np.float32)
            table *= gain
            table += offset
            if self.dtype in _NUMPY_FLOATS:                       # else (bfloat16) converted per frame
                table = table.astype(_NUMPY_FLOATS[self.dtype])
            self._tables[dtype] = table
        return table

    def _torch_plan(self, shape: tuple[int, ...], order: str, dtype: np.dtype,
                    swap: bool) -> Callable[[np.ndarray], torch.Tensor]:
        def run(image: np.ndarray) -> torch.Tensor:
            if image.ndim == 2:
                image = image[:, :, None]
            if swap or min(image.strides) < 0:
                # torch cannot view big-endian data or negative strides (flipped views): one copy.
                image = np.ascontiguousarray(image, dtype=dtype)
            x = self._torch(image, order, dtype)
            return x if x.dtype == self.dtype else x.to(self.dtype)

        return run

    def _torch(self, image: np.ndarray, order: str, full_dtype: np.dtype) -> torch.Tensor:
        """torch on ``device``: integers uploaded, then float, antialiased bilinear resize (module docstring)."""
        raw = self._to_device(image)                              # (Cin, H, W) integers on the device
        if raw.dtype == torch.uint16:
            # Casts exist for uint16 on every backend, indexing kernels not in every torch build.
            raw = raw.to(torch.float32)
        if order == "gray":
            x = raw.to(torch.float32)                             # (1, H, W)
        else:
            rgb = raw.index_select(0, self._rgb_index[order]).to(torch.float32)  # (3, H, W), R G B
            x = (rgb * self._luma).sum(0, keepdim=True) if self.channels == "gray" else rgb
        x = x.unsqueeze(0)                                        # (1, 1 or 3, H, W)
        height, width = x.shape[-2:]
        if (height, width) != self.input_size:
            downscale = height > self.input_size[0] or width > self.input_size[1]
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=downscale)
        if x.shape[1] != self.num_channels:                        # gray camera, colour network
            x = x.expand(1, self.num_channels, *self.input_size)
        gain, offset = self._affine[full_dtype]
        return torch.addcmul(offset, x, gain)                     # (x / full_scale - mean) / std

    # ------------------------------------------------------------------ helpers
    def _validate(self, image: Any, channel_order: Any) -> tuple[str, np.dtype]:
        """Check ``image`` (PreprocessError if unusable); return its channel order and native dtype."""
        if not isinstance(image, np.ndarray):
            raise PreprocessError(f"image must be a numpy array, got {type(image).__name__}")
        order = channel_order.lower() if isinstance(channel_order, str) else None
        if order not in CHANNEL_ORDERS:
            raise PreprocessError(f"unsupported channel order {channel_order!r}; use one of {sorted(CHANNEL_ORDERS)}")
        expected = CHANNEL_ORDERS[order]
        shape = image.shape
        if not (len(shape) == 3 and shape[2] == expected or len(shape) == 2 and expected == 1):
            raise PreprocessError(f"a {order!r} image must have shape (H, W, {expected})"
                                  f"{' or (H, W)' if expected == 1 else ''}, got {shape}")
        if shape[0] < 1 or shape[1] < 1:
            raise PreprocessError(f"image is empty: shape {shape}")
        dtype = image.dtype.newbyteorder("=") if image.dtype.byteorder == ">" else image.dtype
        if dtype not in _FULL_SCALE:
            raise PreprocessError(f"image dtype must be uint8 or uint16, got {image.dtype}")
        return order, dtype

    def _to_device(self, image: np.ndarray) -> torch.Tensor:
        """A validated (H, W, C) array as a (C, H, W) integer tensor on the device."""
        if image.flags.writeable:
            tensor = torch.from_numpy(image)
        else:
            # Read-only buffers (np.frombuffer of a ROS message) are shared as well; nothing here
            # writes into them (the first op that touches values makes a float copy).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(image)
        tensor = tensor.to(self.device)                           # integers over the bus, not floats
        return tensor.permute(2, 0, 1)                            # (C, H, W) view

    def _per_channel(self, name: str, value: Any) -> list[float]:
        values = [value] if isinstance(value, (int, float)) else value
        if not isinstance(values, Sequence) or not values:
            raise PreprocessError(f"{name} must be a number or a list of numbers, got {value!r}")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise PreprocessError(f"{name} must hold numbers, got {value!r}") from None
        if len(values) == 1:
            values = values * self.num_channels
        if len(values) != self.num_channels:
            raise PreprocessError(f"{name} has {len(values)} values but the network takes "
                                  f"{self.num_channels} channel(s) ({self.channels!r})")
        return values

    def __repr__(self) -> str:
        return (f"Preprocessor(input_size={self.input_size}, channels={self.channels!r}, "
                f"mean={self.mean}, std={self.std}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"backend={self.backend!r})")
