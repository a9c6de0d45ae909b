"""CacheWriter: write shards so that a reader or a resumed writer never sees half of one.

The commit protocol (storage_layout.md 5; shared.commits):
  0. The cache root must be the writer's: new, empty, or marked by kdcache's owner.json, holding only the
     format's names, without links (shared.ownership; storage_layout.md 5.1).
  1. `build.json` (the build's header and plan) is written once, first. A rerun compares against it
     and resumes; a different build against the same directory is refused.
  2. A shard's arrays and its meta parquet are written object by object, each object atomically.
  3. `shards/shard-NNNNN/commit.json` (counts + sha256 of every object) is written last for that
     shard: a shard without it does not exist, and a resumed writer deletes its leftovers.
  4. `manifest.json` is written last of all, once every planned shard has a commit file.
A complete cache is never modified and a committed shard never rewritten (checked before a shard's
leftovers are deleted). Builders of one cache running together hold per-worker locks and must use
the same worker split; one of another split is refused while they run (shared.locks).

Every shard's rows are checked against the format's one table of row invariants before anything of the
shard is written (shared.rows), so a model that emits NaN never produces a committed shard. This module
also gathers the writing API in one import (BuildHeader, ShardBuffer, validate_shard_arrays, the encoders).

Knows the format and numpy; nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from shared.commits import (
    TOOL_VERSION,
    BuildHeader,
    commit_body,
    finalize_cache,
    header_differences,
    read_build_header,
    read_commit,
    read_manifest_or_none,
    utc_now,
)
from shared.encode import (
    BLOSC,
    encode_meta,
    encode_zarr_group,
    encode_zarr_layout,
    encode_zarr_rows,
    sha256_hex,
    shard_shapes,
    stored_rows,
    topk_coding,
)
from shared.format import (
    BUILD_FILE,
    COMMIT_FILE,
    LOGPROB_DTYPE,
    MANIFEST_FILE,
    MAX_CHUNK_BYTES,
    MAX_SHARD_SEQUENCES,
    MAX_VOCAB_SIZE,
    SHARDS_DIR,
    TAIL_ARRAYS,
    CacheError,
    CacheFormatError,
    CacheLockedError,
    CacheMismatchError,
    id_dtype,
    max_chunk_rows,
    meta_path,
    shard_name,
    shard_path,
    tail_samples_of,
)
from shared.locks import BuildLock, refuse_live_locks
from shared.manifest import Manifest, ObjectInfo, ShardEntry, check_shard_objects, parse_shard
from shared.ownership import claim_root, remove_build
from shared.rows import validate_shard_arrays
from shared.store import Store, open_store

DEFAULT_CHUNK_ROWS = 8192


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
            raise CacheFormatError(f"sequence {len(self.meta)} of shard {self.index}: tail_ids and tail_counts go "
                                   "together")
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
            for name in TAIL_ARRAYS:
                self._rows.setdefault(name, [])
        for name, arr in arrays.items():
            if arr.shape[:1] != (n,):
                raise CacheFormatError(f"sequence {len(self.meta)} of shard {self.index}: {name} has {arr.shape[:1]} "
                                       f"rows, input_ids has {n}")
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


class CacheWriter:
    """Write one build's shards (or one worker's part of them) and, when all exist, the manifest.

    with CacheWriter(url, header) as writer:
        if writer.complete: ...                      # same cache_key already complete
        for index in writer.pending_shards(): ...    # shards this worker still owes
            writer.write_shard(buffer)
        writer.finalize()                            # manifest, if every shard is committed

    A builder that streams a shard's objects (chunks encoded elsewhere) calls begin_shard, writes each
    object with writer.store.write_bytes, then commit_shard.
    """

    def __init__(self, url: str, header: BuildHeader, *, overwrite: bool = False, worker: int = 0,
                 num_workers: int = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS, storage_options: dict | None = None):
        if not (num_workers >= 1 and 0 <= worker < num_workers):
            raise CacheError(f"{{worker}} {worker} must be in [0, {{num_workers}} {num_workers})")
        top_k, vocab_size = header.settings["top_k"], header.tokenizer["vocab_size"]
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:  # readers refuse more (storage_layout.md 6.2)
            raise CacheError(f"the tokenizer has {vocab_size:,} ids; the format holds at most {MAX_VOCAB_SIZE:,} "
                             "(readers decode ids through a table of V entries): use another tokenizer")
        width = max(top_k, tail_samples_of(header.settings))
        chunk_bytes = chunk_rows * width * max(id_dtype(vocab_size).itemsize, LOGPROB_DTYPE.itemsize)
        if chunk_rows < 1 or chunk_bytes > MAX_CHUNK_BYTES:
            raise CacheError(
                f"{{chunk_rows}} {chunk_rows} x top-k {top_k} gives chunks of {chunk_bytes:,} bytes; readers refuse "
                "chunks "
                f"over {MAX_CHUNK_BYTES:,} bytes (storage_layout.md 3.1): use {{chunk_rows}} "
                f"{max_chunk_rows(top_k, vocab_size, tail_samples_of(header.settings))} or less")
        if header.settings.setdefault("chunk_rows", chunk_rows) != chunk_rows:  # the manifest records it (6.2)
            raise CacheError(f"settings.chunk_rows {header.settings['chunk_rows']!r} differs from the writer's "
                             f"chunk_rows {chunk_rows}; pass one value")
        self.url = url
        self.header = header
        self.overwrite = overwrite
        self.worker = worker
        self.num_workers = num_workers
        self.chunk_rows = chunk_rows
        self.table_size, self.levels = topk_coding(top_k, vocab_size, chunk_rows)  # N and L (manifest.arrays)
        self.store: Store = open_store(url, storage_options=storage_options)
        self.complete = False
        self.manifest: Manifest | None = None
        self.lock = BuildLock(self.store, url, worker, num_workers, since=utc_now())
        self._owner_id = ""

    # -- opening -----------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:  # noqa: PYI034 (typing.Self needs Python 3.11; 3.10 is supported)
        store = self.store
        if store.local and store.fs.exists(store.root) and not store.fs.isdir(store.root):
            raise CacheError(f"{{out}} {store.root} is a file, not a directory; pass a new folder path")
        self._owner_id = claim_root(store)  # only a new, empty or kdcache-marked folder, without links (5.1)
        if store.exists(MANIFEST_FILE):
            existing = read_manifest_or_none(store)
            if existing is not None and existing.cache_key == self.header.cache_key and not self.overwrite:
                self.complete, self.manifest = True, existing
                return self
            if not self.overwrite:
                detail = ""
                if existing is not None:
                    old = BuildHeader(existing.teacher, existing.tokenizer, existing.dataset, existing.settings,
                                      len(existing.shards))
                    detail = "; differing: " + "; ".join(header_differences(old, self.header))
                raise CacheMismatchError(
                    f"{self.url} already holds a complete cache with another cache_key{detail}. "
                    "Choose another {out}, or pass {overwrite} to replace it."
                )
            self._wipe()
        elif store.exists(BUILD_FILE):
            old = read_build_header(store)
            diffs = header_differences(old, self.header)
            if diffs and not self.overwrite:
                raise CacheMismatchError(
                    f"{self.url} holds an unfinished build with different settings: " + "; ".join(diffs)
                    + ". Rerun with the original settings to resume, choose another {out}, or pass {overwrite}."
                )
            if diffs:
                self._wipe()
            else:
                self.header.created_at = old.created_at
                self.header.tool_version = old.tool_version
        if not store.exists(BUILD_FILE):
            data = json.dumps(self.header.to_json(), indent=1).encode()
            if not store.create_exclusive(BUILD_FILE, data):
                old = read_build_header(store)
                if header_differences(old, self.header):
                    raise CacheMismatchError(f"another builder started a different build in {self.url} at the same time")
                self.header.created_at = old.created_at
        self.lock.acquire()
        self.lock.refuse_other_splits()
        if store.exists(MANIFEST_FILE):  # a builder that held the lock before us finished the cache meanwhile
            existing = read_manifest_or_none(store)
            if existing is not None and existing.cache_key == self.header.cache_key:
                self.complete, self.manifest = True, existing
        return self

    def __exit__(self, exc_type, exc, tb):
        self.lock.release()
        return False

    def _wipe(self) -> None:
        """--overwrite: remove the previous build (only kdcache's own names, shared.ownership), unless someone builds it."""
        refuse_live_locks(self.store, self.url)
        remove_build(self.store, self._owner_id)

    def heartbeat(self) -> None:
        self.lock.heartbeat()

    # -- shards ------------------------------------------------------------------------------
    def my_shards(self) -> list[int]:
        """The shards this worker owns: index % num_workers == worker."""
        return [i for i in range(self.header.num_shards) if i % self.num_workers == self.worker]

    def committed_shards(self) -> set[int]:
        """Shards whose commit file exists and holds (a damaged one counts as not committed: rewritten)."""
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
                             f"{MAX_SHARD_SEQUENCES:,} (storage_layout.md 6.3): use a smaller {{shard_tokens}}")
        arrays = validate_shard_arrays(
            buffer.arrays(), vocab_size=self.header.tokenizer["vocab_size"], top_k=self.header.settings["top_k"],
            where=where, tail_samples=tail_samples_of(self.header.settings),
        )
        shapes = self.shard_shapes(len(arrays["input_ids"]), len(arrays["offsets"]) - 1)
        stored = stored_rows(arrays, shapes, self.chunk_rows, self.header.tokenizer["vocab_size"])
        objects = {f"{shard_path(index)}/{k}": v for k, v in encode_zarr_group(stored, self.chunk_rows).items()}
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
        self._check_entry(index, entry)  # never commit what a reader would refuse
        self.begin_shard(index)
        for key, data in objects.items():
            self.store.write_bytes(key, data)
        return self.commit_shard(index, entry)

    def shard_shapes(self, num_tokens: int, num_sequences: int) -> dict:
        """{array name: (shape, dtype)} of a shard of this build with these counts (shared.encode.shard_shapes)."""
        settings = self.header.settings
        return shard_shapes(num_tokens, num_sequences, settings["top_k"], tail_samples_of(settings),
                            self.header.tokenizer["vocab_size"], chunk_rows=self.chunk_rows, table_size=self.table_size)

    def begin_shard(self, index: int) -> None:
        """Before shard `index`'s first object: refuse a committed shard or a complete cache, delete leftovers.

        write_shard calls it; a builder that streams a shard's objects (store.write_bytes, key by key) calls it
        first, then commit_shard. Until its commit file exists the shard does not exist (module docstring).
        """
        if not 0 <= index < self.header.num_shards:
            raise CacheError(f"shard {index} is outside the plan of {self.header.num_shards} shards")
        self._refuse_to_rewrite(index, f"shard {shard_name(index)}")
        # Leftovers of an earlier, uncommitted attempt at this shard go first (never through a link).
        self.store.delete(shard_path(index))
        self.store.delete(meta_path(index))

    def commit_shard(self, index: int, entry: ShardEntry) -> ShardEntry:
        """Write shard `index`'s commit file for `entry`, whose objects were written since begin_shard."""
        self._check_entry(index, entry)  # never commit what a reader would refuse
        self._refuse_to_rewrite(index, f"shard {shard_name(index)}")
        self.store.write_bytes(f"{shard_path(index)}/{COMMIT_FILE}", commit_body(entry, self.header.cache_key))
        self.heartbeat()
        return entry

    def _check_entry(self, index: int, entry: ShardEntry) -> None:
        """The entry as a reader checks it (section 6.3), listing exactly the objects the format stores (3.1)."""
        parse_shard(entry.to_json(), index)
        check_shard_objects(entry, self.header.settings, self.header.tokenizer["vocab_size"], self.chunk_rows)

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


__all__ = [
    "BLOSC",
    "DEFAULT_CHUNK_ROWS",
    "TOOL_VERSION",
    "BuildHeader",
    "CacheWriter",
    "ShardBuffer",
    "encode_meta",
    "encode_zarr_group",
    "encode_zarr_layout",
    "encode_zarr_rows",
    "finalize_cache",
    "header_differences",
    "id_dtype",
    "stored_rows",
    "validate_shard_arrays",
]
