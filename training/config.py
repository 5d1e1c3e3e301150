"""Typed training configuration: dataclasses filled from grouped CLI options and an optional YAML file.

Precedence (lowest to highest): the dataclass defaults, then the YAML file
given with ``--config``, then options given on the command line. Only options
actually typed on the command line override the file (their argparse default
is ``SUPPRESS``), so ``--config run.yaml --lr 0.05`` changes the learning rate
and nothing else.

The YAML file has the layout of :meth:`TrainConfig.to_dict` (the
``config.yaml`` written next to every run's outputs can be fed back in)::

    model:  {backbone: smallcnn, head: avg4x4}
    data:   {dataset: fashion-mnist, val_split: 0.1, augmentation: light}
    optim:  {optimizer: sgd, lr: 0.1, epochs: 10}
    budget: {scheme: LIN}
    seed: 0

Every name with a fixed set of values (backbone, head, scheme, optimizer,
augmentation, dataset, AMP mode, ...) is checked in :meth:`TrainConfig.validate`
and rejected with the list of valid values; unknown YAML keys are rejected too.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from impatient_ros.core.budget import (
    CALIBRATION_KEYS,
    SCHEMES,
    BudgetError,
    budget_weights,
    check_ready_times,
    parse_distribution,
    ready_times_from_calibration,
    scheme_weights,
)
from impatient_ros.core.calibration import DEFAULT_KEY as DEFAULT_CALIBRATION_KEY
from .data import AUGMENTATIONS, CHANNELS, DATASETS, DataError, parse_val_split
from .recipe import RECIPES

__all__ = [
    "OPTIMIZERS",
    "AMP_MODES",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "BudgetConfig",
    "TrainConfig",
    "add_config_arguments",
    "config_from_args",
    "describe",
    "load_yaml",
    "save_yaml",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
DISTILL_TEACHERS: tuple[str, ...] = ("last", "ensemble")


class ConfigError(ValueError):
    """An invalid configuration value or file; the message names the option and the valid values."""


def _choice(value: Any, valid: Any, what: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid {what}s: {', '.join(map(str, valid))}")


@dataclass
class ModelConfig:
    """Network: backbone cut into stages, the EP head kind after each stage."""

    backbone: str = "smallcnn"
    head: str = "avg4x4"
    pretrained: bool = False
    own_classifier_last: bool = False


@dataclass
class DataConfig:
    """Data source, split, augmentation and loading.

    ``input_size``/``channels``/``mean``/``std`` left as None take the dataset's
    defaults (Fashion-MNIST: 28x28 gray, statistics of its training images;
    ImageFolder: 224x224 RGB, ImageNet statistics or the pretrained backbone's).
    ``val_split`` is a fraction (float < 1) or a count (int) per class.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    input_size: list[int] | None = None
    channels: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    val_split: float | int = 0.1
    train_per_class: int | None = None
    test_per_class: int | None = None
    augmentation: str = "light"
    batch_size: int = 128
    eval_batch_size: int = 512
    workers: int | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule: cosine decay after a linear warm-up, stepped every batch."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    max_steps_per_epoch: int | None = None
    # Learning rate of the backbone's blocks relative to lr (the EP heads always train at lr): below 1
    # keeps pretrained features closer to where they were when fine-tuning on little data; 0 trains only
    # the heads (the blocks' batch-norm statistics still follow the data in training mode).
    backbone_lr_scale: float = 1.0


@dataclass
class BudgetConfig:
    """Exit loss weights: an index ``scheme`` or, when ``distribution`` is set, paper Eq. 5.

    Eq. 5 needs the exits' ready times: ``ready_times_ms`` (one per exit) or a
    timing ``calibration`` file (anytime ready times, impatient_ros.core.ready_times:
    each block and head summarised by ``calibration_key``, the median ``p50_ms`` by default).
    A distribution overrides the scheme.
    """

    scheme: str = "EQ"
    gamma: float = 2.0
    beta: float = 0.34
    distribution: str | None = None
    ready_times_ms: list[float] | None = None
    calibration: str | None = None
    calibration_key: str = DEFAULT_CALIBRATION_KEY

    def resolve(self, num_exits: int) -> dict[str, Any]:
        """The checkpoint's budget record for ``num_exits`` exits (plain types).

        ``weights`` are the loss weights (sum 1). For a distribution the raw
        Eq. 5 weights are kept as ``eq5_weights`` and ``mass_before_first`` is
        the budget mass no exit can answer.
        """
        try:
            if self.distribution is None:
                scheme = self.scheme.strip().upper()
                w = scheme_weights(scheme, num_exits, gamma=self.gamma, beta=self.beta)
                record: dict[str, Any] = {"scheme": scheme, "weights": [float(v) for v in w],
                                          "distribution": None, "mass_before_first": 0.0}
                if scheme in ("POLY", "IPOLY"):
                    record["gamma"] = float(self.gamma)
                if scheme == "NORM":
                    record["beta"] = float(self.beta)
                return record
            dist = parse_distribution(self.distribution)
            if self.calibration is not None:
                ready = ready_times_from_calibration(self.calibration, key=self.calibration_key)
            else:
                ready = check_ready_times(self.ready_times_ms or [])
            if ready.size != num_exits:
                raise ConfigError(f"{ready.size} ready time(s) for a network with {num_exits} exits; "
                                  f"give one ready time per exit (ms) or a calibration of this network")
            bw = budget_weights(dist, ready)
            return {"scheme": "distribution", "weights": [float(v) for v in bw.normalized()],
                    "eq5_weights": [float(v) for v in bw.weights], "distribution": dict(bw.distribution),
                    "spec": self.distribution, "ready_times_ms": [float(v) for v in ready],
                    "mass_before_first": float(bw.mass_before_first)}
        except BudgetError as exc:
            raise ConfigError(f"budget: {exc}") from None


@dataclass
class TrainConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    out: str = "runs/train"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"
    distill: bool = False
    distill_weight: float = 0.5
    distill_temperature: float = 3.0
    # Whose answer the exits distil from: "last" (the last exit, IMTA) or "ensemble" (the detached
    # geometric mean of every exit's tempered probabilities; every exit, the last included, learns from it).
    distill_teacher: str = "last"
    measure_cost: bool = False
    # "impatient": LP-FT start for pretrained backbones, joint fine-tuning, post-hoc head refit and exit
    # ensembles, each kept only where validation supports it; "paper": Amthor et al. as published
    # (training.recipe).
    recipe: str = "impatient"
    # Impatient recipe: the post-hoc head refit fits its probes on at most this many training images per class
    # (a seeded random subset; None = all). Probe fitting grows with images x feature size; on the full
    # Fashion-MNIST training set it costs minutes of CPU (bench/train_default.py).
    refit_train_per_class: int | None = None
    # Impatient recipe: the LP-FT start and the head refit also choose each average-pooling head's grid
    # (avg, avg2x2, avg4x4, avg7x7, avg8x8) on validation data, as they choose the probe's C (training.probes).
    choose_pooling: bool = True

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a (possibly partial) nested dict; unknown keys and ill-typed values raise ConfigError."""
        return _from_dict(cls, data, "")

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every value; return self. Raises ConfigError naming the option and the valid values."""
        from impatient_ros.runtime.backbones import BackboneUnavailableError, check_backbone_name
        from impatient_ros.runtime.model import list_backbones, list_heads

        m, d, o, b = self.model, self.data, self.optim, self.budget
        try:
            check_backbone_name(m.backbone)
        except BackboneUnavailableError as exc:
            raise ConfigError(str(exc)) from None
        except ValueError:
            _choice(m.backbone, list_backbones(), "backbone")
        _choice(m.head, list_heads(), "head")

        _choice(d.dataset, DATASETS, "dataset")
        _choice(d.augmentation, AUGMENTATIONS, "augmentation preset")
        if d.channels is not None:
            _choice(d.channels, tuple(CHANNELS), "channels value")
        if d.input_size is not None and len(d.input_size) == 1:
            d.input_size = [d.input_size[0], d.input_size[0]]  # one number: a square
        if d.input_size is not None and (len(d.input_size) != 2 or min(d.input_size) < 1):
            raise ConfigError(f"data.input_size must be [height, width] (positive), got {d.input_size}")
        if (d.mean is None) != (d.std is None):
            raise ConfigError("data.mean and data.std go together: give both or neither")
        if d.std is not None and not all(s > 0 for s in d.std):
            raise ConfigError(f"data.std must be > 0, got {d.std}")
        try:
            d.val_split = parse_val_split(d.val_split)
        except DataError as exc:
            raise ConfigError(f"data.val_split: {exc}") from None
        _positive(d.batch_size, "data.batch_size")
        _positive(d.eval_batch_size, "data.eval_batch_size")
        for name in ("train_per_class", "test_per_class"):
            if getattr(d, name) is not None:
                _positive(getattr(d, name), f"data.{name}")
        if d.workers is not None and d.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {d.workers}")
        if d.dataset == "imagefolder" and not d.data_dir:
            raise ConfigError("data.dataset imagefolder needs data.data_dir (--data-dir): one sub-folder per class")

        _choice(o.optimizer, OPTIMIZERS, "optimizer")
        if not (math.isfinite(o.lr) and o.lr > 0):
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optim.min_lr must be in [0, lr={o.lr}], got {o.min_lr}")
        _positive(o.epochs, "optim.epochs")
        if not 0 <= o.warmup_epochs <= o.epochs:
            raise ConfigError(f"optim.warmup_epochs must be in [0, epochs={o.epochs}], got {o.warmup_epochs}")
        if not 0 <= o.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
        if o.nesterov and o.momentum == 0:
            raise ConfigError("optim.nesterov needs momentum > 0")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if not (math.isfinite(o.backbone_lr_scale) and 0 <= o.backbone_lr_scale <= 10):
            raise ConfigError(f"optim.backbone_lr_scale must be in [0, 10], got {o.backbone_lr_scale}")
        if not 0 <= o.label_smoothing < 1:
            raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
        if o.max_steps_per_epoch is not None:
            _positive(o.max_steps_per_epoch, "optim.max_steps_per_epoch")

        _choice(b.scheme.strip().upper() if isinstance(b.scheme, str) else b.scheme, SCHEMES, "scheme")
        b.scheme = b.scheme.strip().upper()
        _choice(b.calibration_key, CALIBRATION_KEYS, "calibration key")
        if b.distribution is None:
            if b.ready_times_ms is not None or b.calibration is not None:
                raise ConfigError("budget ready times / calibration are only used with budget.distribution "
                                  "(--budget-distribution); give a distribution or drop them")
            try:
                scheme_weights(b.scheme, 2, gamma=b.gamma, beta=b.beta)  # checks gamma/beta where used
            except BudgetError as exc:
                raise ConfigError(f"budget: {exc}") from None
        else:
            try:
                parse_distribution(b.distribution)
                if b.ready_times_ms is not None:
                    check_ready_times(b.ready_times_ms)
            except BudgetError as exc:
                raise ConfigError(f"budget: {exc}") from None
            if (b.ready_times_ms is None) == (b.calibration is None):
                raise ConfigError("budget.distribution needs the exits' ready times: give exactly one of "
                                  "--ready-times MS... or --calibration FILE")
            if b.calibration is not None and not Path(b.calibration).is_file():
                raise ConfigError(f"budget.calibration file not found: {b.calibration}")

        _choice(self.amp, AMP_MODES, "AMP mode")
        _choice(self.recipe, RECIPES, "recipe")
        if self.refit_train_per_class is not None and (isinstance(self.refit_train_per_class, bool)
                                                       or self.refit_train_per_class < 1):
            raise ConfigError(f"refit_train_per_class must be None or >= 1, got {self.refit_train_per_class!r}")
        if not isinstance(self.choose_pooling, bool):
            raise ConfigError(f"choose_pooling must be true or false, got {self.choose_pooling!r}")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                           and self.device[5:].isdigit())):
            raise ConfigError(f"unknown device {self.device!r}; valid devices: auto, cpu, cuda, cuda:N")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        _choice(self.distill_teacher, DISTILL_TEACHERS, "distillation teacher")
        if not self.out:
            raise ConfigError("out must name an output folder")
        return self


