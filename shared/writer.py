"""CacheWriter: write shards so that a reader or a resumed writer never sees half of one.

The commit protocol (storage_layout.md, "Commit protocol"):
  1. `build.json` (the build's header and plan) is written once, first. A rerun compares against it
     and resumes; a different build against the same directory is refused.
  2. A shard's arrays and its meta parquet are written object by object, each object atomically.
  3. `shards/shard-NNNNN/commit.json` (counts + sha256 of every object) is written last for that
     shard: a shard without it does not exist, and a resumed writer deletes its leftovers.
  4. `manifest.json` is written last of all, once every planned shard has a commit file.
A complete cache is never modified and a committed shard never rewritten (checked before a shard's
leftovers are deleted). Builders of one cache running together hold per-worker locks and must use
the same worker split; one of another split is refused while they run (storage_layout.md 5).

The writer validates every array before anything of the shard is written (shapes, dtypes, id
ranges, NaN/+inf, ordering), so a model that emits NaN never produces a committed shard.

Knows the format and numpy; nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from shared.format import (
    BUILD_FILE,
    COMMIT_FILE,
    COUNT_DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCKS_DIR,
    LOGPROB_DTYPE,
    LOGPROB_MAX,
    MANIFEST_FILE,
    MAX_BOOKKEEPING_BYTES,
    MAX_CHUNK_BYTES,
    MAX_SHARD_SEQUENCES,
    MAX_TEXT_SHA256_CHARS,
    MAX_TOPK_MASS,
    META_COLUMNS,
    SHARDS_DIR,
    TAIL_SAMPLES_EXTENSION,
    TARGET_SENTINEL,
    CacheError,
    CacheFormatError,
    CacheLockedError,
    CacheMismatchError,
    array_dtypes,
    chunk_rows_of,
    id_dtype,
    max_chunk_rows,
    meta_path,
    shard_name,
    shard_path,
    tail_samples_of,
)
from shared.manifest import (
    SECTION_KEYS,
    Manifest,
    ObjectInfo,
    ShardEntry,
    compute_cache_key,
    make_totals,
    parse_manifest,
    parse_shard,
)
from shared.ownership import claim_root, remove_build
from shared.store import Store, open_store

TOOL_VERSION = "0.1.0"
LOCK_NAME_RE = re.compile(r"^worker-([0-9]+)-of-([0-9]+)\.json$")  # locks/worker-IIIII-of-NNNNN.json
DEFAULT_CHUNK_ROWS = 8192
# Blosc with zstd at its highest level and byte shuffle: measured in BENCHMARKS.md (P4) against other
# levels and shuffles. Compression runs on the background writer thread, never in the teacher's way.
BLOSC = {"cname": "zstd", "clevel": 9, "shuffle": "shuffle"}
# topk_logprobs: ranks 1..EXACT_RANKS keep every float16 bit; lower ranks are rounded to
# TRIMMED_MANTISSA_BITS mantissa bits (relative error <= 2^-8 of the log-prob), which zstd then
# packs much better (storage_layout.md 3.1; BENCHMARKS.md P4).
EXACT_RANKS = 16
TRIMMED_MANTISSA_BITS = 7


def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round float16 values to `keep_bits` of their 10 mantissa bits (round half to even)."""
    x = np.ascontiguousarray(values, dtype=np.float16)
    drop = 10 - keep_bits
    if drop <= 0:
        return x
    bits = x.view(np.uint16).astype(np.uint32)
    finite = np.isfinite(x)
    half = 1 << (drop - 1)
    rounded = ((bits + half - 1 + ((bits >> drop) & 1)) >> drop) << drop
    out = np.where(finite, rounded, bits).astype(np.uint16).view(np.float16)
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BuildHeader:
    """What a build is: the four descriptive sections of the manifest and the shard plan."""

    teacher: dict
    tokenizer: dict
    dataset: dict
    settings: dict
    num_shards: int
    created_at: str = field(default_factory=utc_now)
    tool_version: str = TOOL_VERSION

    def __post_init__(self):
        for section, keys in SECTION_KEYS.items():
            value = getattr(self, section)
            missing = [k for k in keys if k not in value]
            if missing:
                raise CacheFormatError(f"build header: {section} is missing {missing}")
        tail_samples_of(self.settings)
        if isinstance(self.settings["top_k"], int) and isinstance(self.tokenizer["vocab_size"], int):
            chunk_rows_of(self.settings, self.settings["top_k"], self.tokenizer["vocab_size"])  # readers refuse others
        if self.num_shards < 1:
            raise CacheError(
                "the data set produced no sequences to cache (0 shards planned); check --dataset, "
                "--split, the text/prompt/response fields and --limit"
            )

    @property
    def cache_key(self) -> str:
        return compute_cache_key(self.teacher, self.tokenizer, self.dataset, self.settings)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "tool_version": self.tool_version,
            "cache_key": self.cache_key,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "dataset": self.dataset,
            "settings": self.settings,
            "plan": {"num_shards": self.num_shards},
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> BuildHeader:
        """Parse build.json; a damaged one is a CacheFormatError naming it, never a bare ValueError."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CacheFormatError(f"{BUILD_FILE} is not valid JSON ({exc}); it was damaged after it was written. "
                                   "Rerun with --overwrite to start the build again, or choose another --out") from exc
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: dict) -> BuildHeader:
        try:
            return cls(
                teacher=obj["teacher"],
                tokenizer=obj["tokenizer"],
                dataset=obj["dataset"],
                settings=obj["settings"],
                num_shards=int(obj["plan"]["num_shards"]),
                created_at=obj["created_at"],
                tool_version=obj["tool_version"],
            )
        except (KeyError, TypeError, ValueError, CacheError) as exc:
            raise CacheFormatError(f"{BUILD_FILE} is malformed ({exc!r}); delete the directory or use --overwrite") from exc


def header_differences(old: BuildHeader, new: BuildHeader) -> list[str]:
    """Human-readable 'section.key: old -> new' for every setting that differs."""
    diffs = []
    for section in ("teacher", "tokenizer", "dataset", "settings"):
        a, b = getattr(old, section), getattr(new, section)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r:.60} -> {b.get(key)!r:.60}")
    if old.num_shards != new.num_shards:
        diffs.append(f"plan.num_shards: {old.num_shards} -> {new.num_shards}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Shard contents


@dataclass
class ShardBuffer:
    """Sequences of one shard gathered in memory before they are validated and written."""

    index: int
    _rows: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in (
        "input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")})
    meta: list[dict] = field(default_factory=list)

    def add_sequence(self, *, input_ids, loss_mask, topk_ids, topk_logprobs, target_logprob, tail_logprob,
                     tail_ids=None, tail_counts=None, **meta):
        """Append one sequence. Row t of every array describes the token at t+1 (see storage_layout.md).

        tail_ids / tail_counts (T, M): the tail samples of storage_layout.md 3.3, for a build with
        settings.tail_samples = M; every sequence of a shard has them or none does.
        """
        n = len(input_ids)
        if (tail_ids is None) != (tail_counts is None):
            raise CacheFormatError(f"sequence {len(self.meta)} of shard {self.index}: tail_ids and tail_counts go together")
        if self.meta and (tail_ids is not None) != ("tail_ids" in self._rows):
            raise CacheFormatError(f"sequence {len(self.meta)} of shard {self.index}: every sequence of a shard has "
                                   "tail samples or none does")
        arrays = {
            "input_ids": np.asarray(input_ids),
            "loss_mask": np.asarray(loss_mask, dtype=bool),
            "topk_ids": np.asarray(topk_ids),
            "topk_logprobs": np.asarray(topk_logprobs),
            "target_logprob": np.asarray(target_logprob, dtype=np.float32),
            "tail_logprob": np.asarray(tail_logprob, dtype=np.float32),
        }
        if tail_ids is not None:
            arrays.update(tail_ids=np.asarray(tail_ids), tail_counts=np.asarray(tail_counts))
            for name in ("tail_ids", "tail_counts"):
                self._rows.setdefault(name, [])
        for name, arr in arrays.items():
            if arr.shape[:1] != (n,):
                raise CacheFormatError(f"sequence {len(self.meta)} of shard {self.index}: {name} has {arr.shape[:1]} rows, input_ids has {n}")
            self._rows[name].append(arr)
        meta = dict(meta)
        meta.setdefault("num_tokens", n)
        meta.setdefault("num_loss_tokens", int(arrays["loss_mask"].sum()))
        self.meta.append(meta)

    @property
    def num_sequences(self) -> int:
        return len(self.meta)

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self._rows["input_ids"])

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.meta:
            raise CacheError(f"shard {self.index} has no sequences; a shard holds at least one")
        out = {k: np.concatenate(v) for k, v in self._rows.items()}
        lengths = [len(a) for a in self._rows["input_ids"]]
        out["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return out


def validate_shard_arrays(arrays: dict[str, np.ndarray], *, vocab_size: int, top_k: int, where: str,
                          tail_samples: int = 0) -> dict[str, np.ndarray]:
    """Check every invariant of storage_layout.md and cast to the stored dtypes."""
    dtypes = array_dtypes(vocab_size, tail_samples)
    if tail_samples and not {"tail_ids", "tail_counts"} <= set(arrays):
        raise CacheFormatError(f"{where}: the build stores {tail_samples} tail samples per row (settings.tail_samples) "
                               "but the shard has no tail_ids / tail_counts")
    if not tail_samples and {"tail_ids", "tail_counts"} & set(arrays):
        raise CacheFormatError(f"{where}: the shard has tail samples but the build's settings.tail_samples is 0")
    offsets = np.asarray(arrays["offsets"])
    num_rows = len(arrays["input_ids"])
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_rows or np.any(np.diff(offsets) < 1):
        raise CacheFormatError(f"{where}: offsets must start at 0, grow strictly and end at {num_rows}")
    for name in ("input_ids", "loss_mask", "target_logprob", "tail_logprob"):
        if arrays[name].shape != (num_rows,):
            raise CacheFormatError(f"{where}: {name} has shape {arrays[name].shape}, expected ({num_rows},)")
    for name in ("topk_ids", "topk_logprobs"):
        if arrays[name].shape != (num_rows, top_k):
            raise CacheFormatError(f"{where}: {name} has shape {arrays[name].shape}, expected ({num_rows}, {top_k})")
    for name in ("input_ids", "topk_ids"):
        a = arrays[name]
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            raise CacheFormatError(f"{where}: {name} holds ids outside [0, {vocab_size}) (min {a.min()}, max {a.max()})")
    last_rows = offsets[1:] - 1
    out = {}
    for name in ("topk_logprobs", "target_logprob", "tail_logprob"):
        a = np.asarray(arrays[name], dtype=np.float32)
        check = a.copy()
        if name == "target_logprob":
            check[last_rows] = -1.0  # the sentinel rows are checked below
        bad = np.isnan(check) | (check > LOGPROB_MAX)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise CacheFormatError(
                f"{where}: {name} has {int(bad.sum())} NaN or positive values (first at row {row}: {check.flat[np.flatnonzero(bad)[0]]}); "
                "the model produced non-finite log-probs, the shard is not committed. Try --dtype float32."
            )
        a = np.minimum(a, 0.0) if name != "target_logprob" else a
        stored = a.astype(LOGPROB_DTYPE)
        if name == "topk_logprobs" and stored.shape[1] > EXACT_RANKS:
            stored[:, EXACT_RANKS:] = round_mantissa(stored[:, EXACT_RANKS:], TRIMMED_MANTISSA_BITS)
            # rounding is monotonic within the trimmed ranks; where it lifted one above the last exact
            # rank, clamp (a running minimum keeps the order most likely first)
            stored[:, EXACT_RANKS - 1:] = np.minimum.accumulate(stored[:, EXACT_RANKS - 1:], axis=1)
        if name == "target_logprob":
            stored[last_rows] = TARGET_SENTINEL
            mask = np.ones(num_rows, dtype=bool)
            mask[last_rows] = False
            stored[mask] = np.minimum(stored[mask], 0)
        out[name] = stored
    topk = out["topk_logprobs"].astype(np.float32)
    mass = np.exp(topk.astype(np.float64)).sum(axis=1)
    if np.any(mass > MAX_TOPK_MASS):  # rounding lifts a sum of 1 by less than 0.02 (storage_layout.md 3)
        row = int(np.argmax(mass > MAX_TOPK_MASS))
        raise CacheFormatError(f"{where}: topk_logprobs row {row} sums to probability {mass[row]:.4f} > {MAX_TOPK_MASS}; "
                               "they must be log-probabilities (log_softmax over the vocabulary), not logits")
    if top_k > 1 and np.any(topk[:, 1:] > topk[:, :-1]):
        row = int(np.argwhere(topk[:, 1:] > topk[:, :-1])[0][0])
        raise CacheFormatError(f"{where}: topk_logprobs row {row} is not sorted most likely first")
    out["input_ids"] = np.asarray(arrays["input_ids"]).astype(dtypes["input_ids"])
    out["topk_ids"] = np.asarray(arrays["topk_ids"]).astype(dtypes["topk_ids"])
    mask = np.asarray(arrays["loss_mask"]).astype(bool)
    if mask[last_rows].any():
        raise CacheFormatError(f"{where}: loss_mask is set on the last row of a sequence, which has no next token")
    out["loss_mask"] = mask
    out["offsets"] = offsets.astype(np.int64)
    if tail_samples:
        out["tail_ids"], out["tail_counts"] = _validate_tail_samples(
            arrays["tail_ids"], arrays["tail_counts"], out["topk_ids"], out["tail_logprob"], tail_samples, vocab_size,
            dtypes["tail_ids"], where)
    return out


def _validate_tail_samples(ids, counts, topk_ids, tail_logprob, m: int, vocab_size: int, id_type: str, where: str):
    """storage_layout.md 3.3: per row, the distinct ids drawn from the tail with their counts, most drawn first.

    Counts sum to M on a row whose tail holds mass, or to 0 (no draw: an empty tail); ids are < V and
    the row's K top-K ids and M tail ids are all distinct (unused slots, count 0, hold ids not otherwise
    in the row, so that a consumer can treat the K + M ids as one set of outcomes).
    """
    ids, counts = np.asarray(ids), np.asarray(counts)
    num_rows = len(topk_ids)
    for name, a in (("tail_ids", ids), ("tail_counts", counts)):
        if a.shape != (num_rows, m):
            raise CacheFormatError(f"{where}: {name} has shape {a.shape}, expected ({num_rows}, {m})")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise CacheFormatError(f"{where}: {name} must hold integers, got {a.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CacheFormatError(f"{where}: tail_ids holds ids outside [0, {vocab_size}) (min {ids.min()}, max {ids.max()})")
    if counts.size and (counts.min() < 0 or counts.max() > m):
        raise CacheFormatError(f"{where}: tail_counts must be in [0, {m}] (min {counts.min()}, max {counts.max()})")
    counts = counts.astype(np.int64)
    totals = counts.sum(1)
    empty_tail = np.isneginf(tail_logprob.astype(np.float32))
    bad = ~((totals == m) | (totals == 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise CacheFormatError(f"{where}: tail_counts row {row} sums to {int(totals[row])}; it must be {m} (0 when the "
                               "tail is empty)")
    bad = empty_tail & (totals != 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise CacheFormatError(f"{where}: tail_counts row {row} has {int(totals[row])} draws but its tail_logprob is "
                               "-inf; a row whose tail is empty has no draws")
    if m > 1 and np.any(counts[:, 1:] > counts[:, :-1]):
        raise CacheFormatError(f"{where}: tail_counts row {int(np.argwhere(counts[:, 1:] > counts[:, :-1])[0][0])} is "
                               "not sorted most drawn first")
    both = np.concatenate([topk_ids.astype(np.int64), ids.astype(np.int64)], axis=1)  # (T, K + M)
    both.sort(axis=1)
    dup = (both[:, 1:] == both[:, :-1]).any(1)
    if dup.any():
        raise CacheFormatError(f"{where}: tail_ids row {int(np.argmax(dup))} repeats an id or holds one of the row's "
                               "top-K ids; a row's K + M ids must be distinct (unused slots too)")
    return ids.astype(id_type), counts.astype(COUNT_DTYPE)


def encode_zarr_group(arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]:
    """Encode arrays as one Zarr v3 group in memory; returns {key inside the group: bytes}."""
    import zarr
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    group = zarr.open_group(store=mem, mode="w", zarr_format=3)
    for name, arr in arrays.items():
        _create_zarr_array(group, name, arr.shape, arr.dtype, chunk_rows)[...] = arr
    return {key: buf.to_bytes() for key, buf in sorted(mem._store_dict.items())}


# A shard streamed in pieces (a builder encoding chunks while its teacher runs) gets exactly the bytes of
# encode_zarr_group: encode_zarr_layout gives the metadata objects, encode_zarr_rows the chunks.
Shapes = dict  # {array name: (shape, dtype name)} of a whole shard


def zarr_chunk_shape(name: str, shape: tuple[int, ...], chunk_rows: int) -> tuple[int, ...]:
    """chunk_rows rows per chunk (all rows when the shard has fewer); offsets is one chunk."""
    rows = max(1, min(chunk_rows, shape[0])) if name != "offsets" else max(1, shape[0])
    return (rows, *shape[1:])


def _create_zarr_array(group, name: str, shape: tuple[int, ...], dtype, chunk_rows: int):
    from zarr.codecs import BloscCodec

    return group.create_array(name, shape=tuple(shape), chunks=zarr_chunk_shape(name, tuple(shape), chunk_rows),
                              dtype=dtype, compressors=BloscCodec(**BLOSC), fill_value=0)


def encode_zarr_layout(shapes: Shapes, chunk_rows: int) -> dict[str, bytes]:
    """The metadata objects (zarr.json) that encode_zarr_group writes for arrays of these shapes, no chunk."""
    import zarr
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    group = zarr.open_group(store=mem, mode="w", zarr_format=3)
    for name, (shape, dtype) in shapes.items():
        _create_zarr_array(group, name, shape, dtype, chunk_rows)
    return {key: buf.to_bytes() for key, buf in sorted(mem._store_dict.items())}


def encode_zarr_rows(rows: dict[str, np.ndarray], first_row: int, shapes: Shapes, chunk_rows: int) -> dict[str, bytes]:
    """The chunk objects holding rows [first_row, first_row + n) of each named array, byte for byte as
    encode_zarr_group stores them (a chunk of zeros only is not stored, as Zarr does).

    The rows are whole chunks: first_row is a multiple of the array's chunk rows, and first_row + n is one
    too or the array's end. Pure and picklable, so that builders call it in worker processes.
    """
    out = {}
    for name, arr in rows.items():
        shape, dtype = shapes[name]
        per_chunk = zarr_chunk_shape(name, tuple(shape), chunk_rows)[0]
        stop = first_row + len(arr)
        if first_row % per_chunk or (stop % per_chunk and stop != shape[0]) or stop > shape[0]:
            raise ValueError(f"{name}: rows [{first_row}, {stop}) of {shape[0]} are not whole chunks of {per_chunk} rows")
        mem, za = _rows_array(name, tuple(shape), str(np.dtype(dtype)), chunk_rows)
        za[first_row:stop] = arr
        for key in [k for k in mem._store_dict if k != f"{name}/zarr.json" and k != "zarr.json"]:
            out[key] = mem._store_dict.pop(key).to_bytes()
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=32)
def _rows_array(name: str, shape: tuple[int, ...], dtype: str, chunk_rows: int):
    """One in-memory Zarr array per (name, shape) for encode_zarr_rows; its chunks are popped after each call."""
    import zarr
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    return mem, _create_zarr_array(zarr.open_group(store=mem, mode="w", zarr_format=3), name, shape, dtype, chunk_rows)


def encode_meta(rows: list[dict], offsets: np.ndarray) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        row = {"sequence_index": i, "window_index": 0, "sample_index": 0, "prompt_length": 0, "text_sha256": "", **row}
        for key in set(columns) | set(row):
            columns.setdefault(key, [None] * i).append(row.get(key))
    lengths = np.diff(offsets)
    if columns["num_tokens"] != [int(x) for x in lengths]:
        raise CacheFormatError("meta rows' num_tokens do not match the sequences' lengths")
    missing = [c for c in META_COLUMNS if c not in columns]
    if missing:
        raise CacheFormatError(f"meta rows lack mandatory columns {missing}")
    long = [i for i, v in enumerate(columns["text_sha256"]) if not isinstance(v, str) or len(v) > MAX_TEXT_SHA256_CHARS]
    if long:
        raise CacheFormatError(f"meta row {long[0]}: text_sha256 must be a string of at most {MAX_TEXT_SHA256_CHARS} "
                               f"characters (a sha256 in hex), got {columns['text_sha256'][long[0]]!r:.80}")
    fields = []
    for name in sorted(columns, key=lambda c: (c not in META_COLUMNS, list(META_COLUMNS).index(c) if c in META_COLUMNS else 0, c)):
        type_ = getattr(pa, META_COLUMNS[name])() if name in META_COLUMNS else None
        fields.append(pa.array(columns[name], type=type_) if type_ else pa.array(columns[name]))
    names = sorted(columns, key=lambda c: (c not in META_COLUMNS, list(META_COLUMNS).index(c) if c in META_COLUMNS else 0, c))
    table = pa.Table.from_arrays(fields, names=names)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The writer


class CacheWriter:
    """Write one build's shards (or one worker's part of them) and, when all exist, the manifest.

    with CacheWriter(url, header) as writer:
        if writer.complete: ...                      # same cache_key already complete
        for index in writer.pending_shards(): ...    # shards this worker still owes
            writer.write_shard(buffer)
        writer.finalize()                            # manifest, if every shard is committed
    """

    def __init__(self, url: str, header: BuildHeader, *, overwrite: bool = False, worker: int = 0,
                 num_workers: int = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS, storage_options: dict | None = None):
        if not (num_workers >= 1 and 0 <= worker < num_workers):
            raise CacheError(f"--worker {worker} must be in [0, --num-workers {num_workers})")
        top_k, vocab_size = header.settings["top_k"], header.tokenizer["vocab_size"]
        width = max(top_k, tail_samples_of(header.settings))
        chunk_bytes = chunk_rows * width * max(id_dtype(vocab_size).itemsize, LOGPROB_DTYPE.itemsize)
        if chunk_rows < 1 or chunk_bytes > MAX_CHUNK_BYTES:
            raise CacheError(
                f"--chunk-rows {chunk_rows} x top-k {top_k} gives chunks of {chunk_bytes:,} bytes; readers refuse chunks "
                f"over {MAX_CHUNK_BYTES:,} bytes (storage_layout.md 3.1): use --chunk-rows "
                f"{max_chunk_rows(top_k, vocab_size, tail_samples_of(header.settings))} or less")
        self.url = url
        self.header = header
        self.overwrite = overwrite
        self.worker = worker
        self.num_workers = num_workers
        self.chunk_rows = chunk_rows
        self.store: Store = open_store(url, storage_options=storage_options)
        self.complete = False
        self.manifest: Manifest | None = None
        self._lock_key: str | None = None
        self._lock_fd: int | None = None
        self._lock_token = uuid.uuid4().hex
        self._lock_since = utc_now()
        self._owner_id = ""

    # -- opening -----------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:  # noqa: PYI034 (typing.Self needs Python 3.11; 3.10 is supported)
        store = self.store
        if store.local and os.path.exists(store.root) and not os.path.isdir(store.root):
            raise CacheError(f"--out {store.root} is a file, not a directory; pass a new folder path")
        self._owner_id = claim_root(store)  # only a new, empty or kdcache-marked folder, without links (5.1)
        if store.exists(MANIFEST_FILE):
            existing = self._read_manifest_or_none()
            if existing is not None and existing.cache_key == self.header.cache_key and not self.overwrite:
                self.complete = True
                self.manifest = existing
                return self
            if not self.overwrite:
                detail = ""
                if existing is not None:
                    old = BuildHeader(existing.teacher, existing.tokenizer, existing.dataset, existing.settings,
                                      len(existing.shards))
                    detail = "; differing: " + "; ".join(header_differences(old, self.header))
                raise CacheMismatchError(
                    f"{self.url} already holds a complete cache with another cache_key{detail}. "
                    "Choose another --out, or pass --overwrite to replace it."
                )
            self._wipe()
        elif store.exists(BUILD_FILE):
            old = BuildHeader.from_bytes(store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))
            diffs = header_differences(old, self.header)
            if diffs and not self.overwrite:
                raise CacheMismatchError(
                    f"{self.url} holds an unfinished build with different settings: " + "; ".join(diffs)
                    + ". Rerun with the original settings to resume, choose another --out, or pass --overwrite."
                )
            if diffs:
                self._wipe()
            else:
                self.header.created_at = old.created_at
                self.header.tool_version = old.tool_version
        if not store.exists(BUILD_FILE):
            data = json.dumps(self.header.to_json(), indent=1).encode()
            if not store.create_exclusive(BUILD_FILE, data):
                old = BuildHeader.from_bytes(store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))
                if header_differences(old, self.header):
                    raise CacheMismatchError(f"another builder started a different build in {self.url} at the same time")
                self.header.created_at = old.created_at
        self._acquire_lock()
        self._refuse_other_splits()
        if store.exists(MANIFEST_FILE):  # a builder that held the lock before us finished the cache meanwhile
            existing = self._read_manifest_or_none()
            if existing is not None and existing.cache_key == self.header.cache_key:
                self.complete, self.manifest = True, existing
        return self

    def __exit__(self, exc_type, exc, tb):
        self._release_lock()
        return False

    def _read_manifest_or_none(self) -> Manifest | None:
        try:
            return parse_manifest(self.store.read_bytes(MANIFEST_FILE))
        except CacheError:
            return None

    def _wipe(self) -> None:
        """--overwrite: remove the previous build (only kdcache's own names, shared.ownership), unless someone builds it."""
        for name in self.store.list_dir(LOCKS_DIR):
            key = f"{LOCKS_DIR}/{name}"
            held = read_lock(self.store, key)
            if lock_holder_live(self.store, key, held):
                raise CacheLockedError(
                    f"--overwrite: {self.url} is being built by pid {held.get('pid')} on host {held.get('host')} "
                    f"since {held.get('since')} ({key}); stop that build first, then rerun with --overwrite")
        remove_build(self.store, self._owner_id)

    # -- locking -----------------------------------------------------------------------------
    def _lock_body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": self._lock_since, "heartbeat": time.time(),
                "worker": self.worker, "num_workers": self.num_workers, "token": self._lock_token}

    def _acquire_lock(self) -> None:
        """Hold locks/worker-w-of-W.json while building (storage_layout.md 5, "Locks").

        Local: flock on the file (the kernel frees it when the holder dies, so a dead holder's lock
        is recovered without guessing); the JSON body says who holds it. A lock whose body names
        another host with a fresh heartbeat is respected even if flock was granted (NFS without
        lock support). Object stores: conditional create; a lock whose holder is dead (same host
        and no such pid, or heartbeat older than an hour) is deleted and created again.
        """
        key = f"{LOCKS_DIR}/worker-{self.worker:05d}-of-{self.num_workers:05d}.json"
        store = self.store
        fd = None
        if store.local:
            previous = read_lock(store, key)
            try:
                fd = store.lock_local(key, json.dumps(self._lock_body()).encode())
            except NotImplementedError:  # no flock here: the object-store rules below
                fd = -1
        if store.local and fd != -1:
            if fd is None:
                self._refuse_lock(key, read_lock(store, key, retries=20))
            if previous.get("host") not in (None, socket.gethostname()) and lock_is_live(previous):
                store.rewrite_local_lock(fd, json.dumps(previous).encode())
                os.close(fd)
                self._refuse_lock(key, previous)
            self._lock_fd = fd
            self._lock_key = key
            return
        for _ in range(2):
            if store.create_exclusive(key, json.dumps(self._lock_body()).encode()):
                self._lock_key = key
                return
            held = read_lock(store, key, retries=3)
            if lock_is_live(held):
                self._refuse_lock(key, held)
            store.delete(key)  # a dead holder's lock: remove it and race for a fresh one (best effort)
        self._refuse_lock(key, read_lock(store, key))

    def _refuse_other_splits(self) -> None:
        """Refuse while a builder with another --num-workers is live (storage_layout.md 5, "Workers").

        Worker w of W owns the shards with index % W == w, so builders of two different splits would
        own overlapping shards, and their per-worker locks would not exclude each other. Called after
        taking our own lock: of two such builders starting together, each takes its lock before
        looking for the other's, so at least one sees the other (both may refuse; neither writes).
        Builders of one split run together; a build may be resumed with another split once nobody builds.
        """
        for name in self.store.list_dir(LOCKS_DIR):
            key = f"{LOCKS_DIR}/{name}"
            if key == self._lock_key or name.startswith(".tmp-"):
                continue
            split = LOCK_NAME_RE.match(name)
            if split and int(split[2]) == self.num_workers:
                continue  # another worker of our split: disjoint shards (its own lock excludes its twin)
            held = read_lock(self.store, key, retries=20)
            if not lock_holder_live(self.store, key, held):
                continue  # left by a builder that is gone
            self._release_lock()
            theirs = f"worker {int(split[1])} of {int(split[2])}" if split else f"lock {name}"
            raise CacheLockedError(
                f"{self.url} is being built by pid {held.get('pid')} on host {held.get('host')} since "
                f"{held.get('since')} as {theirs} ({key}); this builder is worker {self.worker} of {self.num_workers}. "
                "Builders running together on one cache must use the same --num-workers (with another split their "
                f"shards overlap): pass --num-workers {int(split[2]) if split else 'N'} --worker I, or wait for that "
                "build to end (or stop it) and rerun this command to resume with your split."
            )

    def _refuse_lock(self, key: str, held: dict) -> None:
        raise CacheLockedError(
            f"{self.url} (worker {self.worker} of {self.num_workers}) is being built by pid {held.get('pid')} on "
            f"host {held.get('host')} since {held.get('since')} (lock {key}). Wait for it, or stop it and rerun "
            "the same command to resume; to split the work instead, give each builder --num-workers N --worker I."
        )

    def heartbeat(self) -> None:
        if not self._lock_key:
            return
        body = json.dumps(self._lock_body()).encode()
        if self._lock_fd is not None:
            self.store.rewrite_local_lock(self._lock_fd, body)
        else:
            self.store.write_bytes(self._lock_key, body)

    def _release_lock(self) -> None:
        if not self._lock_key:
            return
        if self._lock_fd is not None:
            self.store.unlock_local(self._lock_key, self._lock_fd)
            self._lock_fd = None
        else:
            try:
                if read_lock(self.store, self._lock_key).get("token") == self._lock_token:
                    self.store.delete(self._lock_key)
            except OSError:
                pass
        self._lock_key = None

    # -- shards ------------------------------------------------------------------------------
    def my_shards(self) -> list[int]:
        """The shards this worker owns: index % num_workers == worker."""
        return [i for i in range(self.header.num_shards) if i % self.num_workers == self.worker]

    def committed_shards(self) -> set[int]:
        """Shards whose commit file exists and parses (a damaged one counts as not committed: rewritten)."""
        done = set()
        for name in self.store.list_dir(SHARDS_DIR):
            if not (name.startswith("shard-") and name[6:].isdigit()):
                continue
            index = int(name.split("-", 1)[1])
            if index < self.header.num_shards and read_commit(self.store, index, self.header.cache_key) is not None:
                done.add(index)
        return done

    def pending_shards(self) -> list[int]:
        done = self.committed_shards()
        return [i for i in self.my_shards() if i not in done]

    def shard(self, index: int) -> _ShardContext:
        """`with writer.shard(i) as buf: buf.add_sequence(...)`: committed on a clean exit only."""
        return _ShardContext(self, index)

    def write_shard(self, buffer: ShardBuffer) -> ShardEntry:
        """Validate, encode and commit one shard (see the module docstring for the order)."""
        index = buffer.index
        if not 0 <= index < self.header.num_shards:
            raise CacheError(f"shard {index} is outside the plan of {self.header.num_shards} shards")
        where = f"shard {shard_name(index)}"
        if buffer.num_sequences > MAX_SHARD_SEQUENCES:
            raise CacheError(f"{where} holds {buffer.num_sequences:,} sequences; a shard holds at most "
                             f"{MAX_SHARD_SEQUENCES:,} (storage_layout.md 6.3): use a smaller --shard-tokens")
        arrays = validate_shard_arrays(
            buffer.arrays(), vocab_size=self.header.tokenizer["vocab_size"], top_k=self.header.settings["top_k"], where=where,
            tail_samples=tail_samples_of(self.header.settings),
        )
        objects = {f"{shard_path(index)}/{k}": v for k, v in encode_zarr_group(arrays, self.chunk_rows).items()}
        objects[meta_path(index)] = encode_meta(buffer.meta, arrays["offsets"])
        probs = np.exp(arrays["topk_logprobs"].astype(np.float64))
        entry = ShardEntry(
            name=shard_name(index),
            path=shard_path(index),
            meta_path=meta_path(index),
            num_sequences=len(arrays["offsets"]) - 1,
            num_tokens=len(arrays["input_ids"]),
            num_loss_tokens=int(arrays["loss_mask"].sum()),
            topk_mass_sum=float(probs.sum()),
            objects={k: ObjectInfo(len(v), sha256_hex(v)) for k, v in objects.items()},
        )
        parse_shard(entry.to_json(), index)  # never commit what a reader would refuse
        self.begin_shard(index)
        for key, data in objects.items():
            self.store.write_bytes(key, data)
        return self.commit_shard(index, entry)

    def begin_shard(self, index: int) -> None:
        """Before shard `index`'s first object: refuse a committed shard or a complete cache, delete leftovers.

        write_shard calls it; a builder that streams a shard's objects (store.write_bytes, key by key) calls it
        first, then commit_shard. Until its commit file exists the shard does not exist (module docstring).
        """
        if not 0 <= index < self.header.num_shards:
            raise CacheError(f"shard {index} is outside the plan of {self.header.num_shards} shards")
        self._refuse_to_rewrite(index, f"shard {shard_name(index)}")
        # Leftovers of an earlier, uncommitted attempt at this shard go first.
        self.store.delete(shard_path(index))
        self.store.delete(meta_path(index))

    def commit_shard(self, index: int, entry: ShardEntry) -> ShardEntry:
        """Write shard `index`'s commit file for `entry`, whose objects were written since begin_shard."""
        parse_shard(entry.to_json(), index)  # never commit what a reader would refuse
        self._refuse_to_rewrite(index, f"shard {shard_name(index)}")
        commit = {"cache_key": self.header.cache_key, **entry.to_json()}
        self.store.write_bytes(f"{shard_path(index)}/{COMMIT_FILE}", json.dumps(commit, indent=1).encode())
        self.heartbeat()
        return entry

    def _refuse_to_rewrite(self, index: int, where: str) -> None:
        """A complete cache is never modified and a committed shard never rewritten (storage_layout.md 5).

        Checked just before a shard's leftovers are deleted. With the locks of section 5 neither can
        happen; this stops a builder whose locks did not exclude another (a filesystem whose locks do not
        reach other hosts, an object store without conditional writes) from damaging what that one wrote.
        """
        if self.complete or self.store.exists(MANIFEST_FILE):
            raise CacheLockedError(
                f"{where}: {self.url} became a complete cache (manifest.json) while this builder ran; a complete "
                "cache is never modified, so nothing of this shard was written. Another builder finished it: check "
                f"it with `kdcache verify {self.url}`.")
        if read_commit(self.store, index, self.header.cache_key) is not None:
            raise CacheLockedError(
                f"{where} is already committed in {self.url} (by another builder of this cache?); a committed shard "
                "is never rewritten, so nothing of it was written. Rerun the same command: it skips committed shards.")

    # -- the manifest ------------------------------------------------------------------------
    def finalize(self) -> Manifest | None:
        """Write manifest.json if every planned shard is committed; return it, else None."""
        manifest = finalize_cache(self.store, self.header)
        if manifest is not None:
            self.manifest = manifest
            self.complete = True
        return manifest


