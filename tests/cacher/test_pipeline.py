"""cacher/pipeline.py: a shard streamed chunk by chunk (rows in any order, compressed in workers) holds exactly the
objects that CacheWriter.write_shard makes of the whole shard; a failed write commits nothing of its shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cacher.pipeline import EncodePool, ShardPipeline
from cacher.rows import fill_unused
from common.sequences import Sequence
from shared.store import Store
from shared.writer import CacheWriter, ShardBuffer
from tests.shared.fakes import TOP_K, VOCAB, header, random_sequence

TAIL = 2


def shard_contents(seed: int, num_shards: int, tail_samples: int) -> list[list[tuple[Sequence, int, dict]]]:
    """Per shard: (Sequence, sample index, engine rows) for sequences of 1 to 60 tokens."""
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(num_shards):
        items = []
        for i in range(int(rng.integers(1, 7))):
            seq = random_sequence(rng, int(rng.integers(1, 61)))
            seq["loss_mask"][-1] = False
            rows = {k: seq[k] for k in ("topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")}
            if tail_samples:  # the smallest ids outside the top K, drawn once each
                length = len(seq["input_ids"])
                unused = np.zeros((length, tail_samples), dtype=np.int64)
                rows["tail_ids"] = fill_unused(unused, unused, seq["topk_ids"])
                rows["tail_counts"] = np.ones((length, tail_samples), dtype=np.int64)
            q = Sequence(np.asarray(seq["input_ids"], dtype=np.int64), seq["loss_mask"], source_index=10 * s + i,
                         window_index=i, text_sha256=f"{s}-{i}")
            items.append((q, i % 2, rows))
        shards.append(items)
    return shards


def objects(root: Path) -> dict[str, bytes]:
    """Every shard object; commit files without topk_mass_sum (a float sum whose order differs, returned beside
    them) and without their seal."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_dir() or not key.startswith(("shards/", "meta/")):
            continue
        data = path.read_bytes()
        if path.name == "commit.json":
            commit = json.loads(data)
            out[key + "#mass"] = commit.pop("topk_mass_sum")
            commit.pop("commit_sha256", None)  # a seal over the whole commit, mass included
            data = json.dumps(commit).encode()
        out[key] = data
    return out


def write_whole(url: str, shards, tail_samples: int, chunk_rows: int) -> None:
    settings = {"tail_samples": tail_samples, "tail_seed": 0} if tail_samples else {}
    with CacheWriter(url, header(len(shards), **settings), chunk_rows=chunk_rows) as writer:
        for index, items in enumerate(shards):
            buffer = ShardBuffer(index)
            for q, sample, rows in items:
                buffer.add_sequence(input_ids=q.input_ids, loss_mask=q.loss_mask, **rows, **q.meta(), sample_index=sample)
            writer.write_shard(buffer)


def write_streamed(url: str, shards, tail_samples: int, chunk_rows: int, encode_workers: int, seed: int = 1) -> int:
    settings = {"tail_samples": tail_samples, "tail_seed": 0} if tail_samples else {}
    rng = np.random.default_rng(seed)
    with CacheWriter(url, header(len(shards), **settings), chunk_rows=chunk_rows) as writer, \
            EncodePool(encode_workers) as pool, \
            ShardPipeline(writer, pool, vocab_size=VOCAB, top_k=TOP_K, tail_samples=tail_samples, chunk_rows=chunk_rows,
                          max_pending=3) as pipeline:
        for index, items in enumerate(shards):
            pipeline.start_shard(index, [(q, sample) for q, sample, _ in items])
            for position in rng.permutation(len(items)):  # an engine may finish sequences in any order
                pipeline.add(int(position), items[position][2])
    return pipeline.num_committed


@pytest.mark.parametrize(("chunk_rows", "tail_samples", "encode_workers"),
                         [(7, 0, 0), (64, TAIL, 0), (8192, 0, 0), (5, TAIL, 1)],
                         ids=["small chunks, in a thread", "tail samples", "one chunk per array", "worker process"])
def test_streamed_shards_hold_the_bytes_write_shard_makes(tmp_path, chunk_rows, tail_samples, encode_workers):
    shards = shard_contents(0, 3, tail_samples)
    write_whole(str(tmp_path / "whole"), shards, tail_samples, chunk_rows)
    assert write_streamed(str(tmp_path / "streamed"), shards, tail_samples, chunk_rows, encode_workers) == 3
    whole, streamed = objects(tmp_path / "whole"), objects(tmp_path / "streamed")
    masses = [k for k in whole if k.endswith("#mass")]
    assert len(masses) == 3
    for key in masses:
        assert streamed.pop(key) == pytest.approx(whole.pop(key), rel=1e-12)
    assert streamed == whole


def test_a_failed_write_commits_nothing_of_its_shard(tmp_path, monkeypatch):
    """The store fails on an object of shard 1: shard 0 stays committed, shard 1 gets no commit file, the error says
    which shard and how to resume; the writes queued after the failure do not run."""
    shards = shard_contents(1, 3, 0)
    real, calls = Store.write_bytes, []

    def fails_in_shard_1(store, key, data):
        calls.append(key)
        if key.startswith("shards/shard-00001/topk_id_codes/"):
            raise OSError(28, "No space left on device")
        return real(store, key, data)

    monkeypatch.setattr(Store, "write_bytes", fails_in_shard_1)
    with pytest.raises(OSError, match=r"writing shard 1 to .* failed \(No space left on device\).* rerun the same "
                                      r"command"):
        write_streamed(str(tmp_path / "c"), shards, 0, 16, encode_workers=0)
    committed = sorted(p.parent.name for p in (tmp_path / "c").glob("shards/*/commit.json"))
    assert committed == ["shard-00000"]
    failed_at = next(i for i, key in enumerate(calls) if key.startswith("shards/shard-00001/topk_id_codes/"))
    assert not [key for key in calls[failed_at + 1:] if key.startswith("shards/shard-00002")]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_compressing_processes_end_with_a_killed_builder(tmp_path):
    """SIGKILL of the builder: its pool cannot stop the workers (each holds both ends of its task pipe), so each
    watches the builder and ends within a second or two; the fork server then ends too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import os, sys, time\n"
              "from cacher.pipeline import EncodePool\n"
              "pool = EncodePool(2)\n"
              "pids = {pool.submit(os.getpid).result() for _ in range(20)}\n"
              "print(' '.join(map(str, pids)), flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers and proc.pid not in workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid)]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((line for line in f if line.startswith("State:")), "").lower()
    except OSError:
        return "zombie"


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_a_script_without_a_main_guard_can_build(tiny_gpt2_dir, tmp_path):
    """The compressing processes import only the pipeline: a script that calls build() at its top level (no
    `if __name__ == "__main__"`) runs once, not once more per process."""
    import subprocess
    import sys

    from tests.conftest import SHAKESPEARE

    script = tmp_path / "unguarded.py"
    script.write_text(
        "print('top level ran', flush=True)\n"
        "from cacher.build import BuildConfig, build\n"
        f"r = build(BuildConfig(model={str(tiny_gpt2_dir)!r}, dataset={str(SHAKESPEARE)!r}, top_k=4, max_length=32,\n"
        f"                      limit=12, shard_tokens=128, out={str(tmp_path / 'c')!r}, reuse=False), log=print)\n"
        "print('status', r.status, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "KDCACHE_HOME": str(tmp_path / "h")}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=280, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("top level ran") == 1 and "status built" in run.stdout
