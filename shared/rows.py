"""A shard's rows and the one table of rules every stored row obeys (storage_layout.md 3, 3.3 and 4).

`INVARIANTS` is that table. The same functions check it, vectorized over a block of rows:
- the writer, on every shard before it is committed (`validate_shard_arrays`: the values as given are
  checked for NaN, range and order, encoded as stored, then checked against the table on the values a reader
  decodes, so a writer never commits what a reader would refuse);
- the reader, on every block of rows it returns (`check_rows`, called by shared.reader);
- `kdcache verify`, on every row of the cache, block by block (shared.verify).
The rules that need a sequence's meta row (its number of loss tokens, its prompt length) are
`SEQUENCE_INVARIANTS`, checked by `check_sequence_rows` and `check_loss_counts`.

The top-K log-probabilities a rule sees are those a reader decodes (float16, shared.topk_codec), and the
target rule compares the target with the interval of log-probabilities its top-K entry's stored code stands for.
Knows numpy, the format's constants and the top-K codec; nothing about models, tokenizers or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from shared import topk_codec
from shared.format import (
    COUNT_DTYPE,
    LOGPROB_DTYPE,
    LOGPROB_MAX,
    MAX_TOPK_MASS,
    TAIL_ARRAYS,
    TARGET_SENTINEL,
    CacheFormatError,
    array_dtypes,
)

# |exp(tail_logprob) + sum_k exp(topk_logprobs) - 1| may be at most this: the decoded top-K sum is off by at
# most MAX_TOPK_MASS - 1 (the sqrt-probability steps and float16, storage_layout.md 3) and the stored tail by
# 1.8e-4 (section 3.2).
ROW_MASS_TOLERANCE = MAX_TOPK_MASS - 1 + 2e-4
# A target log-probability lies within the interval its top-K entry's code stands for (or below the K-th entry's
# interval's top, for a target outside the top K), up to float16's rounding of the target (2^-11 of |log p|,
# section 3.1) and LOGPROB_MAX for values near 0.
TARGET_RELATIVE_TOLERANCE = 2.0**-11
TARGET_ABSOLUTE_TOLERANCE = LOGPROB_MAX

# Stored log-probabilities are float16, whose arithmetic numpy emulates slowly. Every float16 value is one of
# 2^16 bit patterns, so a reader looks its float32 value and its exp up in two tables (256 KiB each) and tests
# NaN and sign on the bits.
with np.errstate(over="ignore", invalid="ignore"):
    F16_VALUE = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    F16_EXP = np.exp(F16_VALUE)
F16_ABOVE_MAX = int(np.array(LOGPROB_MAX, dtype=np.float16).view(np.uint16))  # positive bit patterns above it


class RowBlock:
    """Rows [first_row, first_row + n) of one shard, as stored, and what the rules need to know about them.

    last: (n,) bool, the row is its sequence's last (no next token). following_id: the input id of the row
    after the block (None when the block ends the shard or the caller did not read it). A row's next token
    is known when the row is not last and its next row is in the block or is following_id. prob_codes: (n, K)
    the stored sqrt-probability codes that topk_logprobs were decoded from, with L levels (shared.topk_codec),
    for the target rule; a block with topk_logprobs, target_logprob and tail_logprob has them.
    """

    def __init__(self, arrays: dict[str, np.ndarray], first_row: int, last: np.ndarray, *, vocab_size: int,
                 top_k: int, tail_samples: int, following_id: int | None = None, prob_codes: np.ndarray | None = None,
                 levels: int = 0):
        self.arrays, self.first_row, self.last = arrays, first_row, last
        self.vocab_size, self.top_k, self.tail_samples = vocab_size, top_k, tail_samples
        self.following_id, self.prob_codes, self.levels = following_id, prob_codes, levels

    @cached_property
    def topk(self) -> np.ndarray:  # (n, K) float32
        return as_float32(self.arrays["topk_logprobs"])

    @cached_property
    def topk_mass(self) -> np.ndarray:  # (n,) float32: sum_k exp(topk_logprobs)
        values = self.arrays["topk_logprobs"]
        if values.dtype == np.float16:
            return F16_EXP[values.view(np.uint16)].sum(axis=1)
        return np.exp(self.topk).sum(axis=1)

    @cached_property
    def next_tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows whose next token is known, whether it is among their top K, its position there (0 if not))."""
        ids = self.arrays["input_ids"]
        following = np.empty(len(ids), dtype=np.int64)
        following[:-1] = ids[1:]
        known = ~self.last
        if self.following_id is None:
            known[-1:] = False
        else:
            following[-1:] = self.following_id
        rows = np.flatnonzero(known)
        match = self.arrays["topk_ids"][rows] == following[rows, None]  # (r, K)
        return rows, match.any(axis=1), match.argmax(axis=1)


