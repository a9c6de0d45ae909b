"""Who is building a cache: per-worker lock files, liveness, and the refusals that name the holder.

A worker holds `locks/worker-IIIII-of-NNNNN.json` while it builds (storage_layout.md 5, "Locks"):
locally with flock(2) on that file (the kernel drops it when the holder dies, however it dies), on an
object store by a conditional create. The JSON body says who holds it (host, pid, since, heartbeat,
token) so that a refused builder can name the holder. Builders of different worker splits must not run
together (their shards overlap); `BuildLock.refuse_other_splits` enforces it.

Knows the Store and lock bodies; nothing about shards, arrays or models.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid

from shared.format import LOCKS_DIR, MAX_BOOKKEEPING_BYTES, CacheError, CacheLockedError
from shared.store import Store

LOCK_NAME_RE = re.compile(r"^worker-([0-9]+)-of-([0-9]+)\.json$")  # locks/worker-IIIII-of-NNNNN.json
STALE_AFTER_S = 3600.0  # a lock of another host whose heartbeat is older than this is dead


def lock_key(worker: int, num_workers: int) -> str:
    return f"{LOCKS_DIR}/worker-{worker:05d}-of-{num_workers:05d}.json"


def read_lock(store: Store, key: str, retries: int = 0) -> dict:
    """A lock file's JSON body ({} if absent or unreadable; retried while a holder may be writing it)."""
    for attempt in range(retries + 1):
        try:
            held = json.loads(store.read_bytes(key, max_bytes=MAX_BOOKKEEPING_BYTES))
            if isinstance(held, dict):
                return held
        except (FileNotFoundError, ValueError, UnicodeDecodeError, OSError):
            pass
        if attempt < retries:
            time.sleep(0.05)
    return {}


def lock_holder_live(store: Store, key: str, held: dict) -> bool:
    """Whether lock file `key` (body `held`) belongs to a live builder.

    Local stores: its flock is held, or its body names another host with a fresh heartbeat (a
    filesystem whose locks do not reach other hosts). Object stores: lock_is_live(held).
    """
    flocked = _flock_held(store, key) if store.local else None
    if flocked is None:  # an object store, or a filesystem without flock
        return lock_is_live(held)
    return flocked or (held.get("host") not in (None, socket.gethostname()) and lock_is_live(held))


def _flock_held(store: Store, key: str) -> bool | None:
    """Local stores: whether some open file description holds the flock of lock file `key` (None: no flock here)."""
    import fcntl

    from shared import localfs

    try:
        fd, _ = localfs.open_lock_file(store.root, key, create=False)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def lock_is_live(held: dict, stale_after_s: float = STALE_AFTER_S) -> bool:
    """A lock is live if its process runs (same host) or its heartbeat is recent (other host)."""
    if not held:
        return False
    if held.get("host") == socket.gethostname():
        pid = held.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    heartbeat = held.get("heartbeat")
    return isinstance(heartbeat, (int, float)) and time.time() - heartbeat < stale_after_s


def refuse_live_locks(store: Store, url: str) -> None:
    """--overwrite: refuse (naming the holder) while any builder of this cache is live."""
    for name in store.list_dir(LOCKS_DIR):
        key = f"{LOCKS_DIR}/{name}"
        held = read_lock(store, key)
        if lock_holder_live(store, key, held):
            raise CacheLockedError(
                f"{{overwrite}}: {url} is being built by pid {held.get('pid')} on host {held.get('host')} "
                f"since {held.get('since')} ({key}); stop that build first, then rerun with {{overwrite}}")


