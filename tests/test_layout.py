"""Training's memory layout (training.layout): channels-last on the CPU, contiguous on disk and in the engine."""

from __future__ import annotations

import torch

from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
from impatient_ros.runtime.model import NetConfig, build_network
from training.layout import fast_layout, runtime_layout
from training.trainer import measure_exit_cost


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetConfig(backbone="smallcnn_tiny", num_classes=4, in_channels=1, input_size=(16, 16)))


def _conv_weights(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.dim() == 4]


def test_fast_layout_is_channels_last_on_the_cpu_in_place_and_computes_the_same() -> None:
    net = _net().eval()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        before = [z.clone() for z in net(x)]
    params = list(net.parameters())
    assert not _conv_weights(net)[1].is_contiguous(memory_format=torch.channels_last)
    assert fast_layout(net, "cpu") is net
    assert all(a is b for a, b in zip(params, net.parameters()))  # an optimiser built on them stays valid
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(net))
    with torch.no_grad():
        after = net(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    runtime_layout(net)
    assert all(p.is_contiguous() for p in net.parameters())


def test_fast_layout_leaves_other_devices_alone() -> None:
    net = _net()
    fast_layout(net, "meta")  # any device that is not the CPU: not measured, so not changed
    assert all(p.is_contiguous() for p in net.parameters())


def test_a_channels_last_network_is_saved_contiguous_and_loads_equal(tmp_path) -> None:
    net = fast_layout(_net().eval(), "cpu")
    path = tmp_path / "net.pt"
    save_checkpoint(path, net, class_names=list("abcd"),
                    preprocessing={"input_size": [16, 16], "channels": "gray", "mean": [0.0], "std": [1.0]})
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(t.is_contiguous() for t in state.values())
    loaded = load_checkpoint(path).net.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        for a, b in zip(loaded(x), net(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_measuring_the_exit_cost_leaves_the_trained_networks_layout_alone() -> None:
    net = fast_layout(_net(), "cpu")
    cost = measure_exit_cost(net, torch.device("cpu"), reps=3, warmup=1)
    assert len(cost["anytime_ms"]) == net.num_stages
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(net))
