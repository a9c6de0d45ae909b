"""CacheWriter: write shards so that a reader or a resumed writer never sees half of one.

The commit protocol (storage_layout.md, "Commit protocol"):
  1. `build.json` (the build's header and plan) is written once, first. A rerun compares against it
     and resumes; a different build against the same directory is refused.
  2. A shard's arrays and its meta parquet are written object by object, each object atomically.
  3. `shards/shard-NNNNN/commit.json` (counts + sha256 of every object) is written last for that
     shard: a shard without it does not exist, and a resumed writer deletes its leftovers.
  4. `manifest.json` is written last of all, once every planned shard has a commit file.

The writer validates every array before anything of the shard is written (shapes, dtypes, id
ranges, NaN/+inf, ordering), so a model that emits NaN never produces a committed shard.

Knows the format and numpy; nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from shared.format import (
    BUILD_FILE,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCKS_DIR,
    LOGPROB_DTYPE,
    LOGPROB_MAX,
    MANIFEST_FILE,
    META_COLUMNS,
    META_DIR,
    SHARDS_DIR,
    TARGET_SENTINEL,
    CacheError,
    CacheFormatError,
    CacheLockedError,
    CacheMismatchError,
    array_dtypes,
    id_dtype,
    meta_path,
    shard_name,
    shard_path,
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
from shared.store import Store, open_store

TOOL_VERSION = "0.1.0"
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
        except (KeyError, TypeError, ValueError) as exc:
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

    def add_sequence(self, *, input_ids, loss_mask, topk_ids, topk_logprobs, target_logprob, tail_logprob, **meta):
        """Append one sequence. Row t of every array describes the token at t+1 (see storage_layout.md)."""
        n = len(input_ids)
        arrays = {
            "input_ids": np.asarray(input_ids),
            "loss_mask": np.asarray(loss_mask, dtype=bool),
            "topk_ids": np.asarray(topk_ids),
            "topk_logprobs": np.asarray(topk_logprobs),
            "target_logprob": np.asarray(target_logprob, dtype=np.float32),
            "tail_logprob": np.asarray(tail_logprob, dtype=np.float32),
        }
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


def validate_shard_arrays(arrays: dict[str, np.ndarray], *, vocab_size: int, top_k: int, where: str) -> dict[str, np.ndarray]:
    """Check every invariant of storage_layout.md and cast to the stored dtypes."""
    dtypes = array_dtypes(vocab_size)
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
    return out


def encode_zarr_group(arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]:
    """Encode arrays as one Zarr v3 group in memory; returns {key inside the group: bytes}."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    group = zarr.open_group(store=mem, mode="w", zarr_format=3)
    for name, arr in arrays.items():
        rows = max(1, min(chunk_rows, len(arr))) if name != "offsets" else max(1, len(arr))
        chunks = (rows,) + tuple(arr.shape[1:])
        za = group.create_array(name, shape=arr.shape, chunks=chunks, dtype=arr.dtype,
                                compressors=BloscCodec(**BLOSC), fill_value=0)
        za[...] = arr
    return {key: buf.to_bytes() for key, buf in sorted(mem._store_dict.items())}


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
        self._lock_token = uuid.uuid4().hex

    # -- opening -----------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        store = self.store
        if store.local and os.path.exists(store.root) and not os.path.isdir(store.root):
            raise CacheError(f"--out {store.root} is a file, not a directory; pass a new folder path")
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
            old = BuildHeader.from_json(json.loads(store.read_bytes(BUILD_FILE)))
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
        else:
            if store.local and os.path.isdir(store.root) and os.listdir(store.root):
                if not self.overwrite:
                    raise CacheMismatchError(
                        f"--out {store.root} is a non-empty folder that is not a kdcache build; choose an empty or new folder"
                    )
                self._wipe(require_kdcache=False)
        if not store.exists(BUILD_FILE):
            data = json.dumps(self.header.to_json(), indent=1).encode()
            if not store.create_exclusive(BUILD_FILE, data):
                old = BuildHeader.from_json(json.loads(store.read_bytes(BUILD_FILE)))
                if header_differences(old, self.header):
                    raise CacheMismatchError(f"another builder started a different build in {self.url} at the same time")
                self.header.created_at = old.created_at
        self._acquire_lock()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._release_lock()
        return False

    def _read_manifest_or_none(self) -> Manifest | None:
        try:
            return parse_manifest(self.store.read_bytes(MANIFEST_FILE))
        except CacheError:
            return None

    def _wipe(self, require_kdcache: bool = True) -> None:
        """--overwrite: remove the previous build (only kdcache's own names)."""
        for key in (MANIFEST_FILE, SHARDS_DIR, META_DIR, LOCKS_DIR, BUILD_FILE):
            self.store.delete(key)

    # -- locking -----------------------------------------------------------------------------
    def _lock_body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now(), "heartbeat": time.time(),
                "worker": self.worker, "num_workers": self.num_workers, "token": self._lock_token}

    def _acquire_lock(self) -> None:
        key = f"{LOCKS_DIR}/worker-{self.worker:05d}-of-{self.num_workers:05d}.json"
        body = self._lock_body()
        if self.store.create_exclusive(key, json.dumps(body).encode()):
            self._lock_key = key
            return
        try:
            held = json.loads(self.store.read_bytes(key))
        except (FileNotFoundError, ValueError):
            held = {}
        if lock_is_live(held):
            raise CacheLockedError(
                f"{self.url} (worker {self.worker} of {self.num_workers}) is being built by pid {held.get('pid')} on "
                f"host {held.get('host')} since {held.get('since')}. Wait for it, or kill it and rerun to resume."
            )
        # A lock left by a dead process: take it over.
        self.store.write_bytes(key, json.dumps(body).encode())
        self._lock_key = key

    def heartbeat(self) -> None:
        if self._lock_key:
            self.store.write_bytes(self._lock_key, json.dumps(self._lock_body()).encode())

    def _release_lock(self) -> None:
        if self._lock_key:
            try:
                held = json.loads(self.store.read_bytes(self._lock_key))
                if held.get("token") == self._lock_token:
                    self.store.delete(self._lock_key)
            except (FileNotFoundError, ValueError, OSError):
                pass
            self._lock_key = None

    # -- shards ------------------------------------------------------------------------------
    def my_shards(self) -> list[int]:
        """The shards this worker owns: index % num_workers == worker."""
        return [i for i in range(self.header.num_shards) if i % self.num_workers == self.worker]

    def committed_shards(self) -> set[int]:
        done = set()
        for name in self.store.list_dir(SHARDS_DIR):
            if name.startswith("shard-") and self.store.exists(f"{SHARDS_DIR}/{name}/{COMMIT_FILE}"):
                done.add(int(name.split("-", 1)[1]))
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
        arrays = validate_shard_arrays(
            buffer.arrays(), vocab_size=self.header.tokenizer["vocab_size"], top_k=self.header.settings["top_k"], where=where
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
        # Leftovers of an earlier, uncommitted attempt at this shard go first.
        self.store.delete(shard_path(index))
        self.store.delete(meta_path(index))
        for key, data in objects.items():
            self.store.write_bytes(key, data)
        commit = {"cache_key": self.header.cache_key, **entry.to_json()}
        self.store.write_bytes(f"{shard_path(index)}/{COMMIT_FILE}", json.dumps(commit, indent=1).encode())
        self.heartbeat()
        return entry

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


def read_commits(store: Store, num_shards: int, cache_key: str | None) -> tuple[list[ShardEntry], list[int]]:
    """The committed shards' entries and the indices still missing."""
    entries, missing = [], []
    for index in range(num_shards):
        key = f"{shard_path(index)}/{COMMIT_FILE}"
        if not store.exists(key):
            missing.append(index)
            continue
        raw = json.loads(store.read_bytes(key))
        if cache_key is not None and raw.pop("cache_key", None) != cache_key:
            raise CacheMismatchError(f"{key} belongs to another build (cache_key differs); rerun with --overwrite")
        raw.pop("cache_key", None)
        entries.append(parse_shard(raw, index))
    return entries, missing


def array_descriptions(vocab_size: int) -> dict:
    """manifest.arrays: each array's dtype, and how topk_logprobs were rounded."""
    out = {name: {"dtype": dtype} for name, dtype in array_dtypes(vocab_size).items()}
    out["topk_logprobs"]["rounding"] = {"exact_ranks": EXACT_RANKS, "mantissa_bits": TRIMMED_MANTISSA_BITS}
    return out


def finalize_cache(store: Store | str, header: BuildHeader | None = None) -> Manifest | None:
    """Assemble and write manifest.json from the shards' commit files (`kdcache finalize`)."""
    if isinstance(store, str):
        store = open_store(store)
    if header is None:
        if not store.exists(BUILD_FILE):
            raise CacheError(f"{store.url} has no {BUILD_FILE}: it is not a kdcache build")
        header = BuildHeader.from_json(json.loads(store.read_bytes(BUILD_FILE)))
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
        arrays=array_descriptions(header.tokenizer["vocab_size"]),
        shards=entries,
        totals=make_totals(entries),
        extensions={},
    )
    data = manifest.dumps()
    parse_manifest(data)  # never write a manifest this reader would refuse
    store.write_bytes(MANIFEST_FILE, data)
    return manifest


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
    "finalize_cache",
    "header_differences",
    "id_dtype",
    "validate_shard_arrays",
]
