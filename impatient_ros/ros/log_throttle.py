"""Cheap per-key log throttling for impatient_node's hot callbacks (pure)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["LogThrottle"]


class LogThrottle:
    """At most one log message per key and period, decided with one clock read.

    rclpy's own ``throttle_duration_sec`` identifies the call site by inspecting the
    caller's frame and source file on every call (~0.3 ms, measured) even when it then
    suppresses the message: a flood of invalid Budget messages kept the executor busy
    with logging alone and starved the image callbacks (tests/test_reliability.py).
    A race between two threads at worst logs one extra message. ``clock`` is
    ``time.monotonic`` unless a test passes its own.
    """

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._period_s = period_s
        self._clock = clock
        self._last: dict[str, float] = {}

    def ready(self, key: str) -> bool:
        """True (and the period restarts) if nothing was logged under ``key`` for ``period_s``."""
        now = self._clock()
        if now - self._last.get(key, -math.inf) < self._period_s:
            return False
        self._last[key] = now
        return True
