"""A store that fails mid-write (disk full, a refused or broken upload): nothing half-committed, the rerun resumes.

Local: Store.write_bytes fails at every one of a three-shard build's writes in turn, and, separately,
the fsync inside an atomic write fails (the object was written to its temporary name, not yet renamed).
S3: the local moto server refuses the Nth PUT. After each fault: no manifest, every commit file
describes a whole shard (sizes and sha256 of its objects), no `.tmp-` file is left, a reader refuses
the cache as incomplete, and the same build run again ends with exactly the bytes of a clean build.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import numpy as np
import pytest

from shared import store as store_module
from shared.format import CacheError
from shared.reader import CacheReader
from shared.store import Store, open_store
from shared.writer import CacheWriter
from tests.reliability.common import contents
from tests.shared.fakes import header, random_sequence

NUM_SHARDS = 3


def build(url: str) -> None:
    """The same three-shard build every time (shard s's rows come from seed s), resuming what is pending."""
    with CacheWriter(url, header(NUM_SHARDS)) as w:
        for s in w.pending_shards():
            rng = np.random.default_rng(s)
            with w.shard(s) as buf:
                for i in range(3):
                    buf.add_sequence(**random_sequence(rng, 10 + 3 * i), source_index=3 * s + i)
        w.finalize()


def assert_nothing_half_committed(url: str) -> None:
    store = open_store(url)
    files = store.list_files()
    assert not [k for k in files if k.rsplit("/", 1)[-1].startswith(".tmp-")]
    for key in files:
        if key.endswith("/commit.json"):
            commit = json.loads(store.read_bytes(key))
            for obj, info in commit["objects"].items():
                data = store.read_bytes(obj)
                assert (len(data), hashlib.sha256(data).hexdigest()) == (info["size"], info["sha256"]), obj
    if "manifest.json" not in files:  # incomplete (or, if build.json failed, not a cache at all)
        with pytest.raises(CacheError, match="incomplete cache|is not a kdcache cache"):
            CacheReader(url)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[dict[str, bytes], list[str]]:
    """A clean build's contents and the keys it wrote through Store.write_bytes, in order."""
    url = str(tmp_path_factory.mktemp("clean") / "c")
    keys = []
    real = Store.write_bytes

    def recording(self, key, data):
        keys.append(key)
        return real(self, key, data)

    Store.write_bytes = recording
    try:
        build(url)
    finally:
        Store.write_bytes = real
    return contents(url), keys


def fail_and_resume(positions, clean, tmp_path, monkeypatch):
    want, keys = clean
    assert len(keys) == NUM_SHARDS * 19 + 1  # 18 objects and a commit file per shard, then the manifest
    real = Store.write_bytes
    for n in positions:
        failing_key = keys[n]
        url = str(tmp_path / f"c{n}")
        calls = []

        def disk_full(self, key, data, n=n, calls=calls):
            calls.append(key)
            if len(calls) == n + 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, key, data)

        monkeypatch.setattr(Store, "write_bytes", disk_full)
        with pytest.raises(OSError, match="No space left"):
            build(url)
        monkeypatch.setattr(Store, "write_bytes", real)
        assert calls[-1] == failing_key
        assert not os.path.exists(os.path.join(url, "manifest.json"))
        assert_nothing_half_committed(url)
        failed_shard = int(failing_key.split("shard-")[1][:5]) if "shard-" in failing_key else None
        if failed_shard is not None:
            assert not os.path.exists(os.path.join(url, f"shards/shard-{failed_shard:05d}/commit.json"))
        build(url)
        assert contents(url) == want, f"resume after a failure writing {failing_key}"
        assert CacheReader(url).verify(bookkeeping=True) == []


def test_failed_write_then_resume(clean, tmp_path, monkeypatch):
    """First object, an array chunk mid-shard, the meta file, a commit file, the manifest."""
    keys = clean[1]
    positions = [0, 7, keys.index("meta/shard-00001.parquet"), keys.index("shards/shard-00001/commit.json"), len(keys) - 1]
    fail_and_resume(positions, clean, tmp_path, monkeypatch)


@pytest.mark.slow
def test_failed_write_at_every_position_then_resume(clean, tmp_path, monkeypatch):
    fail_and_resume(range(len(clean[1])), clean, tmp_path, monkeypatch)


@pytest.mark.parametrize("nth", [0, 5, 20, 40])
def test_failed_fsync_inside_an_atomic_write_leaves_no_object(clean, tmp_path, monkeypatch, nth):
    """The bytes reached the temporary file, the fsync failed: the target never appears, the .tmp- file is gone."""
    want, _ = clean
    url = str(tmp_path / "c")
    real = os.fsync
    calls = []

    def failing(fd):
        calls.append(fd)
        if len(calls) == nth + 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(store_module.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        build(url)
    monkeypatch.setattr(store_module.os, "fsync", real)
    assert_nothing_half_committed(url)
    build(url)
    assert contents(url) == want


@pytest.mark.parametrize("refused", [pytest.param("/owner.json", marks=pytest.mark.slow),
                                     pytest.param("/build.json", marks=pytest.mark.slow), 10,
                                     pytest.param("/shard-00000/commit.json", marks=pytest.mark.slow),
                                     pytest.param("/manifest.json", marks=pytest.mark.slow)])
def test_s3_put_refused_mid_build_then_resume(clean, s3, s3_server, refused):
    """A PUT on S3 is refused: the first of owner.json, build.json, shard 0's commit file or the manifest, or the
    10th PUT (an object of shard 0).

    A rerun completes the cache to the bytes of the clean local build (the encoding does not depend on the store).
    """
    want = clean[0]
    url = f"{s3}/faulty"
    puts = []

    def refuse(method, path):
        if method != "PUT" or "/faulty/" not in path or "/locks/" in path:
            return False
        puts.append(path)
        return len(puts) == refused if isinstance(refused, int) else path.endswith(refused)

    s3_server.fail = refuse
    with pytest.raises(OSError, match="injected fault"):
        build(url)
    s3_server.fail = None
    assert puts[-1].endswith(refused if isinstance(refused, str) else "") and "/manifest.json" not in puts[:-1]
    assert_nothing_half_committed(url)
    build(url)
    assert contents(url) == want
    assert CacheReader(url).verify(bookkeeping=True) == []
