"""CacheReader: open a complete cache, check it, and read rows without loading whole shards.

Opening reads manifest.json (a regular file inside the root, its size bounded before it is read) and
validates it strictly: its cache_key is recomputed from its own header and its seal checked (shared.identity;
a mismatch names the header fields that differ from build.json, when there is one). By default it then
checks that every listed object exists as a regular file with its recorded size and that no unlisted object
hides in a shard. With `verify_on_read=True` each shard's objects are hashed the first time that shard is
opened, and a meta file before its table is read, so a trainer never consumes a flipped byte.

A cache may come from someone else, so nothing in it is trusted beyond the format's rules: each zarr.json
must be exactly the writer's and every chunk is read through a guard (shared.guards), every block of rows
read is checked against the format's one table of row invariants (shared.rows) and, for the sequences it
holds whole, against their meta rows. Each refusal is a CacheError subclass naming the shard and the object
or row. A reader never writes. Knows the format and numpy; nothing about models or training.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from shared.format import (
    BUILD_FILE,
    DECODED_FROM,
    LOGPROB_DTYPE,
    MANIFEST_FILE,
    MAX_BOOKKEEPING_BYTES,
    MAX_MANIFEST_BYTES,
    ROW_ARRAYS,
    SHARDS_DIR,
    TAIL_ARRAYS,
    TOPK_ARRAYS,
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    CacheIdentityError,
    IncompleteCacheError,
    row_arrays,
)
from shared.guards import (
    MAX_METADATA_BYTES,
    check_array_metadata,
    check_group_metadata,
    guarded,
    read_meta_table,
)
from shared.identity import SECTIONS, compute_cache_key, section_differences
from shared.manifest import Manifest, ShardEntry, parse_manifest
from shared.rows import RowBlock, check_loss_counts, check_rows, check_sequence_rows, last_rows_mask, nan_or_positive
from shared.store import Store, open_store
from shared.topk_codec import codes_to_logprobs, decode_id_rows, decode_prob_codes
from shared.verify import Problem, check_bookkeeping, check_objects, count_committed, verify_rows


class ShardView:
    """Lazy access to one shard's arrays; row ranges read only the chunks they touch, and are decoded and checked."""

    def __init__(self, reader: CacheReader, entry: ShardEntry):
        import zarr

        from shared.encode import shard_shapes, zarr_chunk_shape

        self.reader, self.entry = reader, entry
        manifest = reader.manifest
        self.vocab_size, self.top_k, self.tail_samples = manifest.vocab_size, manifest.top_k, manifest.tail_samples
        where = entry.name
        chunk_rows = int(manifest.settings["chunk_rows"])
        self.levels = manifest.arrays["topk_prob_steps"]["levels"]  # L and N, checked by the manifest's parser
        shapes = shard_shapes(entry.num_tokens, entry.num_sequences, self.top_k, self.tail_samples, self.vocab_size,
                              chunk_rows=chunk_rows, table_size=manifest.arrays["topk_id_table"]["table_size"])
        self.row_chunk = zarr_chunk_shape("topk_id_codes", shapes["topk_id_codes"][0], chunk_rows)[0]  # one table each
        check_group_metadata(self._metadata(reader.store, f"{entry.path}/zarr.json"), key=f"{entry.path}/zarr.json",
                             where=where)
        self._arrays = {}
        for name, (shape, dtype) in shapes.items():
            key = f"{entry.path}/{name}/zarr.json"
            chunk_bytes = check_array_metadata(self._metadata(reader.store, key), key=key, where=where, name=name,
                                               shape=shape, dtype=dtype, chunk_rows=chunk_rows)
            try:
                store = guarded(reader.store.zarr_store(entry.path), name, chunk_bytes, where)
                arr = zarr.open_array(store=store, path=name, mode="r", zarr_format=3)
            except CacheError:
                raise
            except Exception as exc:  # zarr's own errors on metadata it cannot use
                raise CacheFormatError(f"{where}: {key}: Zarr cannot open it ({type(exc).__name__}: {exc})") from exc
            if arr.shape != shape or str(arr.dtype) != dtype:  # after Zarr's own parsing
                raise CacheFormatError(f"{where}: array {name} is {arr.dtype}{arr.shape}, the format says "
                                       f"{dtype}{shape}")
            self._arrays[name] = arr
        offsets = self._read("offsets", slice(None))
        if (len(offsets) != entry.num_sequences + 1 or offsets[0] != 0 or offsets[-1] != entry.num_tokens
                or np.any(np.diff(offsets) < 1)):
            raise CacheCorruptError(
                f"{entry.name}: offsets are inconsistent with the manifest ({entry.num_sequences} sequences, "
                f"{entry.num_tokens} tokens): they must start at 0, grow strictly and end at {entry.num_tokens}",
                [(entry.name, "offsets", "inconsistent")],
            )
        self.offsets = offsets

    def _metadata(self, store: Store, key: str) -> bytes:
        """A zarr.json the manifest lists, read after checking its listed size."""
        info = self.entry.objects.get(key)
        if info is None:
            raise CacheFormatError(f"{self.entry.name}: {key} is not listed in the manifest; a shard's metadata "
                                   "must be covered by its checksums")
        if info.size > MAX_METADATA_BYTES:
            raise CacheFormatError(f"{self.entry.name}: {key} is {info.size:,} bytes; metadata over "
                                   f"{MAX_METADATA_BYTES:,} bytes is refused")
        try:
            raw = store.read_bytes(key, max_bytes=MAX_METADATA_BYTES)
        except FileNotFoundError as exc:
            raise CacheCorruptError(f"{self.entry.name}: {key} is missing", [(self.entry.name, key, "missing")]) from exc
        if len(raw) != info.size:
            raise CacheCorruptError(f"{self.entry.name}: {key} is {len(raw)} bytes, the manifest says {info.size}",
                                    [(self.entry.name, key, "size")])
        return raw

    def _read(self, name: str, rows: slice) -> np.ndarray:
        try:
            return np.asarray(self._arrays[name][rows])
        except CacheError:
            raise
        except Exception as exc:  # a chunk Zarr cannot decode (hostile or damaged, checksums notwithstanding)
            raise CacheCorruptError(f"{self.entry.name}: array {name}: cannot decode its chunks "
                                    f"({type(exc).__name__}: {exc})", [(self.entry.name, name, "decode")]) from exc

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def read_rows(self, start: int, stop: int, fields: tuple[str, ...] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the row fields (ROW_ARRAYS and, with tail samples, TAIL_ARRAYS), as numpy: topk_ids
        and topk_logprobs decoded from their stored arrays (storage_layout.md 3.1), every field checked first
        (module docstring), with whatever else was read to decode them."""
        num_rows = int(self.offsets[-1])
        if not 0 <= start <= stop <= num_rows:
            raise IndexError(f"{self.entry.name}: rows [{start}, {stop}) outside [0, {num_rows})")
        stored = {}
        for name in fields:
            if name not in row_arrays(self.tail_samples):
                raise KeyError(f"{self.entry.name} has no row field {name!r}" + (
                    " (the cache was built without --tail-samples)" if name in TAIL_ARRAYS else ""))
            for array in DECODED_FROM.get(name, (name,)):
                if array not in stored:
                    chunks = slice(start // self.row_chunk, (stop - 1) // self.row_chunk + 1) if stop > start else slice(0, 0)
                    stored[array] = self._read(array, chunks if array == "topk_id_table" else slice(start, stop))
        block, codes = self._decode(stored, start)
        if stop > start:
            self._check(block, codes, start, stop)
        return {name: block[name] for name in fields}

    def _decode(self, stored: dict[str, np.ndarray], start: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """topk_ids and topk_logprobs (float16) of the block from their stored arrays, with the steps' codes."""
        block = {name: values for name, values in stored.items() if name not in TOPK_ARRAYS}
        codes, arrays = None, ()
        try:
            if "topk_id_codes" in stored:
                arrays = DECODED_FROM["topk_ids"]
                block["topk_ids"] = decode_id_rows(stored["topk_id_codes"], stored["topk_id_table"], start,
                                                   self.row_chunk, self.vocab_size)
            if "topk_prob_steps" in stored:
                arrays = DECODED_FROM["topk_logprobs"]
                codes = decode_prob_codes(stored["topk_prob_steps"], self.levels, start)
                tail = stored["tail_logprob"]  # a NaN or positive one is refused below, by the rule that names it
                tail = np.where(nan_or_positive(tail), LOGPROB_DTYPE.type(-np.inf), tail)
                block["topk_logprobs"] = codes_to_logprobs(codes, tail, self.levels, LOGPROB_DTYPE, start)
        except ValueError as exc:  # what no writer stores (shared.topk_codec)
            raise CacheFormatError(f"{self.entry.name}: {', '.join(arrays)}: {exc}; the rows cannot be decoded "
                                   "(storage_layout.md 3.1): rebuild the shard") from exc
        return block, codes

    def _check(self, rows: dict[str, np.ndarray], codes: np.ndarray | None, start: int, stop: int) -> None:
        """The table of row invariants on the block, and the sequences it touches against their meta rows."""
        last = last_rows_mask(self.offsets, start, stop)
        following = None
        if "input_ids" in rows and stop < int(self.offsets[-1]) and not last[-1]:
            following = int(self._read("input_ids", slice(stop, stop + 1))[0])  # the last row's next token
        check_rows(RowBlock(rows, start, last, vocab_size=self.vocab_size, top_k=self.top_k, tail_samples=self.tail_samples,
                            following_id=following, prob_codes=codes, levels=self.levels), self.entry.name)
        if "loss_mask" in rows:  # the sequences the block touches, whole: their other rows' mask is read too
            num_loss_tokens, prompt_length = self.reader.sequence_meta(self.entry.index)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
            lo, hi = int(self.offsets[first]), int(self.offsets[last + 1])
            mask = rows["loss_mask"] if (lo, hi) == (start, stop) else self._read("loss_mask", slice(lo, hi))
            first, counts = check_sequence_rows(mask, lo, self.offsets, prompt_length, self.entry.name)
            check_loss_counts(first, counts, np.ones(len(counts), dtype=bool), num_loss_tokens, self.entry.name)

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
        if self.store.local and not self.store.fs.isdir(self.store.root):
            raise CacheError(f"no cache at {url}: it is a file, not a cache folder")
        self.manifest: Manifest = self._open_manifest()
        self.verify_on_read = verify_on_read
        self._verified: set[str] = set()
        self._views: dict[int, ShardView] = {}
        self._sequence_meta: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if check_sizes:
            problems = [p for e in self.manifest.shards for p in check_objects(self.store, e, hashes=False)]
            if problems:
                raise CacheCorruptError(
                    f"cache {url} is damaged: " + "; ".join(str(p) for p in problems[:10])
                    + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                    + f". Run `kdcache verify {url}` for the full list and how to repair it.",
                    [(p.shard, p.object, p.message) for p in problems],
                )

    def _open_manifest(self) -> Manifest:
        """manifest.json parsed (shared.manifest); an incomplete cache says how far it got; an identity
        mismatch names the header fields that differ from build.json when one is there."""
        url, store = self.url, self.store
        try:
            raw = store.read_bytes(MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            if not store.exists(BUILD_FILE) and not store.exists(SHARDS_DIR):
                raise CacheError(f"{url} is not a kdcache cache: it has no {MANIFEST_FILE}") from None
            planned = ""
            try:
                planned = f" of {int(json.loads(store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))['plan']['num_shards'])}"
            except (OSError, CacheError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                planned = ""
            raise IncompleteCacheError(
                f"incomplete cache at {url}: no {MANIFEST_FILE}, {count_committed(store)}{planned} shards committed. "
                "Rerun the same `kdcache build` command to resume it (or `kdcache finalize` if all workers have "
                "finished).") from None
        try:
            return parse_manifest(raw)
        except CacheIdentityError as exc:
            raise CacheIdentityError(f"{exc}{self._differences_from_build(exc)}", exc.sections, exc.cache_key) from exc

    def _differences_from_build(self, exc: CacheIdentityError) -> str:
        try:
            build = json.loads(self.store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))
        except (OSError, CacheError, ValueError, UnicodeDecodeError):
            return "; there is no readable build.json to compare its header with. Rebuild the cache"
        if not isinstance(build, dict):
            return "; build.json is not a JSON object, so the fields that changed cannot be named. Rebuild the cache"
        recomputed = compute_cache_key(*(exc.sections[name] for name in SECTIONS))
        if build.get("cache_key") == recomputed != exc.cache_key and not section_differences(build, exc.sections):
            return (f"; build.json agrees with the header (key {recomputed[:12]}...): the manifest's cache_key was "
                    f"relabelled to {exc.cache_key[:12]}..., another build's. Do not use this cache as that build")
        if build.get("cache_key") != exc.cache_key:
            return "; build.json is of another build, so the fields that changed cannot be named. Rebuild the cache"
        diffs = section_differences(build, exc.sections)
        if not diffs:
            return "; its header equals build.json's, so a field outside the header changed. Rebuild the cache"
        return "; fields that differ from build.json: " + "; ".join(diffs) + ". Rebuild the cache"

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
        """The shard's meta table (pyarrow.Table) of the format's columns (META_COLUMNS), checked first and after
        (shared.guards.read_meta_table). With verify_on_read the file is hashed first (unless its shard already
        was) and the checked bytes are the ones decoded."""
        entry = self.manifest.shards[index]
        where = f"{entry.name}: {entry.meta_path}"
        try:
            if self.verify_on_read and entry.name not in self._verified:
                source = io.BytesIO(self._verified_object(entry, entry.meta_path))
            else:
                source = self.store.open_file(entry.meta_path)
            with source as f:
                table = read_meta_table(f, entry, where)
        except CacheError:
            raise
        except FileNotFoundError as exc:
            raise CacheCorruptError(f"{where} is missing", [(entry.name, entry.meta_path, "missing")]) from exc
        except Exception as exc:  # pyarrow's own errors on a damaged file
            raise CacheCorruptError(f"{where} cannot be read as Parquet ({type(exc).__name__}: {exc})",
                                    [(entry.name, entry.meta_path, "unreadable")]) from exc
        self._sequence_meta[index] = (table.column("num_loss_tokens").to_numpy(zero_copy_only=False),
                                      table.column("prompt_length").to_numpy(zero_copy_only=False))
        return table

    def sequence_meta(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(num_loss_tokens, prompt_length) of every sequence of shard `index`, from its meta table (read once)."""
        if index not in self._sequence_meta:
            self.meta(index)
        return self._sequence_meta[index]

    def _verified_object(self, entry: ShardEntry, key: str) -> bytes:
        """One object's bytes after checking their size and sha256 against the manifest (verify_on_read)."""
        info = entry.objects[key]
        data = self.store.read_bytes(key, max_bytes=info.size)
        if len(data) != info.size:
            problem = f"size {len(data)} bytes, manifest says {info.size} (truncated or replaced)"
        elif hashlib.sha256(data).hexdigest() != info.sha256:
            problem = (f"sha256 {hashlib.sha256(data).hexdigest()[:12]}... does not match the manifest's "
                       f"{info.sha256[:12]}...")
        else:
            return data
        raise CacheCorruptError(f"cache {self.url} is damaged: {entry.name}: {key}: {problem}",
                                [(entry.name, key, problem)])

    def iter_sequences(self, fields: tuple[str, ...] = ROW_ARRAYS):
        """Every sequence in storage order as (shard index, sequence index, arrays)."""
        for s in range(self.num_shards):
            view = self.shard(s)
            for i in range(view.num_sequences):
                yield s, i, view.read_sequence(i, fields)

    def verify(self, *, bookkeeping: bool = False, rows: bool = False) -> list[Problem]:
        """Recompute every object's sha256 and check every shard's structure; [] when all is well.

        Structure: each shard's arrays open as section 3.1 demands, offsets agree with the manifest, and the
        meta table (section 4) agrees with them. rows: also stream every row through the table of row
        invariants and the per-sequence rules (shared.verify.verify_rows), as `kdcache verify` does; a
        trainer leaves it out since it checks every block it reads.

        bookkeeping: also check owner.json, build.json and the commit files (check_bookkeeping), as `kdcache
        verify` does; training leaves them out since it never reads them.
        """
        problems = []
        for entry in self.manifest.shards:
            found = check_objects(self.store, entry, hashes=True)
            problems.extend(found)
            if found:
                continue
            try:
                view = ShardView(self, entry)
                self._verified.add(entry.name)
                self._views.setdefault(entry.index, view)
            except CacheError as exc:
                problems.append(Problem(entry.name, "arrays", str(exc)))
                continue
            try:
                lengths = self.meta(entry.index).column("num_tokens").to_numpy(zero_copy_only=False)
            except CacheError as exc:
                problems.append(Problem(entry.name, entry.meta_path, str(exc)))
                continue
            if not np.array_equal(lengths, np.diff(view.offsets)):
                problems.append(Problem(entry.name, entry.meta_path, "num_tokens disagrees with the offsets array"))
            elif rows:
                problems.extend(verify_rows(self, entry.index))
        if bookkeeping:
            problems.extend(check_bookkeeping(self.store, self.manifest))
        return problems


__all__ = ["CacheReader", "Problem", "ShardView", "check_objects", "count_committed"]
