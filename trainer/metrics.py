"""`<out>/metrics.jsonl`: one JSON object per logged step and per evaluation (optionally TensorBoard too).

A resumed run first drops the lines of steps after its checkpoint (a run killed after its last
checkpoint logged steps it is about to redo), so the file reads as one uninterrupted run.

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
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
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
