"""The documents that promise tests: every test that docs/bad-inputs.md names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bad_inputs_table_names_real_tests():
    text = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"^\| [A-F][0-9]+ \|", line)]
    assert len(rows) >= 25
    missing = []
    for row in rows:
        current = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py|…)::[\w]+)", row):
            path, name = ref.split("::")
            if path != "…":
                current = path
            assert current is not None, f"{row[:40]}: '…::{name}' with no file before it"
            if not re.search(rf"^\s*(async )?def {name}\(", (ROOT / current).read_text(encoding="utf-8"), re.M):
                missing.append(f"{current}::{name}")
    assert not missing, f"docs/bad-inputs.md names tests that do not exist: {missing}"
