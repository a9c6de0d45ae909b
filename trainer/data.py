"""The trainer's data path: which sequences, in which order, in which batches.

Held-out rule (`heldout_mask`). A sequence is held out for evaluation iff
    int(sha256(f"{text_sha256}:{source_index}:{window_index}")[:8], 16) % 10_000
        < round(eval_fraction * 10_000)
with two guards: when that holds out nothing (and there are >= 2 sequences) the one with the smallest
value is held out, and when it holds out everything the one with the largest value is trained on.
The rule reads only the meta parquet's `text_sha256`, `source_index` (the data set row) and
`window_index`, never the teacher's arrays or the storage order, so caches of the same data built by
different teachers (a distillation chain) hold out exactly the same sequences. The row is in the key so
that identical texts at different rows are separate sequences (with the text alone, a data set of
repeated texts held out all of them or one); the samples of one prompt (generate mode) share the key
and are held out together.

Order (`epoch_order`, pure). Reading one random sequence of a Zarr shard decompresses the whole chunk
around it, so the order is built from *blocks*: the sequences whose first row lies in one chunk of
`chunk_rows` rows of one shard (the no-cache path, already in memory, uses one block per sequence).
For epoch e the blocks are permuted with `default_rng([seed, e])`; rank r of world_size takes the
blocks at positions r, r + world_size, ... of that permutation (disjoint stripes that together
cover every sequence); its blocks are taken `window_blocks` at a time, and the sequences of each such
window are shuffled together by a random key per sequence. A reader therefore keeps at most two
windows of decoded blocks (`BlockCache`) and decompresses each chunk about once per epoch, while a
batch still mixes sequences of `window_blocks` distant places of the data.

Batches (`pack_batches`). Sequences keep their order: a padded batch is the longest run of consecutive
sequences whose rows x longest length stays within `batch_tokens`; a longer sequence is a batch of its own.
Packed batches, the `Batch` type and `collate` are in trainer/batch.py; the prefetching `Batcher` (a thread
or worker processes, pinned memory, copies to the GPU ahead of the step) in trainer/loader.py.

Sources (`cache_source`, `sequence_source`) read sequences by position as numpy arrays; a cache source
reopens the cache in each worker process that reads from it (`CacheRows`).

Knows the cache reader and numpy; nothing about tensors, models, losses or the cacher.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.format import CacheCorruptError
from shared.reader import CacheReader
from shared.writer import DEFAULT_CHUNK_ROWS
from trainer.config import EVAL_FRACTION

HASH_BUCKETS = 10_000


# ---------------------------------------------------------------------------------------------
# Held-out rule


def heldout_hash(text_sha256: str, window_index: int, source_index: int = 0) -> int:
    """The number the held-out rule looks at (see the module docstring)."""
    key = f"{text_sha256}:{source_index}:{window_index}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16)


def heldout_mask(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Boolean mask of held-out items from their heldout_hash values (see the module docstring)."""
    buckets = np.asarray(hashes, dtype=np.int64) % HASH_BUCKETS
    mask = buckets < round(eval_fraction * HASH_BUCKETS)
    if eval_fraction > 0 and len(buckets) >= 2 and not mask.any():
        mask[int(np.argmin(buckets))] = True
    if mask.all() and len(buckets) >= 2:
        mask[int(np.argmax(buckets))] = False
    return mask


# ---------------------------------------------------------------------------------------------
# What a cache holds (from the small meta tables; no row array is read)


@dataclass
class CacheIndex:
    """Every sequence of a cache in storage order, planned from the meta tables alone."""

    shard_of: np.ndarray  # (S,) shard index of each sequence
    index_of: np.ndarray  # (S,) its index inside the shard
    lengths: np.ndarray  # (S,) rows
    row_starts: np.ndarray  # (S,) first row inside its shard
    hashes: np.ndarray  # (S,) heldout_hash
    blocks: np.ndarray  # (S,) global block id: (shard, chunk of its first row)
    chunk_rows: int  # rows per Zarr chunk (a block)

    def __len__(self) -> int:
        return len(self.lengths)


