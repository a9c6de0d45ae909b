"""A cache made by someone else is checked, not trusted: hostile metadata and arrays get clear errors.

Every case rewrites one object of a valid cache *and* its size and sha256 in the manifest, so the
checksums pass and only the reader's own checks stand between the input and numpy, Zarr or pyarrow.
Each refusal is a CacheError subclass whose message names the shard and the object; none of them
allocates what the input claims.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from shared.format import META_COLUMNS, CacheCorruptError, CacheError, CacheFormatError
from shared.reader import CacheReader
from shared.writer import encode_zarr_group
from tests.shared.fakes import reseal, reseal_commit, write_cache

ARRAY = "shards/shard-00001/topk_id_codes"


@pytest.fixture
def cache(tmp_path) -> Path:
    root = tmp_path / "c"
    write_cache(str(root), num_shards=2)
    return root


def load_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, manifest: dict) -> None:
    """Write an edited manifest, resealed (cache_key and manifest_sha256 recomputed, as a hostile writer would)."""
    (root / "manifest.json").write_text(json.dumps(reseal(manifest)))


def replace_object(root: Path, key: str, data: bytes) -> None:
    """Write `data` as object `key` and record its size and sha256 in the manifest (and totals) and commit file."""
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    manifest = load_manifest(root)
    info = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for shard in manifest["shards"]:
        if key.startswith(shard["path"] + "/") or key == shard["meta_path"]:
            shard["objects"][key] = info
            commit_file = root / shard["path"] / "commit.json"
            if commit_file.exists():
                commit = json.loads(commit_file.read_text())
                commit["objects"][key] = info
                commit_file.write_text(json.dumps(reseal_commit(commit)))
    manifest["totals"]["num_bytes"] = sum(o["size"] for s in manifest["shards"] for o in s["objects"].values())
    save_manifest(root, manifest)


def edit_zarr_json(root: Path, key: str, fn) -> None:
    meta = json.loads((root / key).read_text())
    fn(meta)
    replace_object(root, key, json.dumps(meta).encode())


def open_shard_1(root: Path):
    """What a trainer does: open (sizes), hash shard 1, open its arrays, read every row."""
    reader = CacheReader(str(root), verify_on_read=True)
    view = reader.shard(1)
    return view.read_rows(0, int(view.offsets[-1]))


def refused(root: Path, error=CacheError, match: str = "") -> str:
    with pytest.raises(error, match=match) as info:
        open_shard_1(root)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# zarr.json


WRITES = "the format's writer writes"


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(shape=[2**40, 8]),
     rf"shard-00001: shards/shard-00001/topk_id_codes/zarr.json: shape is \[1099511627776, 8\], {WRITES} \[\d+, 8\]"),
    (lambda m: m.update(shape=["77", 8]), r'shape is \["77", 8\]'),
    (lambda m: m.update(data_type="float64"), f'data_type is "float64", {WRITES} "uint16"'),
    (lambda m: m.update(data_type="object"), 'data_type is "object"'),
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2**31, 8]), r"chunk_grid is .*\[2147483648, 8\]"),
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0, 8]), r"chunk_grid is .*\[0, 8\]"),
    (lambda m: m.update(chunk_grid={"name": "rectilinear"}), 'chunk_grid is {"name": "rectilinear"}'),
    (lambda m: m["chunk_key_encoding"]["configuration"].update(separator="."), 'chunk_key_encoding is .*"separator": "."'),
    (lambda m: m.update(chunk_key_encoding={"name": "v2"}), 'chunk_key_encoding is {"name": "v2"}'),
    (lambda m: m.update(fill_value=7), f"fill_value is 7, {WRITES} 0 "),
    (lambda m: m.update(fill_value=0.0), f"fill_value is 0.0, {WRITES} 0 "),
    (lambda m: m.pop("fill_value"), "lacks the field 'fill_value'"),
    (lambda m: m["codecs"].append({"name": "numcodecs.pickle"}), "codecs is .*numcodecs.pickle"),
    (lambda m: m["codecs"].insert(0, {"name": "numcodecs.astype", "configuration": {"encode_dtype": "f8"}}), "codecs is"),
    (lambda m: m.update(codecs=[{"name": "bytes"}, {"name": "zstd"}]), "codecs is"),
    (lambda m: m["codecs"][0]["configuration"].update(endian="big"), 'codecs is .*"endian": "big"'),
    (lambda m: m["codecs"][1]["configuration"].update(typesize=1), 'codecs is .*"typesize": 1'),
    (lambda m: m.update(storage_transformers=[{"name": "x"}]), "storage_transformers is"),
    (lambda m: m.update(attributes={"x": 1}), 'attributes is {"x": 1}'),
    (lambda m: m.update(dimension_names=["rows", "k"]), "has the field 'dimension_names', which the format's writer never"),
    (lambda m: m.update(node_type="group"), 'node_type is "group"'),
    (lambda m: m.update(zarr_format=2), "zarr_format is 2"),
], ids=['huge-shape', 'shape-of-strings', 'dtype-float64', 'dtype-object', 'huge-chunks', 'zero-chunk', 'irregular-grid',
        'key-separator', 'key-encoding-v2', 'fill-value', 'fill-value-float', 'no-fill-value', 'pickle-codec',
        'astype-filter', 'zstd-codec', 'big-endian', 'blosc-typesize', 'storage-transformer', 'attributes',
        'unknown-field', 'group-as-array', 'zarr-v2'])
def test_hostile_array_metadata(cache, edit, match):
    edit_zarr_json(cache, f"{ARRAY}/zarr.json", edit)
    message = refused(cache, CacheFormatError, match)
    assert "shard-00001" in message


@pytest.mark.parametrize("name,edit,match", [
    ("topk_prob_steps", lambda m: m["codecs"].pop(0), "codecs is .*, the format's writer writes .*transpose"),
    ("topk_prob_steps", lambda m: m["codecs"][0]["configuration"].update(order=[0, 1]), r'codecs is .*"order": \[0, 1\]'),
    ("topk_prob_steps", lambda m: m["codecs"].insert(1, m["codecs"].pop(0)), "codecs is"),  # after bytes
    ("topk_id_codes", lambda m: m["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}}),
     "codecs is"),
    ("topk_id_codes", lambda m: m["codecs"][1]["configuration"].update(shuffle="shuffle"), 'codecs is .*"shuffle": "shuffle"'),
    ("topk_id_table", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2, 8]), r"chunk_grid is .*\[2, 8\]"),
    ("topk_id_table", lambda m: m.update(shape=[1, 2**20]), r"shape is \[1, 1048576\]"),
], ids=["steps-without-transpose", "steps-transpose-order", "steps-transpose-after-bytes", "codes-with-transpose",
        "codes-byte-shuffle", "table-chunks-of-two-tables", "table-of-another-size"])
def test_hostile_top_k_array_metadata(cache, name, edit, match):
    """Each top-K array's codecs and chunks are the writer's exactly: transpose only as order [1, 0] before bytes,
    on the steps alone (storage_layout.md 3.1)."""
    edit_zarr_json(cache, f"shards/shard-00001/{name}/zarr.json", edit)
    refused(cache, CacheFormatError, f"shard-00001: shards/shard-00001/{name}/zarr.json: {match}")


def test_array_metadata_not_json(cache):
    replace_object(cache, f"{ARRAY}/zarr.json", b"\xff{not json")
    refused(cache, CacheFormatError, "shard-00001: shards/shard-00001/topk_id_codes/zarr.json: is not valid JSON")


def test_group_metadata_that_is_not_a_group(cache):
    edit_zarr_json(cache, "shards/shard-00001/zarr.json", lambda m: m.update(node_type="array"))
    refused(cache, CacheFormatError, "shard-00001: shards/shard-00001/zarr.json is not the Zarr v3 group metadata the "
                                     "format's writer writes")


def test_huge_counts_everywhere_allocate_nothing(cache):
    """Manifest and zarr.json agree on 2^40 rows: refused by the manifest (so many rows imply 2^27 chunks per array,
    and it lists a few), without making 2^27 of anything."""
    manifest = load_manifest(cache)
    manifest["shards"][1]["num_tokens"] = 2**40
    manifest["totals"]["num_tokens"] = sum(s["num_tokens"] for s in manifest["shards"])
    save_manifest(cache, manifest)
    for name in ("input_ids", "loss_mask", "target_logprob", "tail_logprob", "topk_id_codes", "topk_prob_steps"):
        edit_zarr_json(cache, f"shards/shard-00001/{name}/zarr.json", lambda m: m["shape"].__setitem__(0, 2**40))
    tracemalloc.start()
    try:
        refused(cache, CacheFormatError, r"manifest: shard-00001 lists 18 objects, but 1,099,511,627,776 rows in chunks "
                                         r"of 8,192 rows imply 939,524,107 \(a missing chunk would be read as fill values\)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_too_many_sequences_per_shard_refused_before_anything_is_read(cache):
    manifest = load_manifest(cache)
    for key in ("num_sequences", "num_tokens"):
        manifest["shards"][1][key] = 2**30
        manifest["totals"][key] = sum(s[key] for s in manifest["shards"])
    save_manifest(cache, manifest)
    with pytest.raises(CacheFormatError, match=r"shards\[1\].num_sequences = 1073741824 exceeds the format's limit"):
        CacheReader(str(cache))


# ---------------------------------------------------------------------------------------------
# chunks and values


def reencode(cache: Path, name: str, fn) -> None:
    """Replace array `name` of shard 1 by fn(its values), encoded as the writer does (valid checksums)."""
    view = CacheReader(str(cache)).shard(1)
    values = np.asarray(view._arrays[name][:]).copy()
    values = fn(values)
    encoded = encode_zarr_group({name: values}, chunk_rows=8192)
    for key, data in encoded.items():
        if key.startswith(name + "/"):
            replace_object(cache, f"shards/shard-00001/{key}", data)


def test_id_codes_beyond_the_vocabulary(cache):
    def poison(codes):
        codes[3, 2] = 5000  # V = 1000, still a valid uint16
        return codes

    reencode(cache, "topk_id_codes", poison)
    refused(cache, CacheFormatError, r"shard-00001: topk_id_codes, topk_id_table: row 3: a code is outside \[0, 1000\); "
                                     r"the rows cannot be decoded \(storage_layout.md 3.1\): rebuild the shard")


@pytest.mark.parametrize("poison,match", [
    (lambda t: t.__setitem__((0, 1), t[0, 0]), "an id table repeats an id"),
    (lambda t: t.__setitem__((0, 0), 1000), r"an id table holds an id outside \[0, 1000\)"),
], ids=["repeated-id", "id-beyond-the-vocabulary"])
def test_hostile_id_table(cache, poison, match):
    """A table that is not N distinct ids < V is no permutation's head: refused, naming its chunk."""
    reencode(cache, "topk_id_table", lambda t: (poison(t), t)[1])
    refused(cache, CacheFormatError, rf"shard-00001: topk_id_codes, topk_id_table: the table of chunk 0 \(rows from 0\): "
                                     rf"{match}; the rows cannot be decoded")


