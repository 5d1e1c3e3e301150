"""One way to declare and check ROS parameters, shared by impatient_node and the tool nodes.

A node lists its parameters as :class:`ParamSpec` values (name, default,
description, constraints), declares them with :func:`declare` and checks
proposed values with :func:`check_values`, which applies the rules every spec
carries (finite numbers, ``choices``, the exact ``float_range``/``int_range``).
Ranges and read-only flags also go into the ParameterDescriptor, but rclpy's own
range check is not enough: it accepts values within a relative 1e-6 of an edge
(``admission_quantile`` 1.0000005 in [0.5, 1.0]), which the code behind the
parameter then refuses on every use. Rules across parameters (width with
height, the energy table, ...) stay with each node.

No torch here: the tools import this module and must start quickly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

__all__ = ["ParamSpec", "check_declared", "check_values", "declare"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: name, default, description and the constraints its descriptor carries.

    ``default`` None declares a typed parameter without a value (impatient_node's
    ``labels``: unset means "the checkpoint's class names"); ``unset_type`` is
    its type then. ``choices`` are checked by :func:`check_values` and listed in
    ``additional_constraints``; ``list_choices`` also appends them to the
    description (the node's sentence-style descriptions do, the tools' short
    ones never did).
    """

    name: str
    default: Any
    description: str
    read_only: bool = False
    float_range: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()
    unset_type: Parameter.Type | None = None
    list_choices: bool = True

    @property
    def declared_value(self) -> Any:
        """What ``declare_parameter`` gets: the default, or the type of a parameter declared unset."""
        return self.unset_type if self.default is None else self.default

    def descriptor(self) -> ParameterDescriptor:
        """The ParameterDescriptor declared for this parameter (rclpy fills in the type from the value)."""
        text = self.description
        if self.choices and self.list_choices:
            text += f" One of: {', '.join(self.choices)}."
        desc = ParameterDescriptor(description=text, read_only=self.read_only)
        if self.choices:
            desc.additional_constraints = "one of: " + ", ".join(self.choices)
        if self.float_range:
            # step 0 = any value in the range (rcl_interfaces convention).
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(self.float_range[0]), to_value=float(self.float_range[1]), step=0.0)]
        if self.int_range:
            desc.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        return desc


def declare(node: Node, specs: Iterable[ParamSpec]) -> None:
    """Declare every spec on ``node``, in order (overrides from -p or a params file apply here)."""
    for spec in specs:
        node.declare_parameter(spec.name, spec.declared_value, spec.descriptor())


def check_values(specs: Iterable[ParamSpec], values: Mapping[str, Any]) -> str | None:
    """Why one of ``values`` breaks its spec's own rules (finite, one of ``choices``, in its range), or None.

    Ranges are checked exactly (``lo <= value <= hi``), not with rclpy's
    tolerance; the reason names the range.

    Names without a spec (``use_sim_time``) are skipped. Pure: the node's and
    the tools' on-set callbacks both use it.
    """
    by_name = {spec.name: spec for spec in specs}
    for name, value in values.items():
        spec = by_name.get(name)
        if spec is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        if spec.choices and value not in spec.choices:
            return f"{name} must be one of {', '.join(spec.choices)}; got {value!r}"
        bounds = spec.float_range or spec.int_range
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = bounds
            if not low <= value <= high:
                return f"{name} must lie in [{low}, {high}], got {value!r}"
    return None


def check_declared(node: Node, check: Callable[[list[Parameter]], SetParametersResult]) -> None:
    """Run an on-set parameter check on the values given at start-up; ValueError with its reason.

    On-set callbacks see later changes only, so the start-up values (from
    ``-p``, a params file, a launch file) need this explicit pass.
    """
    names = node.list_parameters([], 0).names
    result = check(node.get_parameters(names))
    if not result.successful:
        raise ValueError(f"{node.get_name()}: invalid parameter: {result.reason}")