def _positive(value: int, name: str) -> None:
    if not value >= 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------- typed dict -> dataclass


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'the config'}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
            kwargs[name] = _from_dict(hint, data[name], path)
        else:
            kwargs[name] = _coerce(data[name], hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the annotated type (str -> number as YAML 1.1 reads "1e-3" as text)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be empty")
        if set(args) - {type(None)} == {float, int}:
            try:
                return parse_val_split(value)
            except DataError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug here, not a user error


# --------------------------------------------------------------------------- YAML


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML file (a mapping; an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, optim, budget, ...)")
    return data


def save_yaml(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML (the layout ``--config`` reads back)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def _merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


# --------------------------------------------------------------------------- argparse


def _size(text: str) -> int:
    return int(text)


def _default(section: str | None, name: str, none_text: str) -> Any:
    cfg = TrainConfig()
    value = getattr(getattr(cfg, section) if section else cfg, name)
    return none_text if value is None else value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the grouped config options; their dests are dotted config paths ("optim.lr")."""
    S = argparse.SUPPRESS

    def opt(group: argparse._ArgumentGroup, flag: str, section: str | None, name: str, help: str,
            none: str = "dataset default", **kw: Any) -> None:
        dest = f"{section}.{name}" if section else name
        help = f"{help} (default: {_default(section, name, none)})"
        if kw.get("type") is float and "nargs" not in kw:
            kw.setdefault("metavar", "X")
        group.add_argument(flag, dest=dest, default=S, help=help, **kw)

    from impatient_ros.runtime.model import list_backbones, list_heads  # noqa: PLC0415  (torch import is needed anyway)

    g = parser.add_argument_group("model")
    opt(g, "--backbone", "model", "backbone", f"backbone: {', '.join(list_backbones())}", metavar="NAME")
    opt(g, "--head", "model", "head", f"early-prediction head: {', '.join(list_heads())}", metavar="KIND")
    opt(g, "--pretrained", "model", "pretrained", "start from cached pretrained backbone weights",
        action=argparse.BooleanOptionalAction)
    opt(g, "--own-classifier-last", "model", "own_classifier_last",
        "last exit = the backbone's own classifier instead of an EP head", action=argparse.BooleanOptionalAction)

    g = parser.add_argument_group("data")
    opt(g, "--dataset", "data", "dataset", f"data source: {', '.join(DATASETS)}", metavar="NAME")
    opt(g, "--data-dir", "data", "data_dir", "folder of the IDX files or of the ImageFolder tree",
        none="$IMPATIENT_FASHION_MNIST or /usr/share/datasets/fashion-mnist", metavar="DIR")
    opt(g, "--input-size", "data", "input_size", "network input size: H W, or one number for square",
        nargs="+", type=_size, metavar="N")
    opt(g, "--channels", "data", "channels", "gray or rgb", metavar="C")
    opt(g, "--mean", "data", "mean", "normalisation mean per channel (0..1 scale)", nargs="+", type=float, metavar="M")
    opt(g, "--std", "data", "std", "normalisation std per channel (0..1 scale)", nargs="+", type=float, metavar="S")
    opt(g, "--val-split", "data", "val_split", "validation images per class: fraction (0.1) or count (500)",
        metavar="F|N")
    opt(g, "--train-per-class", "data", "train_per_class", "keep at most N training images per class",
        none="all", type=int, metavar="N")
    opt(g, "--test-per-class", "data", "test_per_class", "evaluate on at most N test images per class (quick checks)",
        none="all", type=int, metavar="N")
    opt(g, "--augmentation", "data", "augmentation", f"training augmentation: {', '.join(AUGMENTATIONS)}",
        metavar="PRESET")
    opt(g, "--batch-size", "data", "batch_size", "training batch size (per process)", type=int, metavar="N")
    opt(g, "--eval-batch-size", "data", "eval_batch_size", "evaluation batch size", type=int, metavar="N")
    opt(g, "--workers", "data", "workers", "data loader workers",
        none="0 in memory, 4 for image files", type=int, metavar="N")

    g = parser.add_argument_group("optimisation")
    opt(g, "--optimizer", "optim", "optimizer", f"optimizer: {', '.join(OPTIMIZERS)}", metavar="NAME")
    opt(g, "--lr", "optim", "lr", "peak learning rate (per total batch)", type=float)
    opt(g, "--momentum", "optim", "momentum", "SGD momentum / AdamW beta1", type=float)
    opt(g, "--nesterov", "optim", "nesterov", "Nesterov momentum (SGD)", action=argparse.BooleanOptionalAction)
    opt(g, "--weight-decay", "optim", "weight_decay", "weight decay (never on batch-norm and bias)", type=float)
    opt(g, "--epochs", "optim", "epochs", "training epochs", type=int, metavar="N")
    opt(g, "--warmup-epochs", "optim", "warmup_epochs", "linear warm-up length in epochs (may be fractional)",
        type=float, metavar="E")
    opt(g, "--min-lr", "optim", "min_lr", "learning rate at the end of the cosine decay", type=float)
    opt(g, "--label-smoothing", "optim", "label_smoothing", "label smoothing of the cross-entropy", type=float)
    opt(g, "--backbone-lr-scale", "optim", "backbone_lr_scale",
        "learning rate of the backbone's blocks relative to --lr (heads: --lr); 0 = train only the heads",
        type=float, metavar="S")
    opt(g, "--max-steps-per-epoch", "optim", "max_steps_per_epoch", "stop each epoch after N steps (smoke tests)",
        none="no limit", type=int, metavar="N")

    g = parser.add_argument_group("budget (exit loss weights)")
    opt(g, "--scheme", "budget", "scheme", f"index weighting scheme: {', '.join(SCHEMES)}", metavar="NAME")
    opt(g, "--gamma", "budget", "gamma", "exponent of POLY/IPOLY", type=float)
    opt(g, "--beta", "budget", "beta", "width of NORM", type=float)
    opt(g, "--budget-distribution", "budget", "distribution",
        "time-budget distribution for Eq. 5, e.g. uniform:2,20, normal:10,3, exponential:8, gamma:2,4, "
        "empirical:budgets.csv (overrides --scheme)", none="none: use --scheme", metavar="SPEC")
    opt(g, "--ready-times", "budget", "ready_times_ms", "ms at which each exit is ready (one per exit)",
        none="none", nargs="+", type=float, metavar="MS")
    opt(g, "--calibration", "budget", "calibration", "timing calibration JSON giving the ready times", none="none",
        metavar="FILE")
    opt(g, "--calibration-key", "budget", "calibration_key", "statistic of each block and head that the ready times "
        f"sum: {', '.join(CALIBRATION_KEYS)} (p50_ms: the median)", metavar="KEY")

    g = parser.add_argument_group("training")
    opt(g, "--out", None, "out", "output folder (last.pt, best.pt, config.yaml, metrics.jsonl)", metavar="DIR")
    opt(g, "--seed", None, "seed", "random seed (split, initialisation, shuffling)", type=int, metavar="N")
    opt(g, "--deterministic", None, "deterministic", "deterministic algorithms (slower; bit-reproducible)",
        action=argparse.BooleanOptionalAction)
    opt(g, "--device", None, "device", "auto, cpu, cuda or cuda:N", metavar="DEV")
    opt(g, "--amp", None, "amp", f"mixed precision on GPU: {', '.join(AMP_MODES)} (always off on CPU)", metavar="MODE")
    opt(g, "--distill", None, "distill", "self-distillation from the last exit into the earlier ones (IMTA)",
        action=argparse.BooleanOptionalAction)
    opt(g, "--distill-weight", None, "distill_weight", "share of the distillation term in an early exit's loss",
        type=float, metavar="A")
    opt(g, "--distill-temperature", None, "distill_temperature", "softmax temperature of the distillation",
        type=float, metavar="T")
    opt(g, "--distill-teacher", None, "distill_teacher", "whose answer the exits distil from: last (the last "
        "exit) or ensemble (the geometric mean of every exit, distilled into every exit)", metavar="NAME")
    opt(g, "--measure-cost", None, "measure_cost", "measure per-exit latency here and store it as exit_cost",
        action=argparse.BooleanOptionalAction)
    opt(g, "--recipe", None, "recipe", "impatient (LP-FT start when pretrained, joint fine-tuning, head refit, "
        "exit ensemble; every lever chosen on val) or paper (the published recipe)", metavar="NAME")
    opt(g, "--refit-train-per-class", None, "refit_train_per_class", "impatient recipe: fit the head-refit probes "
        "on at most N training images per class (seeded random subset; default: all)", type=int, metavar="N")
    opt(g, "--choose-pooling", None, "choose_pooling", "impatient recipe: the LP-FT start and the head refit also "
        "choose each average-pooling head's grid (avg, avg2x2, avg4x4, avg7x7, avg8x8) on val",
        action=argparse.BooleanOptionalAction)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < YAML (``args.config``) < options typed on the command line; validated."""
    merged = TrainConfig().to_dict()
    config_path = getattr(args, "config", None)
    if config_path:
        _merge(merged, load_yaml(config_path))
    overrides: dict[str, Any] = {}
    section_names = {f.name for f in fields(TrainConfig)}
    for dest, value in vars(args).items():
        head, _, tail = dest.partition(".")
        if head not in section_names:
            continue  # run options (config, resume, eval_only, ...) are not part of the config
        if tail:
            overrides.setdefault(head, {})[tail] = value
        else:
            overrides[head] = value
    _merge(merged, overrides)
    return TrainConfig.from_dict(merged).validate()


def describe(config: TrainConfig) -> str:
    """One-line summary for logs."""
    m, o, b = config.model, config.optim, config.budget
    budget = b.distribution if b.distribution else b.scheme
    return (f"{m.backbone}/{m.head} on {config.data.dataset}, {o.optimizer} lr {o.lr} x {o.epochs} epochs, "
            f"budget {budget}, seed {config.seed}")

