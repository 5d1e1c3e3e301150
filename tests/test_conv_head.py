"""The MSDNet-style ``conv`` EP head: shapes on every backbone family, fusion, checkpoints, the engine, its cost.

Timing follows the fake clock (tests/fake_clock.py): the head's parts "take"
known times, so what the calibration measures is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impatient_ros.core.ready_times import anytime_ready_times, apriori_ready_times
from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.engine import Mode, StagedEngine
from impatient_ros.runtime.fusion import FusedConvHead, fuse_head, fuse_heads
from impatient_ros.runtime.heads import ConvHead, make_head
from impatient_ros.runtime.model import NetConfig, build_network, list_backbones, list_heads
from tests.fake_clock import FakeClock

MS = 1e-3
GRAY = {"input_size": [16, 16], "channels": "gray", "mean": [0.5], "std": [0.25]}
# One backbone of each family (its stage code path); tiny inputs as in test_model.py. AlexNet builds its
# 58M-parameter classifier (about 10 s here): slow tier, like test_model.py's full backbone x head matrix.
FAMILIES = ["smallcnn_tiny", pytest.param("alexnet", marks=pytest.mark.slow), "vgg11_bn", "resnet18",
            "mobilenet_v3_small"] + (["efficientnet_lite0"] if "efficientnet_lite0" in list_backbones() else [])


def _config(backbone: str, **kwargs) -> NetConfig:
    if backbone.startswith("smallcnn"):
        kwargs.setdefault("in_channels", 1)
        kwargs.setdefault("input_size", (28, 28))
    else:
        kwargs.setdefault("input_size", (64, 64))
    return NetConfig(backbone=backbone, num_classes=5, head="conv", **kwargs)


def _trained_like(head: ConvHead, shape: tuple[int, int, int]) -> ConvHead:
    """Non-trivial batch-norm statistics and affine parameters in both of the head's norms, eval mode."""
    with torch.no_grad():
        head.train()
        for _ in range(3):
            head(torch.randn(16, *shape) * 3 + 1)
        for norm in (head.conv_norm, head.norm):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    return head.eval()


def _tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    net = build_network(NetConfig("smallcnn_tiny", 4, head="conv", in_channels=1, input_size=(16, 16)))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 16, 16))  # batch-norm statistics away from their defaults
    return net.eval()


def _checkpoint(tmp_path, net):
    return save_checkpoint(tmp_path / "conv.pt", net, class_names=["a", "b", "c", "d"], preprocessing=GRAY,
                           budget={"scheme": "EQ", "weights": [0.25] * 4}, exit_accuracy=[0.4, 0.5, 0.6, 0.7])


# --------------------------------------------------------------------------- the head


def test_conv_is_a_head_kind_everywhere_a_head_is_chosen():
    from training.config import TrainConfig  # its head choices come from list_heads

    assert "conv" in list_heads()
    NetConfig("smallcnn_tiny", 10, head="conv", in_channels=1, input_size=(28, 28))  # validates
    cfg = TrainConfig()
    cfg.model.head = "conv"
    cfg.validate()


@pytest.mark.parametrize("in_channels, hw, width, stride", [
    (16, (28, 28), 16, 2),     # a large map: strided, as MSDNet's head convolutions
    (64, (7, 7), 64, 1),       # a small map keeps its resolution for the 4x4 grid
    (512, (16, 15), 128, 1),   # width capped; the smaller side decides the stride
    (2048, (16, 16), 128, 2),
])
def test_conv_head_width_and_stride(in_channels, hw, width, stride):
    head = make_head("conv", in_channels, hw, 10)
    assert isinstance(head, ConvHead)
    assert (head.conv.in_channels, head.conv.out_channels, head.conv.stride) == (in_channels, width, (stride, stride))
    assert head.conv.bias is None  # the batch norm after it has the shift
    assert head.fc.in_features == 16 * width
    x = torch.randn(2, in_channels, *hw)
    head.eval()
    with torch.no_grad():
        assert head.features(x).shape == (2, 16 * width)
        assert head(x).shape == (2, 10)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_conv_heads_on_every_backbone_family(backbone):
    torch.manual_seed(0)
    config = _config(backbone)
    net = build_network(config).eval()
    x = torch.randn(2, config.in_channels, *config.input_size)
    with torch.no_grad():
        outs = net(x)
        h = x
        for k, (c, hh, ww) in enumerate(net.stage_output_shapes()):
            head = net.heads[k]
            assert isinstance(head, ConvHead)
            assert head.conv.in_channels == c and head.conv.out_channels == min(c, 128)
            h = net.run_block(k, h)
            assert head.features(h).shape == (2, 16 * min(c, 128))
            assert outs[k].shape == (2, 5) and torch.isfinite(outs[k]).all()


