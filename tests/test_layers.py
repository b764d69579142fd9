"""The packages' layering: each imports only from the layers below it.

    schemas <- streams <- conversation <- processors, inference, ops <- tidegate <- bench

processors, inference and ops share a layer and never import each other. Every
import statement counts, also those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS: list[set[str]] = [
    {"schemas"},
    {"streams"},
    {"conversation"},
    {"processors", "inference", "ops", "gateway"},
    {"tidegate"},
    {"bench"},
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(our top-level package, line) for every import in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LEVEL:
                found.add((top, node.lineno))
    return found


def layering_violations(root: Path) -> list[str]:
    violations = []
    for package, level in LEVEL.items():
        for path in sorted((root / package).rglob("*.py")):
            for imported, line in sorted(imported_packages(path)):
                if imported == package:
                    continue
                if LEVEL[imported] >= level:
                    violations.append(f"{path.relative_to(root)}:{line} imports {imported} (layer {LEVEL[imported]})")
    return violations


def test_every_package_imports_only_from_layers_below() -> None:
    assert layering_violations(ROOT) == []


def test_every_package_is_in_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    assert packages == set(LEVEL)


@pytest.mark.parametrize(
    ("package", "source", "bad"),
    [
        ("schemas", "from streams.exceptions import TidegateError\n", True),
        ("processors", "def f():\n    from inference.runners import Prompt\n", True),
        ("ops", "from streams.lag import LagReader\n", False),
    ],
)
def test_the_check_catches_an_upward_or_sideways_import(tmp_path: Path, package: str, source: str, bad: bool) -> None:
    for name in LEVEL:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "module.py").write_text(source)
    assert bool(layering_violations(tmp_path)) is bad
