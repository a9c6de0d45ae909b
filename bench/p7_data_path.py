"""P7: the trainer's data path, cache shards -> collated batches: tokens per CPU-second (per core) at K=64.

Target (issue 16, target 4): >= 200,000 tokens/s per core, scaling with workers.

The cache holds random but valid rows (bench.p5_memory_streaming.write_random_cache: distinct ids of a
50,257-token vocabulary, so uint16 ids as for GPT-2, sorted float16 log-probs, a tail, the target's
log-prob), K = 64, windows of --seq-length tokens, written once under $KDCACHE_HOME/bench. Random ids
compress worse than a real teacher's, so decoding is, if anything, slower than on a real cache.

For each worker count in --workers (0: the trainer's one prefetch thread; N: N worker processes), the
trainer's own data path runs as `kdtrain run` builds it (trainer.data.cache_index, the held-out rule,
cache_source with the trainer's shuffle window, trainer.loader.Batcher with its batch plan and grouping)
and hands out host batches exactly as collated (on a CUDA machine they are also pinned; this CPU has no
CUDA, so pinning is not part of the figure). After warm-up batches (worker start-up excluded), --batches
batches are timed:
- tokens per CPU-second: tokens / (CPU time of the training process, every thread, plus that of its worker
  processes read from /proc over the same interval): the per-core figure, independent of how busy the
  machine's other cores are;
- wall tokens/s, which scales with workers only as far as free cores allow (2 shared cores here).
The two halves are also timed alone in this process (CPU time): decoding whole chunks with
CacheReader.read_rows (decompression and the reader's value checks), and trainer.batch.collate of the
decoded sequences.

  python bench/p7_data_path.py --quick          # 262,144 tokens, 65,536-token batches, workers 0,1,2
  python bench/p7_data_path.py                  # 2,097,152 tokens, workers 0,1,2,4,8 (a many-core host)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import bench_home, emit, process_cpu_seconds

VOCAB_SIZE = 50_257  # GPT-2's: ids are stored as uint16


def worker_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live child processes (Linux /proc)."""
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(process_cpu_seconds(int(pid)) for pid in children)
    return total


def training_source(cache: str):
    """The training sequences of a cache as `kdtrain run` streams them (held-out rule, shuffle window)."""
    from dataclasses import fields

    from shared.reader import CacheReader
    from trainer.config import TrainConfig
    from trainer.data import cache_index, cache_source, heldout_mask
    from trainer.run_data import SHUFFLE_WINDOW_BLOCKS

    eval_fraction = next(f.default for f in fields(TrainConfig) if f.name == "eval_fraction")
    reader = CacheReader(cache)
    index = cache_index(reader)
    held = heldout_mask(index.hashes, eval_fraction)
    return reader, cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=True,
                                window_blocks=SHUFFLE_WINDOW_BLOCKS)


def measure_batcher(cache: str, *, workers: int, batch_tokens: int, batches: int, warmup: int) -> dict:
    """Steady-state tokens per CPU-second and per wall second of the trainer's Batcher with `workers`."""
    from trainer.loader import Batcher

    _, source = training_source(cache)
    batcher = Batcher(source, batch_tokens=batch_tokens, seed=0, num_workers=workers,
                      group_tokens=source.window_rows)
    try:
        for _ in range(warmup):
            next(batcher)
        cpu0, child0, wall0 = time.process_time(), worker_cpu_seconds(), time.perf_counter()
        tokens = sum(next(batcher).num_tokens for _ in range(batches))
        cpu, child, wall = time.process_time() - cpu0, worker_cpu_seconds() - child0, time.perf_counter() - wall0
    finally:
        batcher.close()
    return {"workers": workers, "tokens": tokens, "tokens_per_cpu_s": tokens / (cpu + child),
            "tokens_per_wall_s": tokens / wall, "cpu_s_main": cpu, "cpu_s_workers": child}


def measure_halves(cache: str, *, batch_tokens: int, batches: int) -> dict:
    """CPU tokens/s of decoding whole chunks (CacheReader.read_rows) and of collate alone, one thread."""
    from trainer.batch import collate
    from trainer.data import epoch_order, pack_batches

    reader, source = training_source(cache)
    fields = source.read.fields
    chunk_rows = source.window_rows // source.window_blocks
    chunks = [(s, lo, min(lo + chunk_rows, e.num_tokens)) for s, e in enumerate(reader.shards)
              for lo in range(0, e.num_tokens, chunk_rows)]
    done, t0 = 0, time.process_time()
    while done < batches * batch_tokens:
        s, lo, hi = chunks[(done // chunk_rows) % len(chunks)]
        reader.shard(s).read_rows(lo, hi, fields)
        done += hi - lo
    decode = done / (time.process_time() - t0)
    order = epoch_order(len(source), 0, 0, blocks=source.blocks, window_blocks=source.window_blocks)
    spans = pack_batches(source.lengths[order], batch_tokens)
    decoded = [source.read(order[a:b].tolist()) for a, b in spans[:batches]]
    t0 = time.process_time()
    tokens = sum(collate(seqs, True).num_tokens for seqs in decoded)
    return {"decode_tokens_per_cpu_s": decode, "collate_tokens_per_cpu_s": tokens / (time.process_time() - t0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_097_152, help="tokens of the random cache")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--shard-tokens", type=int, default=524_288)
    ap.add_argument("--batch-tokens", type=int, default=65_536)
    ap.add_argument("--batches", type=int, default=32, help="batches timed per worker count")
    ap.add_argument("--warmup", type=int, default=4, help="batches before timing (worker start-up excluded)")
    ap.add_argument("--workers", default="0,1,2,4,8", help="worker counts, comma-separated (0: one thread)")
    ap.add_argument("--quick", action="store_true", help="262,144 tokens, 16 batches, workers 0,1,2 (a 2-core CPU)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.shard_tokens, args.batches, args.workers = 262_144, 131_072, 16, "0,1,2"
    from bench.p5_memory_streaming import write_random_cache

    started = time.perf_counter()
    cache = write_random_cache(
        str(bench_home() / f"p7-random-v{VOCAB_SIZE}-k{args.top_k}-L{args.seq_length}-s{args.shard_tokens}-{args.tokens}"),
        num_tokens=args.tokens, seq_length=args.seq_length, top_k=args.top_k, vocab_size=VOCAB_SIZE,
        vocab_sha256="0" * 64, shard_tokens=args.shard_tokens)
    write_s = time.perf_counter() - started
    runs = [measure_batcher(cache, workers=int(w), batch_tokens=args.batch_tokens, batches=args.batches,
                            warmup=args.warmup) for w in args.workers.split(",")]
    halves = measure_halves(cache, batch_tokens=args.batch_tokens, batches=min(args.batches, 8))
    per_core = min(r["tokens_per_cpu_s"] for r in runs)
    emit({"id": "P7", "top_k": args.top_k, "tokens": args.tokens, "seq_length": args.seq_length,
          "batch_tokens": args.batch_tokens, "batches": args.batches, "write_s": write_s, "runs": runs, **halves,
          "tokens_per_cpu_s_worst": per_core, "cpu_count": os.cpu_count(),
          "target": ">= 200,000 tokens/s per core at K=64", "met": per_core >= 200_000}, args.json)


if __name__ == "__main__":
    main()
