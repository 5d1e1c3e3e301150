"""The tier rules of the package layout (docs/ARCHITECTURE.md), checked on the source.

* ``impatient_ros.core`` imports neither torch nor rclpy: the training CLI's
  parsing, the tools and the node's pure helpers use it without paying for them.
* Nothing under ``impatient_ros/`` imports the offline ``training`` package
  (installed as ``impatient_ros.training``): the robot runs without it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "impatient_ros"
CORE_MODULES = sorted(
    f"impatient_ros.core.{p.stem}" if p.stem != "__init__" else "impatient_ros.core"
    for p in (PACKAGE / "core").glob("*.py")
)


def test_core_modules_are_found():
    assert {"impatient_ros.core", "impatient_ros.core.budget", "impatient_ros.core.calibration",
            "impatient_ros.core.ready_times", "impatient_ros.core.idx", "impatient_ros.core.atomic"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_neither_torch_nor_rclpy(module: str) -> None:
    # A fresh interpreter per module: one module's heavy import must not hide another's.
    code = (f"import sys; import {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rclpy')); "
            "print(bad[:5]); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {module} pulls in {done.stdout.strip()} {done.stderr[-2000:]}"


def _imported_names(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or ``text`` as if it were there)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if package.endswith(".__init__"):
        package = package[: -len(".__init__")]
    names = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names.append((node.lineno, base))
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # from pkg import training
    return names


def test_nothing_under_impatient_ros_imports_training() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in _imported_names(path):
            if name.split(".")[0] == "training" or name.startswith("impatient_ros.training"):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offenders, "the runtime package must not import the training package:\n" + "\n".join(offenders)


def test_the_import_scan_sees_relative_and_absolute_imports() -> None:
    text = "import training.data\nfrom impatient_ros import training\nfrom ..training import x\n"
    names = [n for _, n in _imported_names(PACKAGE / "core" / "probe.py", text)]
    assert "training.data" in names and "impatient_ros.training" in names and "impatient_ros.training.x" in names
