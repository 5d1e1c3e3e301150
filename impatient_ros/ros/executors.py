"""Which rclpy executor runs impatient_node's callbacks, and the loop that spins it."""

from __future__ import annotations

from typing import Any

import rclpy
from rclpy.executors import SingleThreadedExecutor

__all__ = ["EXECUTORS", "make_executor", "spin"]

EXECUTORS: tuple[str, ...] = ("events", "single")  # the node's ``executor`` parameter


def make_executor(kind: str) -> Any:
    """The executor ``kind`` ("events" or "single"); rclpy's EventsExecutor only where this rclpy has it."""
    if kind == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            return SingleThreadedExecutor()
        return EventsExecutor()
    return SingleThreadedExecutor()


def spin(executor: Any, node: Any) -> None:
    """Spin until the context shuts down (Ctrl-C, SIGTERM, rclpy.shutdown()).

    Short spin_once calls rather than spin(), for either executor: rclpy's
    EventsExecutor does not return from spin() when a signal shuts the context
    down (the SingleThreadedExecutor's spin() is this same loop).
    """
    executor.add_node(node)
    while rclpy.ok(context=node.context):
        executor.spin_once(timeout_sec=0.2)