def as_float32(values: np.ndarray) -> np.ndarray:
    """float32 values (a table lookup for float16)."""
    return F16_VALUE[values.view(np.uint16)] if values.dtype == np.float16 else values.astype(np.float32)


def _per_row(bad: np.ndarray) -> np.ndarray:
    return bad.any(axis=1) if bad.ndim == 2 else bad


def _ids_outside_vocabulary(name: str) -> Callable[[RowBlock], np.ndarray]:
    return lambda b: _per_row((b.arrays[name] < 0) | (b.arrays[name] >= b.vocab_size))


def nan_or_positive(values: np.ndarray) -> np.ndarray:
    """Elementwise: NaN, or above LOGPROB_MAX (+inf included); on float16 bits, without float arithmetic."""
    if values.dtype == np.float16:
        bits = values.view(np.uint16)
        return ((bits & 0x7FFF) > 0x7C00) | ((bits < 0x8000) & (bits > F16_ABOVE_MAX))
    return np.isnan(values) | (values > LOGPROB_MAX)


def _bad_logprobs(name: str) -> Callable[[RowBlock], np.ndarray]:
    return lambda b: _per_row(nan_or_positive(b.arrays[name]))


def _repeats(ids: np.ndarray) -> np.ndarray:
    """(n,) whether a row of ids holds one id twice."""
    if ids.shape[1] < 2:
        return np.zeros(len(ids), dtype=bool)
    ordered = np.sort(ids, axis=1)
    return (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)


def _unsorted(values: np.ndarray) -> np.ndarray:
    return (values[:, 1:] > values[:, :-1]).any(axis=1) if values.shape[1] > 1 else np.zeros(len(values), dtype=bool)


def _target_values(b: RowBlock) -> np.ndarray:
    target = b.arrays["target_logprob"]
    return np.where(b.last, target != TARGET_SENTINEL, nan_or_positive(target))


def _target_against_topk(b: RowBlock) -> np.ndarray:
    """Rows whose target disagrees with the top K: within its own entry's code interval when among them, else at
    most the top of the K-th entry's interval (code_bounds), each widened by the target's float16 rounding."""
    bad = np.zeros(len(b.last), dtype=bool)
    rows, among, position = b.next_tokens
    if not len(rows):
        return bad
    codes = b.prob_codes[rows]  # (r, K)
    code = np.where(among, codes[np.arange(len(rows)), position], codes[:, -1])
    log_mass = topk_codec.log_topk_mass(as_float32(b.arrays["tail_logprob"][rows]))  # (r,) ln s
    low, high = topk_codec.code_bounds(code, log_mass, b.levels)
    target = as_float32(b.arrays["target_logprob"][rows]).astype(np.float64)
    tolerance = TARGET_RELATIVE_TOLERANCE * np.abs(np.where(np.isfinite(target), target, 0)) + TARGET_ABSOLUTE_TOLERANCE
    with np.errstate(invalid="ignore"):  # NaN compares false: refused
        inside = (target >= low - tolerance) & (target <= high + tolerance)  # -inf within [-inf, -inf]
        below = target <= high + tolerance
    bad[rows] = ~np.where(among, inside, below)
    return bad


