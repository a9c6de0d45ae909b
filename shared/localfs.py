"""Files under a local cache root, opened without ever following a link (storage_layout.md 8).

A cache root is the user's choice and may itself be a symbolic link; everything *inside* it is data that
someone else may have written. So every path below the root is walked one component at a time with
`O_NOFOLLOW` relative to the folder above it (`dir_fd`): a component that is a symbolic link is refused,
never followed, for reading, writing and deleting alike. Files are opened non-blocking and checked with
`fstat` before a byte is read: only regular files are read, and only up to a stated size, so a FIFO named
`manifest.json` cannot hang a reader and a link to `/dev/zero` is never opened.

Knows POSIX files and keys (`a/b/c`, already checked by shared.format.check_object_key); nothing about
arrays, manifests or models.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid

from shared.format import CacheFormatError, UnsafePathError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)  # O_NOFOLLOW met a link, or a file stood where a folder belongs


def _refuse_link(key: str, shown: str) -> UnsafePathError:
    return UnsafePathError(f"{shown} (in {key}) is a symbolic link or not a folder; kdcache never reads, writes or "
                           "deletes through a link inside a cache root: remove the link, or build into a new folder")


def open_parent(root: str, key: str, *, create: bool) -> tuple[int, str]:
    """(a descriptor of key's folder, key's last component); each folder below root opened without following links.

    create: make missing folders (writers). Raises FileNotFoundError for a missing folder otherwise, and
    UnsafePathError for a folder on the way that is a link or a file. The caller closes the descriptor.
    """
    parts = key.split("/")
    if create:
        os.makedirs(root, exist_ok=True)
    try:  # the root itself may be a link: the user's choice
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError as exc:  # a file where the root should be: nothing of a cache is there
        raise FileNotFoundError(errno.ENOENT, f"{root} is a file, not a folder") from exc
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                child = _open_child_dir(part, fd, key, parts[: i + 1])
            except OSError as exc:
                if exc.errno in LINK_ERRNOS:
                    raise _refuse_link(key, "/".join(parts[: i + 1])) from exc
                raise
            os.close(fd)
            fd = child
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def _open_child_dir(part: str, fd: int, key: str, shown: list[str]) -> int:
    try:
        return os.open(part, DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in LINK_ERRNOS:
            raise _refuse_link(key, "/".join(shown)) from exc
        raise


def kind_of(mode: int) -> str:
    """'file', 'folder', 'link' or 'special file' (a FIFO, socket or device) for an lstat mode."""
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "special file"


def entry_kind(root: str, key: str) -> str | None:
    """What key is ('file', 'folder', 'link', 'special file'), None when absent; a link on the way raises UnsafePathError."""
    try:
        fd, name = open_parent(root, key, create=False)
    except FileNotFoundError:
        return None
    try:
        return kind_of(os.lstat(name, dir_fd=fd).st_mode)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def open_regular(root: str, key: str) -> int:
    """A read-only descriptor of regular file `key`, opened without following a link and non-blocking (a FIFO is
    refused, never read). FileNotFoundError when absent; UnsafePathError for a link or a special file."""
    fd, name = open_parent(root, key, create=False)
    try:
        try:
            file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{key} is a symbolic link; a cache holds regular files only, and kdcache "
                                      "never follows a link inside a cache root (it could point anywhere)") from exc
            raise
    finally:
        os.close(fd)
    info = os.fstat(file)
    if not stat.S_ISREG(info.st_mode):
        os.close(file)
        raise UnsafePathError(f"{key} is not a regular file (a {kind_of(info.st_mode)}: a FIFO, socket or device, "
                              "or a folder); a cache holds regular files only")
    return file


def read_file(root: str, key: str, max_bytes: int) -> bytes:
    """The bytes of regular file `key`, refused (before reading) when it is not one or is over max_bytes.

    FileNotFoundError when absent; UnsafePathError for a link, FIFO, socket or device (opened non-blocking,
    never read); CacheFormatError when larger than max_bytes.
    """
    file = open_regular(root, key)
    try:
        info = os.fstat(file)
        if info.st_size > max_bytes:
            raise CacheFormatError(f"{key} is {info.st_size:,} bytes, over the {max_bytes:,} bytes such an object may "
                                   "hold (storage_layout.md 8); refused before reading it")
        chunks, size = [], 0
        while size <= max_bytes:  # the file may grow while it is read: never take more than max_bytes + 1
            block = os.read(file, min(max_bytes + 1 - size, 16 * 2**20))
            if not block:
                break
            chunks.append(block)
            size += len(block)
        if size > max_bytes:
            raise CacheFormatError(f"{key} grew past {max_bytes:,} bytes while it was read; refused")
        return b"".join(chunks)
    finally:
        os.close(file)


def _write_temporary(fd: int, name: str, data: bytes) -> str:
    """Write data to a new `.tmp-` file beside name in folder fd and fsync it; returns the temporary name."""
    tmp = f".tmp-{uuid.uuid4().hex}-{name}"
    file = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(file, view):]
        os.fsync(file)
    except BaseException:
        os.close(file)
        _unlink_quietly(tmp, fd)
        raise
    os.close(file)
    return tmp


def _unlink_quietly(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass


def _refuse_non_file_target(key: str, name: str, fd: int) -> None:
    try:
        kind = kind_of(os.lstat(name, dir_fd=fd).st_mode)
    except FileNotFoundError:
        return
    if kind != "file":
        raise UnsafePathError(f"{key} is a {kind}, not a regular file; kdcache never writes through a link or over "
                              "something it did not create: remove it, or build into a new folder")


def write_file(root: str, key: str, data: bytes) -> None:
    """Write key atomically (a `.tmp-` file in the same folder, fsync, rename): absent or whole, never through a link."""
    fd, name = open_parent(root, key, create=True)
    try:
        _refuse_non_file_target(key, name, fd)
        tmp = _write_temporary(fd, name, data)
        try:
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            _unlink_quietly(tmp, fd)
            raise
    finally:
        os.close(fd)


def create_file(root: str, key: str, data: bytes) -> bool:
    """Create key only if absent, whole (a `.tmp-` file hard-linked to it); True if this call created it.

    A filesystem without hard links falls back to O_EXCL (a loser of the race may read it half written).
    """
    fd, name = open_parent(root, key, create=True)
    try:
        tmp = _write_temporary(fd, name, data)
        try:
            os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return _create_excl(fd, name, data)
        finally:
            _unlink_quietly(tmp, fd)
    finally:
        os.close(fd)


def _create_excl(fd: int, name: str, data: bytes) -> bool:
    try:
        file = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
    except FileExistsError:
        return False
    with os.fdopen(file, "wb") as f:
        f.write(data)
    return True


def open_lock_file(root: str, key: str, *, create: bool = True) -> tuple[int, bool]:
    """(a descriptor of lock file key, opened without following a link, whether the name still refers to that
    file). create: read-write, created if absent; else read-only (FileNotFoundError when absent). Refuses a
    link or a non-regular file (UnsafePathError): a FIFO is opened non-blocking and never read."""
    fd, name = open_parent(root, key, create=create)
    flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        try:
            file = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{key} is a symbolic link; kdcache never writes through a link inside a cache "
                                      "root: remove it") from exc
            raise
        info = os.fstat(file)
        if not stat.S_ISREG(info.st_mode):
            os.close(file)
            raise UnsafePathError(f"{key} is not a regular file (a {kind_of(info.st_mode)}); remove it")
        return file, _same_file(info, name, fd)
    finally:
        os.close(fd)


def still_named(root: str, key: str, file: int) -> bool:
    """Whether key still names the open file (a holder may have unlinked it between our open and our flock)."""
    try:
        fd, name = open_parent(root, key, create=False)
    except FileNotFoundError:
        return False
    try:
        return _same_file(os.fstat(file), name, fd)
    finally:
        os.close(fd)


def _same_file(info: os.stat_result, name: str, fd: int) -> bool:
    try:
        now = os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (info.st_ino, info.st_dev)


def links_under(root: str, key: str) -> list[str]:
    """Every symbolic link at or below key (a folder or a file), as keys; [] when key is absent."""
    try:
        fd, name = open_parent(root, key, create=False)
    except FileNotFoundError:
        return []
    try:
        try:
            kind = kind_of(os.lstat(name, dir_fd=fd).st_mode)
        except FileNotFoundError:
            return []
        if kind != "folder":
            return [key] if kind == "link" else []
        found = []
        for path, dirs, files, dirfd in os.fwalk(name, dir_fd=fd, follow_symlinks=False):
            for entry in dirs + files:
                if stat.S_ISLNK(os.lstat(entry, dir_fd=dirfd).st_mode):
                    found.append(f"{key}{path[len(name):]}/{entry}")
        return found
    finally:
        os.close(fd)


def remove(root: str, key: str) -> None:
    """Delete key (a file, or a folder and everything in it) without following any link; absent is fine.

    Refuses (UnsafePathError, before deleting anything) when key or anything below it is a symbolic link:
    kdcache did not create it and will not guess what it was for.
    """
    links = links_under(root, key)
    if links:
        raise UnsafePathError(f"{links[0]} is a symbolic link inside the cache root; kdcache never deletes through "
                              f"or removes a link it did not create, so nothing of {key} was deleted: remove the link")
    try:
        fd, name = open_parent(root, key, create=False)
    except FileNotFoundError:
        return
    try:
        try:
            kind = kind_of(os.lstat(name, dir_fd=fd).st_mode)
        except FileNotFoundError:
            return
        if kind != "folder":
            _unlink_quietly(name, fd)
            return
        for _path, dirs, files, dirfd in os.fwalk(name, dir_fd=fd, topdown=False, follow_symlinks=False):
            for entry in files:
                _unlink_quietly(entry, dirfd)
            for entry in dirs:
                os.rmdir(entry, dir_fd=dirfd)
        os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def list_folder(root: str, key: str = "") -> dict[str, str]:
    """{name: kind} of the entries directly in folder key ('' = the root), without following links; {} if absent."""
    if key:
        try:
            fd, name = open_parent(root, key, create=False)
        except FileNotFoundError:
            return {}
        try:
            try:
                folder = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return {}
            except OSError as exc:
                if exc.errno in LINK_ERRNOS:
                    raise _refuse_link(key, key) from exc
                raise
        finally:
            os.close(fd)
    else:
        try:
            folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return {}
    try:
        with os.scandir(folder) as entries:
            return {e.name: kind_of(e.stat(follow_symlinks=False).st_mode) for e in entries}
    finally:
        os.close(folder)