def test_prob_steps_summing_past_the_levels(cache):
    reencode(cache, "topk_prob_steps", lambda d: (d.__setitem__((4, 1), 65535), d)[1])
    refused(cache, CacheFormatError, r"shard-00001: topk_prob_steps, tail_logprob: row 4: its steps sum to \d+, more than "
                                     r"the \d+ levels; the rows cannot be decoded")


def test_a_tail_that_leaves_the_top_k_no_mass(cache):
    """Log-probs are decoded as 2 ln(c / L) + ln s, s = 1 - exp(tail_logprob): a tail of 0 leaves s = 0."""
    reencode(cache, "tail_logprob", lambda t: np.where(np.arange(len(t)) == 5, np.float16(0.0), t))
    refused(cache, CacheFormatError, "shard-00001: topk_prob_steps, tail_logprob: row 5: its tail_logprob leaves the top K "
                                     "no mass; the rows cannot be decoded")


def test_positive_tail(cache):
    reencode(cache, "tail_logprob", lambda lp: np.where(np.arange(len(lp)) == 2, np.float16(3.0), lp))
    refused(cache, CacheFormatError, "shard-00001: tail_logprob row 2: breaks the rule that the tail's log-probability "
                                     "is "
                                     "never NaN nor above 0")


@pytest.mark.parametrize("offsets_of,match", [
    (lambda o: np.concatenate([[0], -o[1:]]), "offsets are inconsistent"),  # negative offsets
    (lambda o: np.concatenate([o[:-1], [o[-1] + 1000]]), "offsets are inconsistent"),  # beyond the arrays
    (lambda o: o[[0, 2, 1, 3]], "offsets are inconsistent"),  # not increasing
], ids=['negative', 'beyond-the-arrays', 'not-increasing'])
def test_hostile_offsets(cache, offsets_of, match):
    reencode(cache, "offsets", lambda o: offsets_of(o).astype(np.int64))
    refused(cache, CacheCorruptError, "shard-00001: " + match)


