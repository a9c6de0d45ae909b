"""`<out>/metrics.jsonl`: one JSON object per logged step and per evaluation (optionally TensorBoard too).

A resumed run first drops the lines of steps after its checkpoint (a run killed after its last
checkpoint logged steps it is about to redo), so the file reads as one uninterrupted run. The kept
lines are written to a temporary file renamed into place, and the file is then opened with O_NOFOLLOW:
a symbolic link named metrics.jsonl is replaced, never written through.

Knows files and numbers; nothing about models, data or losses.
"""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: str) -> list[dict]:
    """Every line of <out>/metrics.jsonl ([] when there is none)."""
    path = os.path.join(out, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line; `tensorboard=True` mirrors scalars to <out>/tensorboard."""

    def __init__(self, out: str, *, resume_step: int = 0, tensorboard: bool = False):
        path = os.path.join(out, METRICS_FILE)
        kept = [r for r in read_metrics(out) if resume_step > 0 and r.get("step", 0) <= resume_step]
        tmp = os.path.join(out, ".tmp-" + METRICS_FILE)
        if os.path.islink(tmp):
            os.unlink(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
        # kept open for the run, closed in close()
        self._file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self._tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step or None)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
