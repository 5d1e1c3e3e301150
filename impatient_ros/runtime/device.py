"""Device names -> ``torch.device``: the one place that decides which device a name means.

The engine (:mod:`impatient_ros.runtime.engine`) and the trainer
(``impatient_ros.training.trainer``) both resolve their ``device`` setting here:
the engine may fall back to the CPU with a warning (a robot without its GPU still
answers), the trainer may not (a training run silently on the CPU would take
days), so it passes ``allow_cpu_fallback=False``.
"""

from __future__ import annotations

import warnings

import torch

from impatient_ros.core.results import EngineError

__all__ = ["DeviceFallbackWarning", "DeviceUnavailableError", "resolve_device"]


class DeviceUnavailableError(EngineError):
    """The requested device does not exist here and CPU fallback is not allowed."""


class DeviceFallbackWarning(RuntimeWarning):
    """A CUDA device was requested but the engine runs on the CPU instead."""


def resolve_device(device: str | torch.device = "auto", allow_cpu_fallback: bool = True) -> torch.device:
    """Map "auto" to cuda if available else cpu; an absent CUDA device to the CPU with a warning, or an error.

    Accepts "auto", "cpu", "cuda" and "cuda:N" (any case, or a ``torch.device``);
    a CUDA device always comes back with its index. Raises
    :class:`~impatient_ros.core.results.EngineError` for other names and
    :class:`DeviceUnavailableError` for an absent CUDA device when
    ``allow_cpu_fallback`` is false; otherwise warns with
    :class:`DeviceFallbackWarning` and returns the CPU.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise EngineError(f"invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise EngineError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if available else 0)
    if available and index < count:
        return torch.device("cuda", index)
    why = "CUDA is not available" if not available else f"only {count} CUDA device(s) exist"
    if not allow_cpu_fallback:
        raise DeviceUnavailableError(f"device {device!r} requested but {why}; use device='cpu' or 'auto', "
                                     "or allow the CPU fallback")
    # stacklevel 3: called from StagedEngine.__init__, the warning names the line that created the engine.
    warnings.warn(f"device {device!r} requested but {why}: running on the CPU", DeviceFallbackWarning, stacklevel=3)
    return torch.device("cpu")
