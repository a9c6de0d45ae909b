"""A kdtrain run folder (`kdtrain run --out`): which folders a run may use, its marker, its lock, safe writes.

The rules are docs/runs-and-plans.md, section 1. In short: a run folder carries a marker written at
creation (`owner.json`, the marker kdcache's caches carry too: tool kdtrain, kind run, a random id, and the
names of the student's files once they are saved); kdtrain deletes or overwrites only the names it owns there (OWNED plus the marker's `files`);
a model folder, a cache or any other non-empty folder without the marker is never an --out; symbolic
links among the owned names are refused, and files are written under a temporary name and renamed into
place, so a link is replaced, never followed. While a run uses the folder it holds an exclusive
flock(2) on `run.lock`, whose body says who holds it; the kernel drops it when the holder dies.

Knows files, JSON and flock; nothing about models, data or training (the caller passes the function
that saves the student).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid

from shared.errors import UserError
from shared.format import BUILD_FILE, LOCKS_DIR, MANIFEST_FILE, META_DIR, SHARDS_DIR
from trainer.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from trainer.metrics import METRICS_FILE

MARKER_FILE = "owner.json"  # the name kdcache gives a cache's marker (shared/ownership.py): one rule for both tools
LOCK_FILE = "run.lock"
STAGING_DIR = ".tmp-student"  # the student is saved here, then its files are renamed into the folder
RUN_FILE = "run.json"
# What a run writes as it goes; `--resume` without a complete checkpoint deletes these and starts over.
WRITTEN_AS_IT_GOES = (RUN_FILE, METRICS_FILE, CHECKPOINTS_DIR, "trace", "tensorboard", "wandb")
# Names a run owns in every run folder (besides the student's files listed in the marker).
OWNED = (MARKER_FILE, LOCK_FILE, STAGING_DIR, *WRITTEN_AS_IT_GOES)
# What makes an unmarked folder a model folder or a cache (for the refusal's wording; both are refused anyway).
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
CACHE_FILES = (MANIFEST_FILE, BUILD_FILE)  # a cache root always holds one of these (storage_layout.md 2)
CACHE_NAMES = (MANIFEST_FILE, BUILD_FILE, SHARDS_DIR, META_DIR, LOCKS_DIR)
MAX_MARKER_BYTES = 1 << 20
ID_RE = re.compile(r"^[0-9a-f]{32}$")


class RunFolderError(UserError):
    """An --out that kdtrain may not use as asked; the message names the path and what to do."""


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def listed(names) -> str:
    """At most six of names, sorted, and how many more."""
    names = sorted(names)
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def write_file_atomically(path: str, data: bytes) -> None:
    """Write `path` through a temporary `.tmp-NAME` beside it, renamed into place (a link at `path` is replaced)."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    if _is_link(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    """Delete a file, a link (not what it points to) or a folder tree (rmtree removes links inside, unfollowed)."""
    if os.path.isdir(path) and not _is_link(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# the lock


def _read_lock_body(path: str) -> dict:
    for _ in range(20):  # a holder writes its body right after taking the flock
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                body = json.loads(f.read(MAX_MARKER_BYTES) or b"null")
            if isinstance(body, dict):
                return body
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def take_lock(folder: str, name: str = LOCK_FILE, user: str = "kdtrain run") -> int:
    """An open descriptor holding the exclusive flock of <folder>/<name>, with our body written in it; RunFolderError
    naming the holder (another `user`) when it is held. Give it back with drop_lock."""
    import fcntl

    path = os.path.join(folder, name)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunFolderError(f"{path} is a symbolic link; kdtrain never follows links in a run folder: "
                                     "remove it and rerun") from exc
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunFolderError(f"{path} is not a regular file; remove it and rerun")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            held = _read_lock_body(path)
            raise RunFolderError(
                f"{{out}} {folder} is in use by another {user}: pid {held.get('pid', '?')} on host "
                f"{held.get('host', '?')} since {held.get('since', '?')} (lock {path}). Wait for it to end or stop "
                "it, or pass another {out}") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise RunFolderError(f"{{out}} {folder}: this filesystem has no flock(2) ({exc}), so two runs into one "
                                     "folder could not exclude each other; put run folders on a local disk") from exc
            raise
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder unlinked it between our open and our flock: take the new file
            break
        os.close(fd)
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _utc_now(),
                       "token": uuid.uuid4().hex}).encode()
    os.pwrite(fd, body.ljust(os.fstat(fd).st_size, b" "), 0)  # never an empty file to a reader (JSON allows spaces)
    os.ftruncate(fd, len(body))
    return fd


def drop_lock(folder: str, fd: int, name: str = LOCK_FILE) -> None:
    """Unlink the lock file, then drop the flock (in that order: see take_lock's inode check)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, name))
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# the folder


def read_marker_file(folder: str) -> tuple[bool, object, str | None]:
    """(whether <folder>/owner.json exists, its JSON, what is wrong with the file: not a regular file, too large,
    not JSON; None when it reads). Its meaning is the caller's (a run folder's, a plan folder's)."""
    path = os.path.join(folder, MARKER_FILE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False, None, None
    if not stat.S_ISREG(st.st_mode):
        return True, None, "is not a regular file"
    if st.st_size > MAX_MARKER_BYTES:
        return True, None, f"holds {st.st_size} bytes (a marker has a few hundred)"
    try:
        with open(path, "rb") as f:
            return True, json.loads(f.read()), None
    except (OSError, ValueError) as exc:
        return True, None, f"cannot be read as JSON ({exc})"


def read_marker(folder: str) -> dict | None:
    """The marker of a run folder, None where there is none; RunFolderError when it is not a valid one."""
    path = os.path.join(folder, MARKER_FILE)
    exists, marker, problem = read_marker_file(folder)
    if not exists:
        return None
    if problem is None:
        files = marker.get("files") if isinstance(marker, dict) else None
        if isinstance(marker, dict) and (marker.get("tool"), marker.get("kind")) != ("kdtrain", "run") and all(
                isinstance(marker.get(k), str) for k in ("tool", "kind")):
            problem = f"marks it as a {marker['tool']!r:.24} {marker['kind']!r:.24} folder, not a kdtrain run folder"
        elif not (isinstance(marker, dict) and marker.get("tool") == "kdtrain" and marker.get("kind") == "run"
                  and isinstance(marker.get("id"), str) and ID_RE.match(marker["id"]) and isinstance(files, list)
                  and all(isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and os.sep not in n
                          for n in files)):
            problem = "is not a kdtrain run marker (tool kdtrain, kind run, a 32-hex-digit id, a list of file names)"
    if problem:
        raise RunFolderError(f"{path} {problem}, so kdtrain cannot tell what it owns in {folder}; it deletes and "
                             "writes nothing there: pass another {out}, or delete the folder by hand")
    return marker


def _new_marker() -> dict:
    return {"tool": "kdtrain", "kind": "run", "id": uuid.uuid4().hex, "created_at": _utc_now(),
            "host": socket.gethostname(), "files": []}


def _refuse_unmarked(folder: str, entries: set[str]) -> None:
    """An unmarked non-empty folder is never an --out; say what it holds."""
    models = sorted(n for n in entries if n in MODEL_FILES or n.endswith(".safetensors"))
    caches = sorted(entries & set(CACHE_NAMES)) if entries & set(CACHE_FILES) else []
    if models:
        what = f"a model folder (it holds {', '.join(models)}): kdtrain never writes into or deletes a model's files"
    elif caches:
        what = f"a kdcache cache (it holds {', '.join(caches)}): a cache is never a run folder"
    elif RUN_FILE in entries or METRICS_FILE in entries:
        what = (f"not marked as a kdtrain run folder (no {MARKER_FILE}; a run of a kdtrain older than the marker "
                "has none), so kdtrain will not delete or write anything in it")
    else:
        what = f"a folder kdtrain did not create (it holds {listed(entries)}; no {MARKER_FILE})"
    raise RunFolderError(f"{{out}} {folder} is {what}. Pass a new or empty folder as {{out}}"
                         + (", or delete that one by hand if it is an old run you mean to replace" if not models
                            and not caches else ""))


class RunFolder:
    """--out held by this process (rank 0): its marker and its lock. Use `RunFolder.open`, then `release()`."""

    def __init__(self, path: str, lock_fd: int):
        self.path = path
        self._lock_fd: int | None = lock_fd
        self.marker: dict = {}
        self.created: list[str] = []  # the folders open() made, --out first: release() removes them again if unused

    @classmethod
    def open(cls, out: str, *, resume: bool, overwrite: bool, log=print) -> RunFolder:
        """Check --out, take its lock, and prepare it as --resume / --overwrite ask (docs/runs-and-plans.md 1.2)."""
        if _is_link(out):
            raise RunFolderError(f"{{out}} {out} is a symbolic link; kdtrain never follows links to write or delete: "
                                 f"pass the folder itself ({os.path.realpath(out)})")
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunFolderError(f"{{out}} {out} is a file; pass a folder")
        if os.path.isdir(out):
            entries = set(os.listdir(out)) - {LOCK_FILE, MARKER_FILE}
            if entries and read_marker(out) is None:  # refused before anything is created in someone's folder
                _refuse_unmarked(out, entries)
        created, missing = [], os.path.abspath(out)
        while not os.path.lexists(missing):  # --out and the parents makedirs is about to create
            created.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(out, exist_ok=True)
        folder = cls(out, take_lock(out))
        folder.created = created
        try:
            folder._prepare(resume=resume, overwrite=overwrite, log=log)  # looked at again, under the lock
        except BaseException:
            folder.release()
            raise
        return folder

    def owned(self) -> set[str]:
        names = set(OWNED) | set(self.marker.get("files", []))
        return names | {".tmp-" + n for n in names}

    def _prepare(self, *, resume: bool, overwrite: bool, log) -> None:
        out = self.path
        entries = set(os.listdir(out)) - {LOCK_FILE}
        marker = read_marker(out)
        if marker is None:
            if entries - {MARKER_FILE}:
                _refuse_unmarked(out, entries)
            self._write_marker(_new_marker())
            return
        self.marker = marker
        ours = (entries - {MARKER_FILE}) & self.owned()
        kept = sorted(entries - self.owned())
        links = sorted(os.path.join(out, n) for n in ours if _is_link(os.path.join(out, n)))
        if links:
            raise RunFolderError(f"{listed(links)} in run folder {out} is a symbolic link; kdtrain writes only plain "
                                 "files and folders there and never follows a link: remove the link and rerun")
        if not ours:
            return  # a marked folder with nothing of a run in it (a run refused before it wrote anything)
        if not (resume or overwrite):
            raise RunFolderError(f"{{out}} {out} is not empty; pass {{resume}} to continue the run in it or "
                                 f"{{overwrite}} "
                                 "to replace it")
        if overwrite:
            for name in sorted(ours):
                _remove(os.path.join(out, name))
            self._write_marker(_new_marker())
            log(f"--overwrite: deleted the previous run in {out} ({listed(ours)})"
                + (f"; kept what kdtrain did not write: {listed(kept)}" if kept else ""))
        elif latest_checkpoint(out) is None:
            removed = sorted(ours & set(WRITTEN_AS_IT_GOES))
            for name in removed:
                _remove(os.path.join(out, name))
            log(f"--resume: {out} holds no complete checkpoint (the run there stopped before its first one, or saved "
                f"none); starting over from step 0 (deleted {', '.join(removed) or 'nothing'})")

    def _write_marker(self, marker: dict) -> None:
        write_file_atomically(os.path.join(self.path, MARKER_FILE), json.dumps(marker, indent=1).encode())
        self.marker = marker

    def write_json(self, name: str, data: dict) -> None:
        """Write <out>/name (an owned name) atomically."""
        assert name in self.owned(), name
        write_file_atomically(os.path.join(self.path, name), json.dumps(data, indent=1).encode())

    def save_student(self, save) -> list[str]:
        """Save the student with `save(folder)` into STAGING_DIR, list its files in the marker, then move them in.

        Returns the names. A name the student writes that the folder already holds and kdtrain does not own
        is refused (nothing moved; the student stays in STAGING_DIR).
        """
        staging = os.path.join(self.path, STAGING_DIR)
        _remove(staging)
        save(staging)
        names = sorted(os.listdir(staging))
        theirs = [n for n in names if os.path.lexists(os.path.join(self.path, n)) and n not in self.owned()]
        if theirs:
            raise RunFolderError(f"the student's files {listed(theirs)} would replace files in {self.path} that kdtrain "
                                 f"did not write; nothing was replaced: the student is in {staging}. Move those files "
                                 "away and copy it in by hand")
        self._write_marker({**self.marker, "files": sorted(set(self.marker.get("files", [])) | set(names))})
        for name in names:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not _is_link(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
        return names

    def release(self) -> None:
        """Unlink the lock file, then drop the flock (drop_lock).

        A folder that open() created and in which the run wrote nothing but its marker (a run refused before it
        began: a bad cache, a student that does not fit) is removed, with the parents open() created for it, so that a
        refusal leaves nothing behind.
        """
        if self._lock_fd is None:
            return
        unused = bool(self.created) and not self.marker.get("files") and set(os.listdir(self.path)) <= {
            LOCK_FILE, MARKER_FILE}
        if unused:  # still under the lock: nobody else can be using the folder
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, MARKER_FILE))
        drop_lock(self.path, self._lock_fd)
        self._lock_fd = None
        if unused:
            with contextlib.suppress(OSError):  # another run may have taken an empty folder meanwhile: leave it
                for path in self.created:
                    os.rmdir(path)
