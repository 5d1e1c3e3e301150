"""The pure helpers of the ROS tier: compressed topic naming, the frame mailbox, the log throttle, parameter specs.

No node and no process: these run in milliseconds (the nodes that use them are
tested end to end in tests/test_node.py and tests/test_tools.py).
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from impatient_ros.ros.log_throttle import LogThrottle
from impatient_ros.ros.mailbox import LatestFrameMailbox
from impatient_ros.ros.params import ParamSpec, check_values
from impatient_ros.ros.topics import compressed_topic


def _resolver(namespace: str, remaps: dict[str, str]):
    """A stand-in for Node.resolve_topic_name: expand relative names, then apply remaps of full names."""

    def resolve(name: str, only_expand: bool = False) -> str:
        full = name if name.startswith("/") else f"{namespace.rstrip('/')}/{name}"
        return full if only_expand else remaps.get(full, full)

    return resolve


@pytest.mark.parametrize(
    ("namespace", "remaps", "base", "expected"),
    [
        ("/", {}, "image", "/image/compressed"),
        ("/robot", {}, "image", "/robot/image/compressed"),
        # a remap of the base topic carries the compressed one along, as image_transport does
        ("/robot", {"/robot/image": "/cam/image_raw"}, "image", "/cam/image_raw/compressed"),
        # a remap of the compressed topic itself wins, with or without a remap of the base
        ("/robot", {"/robot/image/compressed": "/cam/jpeg"}, "image", "/cam/jpeg"),
        ("/robot", {"/robot/image": "/cam/image_raw", "/robot/image/compressed": "/cam/jpeg"}, "image", "/cam/jpeg"),
        ("/", {"/left/image": "/stereo/left"}, "left/image", "/stereo/left/compressed"),
    ],
)
def test_compressed_topic_follows_a_remap_of_the_base(namespace, remaps, base, expected) -> None:
    assert compressed_topic(_resolver(namespace, remaps), base) == expected


def test_mailbox_keeps_only_the_newest() -> None:
    box = LatestFrameMailbox()
    assert box.take(timeout=0.01) is None
    assert box.put("a") is False
    assert box.put("b") is True  # "a" was dropped
    assert box.take(timeout=0.01) == "b"
    assert box.take(timeout=0.01) is None
    got = []
    taker = threading.Thread(target=lambda: got.append(box.take(timeout=5)))
    taker.start()
    time.sleep(0.05)
    box.put("c")
    taker.join(timeout=5)
    assert got == ["c"]
    box.put("d")
    assert box.clear() == 1 and box.clear() == 0


def test_mailbox_wake_releases_a_waiting_take_empty_handed() -> None:
    box = LatestFrameMailbox()
    got = []
    taker = threading.Thread(target=lambda: got.append(box.take(timeout=5)))
    taker.start()
    time.sleep(0.05)
    box.wake()
    taker.join(timeout=1)
    assert not taker.is_alive() and got == [None]


def test_log_throttle_allows_one_message_per_key_and_period() -> None:
    now = [100.0]
    throttle = LogThrottle(5.0, clock=lambda: now[0])
    assert throttle.ready("budget_rejected")
    assert not throttle.ready("budget_rejected")
    assert throttle.ready("no_time")  # keys are independent
    now[0] = 104.9
    assert not throttle.ready("budget_rejected")
    now[0] = 105.0
    assert throttle.ready("budget_rejected")  # the period restarts here
    now[0] = 109.0
    assert not throttle.ready("budget_rejected")


def test_log_throttle_uses_the_monotonic_clock_by_default() -> None:
    throttle = LogThrottle(0.0)
    assert throttle.ready("x") and throttle.ready("x")


SPECS = (
    ParamSpec("reliability", "reliable", "QoS reliability", read_only=True,
              choices=("best_effort", "reliable"), list_choices=False),
    ParamSpec("mode", "anytime", "How to spend the budget.", choices=("anytime", "cascade")),
    ParamSpec("rate_hz", 5.0, "rate", float_range=(0.01, 1000.0)),
    ParamSpec("depth", 1, "depth", int_range=(1, 1000)),
)


def test_param_spec_descriptor() -> None:
    reliability, mode, rate, depth = (spec.descriptor() for spec in SPECS)
    assert reliability.description == "QoS reliability" and reliability.read_only
    assert reliability.additional_constraints == "one of: best_effort, reliable"
    assert mode.description == "How to spend the budget. One of: anytime, cascade."
    assert (rate.floating_point_range[0].from_value, rate.floating_point_range[0].to_value) == (0.01, 1000.0)
    assert (depth.integer_range[0].from_value, depth.integer_range[0].to_value, depth.integer_range[0].step) == (
        1, 1000, 1)
    assert not rate.integer_range and not depth.floating_point_range


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"reliability": "reliable", "mode": "cascade", "rate_hz": 10.0, "use_sim_time": False}, None),
        ({"reliability": "fast"}, "reliability must be one of best_effort, reliable; got 'fast'"),
        ({"mode": "eager"}, "mode must be one of anytime, cascade; got 'eager'"),
        ({"rate_hz": math.nan}, "rate_hz must be a finite number, got nan"),
        ({"unknown": "anything"}, None),  # not in the specs: another rule's business
        ({"rate_hz": 0.01, "depth": 1000}, None),  # the range edges themselves are valid
        # rclpy accepts values within a relative 1e-6 of a range edge; the exact range is checked here.
        ({"rate_hz": 1000.0000005}, "rate_hz must lie in [0.01, 1000.0], got 1000.0000005"),
        ({"rate_hz": 0.0099999999}, "rate_hz must lie in [0.01, 1000.0], got 0.0099999999"),
        ({"depth": 0}, "depth must lie in [1, 1000], got 0"),
        ({"depth": 1001}, "depth must lie in [1, 1000], got 1001"),
    ],
)
def test_check_values_applies_each_specs_own_rules(values, reason) -> None:
    assert check_values(SPECS, values) == reason


def test_every_tool_default_lies_in_its_own_range() -> None:
    from impatient_ros.tools import budget, camera, monitor  # impatient_node's: tests/test_node.py

    for specs in (budget.PARAMETERS, camera.PARAMETERS, monitor.PARAMETERS):
        defaults = {spec.name: spec.default for spec in specs if spec.default is not None}
        assert check_values(specs, defaults) is None
