"""docs/RELIABILITY.md: every row of its tables names at least one test, and every test it names exists."""

import ast
import re

from .test_templates import REPO

DOC = REPO / "docs" / "RELIABILITY.md"


def _defined_tests(module: str) -> set[str]:
    tree = ast.parse((REPO / module).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_row_names_tests_that_exist():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| Fault")]
    assert len(rows) >= 30
    for row in rows:
        cited, module = [], None
        for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", row.split("|")[-2]):
            module = match.group(1) or module  # "`::name`" continues the module named before it in the cell
            assert module, row
            cited.append((module, match.group(2)))
        assert cited, f"row without a test: {row[:80]}"
        for module, name in cited:
            assert name in _defined_tests(module), f"{module}::{name} (row {row[:60]!r}) does not exist"
