"""Names, version, dtypes and errors of the kdcache on-disk format (normative text: storage_layout.md).

This module is the single place that spells the layout's fixed names. It knows nothing about models,
tokenizers, torch or training: only paths, array names, dtypes and the rules that tie them together.
"""

from __future__ import annotations

import re

import numpy as np

from shared.errors import UserError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 3  # storage_layout.md 11: 3 = top-K rows as id codes + tables and sqrt-probability steps

MANIFEST_FILE = "manifest.json"  # written last; its presence means "complete"
BUILD_FILE = "build.json"  # the build's intent (header, plan), written first; lets a rerun resume
SHARDS_DIR = "shards"
META_DIR = "meta"
LOCKS_DIR = "locks"
OWNER_FILE = "owner.json"  # the marker a cache root gets when kdcache creates it (written before anything else)
COMMIT_FILE = "commit.json"  # inside a shard's group, written after every other object of that shard

SHARD_NAME_RE = re.compile(r"^shard-[0-9]{5,}$")
OBJECT_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

# A log-probability is never positive, so +1.0 cannot be confused with a real value. It marks the
# last row of every sequence in `target_logprob`, where there is no "actual next token".
TARGET_SENTINEL = 1.0

# Tolerance for log-probs slightly above 0 after rounding (log_softmax of a near-one-hot row).
LOGPROB_MAX = 1e-3

# Limits that keep hostile or damaged metadata from making a reader allocate absurd amounts of memory
# (storage_layout.md 3.1 and 6.3). A real cache is far below both.
MAX_CHUNK_BYTES = 2**30  # decoded size of one Zarr chunk
MAX_SHARD_SEQUENCES = 2**24  # sequences in one shard (offsets and the meta table are read whole)

# The most bytes read whole from one object of a cache root, by kind (storage_layout.md 8): a size is
# checked before anything is read, so a FIFO, /dev/zero or a huge file never fills memory.
MAX_MANIFEST_BYTES = 512 * 2**20
MAX_BOOKKEEPING_BYTES = 64 * 2**20  # build.json, commit.json, lock files, owner.json
MAX_OBJECT_BYTES = 2 * MAX_CHUNK_BYTES  # any other object: a chunk (<= 1 GiB decoded) or a meta Parquet file

# The meta Parquet file (storage_layout.md 4): a reader decodes only META_COLUMNS, and only after
# checking, from the footer and from every page header of those columns, that they decode to at most
# META_BYTES_PER_SEQUENCE bytes per sequence plus META_BYTES_FIXED (a real file: about 90 bytes per
# sequence plus 1 KB). A text_sha256 value is a sha256 in hex: at most MAX_TEXT_SHA256_CHARS characters.
META_BYTES_PER_SEQUENCE = 256
META_BYTES_FIXED = 64 * 2**10
MAX_TEXT_SHA256_CHARS = 64

# A row's top-K probabilities may sum to at most this as a reader decodes them (storage_layout.md 3): the
# sqrt-probability steps of section 3.1 move a top-K sum s by at most s (sqrt(K) / L + K / (4 L^2)), 0.005 at the
# writer's L, and the float16 values a reader hands out add about 2^-11 of s |ln s|. A writer refuses a row above
# it; a shard's topk_mass_sum is at most this times num_tokens.
MAX_TOPK_MASS = 1.02

# The largest vocabulary a reader accepts (storage_layout.md 6.2): decoding id codes makes a (V,) permutation
# per chunk (shared.topk_codec), so V is bounded before anything of that size is allocated (128 MiB at most).
MAX_VOCAB_SIZE = 2**24

LOGPROB_DTYPE = np.dtype("float16")
OFFSETS_DTYPE = np.dtype("int64")
MASK_DTYPE = np.dtype("bool")

# name -> number of dimensions; the dtype of the id arrays depends on the vocabulary size.
ARRAY_NDIM = {
    "input_ids": 1,
    "offsets": 1,
    "loss_mask": 1,
    "topk_id_codes": 2,
    "topk_id_table": 2,
    "topk_prob_steps": 2,
    "target_logprob": 1,
    "tail_logprob": 1,
}
# The fields a reader returns per row: the stored 1-D arrays, and topk_ids / topk_logprobs decoded from the
# stored TOPK_ARRAYS (storage_layout.md 3.1).
ROW_ARRAYS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")
TOPK_ARRAYS = ("topk_id_codes", "topk_id_table", "topk_prob_steps")
# What a reader reads to return each decoded field: ids need their codes and the chunks' tables, log-probs their
# steps and the rows' tail (ln s, the top-K mass, scales them).
DECODED_FROM = {"topk_ids": ("topk_id_codes", "topk_id_table"), "topk_logprobs": ("topk_prob_steps", "tail_logprob")}
PROB_STEP_DTYPE = np.dtype("uint16")

# The `tail_samples` extension (storage_layout.md 3.3): M ids drawn from the teacher's distribution
# outside the top K, stored as the distinct ids with their counts. Present exactly when
# settings.tail_samples = M >= 1; the manifest then lists the extension as must_understand.
TAIL_SAMPLES_EXTENSION = "tail_samples"
TAIL_ARRAYS = ("tail_ids", "tail_counts")
COUNT_DTYPE = np.dtype("uint8")
MAX_TAIL_SAMPLES = int(np.iinfo(COUNT_DTYPE).max)  # a count never exceeds M, and M fits a count
ARRAY_NDIM.update({"tail_ids": 2, "tail_counts": 2})

