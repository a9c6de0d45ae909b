"""P5: trainer peak RSS on a 10x larger cache / on a 1x cache (target <= 1.10), and reader rows/s /
trainer rows/s (target >= 20).

Two caches of random but valid teacher rows (distinct ids, sorted log-probs, a tail, real lengths)
are written with shared.writer.CacheWriter, 1x and 10x the tokens, same K, chunking and shard size;
they are kept under $KDCACHE_HOME/bench (a rerun finds them complete by cache_key). Their header
carries the student's tokenizer fingerprint, so `kdtrain run` accepts them.

What the memory figure must be able to detect, and how the sizes are chosen
---------------------------------------------------------------------------
The claim is "the trainer streams: its memory does not grow with the cache". A trainer that loaded the
cache whole (or kept every block it read) would hold the decoded 10x cache, so the test can only see
that if the decoded 10x cache is at least comparable to the baseline RSS (torch, transformers, the
student; about 0.9 GB for `kdtrain run` with the tiny student, about 0.38 GB for the traversal child
below): then loading it whole gives a ratio of about 2 (kdtrain run) or 3 (traversal), far above 1.10.
The quick size is therefore 1x = 327,680 and 10x = 3,276,800 tokens at K = 64 (263 decoded bytes per
token: the 10x cache decodes to 862 MB and takes 416 MB on disk; the first run writes both caches
once, a few minutes, and later runs find them). `decoded_10x_over_baseline_rss` and
`decoded_10x_over_traverse_baseline_rss` are printed so a reader can check that sensitivity (each
should be near or above 1). And the reading must go through the bigger cache, not only the first
blocks of it:

- Memory, trainer: `kdtrain run` (the real CLI, `python -m cli.kdtrain run`) trains the same student for
  the same steps on each cache in a child process: everything the trainer does before and around the
  steps (opening, the index and held-out split over all rows, eval, writing the model) sees the whole
  cache; its peak RSS is the child's own VmHWM at exit (not os.wait4's ru_maxrss, which on Linux
  includes the parent's resident size: PEAK_WRAPPER). Training a whole epoch of the 10x cache
  would take hours on a 2-core CPU, so the steps are the same few on both caches.
- Memory, traversal: a second child (`--traverse`) runs the trainer's data path itself over one whole
  epoch of each cache: trainer.data.cache_index, the held-out rule, cache_source (with the trainer's
  shuffle window) and the prefetching Batcher, collating every training batch, so it reads and decodes
  10x the rows on the 10x cache (it checks it read them all). Its peak RSS on 10x / on 1x is the
  second figure; both must be <= 1.10. Its peak repeats to a few MB, so one child per cache is the
  default (--traverse-repeats).
  The runs alternate 1x, 10x; medians.
- Streaming: in this process, alternately, (a) the trainer's data path reads and collates batches of
  the 10x cache (trainer.data.cache_source + trainer.batch.collate, what the batcher's reader does; also the
  bare CacheReader.read_rows over the same chunks), and (b) the trainer's step (bench.p1_kd_overhead.make_step:
  the student forward and loss as `kdtrain run` takes them, backward, clip, AdamW) runs on batches of the same size. Rows per second of each,
  median of the per-pair ratios.

  python -m bench.p5_memory_streaming --quick   # tiny Shakespeare GPT-2 student, 328k / 3.3M tokens, K=64
  python -m bench.p5_memory_streaming           # SmolLM2-135M student, 1M / 10M tokens (a GPU box)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import alternate, bench_home, device, emit, median, model_path, paired_ratio, tiny_teacher

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Random but valid rows


def random_distinct_ids(rng: np.random.Generator, num_rows: int, vocab_size: int, top_k: int) -> np.ndarray:
    """(num_rows, top_k) ids, distinct within each row, uniformly random."""
    if top_k * top_k > vocab_size // 4:  # collisions likely: take the first K of a random order per row
        out = np.empty((num_rows, top_k), dtype=np.int64)
        for start in range(0, num_rows, 2048):
            n = min(2048, num_rows - start)
            out[start:start + n] = np.argpartition(rng.random((n, vocab_size)), top_k, axis=1)[:, :top_k]
        return out
    out = rng.integers(0, vocab_size, (num_rows, top_k))
    while True:  # redraw the rows that hold a repeated id
        srt = np.sort(out, axis=1)
        bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(1))
        if not len(bad):
            return out
        out[bad] = rng.integers(0, vocab_size, (len(bad), top_k))


def random_rows(rng: np.random.Generator, length: int, vocab_size: int, top_k: int) -> dict:
    """One sequence's cache rows: sorted top-K log-probs with a mass in [0.5, 0.99] and its tail."""
    raw = -np.cumsum(rng.exponential(0.15, (length, top_k)), axis=1)  # (T, K) decreasing
    mass = rng.uniform(0.5, 0.99, length)
    lp = raw - np.log(np.exp(raw).sum(1, keepdims=True)) + np.log(mass)[:, None]
    input_ids = rng.integers(0, vocab_size, length)
    topk_ids = random_distinct_ids(rng, length, vocab_size, top_k)
    tail = np.log1p(-mass)
    # the next token's log-prob: its own top-K entry when among the K, else below the K-th entry and the tail
    hit = topk_ids[:-1] == input_ids[1:, None]  # (T-1, K)
    outside = np.minimum(lp[:-1, -1], tail[:-1]) - 0.5
    target = np.r_[np.where(hit.any(1), (lp[:-1] * hit).sum(1), outside), np.nan]  # last row: no next token
    return {"input_ids": input_ids, "loss_mask": np.r_[np.ones(length - 1, bool), [False]], "topk_ids": topk_ids,
            "topk_logprobs": lp, "target_logprob": target, "tail_logprob": tail}