def test_decompression_bomb_refused_before_decoding(cache):
    """A blosc chunk whose header announces 2 GiB is refused before the decoder allocates it."""
    key = f"{ARRAY}/c/0/0"
    data = bytearray((cache / key).read_bytes())
    data[4:8] = (2**31 - 1).to_bytes(4, "little")
    replace_object(cache, key, bytes(data))
    tracemalloc.start()
    try:
        refused(cache, CacheFormatError, r"shard-00001: topk_id_codes: chunk c/0/0: a compressed chunk announces 2,147,483,647 "
                                         r"decoded bytes, more than a chunk's")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_garbage_chunk_with_valid_checksum(cache):
    key = f"{ARRAY}/c/0/0"
    size = (cache / key).stat().st_size
    replace_object(cache, key, bytes([2, 1, 33, 2]) + (64).to_bytes(4, "little") + bytes(8) + os.urandom(size - 16))
    refused(cache, CacheCorruptError, "shard-00001: array topk_id_codes: cannot decode its chunks")


def test_unlisted_chunk_is_refused(cache):
    """An object in a shard's folder that the manifest does not list would be read by Zarr unchecked."""
    extra = cache / ARRAY / "c" / "1" / "0"
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_bytes(b"x" * 100)
    with pytest.raises(CacheCorruptError, match="shard-00001: shards/shard-00001/topk_id_codes/c/1/0: is not listed in the "
                                                "manifest"):
        CacheReader(str(cache))


