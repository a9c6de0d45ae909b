"""How a shard's values become bytes: the top-K rows' codes (shared.topk_codec), Zarr v3 objects, the meta Parquet file.

This module is the format's one encoder (storage_layout.md 3.1, 4). Every Zarr object a writer stores comes
from here, and `array_metadata` states, as a plain dict, the exact `zarr.json` this encoder writes for an
array: a reader accepts no other (shared.guards), so Zarr never reads a chunk grid, codec, key encoding or
fill value that this format did not choose. Every chunk is stored, zeros included (`write_empty_chunks`),
so no value is ever read as an implicit fill. `stored_rows` turns a writer's validated rows into the arrays
stored (the ids become per-chunk codes and tables). `encode_zarr_layout` and `encode_zarr_rows` give a shard
streamed in pieces (chunks encoded in worker processes) exactly the bytes of `encode_zarr_group`.

Knows numpy, Zarr and pyarrow; nothing about models, tokenizers or torch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math

import numpy as np

from shared.format import (
    DECODED_FROM,
    MAX_CHUNK_BYTES,
    MAX_TEXT_SHA256_CHARS,
    META_COLUMNS,
    TOPK_ARRAYS,
    CacheFormatError,
    array_dtypes,
)
from shared.topk_codec import MAX_LEVELS, encode_id_rows, id_table_size, prob_levels

# Blosc with zstd at blosc's level 5 (zstd's 9): measured in BENCHMARKS.md (P4) against other levels and shuffles
# (level 9, zstd's 22, saved 1-2% of the bytes for 6-10x the encoding time). Compression runs beside the teacher
# (worker processes or a writer thread). The top-K arrays hold small integers and are bit-shuffled (zstd then packs
# their zero high bits); the steps are stored rank-major (Zarr's transpose codec puts each rank's column together);
# every other array is byte-shuffled (storage_layout.md 3.1).
BLOSC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}
BIT_SHUFFLED = TOPK_ARRAYS
RANK_MAJOR = ("topk_prob_steps",)


def blosc_of(name: str) -> dict:
    """The blosc configuration of array `name` (without typesize and blocksize)."""
    return {**BLOSC, "shuffle": "bitshuffle"} if name in BIT_SHUFFLED else BLOSC


def topk_coding(top_k: int, vocab_size: int, chunk_rows: int) -> tuple[int, int]:
    """(N, L) this writer uses: the entries of each chunk's id table (one per ENTRIES_PER_TABLE_ID ids of a full
    chunk of chunk_rows rows, at most V) and the sqrt-probability levels for K (shared.topk_codec). Every shard of a
    cache uses the same N, recorded with L in manifest.arrays (storage_layout.md 6.1), from which a reader takes them."""
    return id_table_size(chunk_rows, top_k, vocab_size), prob_levels(top_k)


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
    """chunk_rows rows per chunk (all rows when the shard has fewer); offsets is one chunk; topk_id_table one row
    (the table of one chunk of the other row arrays) per chunk."""
    if name == "offsets":
        rows = max(1, shape[0])
    elif name == "topk_id_table":
        rows = 1
    else:
        rows = max(1, min(chunk_rows, shape[0]))
    return (rows, *shape[1:])


def _create_zarr_array(group, name: str, shape: tuple[int, ...], dtype, chunk_rows: int):
    from zarr.codecs import BloscCodec, TransposeCodec

    return group.create_array(name, shape=tuple(shape), chunks=zarr_chunk_shape(name, tuple(shape), chunk_rows),
                              dtype=dtype, filters=[TransposeCodec(order=(1, 0))] if name in RANK_MAJOR else (),
                              compressors=BloscCodec(**blosc_of(name)), fill_value=0,
                              config={"write_empty_chunks": True})  # every chunk stored: nothing read as a fill


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
    """The chunk objects holding rows [first_row, first_row + n) of each named array as stored (stored_rows), byte
    for byte as encode_zarr_group stores them (every chunk, zeros included).

    The rows are whole chunks: first_row is a multiple of the arrays' chunk rows, and first_row + n is one too or
    the arrays' end. topk_id_table's rows are those of the chunks they make: its first is first_row // the chunk
    rows. Pure and picklable, so that builders call it in worker processes.
    """
    out = {}
    row_chunk = zarr_chunk_shape("input_ids", tuple(shapes["input_ids"][0]), chunk_rows)[0]
    for name, arr in rows.items():
        shape, dtype = shapes[name]
        per_chunk = zarr_chunk_shape(name, tuple(shape), chunk_rows)[0]
        start = first_row // row_chunk if name == "topk_id_table" else first_row
        stop = start + len(arr)
        if start % per_chunk or (stop % per_chunk and stop != shape[0]) or stop > shape[0]:
            raise ValueError(f"{name}: rows [{start}, {stop}) of {shape[0]} are not whole chunks of {per_chunk} rows")
        mem, za = _rows_array(name, tuple(shape), str(np.dtype(dtype)), chunk_rows)
        za[start:stop] = arr
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



def array_descriptions(vocab_size: int, tail_samples: int, *, top_k: int, chunk_rows: int) -> dict:
    """manifest.arrays: each stored array's dtype; topk_id_table's table_size N and topk_prob_steps' levels L."""
    out = {name: {"dtype": dtype} for name, dtype in array_dtypes(vocab_size, tail_samples).items()}
    table_size, levels = topk_coding(top_k, vocab_size, chunk_rows)
    out["topk_id_table"]["table_size"] = table_size
    out["topk_prob_steps"]["levels"] = levels
    return out


