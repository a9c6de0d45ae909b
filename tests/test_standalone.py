"""The repository stands alone: its code reads nothing beside the checkout, and its data are small and as described.

.ci/run proves the whole of it by running the suite from a copy with nothing beside it; these tests say
why when something slips (a path out of the checkout, a data file that changed or grew).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from tests.conftest import GSM8K, REPO_ROOT, SHAKESPEARE

DATA = REPO_ROOT / "data"
MAX_DATA_BYTES = 512 * 1024  # data/README.md: keep the folder small
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "cache", "runs", "models"}
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ".json"}
# A path into the folder beside the checkout: ../shared, ../../shared/..., or the same built with pathlib.
OUTSIDE = re.compile(r"\.\./(?:\.\./)*shared\b|\"shared\"\s*/\s*\"data\"")


def repository_files(root: Path) -> list[Path]:
    """What .ci/run copies: in a git checkout, tracked files and untracked ones git does not ignore; elsewhere
    (.ci/run's copy, a test folder) every file outside hidden and build folders."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
        return [root / name for name in listed if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        pass
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and (d == ".ci" or not d.startswith(".")) and
                   not d.endswith(".egg-info")]
        found += [Path(folder, name) for name in files]
    return found


def code_files(root: Path) -> list[Path]:
    """The repository's code and config files."""
    return [path for path in repository_files(root) if path != Path(__file__) and  # it spells the patterns
            (path.suffix in CODE_SUFFIXES or path.parent.name == ".ci")]


def outside_references(root: Path) -> list[str]:
    """'path:line: text' for every line of code that names a path beside the checkout."""
    hits = []
    for path in code_files(root):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_no_code_reads_beside_the_checkout():
    assert outside_references(REPO_ROOT) == []


def test_the_check_finds_paths_beside_the_checkout(tmp_path):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "plan.yaml").write_text("data:\n  dataset: ../../shared/data/x.txt\n")
    (tmp_path / "bench.py").write_text('p = root / "shared" / "data" / "x"\nq = "data/shakespeare.txt"\n')
    assert sorted(outside_references(tmp_path)) == ['bench.py:1: p = root / "shared" / "data" / "x"',
                                                    "examples/plan.yaml:2: dataset: ../../shared/data/x.txt"]


def test_data_files_are_the_ones_data_readme_describes():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, flags=re.MULTILINE))
    assert set(listed) == {"shakespeare.txt", "gsm8k/train_200.jsonl"}
    for name, sha in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == sha, name
    assert {SHAKESPEARE, GSM8K} == {DATA / name for name in listed}
    assert (DATA / "gsm8k" / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2021 OpenAI")
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= MAX_DATA_BYTES, f"data/ holds {total:,} bytes, more than {MAX_DATA_BYTES:,}"