class BuildLock:
    """The lock of worker `worker` of `num_workers` on one cache: acquire, heartbeat, release."""

    def __init__(self, store: Store, url: str, worker: int, num_workers: int, since: str):
        self.store, self.url = store, url
        self.worker, self.num_workers = worker, num_workers
        self.key: str | None = None  # set while held
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._since = since

    def _body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": self._since, "heartbeat": time.time(),
                "worker": self.worker, "num_workers": self.num_workers, "token": self._token}

    def acquire(self) -> None:
        """Hold locks/worker-w-of-W.json (storage_layout.md 5, "Locks"); refuse, naming the holder, if it is live.

        Local: flock on the file (the kernel frees it when the holder dies, so a dead holder's lock
        is recovered without guessing); the JSON body says who holds it. A lock whose body names
        another host with a fresh heartbeat is respected even if flock was granted (NFS without
        lock support). Object stores: conditional create; a lock whose holder is dead (same host
        and no such pid, or heartbeat older than an hour) is deleted and created again.
        """
        key = lock_key(self.worker, self.num_workers)
        store = self.store
        fd = None
        if store.local:
            previous = read_lock(store, key)
            try:
                fd = store.lock_local(key, json.dumps(self._body()).encode())
            except NotImplementedError:  # no flock here: the object-store rules below
                fd = -1
        if store.local and fd != -1:
            if fd is None:
                self._refuse(key, read_lock(store, key, retries=20))
            if previous.get("host") not in (None, socket.gethostname()) and lock_is_live(previous):
                store.rewrite_local_lock(fd, json.dumps(previous).encode())
                os.close(fd)
                self._refuse(key, previous)
            self._fd, self.key = fd, key
            return
        for _ in range(2):
            if store.create_exclusive(key, json.dumps(self._body()).encode()):
                self.key = key
                return
            held = read_lock(store, key, retries=3)
            if lock_is_live(held):
                self._refuse(key, held)
            store.delete(key)  # a dead holder's lock: remove it and race for a fresh one (best effort)
        self._refuse(key, read_lock(store, key))

    def refuse_other_splits(self) -> None:
        """Refuse while a builder with another --num-workers is live (storage_layout.md 5, "Workers").

        Worker w of W owns the shards with index % W == w, so builders of two different splits would
        own overlapping shards, and their per-worker locks would not exclude each other. Called after
        taking our own lock: of two such builders starting together, each takes its lock before
        looking for the other's, so at least one sees the other (both may refuse; neither writes).
        Builders of one split run together; a build may be resumed with another split once nobody builds.
        """
        for name in self.store.list_dir(LOCKS_DIR):
            key = f"{LOCKS_DIR}/{name}"
            if key == self.key or name.startswith(".tmp-"):
                continue
            split = LOCK_NAME_RE.match(name)
            if split and int(split[2]) == self.num_workers:
                continue  # another worker of our split: disjoint shards (its own lock excludes its twin)
            held = read_lock(self.store, key, retries=20)
            if not lock_holder_live(self.store, key, held):
                continue  # left by a builder that is gone
            self.release()
            theirs = f"worker {int(split[1])} of {int(split[2])}" if split else f"lock {name}"
            raise CacheLockedError(
                f"{self.url} is being built by pid {held.get('pid')} on host {held.get('host')} since "
                f"{held.get('since')} as {theirs} ({key}); this builder is worker {self.worker} of {self.num_workers}. "
                "Builders running together on one cache must use the same {num_workers} (with another split their "
                f"shards overlap): pass {{num_workers}} {int(split[2]) if split else 'N'} {{worker}} I, or wait for "
                "that "
                "build to end (or stop it) and rerun this command to resume with your split."
            )

    def _refuse(self, key: str, held: dict) -> None:
        raise CacheLockedError(
            f"{self.url} (worker {self.worker} of {self.num_workers}) is being built by pid {held.get('pid')} on "
            f"host {held.get('host')} since {held.get('since')} (lock {key}). Wait for it, or stop it and rerun "
            "the same command to resume; to split the work instead, give each builder {num_workers} N {worker} I."
        )

    def heartbeat(self) -> None:
        if not self.key:
            return
        body = json.dumps(self._body()).encode()
        if self._fd is not None:
            self.store.rewrite_local_lock(self._fd, body)
        else:
            self.store.write_bytes(self.key, body)

    def release(self) -> None:
        if not self.key:
            return
        if self._fd is not None:
            self.store.unlock_local(self.key, self._fd)
            self._fd = None
        else:
            try:
                if read_lock(self.store, self.key).get("token") == self._token:
                    self.store.delete(self.key)
            except (OSError, CacheError):
                pass
        self.key = None
