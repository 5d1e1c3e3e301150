"""Joint weighted training of all exits (paper Sect. 3), evaluation, checkpoints and resume.

Loss: ``sum_k w_k CE(f_k(x), y)`` with the budget weights normalised to sum 1
(an index scheme or Eq. 5 of a time-budget distribution). With ``distill`` an
early exit's term becomes ``(1 - a) CE_k + a T^2 KL(p_K^T || p_k^T)``: the
last exit's softened prediction, detached, teaches the earlier exits
(in-place self-distillation as in IMTA, Li et al., ICCV 2019).

Layout follows torchvision's classification reference: ``train_one_epoch``,
``evaluate``, ``train`` (the run), ``evaluate_checkpoint`` (``--eval-only``).

Outputs in ``<out>/``: ``last.pt`` and ``best.pt`` (self-describing
checkpoints via :func:`impatient_ros.runtime.checkpoint.save_checkpoint`; 'best' by the
budget-weighted expected validation accuracy), ``resume.pt`` (optimizer,
scheduler, scaler, epoch, best metric and RNG states: plain types and
tensors, loadable with ``weights_only=True``), ``config.yaml`` (the final
config) and ``metrics.jsonl`` (one JSON line per epoch, plus one for the test
evaluation at the end).

Resume (``--resume``) continues after the last completed epoch of
``<out>/resume.pt``. With ``--deterministic`` on the same machine and thread
count, an interrupted and resumed run ends with the same weights as an
uninterrupted one; the shuffling order depends only on (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from impatient_ros.core.results import EngineError
from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.device import DeviceUnavailableError
from impatient_ros.runtime.device import resolve_device as _resolve_device_name
from impatient_ros.runtime.model import ImpatientNet, NetConfig, build_network
from impatient_ros.core.atomic import atomic_write
from impatient_ros.core.budget import expected_accuracy
from . import recipe
from .config import DISTILL_TEACHERS, ConfigError, TrainConfig, describe, save_yaml
from .data import DataBundle, load_data
from .layout import fast_layout, runtime_layout
from .distributed import (
    DistContext,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    init_distributed,
    shutdown,
)

__all__ = [
    "RESUME_FORMAT",
    "TrainResult",
    "JointLoss",
    "resolve_device",
    "seed_everything",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "amp_settings",
    "train_one_epoch",
    "evaluate",
    "measure_exit_cost",
    "parameter_checksum",
    "train",
    "evaluate_checkpoint",
]

log = logging.getLogger("training")

RESUME_FORMAT = "impatient_ros.resume"
RESUME_VERSION = 1


# --------------------------------------------------------------------------- set-up


def resolve_device(name: str, ctx: DistContext | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under torchrun each process takes cuda:LOCAL_RANK.

    The name is resolved by :func:`impatient_ros.runtime.device.resolve_device`,
    the package's one owner of device names, without its CPU fallback: a run
    asked for CUDA must not silently train on the CPU. Errors are ConfigErrors.
    """
    distributed = ctx is not None and ctx.enabled
    try:
        device = _resolve_device_name(name, allow_cpu_fallback=False)
    except DeviceUnavailableError:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but CUDA is not available here; use --device cpu") from None
        if not distributed:
            raise ConfigError(f"device {name!r} asked for but only {torch.cuda.device_count()} CUDA device(s) "
                              "exist here; use --device cuda, cuda:N of an existing one, or cpu") from None
        device = torch.device("cuda")  # torchrun: the local rank picks the GPU, whatever index was named
    except EngineError as exc:
        raise ConfigError(str(exc)) from None
    if device.type == "cuda" and ctx is not None and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; in deterministic mode also pin the algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic (no-op on CPU).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels


