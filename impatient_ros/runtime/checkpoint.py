"""Self-describing checkpoints: everything needed to rebuild and run an ImpatientNet.

A checkpoint is a ``torch.save``d dict of plain Python types and tensors only,
so ``torch.load(path, weights_only=True)`` reads it and a tampered file cannot
run code on load. Entries:

    format            "impatient_ros.checkpoint"
    format_version    1
    created           ISO 8601 UTC time of saving
    torch_version     torch that wrote it
    net_config        NetConfig.to_dict(): rebuilds the network
    num_stages, stage_output_shapes   exit placement, checked against the rebuild
    state_dict        the network's tensors (on the CPU)
    class_names       one name per class, in logit order
    preprocessing     input_size [H, W], channels "gray"|"rgb", mean [...], std [...]
    budget            None or {"scheme": str, "weights": [K numbers], ...}
    exit_accuracy     None or K validation accuracies (fractions in [0, 1])
    exit_cost         None or a dict (e.g. device, mean_ms per exit)
    train_config      None or a dict
    extra             None or a dict
    ensemble          optional: None or {"kind": "geometric", "weights": [[w_11], [w_21, w_22], ...]}
                      (exit ensembles, impatient_ros.core.ensemble); absent in older files = None

Files are written atomically (temp file in the same directory, fsync,
os.replace) with a ``<path>.sha256`` sidecar in ``sha256sum`` format.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from impatient_ros.core.atomic import atomic_write
from impatient_ros.runtime.model import ImpatientNet, NetConfig, build_network

FORMAT = "impatient_ros.checkpoint"
FORMAT_VERSION = 1

_CHANNELS = {"gray": 1, "rgb": 3}
_REQUIRED_KEYS = ("net_config", "state_dict", "class_names", "preprocessing")


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, unsafe or inconsistent."""


