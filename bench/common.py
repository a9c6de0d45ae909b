"""Shared helpers of the benchmarks: teacher rows from real text, timing by alternation, result lines.

Benchmarks report ratios of two things measured in the same process, alternately, as the median of
repeats; never a single absolute time.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import numpy as np


def real_sequences(tokenizer, num_tokens: int, max_length: int, dataset: str = "builtin:pydoc-topics") -> list[np.ndarray]:
    from shared.data import load_sequences

    seqs, _ = load_sequences(dataset, tokenizer, max_length=max_length, limit=max(1, num_tokens // max_length + 1))
    return [s.input_ids for s in seqs]


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Run a() and b() alternately `repeats` times (after one warm-up each); their times in seconds."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return ta, tb


def median(xs):
    return statistics.median(xs)


def machine() -> str:
    import os

    import torch

    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def emit(result: dict, json_path: str | None) -> None:
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    print(json.dumps(result, indent=1))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(result) + "\n")
