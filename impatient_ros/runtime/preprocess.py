"""Camera image (numpy, uint8/uint16, any of five channel orders) -> normalised network input.

The checkpoint's ``preprocessing`` dict says what the network was trained on:
``input_size`` [H, W], ``channels`` ("gray" or "rgb"), ``mean`` and ``std`` (per
channel, on the 0..1 scale). :class:`Preprocessor` maps a camera image to a
``(1, C, H, W)`` float tensor on the inference device.

Order of work, chosen so the expensive steps run on the device and on the
fewest bytes:

1. ``torch.from_numpy`` (shares memory on the CPU: no copy, also for
   row-padded views of a ROS ``step``), then the raw integers are moved to the
   device first (uint8 is a quarter of float32 over the bus).
2. Channel reorder / alpha drop by indexing the uint8 tensor, then float
   (uint16 is made float first: not every torch build indexes uint16).
3. Colour -> gray with ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B);
   gray -> colour by repeating the single channel, done after resizing (the
   repeat is a free ``expand``, resizing one channel is a third of the work).
4. Resize with ``F.interpolate`` bilinear (``antialias=True`` when downscaling,
   so small inputs do not alias).
5. Scale by 1/255 or 1/65535 and normalise ``(x - mean) / std`` in one fused
   ``addcmul``. Both are affine and bilinear resizing is linear with weights
   summing to 1, so applying them after the resize gives the same result as the
   textbook order (scale, resize, normalise) up to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CHANNEL_ORDERS", "TARGET_CHANNELS", "BT601_WEIGHTS", "PreprocessError", "Preprocessor"]

# Channel order of an incoming image -> number of channels it has.
CHANNEL_ORDERS: dict[str, int] = {"gray": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
# What a network can be trained on -> number of input channels.
TARGET_CHANNELS: dict[str, int] = {"gray": 1, "rgb": 3}
# Index of R, G, B in each colour order (alpha is dropped by not selecting it).
_RGB_INDEX: dict[str, list[int]] = {"rgb": [0, 1, 2], "bgr": [2, 1, 0], "rgba": [0, 1, 2], "bgra": [2, 1, 0]}
# ITU-R BT.601 luma weights for R, G, B (the same as OpenCV's RGB2GRAY).
BT601_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
_FULL_SCALE: dict[np.dtype, float] = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class PreprocessError(ValueError):
    """Raised for an image or preprocessing description this module cannot handle."""


class Preprocessor:
    """Turn ``HxWxC`` / ``HxW`` uint8 or uint16 numpy images into ``(1, C, H, W)`` tensors.

    ``preprocessing`` is the checkpoint's dict: ``input_size`` (H, W), ``channels``
    ("gray"/"rgb"), ``mean`` and ``std`` (one value, or one per channel, 0..1 scale).
    ``dtype`` is the output dtype (float16 for a half-precision network).
    """

    def __init__(
        self,
        preprocessing: Mapping[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
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

        # Per-channel affine terms for x_raw -> (x_raw / full_scale - mean) / std, one pair per input dtype.
        self._affine: dict[np.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        for np_dtype, full_scale in _FULL_SCALE.items():
            gain = (1.0 / (full_scale * std_t)).to(self.device)
            offset = (-mean_t / std_t).to(self.device)
            self._affine[np_dtype] = (gain, offset)
        self._luma = torch.tensor(BT601_WEIGHTS, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._rgb_index = {order: torch.tensor(index, device=self.device) for order, index in _RGB_INDEX.items()}

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """Shape of every tensor this preprocessor returns: (1, C, H, W)."""
        return (1, self.num_channels, *self.input_size)

    def __call__(self, image: np.ndarray, channel_order: str) -> torch.Tensor:
        """Return ``image`` (channel order ``channel_order``) as a normalised ``(1, C, H, W)`` tensor."""
        raw, full_dtype = self._to_device(image, channel_order)   # (Cin, H, W) integers on the device
        order = channel_order.lower()
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
        x = torch.addcmul(offset, x, gain)                        # (x / full_scale - mean) / std
        return x if x.dtype == self.dtype else x.to(self.dtype)

    # ------------------------------------------------------------------ helpers
    def _to_device(self, image: np.ndarray, channel_order: str) -> tuple[torch.Tensor, np.dtype]:
        """Validate ``image`` and return it as a (C, H, W) integer tensor on the device, and its dtype."""
        if not isinstance(image, np.ndarray):
            raise PreprocessError(f"image must be a numpy array, got {type(image).__name__}")
        order = channel_order.lower() if isinstance(channel_order, str) else channel_order
        if order not in CHANNEL_ORDERS:
            raise PreprocessError(f"unsupported channel order {channel_order!r}; use one of {sorted(CHANNEL_ORDERS)}")
        expected = CHANNEL_ORDERS[order]
        if image.ndim == 2 and expected == 1:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != expected:
            raise PreprocessError(f"a {order!r} image must have shape (H, W, {expected})"
                                  f"{' or (H, W)' if expected == 1 else ''}, got {image.shape}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise PreprocessError(f"image is empty: shape {image.shape}")
        dtype = image.dtype.newbyteorder("=") if image.dtype.byteorder == ">" else image.dtype
        if dtype not in _FULL_SCALE:
            raise PreprocessError(f"image dtype must be uint8 or uint16, got {image.dtype}")
        if image.dtype.byteorder == ">" or any(s < 0 for s in image.strides):
            # torch cannot view big-endian data or negative strides (flipped views): one copy.
            image = np.ascontiguousarray(image, dtype=dtype)
        if image.flags.writeable:
            tensor = torch.from_numpy(image)
        else:
            # Read-only buffers (np.frombuffer of a ROS message) are shared as well; nothing here
            # writes into them (the first op that touches values makes a float copy).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(image)
        tensor = tensor.to(self.device)                           # integers over the bus, not floats
        return tensor.permute(2, 0, 1), dtype                     # (C, H, W) view

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
                f"mean={self.mean}, std={self.std}, device={str(self.device)!r}, dtype={self.dtype})")
