"""Fused EP heads (batch norm folded into the linear layer) equal the trained heads they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.engine import StagedEngine
from impatient_ros.runtime.fusion import FusedHead, fuse_head, fuse_heads
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


@pytest.mark.parametrize("kind", ["fc", "avg", "avg4x4"])
@pytest.mark.parametrize("shape", [(8, 2, 2), (4, 4, 4), (16, 8, 8), (8, 7, 5), (32, 16, 16)])
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
    plain = StagedEngine(load_checkpoint(path), "cpu", fuse_heads=False)
    assert fused.head_kinds and not plain.head_kinds
    a, b = fused.run(image, "gray"), plain.run(image, "gray")
    assert [r.stage for r in a.results] == [r.stage for r in b.results] == [1, 2, 3, 4]
    for ra, rb in zip(a.results, b.results):
        np.testing.assert_allclose(ra.probs, rb.probs, rtol=1e-5, atol=1e-6)
        assert ra.class_id == rb.class_id
