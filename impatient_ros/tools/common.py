"""Small ROS 2 tool nodes around the classifier node, and the helpers they share.

* ``impatient-camera``  (:mod:`.camera`)  - publishes images from a data set, a folder or a video
* ``impatient-budget``  (:mod:`.budget`)  - publishes impatient_ros/Budget from a schedule
* ``impatient-monitor`` (:mod:`.monitor`) - joins predictions with true labels, prints and plots

The logic each tool needs (image sources, budget schedules, statistics) lives
in pure modules (:mod:`impatient_ros.tools.sources`, :mod:`impatient_ros.tools.schedule`,
:mod:`impatient_ros.tools.monitor_stats`); the nodes here only wire it to ROS. This
package imports rclpy; the pure modules do not.
"""

from __future__ import annotations

from typing import Callable, Sequence

import rclpy
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future

__all__ = ["RELIABILITIES", "check_declared", "describe", "make_qos", "run_node"]

RELIABILITIES: tuple[str, ...] = ("best_effort", "reliable")

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


def describe(
    description: str,
    kind: type,
    *,
    read_only: bool = False,
    choices: Sequence[str] | None = None,
    int_range: tuple[int, int] | None = None,
    float_range: tuple[float, float] | None = None,
) -> ParameterDescriptor:
    """A ParameterDescriptor; ``choices`` are listed in additional_constraints (checked by the node)."""
    descriptor = ParameterDescriptor(
        description=description,
        type=_TYPES[kind],
        read_only=read_only,
        additional_constraints=f"one of: {', '.join(choices)}" if choices else "",
    )
    if int_range is not None:
        descriptor.integer_range = [IntegerRange(from_value=int_range[0], to_value=int_range[1], step=1)]
    if float_range is not None:
        # step 0 = any value in the range (rcl_interfaces convention).
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)
        ]
    return descriptor


def check_declared(node: Node, check: Callable[[list[Parameter]], SetParametersResult]) -> None:
    """Run an on-set parameter check on the values given at start-up; ValueError with its reason.

    On-set callbacks see later changes only, so the start-up values (from
    ``-p``, a params file, a launch file) need this explicit pass.
    """
    names = node.list_parameters([], 0).names
    result = check(node.get_parameters(names))
    if not result.successful:
        raise ValueError(f"{node.get_name()}: invalid parameter: {result.reason}")


def make_qos(reliability: str, depth: int, *, transient_local: bool = False) -> QoSProfile:
    """Keep-last QoS from a reliability name in RELIABILITIES."""
    if reliability not in RELIABILITIES:
        raise ValueError(f"unknown reliability {reliability!r}; valid: {', '.join(RELIABILITIES)}")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE,
    )


def run_node(
    make_node: Callable[[], Node],
    args: Sequence[str] | None,
    *,
    until: Callable[[Node], Future | None] | None = None,
    on_exit: Callable[[Node], None] | None = None,
) -> int:
    """Init rclpy, spin the node until Ctrl-C/SIGTERM (or the future ``until`` gives), shut down.

    ``on_exit`` runs after the ROS context is gone, also after Ctrl-C, so a tool
    can still write its results. Returns the process exit status: the node's
    ``exit_status`` attribute (0 if it has none), or 1 when the node could not be
    created (its error is logged, not raised as a traceback).
    """
    node: Node | None = None
    try:
        rclpy.init(args=args)
        try:
            node = make_node()
        except (ValueError, ParameterException) as exc:
            # Invalid parameters or sources: a clear one-line message, not a traceback.
            rclpy.logging.get_logger("impatient_ros.tools").fatal(str(exc))
            return 1
        future = until(node) if until is not None else None
        if future is not None:
            rclpy.spin_until_future_complete(node, future)
        else:
            rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C or SIGTERM: the normal way to stop a tool
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        if node is not None and on_exit is not None:
            on_exit(node)
    return int(getattr(node, "exit_status", 0))