@dataclass
class LoadedCheckpoint:
    """A validated checkpoint: the network (eval mode) and its description."""

    net: ImpatientNet
    config: NetConfig
    class_names: list[str]
    preprocessing: dict[str, Any]
    budget: dict[str, Any] | None
    exit_accuracy: list[float] | None
    exit_cost: dict[str, Any] | None
    train_config: dict[str, Any] | None
    meta: dict[str, Any]  # format, format_version, created, torch_version, stage shapes, extra, path, sha256
    ensemble: dict[str, Any] | None = None  # exit-ensemble weights (impatient_ros.core.ensemble), if any


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The sha256 sidecar of a checkpoint: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike[str],
    net: ImpatientNet,
    *,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any],
    budget: Mapping[str, Any] | None = None,
    exit_accuracy: Sequence[float] | None = None,
    exit_cost: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    ensemble: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``net`` and its description to ``path`` atomically; return the path.

    Numpy scalars are stored as Python numbers, tuples as lists; anything
    else that is not a plain type or a tensor is rejected. Raises ValueError
    for invalid or inconsistent arguments (before anything is written).
    """
    if not isinstance(net, ImpatientNet):
        raise TypeError(f"save_checkpoint expects an ImpatientNet, got {type(net).__name__}")
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass: store a plain str
        "net_config": net.config.to_dict(),
        "num_stages": net.num_stages,
        "stage_output_shapes": [list(s) for s in net.stage_output_shapes()],
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},  # whatever layout it ran in
        "class_names": _plain(list(class_names), "class_names"),
        "preprocessing": _plain(dict(preprocessing), "preprocessing"),
        "budget": _plain(budget, "budget"),
        "exit_accuracy": _plain(exit_accuracy, "exit_accuracy"),
        "exit_cost": _plain(exit_cost, "exit_cost"),
        "train_config": _plain(train_config, "train_config"),
        "extra": _plain(extra, "extra"),
    }
    if ensemble is not None:  # written only when there is one: older readers see the same keys as before
        payload["ensemble"] = _plain(ensemble, "ensemble")
    _validate_description(payload, net.config, net.num_stages)

    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(path)
    digests: list[str] = []

    def hash_then_drop_sidecar(tmp: Path) -> None:
        # The old sidecar goes only once the new file is complete, right before the swap: a crash
        # then leaves a checkpoint without a sidecar (loads unverified), never one with a wrong hash.
        digests.append(sha256_file(tmp))
        sidecar.unlink(missing_ok=True)

    atomic_write(path, lambda f: torch.save(payload, f), before_replace=hash_then_drop_sidecar)
    atomic_write(sidecar, lambda f: f.write(f"{digests[0]}  {path.name}\n".encode()))
    return path


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, hex (the sidecar's digest; equal digests: the same checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made of plain types and tensors only (ValueError naming the bad entry)."""
    if value is None:
        return None
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()  # numpy scalar (np.float64 even subclasses float) -> Python number
    # Subclasses (IntEnum, numpy-derived, str enums) would be pickled by class: store the base type.
    for plain_type in (bool, int, float, str):
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string; checkpoints store str-keyed dicts only")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise ValueError(
        f"{where}: {type(value).__name__} is not a plain type; checkpoints store only "
        f"None/bool/int/float/str, lists, str-keyed dicts and tensors (convert it first)"
    )


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    verify_hash: bool = True,
) -> LoadedCheckpoint:
    """Load, validate and rebuild a checkpoint; the network is returned in eval mode on ``map_location``.

    Reads with ``torch.load(weights_only=True)`` only. Every problem raises
    CheckpointError with what is wrong and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint file at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")

    digest = _verify_sidecar(path) if verify_hash else None
    data = _read_torch_file(path)

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an impatient_ros checkpoint (it has no 'format': {FORMAT!r} entry); "
            f"write checkpoints with impatient_ros.runtime.checkpoint.save_checkpoint"
        )
    version = data.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was made by a newer impatient_ros (checkpoint format version {version}, this one "
            f"reads version {FORMAT_VERSION}): upgrade impatient_ros to load it"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is no longer supported")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks required entries {missing}")

    try:
        config = NetConfig.from_dict(data["net_config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid net_config: {exc}") from exc
    try:
        # The weights come from the checkpoint: never ask for pretrained ones (they may not be cached here).
        net = build_network(replace(config, pretrained=False))
    except (ValueError, ImportError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the network {config.backbone!r}: {exc}") from exc
    try:
        _validate_description(data, config, net.num_stages)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    _check_exit_placement(path, data, net)
    _load_state(path, net, data["state_dict"])

    net.eval()
    try:
        net.to(map_location)
    except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. "cuda" on a machine without CUDA
        raise CheckpointError(f"cannot move the network from {path} to {map_location!r}: {exc}") from exc
    meta = {
        "format": FORMAT,
        "format_version": version,
        "created": data.get("created"),
        "torch_version": data.get("torch_version"),
        "num_stages": net.num_stages,
        "stage_output_shapes": [list(s) for s in net.stage_output_shapes()],
        "extra": data.get("extra"),
        "path": str(path),
        "sha256": digest,
    }
    return LoadedCheckpoint(
        net=net,
        config=config,
        class_names=list(data["class_names"]),
        preprocessing=dict(data["preprocessing"]),
        budget=data.get("budget"),
        exit_accuracy=data.get("exit_accuracy"),
        exit_cost=data.get("exit_cost"),
        train_config=data.get("train_config"),
        meta=meta,
        ensemble=data.get("ensemble"),
    )


def _verify_sidecar(path: Path) -> str | None:
    """Compare the file with its sha256 sidecar, if there is one; return the file's digest."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        expected = sidecar.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise CheckpointError(f"cannot read the hash sidecar {sidecar}: {exc}; delete or regenerate it") from exc
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CheckpointError(f"hash sidecar {sidecar} holds no sha256 digest; delete or regenerate it")
    digest = sha256_file(path)
    if digest != expected:
        raise CheckpointError(
            f"{path} does not match its sha256 sidecar {sidecar.name} (file {digest[:12]}..., "
            f"sidecar {expected[:12]}...): the file is truncated, corrupted or was replaced; copy it "
            f"again, or delete the sidecar if the change was intended"
        )
    return digest


def _read_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True, every failure turned into a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler stops at the first thing that is not a plain type or a
        # tensor, before calling anything: whatever the file holds was not executed.
        reason = _weights_only_reason(str(exc))
        if "unsupported global" in reason.lower():
            raise CheckpointError(
                f"refused to load {path}: it references Python code ({reason}), which could run "
                f"when loaded, so it was not made by save_checkpoint (or was tampered with); "
                f"nothing in it was executed"
            ) from exc
        raise CheckpointError(
            f"{path} is not a readable torch file of plain types and tensors (corrupted, or not "
            f"made by torch.save: {reason}); nothing in it was executed"
        ) from exc
    except Exception as exc:  # zip/EOF/format errors from a truncated or foreign file
        raise CheckpointError(
            f"{path} is not a readable torch file (truncated, corrupted or not made by torch.save): {exc}"
        ) from exc


