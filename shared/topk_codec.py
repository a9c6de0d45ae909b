"""The stored form of the top-K rows: id codes with a per-chunk table, and square-root probability steps.

Two independent transforms (storage_layout.md 3.1), each pure numpy and vectorized:

- ids: each chunk of rows stores its N most frequent top-K ids, most frequent first, as a table; an id
  is stored as a code, its position in the chunk's *permutation* of [0, V): the table's ids get codes
  0..N-1, the ids below N that the table lacks take the codes the table's ids >= N leave free, every
  other id is its own code. Frequent ids thus get small codes, whose high bits zstd packs to almost
  nothing. Lossless.
- log-probs: each row's top-K distribution, p_r / s with s = 1 - exp(tail_logprob) the top-K mass that the
  row's stored tail gives, is quantized as c_r = round(L * sqrt(p_r / s)) (clamped to [1, L] while p_r > 0,
  0 for p_r = 0) and stored as the steps d_r = c_{r-1} - c_r (c_0 = L), small non-negative integers
  because the row is sorted. Decoding is c = L - cumsum(d), then 2 ln(c / L) + ln s. A uniform step in
  sqrt(p) is the entropy-coded quantizer that minimizes KL: a step e in sqrt(p) moves KL(p || q) by about
  2 e^2 whatever p, so every entry costs the same share of the budget. Quantizing the *renormalized*
  top-K (p / s, not p) makes the mean KL between the true and the stored top-K, each renormalized over
  its K entries, about K / (6 L^2) whatever the teacher: a flat teacher whose top K hold little mass
  gets the same fidelity as a peaked one. `prob_levels` picks L from K for a chosen mean KL.

Knows numpy only: nothing of Zarr, stores, manifests or models. The writer validates rows before they
get here (storage_layout.md 3); these functions check only what their own arithmetic needs, and the
decoders refuse (ValueError) what a damaged or hostile cache could hand them.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# Mean KL(true top-K || stored top-K) the log-prob steps are sized for: below the format's budget of
# 1e-5 and below the float16 + 7-bit-trim encoding it replaces (4.9e-6 at K = 64, BENCHMARKS.md P4).
DESIGN_MEAN_KL = 4e-6
MAX_LEVELS = 2**16 - 1  # c_r and d_r are uint16
PROB_STEP_DTYPE = np.dtype("uint16")
# Table entries per chunk: one per ENTRIES_PER_TABLE_ID stored ids of the chunk (8,192 at 8,192 rows x K = 64),
# smaller than one per 32 or per 128 at K = 64 and 128 (BENCHMARKS.md P4).
ENTRIES_PER_TABLE_ID = 64


def prob_levels(top_k: int, mean_kl: float = DESIGN_MEAN_KL) -> int:
    """L, the sqrt-probability levels whose rounding costs about `mean_kl` of mean KL at this K.

    Rounding sqrt(p) to a step e = 1/L adds an error uniform in [-e/2, e/2] to each of the K entries;
    KL(p || q) ~ 2 sum (sqrt p - sqrt q)^2 = 2 K e^2 / 12, so L = sqrt(K / (6 mean_kl)).
    """
    if top_k < 1 or not mean_kl > 0:
        raise ValueError(f"top_k must be >= 1 and mean_kl > 0, got {top_k}, {mean_kl}")
    return min(MAX_LEVELS, max(2, math.ceil(math.sqrt(top_k / (6.0 * mean_kl)))))


def log_topk_mass(tail_logprob: np.ndarray) -> np.ndarray:
    """ln s = ln(1 - exp(tail_logprob)) in float64: the log of the top-K mass that a stored tail gives (0 for -inf)."""
    tail = np.asarray(tail_logprob, dtype=np.float64)
    # a tail of 0 gives -inf and a positive one NaN: the callers refuse both
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(-np.expm1(tail))


def prob_codes(logprobs: np.ndarray, log_mass: np.ndarray, levels: int) -> np.ndarray:
    """Log-probs (each <= 0 or -inf) -> codes c = round(L sqrt(p / s)) in [1, L], 0 where p = 0.

    log_mass: ln s (log_topk_mass of the row's stored tail), broadcastable to logprobs. Integers (int32 below
    2^15 columns, else int64). A writer checking a value against a stored entry (a target's log-prob against
    its top-K entry) compares codes: a value and its own entry agree within one code.
    """
    if not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be in [2, {MAX_LEVELS}], got {levels}")
    lp = np.asarray(logprobs)
    if not np.all(lp <= 0.0):  # NaN fails this too
        raise ValueError("logprobs must be <= 0 (no NaN)")
    log_mass = np.asarray(log_mass, dtype=np.float64)
    if np.any(np.isnan(log_mass) | (log_mass == -np.inf)):
        raise ValueError("the top-K mass must be > 0: a tail_logprob of 0 (or NaN) leaves the top K nothing")
    codes = np.empty(np.broadcast_shapes(lp.shape, log_mass.shape), dtype=np.float64)  # an array even for one value
    np.subtract(lp, log_mass, out=codes)
    codes *= 0.5
    np.exp(codes, out=codes)  # sqrt(p / s)
    codes *= levels
    np.rint(codes, out=codes)
    np.clip(codes, 1.0, levels, out=codes)  # p > 0 never becomes 0; p / s > 1 (a tail off by rounding) stays L ...
    zero = np.broadcast_to(np.isneginf(lp), codes.shape)
    if zero.any():
        codes[zero] = 0.0  # ... and p = 0 stays 0
    return codes.astype(_sum_dtype(codes.shape[-1] if codes.ndim else 1))


def encode_prob_steps(logprobs: np.ndarray, tail_logprob: np.ndarray, levels: int) -> np.ndarray:
    """(T, K) log-probs, non-increasing along K, each <= 0 or -inf, and each row's stored (T,) tail_logprob
    -> (T, K) uint16 steps d_r = c_{r-1} - c_r."""
    lp = np.asarray(logprobs)
    if lp.ndim != 2 or np.shape(tail_logprob) != lp.shape[:1]:
        raise ValueError(f"logprobs must be (T, K) and tail_logprob (T,), got {lp.shape} and {np.shape(tail_logprob)}")
    codes = prob_codes(lp, log_topk_mass(tail_logprob)[:, None], levels)  # (T, K)
    steps = np.empty_like(codes)  # (T, K) c_{r-1} - c_r, c_0 = L
    np.subtract(levels, codes[:, :1], out=steps[:, :1])
    np.subtract(codes[:, :-1], codes[:, 1:], out=steps[:, 1:])
    if steps.size and steps.min() < 0:
        row = int(np.argwhere(steps < 0)[0][0])
        raise ValueError(f"logprobs row {row} is not sorted most likely first")
    return steps.astype(PROB_STEP_DTYPE)


def _sum_dtype(top_k: int) -> np.dtype:
    """int32 holds any sum of K uint16 steps while K < 2^15 (and is several times faster to sum than int64)."""
    return np.dtype(np.int32) if top_k < 2**15 else np.dtype(np.int64)


@functools.lru_cache(maxsize=8)
def _logprob_table(levels: int) -> np.ndarray:
    """2 ln(c / L) for c = 0..L (entry 0: -inf), the value of each code, in float32."""
    with np.errstate(divide="ignore"):
        table = (2.0 * np.log(np.arange(levels + 1, dtype=np.float64) / levels)).astype(np.float32)
    table.flags.writeable = False
    return table


def decode_prob_codes(steps: np.ndarray, levels: int, first_row: int = 0) -> np.ndarray:
    """(T, K) steps -> (T, K) codes c_r = L - (d_1 + ... + d_r), non-increasing along K; refuses a row whose
    steps sum past L (no such code), naming it as first_row + its index."""
    if not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be in [2, {MAX_LEVELS}], got {levels}")
    steps = np.asarray(steps)
    if steps.ndim != 2:
        raise ValueError(f"steps must be (T, K), got shape {steps.shape}")
    codes = np.cumsum(steps, axis=1, dtype=_sum_dtype(steps.shape[1]))  # (T, K) L - c_r
    np.subtract(levels, codes, out=codes)
    if codes.size and codes[:, -1].min() < 0:  # non-increasing along K, so the last column is the row's least
        row = int(np.argmax(codes[:, -1] < 0))
        raise ValueError(f"row {first_row + row}: its steps sum to {levels - int(codes[row, -1])}, more than the "
                         f"{levels} levels")
    return codes


def _checked_log_mass(tail_logprob: np.ndarray, num_rows: int, first_row: int = 0) -> np.ndarray:
    if np.shape(tail_logprob) != (num_rows,):
        raise ValueError(f"tail_logprob must be ({num_rows},), got {np.shape(tail_logprob)}")
    log_mass = log_topk_mass(tail_logprob)  # (T,)
    bad = np.isnan(log_mass) | (log_mass == -np.inf)
    if bad.any():
        raise ValueError(f"row {first_row + int(np.argmax(bad))}: its tail_logprob leaves the top K no mass")
    return log_mass


def codes_to_logprobs(codes: np.ndarray, tail_logprob: np.ndarray, levels: int, dtype=np.float32,
                      first_row: int = 0) -> np.ndarray:
    """(T, K) codes in [0, L] and the rows' stored (T,) tail_logprob -> (T, K) log-probs 2 ln(c / L) + ln s.

    Refuses a tail that leaves the top K no mass, naming its row as first_row + its index."""
    log_mass = _checked_log_mass(tail_logprob, len(codes), first_row)
    wide = np.promote_types(dtype, np.float32)
    out = np.take(_logprob_table(levels), codes).astype(wide, copy=False)  # (T, K)
    out += log_mass.astype(wide)[:, None]
    return out.astype(dtype, copy=False)


def decode_prob_steps(steps: np.ndarray, tail_logprob: np.ndarray, levels: int, dtype=np.float32) -> np.ndarray:
    """(T, K) steps and the rows' stored (T,) tail_logprob -> (T, K) log-probs in `dtype` (float16 or wider).

    Refuses rows whose steps sum past L (no such code) and tails that leave the top K no mass.
    """
    return codes_to_logprobs(decode_prob_codes(steps, levels), tail_logprob, levels, dtype)


def code_bounds(codes: np.ndarray, log_mass: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The log-probs that prob_codes maps to each code: [low, high] in float64 (log_mass broadcastable to codes).

    Code 0 stands for -inf only; code 1 for everything below ln s + 2 ln(1.5 / L) (low = -inf); code L for
    everything above ln s + 2 ln((L - 0.5) / L) (high = +inf: a p / s above 1 is clamped to L). A writer or
    reader checks a value that should belong to a stored entry (the target's log-prob) against these bounds.
    """
    c = np.asarray(codes, dtype=np.float64)
    log_mass = np.asarray(log_mass, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(c <= 1, -np.inf, 2.0 * np.log((c - 0.5) / levels) + log_mass)
        high = np.where(c >= levels, np.inf, 2.0 * np.log((c + 0.5) / levels) + log_mass)
    high = np.where(c == 0, -np.inf, high)
    return low, high


def id_table_size(rows: int, top_k: int, vocab_size: int) -> int:
    """N, the table entries of a chunk of `rows` rows of K ids (one per ENTRIES_PER_TABLE_ID entries, <= V)."""
    return max(1, min(vocab_size, rows * top_k // ENTRIES_PER_TABLE_ID))


def encode_id_chunk(ids: np.ndarray, vocab_size: int, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's (n, K) ids < V -> (codes (n, K), table (N,)), both in ids' dtype.

    The table holds the N ids most frequent in the chunk, most frequent first (ties: smaller id first;
    ids absent from the chunk fill it when it has fewer than N distinct ids).
    """
    ids = np.asarray(ids)
    if not 1 <= table_size <= vocab_size:
        raise ValueError(f"table_size must be in [1, {vocab_size}], got {table_size}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must be in [0, {vocab_size})")
    counts = np.bincount(ids.ravel(), minlength=vocab_size)  # (V,)
    table = np.argsort(-counts, kind="stable")[:table_size]  # (N,)
    code_of = np.arange(vocab_size, dtype=np.int64)  # id -> code, the inverse of id_permutation(table)
    code_of[table] = np.arange(table_size)
    displaced, slots = _swapped(table, vocab_size)
    code_of[displaced] = slots
    return code_of[ids].astype(ids.dtype), table.astype(ids.dtype)


def _swapped(table: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids below N that the table lacks (ascending), and the codes they take: the table's ids >= N (ascending)."""
    n = len(table)
    present = np.zeros(n, dtype=bool)
    present[table[table < n]] = True
    return np.flatnonzero(~present), np.sort(table[table >= n]).astype(np.int64)


def id_permutation(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """(V,) code -> id for a chunk's table; refuses a table that is not N distinct ids < V."""
    table = np.asarray(table).astype(np.int64)
    if table.ndim != 1 or not 1 <= len(table) <= vocab_size:
        raise ValueError(f"an id table must be 1 to {vocab_size} ids, got shape {table.shape}")
    if table.min() < 0 or table.max() >= vocab_size:
        raise ValueError(f"an id table holds an id outside [0, {vocab_size})")
    if len(np.unique(table)) != len(table):
        raise ValueError("an id table repeats an id")
    perm = np.arange(vocab_size, dtype=np.int64)
    perm[: len(table)] = table
    displaced, slots = _swapped(table, vocab_size)
    perm[slots] = displaced
    return perm


def encode_id_rows(ids: np.ndarray, chunk_rows: int, vocab_size: int, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, K) ids of whole chunks of chunk_rows rows (the last may be short) -> (codes (T, K), tables (C, N))."""
    ids = np.asarray(ids)
    parts = [encode_id_chunk(ids[a:a + chunk_rows], vocab_size, table_size) for a in range(0, len(ids), chunk_rows)]
    if not parts:
        return ids.copy(), np.zeros((0, table_size), dtype=ids.dtype)
    return np.concatenate([c for c, _ in parts]), np.stack([t for _, t in parts])


def decode_id_rows(codes: np.ndarray, tables: np.ndarray, first_row: int, chunk_rows: int,
                   vocab_size: int) -> np.ndarray:
    """Rows [first_row, first_row + n) of (n, K) codes -> ids, in the codes' dtype.

    tables: (C, N), the tables of the chunks those rows touch, the first being chunk first_row // chunk_rows.
    Refuses codes >= V and tables that are not permutations' heads (id_permutation).
    """
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= vocab_size):
        row = first_row + int(np.argmax(((codes < 0) | (codes >= vocab_size)).any(axis=-1)))
        raise ValueError(f"row {row}: a code is outside [0, {vocab_size})")
    out = np.empty(codes.shape, dtype=codes.dtype)
    first_chunk = first_row // chunk_rows
    start = 0
    while start < len(codes):
        chunk = (first_row + start) // chunk_rows
        stop = min(len(codes), (chunk + 1) * chunk_rows - first_row)
        if chunk - first_chunk >= len(tables):
            raise ValueError(f"rows from {first_row + start} need the table of chunk {chunk}, which was not given")
        try:
            perm = id_permutation(tables[chunk - first_chunk], vocab_size).astype(codes.dtype)  # (V,) code -> id
        except ValueError as exc:
            raise ValueError(f"the table of chunk {chunk} (rows from {chunk * chunk_rows}): {exc}") from None
        np.take(perm, codes[start:stop], out=out[start:stop])
        start = stop
    return out


def encode_topk_rows(ids: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray, *, chunk_rows: int,
                     vocab_size: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A writer's one call: rows of whole chunks -> (id codes (T, K), id tables (C, N), prob steps (T, K) uint16).

    ids (T, K) < V, logprobs (T, K) sorted most likely first, tail_logprob (T,) as stored (float16). chunk_rows:
    the rows per chunk of the stored arrays (the shard's chunk rows, or all its rows when it has fewer): it
    sets N = id_table_size(chunk_rows, K, V) for every chunk, the last, shorter one included.
    """
    ids = np.asarray(ids)
    table_size = id_table_size(chunk_rows, ids.shape[1], vocab_size)
    codes, tables = encode_id_rows(ids, chunk_rows, vocab_size, table_size)
    return codes, tables, encode_prob_steps(logprobs, tail_logprob, levels)


def decode_topk_rows(codes: np.ndarray, tables: np.ndarray, steps: np.ndarray, tail_logprob: np.ndarray, *,
                     first_row: int, chunk_rows: int, vocab_size: int, levels: int,
                     dtype=np.float16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reader's one call: rows [first_row, first_row + n) -> (ids (n, K), log-probs (n, K) in dtype, prob codes).

    tables: the rows of the id table for the chunks these rows touch (from first_row // chunk_rows on);
    tail_logprob: the rows' stored tail. The prob codes (n, K) serve the target-agrees-with-topk rule
    (code_bounds). Refuses (ValueError) what no writer stores: codes >= V, tables that are not distinct
    ids < V, steps summing past L, tails that leave the top K no mass.
    """
    ids = decode_id_rows(codes, tables, first_row, chunk_rows, vocab_size)
    prob = decode_prob_codes(steps, levels, first_row)
    return ids, codes_to_logprobs(prob, tail_logprob, levels, dtype, first_row), prob
