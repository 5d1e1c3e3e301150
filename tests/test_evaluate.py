"""impatient-eval end to end on a tiny checkpoint and a tiny Fashion-MNIST-format dataset written to tmp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from impatient_ros.runtime.checkpoint import save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, write_idx
from training.evaluate import EvalError, load_logits, main, parse_data_spec
from training.metrics import exit_accuracy

PER_CLASS = {"train": 5, "test": 3}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A 4-exit smallcnn_tiny checkpoint (briefly trained so the exits differ) and IDX files of 28x28 images."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class in PER_CLASS.items():
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 40, size=(labels.size, 28, 28), dtype=np.uint8)
        for c in range(10):  # a bright bar whose row encodes the class: learnable in a few steps
            images[labels == c, 2 + 2 * c: 4 + 2 * c, 4:24] = 250
        image_name, label_name = FASHION_MNIST_FILES[split]
        write_idx(data / image_name, images)
        write_idx(data / label_name, labels)

    torch.manual_seed(0)
    config = NetConfig(backbone="smallcnn_tiny", num_classes=10, in_channels=1, input_size=(28, 28))
    net = build_network(config)
    pre = {"input_size": [28, 28], "channels": "gray", "mean": [0.1], "std": [0.3]}
    from training.data import load_data

    bundle = load_data("fashion-mnist", data, mean=pre["mean"], std=pre["std"], val_split=2, seed=0)
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    y = torch.tensor(bundle.train.targets)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(15):
        loss = sum(torch.nn.functional.cross_entropy(z, y) for z in net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = save_checkpoint(root / "tiny.pt", net, class_names=list(FASHION_MNIST_CLASSES), preprocessing=pre,
                           budget={"scheme": "EQ", "weights": [0.25] * 4},
                           train_config={"data": {"val_split": 2}, "seed": 0})
    return root, data, ckpt


def test_parse_data_spec():
    assert parse_data_spec("fashion-mnist").root is None
    assert parse_data_spec("fashion-mnist:/x").root == "/x"
    assert parse_data_spec("imagefolder:/data/scenes").dataset == "imagefolder"
    with pytest.raises(EvalError, match="path"):
        parse_data_spec("imagefolder")
    with pytest.raises(EvalError, match="unknown data"):
        parse_data_spec("cifar10")


def test_eval_cli_end_to_end(tiny_setup, capsys):
    root, data, ckpt = tiny_setup
    out = root / "report"
    status = main([str(ckpt), "--data", f"fashion-mnist:{data}", "--split", "test", "--out", str(out),
                   "--budget", "uniform:0,5", "--budget", "exponential:1", "--target-cost", "1000",
                   "--timing-iterations", "3", "--examples-per-exit", "2", "--figure-class", "Trouser"])
    assert status == 0, capsys.readouterr().err
    for name in ("report.md", "report.json", "logits.npz", "val_logits.npz", "calibration.json", "exit_accuracy.png",
                 "cascade.png", "first_correct.png", "first_correct_examples.png"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    logits, labels, meta = load_logits(out / "logits.npz")
    assert logits.shape == (4, 30, 10) and labels.size == 30 and meta["split"] == "test"
    # Every number is derived from the cached logits: recompute one.
    assert report["exit_accuracy"] == pytest.approx(exit_accuracy(logits, labels).tolist())
    assert [r["scheme"] for r in report["schemes"]] == ["STD", "EQ", "LIN", "POLY", "ILIN", "IPOLY", "NORM"]
    eq = next(r for r in report["schemes"] if r["scheme"] == "EQ")
    assert eq["expected_accuracy"] == pytest.approx(np.mean(report["exit_accuracy"]))
    costs = report["costs"]
    assert eq["t_B_ms"] == pytest.approx(np.mean(costs["apriori_ms"]))
    assert eq["t_A_ms"] == pytest.approx(np.mean(costs["anytime_ms"]))
    assert all(a >= b for a, b in zip(costs["anytime_ms"], costs["apriori_ms"]))
    assert {(r["spec"], r["scenario"]) for r in report["budgets"]} == {
        ("uniform:0,5", "apriori"), ("uniform:0,5", "anytime"), ("exponential:1", "apriori"), ("exponential:1", "anytime")}
    assert report["trained_budget"]["expected_accuracy"] == pytest.approx(eq["expected_accuracy"])
    assert set(report["cascade"]["curves"]) == {"ratio", "maxprob", "entropy"}
    assert len(report["cascade"]["fixed_depth"]) == 4
    # A huge target cost lets every criterion run to the end: the fitted point is the best on val.
    fitted = report["fitted"]
    assert len(fitted) == 3 and all("threshold" in f for f in fitted)
    hist = report["first_correct"]["histogram"]
    assert sum(hist.values()) == 30 and set(hist) == {"1", "2", "3", "4", "never"}
    trouser = FASHION_MNIST_CLASSES.index("Trouser")
    for idx in report["first_correct"]["examples"].values():
        assert all(labels[i] == trouser for i in idx)
    md = (out / "report.md").read_text()
    assert "paper Table 1" in md and "IPOLY" in md and "![cascade](cascade.png)" in md

    # Re-run from the caches: the logits and the calibration file just written, no measuring.
    again = root / "again"
    status = main([str(ckpt), "--data", f"fashion-mnist:{data}", "--out", str(again), "--logits",
                   str(out / "logits.npz"), "--calibration", str(out / "calibration.json"), "--no-plots"])
    assert status == 0
    report2 = json.loads((again / "report.json").read_text())
    assert report2["exit_accuracy"] == report["exit_accuracy"]
    assert report2["costs"]["apriori_ms"] == pytest.approx(costs["apriori_ms"])
    assert not (again / "cascade.png").exists()


def test_eval_cli_val_split_and_errors(tiny_setup, capsys):
    root, data, ckpt = tiny_setup
    out = root / "val"
    status = main([str(ckpt), "--data", f"fashion-mnist:{data}", "--split", "val", "--out", str(out),
                   "--timing-iterations", "2", "--no-plots"])
    assert status == 0
    assert json.loads((out / "report.json").read_text())["num_images"] == 20  # val_split 2 per class from train_config

    assert main([str(ckpt), "--data", f"fashion-mnist:{root / 'nowhere'}", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(root / "missing.pt"), "--data", "fashion-mnist", "--out", str(out)]) == 2
    assert main([str(ckpt), "--data", f"fashion-mnist:{data}", "--out", str(out), "--figure-class", "Hat"]) == 2
    assert "Hat" in capsys.readouterr().err


def test_eval_reports_the_checkpoint_exit_ensemble(tiny_setup, capsys):
    from impatient_ros.core.ensemble import ensemble_log_probs
    from impatient_ros.runtime.checkpoint import load_checkpoint

    root, data, ckpt = tiny_setup
    plain_out = root / "plain_for_ensemble"
    assert main([str(ckpt), "--data", f"fashion-mnist:{data}", "--out", str(plain_out), "--timing-iterations", "2",
                 "--no-plots"]) == 0, capsys.readouterr().err
    assert "ensemble" not in json.loads((plain_out / "report.json").read_text())
    loaded = load_checkpoint(ckpt)
    spec = {"kind": "geometric", "weights": [[1.0], [1.0, 1.0], [0.5, 0.5, 1.0], [0.2, 0.2, 0.2, 1.0]]}
    ens_ckpt = save_checkpoint(root / "tiny_ens.pt", loaded.net, class_names=loaded.class_names,
                               preprocessing=loaded.preprocessing, budget=loaded.budget,
                               train_config=loaded.train_config, ensemble=spec)
    out = root / "ens_report"
    assert main([str(ens_ckpt), "--data", f"fashion-mnist:{data}", "--out", str(out), "--logits",
                 str(plain_out / "logits.npz"), "--calibration", str(plain_out / "calibration.json"),
                 "--no-plots"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    logits, labels, _ = load_logits(plain_out / "logits.npz")
    ens = report["ensemble"]
    assert ens["weights"] == spec["weights"]
    assert ens["exit_accuracy"] == pytest.approx(exit_accuracy(ensemble_log_probs(logits, spec), labels).tolist())
    assert ens["exit_accuracy"][0] == pytest.approx(report["exit_accuracy"][0])  # row 1 is exit 1 alone
    eq = next(r for r in ens["schemes"] if r["scheme"] == "EQ")
    assert eq["expected_accuracy"] == pytest.approx(np.mean(ens["exit_accuracy"]))
    assert ens["trained_budget_expected_accuracy"] == pytest.approx(np.mean(ens["exit_accuracy"]))
    assert report["exit_accuracy"] == pytest.approx(exit_accuracy(logits, labels).tolist())  # plain kept as well
    assert "Exit ensemble" in (out / "report.md").read_text()
