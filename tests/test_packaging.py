"""What the package imports, it declares: every third-party module imported anywhere in
``pytest_svctunnel`` (also inside functions) belongs to a distribution named in pyproject.toml's
``dependencies`` (as the installed package's metadata has them), not one that only arrives
through another package."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "pytest_svctunnel"


def imported_top_level_modules() -> dict[str, list[str]]:
    """Top-level module -> the files importing it, for every absolute import in the package."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    """The run-time requirements of the installed package (its metadata comes from pyproject.toml)."""
    requirements = importlib.metadata.requires("pytest-svctunnel") or []
    run_time = [spec for spec in requirements if "extra ==" not in spec]
    return {_normal(re.split(r"[\s<>=!~;\[(]", spec, maxsplit=1)[0]) for spec in run_time}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {}
    for module, files in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "pytest_svctunnel":
            continue
        providers = {_normal(d) for d in distributions.get(module, [])}
        assert providers, f"{module} (imported in {files}) is not installed"
        if not providers & declared:
            undeclared[module] = (sorted(providers), sorted(set(files)))
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
