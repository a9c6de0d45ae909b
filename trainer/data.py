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

Batches (`pack_batches`, `collate`). Sequences keep their order and are right-padded, not packed
into one row (packing would let attention cross document boundaries): a batch is the longest run of
consecutive sequences whose rows x longest length stays within `batch_tokens`; a longer sequence is
a batch of its own. Cache windows mostly share one length, so little is padding. Row t's target is
token t+1 of its own sequence; the last row of each sequence has none and its loss mask is False.

`Batcher` runs a background thread that reads, collates and queues the next batches so the step does
not wait on I/O. Resume state is the cursor `{"epoch": e, "position": p}`: the first p items of this
rank's order for epoch e were consumed; batch boundaries restart from the cursor exactly as before.

Knows the cache reader, numpy and torch tensors; nothing about models, losses or the cacher.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shared.format import CacheCorruptError
from shared.reader import CacheReader

IGNORE = -100  # target id of rows without a next token (and of padding)
TARGET_UNKNOWN = 1.0  # target_logprob where none is known (the cache's sentinel for "no next token")
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

    def __len__(self) -> int:
        return len(self.lengths)


def cache_index(reader: CacheReader) -> CacheIndex:
    """Index a cache from its meta parquet files (a few KB per shard)."""
    chunk_rows = int(reader.manifest.settings.get("chunk_rows") or 8192)
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
    return CacheIndex(cat(shard_of), cat(index_of), cat(lengths), cat(starts), cat(hashes), cat(blocks))


def heldout_sequences(reader: CacheReader, eval_fraction: float = 0.05) -> list[tuple[int, int]]:
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


def cache_source(reader: CacheReader, index: CacheIndex, positions: list[int], *, has_teacher: bool,
                 window_blocks: int = 4, tail_samples: bool = False) -> Source:
    """A source over some sequences of a cache; reads go block by block through a BlockCache.

    tail_samples: also read the cache's tail_ids / tail_counts (a cache built with --tail-samples).
    """
    positions = np.asarray(positions, dtype=np.int64)
    fields = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob", "target_logprob") if has_teacher else (
        "input_ids", "loss_mask")
    if has_teacher and tail_samples:
        fields += ("tail_ids", "tail_counts")
    # the row span of every block: from its first sequence's start to its last sequence's end
    span: dict[int, tuple[int, int, int]] = {}
    for b, s, start, n in zip(index.blocks, index.shard_of, index.row_starts, index.lengths):
        lo = span.get(int(b), (int(s), int(start), int(start + n)))
        span[int(b)] = (lo[0], min(lo[1], int(start)), max(lo[2], int(start + n)))
    cache = BlockCache(reader, 2 * window_blocks + 1, fields)
    checked: set[int] = set()

    def read(which: list[int]) -> list[dict]:
        out = []
        for w in which:
            g = int(positions[w])
            shard, start, length = int(index.shard_of[g]), int(index.row_starts[g]), int(index.lengths[g])
            if shard not in checked:  # the meta plan must agree with the (now verified) offsets
                offsets = reader.shard(shard).offsets
                mine = index.shard_of == shard
                if not np.array_equal(np.diff(offsets), index.lengths[mine]):
                    name = reader.shards[shard].name
                    raise CacheCorruptError(f"{name}: its meta parquet disagrees with its offsets; rebuild the shard",
                                            [(name, "offsets", "meta mismatch")])
                checked.add(shard)
            block_shard, lo, hi = span[int(index.blocks[g])]
            rows = cache.get(block_shard, lo, hi)
            out.append({k: v[start - lo: start - lo + length] for k, v in rows.items()})
        return out

    ids = [(int(index.shard_of[g]), int(index.index_of[g])) for g in positions]
    return Source(ids, index.lengths[positions], index.blocks[positions], read, has_teacher, window_blocks)


def sequence_source(sequences: list, positions: list[int]) -> Source:
    """A source over in-memory common.sequences.Sequence objects (the no-cache cross-entropy path)."""
    chosen = [sequences[i] for i in positions]

    def read(which: list[int]) -> list[dict]:
        return [{"input_ids": chosen[w].input_ids, "loss_mask": chosen[w].loss_mask} for w in which]

    lengths = np.asarray([len(s.input_ids) for s in chosen], dtype=np.int64)
    return Source(list(positions), lengths, np.arange(len(chosen)), read, False, 1)


