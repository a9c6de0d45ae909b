"""cacher/build.py under faults: a killed process, a full disk, a crashing or NaN-emitting teacher.

Each fault must leave committed shards intact and nothing half-committed (no manifest, no commit
file of the shard that failed), and a rerun of the same build must resume to exactly the bytes of
an uninterrupted build.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cacher import engine_hf
from cacher.build import BuildConfig, build
from cli.kdcache import app
from shared.reader import CacheReader
from shared.store import Store
from tests.cacher.test_build import QUIET, read_cache, stored_objects, write_speeches

runner = CliRunner()


def committed(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob("shards/shard-*/commit.json"))


@pytest.fixture(scope="module")
def speeches(tmp_path_factory) -> Path:
    return write_speeches(tmp_path_factory.mktemp("data") / "speeches.jsonl", num_rows=60)


@pytest.fixture(scope="module")
def settings(tiny_gpt2_dir, speeches) -> dict:
    """Five shards of one to three windows of at most 32 tokens."""
    return {"model": str(tiny_gpt2_dir), "dataset": str(speeches), "max_length": 32, "top_k": 8, "limit": 12,
            "shard_tokens": 64, "reuse": False}


@pytest.fixture(scope="module")
def clean(settings, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted build, and the keys it wrote through Store.write_bytes, in order."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    keys = []
    real = Store.write_bytes

    def recording(self, key, data):
        keys.append(key)
        return real(self, key, data)

    Store.write_bytes = recording
    try:
        result = build(BuildConfig(out=str(out), **settings), **QUIET)
    finally:
        Store.write_bytes = real
    assert result.num_shards == 5
    return out, keys


def test_write_error_mid_shard_then_resume(settings, clean, tmp_path, monkeypatch):
    clean_out, keys = clean
    # the Nth write is the third object of shard 2 (shards 0 and 1 are committed by then)
    nth = [i for i, key in enumerate(keys) if key.startswith("shards/shard-00002/")][2] + 1
    out = tmp_path / "cache"
    calls = []
    real = Store.write_bytes

    def disk_full(self, key, data):
        calls.append(key)
        if len(calls) == nth:
            raise OSError("disk full")
        return real(self, key, data)

    monkeypatch.setattr(Store, "write_bytes", disk_full)
    with pytest.raises(OSError, match=r"writing shard 2 to .* failed \(disk full\); that shard is not committed.*rerun"):
        build(BuildConfig(out=str(out), **settings), **QUIET)
    assert not (out / "manifest.json").exists()
    assert committed(out) == [0, 1]

    monkeypatch.setattr(Store, "write_bytes", real)
    resumed = build(BuildConfig(out=str(out), **settings), **QUIET)
    assert (resumed.status, resumed.num_shards_written) == ("built", 3)  # shards 0 and 1 were kept
    assert stored_objects(out) == stored_objects(clean_out)


def test_write_error_through_the_cli(settings, tmp_path, monkeypatch):
    real = Store.write_bytes

    def disk_full(self, key, data):
        if key.startswith("shards/shard-00001/"):
            raise OSError(28, "No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(Store, "write_bytes", disk_full)
    out = tmp_path / "cache"
    res = runner.invoke(app, ["build", "--model", settings["model"], "--dataset", settings["dataset"], "--max-length", "32",
                              "--top-k", "8", "--limit", "4", "--shard-tokens", "64", "--out", str(out), "--no-reuse"])
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "error: [Errno 28] writing shard 1" in message and "No space left on device" in message
    assert "rerun the same command to resume" in message
    assert committed(out) == [0] and not (out / "manifest.json").exists()


def test_teacher_crash_resumes_only_missing_shards(settings, clean, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real = engine_hf.score_batches
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise engine_hf.EngineError("the teacher crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_hf, "score_batches", crashing)
    with pytest.raises(engine_hf.EngineError, match="crashed"):
        build(BuildConfig(out=str(out), **settings), **QUIET)
    assert committed(out) == [0, 1] and not (out / "manifest.json").exists()  # shard 1 was in flight: finished

    calls.clear()
    monkeypatch.setattr(engine_hf, "score_batches", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert build(BuildConfig(out=str(out), **settings), **QUIET).num_shards_written == 3
    assert len(calls) == 3  # the teacher ran on the missing shards only
    assert stored_objects(out) == stored_objects(clean[0])


def test_nan_teacher_commits_nothing_of_the_bad_shard(tiny_llama_dir, speeches, tmp_path):
    """NaN in the embedding of a token that first appears in shard 2: shards 0 and 1 commit, shard 2 never does."""
    import torch
    from safetensors.torch import load_file, save_file

    args = ["--dataset", str(speeches), "--max-length", "32", "--top-k", "8", "--limit", "12",
            "--shard-tokens", "64", "--engine", "hf", "--no-reuse"]
    good = tmp_path / "good"
    assert runner.invoke(app, ["build", "--model", str(tiny_llama_dir), *args, "--out", str(good)]).exit_code == 0
    _, sequences = read_cache(good)
    tokens_of_shard = [set(), set(), set()]
    for seq in sequences:
        if seq["shard"] < 3:
            tokens_of_shard[seq["shard"]] |= set(seq["input_ids"].tolist())
    token = min(tokens_of_shard[2] - tokens_of_shard[0] - tokens_of_shard[1])

    broken = tmp_path / "nan-llama"
    shutil.copytree(tiny_llama_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(broken / "model.safetensors")["model.embed_tokens.weight"]).any()

    out = tmp_path / "cache"
    res = runner.invoke(app, ["build", "--model", str(broken), *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "error: shard 2: the teacher produced NaN/inf log-probs" in message and "nothing of this shard is committed" in message
    assert committed(out) == [0, 1]
    assert not (out / "manifest.json").exists() and not (out / "meta" / "shard-00002.parquet").exists()


REPO = Path(__file__).resolve().parents[2]


def build_command(model: Path, data: Path) -> list[str]:
    """A `kdcache build` of 20+ small shards, as a subprocess command line."""
    return [sys.executable, "-m", "cli.kdcache", "build", "--model", str(model), "--dataset", str(data),
            "--max-length", "32", "--top-k", "8", "--limit", "60", "--shard-tokens", "64", "--no-reuse"]


def start_and_wait_for_first_commit(command: list[str], out: Path, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([*command, "--out", str(out)], cwd=REPO, **popen)
    deadline = time.time() + 120
    while not (out / "shards" / "shard-00000" / "commit.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the build ended before its first commit was seen"
        time.sleep(0.002)
    return proc


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigkill_mid_build_then_rerun_is_byte_identical(tiny_gpt2_dir, speeches, tmp_path):
    """`kdcache build` killed with SIGKILL after its first commit; the same command again finishes the cache."""
    command, repo = build_command(tiny_gpt2_dir, speeches), REPO
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([*command, "--out", str(clean)], check=True, capture_output=True, cwd=repo)
    num_shards = len(CacheReader(str(clean)).shards)
    assert num_shards >= 20

    proc = start_and_wait_for_first_commit(command, killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = committed(killed)
    assert not (killed / "manifest.json").exists() and 1 <= len(done) < num_shards, done
    assert list((killed / "locks").iterdir())  # the dead process's lock is still there

    rerun = subprocess.run([*command, "--out", str(killed)], check=False, capture_output=True, text=True, cwd=repo)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{num_shards - len(done)} of {num_shards} shards" in " ".join(rerun.stderr.split())
    assert stored_objects(killed) == stored_objects(clean)
    assert CacheReader(str(killed)).verify() == []


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_ctrl_c_mid_build_exits_130_keeps_commits_and_rerun_is_byte_identical(tiny_gpt2_dir, speeches, tmp_path):
    """Ctrl-C (SIGINT) after the first commit: exit 130 with the resume hint, no half shard, lock released."""
    command, repo = build_command(tiny_gpt2_dir, speeches), REPO
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    subprocess.run([*command, "--out", str(clean)], check=True, capture_output=True, cwd=repo)
    num_shards = len(CacheReader(str(clean)).shards)

    proc = start_and_wait_for_first_commit(command, stopped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted; committed shards are kept: rerun the same command to resume" in " ".join(stderr.split())
    done = committed(stopped)
    assert not (stopped / "manifest.json").exists() and 1 <= len(done) < num_shards, done
    assert not [p for p in (stopped / "locks").glob("*.json")], "an interrupted builder must release its lock"

    rerun = subprocess.run([*command, "--out", str(stopped)], check=False, capture_output=True, text=True, cwd=repo)
    assert rerun.returncode == 0, rerun.stderr
    assert stored_objects(stopped) == stored_objects(clean)
    assert CacheReader(str(stopped)).verify() == []
