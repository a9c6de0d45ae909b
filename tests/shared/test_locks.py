"""Locks and exclusive creation (shared/store.py, shared/writer.py): who holds a cache, and taking over a dead lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from shared.format import CacheError, CacheLockedError
from shared.store import open_store
from shared.writer import CacheWriter
from tests.shared.fakes import header, random_sequence

LOCK = "locks/worker-00000-of-00001.json"


def test_create_exclusive_is_whole_and_once(tmp_path):
    store = open_store(str(tmp_path))
    assert store.create_exclusive("a/b.json", b'{"x": 1}')
    assert not store.create_exclusive("a/b.json", b'{"x": 2}')
    assert (tmp_path / "a" / "b.json").read_bytes() == b'{"x": 1}'
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]  # no .tmp- left


def test_flock_is_per_holder_and_released_on_unlock(tmp_path):
    store = open_store(str(tmp_path))
    fd = store.lock_local(LOCK, b"first")
    assert fd is not None and store.lock_local(LOCK, b"second") is None
    assert (tmp_path / LOCK).read_bytes() == b"first"
    store.unlock_local(LOCK, fd)
    assert not (tmp_path / LOCK).exists()
    fd = store.lock_local(LOCK, b"third")
    assert fd is not None
    store.unlock_local(LOCK, fd)


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    """A process takes the lock, is SIGKILLed; the kernel dropped its flock, so the lock file is free again."""
    url = str(tmp_path / "c")
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from shared.writer import CacheWriter;"
            "from tests.shared.fakes import header; w = CacheWriter(sys.argv[1], header(1)).__enter__();"
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, url, os.getcwd()], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            CacheWriter(url, header(1)).__enter__()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert json.loads((tmp_path / "c" / LOCK).read_text())["pid"] == proc.pid  # left behind
    with CacheWriter(url, header(1)) as w:
        assert json.loads((tmp_path / "c" / LOCK).read_text())["pid"] == os.getpid()
        w.heartbeat()
        assert json.loads((tmp_path / "c" / LOCK).read_text())["token"] == w._lock_token
    assert not (tmp_path / "c" / LOCK).exists()


def test_lock_of_another_host_with_a_fresh_heartbeat_is_respected(tmp_path):
    """On a shared filesystem whose locks do not reach other hosts, the heartbeat decides (one hour)."""
    url = str(tmp_path / "c")
    with CacheWriter(url, header(1)):
        pass
    lock = tmp_path / "c" / LOCK
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "2026-11-22T09:00:00Z",
                                "heartbeat": time.time()}))
    with pytest.raises(CacheLockedError, match="pid 4242 on host gpu-node-7 since 2026-11-22T09:00:00Z"):
        CacheWriter(url, header(1)).__enter__()
    assert json.loads(lock.read_text())["host"] == "gpu-node-7"  # untouched
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "then", "heartbeat": time.time() - 7200}))
    with CacheWriter(url, header(1)):  # stale: taken over
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


def test_overwrite_refused_while_someone_builds(tmp_path):
    url = str(tmp_path / "c")
    with CacheWriter(url, header(2)) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**random_sequence(np.random.default_rng(0), 8), source_index=0)
        with pytest.raises(CacheLockedError, match=f"--overwrite: {url} is being built by pid {os.getpid()}"):
            CacheWriter(url, header(2, top_k=4), overwrite=True).__enter__()
        assert (tmp_path / "c" / "shards" / "shard-00000" / "commit.json").exists()
    with CacheWriter(url, header(2, top_k=4), overwrite=True) as w:  # nobody builds now
        assert w.pending_shards() == [0, 1]


def test_chunks_over_the_readers_limit_refused_by_the_writer(tmp_path):
    with pytest.raises(CacheError, match=r"--chunk-rows 100000000 x top-k 8 gives chunks of 1,600,000,000 bytes; "
                                         r"readers refuse chunks over 1,073,741,824 bytes .* use --chunk-rows 67108864"):
        CacheWriter(str(tmp_path / "c"), header(1), chunk_rows=100_000_000)


def test_too_many_sequences_in_a_shard_refused_by_the_writer(tmp_path, monkeypatch):
    import shared.writer

    monkeypatch.setattr(shared.writer, "MAX_SHARD_SEQUENCES", 2)
    rng = np.random.default_rng(0)
    with CacheWriter(str(tmp_path / "c"), header(1)) as w:
        shard = w.shard(0)
        with pytest.raises(CacheError, match="holds 3 sequences"), shard as buf:
            for i in range(3):
                buf.add_sequence(**random_sequence(rng, 5), source_index=i)


def test_without_flock_the_pid_and_heartbeat_rules_apply(tmp_path, monkeypatch):
    """A filesystem without flock (some network filesystems): exclusive create, then the object-store rules."""
    from shared.store import Store

    def no_flock(self, key, data):
        raise NotImplementedError("no flock")

    monkeypatch.setattr(Store, "lock_local", no_flock)
    url = str(tmp_path / "c")
    with CacheWriter(url, header(1)), pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"), \
            CacheWriter(url, header(1)):
        pass
    assert not (tmp_path / "c" / LOCK).exists()  # released by its token
    (tmp_path / "c" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 99, "since": "x"}))
    with CacheWriter(url, header(1)):  # dead pid on this host: taken over
        assert json.loads((tmp_path / "c" / LOCK).read_text())["pid"] == os.getpid()


def test_without_hard_links_exclusive_create_still_refuses_the_second(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = open_store(str(tmp_path))
    assert store.create_exclusive("build.json", b"{}")
    assert not store.create_exclusive("build.json", b"{1}")
    assert (tmp_path / "build.json").read_bytes() == b"{}"