# Columns every meta/shard-NNNNN.parquet file MUST have, with their Arrow types.
META_COLUMNS = {
    "sequence_index": "int64",  # index of the sequence inside its shard
    "source_index": "int64",  # row of the source data set it came from
    "window_index": "int32",  # which --max-length window of that row (0 for a single window)
    "sample_index": "int32",  # which generated sample (generate mode), else 0
    "num_tokens": "int64",
    "prompt_length": "int64",  # tokens before the first distilled row's next token (0 for plain text)
    "num_loss_tokens": "int64",
    "text_sha256": "string",  # sha256 of the source text (prompt + response fields) this row came from
}


class CacheError(UserError):
    """Base class of every error about a cache; the message says what is wrong and how to fix it."""


class CacheFormatError(CacheError):
    """The manifest or an array does not follow storage_layout.md (unknown version, field, bad type)."""


class CacheIdentityError(CacheFormatError):
    """A manifest whose header does not give its cache_key, or whose seal does not hold (shared.identity).

    `sections` holds its four header sections and `cache_key` the key it claims, so that a caller with a
    reference header (build.json, the build it wanted) can name the fields that differ.
    """

    def __init__(self, message: str, sections: dict, cache_key: str):
        super().__init__(message)
        self.sections = sections
        self.cache_key = cache_key


class IncompleteCacheError(CacheError):
    """No manifest.json: the build has not finished (or was killed)."""


class CacheCorruptError(CacheError):
    """A stored object is missing, truncated or its checksum does not match; names shard and object."""

    def __init__(self, message: str, problems: list[tuple[str, str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class CacheMismatchError(CacheError):
    """A build was started against a directory that holds a different build."""


class CacheLockedError(CacheError):
    """Another live process holds this cache (or this worker's part of it)."""


class UnsafePathError(CacheError):
    """A path inside a cache root is a symbolic link, a FIFO, a device or a folder where a file belongs.

    kdcache never reads, writes or deletes through a link inside a cache root, and opens regular files only.
    """


def shard_name(index: int) -> str:
    """Zero-padded, sortable shard name: shard_name(3) == 'shard-00003'."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}"


def shard_path(index: int) -> str:
    return f"{SHARDS_DIR}/{shard_name(index)}"


def meta_path(index: int) -> str:
    return f"{META_DIR}/{shard_name(index)}.parquet"


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id of a vocabulary of this size."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def tail_samples_of(settings: dict) -> int:
    """settings.tail_samples (0 when absent: a cache without the extension); refuses anything else."""
    m = settings.get("tail_samples", 0)
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= MAX_TAIL_SAMPLES:
        raise CacheFormatError(f"settings.tail_samples must be an integer in [0, {MAX_TAIL_SAMPLES}], got {m!r:.40}")
    return m


def max_chunk_rows(top_k: int, vocab_size: int, tail_samples: int = 0) -> int:
    """The most rows a chunk of every row array may hold: chunk_rows x max(K, M) x itemsize <= MAX_CHUNK_BYTES."""
    width = max(top_k, tail_samples, 1)
    itemsize = max(id_dtype(vocab_size).itemsize, LOGPROB_DTYPE.itemsize)
    return max(1, MAX_CHUNK_BYTES // (width * itemsize))


def chunk_rows_of(settings: dict, top_k: int, vocab_size: int) -> int | None:
    """settings.chunk_rows (None when absent); refuses anything but an integer in [1, max_chunk_rows].

    Readers use it to group sequences by chunk (a trainer divides row indices by it), so a fraction,
    a string, 0 or a negative number is refused here for every reader, naming the setting.
    """
    if "chunk_rows" not in settings:
        return None
    value = settings["chunk_rows"]
    top = max_chunk_rows(top_k, vocab_size, tail_samples_of(settings))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
        raise CacheFormatError(f"settings.chunk_rows (rows per Zarr chunk) must be an integer in [1, {top:,}] for "
                               f"top_k {top_k} and a vocabulary of {vocab_size}, got {value!r:.40}")
    return value


def row_arrays(tail_samples: int) -> tuple[str, ...]:
    """The fields a reader returns per row: ROW_ARRAYS, plus TAIL_ARRAYS when tail_samples >= 1."""
    return ROW_ARRAYS + TAIL_ARRAYS if tail_samples else ROW_ARRAYS


def row_width(name: str, top_k: int, tail_samples: int) -> int | None:
    """Second dimension of a (T, ...) row array (K for top-K arrays, M for tail arrays); None for 1-D ones."""
    if ARRAY_NDIM[name] == 1:
        return None
    return tail_samples if name in TAIL_ARRAYS else top_k


def array_dtypes(vocab_size: int, tail_samples: int = 0) -> dict[str, str]:
    """The dtype of every shard array for a given vocabulary size (recorded in the manifest)."""
    ids = id_dtype(vocab_size).name
    base = {
        "input_ids": ids,
        "offsets": OFFSETS_DTYPE.name,
        "loss_mask": MASK_DTYPE.name,
        "topk_id_codes": ids,
        "topk_id_table": ids,
        "topk_prob_steps": PROB_STEP_DTYPE.name,
        "target_logprob": LOGPROB_DTYPE.name,
        "tail_logprob": LOGPROB_DTYPE.name,
    }
    return base | {"tail_ids": ids, "tail_counts": COUNT_DTYPE.name} if tail_samples else base


def check_object_key(key: str) -> str:
    """Refuse object keys that are absolute, contain '..', a scheme, or odd characters."""
    if not isinstance(key, str) or not key:
        raise CacheFormatError(f"object key must be a non-empty string, got {key!r}")
    if "://" in key or key.startswith("/") or "\\" in key:
        raise CacheFormatError(f"object key {key!r} is absolute or a URL; keys must be relative to the cache")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise CacheFormatError(f"object key {key!r} leaves the cache or has empty parts ('..', '.', '//')")
    if not OBJECT_KEY_RE.match(key):
        raise CacheFormatError(f"object key {key!r} has characters outside [A-Za-z0-9._-/]")
    return key
