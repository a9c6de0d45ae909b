"""Shards written while the teacher runs: rows in, Zarr chunks compressed in worker processes, shards committed.

For each shard (ShardPipeline.start_shard), rows arrive sequence by sequence, in any order. As soon as
the sequences in front are complete they are validated and cast to the stored dtypes
(shared.writer.validate_shard_arrays, sequence-local), and every full chunk of rows is handed to a pool
of worker processes that encodes its ids as codes and tables and compresses it (shared.writer.stored_rows
and encode_zarr_rows: byte for byte the chunks of encode_zarr_group, whatever --shard-tokens is). One I/O
thread writes the compressed objects in order and, after a shard's last chunk, its Zarr metadata, offsets,
meta Parquet file and commit file (CacheWriter's begin_shard / commit_shard), so a shard is committed
moments after its last row is scored. At most `max_pending` chunks are in flight: when the writers fall
behind, the teacher waits, and memory stays
bounded by a few chunks whatever the shard size.

Knows the cache writer's streaming API and numpy; nothing about models or engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shared.format import MAX_SHARD_SEQUENCES, CacheError, meta_path, shard_name, shard_path
from shared.manifest import ObjectInfo, ShardEntry
from shared.writer import (
    CacheWriter,
    encode_meta,
    encode_zarr_layout,
    encode_zarr_rows,
    stored_rows,
    validate_shard_arrays,
)

ROW_ARRAYS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")


def default_encode_workers() -> int:
    """Compressing processes: every core but one (the teacher's and the writer's), at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class EncodePool:
    """The processes that compress chunks (encode_chunk), started when made so that they are ready by the first chunk.

    They fork from a server process that has imported only this module, numpy and zarr (never torch, never the
    builder's threads), so each starts in milliseconds once the server is up. workers=0: one thread instead.
    """

    def __init__(self, workers: int | None = None):
        self.workers = default_encode_workers() if workers is None else workers
        if self.workers == 0:
            self.executor: Executor = ThreadPoolExecutor(1, thread_name_prefix="kdcache-encode")
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cacher.pipeline", "zarr", "zarr.codecs", "zarr.storage"])
        self.executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                            initargs=(os.getpid(),))
        for _ in range(self.workers):
            self.submit(int)  # starts the processes now, in the background

    def submit(self, fn, *args) -> Future:
        with _main_module_hidden():  # a submit may start a process
            return self.executor.submit(fn, *args)

    def close(self, interrupted: bool = False) -> None:
        """Wait for the chunks in hand (none are left after a finished build); on Ctrl-C drop them."""
        self.executor.shutdown(wait=not interrupted, cancel_futures=True)

    def __enter__(self) -> EncodePool:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
        return False


@contextlib.contextmanager
def _main_module_hidden():
    """While processes start: multiprocessing would import the builder's __main__ in each compressing process (they
    need only this module), which reruns a script that calls build() without an `if __name__ == "__main__"` guard.
    """
    main = sys.modules.get("__main__")
    names = ("__spec__", "__file__")
    saved = {name: main.__dict__[name] for name in names if name in main.__dict__} if main is not None else {}
    if main is not None:
        main.__dict__.update(__spec__=None)
        main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if main is not None:
            for name in names:
                main.__dict__.pop(name, None)
            main.__dict__.update(saved)


def _start_worker(builder: int) -> None:
    """A compressing process: Ctrl-C is the builder's to handle (it stops the pool); one Blosc thread, since the
    pool already has a process per core; it ends when the builder process does, even killed (whose pool cannot say
    so: a worker holds both ends of its task pipe)."""
    import numcodecs

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    numcodecs.blosc.set_nthreads(1)
    threading.Thread(target=_exit_with, args=(builder,), daemon=True, name="kdcache-exit-with-builder").start()


def _exit_with(pid: int, poll_seconds: float = 0.5) -> None:
    started = _start_time(pid)
    while True:
        time.sleep(poll_seconds)
        if not _alive(pid, started):
            os._exit(0)


