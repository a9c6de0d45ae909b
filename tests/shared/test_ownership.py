"""kdcache writes into and deletes only what it created (storage_layout.md 5.1; issue 13, items 5 and 8).

A cache root gets an owner.json marker when kdcache creates it. A writer, --overwrite included, refuses a
non-empty folder without that marker (the user's own meta/ and shards/, a model, a run, a cache from before
markers), a marked folder holding other files, and any symbolic link among the format's names: nothing is
written or deleted there. Links inside a cache root are never followed for writing or deleting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shared.format import CacheError, CacheMismatchError, UnsafePathError
from shared.store import open_store
from shared.writer import CacheWriter, finalize_cache
from tests.shared.fakes import header, random_sequence


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under root (links not followed): file bytes, None for folders, 'link -> target' for links."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[key] = f"link -> {os.readlink(path)}".encode()
        elif path.is_dir():
            out[key] = None
        else:
            out[key] = path.read_bytes()
    return out


def write_shards(url: str, shards, num_shards: int = 2, overwrite: bool = False) -> CacheWriter:
    with CacheWriter(url, header(num_shards), overwrite=overwrite) as w:
        for s in shards:
            rng = np.random.default_rng(s)
            with w.shard(s) as buf:
                for i in range(2):
                    buf.add_sequence(**random_sequence(rng, 9), source_index=2 * s + i)
        w.finalize()
    return w


def users_meta_and_shards(root: Path) -> None:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "notes.txt").write_text("my notes")
    (root / "shards").mkdir()
    (root / "shards" / "shard-00000").mkdir()
    (root / "shards" / "shard-00000" / "data.bin").write_bytes(b"\x00" * 10)


def a_model(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "model.safetensors").write_bytes(b"weights")


def a_run(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "run.json").write_text("{}")
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "checkpoints").mkdir()


def a_marked_run(root: Path) -> None:
    a_run(root)
    (root / "owner.json").write_text(json.dumps({"tool": "kdtrain", "kind": "run", "id": "0" * 32}))


def an_unmarked_cache(root: Path) -> None:
    """A cache as a kdcache without markers wrote it (or copied without its owner.json)."""
    write_shards(str(root), [0, 1])
    (root / "owner.json").unlink()


FOREIGN = {  # name: (make the folder, what the refusal must say)
    "the user's own meta/ and shards/": (users_meta_and_shards, "holds 'meta', 'shards', and no owner.json"),
    "a model": (a_model, "it holds a model ('config.json', 'model.safetensors')"),
    "a kdtrain run": (a_run, "holds 'checkpoints', 'metrics.jsonl', 'run.json', and no owner.json"),
    "a marked kdtrain run": (a_marked_run, "its owner.json marks it as a kdtrain run folder, not a kdcache cache"),
    "a cache without a marker": (an_unmarked_cache, "holds a kdcache build without the owner.json marker"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_folder_kdcache_did_not_create_is_never_written_nor_deleted(tmp_path, case, overwrite):
    root = tmp_path / "out"
    make, said = FOREIGN[case]
    make(root)
    before = tree(root)
    with pytest.raises(CacheMismatchError, match="is not a kdcache cache folder") as info:
        write_shards(str(root), [0, 1], overwrite=overwrite)
    text = " ".join(str(info.value).split())
    assert said in text and str(root) in text and "nothing there was changed" in text
    assert tree(root) == before


def test_marker_is_written_first_with_a_random_id_and_kept_by_overwrite(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(a), [0, 1])
    write_shards(str(b), [0, 1])
    marker = json.loads((a / "owner.json").read_text())
    assert set(marker) == {"tool", "kind", "id", "created_at"}
    assert (marker["tool"], marker["kind"]) == ("kdcache", "cache") and len(marker["id"]) == 32
    assert marker["id"] != json.loads((b / "owner.json").read_text())["id"]
    with CacheWriter(str(a), header(3), overwrite=True) as w:  # another build: the old one goes, the marker stays
        assert w.pending_shards() == [0, 1, 2] and not (a / "shards").exists() and not (a / "manifest.json").exists()
    assert json.loads((a / "owner.json").read_text()) == marker


def test_a_marked_cache_holding_other_files_is_refused_even_with_overwrite(tmp_path):
    root = tmp_path / "c"
    write_shards(str(root), [0, 1])
    (root / "results.csv").write_text("precious")
    before = tree(root)
    with pytest.raises(CacheMismatchError, match=r"also holds 'results.csv', which kdcache did not create"):
        write_shards(str(root), [0, 1, 2], num_shards=3, overwrite=True)
    assert tree(root) == before


def test_finalize_refuses_a_folder_kdcache_did_not_create(tmp_path):
    root = tmp_path / "c"
    write_shards(str(root), [0], num_shards=2)  # one of two shards: no manifest yet
    (root / "owner.json").unlink()
    with pytest.raises(CacheMismatchError, match="is not a kdcache cache folder"):
        finalize_cache(str(root))
    assert not (root / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# Symbolic links inside a cache root


def unfinished_build_with_a_link(tmp_path: Path, where: str) -> tuple[Path, Path]:
    """An unfinished two-shard build (shard 0 committed) whose `where` was moved outside and replaced by a link."""
    root, outside = tmp_path / "c", tmp_path / "outside"
    write_shards(str(root), [0], num_shards=2)
    (root / "locks").mkdir(exist_ok=True)
    outside.mkdir()
    target = outside / where.replace("/", "-")
    os.rename(root / where, target)
    os.symlink(target, root / where)
    return root, outside


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
@pytest.mark.parametrize("where", ["shards", "meta", "locks", "shards/shard-00000", "build.json"])
def test_a_build_with_a_link_inside_is_refused_and_nothing_outside_changes(tmp_path, where, overwrite):
    root, outside = unfinished_build_with_a_link(tmp_path, where)
    before, before_root = tree(outside), tree(root)
    with (pytest.raises(UnsafePathError, match=rf"{where}.* (is a link|is a symbolic link)"),
          CacheWriter(str(root), header(2 if not overwrite else 3), overwrite=overwrite) as w):
        for s in w.pending_shards():
            with w.shard(s) as buf:
                buf.add_sequence(**random_sequence(np.random.default_rng(s), 9), source_index=s)
    assert tree(outside) == before and tree(root) == before_root


def test_a_link_deep_in_a_shard_is_never_followed_when_its_leftovers_are_deleted(tmp_path):
    """An uncommitted shard's leftovers are deleted before it is written again: a link among them is refused."""
    root, outside = tmp_path / "c", tmp_path / "outside"
    write_shards(str(root), [0], num_shards=2)
    (outside / "precious").mkdir(parents=True)
    (outside / "precious" / "x").write_text("keep")
    (root / "shards" / "shard-00001" / "topk_ids").mkdir(parents=True)
    os.symlink(outside / "precious", root / "shards" / "shard-00001" / "topk_ids" / "c")
    with pytest.raises(UnsafePathError, match=r"shards/shard-00001/topk_ids/c is a symbolic link"):
        write_shards(str(root), [1], num_shards=2)
    assert (outside / "precious" / "x").read_text() == "keep"