def collate(seqs: list[dict], has_teacher: bool) -> dict:
    """Right-padded tensors of B sequences padded to length L.

    input_ids, attention_mask: (B, L) int64. target_ids: (B, L) int64, token t+1, IGNORE where none.
    loss_mask: (B, L) bool. With a teacher: topk_ids (B, L, K) int64, topk_logprobs (B, L, K) float32,
    tail_logprob (B, L) float32, target_logprob (B, L) float32 (the teacher's log-prob of target_ids; +1.0,
    "unknown", on padding, on last rows and where a sequence dict lacks it); when the sequences carry tail
    samples also tail_ids (B, L, M) int64 and tail_counts (B, L, M) float32 (0 on padding).
    num_tokens: real (unpadded) tokens.
    """
    width = max(len(s["input_ids"]) for s in seqs)
    num = len(seqs)
    input_ids = torch.zeros((num, width), dtype=torch.long)
    attention = torch.zeros((num, width), dtype=torch.long)
    targets = torch.full((num, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((num, width), dtype=torch.bool)
    out = {"input_ids": input_ids, "attention_mask": attention, "target_ids": targets, "loss_mask": mask}
    if has_teacher:
        top_k = seqs[0]["topk_ids"].shape[1]
        out["topk_ids"] = torch.zeros((num, width, top_k), dtype=torch.long)
        out["topk_logprobs"] = torch.zeros((num, width, top_k), dtype=torch.float32)
        out["tail_logprob"] = torch.full((num, width), float("-inf"), dtype=torch.float32)
        out["target_logprob"] = torch.full((num, width), TARGET_UNKNOWN, dtype=torch.float32)
        if "tail_ids" in seqs[0]:
            num_samples = seqs[0]["tail_ids"].shape[1]
            out["tail_ids"] = torch.zeros((num, width, num_samples), dtype=torch.long)
            out["tail_counts"] = torch.zeros((num, width, num_samples), dtype=torch.float32)
    for r, s in enumerate(seqs):
        ids = torch.as_tensor(np.asarray(s["input_ids"], dtype=np.int64))
        n = len(ids)
        input_ids[r, :n] = ids
        attention[r, :n] = 1
        targets[r, : n - 1] = ids[1:]
        mask[r, : n - 1] = torch.as_tensor(np.asarray(s["loss_mask"][: n - 1], dtype=bool))  # last row: no target
        if has_teacher:
            out["topk_ids"][r, :n] = torch.as_tensor(s["topk_ids"].astype(np.int64))
            out["topk_logprobs"][r, :n] = torch.as_tensor(s["topk_logprobs"].astype(np.float32))
            out["tail_logprob"][r, :n] = torch.as_tensor(s["tail_logprob"].astype(np.float32))
            if "target_logprob" in s:
                out["target_logprob"][r, : n - 1] = torch.as_tensor(s["target_logprob"][: n - 1].astype(np.float32))
            if "tail_ids" in out:
                out["tail_ids"][r, :n] = torch.as_tensor(s["tail_ids"].astype(np.int64))
                out["tail_counts"][r, :n] = torch.as_tensor(s["tail_counts"].astype(np.float32))
    out["num_tokens"] = int(attention.sum())
    out["num_loss_tokens"] = int(mask.sum())
    return out


class Batcher:
    """Batches of one rank, epoch after epoch, from a cursor; a thread prefetches `prefetch` batches.

    Each batch carries the cursor after it (`cursor`) and the ids of its items (`ids`). The cursor is
    what a checkpoint stores: resuming from it yields exactly the batches an uninterrupted run would.
    """

    def __init__(self, source: Source, *, batch_tokens: int, seed: int, rank: int = 0, world_size: int = 1,
                 cursor: dict | None = None, prefetch: int = 4):
        self.source = source
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = dict(cursor or {"epoch": 0, "position": 0})
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="kdtrain-prefetch")
        self._thread.start()

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.source), self.seed, epoch, self.rank, self.world_size,
                           blocks=self.source.blocks, window_blocks=self.source.window_blocks)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            epoch, position = self.cursor["epoch"], self.cursor["position"]
            while not self._stop.is_set():
                order = self.order(epoch)
                if len(order) == 0:
                    raise ValueError(f"rank {self.rank} of {self.world_size} has no training sequences: the data has "
                                     "fewer blocks than ranks; use fewer processes or more data")
                # the cursor is always at a batch boundary of this epoch's packing
                for start, stop in pack_batches(self.source.lengths[order[position:]], self.batch_tokens):
                    which = order[position + start: position + stop].tolist()
                    batch = collate(self.source.read(which), self.source.has_teacher)
                    batch["cursor"] = {"epoch": epoch, "position": position + stop}
                    batch["ids"] = [self.source.ids[w] for w in which]
                    if not self._put(batch):
                        return
                epoch, position = epoch + 1, 0
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.cursor = item["cursor"]
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
