"""What `kdcache verify` checks: every byte against the manifest, every shard's structure, every row.

`check_objects` compares a shard's stored objects with the manifest (presence, regular files only, sizes,
and, when asked, sha256) and reports objects the manifest does not list. `verify_cache` adds, per shard,
what a reader checks when it opens the shard (its zarr.json files, offsets, meta table) and, with
`rows=True`, streams every row through the format's table of row invariants (shared.rows) block by block,
summing each sequence's loss rows and the shard's top-K mass to compare with the meta table and the
manifest. Memory stays bounded by one block of `chunk_rows` rows. `check_bookkeeping` covers the files
readers never read once a cache is complete (owner.json, build.json, commit files).

Knows the Store, the manifest and the reader; nothing about models or training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from shared.format import (
    BUILD_FILE,
    COMMIT_FILE,
    MAX_BOOKKEEPING_BYTES,
    OWNER_FILE,
    SHARDS_DIR,
    CacheError,
    row_arrays,
)
from shared.identity import seal_holds
from shared.manifest import Manifest, ShardEntry
from shared.rows import check_sequence_rows
from shared.store import Store

HASH_BATCH_BYTES = 256 * 2**20  # objects read at once while hashing (concurrently on object stores)


@dataclass
class Problem:
    shard: str
    object: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.object}: {self.message}"


def _is_temporary(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(".tmp-")


def check_objects(store: Store, entry: ShardEntry, *, hashes: bool) -> list[Problem]:
    """Compare the stored objects of one shard with the manifest (sizes, and sha256 if hashes).

    Also reports objects inside the shard's folder that the manifest does not list (besides
    commit.json and `.tmp-` leftovers): Zarr would read such a chunk without any checksum.
    """
    problems = []
    listed = store.list_files(entry.path)
    meta_size = store.size(entry.meta_path)
    to_hash = []
    for key, info in sorted(entry.objects.items()):
        size = listed.get(key) if key.startswith(entry.path + "/") else meta_size
        if size is None:
            problems.append(Problem(entry.name, key, "missing"))
            continue
        if store.local:
            odd = store.local_file_problem(key)
            if odd is not None:
                problems.append(Problem(entry.name, key, odd))
                continue
        if size != info.size:
            problems.append(Problem(entry.name, key, f"size {size} bytes, manifest says {info.size} (truncated or "
                                                     "replaced)"))
            continue
        to_hash.append(key)
    for batch in _batches(to_hash, entry, HASH_BATCH_BYTES) if hashes else []:
        for key, data in store.read_many(batch).items():
            if isinstance(data, Exception):
                problems.append(Problem(entry.name, key, f"cannot be read ({data})"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            expected = entry.objects[key].sha256
            if digest != expected:
                problems.append(Problem(entry.name, key, f"sha256 {digest[:12]}... does not match the manifest's "
                                                         f"{expected[:12]}..."))
    commit = f"{entry.path}/{COMMIT_FILE}"
    for key in sorted(set(listed) - set(entry.objects)):
        if key != commit and not _is_temporary(key):
            problems.append(Problem(entry.name, key, "is not listed in the manifest (a reader would use it unchecked); "
                                                     "remove it or rebuild the shard"))
    return problems


def _batches(keys: list[str], entry: ShardEntry, max_bytes: int) -> list[list[str]]:
    """Keys in groups of at most max_bytes (by their manifest sizes): what one concurrent read holds."""
    out, size = [[]], 0
    for key in keys:
        if out[-1] and size + entry.objects[key].size > max_bytes:
            out.append([])
            size = 0
        out[-1].append(key)
        size += entry.objects[key].size
    return [b for b in out if b]


def check_bookkeeping(store: Store, manifest: Manifest) -> list[Problem]:
    """owner.json, build.json and the shards' commit.json files against the manifest (storage_layout.md 7).

    Readers never read them once manifest.json exists, so damage here does not affect training;
    it would mislead a later writer (`kdcache finalize`, a resumed build, --overwrite), so `kdcache
    verify` reports it. A missing commit file is fine after completion: the manifest is authoritative.
    """
    from shared.ownership import KIND, TOOL, read_marker  # ownership imports the writer's side of the store

    problems = []
    fix = "readers do not use it once the cache is complete; delete it (the manifest is authoritative)"
    try:
        marker = read_marker(store)
        ok = marker == {} or (marker is not None and (marker.get("tool"), marker.get("kind")) == (TOOL, KIND))
    except (OSError, CacheError):
        ok = False
    if not ok:
        problems.append(Problem("cache", OWNER_FILE, "is not the marker kdcache writes (damaged?): readers do not use "
                                                     "it, but no kdcache build will write into or delete this folder"))
    build = _bookkeeping_json(store, BUILD_FILE)
    if build is not None and not (isinstance(build, dict) and build.get("cache_key") == manifest.cache_key):
        problems.append(Problem("cache", BUILD_FILE, f"damaged or from another build: {fix}"))
    for entry in manifest.shards:
        key = f"{entry.path}/{COMMIT_FILE}"
        commit = _bookkeeping_json(store, key)
        if commit is None:
            continue
        if not (isinstance(commit, dict) and seal_holds(commit, "commit_sha256")
                and commit.pop("cache_key", None) == manifest.cache_key and commit.pop("commit_sha256", None)
                and commit == json.loads(json.dumps(entry.to_json()))):
            problems.append(Problem(entry.name, key, f"does not match the manifest's entry (damaged): {fix}"))
    return problems


def _bookkeeping_json(store: Store, key: str):
    """The JSON value of a bookkeeping file; None when absent; ... (Ellipsis) when it is not a readable JSON file."""
    try:
        return json.loads(store.read_bytes(key, max_bytes=MAX_BOOKKEEPING_BYTES))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError, CacheError):
        return ...


def count_committed(store: Store) -> int:
    return sum(1 for n in store.list_dir(SHARDS_DIR) if store.exists(f"{SHARDS_DIR}/{n}/{COMMIT_FILE}"))




# ---------------------------------------------------------------------------------------------
# Every row


def verify_rows(reader, index: int) -> list[Problem]:
    """Every row of shard `index` through the table of row invariants, block by block (chunk_rows rows).

    Adds what a block cannot see alone: each sequence's loss rows summed over the blocks it spans against
    its meta row's num_loss_tokens, and the shard's top-K mass against the manifest's topk_mass_sum.
    """
    entry = reader.manifest.shards[index]
    view = reader.shard(index)
    table = reader.meta(index)
    num_loss_tokens = table.column("num_loss_tokens").to_numpy(zero_copy_only=False)
    prompt_length = table.column("prompt_length").to_numpy(zero_copy_only=False)
    block_rows = int(reader.manifest.settings["chunk_rows"])
    losses = np.zeros(entry.num_sequences, dtype=np.int64)
    mass = 0.0
    fields = row_arrays(reader.manifest.tail_samples)  # every row field, the top K decoded
    try:
        for start in range(0, entry.num_tokens, block_rows):
            stop = min(start + block_rows, entry.num_tokens)
            rows = view.read_rows(start, stop, fields)  # the row invariants, checked by the reader
            first, counts = check_sequence_rows(rows["loss_mask"], start, view.offsets, prompt_length, entry.name)
            losses[first:first + len(counts)] += counts
            mass += float(np.exp(rows["topk_logprobs"].astype(np.float64)).sum())
    except CacheError as exc:
        return [Problem(entry.name, "rows", str(exc))]
    problems = []
    bad = np.flatnonzero(losses != num_loss_tokens)
    if len(bad):
        i = int(bad[0])
        problems.append(Problem(entry.name, "loss_mask", f"sequence {i} has {int(losses[i])} loss rows, its meta row's "
                                f"num_loss_tokens says {int(num_loss_tokens[i])} ({len(bad)} sequence(s) disagree)"))
    if abs(mass - entry.topk_mass_sum) > 1e-6 * (entry.num_tokens + 1):
        problems.append(Problem(entry.name, "topk_logprobs", f"the rows' top-K probabilities sum to {mass:.6f}, the "
                                f"manifest's topk_mass_sum says {entry.topk_mass_sum:.6f}"))
    return problems
