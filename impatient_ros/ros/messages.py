"""Engine results -> ``impatient_ros/StagePrediction`` field values (pure: no rclpy import).

The functions fill a message *instance* (or build one from a message *class*)
that the caller passes in, so this module imports neither rclpy nor the
generated message package and is tested without spinning a node. Field
meanings are those of ``msg/StagePrediction.msg``.

Conventions:

* Durations are split into ``sec``/``nanosec`` with ``nanosec`` in
  [0, 1e9) (the ``builtin_interfaces/Duration`` normal form); negative
  durations (a message published "before" an image stamped in the future)
  are clamped to zero.
* ``budget`` zero means unlimited, as in the Budget message.
* ``stage_accuracy`` is the validation accuracy of the answer published (the exit
  ensemble's when it answers, see ``core.ensemble.answer_accuracy``), NaN when the
  checkpoint does not know it.
* ``ensemble`` is the result's: the answer combines exits 1..stage by the
  checkpoint's exit-ensemble weights (false when the result has no such field).
* ``stop_reason`` takes the engine's ``StopReason`` value, which equals the
  message's ``STOP_*`` constants for 0..5; ``NO_TIME`` has no message value
  (nothing is published for such an image) and is refused.
* The image header is copied into every output (each stage topic,
  ``~/prediction``, the vision_msgs copies), so its one unbounded field is
  bounded first: :func:`header_problem` refuses a ``frame_id`` longer than
  :data:`MAX_FRAME_ID_BYTES` (UTF-8 bytes). tf/REP 105 frame ids are short
  names (``camera_optical_frame``); a longer one is a broken or hostile
  sender, and an 8 MB frame_id had multiplied into every output (latency
  tens of ms, +150 MB resident in the reliable writers' histories). The node
  rejects such an image as a bad frame (counted as ``frame_id_too_long``)
  rather than truncating it: a truncated id would name a different frame,
  and a consumer matching frames by id would be silently misled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from impatient_ros.core.results import StopReason

__all__ = [
    "HEADER_REJECTIONS",
    "MAX_FRAME_ID_BYTES",
    "MAX_MESSAGE_STOP_REASON",
    "build_stage_prediction",
    "copy_header",
    "duration_fields",
    "fill_duration",
    "fill_stage_prediction",
    "header_problem",
    "resolve_labels",
    "stage_accuracy",
]

MAX_MESSAGE_STOP_REASON = int(StopReason.ERROR)  # STOP_ERROR; values above (NO_TIME) never go on the wire
_NANO = 1_000_000_000
# int32 seconds of builtin_interfaces/Duration: clamp rather than overflow for "unlimited"-like values.
_MAX_SEC = 2**31 - 1

MAX_FRAME_ID_BYTES = 256  # the longest header.frame_id (UTF-8 bytes) the node copies into its outputs
HEADER_REJECTIONS = ("frame_id_too_long",)

M = TypeVar("M")


def duration_fields(seconds: float) -> tuple[int, int]:
    """``(sec, nanosec)`` of a non-negative duration in seconds (negative/NaN -> 0, huge -> int32 max)."""
    if not seconds > 0.0:  # also catches NaN
        return 0, 0
    total_ns = round(seconds * _NANO)
    sec, nanosec = divmod(total_ns, _NANO)
    if sec > _MAX_SEC:
        return _MAX_SEC, _NANO - 1
    return int(sec), int(nanosec)


def fill_duration(duration: Any, seconds: float) -> Any:
    """Set ``sec``/``nanosec`` of a ``builtin_interfaces/Duration`` instance; returns it."""
    duration.sec, duration.nanosec = duration_fields(seconds)
    return duration


def header_problem(header: Any, max_frame_id_bytes: int = MAX_FRAME_ID_BYTES) -> str | None:
    """Why an image header must not be copied into outputs (a :data:`HEADER_REJECTIONS` code), or None.

    Cheap for any size: a string of more characters than the limit has more
    bytes too, so only a short one is encoded to count its bytes.
    """
    frame_id = header.frame_id
    if len(frame_id) > max_frame_id_bytes or (
            not frame_id.isascii() and len(frame_id.encode("utf-8", "surrogatepass")) > max_frame_id_bytes):
        return "frame_id_too_long"
    return None


def copy_header(target: Any, source: Any) -> Any:
    """Copy stamp and frame_id of one ``std_msgs/Header`` into another (no shared objects).

    The caller checks the source with :func:`header_problem` first (the node does, on arrival).
    """
    target.stamp.sec = source.stamp.sec
    target.stamp.nanosec = source.stamp.nanosec
    target.frame_id = source.frame_id
    return target


def resolve_labels(class_names: Sequence[str], override: Sequence[str] | None, num_classes: int) -> list[str]:
    """The label of every class: the override list if given, else the checkpoint's names, else the ids.

    Raises ValueError when the override does not name every class exactly once
    (a shorter or longer list would silently shift every label).
    """
    if override:
        if len(override) != num_classes:
            raise ValueError(f"labels has {len(override)} entries but the network has {num_classes} classes; "
                             "give one label per class, in class-id order")
        return [str(name) for name in override]
    names = [str(name) for name in class_names]
    if len(names) == num_classes:
        return names
    return [names[i] if i < len(names) else str(i) for i in range(num_classes)]


def stage_accuracy(exit_accuracy: Sequence[float] | None, stage: int) -> float:
    """Validation accuracy of 1-based ``stage`` from a per-exit list (the engine's ``answer_accuracy``), NaN if unknown."""
    if not exit_accuracy or not 1 <= stage <= len(exit_accuracy):
        return math.nan
    value = exit_accuracy[stage - 1]
    return float(value) if value is not None else math.nan


def fill_stage_prediction(
    msg: M,
    result: Any,
    *,
    header: Any,
    image_seq: int,
    labels: Sequence[str],
    accuracy: float,
    latency_s: float,
    budget_s: float | None,
) -> M:
    """Fill a ``StagePrediction`` instance from an engine ``StageResult``; returns ``msg``.

    ``header`` is the source image's ``std_msgs/Header`` (copied), ``image_seq``
    the node's counter of accepted images, ``labels`` one name per class,
    ``accuracy`` this exit's validation accuracy (NaN if unknown), ``latency_s``
    the time from the image's reference time to publication, ``budget_s`` the
    budget that applied (None = unlimited, sent as zero).
    """
    stop = int(result.stop_reason)
    if stop > MAX_MESSAGE_STOP_REASON:
        raise ValueError(f"stop reason {result.stop_reason!r} has no StagePrediction value; "
                         "an image without any stage result must not be published")
    if result.is_final == (stop == 0):
        raise ValueError(f"inconsistent result: is_final={result.is_final} with stop reason {result.stop_reason!r}")
    if not 1 <= result.stage <= result.num_stages:
        raise ValueError(f"stage {result.stage} outside 1..{result.num_stages}")
    class_id = int(result.class_id)
    copy_header(msg.header, header)
    msg.image_seq = int(image_seq)
    msg.stage = int(result.stage)
    msg.num_stages = int(result.num_stages)
    msg.is_final = bool(result.is_final)
    msg.stop_reason = stop
    msg.class_id = class_id
    msg.label = labels[class_id] if 0 <= class_id < len(labels) else str(class_id)
    msg.score = float(result.score)
    msg.ratio_1v2 = float(result.ratio_1v2)
    msg.top_ids = [int(i) for i in result.top_ids]
    msg.top_scores = [float(s) for s in result.top_scores]
    # Results built before StageResult.ensemble existed (or stand-ins) are an exit's own answer.
    msg.ensemble = bool(getattr(result, "ensemble", False))
    msg.stage_accuracy = float(accuracy)
    fill_duration(msg.latency, latency_s)
    fill_duration(msg.budget, 0.0 if budget_s is None else budget_s)
    return msg


def build_stage_prediction(msg_class: type[M], result: Any, **fields: Any) -> M:
    """A new ``msg_class()`` filled by :func:`fill_stage_prediction` (same keyword arguments)."""
    return fill_stage_prediction(msg_class(), result, **fields)