def _target_above_tail(b: RowBlock) -> np.ndarray:
    """Rows whose target, outside the top K, holds more probability than the whole tail."""
    bad = np.zeros(len(b.last), dtype=bool)
    rows, among, _ = b.next_tokens
    if not len(rows):
        return bad
    target = np.exp(as_float32(b.arrays["target_logprob"][rows]))
    tail = np.exp(as_float32(b.arrays["tail_logprob"][rows]))
    bad[rows] = ~among & (target > tail + ROW_MASS_TOLERANCE)
    return bad


def _tail_mass(b: RowBlock) -> np.ndarray:
    tail = np.exp(as_float32(b.arrays["tail_logprob"]))
    return np.abs(tail + b.topk_mass - 1) > ROW_MASS_TOLERANCE


def _tail_count_totals(b: RowBlock) -> np.ndarray:
    counts = b.arrays["tail_counts"].astype(np.int64)
    totals = counts.sum(axis=1)
    return (counts < 0).any(axis=1) | (counts > b.tail_samples).any(axis=1) | ((totals != 0) & (totals != b.tail_samples))


def _draws_on_empty_tail(b: RowBlock) -> np.ndarray:
    return np.isneginf(as_float32(b.arrays["tail_logprob"])) & (b.arrays["tail_counts"].sum(axis=1) != 0)


def _tail_ids_repeat(b: RowBlock) -> np.ndarray:
    both = np.concatenate([b.arrays["topk_ids"].astype(np.int64), b.arrays["tail_ids"].astype(np.int64)], axis=1)
    return _repeats(both)


@dataclass(frozen=True)
class Invariant:
    """One rule of the table: its name, the arrays it reads, what must hold (the refusal says it), the rows
    breaking it."""

    name: str
    arrays: tuple[str, ...]
    rule: str
    bad_rows: Callable[[RowBlock], np.ndarray] = field(repr=False)


