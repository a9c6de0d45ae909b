"""CacheReader: open a complete cache, check it, and read rows without loading whole shards.

Opening reads and strictly validates manifest.json (missing manifest -> IncompleteCacheError with
the number of committed shards) and, by default, checks that every listed object exists with its
recorded size and that no unlisted object hides in a shard (one listing per shard, cheap).
`verify()` recomputes every sha256. With `verify_on_read=True` each shard's objects are hashed the
first time that shard is opened, and a meta file before its table is read, so a trainer never
consumes a flipped byte.

A cache may come from someone else, so nothing in it is trusted beyond the format's rules: each
array's `zarr.json` is checked against the manifest (shape, dtype, chunk size, an allow-list of
codecs) before Zarr sees it, a chunk whose compressed header promises more bytes than its chunk
holds is refused before it is decompressed, every row range read is checked (ids < V, no NaN or
positive log-probs), and the meta Parquet file's schema, row count and decoded size (footer and page
headers) are checked before it is read; only its mandatory columns are ever decoded. Each refusal is
a CacheError subclass naming the shard and the object.

A reader never writes. Knows the format and numpy; nothing about models or training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np

from shared.format import (
    ARRAY_NDIM,
    ARRAY_TO_BYTES_CODECS,
    BUILD_FILE,
    BYTES_TO_BYTES_CODECS,
    COMMIT_FILE,
    LOGPROB_MAX,
    MANIFEST_FILE,
    MAX_BOOKKEEPING_BYTES,
    MAX_CHUNK_BYTES,
    MAX_TEXT_SHA256_CHARS,
    META_BYTES_FIXED,
    META_BYTES_PER_SEQUENCE,
    META_COLUMNS,
    OWNER_FILE,
    ROW_ARRAYS,
    SHARDS_DIR,
    TAIL_ARRAYS,
    TARGET_SENTINEL,
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    IncompleteCacheError,
    array_dtypes,
    row_arrays,
    row_width,
)
from shared.manifest import Manifest, ShardEntry, parse_manifest
from shared.store import Store, open_store

MAX_METADATA_BYTES = 2**20  # a zarr.json is a few hundred bytes; refuse to parse megabytes
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
            problems.append(Problem(entry.name, key, f"size {size} bytes, manifest says {info.size} (truncated or replaced)"))
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
                problems.append(Problem(entry.name, key, f"sha256 {digest[:12]}... does not match the manifest's {expected[:12]}..."))
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
    from shared.ownership import KIND, TOOL, read_marker

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
        if not (isinstance(commit, dict) and commit.pop("cache_key", None) == manifest.cache_key
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
# Zarr metadata, checked before Zarr reads it


def check_array_metadata(raw: bytes, *, key: str, where: str, shape: tuple[int, ...], dtype: str) -> tuple[int, bool]:
    """Validate one array's zarr.json against what the manifest implies.

    Returns (a chunk's decoded size in bytes, whether the chunks are blosc-compressed).

    Refuses (CacheFormatError naming `where` and `key`): malformed JSON, another shape or dtype
    than the manifest's counts give, an irregular grid, a chunk over MAX_CHUNK_BYTES decoded, a
    codec outside the allow-list, storage transformers.
    """
    def bad(message: str) -> CacheFormatError:
        return CacheFormatError(f"{where}: {key}: {message}")

    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("is not Zarr v3 array metadata (zarr_format 3, node_type 'array')")
    stored_shape = meta.get("shape")
    if (not isinstance(stored_shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in stored_shape)
            or tuple(stored_shape) != tuple(shape)):
        raise bad(f"claims shape {stored_shape!r:.80}, the manifest's counts give {list(shape)}")
    if meta.get("data_type") != dtype:
        raise bad(f"claims data_type {meta.get('data_type')!r:.40}, the format says {dtype!r}")
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if (not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list)
            or len(chunks) != len(shape)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in chunks)):
        raise bad(f"needs a regular chunk grid of {len(shape)} positive sizes, got {grid!r:.120}")
    chunk_bytes = math.prod(chunks) * np.dtype(dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise bad(f"chunks of {chunks} decode to {chunk_bytes:,} bytes; the format's limit is {MAX_CHUNK_BYTES:,}")
    if meta.get("storage_transformers") not in (None, []):
        raise bad("uses storage transformers, which the format does not allow")
    codecs = meta.get("codecs")
    if not isinstance(codecs, list) or not codecs:
        raise bad("has no codecs list")
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    if (names[0] not in ARRAY_TO_BYTES_CODECS
            or any(n not in BYTES_TO_BYTES_CODECS for n in names[1:])):
        raise bad(f"uses codecs {names!r:.120}; allowed: {ARRAY_TO_BYTES_CODECS[0]} then any of "
                  f"{', '.join(BYTES_TO_BYTES_CODECS)}")
    return chunk_bytes, "blosc" in names


def _blosc_header_problem(head: bytes, length: int, chunk_bytes: int) -> str | None:
    """A blosc frame announces its decoded size (bytes 4..8) and its own length (12..16): check both."""
    if len(head) < 16:
        return f"a compressed chunk of {length} bytes is too short for a blosc header"
    nbytes = int.from_bytes(head[4:8], "little")
    cbytes = int.from_bytes(head[12:16], "little")
    if nbytes > chunk_bytes:
        return f"a compressed chunk announces {nbytes:,} decoded bytes, more than a chunk's {chunk_bytes:,}"
    if cbytes > length:
        return f"a compressed chunk announces {cbytes:,} bytes but holds {length:,}"
    return None


def _guarded(store, name: str, chunk_bytes: int, where: str):
    """Wrap a read-only Zarr store so that no blosc chunk of array `name` decodes to more than chunk_bytes.

    The header is checked before the decoder allocates what it announces. Subclassing zarr's
    WrapperStore is Zarr's own hook for this; only `get` is changed.
    """
    from zarr.storage import WrapperStore

    class ChunkSizeGuard(WrapperStore):
        def _with_store(self, inner):
            return _guarded(inner, name, chunk_bytes, where)

        async def get(self, key, prototype, byte_range=None):
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None and byte_range is None and key.startswith(f"{name}/") and key != f"{name}/zarr.json":
                problem = _blosc_header_problem(buf.as_numpy_array()[:16].tobytes(), len(buf), chunk_bytes)
                if problem is not None:
                    raise CacheFormatError(f"{where}: {name}: chunk {key[len(name) + 1:]}: {problem}")
            return buf

    return ChunkSizeGuard(store)


class ShardView:
    """Lazy access to one shard's arrays; row ranges read only the chunks they touch."""

    def __init__(self, reader: CacheReader, entry: ShardEntry):
        import zarr

        self.entry = entry
        self.vocab_size = reader.manifest.vocab_size
        where = entry.name
        top_k, tail_samples = reader.manifest.top_k, reader.manifest.tail_samples
        self.tail_samples = tail_samples
        dtypes = array_dtypes(reader.manifest.vocab_size, tail_samples)
        shapes = {name: (entry.num_tokens,) + ((row_width(name, top_k, tail_samples),) if ARRAY_NDIM[name] == 2 else ())
                  for name in row_arrays(tail_samples)}
        shapes["offsets"] = (entry.num_sequences + 1,)

        group_meta = self._metadata(reader.store, f"{entry.path}/zarr.json")
        try:
            group_ok = json.loads(group_meta).get("node_type") == "group"
        except (ValueError, UnicodeDecodeError, AttributeError):
            group_ok = False
        if not group_ok:
            raise CacheFormatError(f"{where}: {entry.path}/zarr.json is not Zarr v3 group metadata")
        self._arrays = {}
        for name in dtypes:
            key = f"{entry.path}/{name}/zarr.json"
            chunk_bytes, blosc = check_array_metadata(self._metadata(reader.store, key), key=key, where=where,
                                                      shape=shapes[name], dtype=dtypes[name])
            try:
                store = reader.store.zarr_store(entry.path)
                if blosc:
                    store = _guarded(store, name, chunk_bytes, where)
                arr = zarr.open_array(store=store, path=name, mode="r", zarr_format=3)
            except CacheError:
                raise
            except Exception as exc:  # zarr's own errors on metadata it cannot use
                raise CacheFormatError(f"{where}: {key}: Zarr cannot open it ({type(exc).__name__}: {exc})") from exc
            if arr.shape != shapes[name] or str(arr.dtype) != dtypes[name]:  # after Zarr's own parsing
                raise CacheFormatError(f"{where}: array {name} is {arr.dtype}{arr.shape}, the format says "
                                       f"{dtypes[name]}{shapes[name]}")
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
            raw = store.read_bytes(key)
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
        """Rows [start, stop) of the row arrays, as numpy; values outside the format's ranges are refused."""
        if not 0 <= start <= stop <= int(self.offsets[-1]):
            raise IndexError(f"{self.entry.name}: rows [{start}, {stop}) outside [0, {int(self.offsets[-1])})")
        out = {}
        for name in fields:
            if name not in self._arrays:
                raise KeyError(f"{self.entry.name} has no array {name!r}" + (
                    " (the cache was built without --tail-samples)" if name in TAIL_ARRAYS else ""))
            values = self._read(name, slice(start, stop))
            _check_values(self.entry.name, name, values, start, self.vocab_size, self.tail_samples)
            out[name] = values
        return out

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


def _check_values(shard: str, name: str, values: np.ndarray, first_row: int, vocab_size: int,
                  tail_samples: int = 0) -> None:
    """Refuse ids >= V, NaN / positive log-probs (storage_layout.md 3) and counts above M (3.3) in rows just read."""
    if values.size == 0:
        return
    if name == "tail_counts":
        bad = values.sum(axis=1, dtype=np.int64) > tail_samples
        if bad.any():
            row = first_row + int(np.argmax(bad))
            raise CacheFormatError(f"{shard}: tail_counts row {row} counts more than the {tail_samples} draws the "
                                   "manifest says (rebuild the shard)")
    elif name in ("input_ids", "topk_ids", "tail_ids"):
        top = values.max()
        if top >= vocab_size:
            row = first_row + int(np.argwhere(values >= vocab_size)[0][0])
            raise CacheFormatError(f"{shard}: {name} row {row} holds id {int(top)}, outside the vocabulary of {vocab_size}")
    elif name in ("topk_logprobs", "tail_logprob", "target_logprob"):
        bad = np.isnan(values)
        bad |= (values > LOGPROB_MAX) & (values != TARGET_SENTINEL) if name == "target_logprob" else values > LOGPROB_MAX
        if bad.any():
            row = first_row + int(np.argwhere(bad)[0][0])
            raise CacheFormatError(f"{shard}: {name} row {row} holds NaN or a positive log-probability; "
                                   "the format forbids both (rebuild the shard)")


# ---------------------------------------------------------------------------------------------
# The meta Parquet file, bounded before it is decoded (storage_layout.md 4)

META_MAX_PAGES = 65536  # pages of the format's columns in one meta file (a real one has a few per column)


def _check_meta_size(f, metadata, entry: ShardEntry, where: str) -> None:
    """Refuse a meta file whose format columns would decode to more than the format allows for its sequences.

    Two sources, both read before any page is decompressed: the footer's sizes of every column chunk
    of META_COLUMNS, and the page headers inside those chunks (what the decoder actually allocates:
    a footer can understate them). Columns outside META_COLUMNS are never decoded and not counted.
    """
    limit = entry.num_sequences * META_BYTES_PER_SEQUENCE + META_BYTES_FIXED
    chunks = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema in META_COLUMNS:
                chunks.append(column)

    def refuse(size: int, source: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"{where}: its columns {', '.join(META_COLUMNS)} would decode to {size:,} bytes by its {source}, more "
            f"than the {limit:,} the format allows for {entry.num_sequences:,} sequences (storage_layout.md 4); "
            "refused before decoding (a decompression bomb or a damaged file): rebuild the shard",
            [(entry.name, entry.meta_path, f"decodes to {size:,} bytes")])

    for name, size in (("footer", sum(c.total_uncompressed_size for c in chunks)),
                       ("footer's compressed sizes", sum(c.total_compressed_size for c in chunks))):
        if size > limit:
            raise refuse(size, name)
    decoded, pages = 0, 0
    for column in chunks:
        start = column.data_page_offset
        if column.has_dictionary_page and 0 < column.dictionary_page_offset < start:
            start = column.dictionary_page_offset
        f.seek(start)
        data = f.read(column.total_compressed_size)
        if start < 0 or len(data) != column.total_compressed_size:
            raise CacheFormatError(f"{where}: column {column.path_in_schema!r} lies outside the file (damaged)")
        pos = 0
        while pos < len(data):
            try:
                fields, used = _thrift_struct(data, pos, 0, wanted=(2, 3))
            except (ValueError, IndexError) as exc:
                raise CacheFormatError(f"{where}: column {column.path_in_schema!r} has a malformed page header "
                                       f"({exc})") from exc
            uncompressed, compressed = fields.get(2, -1), fields.get(3, -1)
            if uncompressed < 0 or compressed < 0:
                raise CacheFormatError(f"{where}: column {column.path_in_schema!r} has a page header without sizes")
            decoded, pages = decoded + uncompressed, pages + 1
            if decoded > limit:
                raise refuse(decoded, "page headers")
            if pages > META_MAX_PAGES:
                raise CacheFormatError(f"{where} has over {META_MAX_PAGES:,} pages in its format columns; refused")
            pos = used + compressed
        if pos != len(data):
            raise CacheFormatError(f"{where}: column {column.path_in_schema!r}: its pages overrun the column chunk")


def _thrift_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _thrift_skip(data: bytes, pos: int, kind: int, depth: int, element: bool = False) -> int:
    """Skip one value of Thrift compact-protocol type `kind` (Parquet's page headers are Thrift structs)."""
    if kind in (1, 2):  # booleans: in the field header, or one byte as a list element
        return pos + 1 if element else pos
    if kind == 3:
        return pos + 1
    if kind in (4, 5, 6):
        return _thrift_varint(data, pos)[1]
    if kind == 7:
        return pos + 8
    if kind == 8:
        length, pos = _thrift_varint(data, pos)
        return pos + length
    if depth > 16:
        raise ValueError("nested too deeply")
    if kind in (9, 10):  # list, set
        head = data[pos]
        pos += 1
        size, item = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _thrift_varint(data, pos)
        if size > len(data) - pos:
            raise ValueError("a list longer than the data")
        for _ in range(size):
            pos = _thrift_skip(data, pos, item, depth + 1, element=True)
        return pos
    if kind == 11:  # map
        size, pos = _thrift_varint(data, pos)
        if size:
            types = data[pos]
            pos += 1
            if 2 * size > len(data) - pos:
                raise ValueError("a map longer than the data")
            for _ in range(size):
                pos = _thrift_skip(data, pos, types >> 4, depth + 1, element=True)
                pos = _thrift_skip(data, pos, types & 0x0F, depth + 1, element=True)
        return pos
    if kind == 12:
        return _thrift_struct(data, pos, depth + 1)[1]
    raise ValueError(f"unknown Thrift type {kind}")


def _thrift_struct(data: bytes, pos: int, depth: int, wanted: tuple[int, ...] = ()) -> tuple[dict[int, int], int]:
    """Read a compact-protocol struct at pos: ({field id: value} of the wanted integer fields, end position)."""
    fields, last = {}, 0
    while True:
        head = data[pos]
        pos += 1
        if head == 0:
            return fields, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            field_id = last + delta
        else:
            raw, pos = _thrift_varint(data, pos)
            field_id = (raw >> 1) ^ -(raw & 1)
        last = field_id
        if field_id in wanted and kind in (4, 5, 6):
            raw, pos = _thrift_varint(data, pos)
            fields[field_id] = (raw >> 1) ^ -(raw & 1)
        else:
            pos = _thrift_skip(data, pos, kind, depth)


def _text_sha256_as_strings(table, entry: ShardEntry, where: str):
    """text_sha256 was read dictionary-encoded (no expansion); check its values' length, then decode it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column("text_sha256")
    if pa.types.is_dictionary(column.type):
        longest = max((pc.max(pc.binary_length(chunk.dictionary)).as_py() or 0 for chunk in column.chunks
                       if len(chunk.dictionary)), default=0)
    else:
        longest = pc.max(pc.binary_length(column)).as_py() or 0
    if longest > MAX_TEXT_SHA256_CHARS:
        raise CacheFormatError(f"{where}: a text_sha256 value is {longest:,} bytes; the format stores a sha256 in hex "
                               f"(at most {MAX_TEXT_SHA256_CHARS} characters)")
    i = table.schema.get_field_index("text_sha256")
    return table.set_column(i, pa.field("text_sha256", pa.string()), column.cast(pa.string()))


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
        if not self.store.exists(MANIFEST_FILE):
            if not self.store.exists(BUILD_FILE) and not self.store.exists(SHARDS_DIR):
                raise CacheError(f"{url} is not a kdcache cache: it has no {MANIFEST_FILE}")
            n = count_committed(self.store)
            planned = ""
            if self.store.exists(BUILD_FILE):
                try:
                    planned = f" of {int(json.loads(self.store.read_bytes(BUILD_FILE))['plan']['num_shards'])}"
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    planned = ""
            raise IncompleteCacheError(
                f"incomplete cache at {url}: no {MANIFEST_FILE}, {n}{planned} shards committed. Rerun the same "
                "`kdcache build` command to resume it (or `kdcache finalize` if all workers have finished)."
            )
        try:
            raw = self.store.read_bytes(MANIFEST_FILE)
        except FileNotFoundError as exc:  # deleted between the check and the read
            raise IncompleteCacheError(f"incomplete cache at {url}: {MANIFEST_FILE} disappeared while opening") from exc
        self.manifest: Manifest = parse_manifest(raw)
        self.verify_on_read = verify_on_read
        self._verified: set[str] = set()
        self._views: dict[int, ShardView] = {}
        if check_sizes:
            problems = [p for e in self.manifest.shards for p in check_objects(self.store, e, hashes=False)]
            if problems:
                raise CacheCorruptError(
                    f"cache {url} is damaged: " + "; ".join(str(p) for p in problems[:10])
                    + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                    + f". Run `kdcache verify {url}` for the full list and how to repair it.",
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
        """The shard's meta table (pyarrow.Table) of the format's columns (META_COLUMNS), checked first.

        Before anything is decoded (storage_layout.md 4): the row count and the columns' types from the
        footer, and that those columns decode to at most META_BYTES_PER_SEQUENCE per sequence (plus
        META_BYTES_FIXED) by the footer's sizes and by every page header. Other columns are never
        decoded. With verify_on_read the file is hashed first (unless its shard already was) and the
        checked bytes are the ones decoded.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        entry = self.manifest.shards[index]
        where = f"{entry.name}: {entry.meta_path}"
        try:
            if self.verify_on_read and entry.name not in self._verified:
                source = io.BytesIO(self._verified_object(entry, entry.meta_path))
            else:
                source = self.store.fs.open(self.store.path(entry.meta_path), "rb")
            with source as f:
                parquet = pq.ParquetFile(f)
                num_rows = parquet.metadata.num_rows
                if num_rows != entry.num_sequences:
                    raise CacheFormatError(f"{where} has {num_rows} rows, the manifest {entry.num_sequences} sequences")
                schema = parquet.schema_arrow
                for column, type_name in META_COLUMNS.items():
                    found = len(schema.get_all_field_indices(column))
                    if found != 1:
                        raise CacheFormatError(f"{where} lacks the mandatory column {column!r}" if not found else
                                               f"{where} has {found} columns named {column!r}")
                    got = schema.field(column).type
                    if got != getattr(pa, type_name)():
                        raise CacheFormatError(f"{where}: column {column!r} is {got}, the format says {type_name}")
                _check_meta_size(f, parquet.metadata, entry, where)
                # text_sha256 stays dictionary-encoded until its values' length is checked (no expansion)
                parquet = pq.ParquetFile(f, metadata=parquet.metadata, read_dictionary=["text_sha256"])
                table = parquet.read(columns=list(META_COLUMNS))
        except CacheError:
            raise
        except FileNotFoundError as exc:
            raise CacheCorruptError(f"{where} is missing", [(entry.name, entry.meta_path, "missing")]) from exc
        except Exception as exc:  # pyarrow's own errors on a damaged file
            raise CacheCorruptError(f"{where} cannot be read as Parquet ({type(exc).__name__}: {exc})",
                                    [(entry.name, entry.meta_path, "unreadable")]) from exc
        table = _text_sha256_as_strings(table, entry, where)
        num_tokens = table.column("num_tokens").to_numpy(zero_copy_only=False)
        order = table.column("sequence_index").to_numpy(zero_copy_only=False)
        if (np.any(num_tokens < 1) or int(num_tokens.sum()) != entry.num_tokens
                or not np.array_equal(order, np.arange(entry.num_sequences))):
            raise CacheFormatError(f"{where}: sequence_index must be 0..{entry.num_sequences - 1} and num_tokens "
                                   f"positive, summing to the manifest's {entry.num_tokens}")
        return table

    def _verified_object(self, entry: ShardEntry, key: str) -> bytes:
        """One object's bytes after checking their size and sha256 against the manifest (verify_on_read)."""
        info = entry.objects[key]
        data = self.store.read_bytes(key)
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

    def verify(self, *, bookkeeping: bool = False) -> list[Problem]:
        """Recompute every object's sha256 and check every shard's structure; [] when all is well.

        Structure: each shard's arrays open as section 3.1 demands, offsets agree with the manifest,
        and the meta table's schema, row count and num_tokens agree with them. Values (ids < V, no
        NaN) are checked as rows are read, not here: verify does not decode every chunk.

        bookkeeping: also check build.json and the commit files (check_bookkeeping), as `kdcache
        verify` does; training leaves them out since it never reads them.
        """
        problems = []
        for entry in self.manifest.shards:
            found = check_objects(self.store, entry, hashes=True)
            problems.extend(found)
            if not found:
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
        if bookkeeping:
            problems.extend(check_bookkeeping(self.store, self.manifest))
        return problems
