"""The choice tuples of parameters that the node and the tools share (pure, no imports).

Each tuple of allowed values has one owner; the rest import it:

* ``TRANSPORTS``, ``RELIABILITIES``: here (impatient_node's ``input_transport`` and
  ``image_reliability``, the tools' ``transport`` and ``reliability``);
* ``REFERENCE_TIMES``: :mod:`impatient_ros.ros.budget_policy`, whose
  ``reference_time()`` takes one;
* ``EXECUTORS``: :mod:`impatient_ros.ros.executors`, whose ``make_executor()`` takes one;
* ``VISION_MSGS_CHOICES``: :mod:`impatient_ros.ros.vision_messages`, whose ``load_vision_msgs()``
  takes one;
* the node's ``mode`` choices: the engine's ``Mode`` enum (:mod:`impatient_ros.ros.node_params`).
"""

from __future__ import annotations

__all__ = ["RELIABILITIES", "TRANSPORTS"]

TRANSPORTS: tuple[str, ...] = ("raw", "compressed")        # image_transport's names for the two topics
RELIABILITIES: tuple[str, ...] = ("best_effort", "reliable")  # QoS reliability, by its ROS 2 name
