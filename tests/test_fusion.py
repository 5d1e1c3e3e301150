"""Fused EP heads (batch norm folded into the linear layer) and fused blocks (into the convolutions)
equal the trained modules they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.engine import StagedEngine
from impatient_ros.runtime.fusion import (FusedHead, call_layers_as_functions, fuse_block, fuse_blocks, fuse_head,
                                          fuse_heads, window_averages)
from impatient_ros.runtime.heads import make_head
from impatient_ros.runtime.model import NetConfig, build_network


def _trained_like(head: torch.nn.Module, shape: tuple[int, int, int]) -> torch.nn.Module:
    """A head with non-trivial batch-norm statistics and affine parameters, in eval mode."""
    with torch.no_grad():
        head.train()
        for _ in range(3):
            head(torch.randn(16, *shape) * 3 + 1)
        head.norm.weight.uniform_(0.5, 2.0)
        head.norm.bias.uniform_(-1.0, 1.0)
    return head.eval()


@pytest.mark.parametrize("kind", ["fc", "avg", "avg2x2", "avg4x4", "avg7x7", "avg8x8"])
@pytest.mark.parametrize("shape", [(8, 2, 2), (4, 4, 4), (16, 8, 8), (8, 7, 5), (8, 7, 7), (32, 16, 16)])
def test_fused_head_equals_trained_head(kind, shape):
    torch.manual_seed(0)
    head = _trained_like(make_head(kind, shape[0], shape[1:], 10), shape)
    fused = fuse_head(head, shape)
    assert isinstance(fused, FusedHead)
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.randn(3, *shape)  # a batch: the fused head is not tied to one image
    with torch.no_grad():
        expected, got = head(x), fused(x)
    assert got.shape == expected.shape == (3, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, how", [((4, 4, 4), "identity pool"), ((16, 8, 8), "dense"), ((64, 16, 16), "pooled")])
def test_fused_avg4x4_picks_the_cheaper_form(shape, how):
    head = _trained_like(make_head("avg4x4", shape[0], shape[1:], 10), shape)
    assert how in fuse_head(head, shape).kind


@pytest.mark.parametrize("shape, how", [((16, 8, 8), "dense"), ((32, 16, 16), "separable"), ((128, 8, 8), "dense"),
                                        ((16, 32, 32), "separable"), ((64, 14, 16), "separable"),
                                        ((64, 12, 9), "separable")])
def test_fused_avg7x7_on_an_uneven_map_is_dense_or_separable_and_exact(shape, how):
    # 7x7 windows on these maps overlap (at least in one direction): small maps go dense whatever the channels,
    # the others pool the rows by a matrix product with the columns folded in, never the overlapping-window kernel.
    head = _trained_like(make_head("avg7x7", shape[0], shape[1:], 10), shape)
    fused = fuse_head(head, shape)
    assert how in fused.kind
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, classes, how", [((256, 14, 14), 10, "separable"), ((256, 14, 14), 1000, "pooled"),
                                                 ((512, 7, 7), 1000, "pooled"), ((32, 14, 14), 100, "separable"),
                                                 ((32, 14, 14), 200, "pooled")])
def test_uneven_grid_with_many_classes_keeps_the_pool(shape, classes, how):
    # The separable form's linear layer holds C * g * (W - g) * classes more weights than the pooled one: with
    # 1000 classes on resnet18's deep maps it took 2-3.6x the pooled form's time, so those heads stay pooled.
    head = _trained_like(make_head("avg4x4", shape[0], shape[1:], classes), shape)
    fused = fuse_head(head, shape)
    assert how in fused.kind
    x = torch.randn(1, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), head(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(16, 32, 32), (24, 16, 16), (16, 28, 28), (32, 14, 14)])
def test_fused_avg8x8_is_exact_on_even_and_uneven_maps(shape):
    # 8x8 divides Lite0's 32/16-pixel maps at 64x64 input; on the small CNN's 28x28 and 14x14 maps its windows overlap.
    head = _trained_like(make_head("avg8x8", shape[0], shape[1:], 10), shape)
    fused = fuse_head(head, shape)
    assert fused.kind.startswith("avg8x8")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, grid", [(32, 7), (16, 7), (12, 7), (8, 4), (5, 2), (7, 7), (28, 8), (14, 8)])
def test_window_averages_are_adaptive_pooling(size, grid):
    x = torch.randn(3, 4, size, size, dtype=torch.float64)
    a = window_averages(size, grid)
    torch.testing.assert_close(a @ x @ a.T, torch.nn.functional.adaptive_avg_pool2d(x, grid))


def test_fuse_head_refuses_a_training_mode_head():
    head = make_head("avg", 4, (3, 3), 10)  # modules start in training mode
    with pytest.raises(ValueError, match="evaluation mode"):
        fuse_head(head, (4, 3, 3))


def test_unknown_heads_are_left_alone():
    head = torch.nn.Linear(4, 2).eval()
    assert fuse_head(head, (4, 1, 1)) is head


def test_fused_network_matches_eager_network():
    torch.manual_seed(1)
    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=10, in_channels=1, input_size=(32, 32)))
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 32, 32))
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = net(x)
        kinds = fuse_heads(net)
        got = net(x)
    assert len(kinds) == net.num_stages and all("avg4x4" in k for k in kinds)
    assert all(isinstance(h, FusedHead) for h in net.heads)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert fuse_heads(net) == kinds  # idempotent


def test_engine_with_and_without_fusion_agree(tmp_path):
    torch.manual_seed(2)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=(28, 28)))
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 28, 28))
    path = save_checkpoint(tmp_path / "m.pt", net, class_names=[str(i) for i in range(10)],
                           preprocessing={"input_size": [28, 28], "channels": "gray", "mean": [0.5], "std": [0.5]})
    image = np.random.default_rng(0).integers(0, 255, size=(28, 28), endpoint=True).astype(np.uint8)
    fused = StagedEngine(load_checkpoint(path), "cpu")
    plain = StagedEngine(load_checkpoint(path), "cpu", fuse_heads=False, fuse_blocks=False)
    assert fused.head_kinds and not plain.head_kinds
    assert fused.block_fusion == ["2 of 2 batch norms folded, 4 layers as functions",
                                  *["2 of 2 batch norms folded, 5 layers as functions"] * 3]
    assert not plain.block_fusion
    a, b = fused.run(image, "gray"), plain.run(image, "gray")
    assert [r.stage for r in a.results] == [r.stage for r in b.results] == [1, 2, 3, 4]
    for ra, rb in zip(a.results, b.results):
        np.testing.assert_allclose(ra.probs, rb.probs, rtol=1e-5, atol=1e-6)
        assert ra.class_id == rb.class_id


def _with_statistics(net: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Non-trivial batch-norm statistics and affine parameters everywhere, then eval mode."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, *shape) * 2 + 0.5)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    return net.eval()


@pytest.mark.parametrize(("backbone", "channels", "size", "folded"), [
    # smallcnn: conv, ReLU twice, then a max pool from block 2 on; resnet18: stem (conv, ReLU, max pool)
    # + layer1, then layer2-4 with downsample (conv and ReLU calls only).
    ("smallcnn", 1, (28, 28), ["2 of 2 batch norms folded, 4 layers as functions",
                               *["2 of 2 batch norms folded, 5 layers as functions"] * 3]),
    ("resnet18", 3, (64, 64), ["5 of 5 batch norms folded, 11 layers as functions",
                               *["5 of 5 batch norms folded, 9 layers as functions"] * 3]),
])
def test_fused_blocks_equal_the_trained_blocks(backbone, channels, size, folded):
    torch.manual_seed(0)
    net = _with_statistics(build_network(NetConfig(backbone=backbone, num_classes=10, in_channels=channels,
                                                   input_size=size)), (channels, *size))
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        before = net(x)
        assert fuse_blocks(net) == folded
        after = net(x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in net.blocks for m in b.modules())
    # No module call is left in the fused blocks: the layers run as torch functions on their own weights.
    assert not [n.target for b in net.blocks for n in b.graph.nodes if n.op == "call_module"]
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_layers_called_as_functions_read_the_layers_weights():
    """The rewritten block reads its layers' weights on every call: a changed or converted layer is used."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.Hardswish()).eval()
    gm = torch.fx.symbolic_trace(block)
    assert call_layers_as_functions(gm) == 4  # the Hardswish stays a module call
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["4"]
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)
        block[0].weight.mul_(2.0)  # the GraphModule holds the same layers: it sees the change
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)
        torch.testing.assert_close(gm.double()(x.double()), block.double()(x.double()), rtol=0, atol=0)


class _DataDependent(torch.nn.Module):
    """A block whose forward branches on the values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        return h if h.sum() > 0 else -h


def test_a_block_that_cannot_be_fused_stays_as_it_is():
    block = _DataDependent().eval()
    same, what = fuse_block(block, (1, 8, 8))
    assert same is block and what.startswith("unchanged (not traceable")
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    assert fuse_block(plain, (1, 8, 8)) == (plain, "unchanged (no batch norm)")
    with pytest.raises(ValueError, match="evaluation mode"):
        fuse_block(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).train(), (1, 8, 8))
