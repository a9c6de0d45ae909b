"""Read-only use: a cache on a read-only filesystem can be inspected, verified and trained from.

Two ways, both honest about what they prove:
- in-process (always): every way this process could write a file under the cache folder (open for
  writing, os.open with write flags, rename, replace, unlink, mkdir, rmdir, chmod, utime) is patched
  to fail with EROFS, then `kdcache info/verify/ls` and `kdtrain run` run through their CLIs.
  It catches any write our code or its libraries make through Python's file API.
- a real read-only bind mount (multiproc): the tests run as root, so `chmod -R a-w` would not stop
  a write; instead `unshare -m` gives the commands a private mount namespace in which the cache folder
  is bind-mounted read-only (`mount --bind -o ro`), and the kernel refuses any write. Skipped where
  the sandbox forbids unshare or mount.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.kdcache import app as kdcache_app
from cli.kdtrain import app as kdtrain_app
from shared.reader import CacheReader
from tests.reliability.common import REPO, command

runner = CliRunner()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir) -> Path:
    from tests.trainer.teacher_cache import write_teacher_cache

    root = tmp_path_factory.mktemp("readonly") / "caches" / "tiny"
    write_teacher_cache(str(root), tiny_gpt2_dir, num_sequences=24, max_length=32, top_k=8, shard_tokens=200)
    return root


def read_only_below(monkeypatch, folder: Path) -> list[str]:
    """Make every write under `folder` fail with EROFS; returns the list of refused attempts."""
    folder = os.path.realpath(folder)
    attempts = []

    def inside(path) -> bool:
        try:
            real = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return real == folder or real.startswith(folder + os.sep)

    def refuse(what, path):
        attempts.append(f"{what} {path}")
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse("open", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS and inside(path):
            refuse("os.open", path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("rename", "replace", "link", "symlink"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, *a, _real=real, _name=name, **k: refuse(_name, dst)
                            if inside(src) or inside(dst) else _real(src, dst, *a, **k))
    for name in ("unlink", "remove", "mkdir", "rmdir", "chmod", "utime", "truncate"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *a, _real=real, _name=name, **k: refuse(_name, path)
                            if inside(path) else _real(path, *a, **k))
    return attempts


def test_read_only_cache_in_process(cache, tmp_path, monkeypatch):
    attempts = read_only_below(monkeypatch, cache.parent)
    with pytest.raises(OSError, match="Read-only"):  # the patch works
        (cache / "probe").write_text("x")
    attempts.clear()
    for args in (["info", str(cache)], ["verify", str(cache)], ["ls", str(cache.parent)]):
        res = runner.invoke(kdcache_app, args)
        assert res.exit_code == 0, res.output
    res = runner.invoke(kdtrain_app, ["run", "--cache", str(cache), "--student-from-teacher", "--keep-layers", "1",
                                      "--steps", "2", "--batch-tokens", "128", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert attempts == []
    monkeypatch.undo()
    assert CacheReader(str(cache)).verify() == []


def read_only_mount_works(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    script = f"mount --bind -o ro {shlex.quote(str(folder))} {shlex.quote(str(folder))} && ! touch {shlex.quote(str(folder))}/probe"
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, check=False)
    return res.returncode == 0 and not (folder / "probe").exists()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_read_only_bind_mount(cache, tmp_path):
    if not read_only_mount_works(cache.parent):
        pytest.skip("unshare -m / mount --bind -o ro not permitted here (needs root or user namespaces)")
    folder = shlex.quote(str(cache.parent))
    commands = [command("kdcache", "verify", cache), command("kdcache", "info", cache),
                command("kdcache", "ls", cache.parent),
                command("kdtrain", "run", "--cache", cache, "--student-from-teacher", "--keep-layers", 1, "--steps", 2,
                        "--batch-tokens", 128, "--out", tmp_path / "run")]
    script = f"mount --bind -o ro {folder} {folder} && touch {folder}/probe 2>/dev/null && exit 99; " + " && ".join(
        shlex.join(c) for c in commands)
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240,
                         check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "OK: 4 shards" in res.stdout and "done: 2 steps" in res.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()