def test_symlinked_object_refused(cache, tmp_path):
    key = f"{ARRAY}/c/0/0"
    outside = tmp_path / "outside"
    outside.write_bytes((cache / key).read_bytes())
    (cache / key).unlink()
    (cache / key).symlink_to(outside)
    with pytest.raises(CacheCorruptError, match=f"shard-00001: {key}: is a symbolic link"):
        CacheReader(str(cache))


# ---------------------------------------------------------------------------------------------
# the meta Parquet file


def rewrite_meta(cache: Path, fn) -> None:
    import pyarrow.parquet as pq

    key = "meta/shard-00001.parquet"
    table = fn(pq.read_table(cache / key))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    replace_object(cache, key, sink.getvalue())


def cast_column(name, type_):
    import pyarrow as pa

    def fn(table):
        i = table.schema.get_field_index(name)
        return table.set_column(i, pa.field(name, type_), table.column(name).cast(type_))
    return fn


@pytest.mark.parametrize("fn,match", [
    (cast_column("num_tokens", "string"), "column 'num_tokens' is string, the format says int64"),
    (cast_column("window_index", "int64"), "column 'window_index' is int64, the format says int32"),
    (lambda t: t.slice(0, 2), "has 2 rows, the manifest 3 sequences"),
    (lambda t: t.drop_columns(["text_sha256"]), "lacks the mandatory column 'text_sha256'"),
    (lambda t: t.concat_batches(t.to_batches() * 2) if hasattr(t, "concat_batches") else __import__("pyarrow").concat_tables([t, t]),
     "has 6 rows, the manifest 3 sequences"),
], ids=['num_tokens-as-string', 'window_index-as-int64', 'too-few-rows', 'missing-column', 'too-many-rows'])
def test_hostile_meta(cache, fn, match):
    rewrite_meta(cache, fn)
    with pytest.raises(CacheFormatError, match="shard-00001: meta/shard-00001.parquet.*" + match):
        CacheReader(str(cache)).meta(1)