def _start_time(pid: int) -> str | None:
    """The process's start time from /proc (so a reused pid is not taken for it); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether the builder still runs. A killed builder whose parent has not yet reaped it is a zombie that kill(0)
    still finds: its parent may be waiting for the builder's output pipes to close, which this worker holds open, so
    a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X") and (started is None or fields[19] == started)
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (cannot happen for our own builder, but do not exit)
        pass
    return True


def encode_chunk(rows: dict[str, np.ndarray], first_row: int, shapes: dict, chunk_rows: int, vocab_size: int):
    """({key in the shard group: (bytes, sha256 hex)}, sum of the chunk's top-K probabilities as a reader decodes
    them). rows: validated rows, whole chunks from first_row. Runs in a worker."""
    objects = encode_zarr_rows(stored_rows(rows, shapes, chunk_rows, vocab_size), first_row, shapes, chunk_rows)
    mass = float(np.exp(rows["topk_logprobs"].astype(np.float64)).sum()) if "topk_logprobs" in rows else 0.0
    return {key: (data, hashlib.sha256(data).hexdigest()) for key, data in objects.items()}, mass


@dataclass
class _Shard:
    """One shard on its way: its sequences, what has arrived, what is validated but not yet cut into chunks."""

    index: int
    sequences: list  # [(common.sequences.Sequence, sample index)] in shard order
    shapes: dict
    per_chunk: int
    arrived: dict = field(default_factory=dict)  # position -> rows dict
    next_position: int = 0  # sequences before it are complete (in `ready` or validated)
    ready: list = field(default_factory=list)  # complete sequences not yet validated: [(position, rows)]
    ready_rows: int = 0
    next_row: int = 0  # rows before it are submitted for encoding
    staged: list = field(default_factory=list)  # validated row dicts not yet in a chunk
    staged_rows: int = 0
    lengths: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    num_loss_tokens: int = 0
    objects: dict = field(default_factory=dict)  # key -> ObjectInfo, filled by the I/O thread
    masses: list = field(default_factory=list)


class ShardPipeline:
    """with ShardPipeline(writer, pool, ...) as p: p.start_shard(i, seqs); p.add(position, rows) ...; p.num_committed.

    max_pending: chunks in flight before the teacher waits (default: two per compressing process, and two).
    """

    def __init__(self, writer: CacheWriter, pool: EncodePool, *, vocab_size: int, top_k: int, tail_samples: int,
                 chunk_rows: int, max_pending: int | None = None):
        self.writer, self.vocab_size, self.top_k, self.tail_samples = writer, vocab_size, top_k, tail_samples
        self.chunk_rows = chunk_rows
        self.max_pending = max_pending or 2 * max(1, pool.workers) + 2
        self._pool = pool
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kdcache-writer")
        self._io.submit(_import_encoders)  # while the teacher runs, not after its last row
        self._pending: deque[tuple[Future, int]] = deque()  # I/O tasks in order, with the shard they belong to
        self._shard: _Shard | None = None
        self._failed = False
        self.num_committed = 0

    def __enter__(self) -> ShardPipeline:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb):
        """On success everything is committed; on an error, what was submitted is finished (shards whose rows were
        all in get committed) before the error goes on; on Ctrl-C nothing more is waited for."""
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        try:
            if not interrupted:
                self._drain(0, raise_errors=exc_type is None)
        finally:
            self._io.shutdown(wait=not interrupted, cancel_futures=interrupted)
        return False

    # -- rows in -----------------------------------------------------------------------------
    def start_shard(self, index: int, sequences: list) -> None:
        """Rows of shard `index` come next: `sequences` are its (Sequence, sample index) pairs, in shard order."""
        if self._shard is not None:
            raise RuntimeError(f"shard {self._shard.index} is not finished")
        if not sequences:
            raise CacheError(f"shard {index} has no sequences; a shard holds at least one")
        if len(sequences) > MAX_SHARD_SEQUENCES:
            raise CacheError(f"shard {shard_name(index)} holds {len(sequences):,} sequences; a shard holds at most "
                             f"{MAX_SHARD_SEQUENCES:,} (storage_layout.md 6.3): use a smaller {{shard_tokens}}")
        num_rows = sum(len(q.input_ids) for q, _ in sequences)
        shapes = self.writer.shard_shapes(num_rows, len(sequences))
        self._shard = _Shard(index, sequences, shapes, max(1, min(self.chunk_rows, num_rows)))
        self._submit_io(self.writer.begin_shard, index)

    def add(self, position: int, rows: dict[str, np.ndarray]) -> None:
        """The engine's rows for sequence `position` of the current shard."""
        shard = self._shard
        shard.arrived[position] = rows
        while shard.next_position in shard.arrived:  # validated a chunk's worth at a time: few numpy calls per row
            shard.ready.append((shard.next_position, shard.arrived.pop(shard.next_position)))
            shard.ready_rows += len(shard.ready[-1][1]["tail_logprob"])
            shard.next_position += 1
        done = shard.next_position == len(shard.sequences)
        if shard.ready and (done or shard.ready_rows >= shard.per_chunk):
            self._stage(shard, shard.ready)
            shard.ready, shard.ready_rows = [], 0
        if done:
            self._finish(shard)

    def _stage(self, shard: _Shard, ready: list) -> None:
        """Validate complete sequences (sequence-local checks and casts) and cut every full chunk."""
        seqs = [shard.sequences[p] for p, _ in ready]
        lengths = [len(q.input_ids) for q, _ in seqs]
        arrays = {"input_ids": np.concatenate([q.input_ids for q, _ in seqs]),
                  "loss_mask": np.concatenate([np.asarray(q.loss_mask, dtype=bool) for q, _ in seqs]),
                  "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
        names = ROW_ARRAYS + (("tail_ids", "tail_counts") if self.tail_samples else ())
        for name in names:
            arrays[name] = np.concatenate([rows[name] for _, rows in ready])
        stored = validate_shard_arrays(arrays, vocab_size=self.vocab_size, top_k=self.top_k, tail_samples=self.tail_samples,
                                       where=f"shard {shard_name(shard.index)} (sequences from {ready[0][0]})")
        del stored["offsets"]
        shard.staged.append(stored)
        shard.staged_rows += len(stored["input_ids"])
        for (q, sample), n in zip(seqs, lengths):
            mask = np.asarray(q.loss_mask, dtype=bool)
            shard.meta.append({**q.meta(), "sample_index": sample, "num_tokens": n, "num_loss_tokens": int(mask.sum())})
            shard.lengths.append(n)
            shard.num_loss_tokens += int(mask.sum())
        if shard.staged_rows >= shard.per_chunk:
            self._submit_chunks(shard, shard.staged_rows // shard.per_chunk * shard.per_chunk)

    def _submit_chunks(self, shard: _Shard, num_rows: int) -> None:
        """Hand the first num_rows staged rows (whole chunks, or the shard's last rows) to the encoding pool."""
        joined = {name: np.concatenate([s[name] for s in shard.staged]) for name in shard.staged[0]}
        rest = {name: a[num_rows:] for name, a in joined.items()}
        shard.staged, shard.staged_rows = ([rest], shard.staged_rows - num_rows) if len(rest["input_ids"]) else ([], 0)
        for start in range(0, num_rows, shard.per_chunk):
            chunk = {name: a[start:min(start + shard.per_chunk, num_rows)] for name, a in joined.items()}
            encoded = self._pool.submit(encode_chunk, chunk, shard.next_row, shard.shapes, self.chunk_rows,
                                        self.vocab_size)
            shard.next_row += len(chunk["input_ids"])
            self._submit_io(self._write_encoded, shard, encoded)

    def _finish(self, shard: _Shard) -> None:
        """The last rows, then the shard's metadata objects and its commit, after its chunks."""
        if shard.staged_rows:
            self._submit_chunks(shard, shard.staged_rows)
        offsets = np.concatenate([[0], np.cumsum(shard.lengths)]).astype(np.int64)
        encoded = self._pool.submit(encode_chunk, {"offsets": offsets}, 0, shard.shapes, self.chunk_rows, self.vocab_size)
        self._submit_io(self._write_encoded, shard, encoded)
        self._submit_io(self._commit, shard, offsets)
        self._shard = None

    # -- the I/O thread ----------------------------------------------------------------------
    def _submit_io(self, fn, *args) -> None:
        self._pending.append((self._io.submit(self._run_io, fn, *args), self._shard.index))
        self._drain(self.max_pending)

    def _run_io(self, fn, *args) -> None:
        """Tasks run in order; after a failure none runs, so no shard is committed without all of its objects."""
        if self._failed:
            raise RuntimeError("not run: an earlier write of this build failed")
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def _drain(self, keep: int, raise_errors: bool = True) -> None:
        """Wait until at most `keep` I/O tasks are pending; the first failure is raised (if raise_errors)."""
        while len(self._pending) > keep:
            future, index = self._pending.popleft()
            try:
                future.result()
            except OSError as exc:
                if raise_errors:
                    raise _io_error(exc, index, self.writer.url) from exc
            except Exception:
                if raise_errors:
                    raise

    def _write_encoded(self, shard: _Shard, encoded: Future) -> None:
        objects, mass = encoded.result()
        for key, (data, digest) in objects.items():
            full = f"{shard_path(shard.index)}/{key}"
            self.writer.store.write_bytes(full, data)
            shard.objects[full] = ObjectInfo(len(data), digest)
        shard.masses.append(mass)  # in chunk order: the sum does not depend on how the rows arrived

    def _commit(self, shard: _Shard, offsets: np.ndarray) -> None:
        layout = encode_zarr_layout(shard.shapes, self.chunk_rows)
        meta = encode_meta(shard.meta, offsets)
        for key, data in [*((f"{shard_path(shard.index)}/{k}", v) for k, v in layout.items()), (meta_path(shard.index), meta)]:
            self.writer.store.write_bytes(key, data)
            shard.objects[key] = ObjectInfo(len(data), hashlib.sha256(data).hexdigest())
        entry = ShardEntry(name=shard_name(shard.index), path=shard_path(shard.index), meta_path=meta_path(shard.index),
                           num_sequences=len(shard.lengths), num_tokens=int(offsets[-1]),
                           num_loss_tokens=shard.num_loss_tokens, topk_mass_sum=float(sum(shard.masses)),
                           objects=dict(sorted(shard.objects.items())))
        self.writer.commit_shard(shard.index, entry)
        self.num_committed += 1


def _import_encoders() -> None:
    """What the I/O thread needs for a shard's last objects (Zarr metadata, the meta Parquet file)."""
    import pyarrow.parquet  # noqa: F401
    import zarr  # noqa: F401


def _io_error(exc: OSError, index: int, out: str) -> OSError:
    """The same errno, saying which shard failed and how to resume."""
    message = (f"writing shard {index} to {out} failed ({exc.strerror or exc}); that shard is not committed, the "
               "ones before it are kept: fix the cause (disk space, permissions) and rerun the same command to resume")
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)
