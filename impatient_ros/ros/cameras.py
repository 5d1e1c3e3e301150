"""impatient_node's cameras: the names' rule, each camera's topic names and budget (pure: no rclpy).

With ``cameras`` empty the node serves one camera on today's topics. With
names, camera ``<name>`` reads ``<name>/image`` (or ``<name>/image/compressed``)
and ``<name>/budget``, and publishes ``~/<name>/stage_k``, ``~/<name>/prediction``
(and ``~/<name>/classification[/stage_k]`` with vision_msgs). A name is one ROS
name token, so every derived topic is valid and remappable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from impatient_ros.ros.budget_policy import EffectiveBudget

__all__ = ["camera_budget", "camera_input", "camera_names_problem", "camera_output"]

# One token of a ROS name: a letter, then letters, digits, underscores (no "/", no "~", no "{}").
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def camera_names_problem(names: Sequence[str] | None) -> str | None:
    """Why ``names`` cannot be the ``cameras`` parameter, or None (empty or None: one unnamed camera)."""
    if not names:
        return None
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            return (f"camera name {name!r} is not a ROS name token (a letter, then letters, digits or "
                    "underscores): it becomes part of topic names")
        if name in seen:
            return f"camera name {name!r} appears twice in cameras {list(names)}; each camera needs its own topics"
        seen.add(name)
    return None


def camera_input(camera: str, topic: str) -> str:
    """Relative input topic of a camera (``image``, ``budget``): ``<camera>/<topic>``, or ``topic`` unnamed."""
    return f"{camera}/{topic}" if camera else topic


def camera_output(camera: str, topic: str) -> str:
    """Private output topic of a camera: ``~/<camera>/<topic>``, or ``~/<topic>`` unnamed."""
    return f"~/{camera}/{topic}" if camera else f"~/{topic}"


def camera_budget(own: EffectiveBudget, shared: EffectiveBudget) -> EffectiveBudget:
    """A camera's budget: a fresh message on its own budget topic, else the node's (topic, energy, default)."""
    return own if own.source == "topic" else shared
