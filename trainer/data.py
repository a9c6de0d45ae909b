"""The trainer's data path: which sequences, in which order, in which batches.

- `heldout_mask`: a sequence is held out for evaluation iff
  `int(sha256(f"{text_sha256}:{window_index}")[:8], 16) % 10_000 < eval_fraction * 10_000`
  (at least one sequence is held out when there are two or more: the one with the smallest hash).
  The rule reads only the source text's hash and the window index from the meta parquet, so caches of
  the same data built by different teachers (a distillation chain) hold out the same sequences.
- `epoch_order(num_items, seed, epoch, rank, world_size, blocks=None)`: a pure function. Blocks are
  groups of sequences stored next to each other (one Zarr chunk span); their order is shuffled and
  the sequences inside each block are shuffled, so a reader decompresses each chunk once per epoch
  instead of once per sequence. Rank r takes every world_size-th block of the shuffled order
  (disjoint stripes that together cover every item).
- `Batcher`: fills a token budget (`batch_tokens` = rows x padded width) from the stream, keeping
  the sequences' order; a background thread prefetches and collates the next batches.
- Resume state is the cursor `{"epoch": e, "position": p}`: the first p items of rank r's order for
  epoch e have been consumed.

Knows the cache format's reader and numpy/torch tensors; nothing about models or losses.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from shared.reader import CacheReader

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Held-out rule


def heldout_hash(text_sha256: str, window_index: int, source_index: int = 0) -> int:
    key = f"{text_sha256 or source_index}:{window_index}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16)


def heldout_mask(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Boolean mask of held-out items from their heldout_hash values (see the module docstring)."""
    hashes = np.asarray(hashes, dtype=np.int64)
    mask = (hashes % 10_000) < int(round(eval_fraction * 10_000))
    if eval_fraction > 0 and len(hashes) >= 2 and not mask.any():
        mask[int(np.argmin(hashes % 10_000))] = True
    if mask.all() and len(hashes) >= 2:
        mask[int(np.argmax(hashes % 10_000))] = False
    return mask


