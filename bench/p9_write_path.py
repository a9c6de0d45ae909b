"""P9: the cache writer's path alone, rows -> validated, encoded, compressed, committed shards, at K=64.

Target (issue 16, target 4): encode + validate + commit >= 40,000 tokens per CPU-second (per core) at K=64,
scaling with processes.

What `kdcache build` does with the teacher's rows, without a teacher: cacher.pipeline.ShardPipeline over a
shared.writer.CacheWriter on the local disk, fed sequence by sequence as the hf engine feeds it (validation and
casts in the calling thread, each full chunk encoded and compressed by an EncodePool, one I/O thread writing the
objects and committing each shard, the manifest last). The rows are random but valid (bench.p5_memory_streaming's
random_rows: distinct ids of GPT-2's 50,257-token vocabulary, sorted log-probs, a tail, the target's log-prob),
made before the clock starts. Random ids compress worse than a real teacher's, so this is, if anything, slower
than a real build's writing (bench P4 measures the encoding on SmolLM2's real rows).

For each --workers count (0: one encoding thread in this process; N: N compressing processes) one whole cache is
written, --repeats times, alternating the counts:
- tokens per CPU-second: tokens / (CPU seconds of this process, every thread, plus those of the compressing
  processes, read from /proc over the same interval): the per-core figure, whatever else the machine runs;
- wall tokens/s, which grows with processes only as far as free cores allow (2 shared cores here; the calling
  thread's validation and the I/O thread need some of them too).

  python bench/p9_write_path.py                 # 262,144 tokens, windows of 1,024, workers 0,1,2, 3 repeats
  python bench/p9_write_path.py --tokens 65536 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import emit, median, process_cpu_seconds

VOCAB_SIZE = 50_257  # GPT-2's: ids stored as uint16
TARGET = 40_000  # tokens per CPU-second at K = 64


def make_rows(num_tokens: int, seq_length: int, top_k: int, seed: int = 0) -> list:
    """[(common.sequences.Sequence, engine rows)] of random valid rows, num_tokens in windows of seq_length."""
    from bench.p5_memory_streaming import random_rows
    from common.sequences import Sequence

    rng = np.random.default_rng(seed)
    out = []
    for i in range(max(1, num_tokens // seq_length)):
        rows = random_rows(rng, seq_length, VOCAB_SIZE, top_k)
        q = Sequence(rows.pop("input_ids"), rows.pop("loss_mask"), source_index=i, text_sha256=f"{i:08x}")
        out.append((q, rows))
    return out


def write_cache(out: str, items: list, *, workers: int, top_k: int, shard_tokens: int) -> dict:
    """One whole cache of `items` through ShardPipeline; wall and CPU seconds of the writing alone."""
    from cacher.pipeline import EncodePool, ShardPipeline
    from shared.writer import DEFAULT_CHUNK_ROWS, BuildHeader, CacheWriter

    seq_length = len(items[0][0].input_ids)
    per_shard = max(1, shard_tokens // seq_length)
    shards = [items[i:i + per_shard] for i in range(0, len(items), per_shard)]
    header = BuildHeader(
        teacher={"name": "random", "dtype": "float32", "engine": "bench-random", "engine_version": "0"},
        tokenizer={"name": "bench", "vocab_size": VOCAB_SIZE, "vocab_sha256": "ab" * 32},
        dataset={"name": "random", "fingerprint": f"p9-{len(items)}-{seq_length}", "num_sequences": len(items)},
        settings={"mode": "score", "top_k": top_k, "max_length": seq_length, "shard_tokens": shard_tokens},
        num_shards=len(shards))
    with EncodePool(workers) as pool:
        pool.submit(int).result()  # the processes are up: their start is not part of the figure
        pids = list(getattr(pool.executor, "_processes", {}) or {})
        cpu0, workers0, wall0 = time.process_time(), sum(map(process_cpu_seconds, pids)), time.perf_counter()
        with CacheWriter(out, header) as writer:
            with ShardPipeline(writer, pool, vocab_size=VOCAB_SIZE, top_k=top_k, tail_samples=0,
                               chunk_rows=DEFAULT_CHUNK_ROWS) as pipeline:
                for index, shard in enumerate(shards):
                    pipeline.start_shard(index, [(q, 0) for q, _ in shard])
                    for position, (_, rows) in enumerate(shard):
                        pipeline.add(position, rows)
            writer.finalize()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0 + sum(map(process_cpu_seconds, pids)) - workers0
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"wall_s": wall, "cpu_s": cpu, "bytes": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--shard-tokens", type=int, default=131_072)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated compressing-process counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not counts or min(counts) < 0:
        raise SystemExit(f"--workers must list counts >= 0, got {args.workers!r}")
    if args.tokens < args.seq_length or args.seq_length < 2:
        raise SystemExit(f"--tokens ({args.tokens}) must hold one window of --seq-length ({args.seq_length}, >= 2)")
    items = make_rows(args.tokens, args.seq_length, args.top_k)
    tokens = sum(len(q.input_ids) for q, _ in items)
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="p9-") as work:
        write_cache(os.path.join(work, "warm-up"), items[:2], workers=0, top_k=args.top_k,
                    shard_tokens=args.shard_tokens)  # imports and first-call costs out of the figures
        for r in range(args.repeats):
            for w in counts:
                out = os.path.join(work, f"w{w}-r{r}")
                runs[w].append(write_cache(out, items, workers=w, top_k=args.top_k, shard_tokens=args.shard_tokens))
                shutil.rmtree(out)
    result = {"id": "P9", "tokens": tokens, "top_k": args.top_k, "seq_length": args.seq_length,
              "shard_tokens": args.shard_tokens, "repeats": args.repeats, "runs": {str(w): v for w, v in runs.items()}}
    for w in counts:
        result[f"workers{w}_tokens_per_cpu_s"] = median([tokens / run["cpu_s"] for run in runs[w]])
        result[f"workers{w}_tokens_per_s"] = median([tokens / run["wall_s"] for run in runs[w]])
        result[f"workers{w}_bytes_per_token_k"] = runs[w][0]["bytes"] / (tokens * args.top_k)
    per_cpu = min(result[f"workers{w}_tokens_per_cpu_s"] for w in counts)
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        result["wall_speedup_most_over_fewest_processes"] = (result[f"workers{high}_tokens_per_s"]
                                                            / result[f"workers{low}_tokens_per_s"])
    emit({**result, "target": f">= {TARGET:,} tokens per CPU-second at K=64, scaling with processes",
          "met": bool(per_cpu >= TARGET)}, args.json)


if __name__ == "__main__":
    main()