def test_meta_counts_that_do_not_add_up(cache):
    import pyarrow as pa

    def fn(table):
        wrong = pa.array([0] + table.column("num_tokens").to_pylist()[1:], pa.int64())
        return table.set_column(table.schema.get_field_index("num_tokens"), "num_tokens", wrong)

    rewrite_meta(cache, fn)
    with pytest.raises(CacheFormatError, match="shard-00001: meta/shard-00001.parquet: sequence_index must be 0..2 and "
                                               "num_tokens positive"):
        CacheReader(str(cache)).meta(1)


def test_meta_that_is_not_parquet(cache):
    replace_object(cache, "meta/shard-00001.parquet", b"PAR1" + os.urandom(200) + b"PAR1")
    with pytest.raises(CacheCorruptError, match="shard-00001: meta/shard-00001.parquet cannot be read as Parquet"):
        CacheReader(str(cache)).meta(1)


# ---------------------------------------------------------------------------------------------
# the manifest (see also test_refusals.py)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["arrays"]["topk_id_codes"].update(dtype="uint64"),
     "arrays.topk_id_codes.dtype is 'uint64'; the format stores it as 'uint16'"),
    (lambda m: m["shards"][1]["objects"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}), ("leaves the "
                                                                                                         "cache")),
    (lambda m: m["shards"][1]["objects"].update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}), "absolute or a URL"),
    (lambda m: m["shards"][1]["objects"].update({"s3://evil/x": {"size": 1, "sha256": "0" * 64}}), "absolute or a URL"),
    (lambda m: m["shards"][1]["objects"].update({"shards/shard-00000/x": {"size": 1, "sha256": "0" * 64}}),
     "lists object 'shards/shard-00000/x' outside its shard"),
    (lambda m: m["shards"][1].update(meta_path="../meta/shard-00001.parquet"), "meta_path"),
    (lambda m: m["shards"][1].update(topk_mass_sum=float("nan")), "topk_mass_sum = nan"),
    (lambda m: m["shards"][1]["objects"][next(iter(m["shards"][1]["objects"]))].update(size=-1), "outside"),
    (lambda m: m["shards"][1]["objects"][next(iter(m["shards"][1]["objects"]))].update(sha256="XYZ"), "64-character"),
    (lambda m: m.update(shards={"a": 1}), "shards must be list"),
    (lambda m: m.update(totals="all"), "totals must be dict"),
    (lambda m: m["tokenizer"].update(vocab_size=2**40), "vocab_size"),
    (lambda m: m["tokenizer"].update(vocab_size=2**24 + 1), r"tokenizer.vocab_size = 16777217 is outside \[1, 2\*\*24\]"),
    (lambda m: m["settings"].update(top_k=0), "settings.top_k = 0"),
], ids=['array-dtype', 'object-key-dotdot', 'object-key-absolute', 'object-key-url', 'object-of-another-shard', 'meta-path-outside', 'mass-nan', 'object-size-negative', 'object-sha-not-hex', 'shards-not-a-list', 'totals-not-an-object', 'vocab-size-huge', 'vocab-size-over-2-24', 'top-k-zero'])
def test_hostile_manifest(cache, edit, match):
    manifest = load_manifest(cache)
    edit(manifest)
    save_manifest(cache, manifest)
    with pytest.raises(CacheFormatError, match=match):
        CacheReader(str(cache))