def amp_settings(mode: str, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(autocast on?, autocast dtype, use a GradScaler?) for an AMP mode; always off on the CPU."""
    if device.type != "cuda" or mode == "off":
        return False, torch.float32, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return True, torch.bfloat16, False  # bf16 has fp32's range: no loss scaling needed
    return True, torch.float16, True


def param_groups(net: nn.Module, weight_decay: float, lr: float | None = None,
                 backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Weights with decay; batch-norm parameters and biases (1-D) without.

    With ``backbone_lr_scale`` != 1 (and ``lr`` given) the backbone's blocks get
    their own two groups at ``lr * backbone_lr_scale``; the heads' groups come
    first, so ``param_groups[0]["lr"]`` is the heads' (the configured) rate.
    """
    split = lr is not None and backbone_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = split and (name.startswith("blocks.") or ".blocks." in name)  # DDP: "module.blocks..."
        groups.setdefault((in_backbone, p.ndim > 1), []).append(p)
    out = []
    for in_backbone in (False, True):
        for decayed in (True, False):
            params = groups.get((in_backbone, decayed), [])
            if in_backbone and not params:
                continue
            group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
            if split:
                group["lr"] = lr * (backbone_lr_scale if in_backbone else 1.0)
            out.append(group)
    return out


def build_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (optionally Nesterov) or AdamW (beta1 = momentum)."""
    o = cfg.optim
    groups = param_groups(net, o.weight_decay, o.lr, o.backbone_lr_scale)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up to lr, then cosine decay to min_lr at the last step."""
    o = cfg.optim
    total = max(1, o.epochs * steps_per_epoch)
    warmup = min(total, int(round(o.warmup_epochs * steps_per_epoch)))
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- loss


class JointLoss:
    """Budget-weighted cross-entropy over all exits, with optional self-distillation.

    ``teacher="last"``: the early exits distil from the last exit (IMTA, Li et
    al., ICCV 2019). ``teacher="ensemble"``: every exit, the last included,
    distils from the geometric mean of all exits' tempered probabilities (the
    uniform exit ensemble, detached): a teacher better than any single exit,
    as the exit ensembles of Zero Time Waste are at inference.
    """

    def __init__(self, weights: Sequence[float], label_smoothing: float = 0.0, distill: bool = False,
                 distill_weight: float = 0.5, temperature: float = 3.0, teacher: str = "last") -> None:
        if teacher not in DISTILL_TEACHERS:
            raise ValueError(f"unknown distillation teacher {teacher!r}; valid: {', '.join(DISTILL_TEACHERS)}")
        self.weights = [float(w) for w in weights]
        self.label_smoothing = label_smoothing
        self.distill = distill
        self.alpha = distill_weight
        self.temperature = temperature
        self.teacher = teacher

    def soft_target(self, logits: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Log-probabilities (N, C) the exits distil from at the temperature (detached); None without."""
        if not self.distill or len(logits) < 2:
            return None
        t = self.temperature
        if self.teacher == "last":
            return F.log_softmax(logits[-1].detach() / t, dim=1)
        mean = torch.stack([F.log_softmax(z.detach() / t, dim=1) for z in logits]).mean(dim=0)
        return F.log_softmax(mean, dim=1)  # renormalised geometric mean

    def __call__(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """outputs: K logits (N, C); target (N,) -> scalar loss (float32)."""
        if len(outputs) != len(self.weights):
            raise ValueError(f"{len(outputs)} exits but {len(self.weights)} budget weights")
        logits = [z.float() for z in outputs]  # the loss in fp32 also under autocast
        last = len(logits) - 1
        soft_target = self.soft_target(logits)
        students = last + 1 if self.teacher == "ensemble" else last
        total = logits[0].new_zeros(())
        for k, (z, w) in enumerate(zip(logits, self.weights)):
            term = F.cross_entropy(z, target, label_smoothing=self.label_smoothing)
            if soft_target is not None and k < students:
                kl = F.kl_div(F.log_softmax(z / self.temperature, dim=1), soft_target,
                              log_target=True, reduction="batchmean")
                # T^2 keeps the gradient scale of the soft term independent of T (Hinton et al.).
                term = (1.0 - self.alpha) * term + self.alpha * self.temperature**2 * kl
            total = total + w * term
        return total


# --------------------------------------------------------------------------- loops


def _unwrap(net: nn.Module) -> ImpatientNet:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net  # type: ignore[return-value]


def _fmt_acc(values: Sequence[float]) -> str:
    return "/".join(f"{100 * v:.1f}" for v in values)


def train_one_epoch(
    net: nn.Module,
    loader: DataLoader,
    loss_fn: JointLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    epoch: int,
    epochs: int,
    amp: tuple[bool, torch.dtype, bool],
    ctx: DistContext,
    max_steps: int | None = None,
    progress: bool | None = None,
    frozen_norms: Sequence[nn.Module] = (),
) -> dict[str, Any]:
    """One pass over ``loader``; returns the mean loss and every exit's running accuracy (all ranks).

    ``frozen_norms``: batch-norm layers kept in eval mode (running statistics fixed; see training.recipe).
    """
    from tqdm import tqdm

    net.train()
    for norm in frozen_norms:
        norm.eval()
    autocast_on, autocast_dtype, _ = amp
    k_exits = len(loss_fn.weights)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(k_exits, dtype=torch.float64, device=device)
    seen = 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    # progress: None = only on a terminal (tqdm's own check), True = always, False = never; rank 0 only.
    disable = True if (not ctx.is_main or progress is False) else (False if progress else None)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, disable=disable)
    for step, (images, target) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_on):
            outputs = net(images)  # K x (N, C)
        loss = loss_fn(outputs, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}: lower --lr or turn off fp16")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            n = target.shape[0]
            loss_sum += loss.detach().double() * n
            correct += torch.stack([(z.argmax(1) == target).sum() for z in outputs]).double()
            seen += n
        if bar.disable is False and (step % 10 == 0 or step == steps - 1):
            acc = (correct / max(seen, 1)).tolist()  # one device sync every 10 steps, not every step
            bar.set_postfix_str(f"loss {loss_sum.item() / seen:.3f} acc {_fmt_acc(acc)}", refresh=False)
        bar.update(1)
    bar.close()
    totals = all_reduce_sum(torch.cat([loss_sum.view(1), correct, loss_sum.new_tensor([seen])]), ctx)
    count = max(float(totals[-1]), 1.0)
    return {"loss": float(totals[0]) / count, "exit_accuracy": (totals[1:-1] / count).tolist(),
            "samples": int(totals[-1]), "steps": steps}


@torch.inference_mode()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device, ctx: DistContext | None = None,
             amp: tuple[bool, torch.dtype, bool] = (False, torch.float32, False)) -> dict[str, Any]:
    """Every exit's accuracy (fraction) and cross-entropy on ``loader``, summed over all ranks."""
    ctx = ctx or DistContext()
    model = _unwrap(net)
    was_training = model.training
    model.eval()
    correct = None
    loss_sum = None
    seen = 0
    try:
        for images, target in loader:
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
                outputs = model(images)
            hits = torch.stack([(z.argmax(1) == target).sum() for z in outputs]).double()
            losses = torch.stack([F.cross_entropy(z.float(), target, reduction="sum") for z in outputs]).double()
            correct = hits if correct is None else correct + hits
            loss_sum = losses if loss_sum is None else loss_sum + losses
            seen += target.shape[0]
    finally:
        model.train(was_training)
    k = model.num_stages
    correct = correct if correct is not None else torch.zeros(k, dtype=torch.float64, device=device)
    loss_sum = loss_sum if loss_sum is not None else torch.zeros(k, dtype=torch.float64, device=device)
    totals = all_reduce_sum(torch.cat([correct, loss_sum, correct.new_tensor([seen])]), ctx)
    count = float(totals[-1])
    if count == 0:
        raise ValueError("evaluation set is empty")
    return {"exit_accuracy": (totals[:k] / count).tolist(), "exit_loss": (totals[k:2 * k] / count).tolist(),
            "samples": int(count)}


def measure_exit_cost(net: ImpatientNet, device: torch.device, reps: int = 50, warmup: int = 5,
                      preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Latency of each exit at batch 1 on ``device``, measured as the runtime runs the network.

    A copy of ``net`` goes through :class:`impatient_ros.runtime.engine.StagedEngine`
    (eval mode, fused heads, CUDA graphs on a GPU) and its calibration times every
    block and head ``reps`` times, as ``impatient-eval`` does; ``net`` itself is
    not touched. The ready times are the package's one definition
    (:mod:`impatient_ros.core.ready_times`), from the median of each part:

    ``block_ms``/``head_ms``: per stage; ``anytime_ms``: t_A(k), when exit k's
    answer is ready on the anytime path (the t_k of paper Eq. 5); ``apriori_ms``:
    t_B(k), blocks 1..k and only head k; ``statistic``: "median".
    Also, for older readers: ``stage_p50_ms``/``stage_mean_ms`` (block + head of
    stage k alone) and their cumulative sums ``p50_ms``/``mean_ms``.
    ``preprocessing`` (the checkpoint's) only gives the input shape; without it
    the shape comes from ``net.config``.
    """
    from impatient_ros.core.ready_times import anytime_ready_times, apriori_ready_times
    from impatient_ros.runtime.engine import StagedEngine

    cfg = net.config
    if preprocessing is None:
        preprocessing = {"input_size": list(cfg.input_size), "channels": "gray" if cfg.in_channels == 1 else "rgb",
                         "mean": [0.0] * cfg.in_channels, "std": [1.0] * cfg.in_channels}
    # The engine takes over the network it runs (eval mode, heads fused in place, its device).
    copy = _MeasuredNet(net=runtime_layout(deepcopy(net)), preprocessing=dict(preprocessing))
    engine = StagedEngine(copy, device, allow_cpu_fallback=False)
    calibration = engine.calibrate(warmup=warmup, iterations=reps).to_calibration()
    block, head = calibration.stage_costs("median")
    block_mean, head_mean = calibration.stage_costs("mean")
    return {"device": engine.device_label, "batch_size": 1, "reps": reps, "statistic": "median",
            "heads": list(engine.head_kinds), "block_ms": block.tolist(), "head_ms": head.tolist(),
            "anytime_ms": anytime_ready_times(block, head).tolist(),
            "apriori_ms": apriori_ready_times(block, head).tolist(),
            "stage_p50_ms": (block + head).tolist(), "stage_mean_ms": (block_mean + head_mean).tolist(),
            "p50_ms": anytime_ready_times(block, head).tolist(),
            "mean_ms": anytime_ready_times(block_mean, head_mean).tolist(),
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}


@dataclass
class _MeasuredNet:
    """What StagedEngine reads of a loaded checkpoint, for a network that has none yet."""

    net: ImpatientNet
    preprocessing: dict[str, Any]
    class_names: list[str] = field(default_factory=list)


def parameter_checksum(net: nn.Module) -> dict[str, Any]:
    """sha256 over every parameter's bytes (in name order) and their float64 sum: equal weights, equal digest."""
    h = hashlib.sha256()
    total = 0.0
    for name, p in sorted(_unwrap(net).named_parameters()):
        data = p.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(data.numpy().tobytes())
        total += float(data.double().sum())
    return {"sha256": h.hexdigest(), "sum": total}


# --------------------------------------------------------------------------- data loaders


def _loader_kwargs(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    workers = cfg.data.workers
    if workers is None:
        # In-memory tensors need no workers (they would only compete for the cores);
        # image files need decoding in parallel.
        workers = 0 if cfg.data.dataset == "fashion-mnist" else min(4, os.cpu_count() or 1)
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw["persistent_workers"] = True
    return kw


def _make_loaders(bundle: DataBundle, cfg: TrainConfig, ctx: DistContext, device: torch.device
                  ) -> tuple[DataLoader, DistributedSampler, DataLoader | None, DataLoader | None]:
    kw = _loader_kwargs(cfg, device)
    # A DistributedSampler also on one process: its order depends only on (seed, epoch),
    # which makes resumed runs shuffle exactly like uninterrupted ones.
    sampler = DistributedSampler(bundle.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    train_loader = DataLoader(bundle.train, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=False, **kw)

    def eval_loader(ds: Dataset | None) -> DataLoader | None:
        if ds is None:
            return None
        return DataLoader(ds, batch_size=cfg.data.eval_batch_size, sampler=ShardSampler(len(ds), ctx), **kw)

    return train_loader, sampler, eval_loader(bundle.val), eval_loader(bundle.test)


def _load_bundle(cfg: TrainConfig, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augmentation: str | None = None) -> DataBundle:
    d = cfg.data
    if mean is None and d.mean is None and cfg.model.pretrained:
        # Pretrained weights expect the statistics they were trained with.
        from impatient_ros.runtime.backbones import pretrained_mean_std

        channels = d.channels or ("gray" if d.dataset == "fashion-mnist" else "rgb")
        stats = pretrained_mean_std(cfg.model.backbone, 1 if channels == "gray" else 3)
        if stats is not None:
            mean, std = stats
    return load_data(d.dataset, d.data_dir, input_size=d.input_size, channels=d.channels,
                     mean=mean if mean is not None else d.mean, std=std if std is not None else d.std,
                     val_split=d.val_split, train_per_class=d.train_per_class, test_per_class=d.test_per_class,
                     augmentation=augmentation or d.augmentation, seed=cfg.seed)


# --------------------------------------------------------------------------- resume file


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as plain types and tensors (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _load_resume(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--resume: no resume file at {path}; start without --resume or point --out at the run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--resume: cannot read {path} ({exc}); it is damaged or not a resume file") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT or state.get("version") != RESUME_VERSION:
        raise ConfigError(f"--resume: {path} is not a version-{RESUME_VERSION} {RESUME_FORMAT} file")
    saved_model = state["config"].get("model")
    if saved_model != cfg.to_dict()["model"]:
        raise ConfigError(f"--resume: {path} holds a {saved_model} network but the config asks for "
                          f"{cfg.to_dict()['model']}; use the run's config.yaml (--config {path.parent}/config.yaml)")
    return state


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a run produced (rank 0 fills the paths)."""

    out: Path
    last: Path | None = None
    best: Path | None = None
    epochs_done: int = 0
    best_metric: float | None = None
    val_exit_accuracy: list[float] | None = None
    test_exit_accuracy: list[float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _expected(acc: Sequence[float], weights: Sequence[float]) -> float:
    return expected_accuracy(np.clip(np.asarray(acc), 0.0, 1.0), np.asarray(weights))


RUN_FILES = ("last.pt", "last.pt.sha256", "best.pt", "best.pt.sha256", "resume.pt", "metrics.jsonl")


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    checksum_file: str | Path | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Run the training described by ``cfg`` (validated); works alone or under torchrun.

    ``resume`` continues from ``<out>/resume.pt``; a fresh run refuses an
    ``out`` folder that already holds a run unless ``overwrite`` (which
    deletes that run's checkpoints and metrics); ``stop_after`` ends the run
    after that epoch number as if interrupted (resume later); ``checksum_file``
    makes every rank write ``<file>.rank<R>.json`` with its final parameter
    checksum (to check that ranks agree).
    """
    cfg.validate()
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    ctx = init_distributed(use_cuda)
    try:
        _prepare_out(Path(cfg.out), ctx, resume=resume, overwrite=overwrite)
        return _train(cfg, ctx, resume=resume, stop_after=stop_after, checksum_file=checksum_file, progress=progress)
    finally:
        shutdown(ctx)


def _prepare_out(out: Path, ctx: DistContext, *, resume: bool, overwrite: bool) -> None:
    """Keep a fresh run from mixing its files with an earlier run's (a stale best.pt would be deployed)."""
    if resume:
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        # Checked on every rank (same file system), so all of them stop together.
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume, "
                          f"pick another --out, or replace it with --overwrite")
    if existing and ctx.is_main:
        for name in existing:
            (out / name).unlink()
    if ctx.enabled:
        torch.distributed.barrier()


@dataclass
class _Run:
    """Everything one run builds before its first epoch."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    amp: tuple[bool, torch.dtype, bool]
    bundle: DataBundle
    net: ImpatientNet  # the bare network (checkpoints, evaluation)
    model: nn.Module  # what trains: the network, or its DDP wrapper
    budget: dict[str, Any]
    loss_fn: JointLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    sampler: DistributedSampler
    val_loader: DataLoader | None
    test_loader: DataLoader | None
    exit_cost: dict[str, Any] | None = None
    frozen_norms: list[nn.Module] = field(default_factory=list)  # training.recipe.frozen_norms
    best_metric: float | None = None
    best_epoch: int | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def _setup(cfg: TrainConfig, ctx: DistContext) -> _Run:
    """Data, network, budget weights, optimiser, schedule and loaders of a run."""
    device = resolve_device(cfg.device, ctx)
    seed_everything(cfg.seed, cfg.deterministic)
    amp = amp_settings(cfg.amp, device)
    bundle = _load_bundle(cfg)
    pre = bundle.preprocessing
    log.info("data: %s; train %d, val %d, test %d images, %d classes, input %s %s", bundle.info.get("root"),
             bundle.info["train"], bundle.info["val"], bundle.info["test"], bundle.num_classes,
             "x".join(map(str, pre["input_size"])), pre["channels"])
    net_config = NetConfig(backbone=cfg.model.backbone, num_classes=bundle.num_classes, head=cfg.model.head,
                           in_channels=1 if pre["channels"] == "gray" else 3, input_size=tuple(pre["input_size"]),
                           pretrained=cfg.model.pretrained, own_classifier_last=cfg.model.own_classifier_last)
    try:
        net = build_network(net_config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    budget = cfg.budget.resolve(net.num_stages)
    log.info("model: %s (%d exits, %.2f M parameters); %s", cfg.model.backbone, net.num_stages,
             sum(p.numel() for p in net.parameters()) / 1e6, describe(cfg))
    weights = [round(w, 4) for w in budget["weights"]]
    if budget["scheme"] == "distribution":
        log.info("budget %s, ready times %s ms: exit weights %s; mass before t_1 (no answer): %.4f",
                 budget["spec"], [round(t, 3) for t in budget["ready_times_ms"]], weights,
                 budget["mass_before_first"])
    else:
        log.info("budget scheme %s: exit weights %s", budget["scheme"], weights)

    exit_cost = None
    fast_layout(net.to(device), device)
    if cfg.measure_cost and ctx.is_main:
        exit_cost = measure_exit_cost(net, device, preprocessing=bundle.preprocessing)
        log.info("exit cost on %s: ready after %s ms (anytime, median)", exit_cost["device"],
                 [round(v, 3) for v in exit_cost["anytime_ms"]])
    model: nn.Module = net
    if ctx.enabled:
        # DDP broadcasts rank 0's initial weights, so every rank starts from the same network.
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # Different augmentation per rank; the seed of rank 0 stays the single-process seed.
    torch.manual_seed(cfg.seed + 1000 * ctx.rank + 1)

    train_loader, sampler, val_loader, test_loader = _make_loaders(bundle, cfg, ctx, device)
    steps = len(train_loader)
    if cfg.optim.max_steps_per_epoch is not None:
        steps = min(steps, cfg.optim.max_steps_per_epoch)
    optimizer = build_optimizer(net, cfg)
    return _Run(cfg=cfg, ctx=ctx, device=device, amp=amp, bundle=bundle, net=net, model=model, budget=budget,
                loss_fn=JointLoss(budget["weights"], cfg.optim.label_smoothing, cfg.distill, cfg.distill_weight,
                                  cfg.distill_temperature, cfg.distill_teacher),
                optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, steps),
                scaler=torch.amp.GradScaler(device.type, enabled=amp[2]), train_loader=train_loader,
                sampler=sampler, val_loader=val_loader, test_loader=test_loader, exit_cost=exit_cost)


def _adopt_heads(run: _Run, kinds: Sequence[str | None]) -> bool:
    """Give the run's network the EP head ``kinds`` (the LP-FT start may choose other pooling grids); True if any changed."""
    changed = [k for k, (old, new) in enumerate(zip(run.net.head_kinds(), kinds)) if old != new and new is not None]
    for k in changed:
        run.net.replace_head(k, kinds[k])
    if changed:
        _rebuild_optimisation(run)
    return bool(changed)


def _rebuild_optimisation(run: _Run) -> None:
    """Optimiser, schedule and DDP wrapper built again around the network's current parameters.

    After heads were replaced (new parameters): before the first step, or
    before resume loads the saved states into them.
    """
    fast_layout(run.net.to(run.device), run.device)
    if run.ctx.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    steps = len(run.train_loader)
    if run.cfg.optim.max_steps_per_epoch is not None:
        steps = min(steps, run.cfg.optim.max_steps_per_epoch)
    run.optimizer = build_optimizer(run.net, run.cfg)
    run.scheduler = build_scheduler(run.optimizer, run.cfg, steps)


def _restore(run: _Run) -> int:
    """Load ``<out>/resume.pt`` into the run; return the number of epochs already done."""
    state = _load_resume(run.out / "resume.pt", run.cfg)
    kinds = state.get("head_kinds")
    if kinds is not None:  # the LP-FT start may have changed some heads' pooling before the run was saved
        _adopt_heads(run, kinds)
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.best_metric, run.best_epoch = state["best_metric"], state["best_epoch"]
    if run.exit_cost is None:
        run.exit_cost = state.get("exit_cost")
    epoch = int(state["epoch"])
    rng, ctx = state["rng"], run.ctx
    if len(rng) == ctx.world_size:
        _set_rng_state(rng[ctx.rank])
    else:
        log.warning("resume: saved with %d process(es), now %d: augmentation RNG re-seeded", len(rng), ctx.world_size)
        torch.manual_seed(run.cfg.seed + 1000 * ctx.rank + 1 + epoch)
    log.info("resumed from %s after epoch %d (best %s)", run.out / "resume.pt", epoch, run.best_metric)
    return epoch


def _save_epoch(run: _Run, record: dict[str, Any], is_best: bool) -> None:
    """Rank 0: last.pt (and best.pt), resume.pt and the metrics line of a finished epoch."""
    rng_states = all_gather_objects(_rng_state(), run.ctx)  # a collective: every rank calls it
    if not run.ctx.is_main:
        return
    out = run.out
    description = {
        "class_names": run.bundle.class_names, "preprocessing": run.bundle.preprocessing, "budget": run.budget,
        "train_config": run.cfg.to_dict(), "exit_accuracy": record.get("val_exit_accuracy"),
        "exit_cost": run.exit_cost,
        "extra": {"epoch": record["epoch"], "data": dict(run.bundle.info),
                  "val_expected_accuracy": record.get("val_expected_accuracy")},
    }
    save_checkpoint(out / "last.pt", run.net, **description)
    if is_best:
        save_checkpoint(out / "best.pt", run.net, **description)
    _atomic_torch_save({
        "format": RESUME_FORMAT, "version": RESUME_VERSION, "epoch": record["epoch"],
        "model": {k: v.detach().cpu().contiguous() for k, v in run.net.state_dict().items()},
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "best_metric": run.best_metric, "best_epoch": run.best_epoch,
        "head_kinds": run.net.head_kinds(),
        "exit_cost": run.exit_cost, "rng": rng_states, "config": run.cfg.to_dict(),
    }, out / "resume.pt")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _run_epoch(run: _Run, epoch: int, progress: bool | None) -> tuple[dict[str, Any], bool]:
    """Train and validate epoch ``epoch`` (0-based); return its metrics record and whether it is the best."""
    cfg = run.cfg
    t0 = time.perf_counter()
    run.sampler.set_epoch(epoch)
    stats = train_one_epoch(run.model, run.train_loader, run.loss_fn, run.optimizer, run.scheduler, run.scaler,
                            run.device, epoch=epoch + 1, epochs=cfg.optim.epochs, amp=run.amp, ctx=run.ctx,
                            max_steps=cfg.optim.max_steps_per_epoch, progress=progress,
                            frozen_norms=run.frozen_norms)
    val = evaluate(run.model, run.val_loader, run.device, run.ctx, run.amp) if run.val_loader is not None else None
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
                              "train_loss": stats["loss"], "train_exit_accuracy": stats["exit_accuracy"],
                              "epoch_time_s": time.perf_counter() - t0}
    is_best = False
    line = (f"epoch {epoch + 1}/{cfg.optim.epochs}  lr {record['lr']:.4g}  loss {stats['loss']:.4f}  "
            f"train acc {_fmt_acc(stats['exit_accuracy'])}")
    if val is not None:
        # 'best' by the accuracy expected under the training budget, not by the last exit alone.
        metric = _expected(val["exit_accuracy"], run.budget["weights"])
        is_best = run.best_metric is None or metric > run.best_metric
        if is_best:
            run.best_metric, run.best_epoch = metric, epoch + 1
        record.update(val_exit_accuracy=val["exit_accuracy"], val_exit_loss=val["exit_loss"],
                      val_expected_accuracy=metric, best=is_best)
        line += f"  val acc {_fmt_acc(val['exit_accuracy'])}  E[acc] {100 * metric:.2f}"
    log.info(line + f"  {record['epoch_time_s']:.1f}s" + ("  *best*" if is_best else ""))
    return record, is_best


def _final_test(run: _Run) -> dict[str, Any]:
    """Test the checkpoint a user would deploy: best by validation, else the last weights."""
    chosen = "best.pt" if (run.out / "best.pt").is_file() else "last.pt"
    test_net = load_checkpoint(run.out / chosen, map_location=run.device).net
    test = evaluate(test_net, run.test_loader, run.device, run.ctx, run.amp)
    log.info("test accuracy of %s per exit: %s (%d images)", chosen, _fmt_acc(test["exit_accuracy"]), test["samples"])
    if run.ctx.is_main:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "test", "checkpoint": chosen, "test_exit_accuracy": test["exit_accuracy"],
                                "test_exit_loss": test["exit_loss"], "samples": test["samples"]}) + "\n")
    return test


def _lp_start_epoch(run: _Run) -> None:
    """Impatient recipe, pretrained backbone: EP heads = val-tuned probes, validated and saved as "epoch 0"."""
    kinds = run.net.head_kinds()
    if run.ctx.is_main:
        info = recipe.lp_start(run)  # may give heads another pooling grid (choose_pooling)
    # Every rank adopts rank 0's head kinds (new parameters: optimiser and DDP built again), then its weights.
    chosen = all_gather_objects(run.net.head_kinds(), run.ctx)[0]
    if not run.ctx.is_main:
        _adopt_heads(run, chosen)
    elif chosen != kinds:  # rank 0 holds the chosen heads already, with their probes
        _rebuild_optimisation(run)
        if run.exit_cost is not None:  # measured with the heads before
            run.exit_cost = measure_exit_cost(run.net, run.device, preprocessing=run.bundle.preprocessing)
    if run.ctx.enabled:  # every rank starts from rank 0's heads
        for p in list(run.net.heads.parameters()) + list(run.net.heads.buffers()):
            torch.distributed.broadcast(p.data, 0)
    val = evaluate(run.model, run.val_loader, run.device, run.ctx, run.amp) if run.val_loader is not None else None
    record: dict[str, Any] = {"epoch": 0, "lp_start": info if run.ctx.is_main else None}
    if val is None:
        return
    metric = _expected(val["exit_accuracy"], run.budget["weights"])
    run.best_metric, run.best_epoch = metric, 0
    record.update(val_exit_accuracy=val["exit_accuracy"], val_exit_loss=val["exit_loss"],
                  val_expected_accuracy=metric, best=True)
    log.info("epoch 0 (LP-FT start)  val acc %s  E[acc] %.2f  *best*", _fmt_acc(val["exit_accuracy"]), 100 * metric)
    _save_epoch(run, record, True)


def _train(cfg: TrainConfig, ctx: DistContext, *, resume: bool, stop_after: int | None,
           checksum_file: str | Path | None, progress: bool | None) -> TrainResult:
    if not ctx.is_main:
        log.setLevel(max(log.level, logging.WARNING))
    run = _setup(cfg, ctx)
    start_epoch = _restore(run) if resume else 0
    run.frozen_norms = recipe.frozen_norms(run.net, cfg)
    result = TrainResult(out=run.out, epochs_done=start_epoch, best_metric=run.best_metric)
    if ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run.out / "config.yaml")
    if start_epoch >= cfg.optim.epochs:
        log.info("nothing to do: %d of %d epochs already done", start_epoch, cfg.optim.epochs)
    if not resume and recipe.uses_lp_start(cfg):
        _lp_start_epoch(run)

    for epoch in range(start_epoch, cfg.optim.epochs):
        record, is_best = _run_epoch(run, epoch, progress)
        _save_epoch(run, record, is_best)
        result.history.append(record)
        result.epochs_done, result.best_metric = epoch + 1, run.best_metric
        result.val_exit_accuracy = record.get("val_exit_accuracy")
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.optim.epochs:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            break

    if ctx.is_main and result.epochs_done >= cfg.optim.epochs and start_epoch < cfg.optim.epochs:
        recipe.finalize(run)  # impatient recipe: refit + exit ensemble of best.pt, chosen on val
    if ctx.enabled:
        torch.distributed.barrier()  # rank 0 has written the files the other ranks may read next
    if ctx.is_main:
        result.last = run.out / "last.pt" if (run.out / "last.pt").is_file() else None
        result.best = run.out / "best.pt" if (run.out / "best.pt").is_file() else None
    if result.epochs_done >= cfg.optim.epochs and run.test_loader is not None:
        result.test_exit_accuracy = _final_test(run)["exit_accuracy"]
    if checksum_file is not None:
        path = Path(f"{checksum_file}.rank{ctx.rank}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": ctx.rank, "world_size": ctx.world_size, **parameter_checksum(run.net)}))
    return result


