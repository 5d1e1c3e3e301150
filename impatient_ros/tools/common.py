"""The rclpy helpers the tool nodes share: QoS from a reliability name, and the run loop.

The tools (:mod:`.camera`, :mod:`.budget`, :mod:`.monitor`) declare their
parameters like the classifier node, as ParamSpec lists
(:mod:`impatient_ros.ros.params`); their logic lives in the pure modules
:mod:`.sources`, :mod:`.schedule` and :mod:`.monitor_stats`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future

from impatient_ros.ros.choices import RELIABILITIES

__all__ = ["make_qos", "run_node"]


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