@pytest.mark.parametrize("edit,match", [
    (lambda a: a["topk_id_table"].update(table_size=0), r"arrays.topk_id_table.table_size = 0 must be an integer in \[1, 1,000\]"),
    (lambda a: a["topk_id_table"].update(table_size=1001), "arrays.topk_id_table.table_size = 1001 must be an integer in"),
    (lambda a: a["topk_id_table"].update(table_size="8"), "arrays.topk_id_table.table_size = '8' must be an integer"),
    (lambda a: a["topk_prob_steps"].update(levels=1), r"arrays.topk_prob_steps.levels = 1 must be an integer in \[2, 65,535\]"),
    (lambda a: a["topk_prob_steps"].update(levels=65536), "arrays.topk_prob_steps.levels = 65536 must be an integer"),
    (lambda a: a["topk_prob_steps"].update(levels=True), "arrays.topk_prob_steps.levels = True must be an integer"),
    (lambda a: a["topk_prob_steps"].pop("levels"), r"arrays.topk_prob_steps must be an object with exactly the fields \['dtype', 'levels'\]"),
    (lambda a: a["topk_id_codes"].update(rounding={"exact_ranks": 16}), "arrays.topk_id_codes must be an object with exactly"),
    (lambda a: a.update(topk_ids={"dtype": "uint16"}), "arrays must describe exactly"),
], ids=["table-size-0", "table-size-over-v", "table-size-string", "levels-1", "levels-over-uint16", "levels-bool",
        "levels-missing", "unknown-field", "format-2-array"])
def test_hostile_manifest_arrays(cache, edit, match):
    """manifest.arrays names the stored arrays with exactly the fields the writer writes; N in [1, V], L in [2, 65535]
    (storage_layout.md 6.1), checked before any shard is opened."""
    manifest = load_manifest(cache)
    edit(manifest["arrays"])
    save_manifest(cache, manifest)
    with pytest.raises(CacheFormatError, match="manifest: " + match):
        CacheReader(str(cache))


def test_manifest_that_is_a_list(cache):
    (cache / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CacheFormatError, match="manifest.json must hold a JSON object"):
        CacheReader(str(cache))


# ---------------------------------------------------------------------------------------------
# the meta Parquet file as a decompression bomb (storage_layout.md 4)

META = "meta/shard-00001.parquet"
BOMB = 64 * 2**20  # one 64 MiB string: a few KB once compressed


def write_meta(cache: Path, table, **options) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, **{"compression": "zstd", **options})
    replace_object(cache, META, sink.getvalue())
    return sink.getvalue()


def meta_table(cache: Path):
    import pyarrow.parquet as pq

    return pq.read_table(cache / META)


def read_meta_in_a_fresh_process(cache: Path) -> tuple[str, int]:
    """CacheReader(cache).meta(1) and verify() in a new interpreter: (outcome, peak bytes of pyarrow's memory pool).

    pyarrow allocates outside Python's allocator (tracemalloc does not see it); a fresh process's pool
    peak is what reading the meta file cost.
    """
    code = """if 1:
        import json, sys
        sys.path.insert(0, sys.argv[2])
        import pyarrow as pa
        from shared.reader import CacheReader
        reader = CacheReader(sys.argv[1])
        try:
            outcome = "ok " + ",".join(reader.meta(1).column_names)
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        problems = [str(p) for p in reader.verify()]
        print(json.dumps([outcome, problems, pa.default_memory_pool().max_memory()]))
    """
    res = subprocess.run([sys.executable, "-c", code, str(cache), str(Path(__file__).resolve().parents[2])],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_meta_bomb_in_a_column_the_format_does_not_know_is_never_decoded(cache):
    """Writers may add columns and readers ignore them (section 4): without decoding them."""
    import pyarrow as pa

    table = meta_table(cache)
    data = write_meta(cache, table.append_column("extra", pa.array(["x" * BOMB] + [""] * (table.num_rows - 1))))
    assert len(data) < 20_000
    outcome, problems, peak = read_meta_in_a_fresh_process(cache)
    assert outcome == "ok " + ",".join(META_COLUMNS)
    assert problems == []
    assert peak < 4 * 2**20, peak


def understate_footer(data: bytes, column: str, claim: int = 600) -> bytes:
    """The same file with the footer claiming `claim` uncompressed bytes for `column` (and its row group).

    The footer is Thrift compact protocol: each i64 a zigzag varint. The true value's varint is replaced
    by an over-long varint of `claim` of the same length, which Thrift readers accept.
    """
    import struct

    import pyarrow.parquet as pq

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def overlong(n: int, length: int) -> bytes:
        return bytes(((n >> (7 * i)) & 0x7F) | (0x80 if i < length - 1 else 0) for i in range(length))

    out = bytearray(data)
    footer = len(out) - 8 - struct.unpack("<I", out[-8:-4])[0]
    group = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column)
    for value in (chunk.total_uncompressed_size, group.total_byte_size):
        old = varint(value << 1)
        at = out.find(old, footer)
        assert at != -1
        out[at:at + len(old)] = overlong(claim << 1, len(old))
    lied = pq.ParquetFile(io.BytesIO(bytes(out))).metadata.row_group(0)
    assert max(lied.column(i).total_uncompressed_size for i in range(lied.num_columns)) <= claim
    return bytes(out)


