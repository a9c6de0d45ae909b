"""How a shard's values become bytes: float16 rounding, Zarr v3 objects, the meta Parquet file.

This module is the format's one encoder (storage_layout.md 3.1, 4). Every Zarr object a writer stores comes
from here, and `array_metadata` states, as a plain dict, the exact `zarr.json` this encoder writes for an
array: a reader accepts no other (shared.guards), so Zarr never reads a chunk grid, codec, key encoding or
fill value that this format did not choose. Every chunk is stored, zeros included (`write_empty_chunks`),
so no value is ever read as an implicit fill. `encode_zarr_layout` and `encode_zarr_rows` give a shard
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
    LOGPROB_DTYPE,
    MAX_TEXT_SHA256_CHARS,
    META_COLUMNS,
    CacheFormatError,
    array_dtypes,
)

# Blosc with zstd at its highest level and byte shuffle: measured in BENCHMARKS.md (P4) against other
# levels and shuffles. Compression runs beside the teacher (worker processes or a writer thread).
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
                              dtype=dtype, compressors=BloscCodec(**BLOSC), fill_value=0,
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
    """The chunk objects holding rows [first_row, first_row + n) of each named array, byte for byte as
    encode_zarr_group stores them (every chunk, zeros included).

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



def array_descriptions(vocab_size: int, tail_samples: int = 0) -> dict:
    """manifest.arrays: each array's dtype, and how topk_logprobs were rounded."""
    out = {name: {"dtype": dtype} for name, dtype in array_dtypes(vocab_size, tail_samples).items()}
    out["topk_logprobs"]["rounding"] = {"exact_ranks": EXACT_RANKS, "mantissa_bits": TRIMMED_MANTISSA_BITS}
    return out


def stored_topk_logprobs(topk_logprobs: np.ndarray) -> np.ndarray:
    """(T, K) log-probs (<= 0, float32 or better) as stored: float16, ranks > EXACT_RANKS trimmed to
    TRIMMED_MANTISSA_BITS mantissa bits, then a running minimum from rank EXACT_RANKS on (storage_layout.md 3.1)."""
    stored = np.asarray(topk_logprobs).astype(LOGPROB_DTYPE)
    if stored.ndim == 2 and stored.shape[1] > EXACT_RANKS:
        stored[:, EXACT_RANKS:] = round_mantissa(stored[:, EXACT_RANKS:], TRIMMED_MANTISSA_BITS)
        # rounding is monotonic within the trimmed ranks; where it lifted one above the last exact
        # rank, clamp (a running minimum keeps the order most likely first)
        stored[:, EXACT_RANKS - 1:] = np.minimum.accumulate(stored[:, EXACT_RANKS - 1:], axis=1)
    return stored


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
    return {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(zarr_chunk_shape(name, shape, chunk_rows))}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [to_bytes, {"name": "blosc", "configuration": {"typesize": itemsize, **BLOSC, "blocksize": 0}}],
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


def shard_shapes(num_tokens: int, num_sequences: int, top_k: int, tail_samples: int, vocab_size: int) -> Shapes:
    """{array name: (shape, dtype name)} of a shard with these counts (storage_layout.md 3)."""
    from shared.format import row_width

    out = {}
    for name, dtype in array_dtypes(vocab_size, tail_samples).items():
        if name == "offsets":
            out[name] = ((num_sequences + 1,), dtype)
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
