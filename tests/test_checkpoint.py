"""Tests for the self-describing checkpoint format: round trip, atomic writes, and every refusal."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from impatient_ros.runtime.backbones import torchvision_weights_path
from impatient_ros.runtime.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
)
from impatient_ros.runtime.model import NetConfig, build_network

CLASSES = [f"class_{i}" for i in range(10)]
GRAY_28 = {"input_size": [28, 28], "channels": "gray", "mean": [0.286], "std": [0.353]}


@pytest.fixture
def net():
    torch.manual_seed(0)
    network = build_network(NetConfig("smallcnn_tiny", 10, in_channels=1, input_size=(28, 28)))
    network.train()
    network(torch.randn(8, 1, 28, 28))  # move the batch-norm statistics away from their defaults
    return network.eval()


def save(path, net, **overrides):
    kwargs = dict(
        class_names=CLASSES,
        preprocessing=GRAY_28,
        budget={"scheme": "uniform", "weights": [0.25] * 4, "note": "paper Eq. 5"},
        exit_accuracy=[0.70, 0.80, 0.85, 0.90],
        exit_cost={"device": "cpu", "mean_ms": [0.1, 0.2, 0.3, 0.4]},
        train_config={"epochs": 3, "lr": 0.1},
        extra={"dataset": "fashion-mnist"},
    )
    kwargs.update(overrides)
    return save_checkpoint(path, net, **kwargs)


def raw(path):
    return torch.load(path, weights_only=True)


def rewrite(path, data):
    """Save a modified payload without a sidecar, as a hand-edited file would be."""
    torch.save(data, path)
    sidecar_path(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- round trip


def test_round_trip_restores_network_and_description(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LoadedCheckpoint)
    assert not loaded.net.training
    assert loaded.config == net.config
    assert loaded.class_names == CLASSES
    assert loaded.preprocessing == GRAY_28
    assert loaded.budget == {"scheme": "uniform", "weights": [0.25] * 4, "note": "paper Eq. 5"}
    assert loaded.exit_accuracy == [0.70, 0.80, 0.85, 0.90]
    assert loaded.exit_cost["mean_ms"] == [0.1, 0.2, 0.3, 0.4]
    assert loaded.train_config == {"epochs": 3, "lr": 0.1}
    assert loaded.meta["format"] == FORMAT and loaded.meta["format_version"] == FORMAT_VERSION
    assert loaded.meta["extra"] == {"dataset": "fashion-mnist"}
    assert loaded.meta["stage_output_shapes"] == [list(s) for s in net.stage_output_shapes()]
    assert loaded.meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(net(x), loaded.net(x)):
            assert torch.equal(a, b)


def test_file_is_plain_for_weights_only_and_has_sidecar(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = torch.load(path, weights_only=True)  # raises if anything but plain types/tensors were stored
    assert data["format"] == FORMAT and data["format_version"] == FORMAT_VERSION
    assert data["net_config"] == net.config.to_dict()
    assert type(data["torch_version"]) is str
    digest, name = sidecar_path(path).read_text().split()
    assert name == "model.pt" and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.sha256"]  # no temp files left


def test_numpy_scalars_become_python_numbers(tmp_path, net) -> None:
    path = save(tmp_path / "m.pt", net, exit_accuracy=[np.float32(0.5), np.float64(0.6), 0.7, 0.8])
    assert load_checkpoint(path).exit_accuracy == pytest.approx([0.5, 0.6, 0.7, 0.8])


def test_optional_entries_may_be_none(tmp_path, net) -> None:
    path = save(tmp_path / "m.pt", net, budget=None, exit_accuracy=None, exit_cost=None, train_config=None, extra=None)
    loaded = load_checkpoint(path)
    assert loaded.budget is None and loaded.exit_accuracy is None and loaded.meta["extra"] is None


def test_pretrained_config_loads_without_cached_weights(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub_with_weights"))
    cached = torchvision_weights_path("mobilenet_v3_small")
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), cached)
    network = build_network(NetConfig("mobilenet_v3_small", 10, input_size=(64, 64), pretrained=True))
    rgb = {"input_size": [64, 64], "channels": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    path = save(tmp_path / "m.pt", network, preprocessing=rgb, budget=None, exit_accuracy=None)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # the robot has no cached weights
    loaded = load_checkpoint(path)
    assert loaded.config.pretrained is True
    assert torch.equal(loaded.net.blocks[0][0][0].weight, network.blocks[0][0][0].weight)


# --------------------------------------------------------------------------- atomic writes


def test_failed_save_keeps_previous_checkpoint(tmp_path, net, monkeypatch) -> None:
    path = save(tmp_path / "model.pt", net)
    before, sidecar_before = path.read_bytes(), sidecar_path(path).read_text()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, net)
    assert path.read_bytes() == before
    assert sidecar_path(path).read_text() == sidecar_before  # still verifiable
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert load_checkpoint(path).class_names == CLASSES


def test_invalid_arguments_write_nothing(tmp_path, net) -> None:
    path = tmp_path / "model.pt"
    with pytest.raises(ValueError, match="class_names"):
        save(path, net, class_names=CLASSES[:3])
    with pytest.raises(ValueError, match="exit_accuracy"):
        save(path, net, exit_accuracy=[0.5, 0.6])
    with pytest.raises(ValueError, match="fractions"):
        save(path, net, exit_accuracy=[50.0, 60.0, 70.0, 80.0])
    with pytest.raises(ValueError, match="weights"):
        save(path, net, budget={"scheme": "uniform", "weights": [1.0]})
    with pytest.raises(ValueError, match="not a plain type"):
        save(path, net, train_config={"device": torch.device("cpu")})
    with pytest.raises(ValueError, match="channels"):
        save(path, net, preprocessing={**GRAY_28, "channels": "rgb"})
    with pytest.raises(ValueError, match="input_size"):
        save(path, net, preprocessing={**GRAY_28, "input_size": [32, 32]})
    assert not path.exists() and not sidecar_path(path).exists()


# --------------------------------------------------------------------------- refusals


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_truncated_file(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="does not match its sha256 sidecar"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(path, verify_hash=False)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(path)


def test_random_bytes(tmp_path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(path)


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(path)


def test_plain_torch_file_is_not_ours(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not an impatient_ros checkpoint"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not an impatient_ros checkpoint"):
        load_checkpoint(path)


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): code execution a safe loader must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused_without_running(tmp_path, writer) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "evil": _CreatesMarker(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # a plain, non-zip pickle
    with pytest.raises(CheckpointError, match="references Python code.*io.open.*nothing in it was executed"):
        load_checkpoint(path)
    assert not marker.exists()
    # Control: the payload really runs code under an unsafe loader, so the check above means something.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_newer_format_version_asks_to_upgrade(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["format_version"] = FORMAT_VERSION + 1
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="newer impatient_ros.*upgrade"):
        load_checkpoint(path)
    data["format_version"] = "1"
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_checkpoint(path)


def test_class_count_mismatch(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["class_names"] = CLASSES[:9]
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="9 class_names.*num_classes=10"):
        load_checkpoint(path)


def test_tampered_file_fails_hash(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    sidecar = sidecar_path(path).read_text()
    data = raw(path)
    data["class_names"] = list(reversed(CLASSES))
    torch.save(data, path)
    sidecar_path(path).write_text(sidecar)  # the old hash
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    assert load_checkpoint(path, verify_hash=False).class_names == list(reversed(CLASSES))
    sidecar_path(path).write_text("not a hash\n")
    with pytest.raises(CheckpointError, match="no sha256 digest"):
        load_checkpoint(path)


def test_state_dict_must_match_exactly(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    key = next(k for k in data["state_dict"] if k.endswith("weight"))

    missing = {**data, "state_dict": {k: v for k, v in data["state_dict"].items() if k != key}}
    rewrite(path, missing)
    with pytest.raises(CheckpointError, match=f"missing 1 .*{key}"):
        load_checkpoint(path)

    extra = {**data, "state_dict": {**data["state_dict"], "heads.9.fc.weight": torch.zeros(1)}}
    rewrite(path, extra)
    with pytest.raises(CheckpointError, match="unexpected 1 .*heads.9.fc.weight"):
        load_checkpoint(path)

    reshaped = {**data, "state_dict": {**data["state_dict"], key: torch.zeros(3)}}
    rewrite(path, reshaped)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(path)


def test_invalid_net_config(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["net_config"] = {**data["net_config"], "backbone": "resnet1000"}
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="invalid net_config.*unknown backbone"):
        load_checkpoint(path)
    del data["net_config"]
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="lacks required entries"):
        load_checkpoint(path)


def test_exit_accuracy_length(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["exit_accuracy"] = [0.5, 0.6, 0.7]
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="one value per exit"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channels": "bgr"}, "'gray' or 'rgb'"),
        ({"mean": [0.5, 0.5, 0.5]}, "mean"),
        ({"std": [0.0]}, "positive"),
        ({"input_size": [28]}, "input_size"),
    ],
)
def test_invalid_preprocessing(tmp_path, net, change, message) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["preprocessing"] = {**data["preprocessing"], **change}
    rewrite(path, data)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_changed_exit_placement_is_reported(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    data = raw(path)
    data["stage_output_shapes"][0] = [1, 1, 1]
    rewrite(path, data)
    with pytest.raises(CheckpointError, match="exits"):
        load_checkpoint(path)


def test_unusable_device_is_a_checkpoint_error(tmp_path, net) -> None:
    path = save(tmp_path / "model.pt", net)
    with pytest.raises(CheckpointError, match="cannot move the network"):
        load_checkpoint(path, map_location="no_such_device")
