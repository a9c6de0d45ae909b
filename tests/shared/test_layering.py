"""shared/ is the format alone (DEVELOPERS.md, layering): importing or using it loads no model code."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import shared

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "cacher", "trainer")

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
    assert {"shared.format", "shared.manifest", "shared.store", "shared.writer", "shared.reader", "shared.catalog",
            "shared.data"} <= set(names)
    res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), ",".join(names), ",".join(FORBIDDEN)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    assert set(report) == {*names, "write, verify, read, describe"}
    assert {step: found for step, found in report.items() if found} == {}