def check_array_descriptions(arrays, *, vocab_size: int, tail_samples: int) -> tuple[int, int]:
    """manifest.arrays as a reader accepts it (storage_layout.md 6.1); returns (N, L).

    Exactly the stored arrays, each an object with exactly the fields the writer writes: the dtype of section 3
    for this vocabulary, and topk_id_table's table_size N, an integer in [1, V] whose table chunk is at most
    MAX_CHUNK_BYTES, and topk_prob_steps' levels L, an integer in [2, 65535].
    """
    expected = array_dtypes(vocab_size, tail_samples)
    if not isinstance(arrays, dict) or set(arrays) != set(expected):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise CacheFormatError(f"manifest: arrays must describe exactly {sorted(expected)}, got {got}")
    coding = {"topk_id_table": "table_size", "topk_prob_steps": "levels"}
    for name, desc in arrays.items():
        fields = {"dtype", coding[name]} if name in coding else {"dtype"}
        if not isinstance(desc, dict) or set(desc) != fields or not isinstance(desc["dtype"], str):
            raise CacheFormatError(f"manifest: arrays.{name} must be an object with exactly the fields {sorted(fields)} "
                                   f"(dtype a string), got {desc!r:.120}")
        if desc["dtype"] != expected[name]:
            raise CacheFormatError(f"manifest: arrays.{name}.dtype is {desc['dtype']!r:.40}; the format stores it as "
                                   f"{expected[name]!r} for a vocabulary of {vocab_size}")
    largest_table = min(vocab_size, MAX_CHUNK_BYTES // np.dtype(expected["topk_id_table"]).itemsize)
    bounds = {"table_size": (1, largest_table), "levels": (2, MAX_LEVELS)}
    values = []
    for name, field in coding.items():
        value, (low, high) = arrays[name][field], bounds[field]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise CacheFormatError(f"manifest: arrays.{name}.{field} = {value!r:.40} must be an integer in [{low:,}, "
                                   f"{high:,}] (storage_layout.md 3.1, 6.1)")
        values.append(value)
    return values[0], values[1]


def stored_rows(rows: dict[str, np.ndarray], shapes: Shapes, chunk_rows: int, vocab_size: int) -> dict[str, np.ndarray]:
    """A writer's validated rows (shared.rows.validate_shard_arrays), whole chunks of a shard of these shapes, as they
    are stored (storage_layout.md 3.1): topk_ids become topk_id_codes and the rows of topk_id_table of the chunks they
    make (N = the table's width in shapes); topk_logprobs (the values a reader decodes from topk_prob_steps, which
    the writer sums for topk_mass_sum) is not stored."""
    out = {name: values for name, values in rows.items() if name not in DECODED_FROM}
    if "topk_ids" in rows:
        row_chunk = zarr_chunk_shape("topk_id_codes", tuple(shapes["topk_id_codes"][0]), chunk_rows)[0]
        table_size = shapes["topk_id_table"][0][1]
        out["topk_id_codes"], out["topk_id_table"] = encode_id_rows(rows["topk_ids"], row_chunk, vocab_size, table_size)
    return out


GROUP_METADATA = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def array_metadata(name: str, shape: tuple[int, ...], dtype: str, chunk_rows: int) -> dict:
    """The exact zarr.json content this encoder writes for array `name` of this shape and dtype.

    A reader compares every stored zarr.json with it (shared.guards.check_array_metadata); a test
    compares it with what Zarr itself writes (tests/shared/test_format_metadata.py).
    """
    itemsize = np.dtype(dtype).itemsize
    to_bytes = {"name": "bytes"} if itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    kind = np.dtype(dtype).kind
    fill = False if kind == "b" else 0.0 if kind == "f" else 0
    codecs = [to_bytes, {"name": "blosc", "configuration": {"typesize": itemsize, **blosc_of(name), "blocksize": 0}}]
    if name in RANK_MAJOR:
        codecs.insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}})
    return {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(zarr_chunk_shape(name, shape, chunk_rows))}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def chunk_keys(name: str, shape: tuple[int, ...], chunk_rows: int) -> list[str]:
    """The keys (inside the shard's group) of every chunk of array `name`: all are stored (no implicit fill)."""
    rows = zarr_chunk_shape(name, shape, chunk_rows)[0]
    suffix = "/0" * (len(shape) - 1)
    return [f"{name}/c/{i}{suffix}" for i in range(math.ceil(shape[0] / rows))]


def shard_shapes(num_tokens: int, num_sequences: int, top_k: int, tail_samples: int, vocab_size: int, *,
                 chunk_rows: int, table_size: int) -> Shapes:
    """{array name: (shape, dtype name)} of a shard with these counts (storage_layout.md 3), in chunks of chunk_rows
    rows with id tables of table_size entries (one table per chunk)."""
    from shared.format import row_width

    out = {}
    for name, dtype in array_dtypes(vocab_size, tail_samples).items():
        if name == "offsets":
            out[name] = ((num_sequences + 1,), dtype)
        elif name == "topk_id_table":
            out[name] = ((math.ceil(num_tokens / max(1, min(chunk_rows, num_tokens))), table_size), dtype)
        else:
            width = row_width(name, top_k, tail_samples)
            out[name] = ((num_tokens,) + ((width,) if width is not None else ()), dtype)
    return out


def shard_object_keys(shapes: Shapes, chunk_rows: int) -> list[str]:
    """Every object key inside a shard's group that the format's writer stores for these shapes."""
    keys = ["zarr.json"]
    for name, (shape, _) in shapes.items():
        keys.append(f"{name}/zarr.json")
        keys += chunk_keys(name, tuple(shape), chunk_rows)
    return sorted(keys)
