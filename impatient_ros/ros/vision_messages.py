"""Engine results -> ``vision_msgs`` field values (pure: no rclpy, no vision_msgs import).

``vision_msgs`` (ros-perception/vision_msgs 4.x) is the vocabulary other ROS 2
perception code already speaks, so the node publishes a
``vision_msgs/Classification`` beside each ``StagePrediction`` and the class
map once as ``vision_msgs/LabelInfo``. Like :mod:`impatient_ros.ros.messages`,
these functions fill message instances (or build them from classes) the caller
passes in, so the rules are tested without a node and without vision_msgs.

Conventions:

* ``ObjectHypothesis.class_id`` is a *string* in vision_msgs 4.x; it holds the
  decimal class id (the StagePrediction's ``class_id``), which LabelInfo's
  ``class_map`` (``uint16`` ids) maps to the class name.
* ``results``: the exit's top-k classes (the node's ``top_k``), best first.
  Scores are softmax probabilities, kept in [0, 1] (the softmax can round past
  1 by an ulp); a NaN score means a broken network and is refused.
* ``header``: the source image's header, so an exact-time synchronizer pairs a
  result with its image (as vision_msgs asks).
* ``LabelInfo.threshold`` is 0: the node sends its top-k whatever their score.
  Class id 65535 is vision_msgs' "UNLABELED", so a network may have at most
  65535 classes.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from impatient_ros.ros.messages import copy_header

__all__ = [
    "UNLABELED_CLASS_ID",
    "VISION_MSGS_CHOICES",
    "build_classification",
    "build_label_info",
    "class_map",
    "fill_classification",
    "fill_label_info",
    "hypotheses",
    "load_vision_msgs",
]

# The vision_msgs parameter: auto = publish when the package can be imported; required = it must be
# (configure fails otherwise); disabled = never. Not on/off: YAML (-p, params files) reads those as booleans.
VISION_MSGS_CHOICES: tuple[str, ...] = ("auto", "required", "disabled")
UNLABELED_CLASS_ID = 65535  # vision_msgs/VisionClass: the maximum uint16 is the "UNLABELED" class

M = TypeVar("M")


def load_vision_msgs(setting: str, import_module: Callable[[str], ModuleType] = importlib.import_module,
                     ) -> ModuleType | None:
    """The ``vision_msgs.msg`` module to publish with, or None (``disabled``, or ``auto`` without the package).

    ``required`` without an importable package raises RuntimeError saying how to get it
    or switch it off: asking for standard output and silently not sending it
    would leave a consumer waiting on an empty topic.
    """
    if setting not in VISION_MSGS_CHOICES:
        raise ValueError(f"vision_msgs must be one of {', '.join(VISION_MSGS_CHOICES)}; got {setting!r}")
    if setting == "disabled":
        return None
    try:
        module = import_module("vision_msgs.msg")
        for name in ("Classification", "ObjectHypothesis", "LabelInfo", "VisionClass"):
            getattr(module, name)
    except (ImportError, AttributeError) as exc:
        if setting == "auto":
            return None
        raise RuntimeError(
            f"vision_msgs:=required but the vision_msgs messages cannot be imported ({type(exc).__name__}: "
            f"{exc}); install vision_msgs 4.x (e.g. apt install ros-$ROS_DISTRO-vision-msgs) and source it, "
            "or set vision_msgs:=auto (publish only when available) or disabled") from exc
    return module


def hypotheses(top_ids: Sequence[int], top_scores: Sequence[float]) -> list[tuple[str, float]]:
    """``(class_id as text, score)`` for every listed class, best first, scores clamped to [0, 1].

    The sort is stable, so ties keep the engine's order (its arg max first).
    """
    if len(top_ids) != len(top_scores):
        raise ValueError(f"{len(top_ids)} class ids but {len(top_scores)} scores")
    pairs = []
    for class_id, score in zip(top_ids, top_scores):
        score = float(score)
        if math.isnan(score):
            raise ValueError(f"class {class_id} has a NaN score")
        pairs.append((str(int(class_id)), min(1.0, max(0.0, score))))
    return sorted(pairs, key=lambda pair: -pair[1])


def class_map(labels: Sequence[str]) -> list[tuple[int, str]]:
    """``(class_id, name)`` for every class, in id order (LabelInfo's ``class_map``)."""
    if len(labels) > UNLABELED_CLASS_ID:
        raise ValueError(f"{len(labels)} classes do not fit vision_msgs' uint16 class ids "
                         f"(at most {UNLABELED_CLASS_ID}; {UNLABELED_CLASS_ID} means UNLABELED)")
    return [(class_id, str(name)) for class_id, name in enumerate(labels)]


def fill_classification(msg: M, result: Any, *, header: Any, hypothesis_class: type) -> M:
    """Fill a ``vision_msgs/Classification`` from an engine ``StageResult``; returns ``msg``.

    ``header`` is the source image's ``std_msgs/Header`` (copied);
    ``hypothesis_class`` is ``vision_msgs.msg.ObjectHypothesis``.
    """
    copy_header(msg.header, header)
    msg.results = [hypothesis_class(class_id=class_id, score=score)
                   for class_id, score in hypotheses(result.top_ids, result.top_scores)]
    return msg


def build_classification(msg_class: type[M], result: Any, **fields: Any) -> M:
    """A new ``msg_class()`` filled by :func:`fill_classification` (same keyword arguments)."""
    return fill_classification(msg_class(), result, **fields)


def fill_label_info(msg: M, labels: Sequence[str], *, vision_class: type, header: Any = None,
                    threshold: float = 0.0) -> M:
    """Fill a ``vision_msgs/LabelInfo`` with one ``VisionClass`` per label; returns ``msg``.

    ``header`` (optional) stamps the message; its ``frame_id`` stays empty unless given.
    """
    if header is not None:
        copy_header(msg.header, header)
    msg.class_map = [vision_class(class_id=class_id, class_name=name) for class_id, name in class_map(labels)]
    msg.threshold = float(threshold)
    return msg


def build_label_info(msg_class: type[M], labels: Sequence[str], **fields: Any) -> M:
    """A new ``msg_class()`` filled by :func:`fill_label_info` (same keyword arguments)."""
    return fill_label_info(msg_class(), labels, **fields)
