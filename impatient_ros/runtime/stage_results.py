"""How the engine builds an exit's answer (:class:`~impatient_ros.core.results.StageResult`).

An exit's answer is its probabilities plus their ranking: the class, its label
and score, the top-k ids and scores and the 1-vs-2 ratio. Ranking means a sort
over the classes, a cost per exit that a small network cannot hide, and many
exits' answers are never read beyond their probabilities (the node publishes
the ranking; a scheduler or a benchmark often does not look at it). So the
engine's results rank themselves when one of those fields is first read
(:func:`stage_result`); they read, compare and ``dataclasses.replace`` like a
StageResult built with every field.

``ratio_1v2`` is ``p1 / max(p2, RATIO_EPSILON)``: the floor keeps the ratio
finite when the runner-up probability underflows to zero in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from impatient_ros.core.results import StageResult, StopReason

__all__ = ["RATIO_EPSILON", "made_final", "rank", "stage_result"]

RATIO_EPSILON = 1e-12  # floor for the runner-up probability in ratio_1v2


_RANKING_FIELDS = ("class_id", "label", "score", "top_ids", "top_scores", "ratio_1v2")


def _ranking_field(name: str) -> property:
    def read(self: StageResult) -> Any:
        values = self.__dict__
        if name not in values:
            top_k, class_names = values["_ranking_of"]
            top_ids, top_scores, ratio = rank(values["probs"], top_k)
            class_id = top_ids[0]
            values.update(class_id=class_id, score=top_scores[0], top_ids=top_ids, top_scores=top_scores,
                          ratio_1v2=ratio,
                          label=class_names[class_id] if class_id < len(class_names) else str(class_id))
        return values[name]

    def write(self: StageResult, value: Any) -> None:  # only the dataclass __init__ sets fields
        self.__dict__[name] = value

    return property(read, write, doc=f"StageResult.{name}, ranked from probs when first read")


class _LazyStageResult(StageResult):
    """A :class:`StageResult` whose ranking (class_id, label, score, top-k, ratio_1v2) is computed when read.

    Every field reads as in a StageResult built with all of them (same values,
    same types; ``dataclasses.replace`` and ``==`` work); the top-k sort of the
    probabilities runs once, on the first read of any of them, so an exit
    nobody looks at costs no ranking. The engine builds it by filling
    ``__dict__`` (the frozen dataclass ``__init__`` sets 14 fields one by one).
    """

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StageResult):
            return NotImplemented
        return all(getattr(self, f.name) is getattr(other, f.name) or getattr(self, f.name) == getattr(other, f.name)
                   for f in dataclasses.fields(StageResult))

    __hash__ = None  # type: ignore[assignment]  # as StageResult's: eq without a hash (probs is an array)


for _name in _RANKING_FIELDS:
    setattr(_LazyStageResult, _name, _ranking_field(_name))
del _name

_new_object = object.__new__
# The lazy result fills __dict__ directly: only while StageResult is a plain frozen dataclass of these fields.
_LAZY_RESULT = (
    "__slots__" not in vars(StageResult) and not hasattr(StageResult, "__post_init__")
    and [f.name for f in dataclasses.fields(StageResult)] == [
        "stage", "num_stages", "class_id", "label", "score", "top_ids", "top_scores", "ratio_1v2", "probs",
        "ready_time", "elapsed_s", "is_final", "stop_reason", "repeated", "ensemble"]
)


def stage_result(stage: int, num_stages: int, probs: np.ndarray, ready_time: float, elapsed_s: float,
                 stop: StopReason, ensemble: bool, top_k: int, class_names: list[str]) -> StageResult:
    """The answer of exit ``stage`` (1-based): final unless ``stop`` is NONE; ranked when first read."""
    if _LAZY_RESULT:
        result = _new_object(_LazyStageResult)
        result.__dict__.update(
            stage=stage, num_stages=num_stages, probs=probs, ready_time=ready_time, elapsed_s=elapsed_s,
            is_final=stop is not StopReason.NONE, stop_reason=stop, repeated=False, ensemble=ensemble,
            _ranking_of=(top_k, class_names))
        return result
    top_ids, top_scores, ratio = rank(probs, top_k)
    class_id = top_ids[0]
    return StageResult(stage, num_stages, class_id, class_names[class_id] if class_id < len(class_names)
                       else str(class_id), top_scores[0], top_ids, top_scores, ratio, probs, ready_time, elapsed_s,
                       stop is not StopReason.NONE, stop, ensemble=ensemble)


def made_final(result: StageResult, stop: StopReason) -> StageResult:
    """``result`` as the final answer with ``stop``; only for a result nobody has been handed yet (it may be
    changed in place)."""
    if _LAZY_RESULT and isinstance(result, _LazyStageResult):
        result.__dict__.update(is_final=True, stop_reason=stop)
        return result
    return dataclasses.replace(result, is_final=True, stop_reason=stop)


def rank(probs: np.ndarray, top_k: int) -> tuple[list[int], list[float], float]:
    """Top-k ids and scores (best first, ties by lower id) and the 1-vs-2 ratio.

    The runner-up is floored at RATIO_EPSILON so the ratio stays finite. Up to
    64 classes a Python sort of the values is cheaper than numpy's argsort of
    a small array (stable, so ties keep the lower id first, as argsort does).
    """
    n = len(probs)
    if n <= 64:
        values = probs.tolist()
        order = sorted(range(n), key=values.__getitem__, reverse=True)
        top_ids = order[:top_k]
        top_scores = [values[i] for i in top_ids]
        p2 = values[order[1]] if n > 1 else 0.0
        return top_ids, top_scores, top_scores[0] / max(p2, RATIO_EPSILON)
    order = np.argsort(-probs, kind="stable")
    p1, p2 = probs[order[:2]].tolist()
    top = order[:top_k]
    return top.tolist(), probs[top].tolist(), p1 / max(p2, RATIO_EPSILON)