def cache_index(reader: CacheReader) -> CacheIndex:
    """Index a cache from its meta parquet files (a few KB per shard)."""
    chunk_rows = int(reader.manifest.settings.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
    shard_of, index_of, lengths, starts, hashes, blocks = [], [], [], [], [], []
    block_base = 0
    for s, entry in enumerate(reader.shards):
        try:
            meta = reader.meta(s).to_pydict()
            num_tokens = np.asarray(meta["num_tokens"], dtype=np.int64)
            keys = [heldout_hash(h, w, i) for h, w, i in zip(meta["text_sha256"], meta["window_index"], meta["source_index"])]
        except Exception as exc:  # a damaged parquet file raises pyarrow's own errors
            raise CacheCorruptError(f"{entry.name}: cannot read {entry.meta_path} ({exc}); run `kdcache verify` "
                                    "and rebuild the shard", [(entry.name, entry.meta_path, str(exc))]) from exc
        if len(num_tokens) != entry.num_sequences or int(num_tokens.sum()) != entry.num_tokens:
            raise CacheCorruptError(f"{entry.name}: {entry.meta_path} lists {len(num_tokens)} sequences of "
                                    f"{int(num_tokens.sum())} tokens, the manifest {entry.num_sequences} of "
                                    f"{entry.num_tokens}; rebuild the shard", [(entry.name, entry.meta_path, "counts")])
        row_starts = np.concatenate([[0], np.cumsum(num_tokens)[:-1]])
        shard_of.append(np.full(len(num_tokens), s))
        index_of.append(np.arange(len(num_tokens)))
        lengths.append(num_tokens)
        starts.append(row_starts)
        hashes.append(np.asarray(keys, dtype=np.int64))
        blocks.append(block_base + row_starts // chunk_rows)
        block_base += entry.num_tokens // chunk_rows + 1
    cat = np.concatenate
    return CacheIndex(cat(shard_of), cat(index_of), cat(lengths), cat(starts), cat(hashes), cat(blocks), chunk_rows)


def heldout_sequences(reader: CacheReader, eval_fraction: float = EVAL_FRACTION) -> list[tuple[int, int]]:
    """The cache's held-out sequences as (shard, index) pairs, in storage order."""
    index = cache_index(reader)
    mask = heldout_mask(index.hashes, eval_fraction)
    return [(int(s), int(i)) for s, i in zip(index.shard_of[mask], index.index_of[mask])]


# ---------------------------------------------------------------------------------------------
# Order and batches


def epoch_order(num_items: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                blocks: np.ndarray | None = None, window_blocks: int = 1) -> np.ndarray:
    """Indices of the items rank `rank` visits in `epoch`, a pure function (see the module docstring).

    blocks: (num_items,) block id of each item (default: one block per item, a plain shuffle).
    window_blocks: blocks whose items are shuffled together.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    if window_blocks < 1:
        raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    rng = np.random.default_rng([seed, epoch])
    blocks = np.arange(num_items) if blocks is None else np.asarray(blocks)
    if len(blocks) != num_items:
        raise ValueError(f"blocks has {len(blocks)} entries for {num_items} items")
    unique, block_of_item = np.unique(blocks, return_inverse=True)
    permuted = rng.permutation(len(unique))  # permuted[j] = the block visited j-th (all ranks)
    item_keys = rng.random(num_items)  # drawn for every item, so they do not depend on rank or world_size
    position = np.empty(len(unique), dtype=np.int64)
    position[permuted] = np.arange(len(unique))
    item_position = position[block_of_item]  # (num_items,) where the item's block comes in the permutation
    mine = np.flatnonzero(item_position % world_size == rank)
    window = (item_position[mine] // world_size) // window_blocks
    return mine[np.lexsort((item_keys[mine], window))].astype(np.int64)


def pack_batches(lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Split a stream of sequences (in order) into [start, stop) batches of <= batch_tokens padded tokens.

    A batch's padded size is (number of sequences) x (longest of them); a sequence longer than the
    budget is a batch of its own.
    """
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        width = max(longest, int(n))
        if i > start and width * (i - start + 1) > batch_tokens:
            out.append((start, i))
            start, width = i, int(n)
        longest = width
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


# ---------------------------------------------------------------------------------------------
# Sources: what the batcher streams


@dataclass
class Source:
    """Items with lengths and blocks, and a function that reads some of them as numpy arrays."""

    ids: list  # an opaque id per item, for traces: (shard, index) or a data set position
    lengths: np.ndarray
    blocks: np.ndarray
    read: Callable[[list[int]], list[dict]]  # item positions -> dicts of input_ids, loss_mask[, teacher arrays]
    has_teacher: bool
    window_blocks: int = 1
    window_rows: int = 0  # rows a shuffle window of blocks spans (what one reader decodes at a time); 0: unknown

    def __len__(self) -> int:
        return len(self.lengths)


class BlockCache:
    """The last `capacity` decoded blocks of a cache: each block's rows are read with one range read."""

    def __init__(self, reader: CacheReader, capacity: int, fields: tuple[str, ...]):
        self.reader = reader
        self.capacity = capacity
        self.fields = fields
        self._blocks: OrderedDict = OrderedDict()

    def get(self, shard: int, first_row: int, stop_row: int) -> dict[str, np.ndarray]:
        key = (shard, first_row)
        block = self._blocks.get(key)
        if block is None:
            block = self.reader.shard(shard).read_rows(first_row, stop_row, self.fields)
            self._blocks[key] = block
            if len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block


class CacheRows:
    """Reads sequences of a cache by position, block by block through a BlockCache (Source.read).

    Picklable and fork-safe: a process other than the one that made it (a data worker) opens the cache
    itself on first use, with the same verify-on-read setting, and checks each shard's offsets again.
    """

    def __init__(self, reader: CacheReader, index: CacheIndex, positions: np.ndarray, fields: tuple[str, ...],
                 capacity: int):
        self.url, self.verify_on_read = reader.url, reader.verify_on_read
        self.index, self.positions, self.fields, self.capacity = index, positions, fields, capacity
        # the row span of every block: from its first sequence's start to its last sequence's end
        self.span: dict[int, tuple[int, int, int]] = {}
        for b, s, start, n in zip(index.blocks, index.shard_of, index.row_starts, index.lengths):
            lo = self.span.get(int(b), (int(s), int(start), int(start + n)))
            self.span[int(b)] = (lo[0], min(lo[1], int(start)), max(lo[2], int(start + n)))
        self._attach(reader)

    def _attach(self, reader: CacheReader) -> None:
        self._pid, self._reader = os.getpid(), reader
        self._cache = BlockCache(reader, self.capacity, self.fields)
        self._checked: set[int] = set()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_cache", "_checked", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = None  # opened on first use

    def __call__(self, which: list[int]) -> list[dict]:
        if self._pid != os.getpid():
            self._attach(CacheReader(self.url, verify_on_read=self.verify_on_read))
        index, out = self.index, []
        for w in which:
            g = int(self.positions[w])
            shard, start, length = int(index.shard_of[g]), int(index.row_starts[g]), int(index.lengths[g])
            if shard not in self._checked:  # the meta plan must agree with the (now verified) offsets
                offsets = self._reader.shard(shard).offsets
                if not np.array_equal(np.diff(offsets), index.lengths[index.shard_of == shard]):
                    name = self._reader.shards[shard].name
                    raise CacheCorruptError(f"{name}: its meta parquet disagrees with its offsets; rebuild the shard",
                                            [(name, "offsets", "meta mismatch")])
                self._checked.add(shard)
            block_shard, lo, hi = self.span[int(index.blocks[g])]
            rows = self._cache.get(block_shard, lo, hi)
            out.append({k: v[start - lo: start - lo + length] for k, v in rows.items()})
        return out


def cache_source(reader: CacheReader, index: CacheIndex, positions: list[int], *, has_teacher: bool,
                 window_blocks: int = 4, tail_samples: bool = False) -> Source:
    """A source over some sequences of a cache; reads go block by block (CacheRows).

    tail_samples: also read the cache's tail_ids / tail_counts (a cache built with --tail-samples).
    """
    positions = np.asarray(positions, dtype=np.int64)
    fields = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob", "target_logprob") if has_teacher else (
        "input_ids", "loss_mask")
    if has_teacher and tail_samples:
        fields += ("tail_ids", "tail_counts")
    read = CacheRows(reader, index, positions, fields, capacity=2 * window_blocks + 1)
    ids = [(int(index.shard_of[g]), int(index.index_of[g])) for g in positions]
    return Source(ids, index.lengths[positions], index.blocks[positions], read, has_teacher, window_blocks,
                  window_rows=window_blocks * index.chunk_rows)


def sequence_source(sequences: list, positions: list[int]) -> Source:
    """A source over in-memory common.sequences.Sequence objects (the no-cache cross-entropy path)."""
    chosen = [sequences[i] for i in positions]

    def read(which: list[int]) -> list[dict]:
        return [{"input_ids": chosen[w].input_ids, "loss_mask": chosen[w].loss_mask} for w in which]

    lengths = np.asarray([len(s.input_ids) for s in chosen], dtype=np.int64)
    return Source(list(positions), lengths, np.arange(len(chosen)), read, False, 1)


def cache_sequences(reader: CacheReader, *, heldout_only: bool, limit: int | None,
                    eval_fraction: float = EVAL_FRACTION) -> list[dict]:
    """The cache's sequences to evaluate on (held-out ones by the trainer's rule, if asked)."""
    out = []
    picks = heldout_sequences(reader, eval_fraction) if heldout_only else [
        (s, i) for s in range(reader.num_shards) for i in range(reader.shard(s).num_sequences)]
    for shard, index in picks:
        out.append(reader.shard(shard).read_sequence(index))
        if limit is not None and len(out) >= limit:
            break
    return out
