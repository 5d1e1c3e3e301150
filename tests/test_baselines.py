"""Linear-probe baselines (training.baselines) and the pooled exit features they read (training.features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impatient_ros.runtime.model import NetConfig, build_network
from training.baselines import (
    BaselineError,
    ExitProbes,
    fit_exit_probes,
    fit_linear_probe,
    install_probe,
    select_probe,
)
from training.features import collect_outputs, pool_features
from training.metrics import exit_accuracy


def _blobs(n: int, dims: int, classes: int, rng: np.random.Generator, signal: float = 3.0,
           informative: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class k shifts feature k by ``signal``; the other dimensions are noise."""
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, dims)).astype(np.float32)
    x[np.arange(n), y % (informative or classes)] += signal
    return x, y


@pytest.mark.parametrize("loss", ["logistic", "squared_hinge"])
def test_probe_separates_separable_features(loss):
    rng = np.random.default_rng(0)
    x, y = _blobs(300, 8, 3, rng, signal=8.0)
    xv, yv = _blobs(200, 8, 3, rng, signal=8.0)
    probe = fit_linear_probe(x, y, C=1.0, loss=loss)
    assert probe.accuracy(x, y) == 1.0
    assert probe.accuracy(xv, yv) >= 0.99
    assert probe.decision_function(xv).shape == (200, 3)


def test_c_is_chosen_on_validation():
    # Few training images, many noise dimensions: weak regularisation overfits, so a small C wins on val.
    rng = np.random.default_rng(1)
    x, y = _blobs(40, 400, 4, rng, signal=1.5)
    xv, yv = _blobs(400, 400, 4, rng, signal=1.5)
    probe, scores = select_probe(x, y, xv, yv, Cs=(1e-3, 1e-1, 10.0, 1000.0))
    assert set(scores) == {1e-3, 1e-1, 10.0, 1000.0}
    best = max(scores.values())
    assert scores[probe.C] == best
    assert probe.C == min(c for c, a in scores.items() if a == best)  # ties go to the stronger regularisation
    assert scores[probe.C] > scores[1000.0]  # the choice matters here
    assert probe.accuracy(xv, yv) == pytest.approx(scores[probe.C])


def test_constant_feature_is_harmless():
    rng = np.random.default_rng(2)
    x, y = _blobs(100, 5, 2, rng, signal=6.0)
    x[:, 4] = 7.0
    probe = fit_linear_probe(x, y, C=1.0)
    assert np.all(np.isfinite(probe.weight))
    assert probe.accuracy(x, y) > 0.95


def test_exit_probes_give_network_shaped_logits():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    yv = rng.integers(0, 3, 60)
    # Exit 1: pure noise; exit 2: separable. The probes must reflect that.
    train = [rng.normal(size=(120, 6)).astype(np.float32), np.eye(3, dtype=np.float32)[y] * 5 + rng.normal(size=(120, 3))]
    val = [rng.normal(size=(60, 6)).astype(np.float32), np.eye(3, dtype=np.float32)[yv] * 5 + rng.normal(size=(60, 3))]
    probes = fit_exit_probes(train, y, val, yv, Cs=(0.01, 1.0), num_classes=3)
    assert isinstance(probes, ExitProbes)
    logits = probes.logits(val)
    assert logits.shape == (2, 60, 3)
    acc = exit_accuracy(logits, yv)
    assert acc[1] == 1.0 and acc[0] < 0.8
    assert probes.val_accuracy == pytest.approx(acc.tolist())
    assert len(probes.chosen_C) == 2 and set(probes.to_dict()) >= {"chosen_C", "val_accuracy", "val_scores"}


def test_probe_input_errors():
    with pytest.raises(BaselineError, match="loss"):
        fit_linear_probe(np.zeros((4, 2)), [0, 1, 0, 1], loss="hinge")
    with pytest.raises(BaselineError, match="C"):
        fit_linear_probe(np.zeros((4, 2)), [0, 1, 0, 1], C=0.0)
    with pytest.raises(BaselineError, match="label"):
        fit_linear_probe(np.zeros((4, 2)), [0, 1, 0])
    probe = fit_linear_probe(np.eye(4, 2), [0, 1, 0, 1])
    with pytest.raises(BaselineError, match="dim"):
        probe.decision_function(np.zeros((3, 5)))
    with pytest.raises(BaselineError, match="empty"):
        select_probe(np.eye(4, 2), [0, 1, 0, 1], np.eye(4, 2), [0, 1, 0, 1], Cs=())


def test_pool_features_match_the_head_kinds():
    h = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert pool_features(h, "avg4x4").shape == (2, 48)
    assert pool_features(h, "avg").shape == (2, 3)
    assert pool_features(h, "fc").shape == (2, 192)
    assert torch.allclose(pool_features(h, "avg"), h.mean(dim=(2, 3)))
    assert torch.allclose(pool_features(h, "avg4x4").reshape(2, 3, 4, 4)[:, :, 0, 0], h[:, :, :2, :2].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="valid"):
        pool_features(h, "max")


def test_collect_outputs_one_pass_logits_and_features():
    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=3, in_channels=1, input_size=(16, 16)))
    x = torch.randn(10, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    out = collect_outputs(net, batches, features=True)
    assert net.training  # mode restored
    assert out.logits.shape == (4, 10, 3) and out.labels.tolist() == y.tolist()
    assert [f.shape[1] for f in out.features] == [16 * 16, 32 * 16, 64 * 16, 128 * 16]
    net.eval()
    with torch.no_grad():
        expected = torch.stack(net(x)).numpy()
    assert np.allclose(out.logits, expected, atol=1e-5)
    only_last = collect_outputs(net, batches, features=True, pooling="avg", exits=[3])
    assert [f.shape[1] for f in only_last.features] == [0, 0, 0, 128]


@pytest.mark.parametrize("head", ["avg4x4", "avg", "fc"])
def test_installed_probe_reproduces_its_scores_in_the_network(head):
    torch.manual_seed(1)
    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=3, head=head, in_channels=1,
                                  input_size=(16, 16)))
    x = torch.randn(24, 1, 16, 16)
    y = torch.arange(24) % 3
    out = collect_outputs(net, [(x, y)], features=True)
    probe = fit_linear_probe(out.features[1], out.labels, C=0.5, num_classes=3)
    install_probe(net, 1, probe)
    refit = collect_outputs(net.eval(), [(x, y)])
    assert np.allclose(refit.logits[1], probe.decision_function(out.features[1]), atol=1e-4)
    assert np.allclose(refit.logits[0], out.logits[0])  # other exits untouched
    with pytest.raises(BaselineError, match="fit"):
        install_probe(net, 0, probe)
