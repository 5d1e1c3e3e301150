"""impatient-monitor: live accuracy/latency table of the classifier, a JSON summary and a plot.

Subscribes

* ``prediction`` (impatient_ros/StagePrediction) - remap it to the node's
  output: ``-r prediction:=/impatient_node/prediction``;
* ``label`` (std_msgs/Int32MultiArray ``[stamp.sec, stamp.nanosec, class_id]``,
  what impatient-camera publishes on ``~/label``) - remap it to the camera's:
  ``-r label:=/impatient_camera/label``.

Predictions and labels are joined by the image's header stamp. Every
``print_period_s`` a table goes to stdout: per stage the message count,
accuracy (when labels are known), latency p50/p99, how many images ended
there and how many messages overran their budget; then the stop reasons and
the frame counts (see :mod:`impatient_ros.tools.monitor_stats` for the
definitions). On exit (Ctrl-C, SIGTERM or ``duration_s``) the final table is
printed and the summary JSON (``summary_path``) and the plot PNG
(``plot_path``) are written.

Run:  impatient-monitor --ros-args -r prediction:=/impatient_node/prediction \\
        -r label:=/impatient_camera/label -p summary_path:=runs/monitor.json -p plot_path:=runs/monitor.png
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future
from std_msgs.msg import Int32MultiArray

from impatient_ros.tools.monitor_stats import MonitorStats, PredictionRecord, format_table, write_plot, write_summary
from impatient_ros.msg import StagePrediction
from impatient_ros.ros.choices import RELIABILITIES
from impatient_ros.ros.params import ParamSpec, check_declared, check_values, declare
from impatient_ros.tools.common import make_qos, run_node

__all__ = ["PARAMETERS", "MonitorNode", "main", "record_from_message"]

# Choices go into additional_constraints only (list_choices=False): the tools' short descriptions never
# listed them.
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("print_period_s", 1.0, "seconds between live tables on stdout (0: only the final one)",
              read_only=True, float_range=(0.0, 3600.0)),
    ParamSpec("label_wait_s", 2.0, "how long a prediction waits for its label before it counts as unlabelled",
              read_only=True, float_range=(0.0, 60.0)),
    ParamSpec("summary_path", "", "write the JSON summary here on exit ('': do not write)"),
    ParamSpec("plot_path", "", "write the PNG plot here on exit ('': do not plot)"),
    ParamSpec("duration_s", 0.0, "stop by itself after this many seconds (0: run until stopped)",
              read_only=True, float_range=(0.0, 1e9)),
    ParamSpec("reliability", "reliable", "QoS reliability of the prediction subscription (best_effort also "
              "matches a reliable publisher)", read_only=True, choices=RELIABILITIES, list_choices=False),
)


def _ms(duration) -> float:  # noqa: ANN001 - builtin_interfaces/Duration
    return duration.sec * 1e3 + duration.nanosec / 1e6  # division: 1500000 ns is exactly 1.5 ms


def record_from_message(msg: StagePrediction, received_s: float) -> PredictionRecord:
    """The fields of a StagePrediction the statistics use."""
    return PredictionRecord(
        stamp_ns=msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec,
        image_seq=msg.image_seq,
        stage=msg.stage,
        num_stages=msg.num_stages,
        is_final=msg.is_final,
        stop_reason=msg.stop_reason,
        class_id=msg.class_id,
        latency_ms=_ms(msg.latency),
        budget_ms=_ms(msg.budget),
        received_s=received_s,
    )


class MonitorNode(Node):
    """Collects predictions and labels into MonitorStats; prints the table on a timer."""

    def __init__(self, **node_options: Any) -> None:
        # node_options go to rclpy's Node (context, parameter_overrides, ...): tests run it in-process.
        super().__init__("impatient_monitor", **node_options)
        declare(self, PARAMETERS)
        check_declared(self, self._check_parameters)
        self.add_on_set_parameters_callback(self._check_parameters)

        self.stats = MonitorStats(label_wait_s=self.get_parameter("label_wait_s").value)
        self.bad_labels = 0
        self._last_table = ""
        self.done = Future()
        qos = make_qos(self.get_parameter("reliability").value, 100)
        self.prediction_sub = self.create_subscription(StagePrediction, "prediction", self._on_prediction, qos)
        self.label_sub = self.create_subscription(Int32MultiArray, "label", self._on_label, make_qos("reliable", 100))
        period = self.get_parameter("print_period_s").value
        # Settle waiting predictions at least once a second even when no table is printed.
        self.create_timer(period if period > 0 else 1.0, self._print_table if period > 0 else self._flush)
        duration = self.get_parameter("duration_s").value
        if duration > 0:
            self._stop_timer = self.create_timer(duration, self._stop)
        self.get_logger().info(
            f"listening to {self.prediction_sub.topic_name} and labels on {self.label_sub.topic_name}")

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        # Ranges are enforced by the descriptors, choices by the specs.
        reason = check_values(PARAMETERS, {p.name: p.value for p in params})
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _on_prediction(self, msg: StagePrediction) -> None:
        self.stats.add_prediction(record_from_message(msg, time.monotonic()))

    def _on_label(self, msg: Int32MultiArray) -> None:
        if len(msg.data) != 3:
            self.bad_labels += 1
            self.get_logger().warn(
                f"ignoring a label of {len(msg.data)} values; expected [stamp.sec, stamp.nanosec, class_id]",
                throttle_duration_sec=5.0)
            return
        sec, nanosec, class_id = (int(v) for v in msg.data)
        self.stats.add_label(sec * 1_000_000_000 + nanosec, class_id, time.monotonic())

    def _flush(self) -> None:
        self.stats.flush(time.monotonic())

    def _print_table(self) -> None:
        summary = self.stats.summary(time.monotonic())
        table = format_table(summary)
        # Only when something changed: an idle system does not scroll the terminal.
        if table != self._last_table and (summary["num_stages"] or summary["frames"]["labels_received"]):
            print(table + "\n", flush=True)
            self._last_table = table

    def _stop(self) -> None:
        self._stop_timer.cancel()
        self.done.set_result(True)


def write_outputs(node: MonitorNode) -> None:
    """Final table on stdout, then the summary JSON and the plot where their parameters ask."""
    summary = node.stats.summary(final=True)
    print("final:\n" + format_table(summary), flush=True)
    summary_path = node.get_parameter("summary_path").value
    plot_path = node.get_parameter("plot_path").value
    if summary_path:
        print(f"summary: {write_summary(summary, summary_path)}", flush=True)
    if plot_path:
        print(f"plot: {write_plot(summary, node.stats.timeline, plot_path)}", flush=True)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of impatient-monitor; returns the exit status."""
    return run_node(MonitorNode, args, until=lambda node: node.done, on_exit=write_outputs)


if __name__ == "__main__":
    sys.exit(main())
