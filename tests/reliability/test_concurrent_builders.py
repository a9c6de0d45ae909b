"""Two `kdcache build` processes on one folder: refused with who holds it, or cooperating on disjoint shards.

- Same command twice: the second refuses (exit 2) naming the first's host, pid and start time; the
  first finishes a cache that verifies and equals a clean build.
- `--num-workers 2 --worker 0/1` started together: each writes its own shards, whichever finishes
  last writes the manifest, and the cache equals the one-process build byte for byte.
- A lock left by a killed builder: two builders started at the same moment race for it; exactly one
  builds, the other refuses (or, arriving after the end, finds the cache already built).
Locks on a local folder are flock(2) locks, released by the kernel when a holder dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from shared.reader import CacheReader
from tests.reliability.common import REPO, committed, contents

LOCK_MESSAGE = re.compile(r"is being built by pid (\d+) on host (\S+) since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=240)
    return proc.returncode, " ".join((out + err).split())


def paused_after_first_commit(command: list, out) -> subprocess.Popen:
    """Start a builder, wait for its first commit, then pause it (SIGSTOP): it surely still holds the folder."""
    proc = start(command)
    deadline = time.time() + 180
    while not committed(out):
        assert proc.poll() is None and time.time() < deadline, "the build ended before its first commit"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    wait_until_stopped(proc.pid)
    return proc


def wait_until_stopped(pid: int) -> None:
    """kill(SIGSTOP) returns before the target stops; a thread in a system call (a write, an fsync) finishes it
    first. Wait until /proc shows every thread of pid stopped, so nothing it does lands after this returns."""
    deadline = time.time() + 30
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/stat") as f:  # OSError: it ended
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if states and all(state in "tT" for state in states):
            return
        assert time.time() < deadline, f"pid {pid} did not stop: thread states {states}"
        time.sleep(0.001)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_second_builder_refuses_naming_the_holder(build_command, clean_build, tmp_path):
    """The first builder is paused (SIGSTOP) after its first commit, so it surely still holds the folder."""
    out = tmp_path / "cache"
    first = paused_after_first_commit([*build_command, "--out", str(out)], out)
    try:
        code, text = finish(start([*build_command, "--out", str(out)]))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2, text
    held = LOCK_MESSAGE.search(text)
    assert held and (int(held[1]), held[2]) == (first.pid, socket.gethostname()), text
    assert "(worker 0 of 1)" in text and "rerun the same command to resume" in text
    code, text = finish(first)
    assert code == 0 and "built:" in text, text
    assert contents(out) == contents(clean_build)
    assert not list((out / "locks").iterdir())  # released


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_workers_cooperate_on_disjoint_shards(build_command, clean_build, tmp_path):
    out = tmp_path / "cache"
    procs = [start([*build_command, "--out", str(out), "--num-workers", 2, "--worker", w]) for w in (0, 1)]
    results = [finish(p) for p in procs]
    assert all(code == 0 for code, _ in results), results
    statuses = sorted(text.split(":")[0].rsplit(" ", 1)[-1] for _, text in results)
    assert "built" in statuses, results  # the last to finish wrote the manifest
    assert contents(out) == contents(clean_build)
    assert CacheReader(str(out)).verify(bookkeeping=True) == []


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_dead_builders_lock_is_recovered_by_exactly_one(build_command, clean_build, tmp_path):
    out = tmp_path / "cache"
    victim = start([*build_command, "--out", str(out)])
    deadline = time.time() + 180
    while not committed(out):
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    lock = out / "locks" / "worker-00000-of-00001.json"
    assert json.loads(lock.read_text())["pid"] == victim.pid  # left behind by the dead process

    racers = [start([*build_command, "--out", str(out)]) for _ in range(2)]
    results = [finish(p) for p in racers]
    builders = [text for code, text in results if code == 0 and text.startswith("built:")]
    refused = [text for code, text in results if code == 2]
    late = [text for code, text in results if code == 0 and "already built" in text]
    assert len(builders) == 1 and len(refused) + len(late) == 1, results
    for text in refused:
        held = LOCK_MESSAGE.search(text)
        assert held and int(held[1]) in {p.pid for p in racers} and int(held[1]) != victim.pid, text
    assert contents(out) == contents(clean_build)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_builder_with_another_split_refused_while_one_runs(build_command, clean_build, tmp_path):
    """The audit's case: worker 0 of 2 builds; a one-worker build of the same folder would own its shards too.

    It is refused (exit 2) naming the holder and its split, changes nothing, and once worker 0 of 2 has
    finished, the one-worker build resumes it: the cache equals a clean build.
    """
    out = tmp_path / "cache"
    first = paused_after_first_commit([*build_command, "--out", str(out), "--num-workers", 2, "--worker", 0], out)
    try:
        before = {k: v for k, v in contents(out).items() if not k.startswith("build")}
        code, text = finish(start([*build_command, "--out", str(out)]))
        after = {k: v for k, v in contents(out).items() if not k.startswith("build")}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2, text
    held = LOCK_MESSAGE.search(text)
    assert held and (int(held[1]), held[2]) == (first.pid, socket.gethostname()), text
    assert "as worker 0 of 2 (locks/worker-00000-of-00002.json); this builder is worker 0 of 1" in text, text
    assert "--num-workers 2 --worker I" in text, text
    assert after == before  # the refused builder wrote and deleted nothing
    code, text = finish(first)
    assert code == 0 and "partial" in text, text
    code, text = finish(start([*build_command, "--out", str(out)]))  # now alone: resumes with one worker
    assert code == 0 and "built:" in text, text
    assert contents(out) == contents(clean_build)
    assert CacheReader(str(out)).verify(bookkeeping=True) == []
