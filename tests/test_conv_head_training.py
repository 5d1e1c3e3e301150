"""Conv heads in training: a short real run, and what the LP-FT start and the head refit do with them (tiny networks).

For a conv head the probes read the head's own pooled features (its 3x3 conv +
BN + ReLU, then the 4x4 grid) and replace only its final batch norm and Linear
layer; the convolution stays (training/probes.py says why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from impatient_ros.runtime.checkpoint import load_checkpoint
from impatient_ros.runtime.heads import ConvHead
from impatient_ros.runtime.model import NetConfig, build_network
from training.baselines import fit_exit_probes
from training.cli import build_parser
from training.config import config_from_args
from training.features import collect_outputs, pool_features
from training.probes import linear_probe_start, refit_heads, settle_conv_norms
from training.trainer import train
from tests.learnable_data import learnable_gray16


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(NetConfig("smallcnn_tiny", 4, head="conv", in_channels=1, input_size=(16, 16)))
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 16, 16))  # batch-norm statistics away from their defaults
    return net.eval()


def _outs(net, ds, features=True):
    return collect_outputs(net, DataLoader(ds, batch_size=64), features=features)


def _conv_weights(net) -> list[torch.Tensor]:
    return [head.conv.weight.detach().clone() for head in net.heads]


def test_conv_features_are_what_the_head_reads() -> None:
    net = _net()
    out = _outs(net, learnable_gray16(32, 1))
    assert out.pooling == "conv"
    x = learnable_gray16(32, 1).tensors[0]
    with torch.no_grad():
        h = x
        for k in range(net.num_stages):
            h = net.run_block(k, h)
            head = net.heads[k]
            assert out.features[k].shape == (32, 16 * head.conv.out_channels)
            np.testing.assert_allclose(out.features[k], head.features(h).numpy(), rtol=1e-5, atol=1e-6)
            # The head = its final batch norm and Linear layer on those features.
            torch.testing.assert_close(head.fc(head.norm(torch.from_numpy(out.features[k]))), head(h),
                                       rtol=1e-4, atol=1e-5)
            # Other poolings still read the stage output itself (the frozen-feature baselines).
            assert pool_features(h, "avg4x4").shape == (32, 16 * h.shape[1])


def test_refit_conv_head_is_a_probe_on_its_own_features_and_keeps_the_convolution() -> None:
    net = _net()  # untrained heads: near chance, so the probes win on val
    train_set, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    tr, va = _outs(net, train_set), _outs(net, val)
    convs = _conv_weights(net)
    probes = fit_exit_probes(tr.features, tr.labels, va.features, va.labels, (0.1, 1.0), num_classes=4)
    report = refit_heads(net, train_set, val, Cs=(0.1, 1.0))
    assert report["chosen_C"] == probes.chosen_C and any(report["refit"])
    after = _outs(net, val)
    expected = probes.logits(va.features)
    for k, refit in enumerate(report["refit"]):
        if refit:
            np.testing.assert_allclose(after.logits[k], expected[k], rtol=1e-3, atol=1e-3)
        else:
            assert report["val_head_accuracy"][k] >= report["val_probe_accuracy"][k]
    for before, head in zip(convs, net.heads):  # only the last layer changed
        assert torch.equal(before, head.conv.weight)
    for a, b in zip(after.features, va.features):  # so the features it reads are the same
        np.testing.assert_array_equal(a, b)


def test_lp_start_settles_the_conv_norms_then_equals_the_probes() -> None:
    net = _net()
    train_set, val = learnable_gray16(96, 1), learnable_gray16(40, 2)
    # ORIG for conv heads: probes on the features of the (random) convolution with settled batch norm.
    assert settle_conv_norms(net, train_set) == net.num_stages
    tr, va = _outs(net, train_set), _outs(net, val)
    orig = fit_exit_probes(tr.features, tr.labels, va.features, va.labels, (0.01, 1.0), num_classes=4)
    info = linear_probe_start(net, train_set, val, Cs=(0.01, 1.0))  # settles again: the same statistics
    assert info["chosen_C"] == orig.chosen_C
    np.testing.assert_allclose(_outs(net, val, features=False).logits, orig.logits(va.features), rtol=1e-3, atol=1e-3)
    # Fine-tuning starts in training mode (batch statistics): on the full training set the head's output holds.
    x = train_set.tensors[0]
    with torch.no_grad():
        h = x
        for k in range(net.num_stages):
            h = net.run_block(k, h)
            head = net.heads[k]
            z_eval = head(h)
            head.train()
            z_train = head(h)
            head.eval()
            torch.testing.assert_close(z_train, z_eval, rtol=1e-3, atol=1e-3)


def test_a_tiny_network_trains_with_conv_heads(tmp_path: Path) -> None:
    """`impatient-train --head conv --measure-cost` end to end: train, refit + ensemble (impatient recipe), checkpoint, exit cost."""
    from tests.test_data import _write_tree

    _write_tree(tmp_path / "data" / "train", {"beach": 8, "forest": 8, "kitchen": 8})
    _write_tree(tmp_path / "data" / "test", {"beach": 2, "forest": 2, "kitchen": 2}, seed=1)
    cfg = config_from_args(build_parser().parse_args([
        "--out", str(tmp_path / "run"), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
        "--backbone", "smallcnn_tiny", "--head", "conv", "--input-size", "16", "--val-split", "2",
        "--epochs", "2", "--batch-size", "8", "--workers", "0", "--scheme", "LIN", "--recipe", "impatient",
        "--measure-cost"]))
    result = train(cfg, progress=False)
    assert result.epochs_done == 2
    ckpt = load_checkpoint(result.best)
    assert ckpt.config.head == "conv" and all(isinstance(h, ConvHead) for h in ckpt.net.heads)
    # The exit cost was measured through the engine with the fused conv heads, and counts them.
    cost = ckpt.exit_cost
    assert all(kind.startswith("conv (folded)") for kind in cost["heads"])
    assert all(h > 0 for h in cost["head_ms"])
    np.testing.assert_allclose(cost["anytime_ms"], np.cumsum(np.add(cost["block_ms"], cost["head_ms"])))
    np.testing.assert_allclose(cost["apriori_ms"], np.cumsum(cost["block_ms"]) + np.asarray(cost["head_ms"]))


def test_conv_heads_fit_a_batch_in_a_few_steps() -> None:
    torch.manual_seed(0)
    net = build_network(NetConfig("smallcnn_tiny", 4, head="conv", in_channels=1, input_size=(16, 16))).train()
    x, y = learnable_gray16(32, 5).tensors
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = sum(torch.nn.functional.cross_entropy(z, y) for z in net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