def cache_items(reader: CacheReader) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
    """Every sequence of a cache as (shard, index), with its length, held-out hash and block id."""
    items, lengths, hashes, blocks = [], [], [], []
    chunk_rows = int(reader.manifest.settings.get("chunk_rows") or 8192)
    block_base = 0
    for s in range(reader.num_shards):
        view = reader.shard(s)
        meta = reader.meta(s).to_pydict()
        offsets = view.offsets
        for i in range(view.num_sequences):
            items.append((s, i))
            lengths.append(int(offsets[i + 1] - offsets[i]))
            hashes.append(heldout_hash(meta["text_sha256"][i], meta["window_index"][i], meta["source_index"][i]))
            blocks.append(block_base + int(offsets[i]) // chunk_rows)
        block_base += int(offsets[-1]) // chunk_rows + 1
    return items, np.asarray(lengths), np.asarray(hashes), np.asarray(blocks)


def heldout_sequences(reader: CacheReader, eval_fraction: float = 0.05) -> list[tuple[int, int]]:
    """The cache's held-out sequences as (shard, index) pairs, in storage order."""
    items, _, hashes, _ = cache_items(reader)
    mask = heldout_mask(hashes, eval_fraction)
    return [it for it, m in zip(items, mask) if m]


# ---------------------------------------------------------------------------------------------
# Order


def epoch_order(num_items: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                blocks: np.ndarray | None = None) -> np.ndarray:
    """Indices of the items rank `rank` visits in `epoch` (pure; see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    rng = np.random.default_rng([seed, epoch])
    if blocks is None:
        blocks = np.arange(num_items)
    blocks = np.asarray(blocks)
    unique = np.unique(blocks)
    block_order = unique[rng.permutation(len(unique))]
    mine = block_order[rank::world_size]
    by_block = {b: np.flatnonzero(blocks == b) for b in mine}
    parts = [by_block[b][rng.permutation(len(by_block[b]))] if len(by_block[b]) > 1 else by_block[b] for b in mine]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


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
# Sources and batches


@dataclass
class Source:
    """What the batcher streams: items with lengths and blocks, and a function that reads a block."""

    items: list  # opaque item ids
    lengths: np.ndarray
    blocks: np.ndarray
    read: callable  # read(list of item indices) -> list of dict arrays (input_ids, loss_mask, [teacher arrays])
    has_teacher: bool


def cache_source(reader: CacheReader, indices: list[int], items, lengths, blocks) -> Source:
    chosen = [items[i] for i in indices]

    def read(which: list[int]) -> list[dict]:
        # group by shard so each shard's contiguous span is read once
        out: dict[int, dict] = {}
        by_shard: dict[int, list[int]] = {}
        for w in which:
            by_shard.setdefault(chosen[w][0], []).append(w)
        for shard, ws in by_shard.items():
            seqs = reader.shard(shard).read_sequences([chosen[w][1] for w in ws])
            for w, seq in zip(ws, seqs):
                out[w] = seq
        return [out[w] for w in which]

    return Source(chosen, np.asarray(lengths)[indices], np.asarray(blocks)[indices], read, True)


def sequence_source(sequences: list, indices: list[int]) -> Source:
    """A source over shared.data.Sequence objects (the no-cache cross-entropy path)."""
    chosen = [sequences[i] for i in indices]

    def read(which: list[int]) -> list[dict]:
        return [{"input_ids": chosen[w].input_ids, "loss_mask": chosen[w].loss_mask} for w in which]

    lengths = np.asarray([len(s.input_ids) for s in chosen])
    return Source(chosen, lengths, np.arange(len(chosen)) // 64, read, False)


def collate(seqs: list[dict], has_teacher: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids (B, L), attention_mask, target_ids (B, L) (-100 where none),
    loss_mask (B, L) bool, and with a teacher topk_ids (B, L, K), topk_logprobs, tail_logprob (B, L)."""
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
    for r, s in enumerate(seqs):
        ids = torch.as_tensor(np.asarray(s["input_ids"], dtype=np.int64))
        n = len(ids)
        input_ids[r, :n] = ids
        attention[r, :n] = 1
        targets[r, : n - 1] = ids[1:]
        mask[r, :n] = torch.as_tensor(np.asarray(s["loss_mask"], dtype=bool))
        if has_teacher:
            out["topk_ids"][r, :n] = torch.as_tensor(s["topk_ids"].astype(np.int64))
            out["topk_logprobs"][r, :n] = torch.as_tensor(s["topk_logprobs"].astype(np.float32))
            out["tail_logprob"][r, :n] = torch.as_tensor(s["tail_logprob"].astype(np.float32))
    mask[:, -1] = mask[:, -1] & (targets[:, -1] != IGNORE)
    out["num_tokens"] = int(attention.sum())
    return out


class Batcher:
    """Batches of one rank, epoch after epoch, from a cursor; a thread prefetches `prefetch` batches.

    Each yielded batch carries its cursor after consumption (`cursor`), which is what a checkpoint
    stores: resuming from it yields exactly the batches an uninterrupted run would have.
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

    def _produce(self):
        try:
            epoch, position = self.cursor["epoch"], self.cursor["position"]
            while not self._stop.is_set():
                order = epoch_order(len(self.source.items), self.seed, epoch, self.rank, self.world_size,
                                    self.source.blocks)
                if len(order) == 0:
                    raise RuntimeError(f"rank {self.rank} has no training sequences (too few sequences for {self.world_size} ranks?)")
                if position >= len(order):
                    epoch, position = epoch + 1, 0
                    continue
                # the cursor is always at a batch boundary of this epoch's packing
                rebased = pack_batches(self.source.lengths[order[position:]], self.batch_tokens)
                for start, stop in rebased:
                    if self._stop.is_set():
                        return
                    which = order[position + start: position + stop].tolist()
                    batch = collate(self.source.read(which), self.source.has_teacher)
                    batch["cursor"] = {"epoch": epoch, "position": position + stop}
                    batch["epoch_done"] = position + stop >= len(order)
                    self._queue.put(batch)
                epoch, position = epoch + 1, 0
        except BaseException as exc:  # noqa: BLE001 - hand it to the consumer
            self._queue.put(exc)

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
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
