"""CacheReader: open a complete cache, check it, and read rows without loading whole shards.

Opening reads and strictly validates manifest.json (missing manifest -> IncompleteCacheError with
the number of committed shards) and, by default, checks that every listed object exists with its
recorded size (one listing per shard, cheap). `verify()` recomputes every sha256. With
`verify_on_read=True` each shard's objects are hashed the first time that shard is opened, so a
trainer never consumes a flipped byte.

A reader never writes. Knows the format and numpy; nothing about models or training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from shared.format import (
    ARRAY_NDIM,
    BUILD_FILE,
    COMMIT_FILE,
    MANIFEST_FILE,
    ROW_ARRAYS,
    SHARDS_DIR,
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    IncompleteCacheError,
    array_dtypes,
)
from shared.manifest import Manifest, ShardEntry, parse_manifest
from shared.store import Store, open_store


@dataclass
class Problem:
    shard: str
    object: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.object}: {self.message}"


def check_objects(store: Store, entry: ShardEntry, *, hashes: bool) -> list[Problem]:
    """Compare the stored objects of one shard with the manifest (sizes, and sha256 if hashes)."""
    problems = []
    listed = store.list_files(entry.path)
    meta_size = store.size(entry.meta_path)
    for key, info in sorted(entry.objects.items()):
        size = listed.get(key) if key.startswith(entry.path + "/") else meta_size
        if size is None:
            problems.append(Problem(entry.name, key, "missing"))
            continue
        if size != info.size:
            problems.append(Problem(entry.name, key, f"size {size} bytes, manifest says {info.size} (truncated or replaced)"))
            continue
        if hashes:
            digest = hashlib.sha256(store.read_bytes(key)).hexdigest()
            if digest != info.sha256:
                problems.append(Problem(entry.name, key, f"sha256 {digest[:12]}... does not match the manifest's {info.sha256[:12]}..."))
    return problems


def count_committed(store: Store) -> int:
    return sum(1 for n in store.list_dir(SHARDS_DIR) if store.exists(f"{SHARDS_DIR}/{n}/{COMMIT_FILE}"))


class ShardView:
    """Lazy access to one shard's arrays; row ranges read only the chunks they touch."""

    def __init__(self, reader: "CacheReader", entry: ShardEntry):
        import zarr

        self.entry = entry
        self._group = zarr.open_group(store=reader.store.zarr_store(entry.path), mode="r", zarr_format=3)
        self._arrays = {}
        expected = array_dtypes(reader.manifest.vocab_size)
        for name, ndim in ARRAY_NDIM.items():
            try:
                arr = self._group[name]
            except KeyError as exc:
                raise CacheCorruptError(f"{entry.name}: array {name!r} is missing", [(entry.name, name, "missing")]) from exc
            if arr.ndim != ndim or str(arr.dtype) != expected[name]:
                raise CacheFormatError(
                    f"{entry.name}: array {name} is {arr.dtype}{arr.shape}, the format says {expected[name]} with {ndim} dims"
                )
            self._arrays[name] = arr
        offsets = np.asarray(self._arrays["offsets"][:])
        if (len(offsets) != entry.num_sequences + 1 or offsets[0] != 0 or offsets[-1] != entry.num_tokens
                or np.any(np.diff(offsets) < 1)):
            raise CacheCorruptError(
                f"{entry.name}: offsets are inconsistent with the manifest ({entry.num_sequences} sequences, {entry.num_tokens} tokens)",
                [(entry.name, "offsets", "inconsistent")],
            )
        top_k = reader.manifest.top_k
        for name in ROW_ARRAYS:
            shape = self._arrays[name].shape
            want = (entry.num_tokens, top_k) if ARRAY_NDIM[name] == 2 else (entry.num_tokens,)
            if shape != want:
                raise CacheCorruptError(f"{entry.name}: {name} has shape {shape}, expected {want}", [(entry.name, name, "shape")])
        self.offsets = offsets

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def read_rows(self, start: int, stop: int, fields: tuple[str, ...] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the row arrays, as numpy."""
        if not 0 <= start <= stop <= int(self.offsets[-1]):
            raise IndexError(f"{self.entry.name}: rows [{start}, {stop}) outside [0, {int(self.offsets[-1])})")
        return {name: np.asarray(self._arrays[name][start:stop]) for name in fields}

    def read_sequence(self, i: int, fields: tuple[str, ...] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        return self.read_rows(int(self.offsets[i]), int(self.offsets[i + 1]), fields)

    def read_sequences(self, indices, fields: tuple[str, ...] = ROW_ARRAYS) -> list[dict[str, np.ndarray]]:
        """Several sequences of this shard, reading one contiguous row span (fast when they are near)."""
        indices = list(indices)
        if not indices:
            return []
        lo = int(self.offsets[min(indices)])
        hi = int(self.offsets[max(indices) + 1])
        block = self.read_rows(lo, hi, fields)
        out = []
        for i in indices:
            a, b = int(self.offsets[i]) - lo, int(self.offsets[i + 1]) - lo
            out.append({k: v[a:b] for k, v in block.items()})
        return out


class CacheReader:
    """Open a cache for reading. Raises IncompleteCacheError, CacheFormatError, CacheCorruptError."""

    def __init__(self, url: str, *, check_sizes: bool = True, verify_on_read: bool = False,
                 storage_options: dict | None = None):
        self.url = url
        self.store = open_store(url, storage_options=storage_options)
        if self.store.local and not self.store.fs.exists(self.store.root):
            raise CacheError(f"no cache at {url}: the folder does not exist (build one with `kdcache build`)")
        if not self.store.exists(MANIFEST_FILE):
            if not self.store.exists(BUILD_FILE) and not self.store.exists(SHARDS_DIR):
                raise CacheError(f"{url} is not a kdcache cache: it has no {MANIFEST_FILE}")
            n = count_committed(self.store)
            planned = ""
            if self.store.exists(BUILD_FILE):
                try:
                    planned = f" of {json.loads(self.store.read_bytes(BUILD_FILE))['plan']['num_shards']}"
                except (ValueError, KeyError, TypeError):
                    planned = ""
            raise IncompleteCacheError(
                f"incomplete cache at {url}: no {MANIFEST_FILE}, {n}{planned} shards committed. Rerun the same "
                "`kdcache build` command to resume it (or `kdcache finalize` if all workers have finished)."
            )
        self.manifest: Manifest = parse_manifest(self.store.read_bytes(MANIFEST_FILE))
        self.verify_on_read = verify_on_read
        self._verified: set[str] = set()
        self._views: dict[int, ShardView] = {}
        if check_sizes:
            problems = [p for e in self.manifest.shards for p in check_objects(self.store, e, hashes=False)]
            if problems:
                raise CacheCorruptError(
                    f"cache {url} is damaged: " + "; ".join(str(p) for p in problems[:10])
                    + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                    + ". Run `kdcache verify` for the full list; rebuild the named shards.",
                    [(p.shard, p.object, p.message) for p in problems],
                )

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest.shards

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def shard(self, index: int) -> ShardView:
        """The shard's view (opened once, cached). Hashes its objects first if verify_on_read."""
        view = self._views.get(index)
        if view is None:
            entry = self.manifest.shards[index]
            if self.verify_on_read and entry.name not in self._verified:
                problems = check_objects(self.store, entry, hashes=True)
                if problems:
                    raise CacheCorruptError(
                        f"cache {self.url} is damaged: " + "; ".join(str(p) for p in problems),
                        [(p.shard, p.object, p.message) for p in problems],
                    )
                self._verified.add(entry.name)
            view = ShardView(self, entry)
            self._views[index] = view
        return view

    def sequence_lengths(self) -> list[np.ndarray]:
        """Per shard, the length of every sequence (reads only the small offsets arrays)."""
        return [np.diff(self.shard(i).offsets) for i in range(self.num_shards)]

    def meta(self, index: int):
        """The shard's meta table (pyarrow.Table)."""
        import pyarrow.parquet as pq

        entry = self.manifest.shards[index]
        with self.store.fs.open(self.store.path(entry.meta_path), "rb") as f:
            return pq.read_table(f)

    def iter_sequences(self, fields: tuple[str, ...] = ROW_ARRAYS):
        """Every sequence in storage order as (shard index, sequence index, arrays)."""
        for s in range(self.num_shards):
            view = self.shard(s)
            for i in range(view.num_sequences):
                yield s, i, view.read_sequence(i, fields)

    def verify(self) -> list[Problem]:
        """Recompute every object's sha256 and check every shard's structure; [] when all is well."""
        problems = []
        for entry in self.manifest.shards:
            found = check_objects(self.store, entry, hashes=True)
            problems.extend(found)
            if not found:
                try:
                    ShardView(self, entry)
                except CacheError as exc:
                    problems.append(Problem(entry.name, "arrays", str(exc)))
        return problems
