"""SIGKILL `kdtrain run`, twice, at seeded points; `--resume` ends with the weights of an uninterrupted run.

The uninterrupted run and the run to be killed start together. The latter is killed a seeded
moment after a seeded checkpoint appears (mid-step, mid-checkpoint or mid-log), resumed with
`--resume`, killed again, and resumed to the end. Its final model.safetensors equals the
uninterrupted run's tensor for tensor, and metrics.jsonl reads as one run (every step once, the
same losses). Bit-exact resume itself (RNG, optimizer, data cursor) is tested in-process in
tests/trainer/test_train.py::test_resume_is_bit_exact; this test adds real processes and SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability.common import REPO, command

SEED = 7


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir) -> str:
    from tests.trainer.teacher_cache import write_teacher_cache

    return write_teacher_cache(str(tmp_path_factory.mktemp("kill-train") / "cache"), tiny_gpt2_dir, num_sequences=120)


def checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


@pytest.mark.multiproc
@pytest.mark.timeout(600)  # generous: on a shared 2-core machine a step can take 2 s
def test_sigkill_then_resume_gives_the_uninterrupted_weights(cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer.metrics import read_metrics

    steps, save_every = 32, 4
    train = command("kdtrain", "run", "--cache", cache, "--student-from-teacher", "--keep-layers", 1, "--steps", steps,
                    "--batch-tokens", 384, "--seed", 3, "--lr", 2e-3, "--warmup-steps", 3, "--grad-accum", 2,
                    "--save-every", save_every)
    full, part = tmp_path / "full", tmp_path / "part"
    uninterrupted = subprocess.Popen([*train, "--out", str(full)], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    rng = random.Random(SEED)
    kills = []
    for attempt in range(2):
        wanted = f"step-{(attempt * 3 + rng.randint(1, 2)) * save_every:06d}"
        delay = rng.uniform(0.0, 0.2)
        proc = subprocess.Popen([*train, "--out", str(part), *(["--resume"] if attempt else [])], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 360
        while wanted not in checkpoints(part) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err  # still training when killed
        kills.append((wanted, round(delay, 3), checkpoints(part)))
    resumed = subprocess.run([*train, "--out", str(part), "--resume"], cwd=REPO, capture_output=True, text=True,
                             timeout=360, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    _, err = uninterrupted.communicate(timeout=360)
    assert uninterrupted.returncode == 0, err
    print(f"killed after (checkpoint, delay s, checkpoints on disk): {kills}")

    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_full = [r for r in read_metrics(str(full)) if "loss" in r]
    rows_part = [r for r in read_metrics(str(part)) if "loss" in r]
    assert [r["step"] for r in rows_part] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows_part] == [r["loss"] for r in rows_full]


def lock_body(out: Path) -> dict:
    try:
        return json.loads((out / "run.lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


@pytest.mark.multiproc
@pytest.mark.timeout(600)  # generous: on a shared 2-core machine a step can take 2 s
def test_a_second_run_into_a_held_out_is_refused_and_a_dead_holders_lock_is_recovered(cache, tmp_path):
    """Two `kdtrain run` into one --out at once both exited 0 and left a mix of the two runs. Now the second is
    refused before it touches anything, naming the first's host, pid and start time; the first ends as if alone.
    A holder killed with SIGKILL leaves its lock file, but not its flock: `--resume` takes the folder over.
    The first run is stopped (SIGSTOP) while the others try, so that it still holds the folder however slowly
    they start."""
    out = tmp_path / "run"
    train = command("kdtrain", "run", "--cache", cache, "--student-from-teacher", "--keep-layers", 1, "--batch-tokens",
                    384, "--seed", 3, "--save-every", 4, "--out", out)
    first = subprocess.Popen([*train, "--steps", "12"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while not (lock_body(out).get("pid") == first.pid and (out / "run.json").exists()):
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.01)
    since = lock_body(out)["since"]
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock however long the others take to start
    for flag in ([], ["--overwrite"], ["--resume"]):
        second = subprocess.run([*train, "--steps", "6", *flag], cwd=REPO, capture_output=True, text=True, timeout=240,
                                check=False)
        assert second.returncode == 2, second.stderr
        message = " ".join(second.stderr.split())
        assert (f"--out {out} is in use by another kdtrain run: pid {first.pid} on host {socket.gethostname()} "
                f"since {since}") in message, message
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=360)
    assert first.returncode == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["steps"] == 12  # the first run's, whole
    from trainer.metrics import read_metrics

    assert [r["step"] for r in read_metrics(str(out)) if "loss" in r] == list(range(1, 13))
    assert not (out / "run.lock").exists()

    killed = subprocess.Popen([*train, "--steps", "12", "--overwrite"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while "step-000004" not in checkpoints(out):
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert lock_body(out).get("pid") == killed.pid  # its lock file is left behind; the kernel dropped its flock
    resumed = subprocess.run([*train, "--steps", "12", "--resume"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and not (out / "run.lock").exists()
