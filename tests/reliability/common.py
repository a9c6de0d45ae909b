"""Helpers of the reliability tests: commands as subprocesses, a cache's contents, a reader that watches a build."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

from shared.format import CacheError, IncompleteCacheError
from shared.reader import CacheReader
from shared.store import open_store

REPO = Path(__file__).resolve().parents[2]


def command(tool: str, *args) -> list[str]:
    """`kdcache ...` / `kdtrain ...` as this interpreter runs them (python -m cli.<tool>)."""
    return [sys.executable, "-m", f"cli.{tool}", *map(str, args)]


def contents(url) -> dict[str, bytes]:
    """Every object of a cache but locks, .tmp- leftovers and owner.json (a random id); build.json and manifest.json
    without created_at."""
    store = open_store(str(url))
    out = {}
    for key in sorted(store.list_files()):
        if key.startswith("locks/") or key.rsplit("/", 1)[-1].startswith(".tmp-") or key == "owner.json":
            continue
        data = store.read_bytes(key)
        if key in ("build.json", "manifest.json"):
            obj = json.loads(data)
            obj.pop("created_at")
            obj.pop("manifest_sha256", None)  # the seal covers created_at
            data = json.dumps(obj, sort_keys=True).encode()
        out[key] = data
    return out


def committed(root: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in Path(root).glob("shards/shard-*/commit.json"))


def commits_are_whole(url) -> list[str]:
    """Problems with committed shards: a commit file whose objects are not all there with its sizes and sha256."""
    store = open_store(str(url))
    problems = []
    for key in store.list_files("shards"):
        if not key.endswith("/commit.json"):
            continue
        key = f"shards/{key}" if not key.startswith("shards/") else key
        commit = json.loads(store.read_bytes(key))
        for obj, info in commit["objects"].items():
            try:
                data = store.read_bytes(obj)
            except FileNotFoundError:
                problems.append(f"{key}: {obj} missing")
                continue
            if (len(data), hashlib.sha256(data).hexdigest()) != (info["size"], info["sha256"]):
                problems.append(f"{key}: {obj} differs from its commit")
    return problems


class ReaderLoop:
    """Opens the cache over and over in a thread while a build runs, as an impatient trainer would.

    Each round: CacheReader either refuses (IncompleteCacheError once build.json exists; before
    that, "not a kdcache cache") or opens a complete cache that verifies and reads end to end; and
    every shard with a commit file is whole. Anything else lands in `errors`.
    """

    def __init__(self, url):
        self.url = str(url)
        self.errors: list[str] = []
        self.num_incomplete = 0
        self.num_complete = 0
        self.num_commits_checked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self):
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as exc:  # noqa: BLE001 (any surprise is a finding)
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(0.05)  # leave the CPU to the builder

    def _round(self):
        try:
            reader = CacheReader(self.url)
        except IncompleteCacheError:
            self.num_incomplete += 1
        except CacheError as exc:
            if "is not a kdcache cache" not in str(exc) and "does not exist" not in str(exc):
                self.errors.append(str(exc))
        else:
            problems = reader.verify(bookkeeping=True)
            if problems:
                self.errors.append("; ".join(map(str, problems)))
            for _ in reader.iter_sequences():
                pass
            self.num_complete += 1
        found = commits_are_whole(self.url)
        self.errors += found
        self.num_commits_checked += 1


def write_speeches(path: Path, num_rows: int) -> Path:
    """Shakespeare speeches, one per .jsonl row ({"text": ...}): from a handful of tokens to several windows."""
    from tests.conftest import shakespeare_text

    speeches = [s.strip() for s in shakespeare_text(40_000).split("\n\n") if s.strip()][:num_rows]
    assert len(speeches) == num_rows
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    return path
