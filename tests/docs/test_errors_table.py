"""docs/errors.md and the tests marked ``errors_table`` match one to one.

Each row of the table names one test as ``tests/<path>.py::test_name``; every named test must
exist, carry ``@pytest.mark.errors_table`` (or a module alias of it) and contain the row's
message excerpt (backslashes of regular expressions ignored); every marked test must be named by
exactly one row. The tests are read with :mod:`ast`, so no framework is imported here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs" / "errors.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def table_rows() -> list[dict[str, str]]:
    """The rows of the table: ``{"number", "input", "happens", "message", "test"}``."""
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        number, bad_input, happens, message, test = cells
        rows.append(
            {
                "number": number,
                "input": bad_input,
                "happens": happens,
                "message": message,
                "test": test,
            }
        )
    return rows


def _is_marker(node: ast.expr, aliases: set[str]) -> bool:
    text = ast.unparse(node)
    return text.endswith("mark.errors_table") or text in aliases


def marked_tests() -> dict[str, str]:
    """``{"tests/...py::test_name": source}`` of every test marked errors_table."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        aliases = {
            target.id
            for node in tree.body
            if isinstance(node, ast.Assign) and ast.unparse(node.value).endswith("errors_table")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if any(_is_marker(d, aliases) for d in node.decorator_list):
                    test_id = f"{path.relative_to(ROOT).as_posix()}::{node.name}"
                    found[test_id] = ast.get_source_segment(path.read_text(), node) or ""
    return found


def test_the_table_has_at_least_30_numbered_rows():
    rows = table_rows()
    assert len(rows) >= 30
    assert [int(r["number"]) for r in rows] == list(range(1, len(rows) + 1))


def test_every_row_names_one_existing_marked_test_and_its_message():
    marked = marked_tests()
    for row in table_rows():
        ids = TEST_ID.findall(row["test"])
        assert len(ids) == 1, f"row {row['number']}: name one test as `tests/...py::test_x`"
        test_id = "::".join(ids[0])
        assert (ROOT / ids[0][0]).exists(), f"row {row['number']}: no file {ids[0][0]}"
        assert test_id in marked, (
            f"row {row['number']}: {test_id} does not exist or is not marked "
            "@pytest.mark.errors_table"
        )
        source = marked[test_id].replace("\\", "")
        for excerpt in re.findall(r"`([^`]+)`", row["message"]):
            assert excerpt in source, f"row {row['number']}: {test_id} does not check {excerpt!r}"


def test_every_marked_test_is_one_row():
    named = ["::".join(match) for row in table_rows() for match in TEST_ID.findall(row["test"])]
    duplicates = sorted({t for t in named if named.count(t) > 1})
    assert not duplicates, f"tests named by several rows: {duplicates}"
    missing = sorted(set(marked_tests()) - set(named))
    assert not missing, f"tests marked errors_table but absent from docs/errors.md: {missing}"