def _weights_only_reason(message: str) -> str:
    """The unpickler's own reason from torch's long weights-only error text."""
    marker = "WeightsUnpickler error:"
    if marker not in message:
        return message.strip().splitlines()[0] if message.strip() else "unreadable pickle"
    reason = message.split(marker, 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(reason.split())
    return reason.split(". Please use", 1)[0]  # drop torch's advice to allow-list the global


def _check_exit_placement(path: Path, data: Mapping[str, Any], net: ImpatientNet) -> None:
    """The rebuilt network must put its exits where the saved one had them."""
    built = [list(s) for s in net.stage_output_shapes()]
    saved_k, saved_shapes = data.get("num_stages"), data.get("stage_output_shapes")
    if (saved_k is not None and saved_k != net.num_stages) or (saved_shapes is not None and saved_shapes != built):
        raise CheckpointError(
            f"{path}: the checkpoint's exits ({saved_k} stages, shapes {saved_shapes}) differ from the "
            f"network rebuilt here ({net.num_stages} stages, shapes {built}); the backbone definition "
            f"changed between versions"
        )


def _load_state(path: Path, net: ImpatientNet, state: Any) -> None:
    """Load ``state`` into ``net`` only if keys and shapes match exactly."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])})")
        if wrong:
            parts.append(f"wrong shape {len(wrong)} ({'; '.join(wrong[:5])})")
        raise CheckpointError(
            f"{path}: state_dict does not match the network described by its net_config: " + ", ".join(parts)
        )
    net.load_state_dict(dict(state), strict=True)


# --------------------------------------------------------------------------- validation (save and load)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_description(data: Mapping[str, Any], config: NetConfig, num_stages: int) -> None:
    """Check everything but the weights; raise ValueError naming the entry."""
    names = data["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError("class_names must be a list of non-empty strings")
    if len(names) != config.num_classes:
        raise ValueError(f"{len(names)} class_names for a network with num_classes={config.num_classes}")
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique")

    _validate_preprocessing(data["preprocessing"], config)

    budget = data.get("budget")
    if budget is not None:
        if not isinstance(budget, dict) or not isinstance(budget.get("scheme"), str):
            raise ValueError("budget must be None or a dict with a 'scheme' name and 'weights'")
        weights = budget.get("weights")
        if (
            not isinstance(weights, list)
            or len(weights) != num_stages
            or not all(_is_number(w) and w >= 0 for w in weights)
            or sum(weights) <= 0
        ):
            raise ValueError(
                f"budget['weights'] must be {num_stages} non-negative numbers (one per exit) "
                f"with a positive sum, got {weights!r}"
            )

    accuracy = data.get("exit_accuracy")
    if accuracy is not None:
        if not isinstance(accuracy, list) or len(accuracy) != num_stages:
            raise ValueError(f"exit_accuracy must list one value per exit ({num_stages}), got {accuracy!r}")
        if not all(_is_number(a) and 0.0 <= a <= 1.0 for a in accuracy):
            raise ValueError(f"exit_accuracy values must be fractions in [0, 1], got {accuracy!r}")

    for key in ("exit_cost", "train_config", "extra"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"{key} must be None or a dict, got {type(data[key]).__name__}")

    if data.get("ensemble") is not None:
        from impatient_ros.core.ensemble import validate_ensemble

        validate_ensemble(data["ensemble"], num_stages)  # EnsembleError is a ValueError naming the entry


def _validate_preprocessing(pre: Any, config: NetConfig) -> None:
    if not isinstance(pre, dict):
        raise ValueError("preprocessing must be a dict with input_size, channels, mean, std")
    missing = [k for k in ("input_size", "channels", "mean", "std") if k not in pre]
    if missing:
        raise ValueError(f"preprocessing lacks {missing}")
    size = pre["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        raise ValueError(f"preprocessing['input_size'] must be [height, width] positive integers, got {size!r}")
    if tuple(size) != config.input_size:
        raise ValueError(
            f"preprocessing['input_size'] {size} differs from the network's input_size {list(config.input_size)}"
        )
    channels = pre["channels"]
    if channels not in _CHANNELS:
        raise ValueError(f"preprocessing['channels'] must be 'gray' or 'rgb', got {channels!r}")
    if _CHANNELS[channels] != config.in_channels:
        raise ValueError(f"preprocessing['channels'] {channels!r} but the network has in_channels={config.in_channels}")
    for key in ("mean", "std"):
        values = pre[key]
        if not isinstance(values, list) or len(values) != config.in_channels or not all(_is_number(v) for v in values):
            raise ValueError(f"preprocessing[{key!r}] must be {config.in_channels} number(s), got {values!r}")
    if not all(s > 0 for s in pre["std"]):
        raise ValueError(f"preprocessing['std'] must be positive, got {pre['std']!r}")