@pytest.mark.parametrize("footer", ["honest", "understated"])
def test_meta_bomb_in_a_format_column_refused_before_decoding(cache, footer):
    """text_sha256 holding 64 MiB: refused from the footer's sizes, or, where the footer understates them,
    from the page headers (what pyarrow's decoder allocates: 4x the claim when it was let through)."""
    import pyarrow as pa

    table = meta_table(cache)
    table = table.set_column(table.schema.get_field_index("text_sha256"), "text_sha256",
                             pa.array(["y" * BOMB] * table.num_rows))
    data = write_meta(cache, table)
    if footer == "understated":
        replace_object(cache, META, understate_footer(data, "text_sha256"))
    outcome, problems, peak = read_meta_in_a_fresh_process(cache)
    source = "footer" if footer == "honest" else "page headers"
    expected = (f"CacheCorruptError: shard-00001: {META}: its columns sequence_index, source_index, window_index, "
                f"sample_index, num_tokens, prompt_length, num_loss_tokens, text_sha256 would decode to ")
    assert outcome.startswith(expected) and f"bytes by its {source}, more than the 66,304 the format allows for 3 " \
                                             "sequences" in outcome, outcome
    assert problems == [f"shard-00001: {META}: {outcome.split(': ', 1)[1]}"]
    assert peak < 4 * 2**20, peak


def test_meta_text_sha256_longer_than_a_sha256_refused(cache):
    import pyarrow as pa

    table = meta_table(cache)
    values = ["a" * 64, "b" * 65, ""]
    write_meta(cache, table.set_column(table.schema.get_field_index("text_sha256"), "text_sha256", pa.array(values)))
    with pytest.raises(CacheFormatError, match=f"shard-00001: {META}: a text_sha256 value is 65 bytes; the format "
                                               "stores a sha256 in hex"):
        CacheReader(str(cache)).meta(1)


@pytest.mark.parametrize("options", [
    {"row_group_size": 1},
    {"data_page_size": 1, "write_batch_size": 1, "compression": "snappy"},
    {"use_dictionary": False, "compression": "none"},
    {"data_page_version": "2.0", "compression": "gzip", "write_page_index": True},
], ids=["row-group-per-row", "page-per-row", "plain-uncompressed", "v2-pages-gzip"])
def test_meta_written_other_ways_still_reads(cache, options):
    """The page-header walk accepts any valid layout: several row groups, many pages, v1/v2 pages, codecs."""
    table = meta_table(cache)
    write_meta(cache, table, **options)
    got = CacheReader(str(cache)).meta(1)
    assert got.column_names == list(META_COLUMNS)
    assert got.to_pydict() == table.select(list(META_COLUMNS)).to_pydict()
