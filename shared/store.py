"""Where a cache lives: a local folder or any fsspec URL (file://, memory://, s3://, gs://).

`Store` gives the few operations the format needs (read, atomic write, list, delete, size) and a
read-only Zarr store for one shard. It knows keys and bytes, nothing about arrays' meaning or models.

Atomicity: on a local filesystem every object is written to a temporary name in the same folder
and renamed into place (os.replace), so an object is either absent or whole. Object stores (S3, GCS)
make a single PUT atomic on their own. Shard-level atomicity (all objects of a shard, or none) is
the commit rule of writer.py, not this module's.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import fsspec

from shared.format import CacheError, check_object_key


def _split_url(url: str) -> tuple[str, str]:
    url = os.fspath(url)
    if "://" in url:
        protocol = url.split("://", 1)[0]
        return protocol, url
    return "file", os.path.abspath(os.path.expanduser(url))


@dataclass
class Store:
    """A cache root: `url` as the user gave it, `fs` the fsspec filesystem, `root` its path there."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    local: bool

    # -- paths -------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        if not key:
            return self.root
        check_object_key(key)
        return f"{self.root.rstrip('/')}/{key}"

    # -- reads -------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def isfile(self, key: str) -> bool:
        return self.fs.isfile(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self.path(key)))
        except (FileNotFoundError, OSError):
            return None

    def list_files(self, prefix: str = "") -> dict[str, int]:
        """Every object under prefix (recursively) as {key relative to root: size}."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        root = self.fs._strip_protocol(self.root).rstrip("/")
        out = {}
        for full, info in found.items():
            stripped = self.fs._strip_protocol(full)
            if not stripped.startswith(root + "/"):
                continue
            out[stripped[len(root) + 1 :]] = int(info.get("size") or 0)
        return out

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under prefix (files and folders), sorted; [] when it does not exist."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(names)

    # -- writes ------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object so that it is either absent or whole (see module docstring)."""
        target = self.path(key)
        if self.local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        else:
            parent = target.rsplit("/", 1)[0]
            try:
                self.fs.makedirs(parent, exist_ok=True)
            except (OSError, NotImplementedError):
                pass
            self.fs.pipe_file(target, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create an object only if absent; True if this call created it.

        Local: O_EXCL, race-free. Object stores: check then write then read back (best effort; the
        content carries a unique token so the caller can confirm it owns what it wrote).
        """
        target = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(target):
            return False
        self.write_bytes(key, data)
        return self.read_bytes(key) == data

    def delete(self, key: str) -> None:
        target = self.path(key)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    # -- zarr --------------------------------------------------------------------------------
    def zarr_store(self, prefix: str):
        """A read-only Zarr v3 store rooted at `prefix` (a shard's group)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(prefix), read_only=True)
        return FsspecStore.from_url(f"{self.url.rstrip('/')}/{prefix}", read_only=True)


def open_store(url: str, *, storage_options: dict | None = None) -> Store:
    """Open a cache root given as a local path or an fsspec URL. Does not create anything."""
    protocol, full = _split_url(url)
    try:
        fs, root = fsspec.core.url_to_fs(full, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        hint = " (pip install 'kdcache[s3]')" if protocol == "s3" else ""
        raise CacheError(f"cannot open cache location {url!r}: {exc}{hint}") from exc
    local = protocol in ("file", "local")
    return Store(url=full if not local else root, fs=fs, root=root.rstrip("/") or "/", local=local)
