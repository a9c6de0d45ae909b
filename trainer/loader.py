"""`Batcher`: one rank's batches, epoch after epoch from a cursor, read ahead of the step and put on the device.

The plan (which sequences make each batch) is a pure function of the source's lengths, the order of
trainer/data.py (`epoch_order`) and the cursor, computed in the training process: `pack_batches` for padded
rows, `pack_rows` for packed ones. Consecutive batches are grouped (`group_batches`) so that one reader
decodes each chunk of the cache about once; the groups are read and collated either

- by one background thread (num_workers=0), or
- by num_workers worker processes (torch.utils.data.DataLoader over the plan; each worker opens the cache
  itself, see trainer/data.py `CacheRows`), so decoding and collating use several cores and never take the
  training process's GIL. Groups go to the workers in turn and come back in plan order.

On CUDA the host batches are pinned (by the collating thread, or by the DataLoader's pin thread), copied to
the GPU with non-blocking copies on a side stream one batch ahead of the step, and widened there (trainer/batch.py);
on a CPU they are only widened. Whatever the workers and the device, the batches and their order are the same
(tested): the resume state is the cursor `{"epoch": e, "position": p}` of the last batch handed out, meaning the
first p items of this rank's order for epoch e were consumed.

Knows the data path's plan and torch's data loading; nothing about models, losses or the cache format.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from trainer.batch import Batch, collate
from trainer.data import Source, epoch_order, pack_batches
from trainer.errors import TrainError


def pack_rows(lengths: np.ndarray, batch_tokens: int, row_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) batches of sequences packed next-fit into rows of row_tokens (trainer/batch.py), each batch
    max(1, batch_tokens // row_tokens) rows; the last batch may have fewer rows."""
    rows_per_batch = max(1, batch_tokens // row_tokens)
    out, start, rows, used = [], 0, 0, row_tokens
    for i, n in enumerate(lengths):
        n = int(n)
        if used + n > row_tokens:  # the sequence starts a new row
            if rows == rows_per_batch:
                out.append((start, i))
                start, rows = i, 0
            rows, used = rows + 1, 0
        used += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def plan_spans(lengths: np.ndarray, batch_tokens: int, row_tokens: int | None) -> list[tuple[int, int]]:
    """The [start, stop) batches of a run of sequences (in order): padded (row_tokens None) or packed rows."""
    return pack_batches(lengths, batch_tokens) if row_tokens is None else pack_rows(lengths, batch_tokens, row_tokens)


def group_batches(spans: list[tuple[int, int]], lengths: np.ndarray, group_tokens: int) -> list[list[tuple[int, int]]]:
    """Consecutive batches grouped until a group holds >= group_tokens tokens (one reader decodes its chunks)."""
    groups, current, tokens = [], [], 0
    for a, b in spans:
        current.append((a, b))
        tokens += int(lengths[a:b].sum())
        if tokens >= group_tokens:
            groups.append(current)
            current, tokens = [], 0
    if current:
        groups.append(current)
    return groups


class _ReadGroup(torch.utils.data.Dataset):
    """Reads and collates one group of the plan: [(items, cursor), ...] -> [Batch, ...] (or the exception)."""

    def __init__(self, source: Source, row_tokens: int | None, pin: bool):
        self.source = source
        self.row_tokens = row_tokens
        self.pin = pin

    def __getitem__(self, group: list[tuple[list[int], dict]]) -> list[Batch] | BaseException:
        try:
            out = []
            for which, cursor in group:
                batch = collate(self.source.read(which), self.source.has_teacher, row_tokens=self.row_tokens,
                                pin=self.pin)
                batch.cursor, batch.ids = cursor, [self.source.ids[w] for w in which]
                out.append(batch)
            return out
        except Exception as exc:  # noqa: BLE001 - handed to the training process, raised there
            return exc

    def __len__(self) -> int:  # not used: the plan is endless
        raise TypeError("the plan has no length")


class Batcher:
    """Batches of one rank from a cursor: read ahead by a thread or worker processes, then put on `device`.

    row_tokens: pack sequences into rows of that many tokens (None: one padded sequence per row).
    num_workers: worker processes (0: one thread). prefetch: groups read ahead (per worker).
    group_tokens: tokens of consecutive batches one reader takes at a time (at least one batch).
    device: where batches are handed out (None: left on the host, as collated).
    """

    def __init__(self, source: Source, *, batch_tokens: int, seed: int, rank: int = 0, world_size: int = 1,
                 cursor: dict | None = None, prefetch: int = 4, row_tokens: int | None = None, num_workers: int = 0,
                 group_tokens: int = 0, device: torch.device | str | None = None):
        self.source = source
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.row_tokens = row_tokens
        self.group_tokens = group_tokens
        self.cursor = dict(cursor or {"epoch": 0, "position": 0})
        self.device = None if device is None else torch.device(device)
        cuda = self.device is not None and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._ahead: Batch | None = None
        self._stop = threading.Event()
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(_ReadGroup(source, row_tokens, pin=False), batch_size=None,
                                                 sampler=self._groups(), num_workers=num_workers,
                                                 prefetch_factor=prefetch, pin_memory=cuda)
            self._groups_iter = iter(loader)
            self._thread = None
        else:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._reader = _ReadGroup(source, row_tokens, pin=cuda)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="kdtrain-prefetch")
            self._thread.start()
            self._groups_iter = iter(self._queue.get, None)
        self._pending: list[Batch] = []

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.source), self.seed, epoch, self.rank, self.world_size,
                           blocks=self.source.blocks, window_blocks=self.source.window_blocks)

    def _groups(self) -> Iterator[list[tuple[list[int], dict]]]:
        """The plan from the cursor, endless: groups of (item positions, cursor after the batch)."""
        epoch, position = self.cursor["epoch"], self.cursor["position"]
        while True:
            order = self.order(epoch)
            if len(order) == 0:
                raise TrainError(f"rank {self.rank} of {self.world_size} has no training sequences: the data has "
                                 "fewer blocks than ranks; use fewer processes or more data")
            rest = order[position:]  # the cursor is always at a batch boundary of this epoch's packing
            lengths = self.source.lengths[rest]
            for group in group_batches(plan_spans(lengths, self.batch_tokens, self.row_tokens), lengths,
                                       self.group_tokens):
                yield [(rest[a:b].tolist(), {"epoch": epoch, "position": position + b}) for a, b in group]
            epoch, position = epoch + 1, 0

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
            for group in self._groups():
                if not self._put(self._reader[group]):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)

    def _next_host(self) -> Batch:
        while not self._pending:
            item = next(self._groups_iter)
            if isinstance(item, BaseException):
                raise item
            self._pending = list(item)
        return self._pending.pop(0)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device is None:
            return batch
        if self._stream is None:
            return batch.to(self.device)
        with torch.cuda.stream(self._stream):
            return batch.to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self._ahead if self._ahead is not None else self._to_device(self._next_host())
        self._ahead = None
        if self._stream is not None:  # the copy ran on the side stream: the step's stream waits for it
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            _record_stream(batch, current)
            self._ahead = self._to_device(self._next_host())  # the next batch's copy overlaps this step
        self.cursor = batch.cursor
        return batch

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._groups_iter = None  # a DataLoader iterator shuts its workers down when dropped


def _record_stream(batch: Batch, stream) -> None:
    """Tell the CUDA caching allocator that the batch's tensors (made on the side stream) are used on `stream`."""
    tensors = [batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_ids, batch.loss_mask]
    if batch.teacher is not None:
        tensors += [getattr(batch.teacher, name) for name in ("topk_ids", "topk_logprobs", "tail_logprob",
                                                               "target_logprob", "tail_ids", "tail_counts")]
    for t in tensors:
        if t is not None:
            t.record_stream(stream)
