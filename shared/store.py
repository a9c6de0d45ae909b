"""Where a cache lives: a local folder or any fsspec URL (file://, memory://, s3://, gs://).

`Store` gives the few operations the format needs (read, atomic write, list, delete, size) and a
read-only Zarr store for one shard. It knows keys and bytes, nothing about arrays' meaning or models.

Atomicity: on a local filesystem every object is written to a temporary name in the same folder
and renamed into place (os.replace), so an object is either absent or whole. Object stores (S3, GCS)
make a single PUT atomic on their own. Shard-level atomicity (all objects of a shard, or none) is
the commit rule of writer.py, not this module's.

Exclusive creation (build.json, locks): local files are written to a temporary name and hard-linked
into place (link fails if the name exists, so the winner's content is whole when a loser reads it);
object stores use a conditional PUT (`If-None-Match: *`, S3 since 2024). Local locks are also held
with flock(2) on the lock file, so the kernel releases them when the holder dies, however it dies.

Object stores are opened without fsspec's listings cache: other processes write to a shared cache
while we read it, and a cached listing would hide their objects.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import fsspec

from shared import localfs
from shared.format import MAX_OBJECT_BYTES, CacheError, CacheFormatError, UnsafePathError, check_object_key


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
    storage_options: dict = field(default_factory=dict)

    # -- paths -------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        if not key:
            return self.root
        check_object_key(key)
        return f"{self.root.rstrip('/')}/{key}"

    # -- reads -------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if self.local:
            return localfs.entry_kind(self.root, key) is not None
        return self.fs.exists(self.path(key))

    def isfile(self, key: str) -> bool:
        if self.local:
            return localfs.entry_kind(self.root, key) == "file"
        return self.fs.isfile(self.path(key))

    def read_bytes(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
        """The whole object, refused before reading when it is over max_bytes (or, locally, not a regular file
        inside the root: a link, FIFO or device is never opened for reading; shared.localfs)."""
        if self.local:
            return localfs.read_file(self.root, key, max_bytes)
        data = self.fs.cat_file(self.path(key), start=0, end=max_bytes + 1)
        if len(data) > max_bytes:
            raise CacheFormatError(f"{key} is over the {max_bytes:,} bytes such an object may hold "
                                   "(storage_layout.md 8); refused")
        return data

    def open_file(self, key: str):
        """A binary file object for reading `key` (locally a regular file inside the root, never through a link)."""
        if self.local:
            return os.fdopen(localfs.open_regular(self.root, key), "rb")
        return self.fs.open(self.path(key), "rb")

    def read_many(self, keys: list[str]) -> dict[str, bytes | Exception]:
        """Several objects at once: concurrent requests on object stores, plain reads locally.

        A key that cannot be read maps to its exception (FileNotFoundError, ...), not raised.
        """
        if self.local or len(keys) < 2:
            out: dict[str, bytes | Exception] = {}
            for key in keys:
                try:
                    out[key] = self.read_bytes(key)
                except (OSError, CacheError) as exc:
                    out[key] = exc
            return out
        paths = {self.fs._strip_protocol(self.path(key)): key for key in keys}
        got = self.fs.cat(list(paths), on_error="return")
        return {paths[self.fs._strip_protocol(path)]: data for path, data in got.items()}

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
        """Names directly under prefix (files and folders), sorted; [] when it does not exist.

        Locally a prefix that is a symbolic link (or has one on its path) is refused, not followed.
        """
        if self.local:
            return sorted(localfs.list_folder(self.root, check_object_key(prefix)))
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(names)

    # -- writes ------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object so that it is either absent or whole (see module docstring); locally never through a link."""
        target = self.path(key)
        if self.local:
            localfs.write_file(self.root, key, data)
            return
        parent = target.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except (OSError, NotImplementedError):
            pass
        self.fs.pipe_file(target, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create an object only if absent, whole; True if this call created it.

        Local: written to a temporary name, then hard-linked to the key (link refuses an existing
        name), so a concurrent reader never sees it half written. Object stores: a conditional PUT
        (`mode="create"`); where the backend has none, check then write then read back (best effort).
        """
        target = self.path(key)
        if self.local:
            return localfs.create_file(self.root, key, data)
        parent = target.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except (OSError, NotImplementedError):
            pass
        try:
            self.fs.pipe_file(target, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a backend without conditional writes
            if self.fs.exists(target):
                return False
            self.write_bytes(key, data)
            return self.read_bytes(key) == data

    # -- local locks (flock) --------------------------------------------------------------------
    def lock_local(self, key: str, data: bytes) -> int | None:
        """Take an exclusive flock on the local file `key` and write `data` into it.

        Returns the open descriptor (keep it open while holding the lock), or None when another open
        file description (another process, or another writer in this one) holds the lock. A lock
        file whose holder died is simply locked again: the kernel dropped the dead holder's flock.
        Raises NotImplementedError where the filesystem has no flock (some network filesystems).
        """
        import fcntl

        while True:
            fd, _ = localfs.open_lock_file(self.root, key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise NotImplementedError(f"no flock on {self.path(key)}: {exc}") from exc
                raise
            if localfs.still_named(self.root, key, fd):  # else the holder unlinked it between our open and flock
                break
            os.close(fd)
        self.rewrite_local_lock(fd, data)
        return fd

    @staticmethod
    def rewrite_local_lock(fd: int, data: bytes) -> None:
        """Replace the content of a held lock file in place (its inode carries the flock).

        One pwrite of the new JSON, padded with spaces to the old length (JSON allows trailing
        whitespace), then a truncate that cuts only padding: a reader that looks between the two
        system calls (the holder stopped or killed there) reads a whole body, never an empty file.
        """
        old = os.fstat(fd).st_size
        os.pwrite(fd, data.ljust(old, b" "), 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)

    def unlock_local(self, key: str, fd: int) -> None:
        """Remove the lock file, then drop the flock (unlink first: see lock_local's inode check)."""
        try:
            localfs.remove(self.root, key)
        finally:
            os.close(fd)

    def local_file_problem(self, key: str) -> str | None:
        """Local stores: why `key` is not a plain file inside the cache (a symlink, a FIFO...), else None."""
        try:
            kind = localfs.entry_kind(self.root, key)
        except UnsafePathError:
            return "resolves outside the cache (a folder on its path is a symbolic link)"
        if kind is None:
            return "missing"
        if kind == "link":
            return "is a symbolic link; a cache holds plain files only (a link could point outside it)"
        if kind != "file":
            return "is not a regular file"
        return None

    def delete(self, key: str) -> None:
        """Delete an object or a folder of them; locally never through a link (refused: shared.localfs.remove)."""
        if self.local:
            localfs.remove(self.root, key)
            return
        target = self.path(key)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    # -- zarr --------------------------------------------------------------------------------
    def zarr_store(self, prefix: str):
        """A read-only Zarr v3 store rooted at `prefix` (a shard's group)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(prefix), read_only=True)
        return FsspecStore.from_url(f"{self.url.rstrip('/')}/{prefix}", read_only=True,
                                    storage_options=self.storage_options or None)


def open_store(url: str, *, storage_options: dict | None = None) -> Store:
    """Open a cache root given as a local path or an fsspec URL. Does not create anything."""
    protocol, full = _split_url(url)
    options = dict(storage_options or {})
    if protocol not in ("file", "local", "memory"):
        options.setdefault("use_listings_cache", False)  # others write to a shared cache while we read it
    try:
        fs, root = fsspec.core.url_to_fs(full, **options)
    except (ImportError, ValueError) as exc:
        hint = " (pip install 'kdcache[s3]')" if protocol == "s3" else ""
        raise CacheError(f"cannot open cache location {url!r}: {exc}{hint}") from exc
    local = protocol in ("file", "local")
    return Store(url=full if not local else root, fs=fs, root=root.rstrip("/") or "/", local=local,
                 storage_options={} if local else options)
