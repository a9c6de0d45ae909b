"""What one training step reads: a `Batch` of token rows and the teacher's `TeacherRows`, and `collate`.

Two layouts (`collate`):
- padded (row_tokens=None): one sequence per row, right-padded to the batch's longest sequence; an
  attention mask marks the padding.
- packed (row_tokens=W): sequences are placed in order into rows of W tokens, next-fit (`next_fit_rows`):
  a sequence goes to the current row if it fits, else it starts the next one. Rows then share no padding
  but the end of each row. A row holding several sequences gets `position_ids` restarting at 0 for each
  sequence and no attention mask; transformers' masking reads the restarts and keeps attention inside each
  sequence (trainer.student.packs_sequences checks a student does). Rows of one sequence each need neither.
Either way row t's target is token t+1 of its own sequence; the last row of a sequence has none and its loss
mask is False, so nothing is learned across a sequence boundary.

Host tensors keep the cache's compact dtypes (ids as int32, log-probs as stored, float16 in a cache) and may be
allocated in pinned memory, so a batch crosses to the GPU in one non-blocking copy per field; `Batch.to`
widens them on the device (ids int64, log-probs float32), so every consumer sees the same dtypes and values
as before the copy.

Knows numpy and torch tensors; nothing about caches, models or losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

IGNORE = -100  # target id of rows without a next token (and of padding)
TARGET_UNKNOWN = 1.0  # target_logprob where none is known (the cache's sentinel for "no next token")
TEACHER_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprob", "tail_ids", "tail_counts")


@dataclass
class TeacherRows:
    """The teacher's per-token fields: (B, L, ...) in a batch, (N, ...) once flattened or selected.

    On the host ids are int32 and log-probs as stored (float16 in a cache); after `to` ids are int64 and
    log-probs float32. tail_ids / tail_counts exist for a cache built with --tail-samples and a loss that
    uses them.
    """

    topk_ids: torch.Tensor  # (..., K)
    topk_logprobs: torch.Tensor  # (..., K)
    tail_logprob: torch.Tensor  # (...)
    target_logprob: torch.Tensor | None = None  # (...), TARGET_UNKNOWN where no next token is known
    tail_ids: torch.Tensor | None = None  # (..., M)
    tail_counts: torch.Tensor | None = None  # (..., M), 0 on padding

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TeacherRows:
        """The same rows with fn applied to every tensor."""
        return TeacherRows(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                              for f in fields(self)})

    def flat(self) -> TeacherRows:
        """(B, L, ...) -> (B*L, ...)."""
        return self.map(lambda t: t.reshape(-1, *t.shape[2:]))

    def select(self, rows: torch.Tensor) -> TeacherRows:
        """The rows picked by a bool mask or index tensor over the leading dimension(s)."""
        return self.map(lambda t: t[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherRows:
        """Moved to device, then widened there: ids int64, log-probs and counts float32."""
        moved = self.map(lambda t: t.to(device, non_blocking=non_blocking))
        ids, floats = ("topk_ids", "tail_ids"), ("topk_logprobs", "tail_logprob", "target_logprob", "tail_counts")
        for name in ids + floats:
            value = getattr(moved, name)
            if value is not None:
                setattr(moved, name, value.long() if name in ids else value.float())
        return moved

    def pin_memory(self) -> TeacherRows:
        return self.map(lambda t: t if t.is_pinned() else t.pin_memory())


@dataclass
class Batch:
    """A micro-batch of B rows of L tokens, as the student and the loss read it."""

    input_ids: torch.Tensor  # (B, L) int64, 0 on padding
    attention_mask: torch.Tensor | None  # (B, L) int64, 1 on real tokens; None when packed rows need position_ids
    position_ids: torch.Tensor | None  # (B, L) int64 restarting at each packed sequence; None: one sequence per row
    target_ids: torch.Tensor  # (B, L) int64, token t+1 of the same sequence, IGNORE where none
    loss_mask: torch.Tensor  # (B, L) bool, the rows that count
    teacher: TeacherRows | None  # None: no teacher (cross-entropy on a data set, or --loss ce training)
    num_tokens: int  # real (unpadded) tokens
    num_loss_tokens: int
    sequence_lengths: tuple[int, ...]  # each sequence's tokens (attention FLOPs)
    ids: list = field(default_factory=list)  # an id per sequence, for traces: (shard, index) or a position
    cursor: dict | None = None  # the data cursor after this batch (trainer/loader.py)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the student's forward: input_ids, and attention_mask or position_ids if needed.

        A batch without padding passes no mask, so attention takes its causal fast path (and a compiled
        student sees one graph).
        """
        out = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        elif self.attention_mask is not None and self.num_tokens < self.input_ids.numel():
            out["attention_mask"] = self.attention_mask
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to device (teacher rows widened there, see TeacherRows.to)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       position_ids=move(self.position_ids), target_ids=move(self.target_ids),
                       loss_mask=move(self.loss_mask),
                       teacher=None if self.teacher is None else self.teacher.to(device, non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned host memory (for torch.utils.data's pin thread; collate can pin directly)."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None or t.is_pinned() else t.pin_memory()

        return replace(self, input_ids=pin(self.input_ids), attention_mask=pin(self.attention_mask),
                       position_ids=pin(self.position_ids), target_ids=pin(self.target_ids),
                       loss_mask=pin(self.loss_mask), teacher=None if self.teacher is None else self.teacher.pin_memory())


def next_fit_rows(lengths, row_tokens: int) -> list[list[int]]:
    """Sequences (by length, in order) placed into rows of row_tokens tokens, next-fit: [[i, ...], ...] per row.

    A sequence longer than row_tokens gets a row of its own (collate then widens the batch to it).
    """
    rows: list[list[int]] = []
    used = row_tokens
    for i, n in enumerate(lengths):
        n = int(n)
        if used + n > row_tokens or not rows:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _host_float(arrays: list[np.ndarray]) -> torch.dtype:
    """float16 when the stored values are float16 (a cache), else float32 (what the loss computes in)."""
    return torch.float16 if arrays and arrays[0].dtype == np.float16 else torch.float32


def collate(seqs: list[dict], has_teacher: bool, *, row_tokens: int | None = None, pin: bool = False) -> Batch:
    """A Batch of sequence dicts (input_ids, loss_mask[, teacher arrays]), padded or packed (module docstring).

    Each dict holds numpy arrays of one sequence's T rows: input_ids (T,), loss_mask (T,), and with a teacher
    topk_ids (T, K), topk_logprobs (T, K), tail_logprob (T,), target_logprob (T,) (optional: missing means
    unknown), tail_ids / tail_counts (T, M) (optional). pin: allocate in pinned host memory (needs CUDA).
    Padding holds id 0, loss mask False, target IGNORE, tail_logprob -inf, target_logprob TARGET_UNKNOWN.
    """
    lengths = [len(s["input_ids"]) for s in seqs]
    rows = next_fit_rows(lengths, row_tokens) if row_tokens is not None else [[i] for i in range(len(seqs))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    if row_tokens is not None:
        width = max(width, row_tokens)  # every packed batch has the same shape
    place = []  # (sequence, row, offset)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            place.append((i, r, offset))
            offset += lengths[i]
    shape = (len(rows), width)

    def full(extra: tuple, dtype: torch.dtype, fill) -> torch.Tensor:
        return torch.full(shape + extra, fill, dtype=dtype, pin_memory=pin)

    input_ids, target_ids = full((), torch.long, 0), full((), torch.long, IGNORE)
    loss_mask, attention = full((), torch.bool, False), full((), torch.long, 0)
    packed = any(len(row) > 1 for row in rows)
    position = full((), torch.long, 0) if packed else None
    views = {"input_ids": input_ids.numpy(), "target_ids": target_ids.numpy(), "loss_mask": loss_mask.numpy(),
             "attention": attention.numpy()}
    teacher = _teacher_tensors(seqs, shape, full) if has_teacher else None
    teacher_views = {} if teacher is None else {
        f.name: getattr(teacher, f.name).numpy() for f in fields(teacher) if getattr(teacher, f.name) is not None}
    for i, r, a in place:
        s, n = seqs[i], lengths[i]
        b = a + n
        views["input_ids"][r, a:b] = s["input_ids"]
        views["attention"][r, a:b] = 1
        views["target_ids"][r, a:b - 1] = s["input_ids"][1:]
        views["loss_mask"][r, a:b - 1] = s["loss_mask"][: n - 1]  # the last row has no target
        for name, view in teacher_views.items():
            if name == "target_logprob":
                if name in s:
                    view[r, a:b - 1] = s[name][: n - 1]
            else:
                view[r, a:b] = s[name]
    if packed:  # positions restart at every sequence; a row's padding after its last one counts as one more
        positions = position.numpy()
        for i, r, a in place:
            positions[r, a:a + lengths[i]] = np.arange(lengths[i])
        for r, row in enumerate(rows):
            used = sum(lengths[i] for i in row)
            positions[r, used:] = np.arange(width - used)
    return Batch(input_ids=input_ids, attention_mask=None if packed else attention, position_ids=position,
                 target_ids=target_ids, loss_mask=loss_mask, teacher=teacher, num_tokens=int(sum(lengths)),
                 num_loss_tokens=int(views["loss_mask"].sum()), sequence_lengths=tuple(lengths))


def _teacher_tensors(seqs: list[dict], shape: tuple[int, int], full) -> TeacherRows:
    """Empty (padding-filled) host tensors for the teacher's fields of a batch of `shape` rows."""
    first = seqs[0]
    top_k = first["topk_ids"].shape[1]
    floats = _host_float([first["topk_logprobs"]])
    out = TeacherRows(topk_ids=full((top_k,), torch.int32, 0), topk_logprobs=full((top_k,), floats, 0.0),
                      tail_logprob=full((), _host_float([first["tail_logprob"]]), float("-inf")),
                      target_logprob=full((), _host_float([first.get("target_logprob", first["tail_logprob"])]),
                                          TARGET_UNKNOWN))
    if "tail_ids" in first:
        num_samples = first["tail_ids"].shape[1]
        out.tail_ids = full((num_samples,), torch.int32, 0)
        out.tail_counts = full((num_samples,), torch.int32, 0)
    return out