# The table (storage_layout.md 3.4 lists the same rules, by name, in the same order).
INVARIANTS = (
    Invariant("input-ids-in-vocabulary", ("input_ids",), "every id is below the vocabulary size V",
              _ids_outside_vocabulary("input_ids")),
    Invariant("topk-ids-in-vocabulary", ("topk_ids",), "every id is below the vocabulary size V",
              _ids_outside_vocabulary("topk_ids")),
    Invariant("topk-ids-distinct", ("topk_ids",), "a row's K ids are distinct", lambda b: _repeats(b.arrays["topk_ids"])),
    Invariant("topk-logprobs-valid", ("topk_logprobs",), "log-probabilities are never NaN nor above 0 (+1e-3 of "
              "rounding)", _bad_logprobs("topk_logprobs")),
    Invariant("topk-logprobs-sorted", ("topk_logprobs",), "a row's log-probabilities do not increase along K (most "
              "likely first)", lambda b: _unsorted(b.topk)),
    Invariant("topk-mass-at-most-1", ("topk_logprobs",), f"a row's top-K probabilities sum to at most {MAX_TOPK_MASS} "
              "(log-probabilities, not logits)", lambda b: b.topk_mass > MAX_TOPK_MASS),
    Invariant("tail-logprob-valid", ("tail_logprob",), "the tail's log-probability is never NaN nor above 0 (+1e-3 of "
              "rounding)", _bad_logprobs("tail_logprob")),
    Invariant("tail-is-the-rest", ("topk_logprobs", "tail_logprob"), "exp(tail_logprob) is 1 - the top-K "
              f"probabilities, within {ROW_MASS_TOLERANCE:.4f}", _tail_mass),
    Invariant("target-sentinel", ("target_logprob",), "target_logprob is the sentinel +1.0 exactly on each "
              "sequence's last row, elsewhere a log-probability (not NaN, not above 0)", _target_values),
    Invariant("target-agrees-with-topk", ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_logprob"),
              "target_logprob lies within the log-probabilities the next token's stored top-K code stands for when it "
              "is among the K, else at most the top of the K-th code's (within float16's rounding of the target)",
              _target_against_topk),
    Invariant("target-within-tail", ("input_ids", "topk_ids", "target_logprob", "tail_logprob"),
              "a target outside the top K holds at most the tail's probability", _target_above_tail),
    Invariant("loss-mask-not-on-last-row", ("loss_mask",), "loss_mask is false on each sequence's last row (it has no "
              "next token)", lambda b: b.arrays["loss_mask"] & b.last),
    Invariant("tail-ids-in-vocabulary", ("tail_ids",), "every id is below the vocabulary size V",
              _ids_outside_vocabulary("tail_ids")),
    Invariant("tail-counts-sum-to-m", ("tail_counts",), "a row's counts are in [0, M] and sum to M, or to 0 (no draw)",
              _tail_count_totals),
    Invariant("tail-counts-sorted", ("tail_counts",), "a row's counts do not increase along M (most drawn first)",
              lambda b: _unsorted(b.arrays["tail_counts"].astype(np.int64))),
    Invariant("no-draws-on-empty-tail", ("tail_counts", "tail_logprob"), "a row whose tail_logprob is -inf has no "
              "draws", _draws_on_empty_tail),
    Invariant("tail-ids-distinct", ("topk_ids", "tail_ids"), "a row's K top-K ids and M tail ids are all distinct "
              "(unused slots too)", _tail_ids_repeat),
)
# Checked on a writer's values as given, before encoding and casting (so nothing wraps around or hides).
GIVEN_VALUE_RULES = ("input-ids-in-vocabulary", "topk-ids-in-vocabulary", "topk-logprobs-valid", "topk-logprobs-sorted",
                     "tail-logprob-valid", "target-sentinel", "tail-ids-in-vocabulary", "tail-counts-sum-to-m")


# Rules that need a sequence's meta row (storage_layout.md 4): checked by check_sequence_rows / check_loss_counts.
SEQUENCE_INVARIANTS = (
    "each sequence's loss_mask has as many true rows as its meta row's num_loss_tokens",
    "loss_mask is false on the rows before prompt_length - 1 (their next token is part of the prompt)",
)


def _applies(invariant: Invariant, present: set[str], tail_samples: int) -> bool:
    return set(invariant.arrays) <= present and (bool(tail_samples) or not set(invariant.arrays) & set(TAIL_ARRAYS))


def check_rows(block: RowBlock, where: str) -> None:
    """Refuse (CacheFormatError naming `where`, the arrays and the row) the first rule of INVARIANTS a row breaks.

    Rules whose arrays are not all in the block are skipped (a reader asked for fewer fields); so are the
    tail-sample rules of a cache without tail samples.
    """
    present = set(block.arrays)
    for invariant in INVARIANTS:
        if not _applies(invariant, present, block.tail_samples):
            continue
        bad = invariant.bad_rows(block)
        if bad.any():
            row = block.first_row + int(np.argmax(bad))
            raise CacheFormatError(f"{where}: {', '.join(invariant.arrays)} row {row}: breaks the rule that "
                                   f"{invariant.rule} ({int(bad.sum())} row(s) of rows {block.first_row}.."
                                   f"{block.first_row + len(bad) - 1}); rebuild the shard (storage_layout.md 3.4)")


