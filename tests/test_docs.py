"""The documents that promise tests: every test that docs/bad-inputs.md names exists.

A row's last cell names pytest node ids in backticks: `tests/x.py::test_name`, optionally with a
parametrize id, `tests/x.py::test_name[case id]`. `…::test_other` means a test of the file named
before it in the row, and `…[other id]` or `[other id]` another case of the test named before it.
Function names are checked statically in the file; parametrize ids are checked against what
`pytest --collect-only` collects from the named files, so a case that was renamed or dropped fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| ([A-Z][0-9]+) \|")
# `path::name[id]`; the id runs to the last `]` before the closing backtick (ids may hold brackets).
TEST_REF = re.compile(r"^(tests/[\w/]+\.py|…)::(\w+)(?:\[(.*)\])?$")
CASE_REF = re.compile(r"^…?\[(.*)\]$")


def table_rows() -> list[tuple[str, str]]:
    """(row id, test cell) for each row of the tables in docs/bad-inputs.md."""
    text = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            cell = line.rstrip().removesuffix("|").rstrip().rsplit(" | ", 1)[-1]
            rows.append((match.group(1), cell))
    return rows


def cited_tests(row_id: str, cell: str) -> list[tuple[str, str, str | None]]:
    """(file, function, parametrize id or None) for each backticked reference in a row's test cell."""
    refs: list[tuple[str, str, str | None]] = []
    path = name = None
    for span in re.findall(r"`([^`]+)`", cell):
        test = TEST_REF.match(span)
        case = CASE_REF.match(span)
        if test:
            if test.group(1) != "…":
                path = test.group(1)
            assert path is not None, f"{row_id}: '{span}' with no file before it"
            name = test.group(2)
            refs.append((path, name, test.group(3)))
        elif case:
            assert name is not None, f"{row_id}: '{span}' with no test before it"
            refs.append((path, name, case.group(1)))
        else:
            raise AssertionError(f"{row_id}: cannot read `{span}` in the test column as a pytest node id")
    assert refs, f"{row_id}: the test column names no test: {cell!r}"
    return refs


def collected_node_ids(files: list[str]) -> set[str]:
    """The node ids pytest collects from these test files (unescaped, as the table writes them)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-o", "disable_test_id_escaping_and_forfeit_all_rights_to_community_support=true", *files],
        check=False, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, f"collecting {files} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {line.strip() for line in result.stdout.splitlines() if "::" in line}


def test_bad_inputs_table_names_real_tests():
    rows = table_rows()
    assert len(rows) >= 25
    missing = []
    for row_id, cell in rows:
        for path, name, _ in cited_tests(row_id, cell):
            source = (ROOT / path).read_text(encoding="utf-8")
            if not re.search(rf"^\s*(async )?def {name}\(", source, re.MULTILINE):
                missing.append(f"{row_id}: {path}::{name}")
    assert not missing, f"docs/bad-inputs.md names tests that do not exist: {missing}"


def test_bad_inputs_table_names_real_parametrize_ids():
    cases = [(row_id, f"{path}::{name}[{case}]", path)
             for row_id, cell in table_rows() for path, name, case in cited_tests(row_id, cell) if case is not None]
    assert cases, "no row cites a parametrize id; the check below would check nothing"
    collected = collected_node_ids(sorted({path for _, _, path in cases}))
    missing = [f"{row_id}: {node}" for row_id, node, _ in cases if node not in collected]
    assert not missing, (
        f"docs/bad-inputs.md names parametrize ids that pytest does not collect: {missing}; "
        f"see `pytest --collect-only -q <file>` for the real ids"
    )


def test_test_column_parser_reads_every_form():
    """The reference forms the table uses, and a stray span, read as intended (so the checks above can fail)."""
    cell = ("`tests/a.py::test_x[one [0, 1]]`, `…[two]` (and `[three]`), `…::test_y`, "
            "`tests/b.py::test_z[]` (heavy)")
    assert cited_tests("Z1", cell) == [
        ("tests/a.py", "test_x", "one [0, 1]"), ("tests/a.py", "test_x", "two"), ("tests/a.py", "test_x", "three"),
        ("tests/a.py", "test_y", None), ("tests/b.py", "test_z", ""),
    ]
    try:
        cited_tests("Z2", "`tests/a.py:test_x`")
    except AssertionError as error:
        assert "cannot read" in str(error)
    else:
        raise AssertionError("a malformed reference was accepted")
