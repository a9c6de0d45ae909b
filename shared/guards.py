"""Checks that stand between an untrusted cache and numpy, Zarr and pyarrow (storage_layout.md 3.1, 4, 8).

A cache may come from anyone who can write to a share, and checksums prove nothing against them. So before
Zarr sees an array, its `zarr.json` must equal, field for field, what this format's writer writes for it
(shared.encode.array_metadata): no other codec, chunk grid, key encoding or fill value is ever interpreted.
A chunk whose blosc header announces more than a chunk's decoded size (or more bytes than it holds) is
refused before it is decompressed, and a chunk that is not there is refused instead of read as a fill. A
meta Parquet file is bounded by its footer and its page headers before any page is decoded, and only the
format's columns are ever decoded.

Every refusal is a CacheError subclass naming the shard and the object. Knows JSON, Zarr's store
interface, Parquet's footer and page headers; nothing about models or training.
"""

from __future__ import annotations

import json
import math

import numpy as np

from shared.encode import GROUP_METADATA, array_metadata
from shared.format import (
    MAX_TEXT_SHA256_CHARS,
    META_BYTES_FIXED,
    META_BYTES_PER_SEQUENCE,
    META_COLUMNS,
    CacheCorruptError,
    CacheFormatError,
)
from shared.identity import canonical_json
from shared.manifest import ShardEntry

MAX_METADATA_BYTES = 2**20  # a zarr.json is a few hundred bytes; refuse to parse megabytes


def _same(a, b) -> bool:
    """JSON values equal as JSON (0, 0.0 and false differ; NaN equals nothing)."""
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return False


def check_array_metadata(raw: bytes, *, key: str, where: str, name: str, shape: tuple[int, ...], dtype: str,
                         chunk_rows: int) -> int:
    """Refuse an array's zarr.json unless it equals what the format's writer writes for it; returns a chunk's
    decoded size in bytes (for the blosc header guard).

    Refuses (CacheFormatError naming `where`, `key` and the first field that differs): malformed JSON, a
    field the writer never writes or one it writes missing, and any other value: shape (from the manifest's
    counts), data type, chunk grid (from settings.chunk_rows), chunk key encoding, fill value, codecs,
    attributes, storage transformers.
    """
    def bad(message: str) -> CacheFormatError:
        return CacheFormatError(f"{where}: {key}: {message} (storage_layout.md 3.1)")

    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    expected = array_metadata(name, shape, dtype, chunk_rows)
    for field in [*expected, *sorted(set(meta) - set(expected))]:
        if field not in expected:
            raise bad(f"has the field {field!r}, which the format's writer never writes")
        if field not in meta:
            raise bad(f"lacks the field {field!r}")
        if not _same(meta[field], expected[field]):
            raise bad(f"{field} is {json.dumps(meta[field], default=str)[:400]}, the format's writer writes "
                      f"{json.dumps(expected[field])} for this array")
    chunk = expected["chunk_grid"]["configuration"]["chunk_shape"]
    return math.prod(chunk) * np.dtype(dtype).itemsize


def check_group_metadata(raw: bytes, *, key: str, where: str) -> None:
    """Refuse a shard group's zarr.json unless it is exactly the writer's."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not _same(meta, GROUP_METADATA):
        raise CacheFormatError(f"{where}: {key} is not the Zarr v3 group metadata the format's writer writes "
                               f"({json.dumps(GROUP_METADATA)})")


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


def guarded(store, name: str, chunk_bytes: int, where: str):
    """Wrap a read-only Zarr store so that no chunk of array `name` is read as a fill or decodes to more than
    chunk_bytes.

    A chunk that is not there is refused (the format stores every chunk; Zarr would return fill values);
    a blosc header is checked before the decoder allocates what it announces. Subclassing zarr's
    WrapperStore is Zarr's own hook for this; only `get` is changed.
    """
    from zarr.storage import WrapperStore

    class ChunkSizeGuard(WrapperStore):
        def _with_store(self, inner):
            return guarded(inner, name, chunk_bytes, where)

        async def get(self, key, prototype, byte_range=None):
            buf = await self._store.get(key, prototype, byte_range)
            if key.startswith(f"{name}/") and key != f"{name}/zarr.json":
                if buf is None:
                    raise CacheCorruptError(f"{where}: {name}: chunk {key[len(name) + 1:]} is missing; the format "
                                            "stores every chunk, so none is read as a fill value",
                                            [(where, f"{name}/{key[len(name) + 1:]}", "missing")])
                if byte_range is None:
                    problem = _blosc_header_problem(buf.as_numpy_array()[:16].tobytes(), len(buf), chunk_bytes)
                    if problem is not None:
                        raise CacheFormatError(f"{where}: {name}: chunk {key[len(name) + 1:]}: {problem}")
            return buf

    return ChunkSizeGuard(store)


# ---------------------------------------------------------------------------------------------
# The meta Parquet file, bounded before it is decoded (storage_layout.md 4)

META_MAX_PAGES = 65536  # pages of the format's columns in one meta file (a real one has a few per column)


def check_meta_size(f, metadata, entry: ShardEntry, where: str) -> None:
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


def text_sha256_as_strings(table, entry: ShardEntry, where: str):
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


def read_meta_table(f, entry: ShardEntry, where: str):
    """The meta table of the format's columns from an open Parquet file, checked before and after decoding.

    Before anything is decoded (storage_layout.md 4): the row count and the columns' types from the footer,
    and that those columns decode to at most META_BYTES_PER_SEQUENCE per sequence (plus META_BYTES_FIXED) by
    the footer's sizes and by every page header; other columns are never decoded. After: sequence_index is
    0..N-1, num_tokens positive summing to the manifest's, num_loss_tokens below num_tokens and summing to
    the manifest's, prompt_length at most num_tokens.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    check_meta_size(f, parquet.metadata, entry, where)
    # text_sha256 stays dictionary-encoded until its values' length is checked (no expansion)
    parquet = pq.ParquetFile(f, metadata=parquet.metadata, read_dictionary=["text_sha256"])
    table = text_sha256_as_strings(parquet.read(columns=list(META_COLUMNS)), entry, where)
    column = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
              ("sequence_index", "num_tokens", "num_loss_tokens", "prompt_length")}
    if (np.any(column["num_tokens"] < 1) or int(column["num_tokens"].sum()) != entry.num_tokens
            or not np.array_equal(column["sequence_index"], np.arange(entry.num_sequences))):
        raise CacheFormatError(f"{where}: sequence_index must be 0..{entry.num_sequences - 1} and num_tokens "
                               f"positive, summing to the manifest's {entry.num_tokens}")
    losses, lengths = column["num_loss_tokens"], column["num_tokens"]
    if np.any(losses < 0) or np.any(losses > lengths - 1) or int(losses.sum()) != entry.num_loss_tokens:
        raise CacheFormatError(f"{where}: num_loss_tokens must be in [0, num_tokens - 1] per sequence (a last row is "
                               f"never distilled) and sum to the manifest's {entry.num_loss_tokens}; they sum to "
                               f"{int(losses.sum())}")
    if np.any(column["prompt_length"] < 0) or np.any(column["prompt_length"] > lengths):
        raise CacheFormatError(f"{where}: prompt_length must be in [0, num_tokens] per sequence")
    return table
