"""Tests for the training-side levers: LP-FT start, post-hoc head refit, exit ensembles (tiny networks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from impatient_ros.core.ensemble import (
    answer_accuracy,
    EnsembleError,
    combine_log_probs,
    combine_probabilities,
    ensemble_log_probs,
    identity_weights,
    log_softmax,
    validate_ensemble,
)
from impatient_ros.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from training.baselines import fit_exit_probes
from training.ensemble import fit_geometric_ensemble
from training.features import collect_outputs
from training.probes import linear_probe_start, probe_exits, refit_heads
from tests.learnable_data import learnable_gray16

CLASSES = [f"c{i}" for i in range(4)]
GRAY = {"input_size": [16, 16], "channels": "gray", "mean": [0.0], "std": [1.0]}


def _net(head: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(NetConfig("smallcnn_tiny", 4, head=head, in_channels=1, input_size=(16, 16)))
    net.train()
    net(torch.randn(16, 1, 16, 16))  # batch-norm statistics away from their defaults
    return net.eval()


def _outs(net, ds, features=True):
    return collect_outputs(net, DataLoader(ds, batch_size=64), features=features)


@pytest.mark.parametrize("head", ["avg4x4", "avg", "fc"])
def test_lp_start_equals_the_probes_of_the_frozen_network(head: str) -> None:
    net = _net(head)
    train, val = learnable_gray16(96, 1), learnable_gray16(40, 2)
    # ORIG: probes on the frozen network's pooled features, C per exit on val.
    tr, va = _outs(net, train), _outs(net, val)
    Cs = (0.01, 1.0)
    orig = fit_exit_probes(tr.features, tr.labels, va.features, va.labels, Cs, num_classes=4)
    info = linear_probe_start(net, train, val, Cs=Cs)
    assert info["chosen_C"] == orig.chosen_C
    after = _outs(net, val, features=False)
    expected = orig.logits(va.features)
    np.testing.assert_allclose(after.logits, expected, rtol=1e-3, atol=1e-3)
    assert (after.logits.argmax(2) == expected.argmax(2)).all()
    # Features untouched: only the heads changed.
    again = _outs(net, val)
    for a, b in zip(again.features, va.features):
        np.testing.assert_array_equal(a, b)


def test_lp_start_head_batch_norm_holds_the_training_statistics() -> None:
    # In training mode the head normalises with batch statistics; on the full training set they equal the
    # running ones, so the head's output does not jump when fine-tuning starts.
    net = _net("avg4x4")
    train, val = learnable_gray16(96, 1), learnable_gray16(40, 2)
    linear_probe_start(net, train, val, Cs=(1.0,))
    x = train.tensors[0]
    with torch.no_grad():
        h = x
        for k in range(net.num_stages):
            h = net.run_block(k, h)
            head = net.heads[k]
            head.eval()
            z_eval = head(h)
            head.train()
            z_train = head(h)
            head.eval()
            torch.testing.assert_close(z_train, z_eval, rtol=1e-3, atol=1e-3)


def test_refit_head_equals_a_probe_on_the_same_features() -> None:
    net = _net("avg4x4")  # untrained heads: near chance, so every probe wins on val
    train, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    tr, va = _outs(net, train), _outs(net, val)
    probes = fit_exit_probes(tr.features, tr.labels, va.features, va.labels, (0.1, 1.0), num_classes=4)
    report = refit_heads(net, train, val, Cs=(0.1, 1.0))
    assert report["chosen_C"] == probes.chosen_C
    after = _outs(net, val, features=False)
    expected = probes.logits(va.features)
    for k, refit in enumerate(report["refit"]):
        if refit:
            np.testing.assert_allclose(after.logits[k], expected[k], rtol=1e-3, atol=1e-3)
        else:  # kept only where val said the trained head is at least as good
            assert report["val_head_accuracy"][k] >= report["val_probe_accuracy"][k]
    assert any(report["refit"])


def test_own_classifier_last_exit_keeps_its_weights_and_the_ep_heads_are_fitted() -> None:
    # The paper's last exit is the backbone's own output layer, not an EP head: a probe cannot be
    # written into it, so the LP-FT start and the refit leave it alone instead of failing.
    torch.manual_seed(0)
    net = build_network(NetConfig("resnet18", 4, in_channels=3, input_size=(32, 32), own_classifier_last=True)).eval()
    rng = np.random.default_rng(6)
    train = TensorDataset(torch.from_numpy(rng.normal(size=(48, 3, 32, 32)).astype(np.float32)), torch.arange(48) % 4)
    val = TensorDataset(torch.from_numpy(rng.normal(size=(24, 3, 32, 32)).astype(np.float32)), torch.arange(24) % 4)
    own = {name: p.clone() for name, p in net.heads[-1].state_dict().items()}
    assert probe_exits(net) == [0, 1, 2]
    start = linear_probe_start(net, train, val, Cs=(1.0,))
    assert start["chosen_C"] == [1.0, 1.0, 1.0, None] and len(start["val_accuracy"]) == 4
    report = refit_heads(net, train, val, Cs=(1.0,))
    assert report["refit"][3] is False and report["chosen_C"][3] is None and report["val_probe_accuracy"][3] is None
    for name, p in net.heads[-1].state_dict().items():
        torch.testing.assert_close(p, own[name], rtol=0, atol=0)


def test_refit_keeps_a_head_that_is_better_on_val() -> None:
    net = _net("avg4x4")
    train, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    linear_probe_start(net, train, val, Cs=(1.0,))  # heads already are the C=1 probes
    before = _outs(net, val, features=False).logits
    report = refit_heads(net, train, val, Cs=(1.0,))
    assert report["refit"] == [False] * net.num_stages  # same probe again: not strictly better
    np.testing.assert_array_equal(_outs(net, val, features=False).logits, before)


def test_refit_chooses_the_pooling_grid_on_val_and_equals_that_probe(tmp_path) -> None:
    from training.baselines import select_probe
    from training.features import collect_pooled
    from training.probes import pooling_candidates

    net = _net("avg4x4")  # 16x16 input: maps of 16, 8, 4 and 2 pixels a side
    train, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    assert [pooling_candidates(net, k) for k in range(4)] == [
        ["avg", "avg2x2", "avg4x4", "avg7x7", "avg8x8"], ["avg", "avg2x2", "avg4x4", "avg7x7", "avg8x8"],
        ["avg", "avg2x2", "avg4x4"],
        ["avg", "avg2x2", "avg4x4"]]  # a 4x4 grid on the 2x2 map stays a candidate: it is the head's own
    Cs = (0.1, 1.0)
    cands = {k: pooling_candidates(net, k) for k in range(4)}
    tr, y_tr = collect_pooled(net, DataLoader(train, batch_size=64), cands)
    va, y_va = collect_pooled(net, DataLoader(val, batch_size=64), cands)
    expected = {}
    for k in range(4):  # by hand: the best probe per pooling, the best pooling (own kind, then coarse, on ties)
        fits = {p: select_probe(tr[(k, p)], y_tr, va[(k, p)], y_va, Cs, num_classes=4) for p in cands[k]}
        order = sorted(cands[k], key=lambda p: (p != "avg4x4", {"avg": 1, "avg2x2": 2, "avg4x4": 4, "avg7x7": 7, "avg8x8": 8}[p]))
        best = max(order, key=lambda p: max(fits[p][1].values()))
        expected[k] = (best, fits[best][0])
    report = refit_heads(net, train, val, Cs=Cs, choose_pooling=True)
    assert all(report["refit"])  # untrained heads: every probe wins
    assert report["pooling"] == [expected[k][0] for k in range(4)] == net.head_kinds()
    assert report["pooling"] != ["avg4x4"] * 4  # the case is only a test if some grid changed
    after = _outs(net, val, features=False)
    for k in range(4):
        pooling, probe = expected[k]
        np.testing.assert_allclose(after.logits[k], probe.decision_function(va[(k, pooling)]), rtol=1e-3, atol=1e-3)
    # The chosen heads are part of the network's description: a checkpoint rebuilds them.
    assert net.config.exit_heads == tuple(report["pooling"])
    path = save_checkpoint(tmp_path / "pooled.pt", net, class_names=CLASSES, preprocessing=GRAY)
    loaded = load_checkpoint(path)
    assert loaded.net.head_kinds() == report["pooling"]
    np.testing.assert_allclose(_outs(loaded.net, val, features=False).logits, after.logits, rtol=1e-5, atol=1e-5)


def test_without_pooling_choice_the_heads_keep_their_kind() -> None:
    net = _net("avg4x4")
    train, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    report = refit_heads(net, train, val, Cs=(1.0,))
    assert report["pooling"] == ["avg4x4"] * 4 and net.config.exit_heads is None
    assert all(set(s) == {"avg4x4"} for s in report["val_pooling_scores"])


def test_a_network_with_chosen_grids_runs_in_the_engine_as_evaluated(tmp_path) -> None:
    from impatient_ros.runtime.engine import StagedEngine

    net = _net("avg4x4")
    train, val = learnable_gray16(96, 3), learnable_gray16(40, 4)
    refit_heads(net, train, val, Cs=(1.0,), choose_pooling=True)
    path = save_checkpoint(tmp_path / "pooled.pt", net, class_names=CLASSES, preprocessing=GRAY)
    engine = StagedEngine(load_checkpoint(path), "cpu")  # fused heads of every kind
    x = val.tensors[0][:1]
    report = engine.run_tensor(x)
    with torch.no_grad():
        eager = [torch.softmax(z, 1)[0].numpy() for z in net.eval()(x)]
    for result, probs in zip(report.results, eager):
        np.testing.assert_allclose(result.probs, probs, atol=1e-5)


# --------------------------------------------------------------------------- ensembles


def test_combining_changes_the_answer_on_a_constructed_case() -> None:
    p = np.array([[[0.6, 0.4]], [[0.45, 0.55]]])  # exit 1 says class 0 clearly, exit 2 says class 1 weakly
    plain = combine_probabilities(p, identity_weights(2))
    assert plain[1, 0].argmax() == 1
    np.testing.assert_allclose(plain, p)
    geo = combine_probabilities(p, [[1.0], [1.0, 1.0]])
    np.testing.assert_allclose(geo.sum(axis=-1), 1.0)
    assert geo[1, 0].argmax() == 0  # 0.6*0.45 = 0.27 > 0.4*0.55 = 0.22
    np.testing.assert_allclose(geo[1, 0], np.array([0.27, 0.22]) / 0.49)
    # One image as (K, C), and log-space input.
    np.testing.assert_allclose(combine_probabilities(p[:, 0], [[1.0], [1.0, 1.0]]), geo[:, 0])
    np.testing.assert_allclose(np.exp(combine_log_probs(np.log(p), [[1.0], [1.0, 1.0]])), geo)


def test_validate_ensemble_refuses_bad_weights() -> None:
    assert validate_ensemble({"kind": "geometric", "weights": [[1], [0.5, 1]]}, 2)["weights"] == [[1.0], [0.5, 1.0]]
    for bad in ({"kind": "arithmetic", "weights": [[1.0]]}, {"kind": "geometric", "weights": [[1.0, 2.0]]},
                {"kind": "geometric", "weights": [[1.0], [0.0, 0.0]]}, {"kind": "geometric", "weights": [[-1.0]]},
                {"kind": "geometric", "weights": [[float("nan")]]}, {"kind": "geometric", "weights": []}, [1.0]):
        with pytest.raises(EnsembleError):
            validate_ensemble(bad)
    with pytest.raises(EnsembleError, match="2 weight rows"):
        validate_ensemble({"kind": "geometric", "weights": [[1.0], [1.0, 1.0]]}, 4)
    # The ensemble's validation accuracy, when given: one fraction per exit.
    rows = [[1.0], [0.5, 1.0]]
    assert validate_ensemble({"kind": "geometric", "weights": rows, "val_accuracy": [0.5, 1]})["val_accuracy"] == [0.5, 1.0]
    for bad in ([0.5], [0.5, 1.5], [0.5, float("nan")], [0.5, True], "0.5", [0.5, None]):
        with pytest.raises(EnsembleError, match="val_accuracy"):
            validate_ensemble({"kind": "geometric", "weights": rows, "val_accuracy": bad})


def test_answer_accuracy_is_the_published_answers() -> None:
    own = [0.6, 0.7, 0.8]
    rows = [[1.0], [0.0, 1.0], [0.2, 0.3, 1.0]]
    assert answer_accuracy(own, None, 3) == own  # no ensemble: each head's own
    with_acc = {"kind": "geometric", "weights": rows, "val_accuracy": [0.6, 0.7, 0.85]}
    assert answer_accuracy(own, with_acc, 3) == [0.6, 0.7, 0.85]
    # A file without it: the rows that are an exit alone keep the head's accuracy, a combined row is unknown.
    got = answer_accuracy(own, {"kind": "geometric", "weights": rows}, 3)
    assert got[:2] == [0.6, 0.7] and np.isnan(got[2])
    assert all(np.isnan(a) for a in answer_accuracy(None, None, 3))
    assert np.isnan(answer_accuracy(None, {"kind": "geometric", "weights": rows}, 3)[0])


def test_fitted_weights_lower_val_nll_and_keep_only_supported_rows() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    # Two noisy exits with independent noise: their geometric mean is better than either.
    logits = np.stack([np.eye(5)[y] * 1.5 + rng.normal(size=(400, 5)) for _ in range(3)])
    spec, report = fit_geometric_ensemble(logits, y)
    assert spec["kind"] == "geometric" and [len(r) for r in spec["weights"]] == [1, 2, 3]
    validate_ensemble(spec, 3)
    # The spec carries the val accuracy of its own answers (what a node publishes as stage_accuracy).
    assert spec["val_accuracy"] == report["val_accuracy"]
    np.testing.assert_allclose(spec["val_accuracy"],
                               (ensemble_log_probs(logits, spec).argmax(axis=2) == y[None, :]).mean(axis=1))
    for k, kept in enumerate(report["kept"]):
        assert report["val_accuracy"][k] >= report["val_plain_accuracy"][k]
        if not kept:
            assert spec["weights"][k] == identity_weights(3)[k]
    assert report["kept"][2]  # three independent views: the ensemble wins at the last exit
    nll = lambda lp: -lp[np.arange(y.size), y].mean()  # noqa: E731
    ens = ensemble_log_probs(logits, spec)
    assert nll(ens[2]) < nll(log_softmax(logits[2]))


def test_ensemble_weights_round_trip_through_a_checkpoint(tmp_path) -> None:
    net = _net("avg4x4")
    spec = {"kind": "geometric", "weights": [[1.0], [0.3, 1.2], [0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.9]]}
    path = save_checkpoint(tmp_path / "e.pt", net, class_names=CLASSES, preprocessing=GRAY, ensemble=spec)
    loaded = load_checkpoint(path)
    assert loaded.ensemble == spec
    raw = torch.load(path, weights_only=True)
    assert raw["ensemble"] == spec
    # Older checkpoints (no entry) load with ensemble None; the key is not written without an ensemble.
    plain = save_checkpoint(tmp_path / "p.pt", net, class_names=CLASSES, preprocessing=GRAY)
    assert "ensemble" not in torch.load(plain, weights_only=True)
    assert load_checkpoint(plain).ensemble is None
    with pytest.raises(ValueError, match="weight row"):
        save_checkpoint(tmp_path / "bad.pt", net, class_names=CLASSES, preprocessing=GRAY,
                        ensemble={"kind": "geometric", "weights": [[1.0], [1.0]] + [[1.0] * 3, [1.0] * 4]})
    # A tampered ensemble entry is refused on load.
    raw["ensemble"] = {"kind": "geometric", "weights": [[1.0]]}
    torch.save(raw, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="weight rows"):
        load_checkpoint(tmp_path / "t.pt")


# --------------------------------------------------------------------------- the recipes in the trainer


def _train_cfg(out, *argv):
    from training.cli import build_parser
    from training.config import config_from_args

    return config_from_args(build_parser().parse_args(["--out", str(out), *argv]))


@pytest.mark.parametrize("recipe", ["impatient", "paper"])
def test_recipe_is_recorded_and_only_impatient_finalizes(tmp_path, recipe: str) -> None:
    from tests.conftest import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Fashion-MNIST")
    import json

    from training.trainer import train

    cfg = _train_cfg(tmp_path, "--backbone", "smallcnn_tiny", "--data-dir", str(FASHION_MNIST_DIR),
                     "--train-per-class", "20", "--val-split", "10", "--test-per-class", "2", "--epochs", "1",
                     "--batch-size", "50", "--lr", "0.05", "--recipe", recipe, "--device", "cpu")
    result = train(cfg, progress=False)
    best = load_checkpoint(result.best)
    assert best.train_config["recipe"] == recipe
    events = [json.loads(x).get("event") for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if recipe == "paper":
        assert "finalize" not in events and best.ensemble is None and "recipe" not in best.meta["extra"]
        return
    assert events[-2:] == ["finalize", "test"]
    info = best.meta["extra"]["recipe"]
    assert len(info["refit"]) == len(info["ensemble_kept"]) == 4
    assert (best.ensemble is not None) == any(info["ensemble_kept"])
    # exit_accuracy is the val accuracy of the rewritten (plain) heads.
    from training.data import load_data

    d = cfg.data
    bundle = load_data(d.dataset, d.data_dir, val_split=d.val_split, train_per_class=d.train_per_class,
                       mean=best.preprocessing["mean"], std=best.preprocessing["std"], seed=cfg.seed)
    out = collect_outputs(best.net, DataLoader(bundle.val, batch_size=100))
    acc = (out.logits.argmax(2) == out.labels[None]).mean(1)
    np.testing.assert_allclose(acc, best.exit_accuracy)


def test_lp_ft_start_of_a_pretrained_network_is_orig(tmp_path) -> None:
    from tests.conftest import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Fashion-MNIST")
    from impatient_ros.runtime.model import list_backbones

    if "efficientnet_lite0" not in list_backbones():
        pytest.skip("needs efficientnet_lite0")
    import json
    from dataclasses import replace

    from training.trainer import _load_bundle, train

    cfg = _train_cfg(tmp_path, "--backbone", "efficientnet_lite0", "--pretrained", "--data-dir",
                     str(FASHION_MNIST_DIR), "--input-size", "32", "--channels", "gray", "--train-per-class", "6",
                     "--val-split", "3", "--test-per-class", "1", "--epochs", "1", "--max-steps-per-epoch", "1",
                     "--batch-size", "20", "--lr", "0.001", "--augmentation", "none", "--device", "cpu")
    train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == 0 and lines[1]["epoch"] == 1
    # ORIG: the pretrained network as it is, probes on its pooled features (C per exit on val).
    torch.manual_seed(0)
    orig = build_network(replace(load_checkpoint(tmp_path / "last.pt").config, pretrained=True)).eval()
    bundle = _load_bundle(cfg)
    tr, va = _outs(orig, bundle.train), _outs(orig, bundle.val)
    from training.baselines import DEFAULT_CS

    probes = fit_exit_probes(tr.features, tr.labels, va.features, va.labels, DEFAULT_CS, num_classes=10)
    # The start chose each head's pooling on val (choose_pooling, the default): ORIG's probes on those poolings.
    assert lines[0]["lp_start"]["pooling"] == orig.head_kinds() == load_checkpoint(tmp_path / "last.pt").net.head_kinds()
    assert lines[0]["lp_start"]["chosen_C"] == probes.chosen_C
    assert lines[0]["val_exit_accuracy"] == pytest.approx(probes.val_accuracy)
    for k, scores in enumerate(lines[0]["lp_start"]["val_pooling_scores"]):
        assert max(scores.values()) == pytest.approx(probes.val_accuracy[k])


def test_lp_ft_start_with_new_heads_trains_them_and_resumes(tmp_path, monkeypatch) -> None:
    from tests.conftest import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Fashion-MNIST")
    from impatient_ros.runtime.model import list_backbones

    if "efficientnet_lite0" not in list_backbones():
        pytest.skip("needs efficientnet_lite0")
    from training import probes, trainer

    # Which grid val prefers on a split this small is chance; the candidates are narrowed so that exit 1
    # must take a 2x2 grid: what is tested is how the trainer adopts a changed head.
    own = probes.pooling_candidates
    monkeypatch.setattr(probes, "pooling_candidates", lambda net, k: ["avg2x2"] if k == 0 else own(net, k))
    args = ("--backbone", "efficientnet_lite0", "--pretrained", "--data-dir", str(FASHION_MNIST_DIR), "--input-size",
            "32", "--channels", "gray", "--train-per-class", "6", "--val-split", "3", "--test-per-class", "1",
            "--epochs", "2", "--max-steps-per-epoch", "1", "--batch-size", "20", "--lr", "0.01", "--augmentation",
            "none", "--device", "cpu")
    cfg = _train_cfg(tmp_path / "a", *args)
    ctx = trainer.DistContext()
    run = trainer._setup(cfg, ctx)
    kinds = run.net.head_kinds()
    trainer._lp_start_epoch(run)
    assert kinds[0] == "avg4x4" and run.net.head_kinds()[0] == "avg2x2"
    # The optimiser steps exactly the network's parameters, the new heads' included.
    stepped = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in run.net.parameters() if p.requires_grad}
    # Interrupted after epoch 1 and resumed: the saved run rebuilds the chosen heads.
    trainer.train(_train_cfg(tmp_path / "b", *args), progress=False, stop_after=1)
    result = trainer.train(_train_cfg(tmp_path / "b", *args), progress=False, resume=True)
    assert result.epochs_done == 2
    assert load_checkpoint(result.last).net.head_kinds()[0] == "avg2x2"
    assert load_checkpoint(tmp_path / "b" / "best.pt").net.head_kinds()[0] == "avg2x2"


def test_recipe_option_default_and_choices(tmp_path) -> None:
    from training.config import ConfigError, TrainConfig

    assert _train_cfg(tmp_path).recipe == "impatient"
    assert _train_cfg(tmp_path, "--recipe", "paper").recipe == "paper"
    assert TrainConfig.from_dict({}).recipe == "impatient"  # older train_configs (no key) load with the default
    with pytest.raises(ConfigError, match="valid recipes: impatient, paper"):
        _train_cfg(tmp_path, "--recipe", "fancy")