def check_sequence_rows(loss_mask: np.ndarray, first_row: int, offsets: np.ndarray, prompt_length: np.ndarray,
                        where: str) -> tuple[int, np.ndarray]:
    """Rows [first_row, first_row + n) of a shard's loss_mask against their sequences' meta rows.

    Refuses a loss row before its sequence's prompt ends (SEQUENCE_INVARIANTS). Returns (first sequence the
    block touches, its and the following sequences' true loss_mask rows in this block), for the caller to
    compare with num_loss_tokens: whole sequences at once, or summed over the blocks a sequence spans.
    """
    rows = first_row + np.arange(len(loss_mask))
    sequence = np.searchsorted(offsets, rows, side="right") - 1
    if not len(rows):
        return 0, np.zeros(0, dtype=np.int64)
    early = loss_mask & (rows - offsets[sequence] < prompt_length[sequence] - 1)
    if early.any():
        i = int(sequence[np.argmax(early)])
        raise CacheFormatError(f"{where}: loss_mask row {int(rows[np.argmax(early)])}: breaks the rule that "
                               f"{SEQUENCE_INVARIANTS[1]} (sequence {i}: prompt_length {int(prompt_length[i])}); "
                               "rebuild the shard (storage_layout.md 3.4)")
    first = int(sequence[0])
    return first, np.bincount(sequence[loss_mask] - first, minlength=int(sequence[-1]) - first + 1)


def check_loss_counts(first: int, counts: np.ndarray, whole: np.ndarray, num_loss_tokens: np.ndarray, where: str) -> None:
    """Refuse a sequence (of those `whole` marks, among first, first + 1, ...) whose loss rows are not its
    meta row's num_loss_tokens."""
    bad = whole & (counts != num_loss_tokens[first: first + len(counts)])
    if bad.any():
        i = int(np.argmax(bad))
        raise CacheFormatError(f"{where}: loss_mask of sequence {first + i}: breaks the rule that "
                               f"{SEQUENCE_INVARIANTS[0]} "
                               f"({int(counts[i])} true rows, num_loss_tokens {int(num_loss_tokens[first + i])}); "
                               "rebuild the shard (storage_layout.md 3.4)")