def test_every_conv_head_parameter_gets_a_gradient():
    net = _tiny_net().train()
    outs = net(torch.randn(4, 1, 16, 16))
    sum(torch.nn.functional.cross_entropy(o, torch.arange(4)) for o in outs).backward()
    for name, p in net.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("shape, how", [
    ((8, 2, 2), "avg4x4 (dense)"),            # conv output 2x2: the grid repeats cells
    ((4, 4, 4), "avg4x4 (identity pool)"),    # stride 1 on 4x4: pooling is the identity
    ((16, 8, 8), "avg4x4 (dense)"),
    ((8, 7, 5), "avg4x4 (dense)"),
    ((32, 32, 32), "avg4x4 (pooled)"),        # stride 2 -> 32 x 16 x 16: too large for one dense product
])
def test_fused_conv_head_equals_trained_head(shape, how):
    torch.manual_seed(0)
    head = _trained_like(make_head("conv", shape[0], shape[1:], 10), shape)
    fused = fuse_head(head, shape)
    assert isinstance(fused, FusedConvHead)
    assert fused.kind == f"conv (folded) + {how}"
    assert not any(p.requires_grad for p in fused.parameters())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected, got = head(x), fused(x)
    assert got.shape == expected.shape == (3, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_conv_network_matches_eager_network():
    net = _tiny_net(1)
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = net(x)
        kinds = fuse_heads(net)
        got = net(x)
    assert all(k.startswith("conv (folded)") for k in kinds)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_conv_checkpoint_round_trip(tmp_path):
    net = _tiny_net(2)
    path = _checkpoint(tmp_path, net)
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["net_config"]["head"] == "conv"
    assert any(key.startswith("heads.0.conv.") for key in raw["state_dict"])
    loaded = load_checkpoint(path)
    assert loaded.config.head == "conv" and isinstance(loaded.net.heads[0], ConvHead)
    x = torch.randn(3, 1, 16, 16)
    loaded.net.eval()
    with torch.no_grad():
        for a, b in zip(loaded.net(x), net(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("fuse", [True, False])
def test_engine_runs_conv_heads(tmp_path, fuse):
    net = _tiny_net(3)
    path = _checkpoint(tmp_path, net)
    engine = StagedEngine(load_checkpoint(path), "cpu", fuse_heads=fuse)
    assert all(k.startswith("conv (folded) + avg4x4") for k in engine.head_kinds) if fuse else not engine.head_kinds
    assert len(engine.head_kinds) == (4 if fuse else 0)
    image = np.random.default_rng(0).integers(0, 255, size=(16, 16), endpoint=True).astype(np.uint8)
    report = engine.run(image, "gray", mode=Mode.ANYTIME)
    assert [r.stage for r in report.results] == [1, 2, 3, 4] and report.results[-1].is_final
    x = engine.preprocessor(image, "gray")
    with torch.no_grad():
        probs = [torch.softmax(z, dim=-1)[0].numpy() for z in net(x)]  # the eager, unfused network
    for r, p in zip(report.results, probs):
        np.testing.assert_allclose(r.probs, p, rtol=1e-4, atol=1e-5)
    apriori = engine.run(image, "gray", mode=Mode.APRIORI, max_stage=2)
    np.testing.assert_allclose(apriori.final.probs, probs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_conv_head_cost_is_measured_into_the_ready_times(tmp_path, fuse):
    """The calibration times the whole conv head: its convolution's cost shows in head_ms, t_A and t_B.

    Blocks and the heads' convolutions and tails get known costs on a fake clock
    (the convolution is the conv head's own part, hooked inside the head the engine
    calls), so the measured head cost must be conv + tail, exactly.
    """
    clock = FakeClock()
    engine = StagedEngine(load_checkpoint(_checkpoint(tmp_path, _tiny_net(4))), "cpu", fuse_heads=fuse,
                          clock=clock.now)
    block_ms, conv_ms, tail_ms = [1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.9, 1.1], [0.1, 0.1, 0.2, 0.2]

    def costs(ms):
        return lambda module, inputs, output: clock.advance(ms * MS)

    for k in range(engine.num_stages):
        head = engine.net.heads[k]
        assert isinstance(head, FusedConvHead if fuse else ConvHead)
        engine.net.blocks[k].register_forward_hook(costs(block_ms[k]))
        head.conv.register_forward_hook(costs(conv_ms[k]))
        (head.tail if fuse else head.fc).register_forward_hook(costs(tail_ms[k]))
    engine.calibrate(warmup=1, iterations=6)
    assert engine.last_calibration.stable
    block, head = engine.timing.to_calibration().stage_costs("median")
    want_head = np.add(conv_ms, tail_ms)
    np.testing.assert_allclose(block, block_ms, rtol=1e-9)
    np.testing.assert_allclose(head, want_head, rtol=1e-9)
    np.testing.assert_allclose(anytime_ready_times(block, head), np.cumsum(np.add(block_ms, want_head)), rtol=1e-9)
    np.testing.assert_allclose(apriori_ready_times(block, head), np.cumsum(block_ms) + want_head, rtol=1e-9)
    # The engine's a-priori admission predicts with the same head cost.
    for k in range(engine.num_stages):
        assert engine.timing.predict_exit_cost(k, 0.5) == pytest.approx((sum(block_ms[:k + 1]) + want_head[k]) * MS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp16, graphs, atol", [(False, True, 1e-4), (False, False, 1e-4), (True, True, 1e-2)],
                         ids=["fp32-graphs", "fp32-eager", "fp16-graphs"])
def test_cuda_engine_runs_conv_heads(tmp_path, fp16, graphs, atol):
    """The fused conv heads inside CUDA graphs (and in half precision) give the eager float32 network's answers."""
    net = _tiny_net(5)
    path = _checkpoint(tmp_path, net)
    engine = StagedEngine(load_checkpoint(path), "cuda", fp16=fp16, cuda_graphs=graphs)
    image = np.random.default_rng(1).integers(0, 255, size=(16, 16), endpoint=True).astype(np.uint8)
    x = engine.preprocessor(image, "gray").float().cpu()
    with torch.no_grad():
        eager = [torch.softmax(z, dim=-1)[0].numpy() for z in net(x)]
    for _ in range(2):  # graph replays must give fresh answers from the static buffers
        report = engine.run(image, "gray")
        for result, expected in zip(report.results, eager):
            np.testing.assert_allclose(result.probs, expected, atol=atol)
    engine.calibrate(warmup=2, iterations=10)
    assert all(engine.timing.head_cost(k, 0.5) > 0 for k in range(engine.num_stages))