# --------------------------------------------------------------------------- --eval-only


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    data_dir: str | None = None,
    test_per_class: int | None = None,
    batch_size: int = 512,
    device: str = "auto",
    workers: int | None = None,
) -> dict[str, Any]:
    """Per-exit accuracy of a checkpoint on its dataset's ``split`` ("test" or "val").

    The data comes from the checkpoint's train_config (dataset, folder, split
    seed) and is preprocessed with the checkpoint's own preprocessing dict;
    ``data_dir`` points at the data on this machine if it moved.
    """
    if split not in ("test", "val"):
        raise ConfigError(f"unknown split {split!r}; valid splits: test, val")
    loaded = load_checkpoint(path, map_location="cpu")
    if not loaded.train_config:
        raise ConfigError(f"{path} has no train_config, so its dataset is unknown; evaluate it with your own loader")
    cfg = TrainConfig.from_dict(loaded.train_config)
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    cfg.data.test_per_class = test_per_class
    cfg.data.eval_batch_size = batch_size
    if workers is not None:
        cfg.data.workers = workers
    pre = loaded.preprocessing
    cfg.data.input_size, cfg.data.channels = list(pre["input_size"]), pre["channels"]
    bundle = _load_bundle(cfg, mean=pre["mean"], std=pre["std"], augmentation="none")
    if bundle.class_names != loaded.class_names:
        raise ConfigError(f"the data's classes {bundle.class_names} differ from the checkpoint's {loaded.class_names}")
    dataset = bundle.test if split == "test" else bundle.val
    if dataset is None:
        raise ConfigError(f"the {split} split is empty for {cfg.data.dataset} at {bundle.info.get('root')}")
    dev = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(cfg, dev))
    stats = evaluate(fast_layout(loaded.net.to(dev), dev), loader, dev)
    weights = (loaded.budget or {}).get("weights")
    stats["expected_accuracy"] = _expected(stats["exit_accuracy"], weights) if weights else None
    stats.update(split=split, checkpoint=str(path), class_names=loaded.class_names)
    return stats
