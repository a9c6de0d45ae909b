"""Progress when stderr is not a terminal (issue 17: `kdcache build` printed no line for 54 s of a 58 s build into a
file): plain lines with sequences, tokens, tokens/s and the time left, at most one every few seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli.progress import LineProgress, duration, teacher_progress
from tests.conftest import SHAKESPEARE

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_few_seconds_and_one_at_the_end():
    lines, clock = [], Clock()
    tick = LineProgress(lines.append, every_s=5.0, clock=clock)(total_sequences=10, total_tokens=1000)
    assert lines == ["teacher: 10 sequences, 1,000 tokens to go"]
    clock.now += 2
    tick(2, 200)  # 2 s after the start: too soon
    assert len(lines) == 1
    clock.now += 3
    tick(2, 200)  # 5 s: 400 tokens at 80 tokens/s, 600 left -> 7.5 s
    assert lines[-1] == "teacher: 4/10 sequences (40%), 400 tokens, 80 tokens/s, ETA 0:00:08"
    clock.now += 1
    tick(1, 100)  # 1 s after the last line: nothing
    assert len(lines) == 2
    clock.now += 4
    tick(3, 300)
    assert lines[-1] == "teacher: 8/10 sequences (80%), 800 tokens, 80 tokens/s, ETA 0:00:02"
    clock.now += 0.5
    tick(2, 200)  # the last sequences: always written
    assert lines[-1] == "teacher: 10/10 sequences (100%), 1,000 tokens, 95 tokens/s, done in 0:00:10"
    assert len(lines) == 4


def test_duration():
    assert duration(3725.2) == "1:02:05" and duration(0) == "0:00:00" and duration(None) == "-"


def test_a_terminal_gets_the_bar_anything_else_the_lines():
    from rich.console import Console

    class Tty:
        def __init__(self, tty: bool):
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    bar, _ = teacher_progress(Console(file=Tty(True), force_terminal=None))
    assert type(bar).__name__ == "Progress"
    lines, progress = teacher_progress(Console(file=Tty(False)))
    assert isinstance(lines, LineProgress) and lines is progress


def test_kdcache_build_into_a_file_logs_its_progress(tmp_path, tiny_gpt2_dir):
    """The real command, stderr redirected to a file: the start and end lines are there, with counts."""
    err = tmp_path / "build.log"
    with open(err, "w") as f:
        done = subprocess.run([sys.executable, "-m", "cli.kdcache", "build", "--model", str(tiny_gpt2_dir), "--dataset",
                               str(SHAKESPEARE), "--limit", "12", "--max-length", "64", "--top-k", "8", "--engine", "hf",
                               "--dtype", "float32", "--out", str(tmp_path / "cache")],
                              check=False, stdout=subprocess.PIPE, stderr=f, text=True, timeout=600,
                              env={**os.environ, "COLUMNS": "200"}, cwd=REPO)
    log = err.read_text()
    assert done.returncode == 0, log
    progress = [line for line in log.splitlines() if line.startswith("teacher: ") and " sequences" in line]
    assert progress[0] == "teacher: 12 sequences, 768 tokens to go"  # 12 windows of 64 tokens
    assert progress[-1].startswith("teacher: 12/12 sequences (100%), 768 tokens, ") and "done in" in progress[-1]
    assert "\x1b[" not in log  # no cursor movement or colour codes in a file
