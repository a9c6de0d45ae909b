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


def test_lock_body_is_whole_between_any_two_system_calls(tmp_path, monkeypatch):
    """A holder stopped (SIGSTOP) or killed inside a heartbeat leaves a readable body naming it, never an empty file."""
    store = open_store(str(tmp_path))
    fd = store.lock_local(LOCK, json.dumps({"pid": 1, "host": "h", "heartbeat": 12345.678901}).encode())
    seen = []

    def looking_first(real):
        def call(*args):
            seen.append(json.loads((tmp_path / LOCK).read_bytes()))  # what a reader finds if the holder stops here
            return real(*args)
        return call

    for name in ("pwrite", "ftruncate", "fsync", "write"):
        monkeypatch.setattr(os, name, looking_first(getattr(os, name)))
    for body in ({"pid": 2}, {"pid": 3, "host": "a-much-longer-host-name", "heartbeat": 1.5}, {"pid": 4}):
        store.rewrite_local_lock(fd, json.dumps(body).encode())
        assert json.loads((tmp_path / LOCK).read_bytes()) == body
    assert len(seen) >= 9 and {b["pid"] for b in seen} == {1, 2, 3, 4}
    monkeypatch.undo()
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
        assert json.loads((tmp_path / "c" / LOCK).read_text())["token"] == w.lock._token
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

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = open_store(str(tmp_path))
    assert store.create_exclusive("build.json", b"{}")
    assert not store.create_exclusive("build.json", b"{1}")
    assert (tmp_path / "build.json").read_bytes() == b"{}"


# ---------------------------------------------------------------------------------------------
# Builders of different worker splits (storage_layout.md 5, "Workers")


def fill(buf, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(2):
        buf.add_sequence(**random_sequence(rng, 9), source_index=i)


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


@pytest.mark.parametrize("first,second", [((0, 2), (0, 1)), ((0, 1), (1, 2))], ids=["W2-then-W1", "W1-then-W2"])
def test_builder_with_another_worker_split_refused_while_one_runs(tmp_path, first, second):
    """The audit's case: B (worker 0 of 2) builds; A (1 worker) would own B's shards too. A is refused, naming B."""
    url = str(tmp_path / "c")
    with CacheWriter(url, header(3), worker=first[0], num_workers=first[1]) as b:
        with b.shard(0 if first[1] == 1 else first[0]) as buf:
            fill(buf, 0)
        with pytest.raises(CacheLockedError) as refused:
            CacheWriter(url, header(3), worker=second[0], num_workers=second[1]).__enter__()
        message = str(refused.value)
        assert (f"is being built by pid {os.getpid()} on host {socket.gethostname()} since {b.lock._since} as worker "
                f"{first[0]} of {first[1]}") in message
        assert f"this builder is worker {second[0]} of {second[1]}" in message
        assert f"--num-workers {first[1]} --worker I" in message
        assert sorted(p.name for p in (tmp_path / "c" / "locks").iterdir()) == [
            f"worker-{first[0]:05d}-of-{first[1]:05d}.json"]  # the refused builder left no lock behind
    # once nobody builds, the build resumes with any split: committed shards are kept, the rest written
    with CacheWriter(url, header(3), worker=second[0], num_workers=second[1]) as a:
        for s in a.pending_shards():
            with a.shard(s) as buf:
                fill(buf, s)
    with CacheWriter(url, header(3)) as rest:
        for s in rest.pending_shards():
            with rest.shard(s) as buf:
                fill(buf, s)
        assert rest.finalize() is not None
    from shared.reader import CacheReader

    assert CacheReader(url).verify(bookkeeping=True) == []


def test_same_split_other_worker_and_dead_other_split_do_not_block(tmp_path):
    url = str(tmp_path / "c")
    with CacheWriter(url, header(3), worker=0, num_workers=2), CacheWriter(url, header(3), worker=1, num_workers=2):
        pass  # the two workers of one split run together
    stale = tmp_path / "c" / "locks" / "worker-00000-of-00003.json"  # left by a killed builder of another split
    stale.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 99, "since": "then", "heartbeat": 0}))
    with CacheWriter(url, header(3)) as w:
        assert w.pending_shards() == [0, 1, 2]


def test_writer_never_changes_a_complete_cache_nor_rewrites_a_committed_shard(tmp_path, monkeypatch):
    """Where the locks do not exclude (a filesystem whose locks do not reach other hosts), write_shard still
    refuses, before it deletes anything: the audit's B dies in write_shard(0) after A completed the cache."""
    import shared.locks
    from shared.reader import CacheReader

    url, root = str(tmp_path / "c"), tmp_path / "c"
    monkeypatch.setattr(shared.locks, "lock_holder_live", lambda store, key, held: False)
    b = CacheWriter(url, header(3), worker=0, num_workers=2).__enter__()
    try:
        with CacheWriter(url, header(3)) as a:  # not excluded here, by the monkeypatch
            for s in a.pending_shards():
                with a.shard(s) as buf:
                    fill(buf, s)
            assert a.finalize() is not None
        before = snapshot(root)
        deleted = []
        monkeypatch.setattr(b.store, "delete", lambda key: deleted.append(key))
        shard = b.shard(0)
        with pytest.raises(CacheLockedError, match=r"shard shard-00000: .* became a complete cache \(manifest.json\) "
                                                   r"while this builder ran; a complete cache is never modified"), \
                shard as buf:
            fill(buf, 100)
        assert deleted == [] and snapshot(root) == before
    finally:
        b.__exit__(None, None, None)
    assert CacheReader(url).verify(bookkeeping=True) == []

    # before completion: a shard another builder committed is not rewritten either
    url2, root2 = str(tmp_path / "d"), tmp_path / "d"
    with CacheWriter(url2, header(2)) as w:
        with w.shard(0) as buf:
            fill(buf, 0)
        before = snapshot(root2)
        with pytest.raises(CacheLockedError, match="shard shard-00000 is already committed .* a committed shard is "
                                                   "never rewritten"), w.shard(0) as buf:
            fill(buf, 1)
        assert snapshot(root2) == before