class _ShardContext:
    def __init__(self, writer: CacheWriter, index: int):
        self.writer = writer
        self.buffer = ShardBuffer(index)
        self.entry: ShardEntry | None = None

    def __enter__(self) -> ShardBuffer:
        return self.buffer

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.entry = self.writer.write_shard(self.buffer)
        return False


def read_commit(store: Store, index: int, cache_key: str | None) -> ShardEntry | None:
    """Shard `index`'s commit file as a manifest entry; None if absent or damaged (then it is not committed).

    A commit file is written atomically, so only damage after the fact makes one unreadable; the
    shard is then treated as uncommitted and a resumed build writes it again.
    """
    key = f"{shard_path(index)}/{COMMIT_FILE}"
    try:
        raw = json.loads(store.read_bytes(key))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    if cache_key is not None and raw.get("cache_key") != cache_key:
        if isinstance(raw.get("cache_key"), str) and len(raw["cache_key"]) == 64:
            raise CacheMismatchError(f"{key} belongs to another build (cache_key differs); rerun with --overwrite")
        return None
    raw.pop("cache_key", None)
    try:
        return parse_shard(raw, index)
    except CacheError:
        return None


def read_commits(store: Store, num_shards: int, cache_key: str | None) -> tuple[list[ShardEntry], list[int]]:
    """The committed shards' entries and the indices still missing."""
    entries, missing = [], []
    for index in range(num_shards):
        entry = read_commit(store, index, cache_key)
        if entry is None or entry.name != shard_name(index):
            missing.append(index)
        else:
            entries.append(entry)
    return entries, missing


