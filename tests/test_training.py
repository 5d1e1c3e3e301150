"""Tests for training.config / training.trainer / training.cli: a real short run, resume, config rules, loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from impatient_ros.runtime.checkpoint import load_checkpoint
from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from training.cli import build_parser, main
from training.config import ConfigError, TrainConfig, config_from_args, load_yaml
from training.data import FASHION_MNIST_CLASSES, load_data
from training.trainer import (
    RESUME_FORMAT,
    JointLoss,
    build_optimizer,
    build_scheduler,
    evaluate,
    evaluate_checkpoint,
    measure_exit_cost,
    param_groups,
    train,
)


def _cfg(out: Path, *argv: str) -> TrainConfig:
    """A config as the CLI would build it."""
    return config_from_args(build_parser().parse_args(["--out", str(out), *argv]))


# Small, fast runs: smallcnn_tiny on a per-class subset of Fashion-MNIST.
SMALL = ["--backbone", "smallcnn_tiny", "--data-dir", str(FASHION_MNIST_DIR)]


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Fashion-MNIST")
    out = tmp_path_factory.mktemp("run")
    # The default recipe's refit fits 4 exits x 5 C of probes: on 50 images per class (500) that
    # takes a quarter of the time it takes on all 2000, and exercises the same finalize path.
    cfg = _cfg(out, *SMALL, "--train-per-class", "200", "--val-split", "50", "--test-per-class", "30",
               "--epochs", "2", "--lr", "0.05", "--warmup-epochs", "0.5", "--scheme", "LIN", "--nesterov",
               "--refit-train-per-class", "50")
    result = train(cfg, progress=False)
    return cfg, result


@requires_fashion_mnist
def test_short_run_learns_every_exit(trained) -> None:
    cfg, result = trained
    assert result.epochs_done == 2
    # 2000 training images, 2 epochs: every exit clearly above chance (10 %).
    assert min(result.val_exit_accuracy) >= 0.4, result.val_exit_accuracy
    assert min(result.test_exit_accuracy) >= 0.4, result.test_exit_accuracy
    out = Path(cfg.out)
    for name in ("last.pt", "best.pt", "resume.pt", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in lines[:2]] == [1, 2]
    assert lines[-1]["event"] == "test" and lines[-1]["samples"] == 300
    for r in lines[:2]:
        assert len(r["val_exit_accuracy"]) == 4 and math.isfinite(r["train_loss"])
        assert r["val_expected_accuracy"] == pytest.approx(
            sum(w * a for w, a in zip([0.1, 0.2, 0.3, 0.4], r["val_exit_accuracy"])))
    # The saved config is the final config and feeds back in.
    assert TrainConfig.from_dict(load_yaml(out / "config.yaml")) == cfg


@requires_fashion_mnist
def test_checkpoint_loads_back_and_gives_the_same_accuracy(trained) -> None:
    cfg, result = trained
    ckpt = load_checkpoint(result.best)
    assert ckpt.class_names == list(FASHION_MNIST_CLASSES)
    assert ckpt.budget["scheme"] == "LIN" and ckpt.budget["weights"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert ckpt.budget["mass_before_first"] == 0.0
    assert ckpt.preprocessing["input_size"] == [28, 28] and ckpt.preprocessing["channels"] == "gray"
    assert ckpt.train_config == cfg.to_dict()
    assert ckpt.meta["extra"]["epoch"] in (1, 2)

    # The validation split rebuilt from the config, evaluated with the loaded network.
    d = cfg.data
    bundle = load_data(d.dataset, d.data_dir, val_split=d.val_split, train_per_class=d.train_per_class,
                       mean=ckpt.preprocessing["mean"], std=ckpt.preprocessing["std"], seed=cfg.seed)
    stats = evaluate(ckpt.net, DataLoader(bundle.val, batch_size=512), torch.device("cpu"))
    assert stats["exit_accuracy"] == pytest.approx(ckpt.exit_accuracy, abs=1e-9)
    # ... and through the --eval-only path.
    again = evaluate_checkpoint(result.best, split="val")
    assert again["exit_accuracy"] == pytest.approx(ckpt.exit_accuracy, abs=1e-9)
    assert again["expected_accuracy"] == pytest.approx(
        sum(w * a for w, a in zip(ckpt.budget["weights"], ckpt.exit_accuracy)))


@requires_fashion_mnist
def test_cli_eval_only_prints_every_exit(trained, capsys: pytest.CaptureFixture[str]) -> None:
    _, result = trained
    assert main(["--eval-only", str(result.last), "--test-per-class", "5"]) == 0
    text = capsys.readouterr().out
    assert "test split, 50 images" in text
    for k in range(1, 5):
        assert f"exit {k}: accuracy" in text
    assert "expected accuracy" in text


# --------------------------------------------------------------------------- resume


@requires_fashion_mnist
def test_resume_continues_from_the_saved_epoch_bit_exactly(tmp_path: Path) -> None:
    argv = [*SMALL, "--train-per-class", "20", "--val-split", "5", "--test-per-class", "2", "--epochs", "2",
            "--batch-size", "32", "--max-steps-per-epoch", "3", "--deterministic", "--lr", "0.05"]
    straight = tmp_path / "straight"
    train(_cfg(straight, *argv), checksum_file=straight / "sum", progress=False)

    broken = tmp_path / "broken"
    first = train(_cfg(broken, *argv), stop_after=1, progress=False)
    assert first.epochs_done == 1 and first.test_exit_accuracy is None
    state = torch.load(broken / "resume.pt", weights_only=True)  # plain types and tensors only
    assert state["format"] == RESUME_FORMAT and state["epoch"] == 1
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "best_metric", "rng"}

    resumed = train(_cfg(broken, *argv), resume=True, checksum_file=broken / "sum", progress=False)
    assert resumed.epochs_done == 2 and [r["epoch"] for r in resumed.history] == [2]
    epochs = [json.loads(x).get("epoch") for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert epochs[:2] == [1, 2]
    a = json.loads((straight / "sum.rank0.json").read_text())
    b = json.loads((broken / "sum.rank0.json").read_text())
    assert a["sha256"] == b["sha256"], "an interrupted + resumed run must end with the same weights"


@requires_fashion_mnist
def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no resume file"):
        train(_cfg(tmp_path / "none", *SMALL, "--train-per-class", "5", "--val-split", "1"), resume=True)
    argv = [*SMALL, "--train-per-class", "5", "--val-split", "1", "--test-per-class", "1", "--epochs", "1",
            "--max-steps-per-epoch", "1"]
    train(_cfg(tmp_path / "run", *argv), progress=False)
    with pytest.raises(ConfigError, match="already holds a run .*--overwrite"):
        train(_cfg(tmp_path / "run", *argv))  # a fresh run must not mix with the old one's files
    train(_cfg(tmp_path / "run", *argv), overwrite=True, progress=False)
    other = _cfg(tmp_path / "run", *argv, "--head", "avg")
    with pytest.raises(ConfigError, match="config.yaml"):
        train(other, resume=True)


# --------------------------------------------------------------------------- other options that train


@requires_fashion_mnist
def test_distillation_and_eq5_budget_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="training")
    cfg = _cfg(tmp_path, *SMALL, "--train-per-class", "10", "--val-split", "2", "--test-per-class", "1",
               "--epochs", "1", "--max-steps-per-epoch", "2", "--distill", "--distill-temperature", "2",
               "--budget-distribution", "uniform:1,9", "--ready-times", "2", "4", "6", "8", "--measure-cost",
               "--optimizer", "adamw", "--lr", "0.001", "--label-smoothing", "0.1")
    result = train(cfg, progress=False)
    assert result.epochs_done == 1 and math.isfinite(result.history[0]["train_loss"])
    ckpt = load_checkpoint(result.last)
    assert ckpt.train_config["distill"] is True
    budget = ckpt.budget
    # Eq. 5 for U[1, 9) with exits ready at 2, 4, 6, 8 ms.
    assert budget["scheme"] == "distribution" and budget["eq5_weights"] == pytest.approx([0.25, 0.25, 0.25, 0.125])
    assert budget["mass_before_first"] == pytest.approx(0.125)
    assert budget["weights"] == pytest.approx([2 / 7, 2 / 7, 2 / 7, 1 / 7])
    assert "mass before t_1 (no answer): 0.1250" in caplog.text
    cost = ckpt.exit_cost
    assert len(cost["mean_ms"]) == 4 and all(b > a for a, b in zip(cost["mean_ms"], cost["mean_ms"][1:]))


def test_measure_exit_cost_is_cumulative() -> None:
    from impatient_ros.core.ready_times import anytime_ready_times, apriori_ready_times
    from impatient_ros.runtime.fusion import FusedHead
    from impatient_ros.runtime.model import NetConfig, build_network

    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=3, in_channels=1, input_size=(28, 28)))
    cost = measure_exit_cost(net, torch.device("cpu"), reps=3, warmup=1)
    # The one definition of ready times, from the median of each part (impatient_ros.core.ready_times).
    assert cost["statistic"] == "median" and len(cost["block_ms"]) == len(cost["head_ms"]) == net.num_stages
    assert cost["anytime_ms"] == pytest.approx(anytime_ready_times(cost["block_ms"], cost["head_ms"]).tolist())
    assert cost["apriori_ms"] == pytest.approx(apriori_ready_times(cost["block_ms"], cost["head_ms"]).tolist())
    assert cost["p50_ms"] == pytest.approx(cost["anytime_ms"])
    assert cost["mean_ms"] == pytest.approx(torch.tensor(cost["stage_mean_ms"]).cumsum(0).tolist())
    # Measured through the engine (fused heads, its device label) on a copy: the network is untouched.
    assert cost["device"].startswith("cpu|fp32") and len(cost["heads"]) == net.num_stages
    assert not any(k.endswith("(unchanged)") for k in cost["heads"])  # the heads timed were the fused ones
    assert net.training and not any(isinstance(h, FusedHead) for h in net.heads)


# --------------------------------------------------------------------------- config


def test_yaml_below_cli_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"backbone": "smallcnn_tiny", "head": "avg"},
        "optim": {"lr": "1e-3", "epochs": 7, "nesterov": True},  # "1e-3" is text to YAML 1.1
        "budget": {"scheme": "poly", "gamma": 3},
        "seed": 5,
    }))
    cfg = _cfg(tmp_path / "o", "--config", str(path), "--lr", "0.2", "--no-nesterov", "--input-size", "32")
    assert cfg.model.backbone == "smallcnn_tiny" and cfg.model.head == "avg"  # from YAML
    assert cfg.optim.lr == 0.2 and cfg.optim.nesterov is False  # CLI wins
    assert cfg.optim.epochs == 7 and cfg.seed == 5 and cfg.budget.gamma == 3.0  # YAML kept
    assert cfg.budget.scheme == "POLY"
    assert cfg.data.input_size == [32, 32]
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay  # default
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backbone", "resnet1000"], "valid backbones: alexnet, .*smallcnn"),
        (["--head", "mlp"], "valid heads: fc, avg, avg2x2, avg4x4, avg7x7, avg8x8, conv"),
        (["--scheme", "QUAD"], "valid schemes: STD, EQ, LIN, POLY, ILIN, IPOLY, NORM"),
        (["--optimizer", "lamb"], "valid optimizers: sgd, adamw"),
        (["--augmentation", "heavy"], "valid augmentation presets: none, light, standard"),
        (["--dataset", "cifar10"], "valid datasets: fashion-mnist, imagefolder"),
        (["--amp", "fp8"], "valid AMP modes: auto, off, bf16, fp16"),
        (["--device", "tpu"], "valid devices: auto, cpu, cuda, cuda:N"),
        (["--calibration-key", "p90_ms"], "valid calibration keys: mean_ms, p50_ms, p99_ms"),
        (["--channels", "bgr"], "valid channels values: gray, rgb"),
        (["--val-split", "1.5"], "fraction in \\[0, 1\\) or an integer"),
        (["--budget-distribution", "uniform:2,20"], "exactly one of --ready-times"),
        (["--budget-distribution", "weibull:2"], "valid: uniform, normal, exponential, gamma, empirical"),
        (["--ready-times", "1", "2"], "only used with budget.distribution"),
        (["--scheme", "POLY", "--gamma", "0.5"], "gamma > 1"),
        (["--nesterov", "--momentum", "0"], "nesterov needs momentum"),
        (["--dataset", "imagefolder"], "needs data.data_dir"),
        (["--warmup-epochs", "20"], "warmup_epochs"),
    ],
)
def test_invalid_choices_are_rejected_with_the_valid_ones(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, *argv)


def test_bad_yaml_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate.*valid keys: optimizer, lr"):
        _cfg(tmp_path, "--config", str(path))
    path.write_text("trainer: {}\n")
    with pytest.raises(ConfigError, match="valid keys: model, data, optim, budget"):
        _cfg(tmp_path, "--config", str(path))
    path.write_text("optim: {epochs: 2.5}\n")
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        _cfg(tmp_path, "--config", str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        _cfg(tmp_path, "--config", str(path))
    with pytest.raises(ConfigError, match="not found"):
        _cfg(tmp_path, "--config", str(tmp_path / "missing.yaml"))


def test_budget_resolve_checks_the_number_of_ready_times(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--budget-distribution", "exponential:5", "--ready-times", "1", "2", "3")
    with pytest.raises(ConfigError, match="3 ready time\\(s\\) for a network with 4 exits"):
        cfg.budget.resolve(4)
    assert sum(cfg.budget.resolve(3)["weights"]) == pytest.approx(1.0)
    calibration = tmp_path / "timing.json"
    calibration.write_text(json.dumps([1.0, 2.0, 3.0, 4.0]))
    cfg = _cfg(tmp_path, "--budget-distribution", "normal:3,1", "--calibration", str(calibration))
    record = cfg.budget.resolve(4)
    assert record["ready_times_ms"] == [1.0, 2.0, 3.0, 4.0] and 0 < record["mass_before_first"] < 0.05


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--scheme", "QUAD"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("impatient-train: error:") and "valid schemes" in err


# --------------------------------------------------------------------------- loss, optimiser, schedule


def test_joint_loss_weights_and_distillation() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 5, (8,))
    outputs = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    ce = [torch.nn.functional.cross_entropy(z, target) for z in outputs]
    plain = JointLoss([0.2, 0.3, 0.5])
    assert plain(outputs, target).item() == pytest.approx(0.2 * ce[0].item() + 0.3 * ce[1].item() + 0.5 * ce[2].item())
    assert JointLoss([0.2, 0.3, 0.5], distill=True, distill_weight=0.0)(outputs, target).item() == pytest.approx(
        plain(outputs, target).item())

    # Early exits that already agree with the last one: the KL term vanishes.
    same = [outputs[2].detach().clone().requires_grad_(True) for _ in range(2)] + [outputs[2]]
    distill = JointLoss([0.2, 0.3, 0.5], distill=True, distill_weight=0.5, temperature=2.0)
    expected = 0.5 * (0.2 + 0.3) * ce[2].item() + 0.5 * ce[2].item()
    assert distill(same, target).item() == pytest.approx(expected, rel=1e-5)

    # The teacher is detached: with a zero CE weight the last exit gets no gradient from the KL terms.
    teacher_free = JointLoss([0.5, 0.5, 0.0], distill=True, distill_weight=1.0)
    teacher_free(outputs, target).backward()
    assert outputs[2].grad is None or torch.count_nonzero(outputs[2].grad) == 0
    assert torch.count_nonzero(outputs[0].grad) > 0
    with pytest.raises(ValueError, match="3 exits but 2"):
        JointLoss([0.5, 0.5])(outputs, target)


def test_joint_loss_ensemble_teacher_is_the_detached_geometric_mean_of_every_exit() -> None:
    torch.manual_seed(1)
    target = torch.randint(0, 5, (8,))
    outputs = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    t, a = 2.0, 0.4
    loss = JointLoss([0.2, 0.3, 0.5], distill=True, distill_weight=a, temperature=t, teacher="ensemble")
    # The teacher by hand: the renormalised mean of the tempered log-probabilities.
    mean = sum(torch.log_softmax(z.detach() / t, dim=1) for z in outputs) / 3
    teacher = torch.log_softmax(mean, dim=1)
    assert torch.allclose(loss.soft_target(outputs), teacher)
    expected = 0.0
    for z, w in zip(outputs, [0.2, 0.3, 0.5]):  # every exit learns from it, the last included
        kl = torch.nn.functional.kl_div(torch.log_softmax(z / t, dim=1), teacher, log_target=True,
                                        reduction="batchmean")
        expected += w * ((1 - a) * torch.nn.functional.cross_entropy(z, target) + a * t * t * kl)
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-5)

    # Exits that all agree are their own ensemble: no KL left, only the cross-entropy share.
    same = [outputs[0].detach().clone().requires_grad_(True) for _ in range(3)]
    ce = torch.nn.functional.cross_entropy(same[0], target).item()
    assert loss(same, target).item() == pytest.approx((1 - a) * ce, rel=1e-5)

    # Detached: an exit with zero weight gets no gradient, neither as a student nor through the teacher.
    JointLoss([0.5, 0.5, 0.0], distill=True, distill_weight=1.0, teacher="ensemble")(outputs, target).backward()
    assert outputs[2].grad is None or torch.count_nonzero(outputs[2].grad) == 0
    assert torch.count_nonzero(outputs[0].grad) > 0
    with pytest.raises(ValueError, match="unknown distillation teacher"):
        JointLoss([1.0], teacher="median")

def test_no_weight_decay_on_batch_norm_and_bias_and_the_schedule(tmp_path: Path) -> None:
    from impatient_ros.runtime.model import NetConfig, build_network

    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=10, in_channels=1, input_size=(28, 28)))
    decay, no_decay = param_groups(net, 1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))

    cfg = _cfg(tmp_path, "--lr", "0.4", "--min-lr", "0.04", "--epochs", "3", "--warmup-epochs", "1")
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)  # linear warm-up over 10 steps
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04)  # min_lr at the end
    assert isinstance(optimizer, torch.optim.SGD)


def test_imagefolder_run_and_eval_only(tmp_path: Path) -> None:
    from tests.test_data import _write_tree

    _write_tree(tmp_path / "data" / "train", {"beach": 6, "forest": 6, "kitchen": 6})
    _write_tree(tmp_path / "data" / "test", {"beach": 2, "forest": 2, "kitchen": 2}, seed=1)
    cfg = _cfg(tmp_path / "run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
               "--backbone", "smallcnn_tiny", "--input-size", "16", "--val-split", "1", "--augmentation", "standard",
               "--epochs", "1", "--batch-size", "8", "--workers", "0", "--scheme", "NORM")
    result = train(cfg, progress=False)
    ckpt = load_checkpoint(result.best)
    assert ckpt.class_names == ["beach", "forest", "kitchen"]
    assert ckpt.preprocessing["channels"] == "rgb" and ckpt.preprocessing["input_size"] == [16, 16]
    assert ckpt.budget["scheme"] == "NORM" and ckpt.budget["beta"] == 0.34
    stats = evaluate_checkpoint(result.best, split="test", workers=0)
    assert stats["samples"] == 6 and len(stats["exit_accuracy"]) == 4
    assert stats["exit_accuracy"] == pytest.approx(result.test_exit_accuracy)


def test_backbone_learning_rate_scale(tmp_path: Path) -> None:
    from impatient_ros.runtime.model import NetConfig, build_network

    net = build_network(NetConfig(backbone="smallcnn_tiny", num_classes=10, in_channels=1, input_size=(28, 28)))
    cfg = _cfg(tmp_path, "--lr", "0.4", "--min-lr", "0.0", "--epochs", "2", "--warmup-epochs", "0",
               "--backbone-lr-scale", "0.1")
    optimizer = build_optimizer(net, cfg)
    head_ids = {id(p) for p in net.heads.parameters()}
    block_ids = {id(p) for p in net.blocks.parameters()}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head_ids or ids <= block_ids  # no group mixes heads and blocks
        assert group["lr"] == pytest.approx(0.4 if ids <= head_ids else 0.04)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)  # the heads' rate is the one logged
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    rates = sorted({round(g["lr"] / 0.4, 9) for g in optimizer.param_groups})
    assert len(rates) == 2 and rates[0] == pytest.approx(0.1 * rates[1])  # the schedule keeps the ratio

    # 0 trains only the heads: after real steps on a batch, the blocks' weights have not moved.
    frozen = _cfg(tmp_path, "--lr", "0.4", "--backbone-lr-scale", "0", "--weight-decay", "0.001")
    optimizer = build_optimizer(net, frozen)
    before = [p.detach().clone() for p in net.blocks.parameters()]
    head_before = [p.detach().clone() for p in net.heads.parameters()]
    net.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(z, torch.arange(4)) for z in net(torch.randn(4, 1, 28, 28)))
        loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.blocks.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, net.heads.parameters()))
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        _cfg(tmp_path, "--backbone-lr-scale", "-1")
