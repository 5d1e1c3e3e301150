"""impatient-budget: publish impatient_ros/Budget messages from a schedule or a distribution.

Stands in for a planner that sets the time budget of the classifier node. The
``schedule`` parameter takes the forms of :mod:`impatient_ros.tools.schedule`, e.g.
``sweep:1,20,10`` (tight to loose over 10 s, repeating), ``steps:5,10,20@2``,
``constant:8`` or a seeded random draw such as ``uniform:2,20``. The schedule
can be changed while running (``ros2 param set``); its clock then restarts.

Published on ``budget`` reliably with transient-local durability, depth 1, so
a node that starts later still gets the budget in force.

Run:  impatient-budget --ros-args -p schedule:=sweep:1,20,10 -p rate_hz:=5.0
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence

from builtin_interfaces.msg import Duration as DurationMsg
from rcl_interfaces.msg import SetParametersResult
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future
from std_msgs.msg import Header

from impatient_ros.msg import Budget
from impatient_ros.ros.choices import RELIABILITIES
from impatient_ros.ros.params import ParamSpec, check_declared, check_values, declare
from impatient_ros.tools.schedule import SPEC_FORMS, BudgetSchedule, ScheduleError, parse_schedule
from impatient_ros.tools.common import make_qos, run_node

__all__ = ["PARAMETERS", "BudgetNode", "duration_from_ms", "main"]

# Choices go into additional_constraints only (list_choices=False): the tools' short descriptions never
# listed them.
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("schedule", "sweep:1,20,10", f"budget schedule: {SPEC_FORMS}"),
    ParamSpec("seed", 0, "seed of the random draws of distribution schedules", read_only=True,
              int_range=(0, 2**31 - 1)),
    ParamSpec("rate_hz", 5.0, "Budget messages per second", float_range=(0.01, 1000.0)),
    ParamSpec("max_stage", 0, "max_stage field of every message: deepest exit to run (0: no cap)",
              int_range=(0, 255)),
    ParamSpec("source", "schedule", "source field of every message: who set the budget"),
    ParamSpec("max_messages", 0, "stop after this many messages (0: run until stopped)", read_only=True,
              int_range=(0, 2**31 - 1)),
    ParamSpec("reliability", "reliable", "QoS reliability of the budget topic", read_only=True,
              choices=RELIABILITIES, list_choices=False),
    ParamSpec("wait_for_subscribers", 0, "hold the first message until the budget topic has had this many "
              "subscribers for 0.2 s; the schedule starts then (0: start at once)", read_only=True,
              int_range=(0, 1000)),
)

# The publisher counts a subscriber as soon as it has matched the reader, which can be before the reader
# has matched this writer; a reliable volatile reader drops what is sent in between (the first budget of
# a seeded schedule went missing in tests/test_tools.py on a loaded machine). Holding the first message
# until the count has stood this long lets the other side's discovery finish.
MATCH_SETTLE_S = 0.2


def duration_from_ms(value_ms: float) -> DurationMsg:
    """builtin_interfaces/Duration for a non-negative number of milliseconds (rounded to 1 ns)."""
    if not (math.isfinite(value_ms) and value_ms >= 0):
        raise ValueError(f"a budget must be a finite number of ms >= 0, got {value_ms!r}")
    total_ns = round(value_ms * 1e6)
    return DurationMsg(sec=total_ns // 1_000_000_000, nanosec=total_ns % 1_000_000_000)


class BudgetNode(Node):
    """Publishes one Budget per timer tick; ``done`` completes after max_messages (if set)."""

    def __init__(self, **node_options: Any) -> None:
        # node_options go to rclpy's Node (context, parameter_overrides, ...): tests run it in-process.
        super().__init__("impatient_budget", **node_options)
        declare(self, PARAMETERS)
        check_declared(self, self._check_parameters)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.exit_status = 0
        self.done = Future()
        self.sent = 0
        self._subscribed_since: float | None = None  # monotonic time the wanted subscriber count was reached
        self.schedule: BudgetSchedule = parse_schedule(self._param("schedule"), self._param("seed"))
        self._start_ns = self.get_clock().now().nanoseconds
        self.publisher = self.create_publisher(
            Budget, "budget", make_qos(self._param("reliability"), 1, transient_local=True))
        self.timer = self.create_timer(1.0 / self._param("rate_hz"), self._tick)
        self.get_logger().info(
            f"publishing {self.schedule.describe()} on {self.publisher.topic_name} at {self._param('rate_hz'):g} Hz")

    def _param(self, name: str):  # noqa: ANN202 - the value's type depends on the parameter
        return self.get_parameter(name).value

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        # Ranges are enforced by the descriptors; choices by the specs, the schedule here.
        reason = check_values(PARAMETERS, {p.name: p.value for p in params})
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        for p in params:
            if p.name == "schedule":
                try:
                    parse_schedule(p.value)
                except ScheduleError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        if "schedule" in names:
            self.schedule = parse_schedule(self._param("schedule"), self._param("seed"))
            self._start_ns = self.get_clock().now().nanoseconds
            self.get_logger().info(f"new schedule: {self.schedule.describe()}")
        if "rate_hz" in names:
            self.timer.timer_period_ns = int(1e9 / self._param("rate_hz"))
            self.timer.reset()

    def _subscribers_settled(self) -> bool:
        """``wait_for_subscribers`` subscribers, for at least MATCH_SETTLE_S (always true when it is 0)."""
        wanted = self._param("wait_for_subscribers")
        if not wanted:
            return True
        if self.publisher.get_subscription_count() < wanted:
            self._subscribed_since = None
            return False
        now = time.monotonic()
        if self._subscribed_since is None:
            self._subscribed_since = now
        return now - self._subscribed_since >= MATCH_SETTLE_S

    def _tick(self) -> None:
        if self.done.done():
            return
        if self.sent == 0 and not self._subscribers_settled():
            self._start_ns = self.get_clock().now().nanoseconds  # the schedule starts with the first message
            return
        now = self.get_clock().now()
        # max(0): a clock that jumps back (sim time restarted) must not give a negative time.
        elapsed_s = max(0, now.nanoseconds - self._start_ns) / 1e9
        msg = Budget(
            header=Header(stamp=now.to_msg()),
            budget=duration_from_ms(self.schedule.budget_ms(elapsed_s)),
            max_stage=self._param("max_stage"),
            source=self._param("source"),
        )
        self.publisher.publish(msg)
        self.sent += 1
        limit = self._param("max_messages")
        if limit and self.sent >= limit:
            self.timer.cancel()
            if self._param("reliability") == "reliable":
                self.publisher.wait_for_all_acked(Duration(seconds=2.0))  # the last ones reach reliable readers
            self.get_logger().info(f"published {self.sent} budget(s)")
            self.done.set_result(self.sent)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of impatient-budget; returns the exit status."""
    return run_node(BudgetNode, args, until=lambda node: node.done)


if __name__ == "__main__":
    sys.exit(main())
