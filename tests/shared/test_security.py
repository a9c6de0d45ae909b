"""Loading a shared cache never runs code: no pickle anywhere, safe loaders only, remote code only on request.

The checks read the repository's own source (Python's ast, not regular expressions), so a new
`torch.load(path)` or `np.load(path)` anywhere fails CI, as does any mention of pickle in shared/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", ".venv-vllm", "kdcache.egg-info", ".pytest_cache", ".ruff_cache", "build", "__pycache__"}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def python_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not (set(p.relative_to(REPO).parts) & SKIP_DIRS))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_scan_sees_the_repository():
    names = {p.relative_to(REPO).as_posix() for p in python_files()}
    assert {"shared/reader.py", "trainer/checkpoint.py", "cacher/engine_vllm.py"} <= names


def test_no_pickle_in_the_cache_format():
    """shared/ (the format: reader, writer, store, manifest) does not even mention pickle."""
    for path in sorted((REPO / "shared").glob("*.py")):
        text = path.read_text()
        assert "pickle" not in text.lower(), f"{path.relative_to(REPO)} mentions pickle"


def test_no_pickle_module_imported_anywhere():
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [where(path, node) for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(where(path, node))
    assert found == []


def test_loaders_refuse_pickles():
    """Every torch.load has weights_only=True; every np.load has allow_pickle=False; no pandas.read_pickle."""
    bad = []
    for path in python_files():
        for node, owner, name in calls(ast.parse(path.read_text())):
            if owner == "torch" and name == "load" and keyword(node, "weights_only") is not True:
                bad.append(f"{where(path, node)} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and keyword(node, "allow_pickle") is not False:
                bad.append(f"{where(path, node)} np.load without allow_pickle=False")
            if name in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle"):
                bad.append(f"{where(path, node)} {owner}.{name}")
    assert bad == []


def test_models_saved_as_safetensors():
    """save_pretrained always passes safe_serialization=True (never a pickled pytorch_model.bin)."""
    bad = [where(path, node) for path in python_files() for node, _, name in calls(ast.parse(path.read_text()))
           if name == "save_pretrained" and keyword(node, "safe_serialization") is False]
    assert bad == []


def test_remote_code_only_by_explicit_flag():
    """No call passes trust_remote_code=True literally; the settings and the CLI default to False."""
    bad = [where(path, node) for path in python_files() for node, _, _ in calls(ast.parse(path.read_text()))
           if keyword(node, "trust_remote_code") is True]
    assert bad == []
    from cacher.build import BuildConfig

    assert BuildConfig().trust_remote_code is False
    from typer.testing import CliRunner

    from cli.kdcache import app

    help_text = " ".join(CliRunner().invoke(app, ["build", "--help"]).output.split())
    assert "--trust-remote-code" in help_text


@pytest.mark.parametrize("codec", ["numcodecs.pickle", "numcodecs.astype", "vlen-utf8", "zstd", "sharding_indexed",
                                   "crc32c"])
def test_only_the_writers_zarr_codecs(codec, tmp_path):
    """The reader refuses any zarr.json but the writer's own, codecs included, before Zarr sees the array
    (storage_layout.md 3.1): no codec that could run code or reinterpret values is ever configured."""
    import json

    from shared.encode import array_metadata
    from shared.format import CacheFormatError
    from shared.guards import check_array_metadata

    meta = array_metadata("input_ids", (4,), "uint16", chunk_rows=4)
    assert check_array_metadata(json.dumps(meta).encode(), key="k", where="s", name="input_ids", shape=(4,),
                                dtype="uint16", chunk_rows=4) == 8
    meta["codecs"] = [meta["codecs"][0], {"name": codec}]
    with pytest.raises(CacheFormatError, match="shard-00000: k/zarr.json: codecs is .*, the format's writer writes"):
        check_array_metadata(json.dumps(meta).encode(), key="k/zarr.json", where="shard-00000", name="input_ids",
                             shape=(4,), dtype="uint16", chunk_rows=4)