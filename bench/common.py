"""Shared helpers of the benchmarks: models, teacher rows from real text, timing by alternation, results.

Benchmarks report ratios of two things measured in the same process, alternately, as the median of
repeats; never a single absolute time. Every helper calls kdcache's own components (cacher.engine_hf,
shared.writer, trainer.losses, trainer.data) so that a figure measures what the tools run.

Knows everything (it is a benchmark); the packages it measures know nothing of it.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Timing and results


def alternate(a, b, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Run a() and b() alternately `repeats` times (after `warmup` of each); their times in seconds."""
    for _ in range(warmup):
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc); 0.0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def median(xs):
    return statistics.median(xs)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repeat ratios (each pair ran back to back, so load drifts cancel)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load1 {load:.2f} when reported")


def emit(result: dict, json_path: str | None) -> dict:
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    print(json.dumps(result, indent=1, default=float))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(result, default=float) + "\n")
    return result


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Models and text


def model_path(name_or_path: str) -> str:
    """The folder a model name resolves to (common.models' rule; smollm2-135m: $KDCACHE_HOME/models)."""
    from common.models import model_folder

    return str(model_folder(name_or_path))


def bench_home() -> Path:
    """Where benchmarks keep what they build once (the tiny teacher): $KDCACHE_HOME/bench."""
    from common.models import kdcache_home

    return kdcache_home() / "bench"


def tiny_teacher(steps: int = 150, text: str | None = None) -> str:
    """examples/make_tiny_teacher.py's 4-layer GPT-2 trained on `text` (default: the repository's
    data/shakespeare.txt), built once and kept under a name that holds the steps and the text's sha256."""
    import hashlib
    import sys

    repo = Path(__file__).resolve().parents[1]
    text = Path(text) if text else repo / "data" / "shakespeare.txt"
    digest = hashlib.sha256(text.read_bytes()).hexdigest()[:12]
    out = bench_home() / f"tiny-teacher-{steps}-{digest}"
    if not (out / "model.safetensors").exists():
        sys.path.insert(0, str(repo / "examples"))
        from make_tiny_teacher import make_tiny_teacher

        out.parent.mkdir(parents=True, exist_ok=True)
        make_tiny_teacher(str(out), steps=steps, text=text, log=lambda m: None)
    return str(out)


def real_sequences(tokenizer, num_tokens: int, max_length: int, dataset: str = "builtin:pydoc-topics") -> list[np.ndarray]:
    """About num_tokens tokens of real text as windows of max_length (common.sequences, as the cacher reads it)."""
    from common.sequences import load_sequences

    seqs, _ = load_sequences(dataset, tokenizer, max_length=max_length, limit=max(1, num_tokens // max_length + 1))
    return [s.input_ids for s in seqs]


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def keep_layers_for_ratio(teacher, param_ratio: float) -> int:
    """The most layers a layer-dropped student may keep so that teacher params / student params >= param_ratio."""
    from trainer.student import LAYER_LISTS

    layers = teacher.get_submodule(LAYER_LISTS[teacher.config.model_type])
    total = num_parameters(teacher)
    per_layer = [num_parameters(layer) for layer in layers]
    for keep in range(len(layers), 0, -1):
        if total / (total - sum(per_layer[keep:])) >= param_ratio:
            return keep
    return 1


# ---------------------------------------------------------------------------------------------
# Teacher rows and stored (cache) rows


def stored_rows(seqs: list[np.ndarray], results: list[dict], vocab_size: int, top_k: int) -> dict[str, np.ndarray]:
    """What a cache holds for these sequences: score_hf results through shared.writer's validation.

    The first top_k columns of each result are kept; the tail is recomputed for that K in float64 from
    the float32 log-probs, as the engine does. Returns the stored dtypes (float16 log-probs, ids of the
    format's ID type, ranks > 16 rounded), exactly what CacheReader would return (Zarr is lossless).
    """
    from shared.writer import validate_shard_arrays

    arrays = raw_rows(seqs, results, top_k)
    return validate_shard_arrays(arrays, vocab_size=vocab_size, top_k=top_k, where="bench")


def raw_rows(seqs: list[np.ndarray], results: list[dict], top_k: int) -> dict[str, np.ndarray]:
    """The engine's float32 rows for the first top_k columns, concatenated over sequences."""
    lp = np.concatenate([r["topk_logprobs"][:, :top_k] for r in results])
    tail = np.log1p(-np.minimum(np.exp(lp.astype(np.float64)).sum(1), 1.0))
    return {
        "input_ids": np.concatenate(seqs).astype(np.int64),
        "offsets": np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
        "loss_mask": np.concatenate([np.r_[np.ones(len(s) - 1, bool), [False]] for s in seqs]),
        "topk_ids": np.concatenate([r["topk_ids"][:, :top_k] for r in results]),
        "topk_logprobs": lp,
        "target_logprob": np.concatenate([r["target_logprob"] for r in results]),
        "tail_logprob": tail,
    }


def split_rows(stored: dict[str, np.ndarray]) -> list[dict]:
    """Per-sequence dicts (the shape trainer.batch.collate takes) from concatenated stored rows."""
    offsets = stored["offsets"]
    out = []
    for a, b in itertools.pairwise(offsets):
        out.append({k: v[a:b] for k, v in stored.items() if k != "offsets"})
    return out


def set_threads() -> None:
    """Use every core for torch (the default on Linux; explicit so child processes agree)."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
