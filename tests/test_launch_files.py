"""The launch files' structure, read with ``ast`` (nothing of launch is imported or stood in for).

launch/launch_ros are on no package registry, so CI cannot run the launch
files; tests/test_launch.py runs them for real where they can be imported.
What this adds everywhere: every launch argument is described, and every
value a launch file hands a node parameter is typed as that parameter is
declared (untyped, launch_ros parses ``rate_hz:=15`` as an integer, which a
double parameter refuses, killing the process).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from impatient_ros.ros import node_params
from impatient_ros.tools import budget, camera, monitor

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILES = ["impatient.launch.py", "demo.launch.py"]
SPECS_BY_EXECUTABLE = {
    "impatient_node": node_params.PARAMETERS,
    "impatient-camera": camera.PARAMETERS,
    "impatient-budget": budget.PARAMETERS,
    "impatient-monitor": monitor.PARAMETERS,
}


def _tree(name: str) -> ast.Module:
    return ast.parse((REPO / "launch" / name).read_text())


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments (NOT_GIVEN = "", ...)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return found


def _value(node: ast.AST, constants: dict[str, object]) -> object:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.List):
        return [_value(item, constants) for item in node.elts]
    return ast.literal_eval(node)


def _declared(tree: ast.Module) -> dict[str, dict[str, ast.AST]]:
    declared = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument":
            declared[call.args[0].value] = {kw.arg: kw.value for kw in call.keywords}
    return declared


def _type_name(spec: node_params.ParamSpec) -> str:
    return type(spec.default).__name__


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_launch_argument_has_a_description_and_a_default(name: str) -> None:
    declared = _declared(_tree(name))
    assert len(declared) >= 8
    for argument, keywords in declared.items():
        assert "default_value" in keywords, f"{name}: {argument} has no default"
        assert "description" in keywords, f"{name}: {argument} has no description"
        texts = [n.value for n in ast.walk(keywords["description"])
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert sum(map(len, texts)) > 15, f"{name}: {argument}'s description says too little: {texts}"


def test_node_launch_arguments_are_typed_and_default_to_not_given() -> None:
    tree = _tree("impatient.launch.py")
    constants = _constants(tree)
    declared = _declared(tree)
    table = constants.get("PARAMETER_ARGUMENTS")
    if table is None:  # a dict of tuples holding type names: not a literal, read it by hand
        assign = next(n for n in tree.body if isinstance(n, ast.Assign)
                      and getattr(n.targets[0], "id", "") == "PARAMETER_ARGUMENTS")
        table = {key.value: (value.elts[0].value, value.elts[1].id)
                 for key, value in zip(assign.value.keys, assign.value.values)}
    specs = {spec.name: spec for spec in node_params.PARAMETERS}
    assert {"checkpoint", "device", "mode", "default_budget_ms", "input_transport", "num_threads"} <= {
        parameter for parameter, _ in table.values()}
    for argument, (parameter, type_name) in table.items():
        spec = specs[parameter]
        assert type_name == _type_name(spec), f"{argument} -> {parameter} typed {type_name}, declared {_type_name(spec)}"
        keywords = declared[argument]
        # '' = not given: the params file's value stays (a launch default must never override it).
        assert _value(keywords["default_value"], constants) == "", argument
        if "choices" in keywords:
            assert _value(keywords["choices"], constants) == ["", *spec.choices], argument
    for argument in ("params_file", "camera_topic", "namespace", "log_level"):
        assert argument in declared


def test_demo_launch_types_every_parameter_it_sets() -> None:
    tree = _tree("demo.launch.py")
    constants = _constants(tree)
    declared = _declared(tree)
    nodes = [call for call in ast.walk(tree) if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Node"]
    assert {kw.value.value for call in nodes for kw in call.keywords if kw.arg == "executable"} == set(
        SPECS_BY_EXECUTABLE)
    for call in nodes:
        keywords = {kw.arg: kw.value for kw in call.keywords}
        executable = keywords["executable"].value
        specs = {spec.name: spec for spec in SPECS_BY_EXECUTABLE[executable]}
        (parameters,) = keywords["parameters"].elts
        for key, value in zip(parameters.keys, parameters.values):
            spec = specs[key.value]
            where = f"{executable} parameter {key.value}"
            if isinstance(value, ast.Constant):
                assert type(value.value) is type(spec.default), f"{where}: literal {value.value!r}"
                continue
            # typed("argument", type): a launch argument as a ParameterValue of the declared type
            assert isinstance(value, ast.Call) and value.func.id == "typed", f"{where} is not typed"
            argument, type_node = value.args
            assert type_node.id == _type_name(spec), f"{where} typed {type_node.id}"
            default = _value(declared[argument.value]["default_value"], constants)
            coerced = {"str": str, "float": float, "int": int}[type_node.id](default)
            if spec.choices:
                assert coerced in spec.choices, f"{where}: default {default!r}"
    # num_threads comes from the launch, not from OMP_NUM_THREADS in the environment.
    node_call = next(c for c in nodes if any(kw.arg == "executable" and kw.value.value == "impatient_node"
                                             for kw in c.keywords))
    assert "num_threads" in {k.value for d in ast.walk(node_call) if isinstance(d, ast.Dict) for k in d.keys}
    assert "OMP_NUM_THREADS" not in (REPO / "launch" / "demo.launch.py").read_text()


def test_node_launch_takes_cameras_and_their_topics_as_name_lists() -> None:
    tree = _tree("impatient.launch.py")
    constants = _constants(tree)
    declared = _declared(tree)
    for argument in ("cameras", "camera_topics"):
        # '' = not given: a params file's cameras stay (and the single-camera node is the default).
        assert _value(declared[argument]["default_value"], constants) == "", argument
    # Not in the typed table: a YAML list of names, checked by the launch file itself (_name_list).
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"_name_list", "_remappings"} <= functions
    assert "cameras" in {spec.name for spec in node_params.PARAMETERS}