def array_descriptions(vocab_size: int, tail_samples: int = 0) -> dict:
    """manifest.arrays: each array's dtype, and how topk_logprobs were rounded."""
    out = {name: {"dtype": dtype} for name, dtype in array_dtypes(vocab_size, tail_samples).items()}
    out["topk_logprobs"]["rounding"] = {"exact_ranks": EXACT_RANKS, "mantissa_bits": TRIMMED_MANTISSA_BITS}
    return out


def finalize_cache(store: Store | str, header: BuildHeader | None = None) -> Manifest | None:
    """Assemble and write manifest.json from the shards' commit files (`kdcache finalize`)."""
    if isinstance(store, str):
        store = open_store(store)
    if header is None:
        if not store.exists(BUILD_FILE):
            raise CacheError(f"{store.url} has no {BUILD_FILE}: it is not a kdcache build")
        claim_root(store, create=False)
        header = BuildHeader.from_bytes(store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))
    if store.exists(MANIFEST_FILE):  # a complete cache is never changed (storage_layout.md 5)
        try:
            existing = parse_manifest(store.read_bytes(MANIFEST_FILE))
        except CacheError:
            existing = None
        if existing is not None and existing.cache_key == header.cache_key:
            return existing
    entries, missing = read_commits(store, header.num_shards, header.cache_key)
    if missing:
        return None
    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        created_at=header.created_at,
        tool_version=header.tool_version,
        cache_key=header.cache_key,
        teacher=header.teacher,
        tokenizer=header.tokenizer,
        dataset=header.dataset,
        settings=header.settings,
        arrays=array_descriptions(header.tokenizer["vocab_size"], tail_samples_of(header.settings)),
        shards=entries,
        totals=make_totals(entries),
        extensions={TAIL_SAMPLES_EXTENSION: {"must_understand": True}} if tail_samples_of(header.settings) else {},
    )
    data = manifest.dumps()
    parse_manifest(data)  # never write a manifest this reader would refuse
    store.write_bytes(MANIFEST_FILE, data)
    return manifest


