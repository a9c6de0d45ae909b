"""`<out>/metrics.jsonl`: one JSON object per logged step and per evaluation (optionally TensorBoard and Weights &
Biases too).

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

from trainer.errors import TrainError

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: str) -> list[dict]:
    """Every line of <out>/metrics.jsonl ([] when there is none)."""
    path = os.path.join(out, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line; `tensorboard=True` mirrors scalars to <out>/tensorboard;
    `wandb` (wandb.init's project, name, id, config) mirrors them to a Weights & Biases run kept in <out>/wandb
    (resumed under the same id; WANDB_MODE=offline writes only there)."""

    def __init__(self, out: str, *, resume_step: int = 0, tensorboard: bool = False, wandb: dict | None = None):
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
                raise TrainError("{tensorboard} needs the tensorboard package: pip install 'kdcache[tensorboard]'") from exc
            self._tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step or None)
        self._wandb = _start_wandb(out, wandb) if wandb is not None else None

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {key: value for key, value in row.items() if key != "step" and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(out: str, settings: dict):
    """A Weights & Biases run in <out>/wandb; TrainError naming the fix when it cannot start (not logged in, ...)."""
    import wandb

    try:
        return wandb.init(dir=out, resume="allow", settings=wandb.Settings(console="off", silent=True), **settings)
    except Exception as exc:  # wandb raises its own error types (UsageError, CommError, ...)
        raise TrainError(f"{{wandb}}: Weights & Biases did not start ({type(exc).__name__}: {exc}); log in with "
                         "`wandb login`, or set WANDB_MODE=offline to keep the run in <out>/wandb for a later "
                         "`wandb sync`") from exc