def write_random_cache(url: str, *, num_tokens: int, seq_length: int, top_k: int, vocab_size: int, vocab_sha256: str,
                       shard_tokens: int, seed: int = 0) -> str:
    """A complete cache of random rows (shared.writer.CacheWriter) at url + "-f<format version>" (a cache another
    format version wrote under url's name stays where it is); returns that url. Idempotent by cache_key."""
    from shared.format import FORMAT_VERSION
    from shared.writer import BuildHeader, CacheWriter

    url = f"{url}-f{FORMAT_VERSION}"

    num_seqs = max(2, num_tokens // seq_length)
    per_shard = max(1, shard_tokens // seq_length)
    num_shards = -(-num_seqs // per_shard)
    header = BuildHeader(
        teacher={"name": "random", "dtype": "float32", "engine": "bench-random", "engine_version": "0"},
        tokenizer={"name": "bench", "vocab_size": vocab_size, "vocab_sha256": vocab_sha256},
        dataset={"name": "random", "fingerprint": f"random-{seed}-{num_seqs}-{seq_length}", "num_sequences": num_seqs},
        settings={"mode": "score", "top_k": top_k, "max_length": seq_length, "shard_tokens": shard_tokens},
        num_shards=num_shards)
    with CacheWriter(url, header) as writer:
        if writer.complete:
            return url
        for s in writer.pending_shards():
            rng = np.random.default_rng([seed, s])
            with writer.shard(s) as buf:
                for i in range(s * per_shard, min(num_seqs, (s + 1) * per_shard)):
                    buf.add_sequence(**random_rows(rng, seq_length, vocab_size, top_k), source_index=i,
                                     text_sha256=f"{i:08x}")
        writer.finalize()
    return url


# ---------------------------------------------------------------------------------------------
# Peak RSS of `kdtrain run` in a child


# Peak RSS of a child: the child's own VmHWM, written at exit. Not os.wait4's ru_maxrss: Linux carries the
# parent's resident size into the child's maxrss across fork/vfork + exec, so a child of a 1 GB parent
# "peaks" at >= 1 GB even if it runs `pass` (measured: a 1.5 GB parent, `python -c pass` -> 1442 MB).
PEAK_WRAPPER = """\
import atexit, os, runpy, sys
def _write_peak():
    with open("/proc/self/status") as status:
        kib = next(line for line in status if line.startswith("VmHWM")).split()[1]
    with open(os.environ["KDCACHE_BENCH_PEAK_FILE"], "w") as out:
        out.write(kib)
atexit.register(_write_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def child_peak_rss(module: str, args: list[str]) -> tuple[int, str]:
    """Run `python -m module args` (cwd: the repository) to completion; (its own peak RSS in bytes, its output)."""
    with tempfile.TemporaryDirectory(prefix="p5-peak-") as tmp:
        peak_file = os.path.join(tmp, "peak")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "KDCACHE_BENCH_PEAK_FILE": peak_file}
        out = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, module, *args], cwd=REPO, env=env, check=False,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = out.stdout.decode(errors="replace")
        if out.returncode != 0 or not os.path.exists(peak_file):
            raise RuntimeError(f"python -m {module} {' '.join(args[:3])} ... failed "
                               f"({out.returncode}):\n{output[-3000:]}")
        with open(peak_file) as f:
            return int(f.read()) * 1024, output  # VmHWM is in KiB


def kdtrain_peak_rss(cache: str, student: str, steps: int, batch_tokens: int, out: str) -> int:
    """Run `python -m cli.kdtrain run` to completion; its peak RSS in bytes."""
    return child_peak_rss("cli.kdtrain", [
        "run", "--cache", cache, "--student", student, "--steps", str(steps), "--batch-tokens", str(batch_tokens),
        "--out", out, "--overwrite", "--eval-max-sequences", "8", "--log-every", "1000"])[0]


def traverse_peak_rss(cache: str, batch_tokens: int) -> tuple[int, dict]:
    """Run `--traverse` (one epoch of the trainer's data path) in a child; (its peak RSS, what it read)."""
    peak, output = child_peak_rss("bench.p5_memory_streaming", ["--traverse", cache, "--batch-tokens", str(batch_tokens)])
    return peak, json.loads(output.strip().splitlines()[-1])


def traverse_epoch(cache: str, batch_tokens: int) -> dict:
    """The trainer's data path over one whole epoch of a cache's training rows (run in a child: --traverse).

    As trainer/train.py builds it: cache_index, the held-out rule at TrainConfig's eval_fraction,
    cache_source with the trainer's shuffle window, the prefetching Batcher; every batch is collated.
    """
    from dataclasses import fields

    from shared.reader import CacheReader
    from trainer.config import TrainConfig
    from trainer.data import cache_index, cache_source, heldout_mask
    from trainer.loader import Batcher
    from trainer.run_data import SHUFFLE_WINDOW_BLOCKS

    eval_fraction = next(f.default for f in fields(TrainConfig) if f.name == "eval_fraction")
    reader = CacheReader(cache)
    index = cache_index(reader)
    held = heldout_mask(index.hashes, eval_fraction)
    source = cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=True,
                          window_blocks=SHUFFLE_WINDOW_BLOCKS)
    batcher = Batcher(source, batch_tokens=batch_tokens, seed=0)
    epoch_items = len(batcher.order(0))
    rows = batches = 0
    try:
        while True:
            batch = next(batcher)
            rows += batch.num_tokens
            batches += 1
            if batch.cursor["position"] >= epoch_items:
                break
    finally:
        batcher.close()
    expected = int(source.lengths.sum())
    if rows != expected:
        raise RuntimeError(f"the traversal read {rows} rows of the {expected} training rows of {cache}")
    return {"rows": rows, "batches": batches}


def decoded_bytes(cache: str) -> int:
    """Bytes the cache's rows take decoded (as CacheReader returns them), from one chunk's bytes per row."""
    from shared.reader import CacheReader

    reader = CacheReader(cache)
    total = sum(e.num_tokens for e in reader.shards)
    n = min(8192, reader.shards[0].num_tokens)
    arrays = reader.shard(0).read_rows(0, n, ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob",
                                              "tail_logprob"))
    return int(sum(np.asarray(a).nbytes for a in arrays.values()) / n * total)


# ---------------------------------------------------------------------------------------------
# Reader vs trainer throughput


def streaming_ratio(cache: str, student_path: str, *, batch_tokens: int, num_batches: int, repeats: int) -> dict:
    from bench.p1_kd_overhead import make_step, trainer_optimizer
    from shared.reader import CacheReader
    from trainer.batch import collate
    from trainer.data import cache_index, cache_source, epoch_order, pack_batches
    from trainer.step import setup_step
    from trainer.student import load_student

    reader = CacheReader(cache)
    index = cache_index(reader)
    source = cache_source(reader, index, list(range(len(index))), has_teacher=True, window_blocks=4)
    order = epoch_order(len(source), 0, 0, blocks=source.blocks, window_blocks=source.window_blocks)
    spans = pack_batches(source.lengths[order], batch_tokens)
    cursor = {"i": 0}

    def next_spans():
        out = []
        for _ in range(num_batches):
            out.append(spans[cursor["i"] % len(spans)])
            cursor["i"] += 1
        return out

    rows = {"data": 0, "reader": 0}

    def data_path():  # what the Batcher's thread does for num_batches batches
        for a, b in next_spans():
            batch = collate(source.read(order[a:b].tolist()), True)
            rows["data"] += batch.num_tokens

    chunk_rows = int(reader.manifest.settings.get("chunk_rows") or 8192)
    chunks = [(s, lo, min(lo + chunk_rows, e.num_tokens)) for s, e in enumerate(reader.shards)
              for lo in range(0, e.num_tokens, chunk_rows)]
    fields = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob")
    chunk_cursor = {"i": 0}

    def bare_reader():  # CacheReader alone: whole chunks, the same number of rows as one data_path call
        done = 0
        while done < num_batches * batch_tokens:
            s, lo, hi = chunks[chunk_cursor["i"] % len(chunks)]
            chunk_cursor["i"] += 1
            reader.shard(s).read_rows(lo, hi, fields)
            done += hi - lo
        rows["reader"] += done

    torch.manual_seed(0)
    student = load_student(student_path).to(device()).train()
    optimizer = trainer_optimizer(student)
    vocab = reader.manifest.vocab_size
    setup = setup_step(student, device=torch.device(device()), compile_setting="off", num_ids=vocab)
    train_batches = [collate(source.read(order[a:b].tolist()), True).to(device()) for a, b in spans[:num_batches]]
    train_rows = sum(b.num_tokens for b in train_batches)
    steps = [make_step(setup, student, optimizer, batch, "fkl", vocab) for batch in train_batches]

    def train_steps():  # the trainer's step (bench.p1_kd_overhead.make_step) on each batch
        for step in steps:
            step()

    rows["data"] = 0
    t_data, t_train = alternate(data_path, train_steps, repeats)
    data_rows_per_call = rows["data"] / (repeats + 1)
    t_reader, t_train2 = alternate(bare_reader, train_steps, repeats)
    reader_rows_per_call = rows["reader"] / (repeats + 1)
    data_rps = [data_rows_per_call / t for t in t_data]
    reader_rps = [reader_rows_per_call / t for t in t_reader]
    train_rps = [train_rows / t for t in t_train]
    train_rps2 = [train_rows / t for t in t_train2]
    return {"data_path_rows_per_s": median(data_rps), "reader_rows_per_s": median(reader_rps),
            "trainer_rows_per_s": median(train_rps + train_rps2),
            "ratio_data_path_over_trainer": paired_ratio(data_rps, train_rps),
            "ratio_reader_over_trainer": paired_ratio(reader_rps, train_rps2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="smollm2-135m", help="student model folder; 'tiny' = the tiny Shakespeare "
                                                              "GPT-2")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens of the 1x cache")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--shard-tokens", type=int, default=262_144)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="child runs per cache and kind; streaming pairs")
    ap.add_argument("--stream-batches", type=int, default=4, help="batches per streaming measurement")
    ap.add_argument("--traverse-repeats", type=int, default=1,
                    help="traversal children per cache (their peak RSS repeats to a few MB)")
    ap.add_argument("--quick", action="store_true", help="tiny student, 328k / 3.3M tokens, 128-token sequences")
    ap.add_argument("--traverse", metavar="CACHE", help=argparse.SUPPRESS)  # the child: one epoch of the data path
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.traverse:
        print(json.dumps(traverse_epoch(args.traverse, args.batch_tokens)), flush=True)
        return
    if args.quick:
        args.student, args.tokens, args.seq_length, args.shard_tokens = "tiny", 327_680, 128, 65_536
        args.steps, args.batch_tokens, args.repeats, args.stream_batches = 30, 2048, 2, 4
    from transformers import AutoConfig

    from common.tokenizers import load_tokenizer, vocab_fingerprint

    student = tiny_teacher() if args.student == "tiny" else model_path(args.student)
    tokenizer = load_tokenizer(student)
    vocab_size = AutoConfig.from_pretrained(student).vocab_size
    fingerprint = vocab_fingerprint(tokenizer)
    tag = f"{fingerprint[:8]}-v{vocab_size}-k{args.top_k}-L{args.seq_length}-s{args.shard_tokens}"
    caches = {}
    started = time.perf_counter()
    for scale in (1, args.scale):
        url = str(bench_home() / f"p5-random-{tag}-{args.tokens * scale}")
        caches[scale] = write_random_cache(url, num_tokens=args.tokens * scale, seq_length=args.seq_length,
                                           top_k=args.top_k, vocab_size=vocab_size, vocab_sha256=fingerprint,
                                           shard_tokens=args.shard_tokens)
    write_s = time.perf_counter() - started

    rss = {1: [], args.scale: []}
    traverse = {1: [], args.scale: []}
    read = {}
    with tempfile.TemporaryDirectory(prefix="p5-") as tmp:
        for r in range(args.repeats):
            for scale in (1, args.scale):
                rss[scale].append(kdtrain_peak_rss(caches[scale], student, args.steps, args.batch_tokens,
                                                   os.path.join(tmp, f"run-{scale}-{r}")))
                if r < args.traverse_repeats:
                    peak, read[scale] = traverse_peak_rss(caches[scale], args.batch_tokens)
                    traverse[scale].append(peak)
    rss_ratio = paired_ratio(rss[args.scale], rss[1])
    traverse_ratio = paired_ratio(traverse[args.scale], traverse[1])
    stream = streaming_ratio(caches[args.scale], student, batch_tokens=args.batch_tokens,
                             num_batches=args.stream_batches, repeats=max(3, args.repeats + 1))

    def cache_bytes(url):
        return sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())

    decoded_10x = decoded_bytes(caches[args.scale])
    emit({"id": "P5", "student": args.student, "top_k": args.top_k, "tokens_1x": args.tokens,
          "tokens_10x": args.tokens * args.scale, "bytes_1x": cache_bytes(caches[1]),
          "bytes_10x": cache_bytes(caches[args.scale]), "decoded_bytes_10x": decoded_10x, "write_s": write_s,
          "steps": args.steps, "batch_tokens": args.batch_tokens, "peak_rss_1x": rss[1], "peak_rss_10x": rss[args.scale],
          "ratio_rss_10x_over_1x": rss_ratio,
          "decoded_10x_over_baseline_rss": decoded_10x / median(rss[1]),
          "traverse_rows_1x": read[1]["rows"], "traverse_rows_10x": read[args.scale]["rows"],
          "traverse_peak_rss_1x": traverse[1], "traverse_peak_rss_10x": traverse[args.scale],
          "ratio_traverse_rss_10x_over_1x": traverse_ratio,
          "decoded_10x_over_traverse_baseline_rss": decoded_10x / median(traverse[1]), **stream,
          "target": "rss <= 1.10 (kdtrain run and one epoch of its data path); data path (and reader) / trainer >= 20",
          "met": bool(rss_ratio <= 1.10 and traverse_ratio <= 1.10 and stream["ratio_data_path_over_trainer"] >= 20)},
         args.json)


if __name__ == "__main__":
    main()