def read_lock(store: Store, key: str, retries: int = 0) -> dict:
    """A lock file's JSON body ({} if absent or unreadable; retried while a holder may be writing it)."""
    for attempt in range(retries + 1):
        try:
            held = json.loads(store.read_bytes(key))
            if isinstance(held, dict):
                return held
        except (FileNotFoundError, ValueError, UnicodeDecodeError, OSError):
            pass
        if attempt < retries:
            time.sleep(0.05)
    return {}


def lock_holder_live(store: Store, key: str, held: dict) -> bool:
    """Whether lock file `key` (body `held`) belongs to a live builder.

    Local stores: its flock is held, or its body names another host with a fresh heartbeat (a
    filesystem whose locks do not reach other hosts). Object stores: lock_is_live(held).
    """
    flocked = _flock_held(store, key) if store.local else None
    if flocked is None:  # an object store, or a filesystem without flock
        return lock_is_live(held)
    return flocked or (held.get("host") not in (None, socket.gethostname()) and lock_is_live(held))


def _flock_held(store: Store, key: str) -> bool | None:
    """Local stores: whether some open file description holds the flock of lock file `key` (None: no flock here)."""
    import fcntl

    try:
        fd = os.open(store.path(key), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def lock_is_live(held: dict, stale_after_s: float = 3600.0) -> bool:
    """A lock is live if its process runs (same host) or its heartbeat is recent (other host)."""
    if not held:
        return False
    if held.get("host") == socket.gethostname():
        pid = held.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    heartbeat = held.get("heartbeat")
    return isinstance(heartbeat, (int, float)) and time.time() - heartbeat < stale_after_s


__all__ = [
    "TOOL_VERSION",
    "BuildHeader",
    "CacheWriter",
    "ShardBuffer",
    "encode_zarr_layout",
    "encode_zarr_rows",
    "finalize_cache",
    "header_differences",
    "id_dtype",
    "validate_shard_arrays",
]
