"""The layers (DEVELOPERS.md): shared <- common <- cacher, trainer <- orchestration <- cli.

Each package imports only the packages below it (cacher and trainer never import each other), read from
the source of every module, imports inside functions included; and shared/, the format alone, loads no
model code when it is imported or used.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import shared

REPO = Path(__file__).resolve().parents[2]
# package -> the first-party packages its modules may import (itself included)
ALLOWED = {
    "shared": {"shared"},
    "common": {"shared", "common"},
    "cacher": {"shared", "common", "cacher"},
    "trainer": {"shared", "common", "trainer"},
    "orchestration": {"shared", "common", "cacher", "trainer", "orchestration"},
    "cli": {"shared", "common", "cacher", "trainer", "orchestration", "cli"},
}
FIRST_PARTY = set(ALLOWED) | {"bench", "examples", "tests"}
# What the format may not load: model code, data sets, and every layer above it.
FORBIDDEN_FOR_SHARED = ("torch", "transformers", "datasets", "common", "cacher", "trainer", "orchestration", "cli")


def imported_packages(source: str) -> set[str]:
    """The top-level names a module imports, anywhere in it (relative imports count as its own package)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else (node.module or "").split(".")[0])
    return names


def layer_violations(root: Path) -> list[str]:
    """'path imports package' for every import of a first-party package its layer may not import."""
    found = []
    for package, allowed in ALLOWED.items():  # a layer that does not exist yet has nothing to check
        for path in sorted((root / package).rglob("*.py")):
            used = imported_packages(path.read_text(encoding="utf-8")) & FIRST_PARTY
            found += [f"{path.relative_to(root)} imports {name}" for name in sorted(used - allowed)]
    return found


def test_every_package_imports_only_the_layers_below_it():
    assert {p for p in ALLOWED if (REPO / p / "__init__.py").is_file()} >= {"shared", "common", "cacher", "trainer", "cli"}
    assert layer_violations(REPO) == []


def fake_tree(root: Path, files: dict[str, str]) -> None:
    """Every layered package as an empty package under root, plus the given modules (path -> source)."""
    for package in ALLOWED:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    for path, source in files.items():
        (root / path).write_text(source)


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    fake_tree(tmp_path, {"common/leak.py": "def f():\n    from trainer.train import train\n",
                         "cacher/peer.py": "import trainer.data\nfrom common import models\n",
                         "shared/up.py": "import os\nfrom common.datasets import load_rows\n"})
    assert layer_violations(tmp_path) == ["shared/up.py imports common", "common/leak.py imports trainer",
                                          "cacher/peer.py imports trainer"]


def module_imports(root: Path) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (anywhere in it, functions included), for the layered packages."""
    modules = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules[name].update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules[name].add(node.module)
    return {name: {m for m in deps if m in modules and m != name} for name, deps in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of the import graph closes (empty when there is none)."""
    state, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_module_imports_itself_through_others():
    """Issue 15: the import graph has no cycle, imports inside functions included (they hide one, not remove it)."""
    assert import_cycles(module_imports(REPO)) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    fake_tree(tmp_path, {"trainer/a.py": "from trainer.b import f\n",
                         "trainer/b.py": "def f():\n    from trainer.a import g\n",
                         "trainer/c.py": "import trainer.a\n"})
    assert import_cycles(module_imports(tmp_path)) == [["trainer.a", "trainer.b", "trainer.a"]]


CHILD = """if 1:
    import importlib, json, sys
    sys.path.insert(0, sys.argv[1])
    forbidden = set(sys.argv[3].split(","))

    def loaded():
        return sorted({name.split(".")[0] for name in sys.modules} & forbidden)

    report = {}
    for name in sys.argv[2].split(","):
        importlib.import_module(name)
        report[name] = loaded()
    # and using it: write, verify, read and describe a small cache (zarr, pyarrow and fsspec load lazily)
    import tempfile
    from shared.catalog import describe, find_caches
    from shared.reader import CacheReader
    from tests.shared.fakes import write_cache
    root = tempfile.mkdtemp()
    write_cache(root + "/c", num_shards=2)
    reader = CacheReader(root + "/c", verify_on_read=True)
    assert reader.verify(bookkeeping=True) == []
    reader.meta(1), reader.shard(1).read_sequence(0), describe(reader), find_caches(root)
    report["write, verify, read, describe"] = loaded()
    print(json.dumps(report))
"""


def test_shared_modules_load_neither_models_nor_the_other_packages():
    names = ["shared"] + [f"shared.{m.name}" for m in pkgutil.iter_modules(shared.__path__)]
    assert {"shared.format", "shared.manifest", "shared.store", "shared.reader", "shared.catalog"} <= set(names)
    res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), ",".join(names), ",".join(FORBIDDEN_FOR_SHARED)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    assert set(report) == {*names, "write, verify, read, describe"}
    assert {step: found for step, found in report.items() if found} == {}
