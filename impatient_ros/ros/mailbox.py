"""The single-slot mailbox between impatient_node's image callback and its inference thread (pure)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LatestFrameMailbox"]


class LatestFrameMailbox:
    """A single slot: ``put`` replaces a waiting item, ``take`` blocks until one is there (thread-safe).

    The node always works on the newest frame: an image that arrives while
    another still waits replaces it, and ``put`` says so (a dropped frame).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None

    def put(self, item: Any) -> bool:
        """Store ``item``; True if it replaced one that was still waiting (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The waiting item (emptying the slot), or None after ``timeout`` seconds."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> int:
        """Empty the slot; 1 if an item was discarded, else 0."""
        with self._cond:
            discarded = int(self._item is not None)
            self._item = None
            return discarded

    def wake(self) -> None:
        """Wake a waiting ``take`` (used when stopping the inference thread)."""
        with self._cond:
            self._cond.notify_all()