def last_rows_mask(offsets: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(stop - start,) bool: which of rows [start, stop) end their sequence, from a shard's offsets."""
    last = np.zeros(stop - start, dtype=bool)
    ends = offsets[1:] - 1
    inside = ends[(ends >= start) & (ends < stop)]
    last[inside - start] = True
    return last


# ---------------------------------------------------------------------------------------------
# Writing: a shard's arrays as given, checked and cast to the stored dtypes


def _check_shapes(arrays: dict[str, np.ndarray], top_k: int, tail_samples: int, where: str) -> np.ndarray:
    """The arrays a shard needs, with the shapes of storage_layout.md 3; returns the offsets."""
    if tail_samples and not set(TAIL_ARRAYS) <= set(arrays):
        raise CacheFormatError(f"{where}: the build stores {tail_samples} tail samples per row (settings.tail_samples) "
                               "but the shard has no tail_ids / tail_counts")
    if not tail_samples and set(TAIL_ARRAYS) & set(arrays):
        raise CacheFormatError(f"{where}: the shard has tail samples but the build's settings.tail_samples is 0")
    offsets = np.asarray(arrays["offsets"])
    num_rows = len(arrays["input_ids"])
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_rows or np.any(np.diff(offsets) < 1):
        raise CacheFormatError(f"{where}: offsets must start at 0, grow strictly and end at {num_rows}")
    widths = {"topk_ids": top_k, "topk_logprobs": top_k, "tail_ids": tail_samples, "tail_counts": tail_samples}
    for name in ("input_ids", "loss_mask", "target_logprob", "tail_logprob", *widths):
        if name not in arrays:
            continue
        want = (num_rows, widths[name]) if name in widths else (num_rows,)
        if np.shape(arrays[name]) != want:
            raise CacheFormatError(f"{where}: {name} has shape {np.shape(arrays[name])}, expected {want}")
        if name in ("input_ids", "topk_ids", *TAIL_ARRAYS) and not np.issubdtype(np.asarray(arrays[name]).dtype, np.integer):
            raise CacheFormatError(f"{where}: {name} must hold integers, got {np.asarray(arrays[name]).dtype}")
    return offsets.astype(np.int64)


def validate_shard_arrays(arrays: dict[str, np.ndarray], *, vocab_size: int, top_k: int, where: str,
                          tail_samples: int = 0) -> dict[str, np.ndarray]:
    """The shard's rows as a writer stores them, after checking every rule of INVARIANTS on what a reader decodes.

    Values as given are checked first (ids in [0, V), no NaN or positive log-probability, sorted rows, counts in
    [0, M]), so that nothing wraps around or hides in rounding; then target and tail are rounded to float16 (the
    last rows get the target sentinel) and the top-K log-probabilities encoded as sqrt-probability steps against
    the stored tail (storage_layout.md 3.1); then the whole table is checked on the values a reader decodes.
    Returns the stored arrays, `topk_ids` (which shared.encode.stored_rows turns into codes and tables, chunk by
    chunk) and `topk_logprobs` as a reader decodes them (float16; a shard's topk_mass_sum is their sum).
    """
    offsets = _check_shapes(arrays, top_k, tail_samples, where)
    last = last_rows_mask(offsets, 0, int(offsets[-1]))
    given = {k: np.asarray(v) for k, v in arrays.items() if k != "offsets"}
    given["target_logprob"] = np.where(last, -1.0, given["target_logprob"].astype(np.float32))  # sentinel set below
    raw = RowBlock(given, 0, np.zeros_like(last), vocab_size=vocab_size, top_k=top_k, tail_samples=tail_samples)
    for invariant in INVARIANTS:
        if invariant.name in GIVEN_VALUE_RULES and _applies(invariant, set(given), tail_samples):
            bad = invariant.bad_rows(raw)
            if bad.any():
                hint = " (the model produced non-finite log-probs; try {dtype} float32)" if "NaN" in invariant.rule else ""
                raise CacheFormatError(f"{where}: {', '.join(invariant.arrays)} row {int(np.argmax(bad))}: breaks the "
                                       "rule "
                                       f"that {invariant.rule}{hint}; the shard is not committed")
    dtypes = array_dtypes(vocab_size, tail_samples)
    target = np.minimum(given["target_logprob"], 0).astype(LOGPROB_DTYPE)
    target[last] = TARGET_SENTINEL
    tail = np.minimum(given["tail_logprob"].astype(np.float32), 0).astype(LOGPROB_DTYPE)
    if (tail == 0).any():  # s = 1 - exp(tail) = 0 would scale the top K's steps to nothing
        raise CacheFormatError(f"{where}: tail_logprob row {int(np.argmax(tail == 0))}: rounds to 0 in float16 (the top K "
                               "hold under 3e-8 of the probability), which leaves the stored top-K probabilities nothing "
                               "to scale (storage_layout.md 3.1); the shard is not committed: use a larger {top_k}")
    levels = topk_codec.prob_levels(top_k)
    steps = topk_codec.encode_prob_steps(np.minimum(given["topk_logprobs"].astype(np.float32), 0), tail, levels)  # (T, K)
    codes = topk_codec.decode_prob_codes(steps, levels)
    out = {
        "input_ids": given["input_ids"].astype(dtypes["input_ids"]),
        "loss_mask": given["loss_mask"].astype(bool),
        "topk_ids": given["topk_ids"].astype(dtypes["topk_id_codes"]),
        "topk_logprobs": topk_codec.codes_to_logprobs(codes, tail, levels, LOGPROB_DTYPE),
        "topk_prob_steps": steps,
        "target_logprob": target,
        "tail_logprob": tail,
        "offsets": offsets,
    }
    if tail_samples:
        out["tail_ids"] = given["tail_ids"].astype(dtypes["tail_ids"])
        out["tail_counts"] = given["tail_counts"].astype(COUNT_DTYPE)
    decoded = {k: v for k, v in out.items() if k not in ("offsets", "topk_prob_steps")}
    check_rows(RowBlock(decoded, 0, last, vocab_size=vocab_size, top_k=top_k, tail_samples=tail_samples,
                        prob_codes=codes, levels=levels), where)
    return out
