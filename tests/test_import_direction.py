"""The one direction of imports: the CLI is a face over the library, so no library module imports ``transferkit.cli``
(a spawned worker or a notebook must not need the command line to run)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "transferkit"


#: functions that are the CLI half of a library plug-in and may use the CLI's argparse helpers: an evaluation
#: hook's ``add_arguments(parser)`` (see ``transferkit.evaluation.hooks``)
CLI_FACING_FUNCTIONS = {"add_arguments"}


def cli_imports(source: str) -> list[int]:
    """Line numbers of ``import transferkit.cli...`` / ``from transferkit.cli... import ...`` outside the
    CLI-facing functions."""
    tree = ast.parse(source)
    exempt = {id(inner) for node in ast.walk(tree)
              if isinstance(node, ast.FunctionDef) and node.name in CLI_FACING_FUNCTIONS for inner in ast.walk(node)}
    lines = []
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if id(node) not in exempt and any(n == "transferkit.cli" or n.startswith("transferkit.cli.") for n in names):
            lines.append(node.lineno)
    return lines


def test_the_rule_sees_both_import_forms():
    assert cli_imports("from transferkit.cli.main import setup_logging\nimport transferkit.cli.options\n"
                       "from transferkit.console import format_table\n") == [1, 2]
    assert cli_imports("def add_arguments(parser):\n    from transferkit.cli.options import number\n"
                       "def run():\n    from transferkit.cli.options import number\n") == [4]


def test_no_library_module_imports_the_cli():
    found = [f"{path.relative_to(SRC)}:{line}" for path in sorted(SRC.rglob("*.py"))
             if path.relative_to(SRC).parts[0] not in ("cli", "__main__.py")
             for line in cli_imports(path.read_text())]
    assert found == [], "move what they need out of transferkit.cli: " + ", ".join(found)
