"""SIGKILL `kdcache build` at five seeded points; every rerun resumes; the end result is byte-identical.

One cache folder, five processes killed in turn (each after a seeded number of new commit files plus
a seeded delay, so kills land while the teacher runs, while a shard is being written, and between
shards), then a sixth that finishes. Meanwhile a thread opens the cache in a loop (ReaderLoop): it is
refused as incomplete until manifest.json exists, never sees a half-written shard (every commit file
it finds describes objects that are all there), and once complete the cache verifies. The finished
cache equals, object by object, an uninterrupted build by one process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from shared.reader import CacheReader
from tests.reliability.common import REPO, ReaderLoop, committed, contents

SEED = 20261122
NUM_KILLS = 5


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigkill_at_seeded_points_resumes_to_the_clean_bytes(build_command, clean_build, tmp_path):
    num_shards = CacheReader(str(clean_build)).num_shards
    assert num_shards >= 4 * NUM_KILLS // 2, num_shards
    out = tmp_path / "killed"
    rng = random.Random(SEED)
    log = []
    with ReaderLoop(out) as readers:
        for _ in range(NUM_KILLS):
            before = committed(out)
            target = min(len(before) + rng.randint(1, 3), num_shards - 1)
            delay = rng.uniform(0.0, 0.1)
            proc = subprocess.Popen([*build_command, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 180
            while len(committed(out)) < target and proc.poll() is None:
                assert time.time() < deadline, "no progress towards the kill point"
                time.sleep(0.002)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stderr = proc.stderr.read()
            proc.stderr.close()
            assert proc.returncode == -signal.SIGKILL, stderr  # it was still running: killed, not finished
            after = committed(out)
            assert after[: len(before)] == before  # committed shards are never lost or redone
            log.append((len(before), len(after), round(delay, 3)))
            assert not (out / "manifest.json").exists()
        final = subprocess.run([*build_command, "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                               timeout=240, check=False)
        assert final.returncode == 0, final.stderr
        time.sleep(0.3)  # let the reader loop see the finished cache
    assert readers.errors == [], readers.errors[:5]
    assert readers.num_incomplete > 0 and readers.num_complete > 0, vars(readers)
    print(f"kills (committed before, after, delay s): {log}; reader rounds: {readers.num_incomplete} incomplete, "
          f"{readers.num_complete} complete")
    assert sum(after > before for before, after, _ in log) >= NUM_KILLS - 1  # the reruns made progress
    assert contents(out) == contents(clean_build)
    assert CacheReader(str(out)).verify(bookkeeping=True) == []
