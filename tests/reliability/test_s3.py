"""Caches on S3 (a local moto server on 127.0.0.1): write, find by key, list, verify, train; readers never write.

In-process tests use shared/ directly; the `multiproc` test runs `kdcache build` / `ls` / `info` /
`verify` and `kdtrain run` as separate processes, as a team sharing a bucket would. s3fs (through
botocore) honours AWS_ENDPOINT_URL, so no kdcache-specific setting is needed for another endpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from typer.testing import CliRunner

from cli.kdcache import app as kdcache_app
from shared.catalog import find_by_key, find_caches
from shared.format import CacheLockedError, IncompleteCacheError
from shared.reader import CacheReader
from shared.writer import CacheWriter
from tests.reliability.common import REPO, command, write_speeches
from tests.shared.fakes import header, write_cache

runner = CliRunner()


def s3_objects(root: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    base = root.removeprefix("s3://")
    return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}


def test_write_list_find_verify_on_s3_and_reads_never_write(s3, s3_server):
    write_cache(f"{s3}/caches/a", num_shards=2)
    write_cache(f"{s3}/caches/team/b", num_shards=1, seed=1)
    before, position = s3_objects(s3), len(s3_server.requests)

    reader = CacheReader(f"{s3}/caches/a", verify_on_read=True)
    assert reader.verify() == [] and reader.num_shards == 2
    assert len(list(reader.iter_sequences())) == 6 and reader.meta(1).num_rows == 3
    found = {s["path"]: s for s in find_caches(f"{s3}/caches")}
    assert set(found) == {"a", "team/b"} and all(s["complete"] for s in found.values())
    key = CacheReader(f"{s3}/caches/team/b").manifest.cache_key
    assert find_by_key(f"{s3}/caches", key) == f"{s3}/caches/team/b"
    for args in (["ls", f"{s3}/caches", "--key", key[:8]], ["info", f"{s3}/caches/a"], ["verify", f"{s3}/caches/a"]):
        res = runner.invoke(kdcache_app, args)
        assert res.exit_code == 0, res.output
    assert s3_server.writes_since(position) == []  # no PUT, POST or DELETE while reading
    assert s3_objects(s3) == before


def test_incomplete_cache_on_s3(s3):
    import numpy as np

    from tests.shared.fakes import random_sequence

    with CacheWriter(f"{s3}/c", header(3)) as w, w.shard(1) as buf:
        buf.add_sequence(**random_sequence(np.random.default_rng(0), 9), source_index=0)
    with pytest.raises(IncompleteCacheError, match="1 of 3 shards committed"):
        CacheReader(f"{s3}/c")
    summary = find_caches(s3)[0]
    assert (summary["path"], summary["complete"], summary["shards_committed"]) == ("c", False, 1)


def test_lock_on_s3_refuses_a_second_writer_and_recovers_a_dead_ones(s3):
    url = f"{s3}/c"
    held = f"pid {os.getpid()} on host {socket.gethostname()} since "
    with CacheWriter(url, header(2)), pytest.raises(CacheLockedError, match=held), CacheWriter(url, header(2)):
        pass
    import s3fs

    dead = {"host": socket.gethostname(), "pid": 2**22 + 4321, "since": "2026-01-01T00:00:00Z", "heartbeat": 0}
    s3fs.S3FileSystem().pipe_file(f"{url.removeprefix('s3://')}/locks/worker-00000-of-00001.json", json.dumps(dead).encode())
    with CacheWriter(url, header(2)) as w:
        assert w.lock.key is not None
    other_host = {"host": "elsewhere", "pid": 1, "since": "now", "heartbeat": time.time()}
    s3fs.S3FileSystem().pipe_file(f"{url.removeprefix('s3://')}/locks/worker-00000-of-00001.json",
                                  json.dumps(other_host).encode())
    with pytest.raises(CacheLockedError, match="pid 1 on host elsewhere"), CacheWriter(url, header(2)):
        pass


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_build_on_s3_train_from_it_and_find_it_by_key(s3, s3_server, tiny_gpt2_dir, tmp_path):
    """`kdcache build --out s3://...` in one process, `ls/info/verify` and `kdtrain run` in others."""
    speeches = write_speeches(tmp_path / "speeches.jsonl", num_rows=12)
    env = {**os.environ, **s3_server.env}
    build = command("kdcache", "build", "--model", tiny_gpt2_dir, "--dataset", speeches, "--max-length", 32,
                    "--top-k", 8, "--limit", 12, "--shard-tokens", 64, "--engine", "hf")

    def run(cmd, check=True):
        res = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        text = " ".join((res.stdout + res.stderr).split())
        assert not check or res.returncode == 0, text
        return text

    assert "built: s3://" in run([*build, "--out", f"{s3}/cache/tiny"])
    before, position = s3_objects(s3), len(s3_server.requests)
    key = CacheReader(f"{s3}/cache/tiny").manifest.cache_key
    listed = run(command("kdcache", "ls", f"{s3}/cache", "--key", key[:10], "--json"))
    assert json.loads(listed)["path"] == "tiny" and json.loads(listed)["cache_key"] == key
    assert "shards / sequences / tokens" in run(command("kdcache", "info", f"{s3}/cache/tiny"))
    assert "OK: 5 shards" in run(command("kdcache", "verify", f"{s3}/cache/tiny"))
    trained = run(command("kdtrain", "run", "--cache", f"{s3}/cache/tiny", "--student-from-teacher", "--keep-layers", 1,
                          "--steps", 2, "--batch-tokens", 128, "--out", tmp_path / "student"))
    assert "done: 2 steps" in trained and (tmp_path / "student" / "model.safetensors").exists()
    assert s3_server.writes_since(position) == []  # readers and the trainer never PUT, POST or DELETE
    assert s3_objects(s3) == before

    # the same settings elsewhere under the root: found by cache_key, the teacher does not run again
    again = run([*build, "--out", f"{s3}/cache/tiny-again"])
    assert f"reused: {s3}/cache/tiny " in again and "written now: 0" in again
    assert "already built" in run([*build, "--out", f"{s3}/cache/tiny"])
    assert s3_objects(s3) == before