def test_store_never_writes_or_deletes_through_a_link(tmp_path):
    root, outside = tmp_path / "c", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "f").write_text("keep")
    os.symlink(outside, root / "shards")
    os.symlink(outside / "f", root / "manifest.json")
    store = open_store(str(root))
    with pytest.raises(UnsafePathError, match="shards"):
        store.write_bytes("shards/shard-00000/x", b"data")
    with pytest.raises(UnsafePathError, match="shards"):
        store.delete("shards")
    with pytest.raises(UnsafePathError, match="manifest.json"):
        store.write_bytes("manifest.json", b"data")
    with pytest.raises(UnsafePathError, match="manifest.json"):
        store.delete("manifest.json")
    with pytest.raises(UnsafePathError, match="manifest.json is a symbolic link"):
        store.read_bytes("manifest.json")
    assert tree(outside) == {"f": b"keep"} and os.path.islink(root / "shards")


def test_the_root_itself_may_be_a_link(tmp_path):
    """Where the cache lives is the user's choice: a link as --out is followed (only links inside are refused)."""
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "c")
    write_shards(str(tmp_path / "c"), [0, 1])
    assert (tmp_path / "disk" / "manifest.json").is_file()


@pytest.mark.parametrize("starting", [".tmp-0123abcd-owner.json", "owner.json", "owner.json+locks", "owner.json+build.json"])
def test_folder_another_builder_is_starting_in_is_ours(tmp_path, starting):
    """Two builders on one empty folder: the second may find the first's temporary marker, its marker, its lock
    folder or its build.json: all kdcache's own, created by a builder of this cache; both go on."""
    url = tmp_path / "c"
    url.mkdir()
    if starting.startswith(".tmp-"):
        (url / starting).write_text("{")
    else:
        with CacheWriter(str(url), header(1)):  # the other builder, one step ahead
            pass
        if "locks" not in starting:
            os.rmdir(url / "locks")
        if "build.json" not in starting:
            (url / "build.json").unlink()
    with CacheWriter(str(url), header(1)) as w:
        assert not w.complete
    assert (url / "build.json").exists() and json.loads((url / "owner.json").read_text())["kind"] == "cache"


def test_a_damaged_marker_is_not_ours(tmp_path):
    root = tmp_path / "c"
    write_shards(str(root), [0, 1])
    (root / "owner.json").write_text("{not json")
    with pytest.raises(CacheError, match="its owner.json is not a marker kdcache writes"):
        write_shards(str(root), [0, 1, 2], num_shards=3, overwrite=True)
    assert (root / "manifest.json").exists()
