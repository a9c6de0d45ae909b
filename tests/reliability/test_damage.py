"""One flipped byte in, or a truncation of, every stored object of a small cache.

For each object of a complete two-shard cache (tiny GPT-2 teacher, written by
tests/trainer/teacher_cache.py) the object is damaged in place, then:
- `kdcache verify` exits 1 and names the shard and the object (manifest.json: a clear format error);
- `kdtrain run` exits 2 before training, naming the shard (or manifest.json).
The bookkeeping objects (owner.json, build.json, shards/*/commit.json) are not part of the cache's content:
readers never read them once manifest.json exists. `kdcache verify` still reports their damage
(exit 1), and `kdtrain run` trains normally. storage_layout.md section 7 states this rule.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.kdcache import app as kdcache_app
from cli.kdtrain import app as kdtrain_app
from shared.reader import CacheReader
from tests.shared.test_hostile import replace_object
from tests.trainer.teacher_cache import write_teacher_cache

runner = CliRunner()
BOOKKEEPING = ("build.json", "commit.json", "owner.json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir) -> Path:
    """Two shards (170 and 82 rows) of Shakespeare windows, arrays in chunks of 64 rows."""
    root = tmp_path_factory.mktemp("damage") / "cache"
    write_teacher_cache(str(root), tiny_gpt2_dir, num_sequences=12, max_length=32, top_k=8, shard_tokens=200,
                        chunk_rows=64)
    assert CacheReader(str(root)).num_shards == 2
    return root


def stored_keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def object_keys(chunks_of_shard=(3, 2)) -> list[str]:
    """The keys of the fixture's cache, known before it is written (pytest parametrizes at collection)."""
    keys = ["build.json", "manifest.json", "owner.json"]
    for index, num_chunks in enumerate(chunks_of_shard):
        shard = f"shard-{index:05d}"
        keys += [f"meta/{shard}.parquet", f"shards/{shard}/zarr.json", f"shards/{shard}/commit.json",
                 f"shards/{shard}/offsets/zarr.json", f"shards/{shard}/offsets/c/0"]
        for name in ("input_ids", "loss_mask", "target_logprob", "tail_logprob", "topk_id_codes", "topk_id_table",
                     "topk_prob_steps"):  # the table: one chunk (one chunk's table) per chunk of rows
            keys.append(f"shards/{shard}/{name}/zarr.json")
            keys += [f"shards/{shard}/{name}/c/{c}" + ("/0" if name.startswith("topk") else "") for c in range(num_chunks)]
    return sorted(keys)


def test_the_parametrization_covers_every_stored_object(cache):
    assert stored_keys(cache) == object_keys()


def unwrap(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("key", object_keys())
def test_damaged_object_is_named_by_verify_and_refused_by_kdtrain(cache, key, damage, tmp_path):
    path = cache / key
    original = path.read_bytes()
    damaged = bytearray(original)
    if damage == "flip":
        damaged[len(damaged) // 2] ^= 0xFF
    else:
        damaged = damaged[: len(damaged) // 2]
    path.write_bytes(bytes(damaged))
    try:
        res = runner.invoke(kdcache_app, ["verify", str(cache)])
        text = unwrap(res.output)
        assert res.exit_code == 1, text
        shard = key.split("/")[1].split(".")[0] if key.startswith(("shards/", "meta/")) else None
        if key == "manifest.json":
            assert "manifest.json is not valid JSON" in text, text
        else:
            assert f"BAD {shard or 'cache'}: {key}:" in text, text

        train = runner.invoke(kdtrain_app, ["run", "--cache", str(cache), "--student-from-teacher", "--keep-layers", "1",
                                            "--steps", "1", "--batch-tokens", "128", "--out", str(tmp_path / "run")])
        text = unwrap(train.output)
        if key.endswith(BOOKKEEPING):  # never read by a reader: training is unaffected
            assert train.exit_code == 0, text
            assert "done: 1 steps" in text
        else:
            assert train.exit_code == 2, text
            assert f"cannot train from {cache}" in text or "refusing to train on it" in text, text
            assert (shard or "manifest.json") in text, text
            assert not (tmp_path / "run" / "model.safetensors").exists()
    finally:
        path.write_bytes(original)
    assert CacheReader(str(cache)).verify(bookkeeping=True) == []


def _huge_shape(cache: Path) -> str:
    key = "shards/shard-00001/topk_id_codes/zarr.json"
    meta = json.loads((cache / key).read_text())
    meta["shape"] = [2**40, 8]
    replace_object(cache, key, json.dumps(meta).encode())
    return key


def _pickle_codec(cache: Path) -> str:
    key = "shards/shard-00001/tail_logprob/zarr.json"
    meta = json.loads((cache / key).read_text())
    meta["codecs"].append({"name": "numcodecs.pickle"})
    replace_object(cache, key, json.dumps(meta).encode())
    return key


def _meta_column_type(cache: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "meta/shard-00001.parquet"
    table = pq.read_table(cache / key)
    i = table.schema.get_field_index("num_tokens")
    table = table.set_column(i, pa.field("num_tokens", pa.string()), table.column(i).cast(pa.string()))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    replace_object(cache, key, sink.getvalue())
    return key


def _meta_bomb(cache: Path) -> str:
    """text_sha256 values of 16 MiB each: a few KB of Parquet (storage_layout.md 4 bounds it before decoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "meta/shard-00001.parquet"
    table = pq.read_table(cache / key)
    i = table.schema.get_field_index("text_sha256")
    table = table.set_column(i, "text_sha256", pa.array(["f" * 2**24] * table.num_rows))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    assert len(sink.getvalue()) < 50_000
    replace_object(cache, key, sink.getvalue())
    return f"{key}: its columns sequence_index"


def _id_beyond_vocabulary(cache: Path) -> str:
    import numpy as np

    from shared.writer import encode_zarr_group

    codes = np.asarray(CacheReader(str(cache)).shard(1)._arrays["topk_id_codes"][:]).copy()
    codes[5, 0] = 60_000  # V = 384; still a valid uint16
    for key, data in encode_zarr_group({"topk_id_codes": codes}, chunk_rows=64).items():
        if key.startswith("topk_id_codes/c/"):
            replace_object(cache, f"shards/shard-00001/{key}", data)
    return "topk_id_codes, topk_id_table: row 5: a code is outside [0, 384)"


HOSTILE = {  # name: edit returning what the messages must contain
    "zarr.json claims 2^40 rows": _huge_shape,
    "zarr.json asks for a pickle codec": _pickle_codec,
    "meta column of the wrong type": _meta_column_type,
    "meta Parquet decompression bomb": _meta_bomb,
    "id beyond the vocabulary (valid checksums)": _id_beyond_vocabulary,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_cache_through_the_clis(cache, case, tmp_path):
    """Checksums that match, content that lies: verify names it (exit 1), and so does kdtrain (exit 2)."""
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(cache, hostile)
    named = HOSTILE[case](hostile)
    res = runner.invoke(kdcache_app, ["verify", str(hostile)])
    text = unwrap(res.output)
    assert res.exit_code == 1 and "BAD shard-00001:" in text and named in text, text
    train = runner.invoke(kdtrain_app, ["run", "--cache", str(hostile), "--student-from-teacher", "--keep-layers", "1",
                                        "--steps", "2", "--batch-tokens", "128", "--out", str(tmp_path / "run")])
    text = unwrap(train.output)
    assert train.exit_code == 2 and "shard-00001" in text and named in text, text
    assert "Traceback" not in text and not (tmp_path / "run" / "model.safetensors").exists()


def write_shards(url: Path, num_shards: int) -> None:
    """The same build every time: shard s's sequences come from seed s, whichever shards are pending."""
    import numpy as np

    from shared.writer import CacheWriter
    from tests.shared.fakes import header, random_sequence

    with CacheWriter(str(url), header(num_shards)) as w:
        for s in w.pending_shards():
            rng = np.random.default_rng(s)
            with w.shard(s) as buf:
                for i in range(3):
                    buf.add_sequence(**random_sequence(rng, 12), source_index=3 * s + i)
        w.finalize()


def test_damaged_commit_file_before_completion_means_rebuild_that_shard(tmp_path):
    """Before manifest.json exists a damaged commit file makes its shard uncommitted: the resumed build rewrites it."""
    from shared.writer import CacheWriter
    from tests.shared.fakes import header

    url = tmp_path / "c"
    write_shards(url, 3)
    clean = {k: (url / k).read_bytes() for k in stored_keys(url) if k not in ("build.json", "manifest.json")}
    os.remove(url / "manifest.json")
    commit = url / "shards" / "shard-00001" / "commit.json"
    commit.write_bytes(commit.read_bytes()[:40])
    with CacheWriter(str(url), header(3)) as w:
        assert w.pending_shards() == [1]
        assert w.finalize() is None  # `kdcache finalize` would not assemble a manifest from it either
    write_shards(url, 3)  # the same build again: writes shard 1 only
    assert {k: (url / k).read_bytes() for k in stored_keys(url) if k not in ("build.json", "manifest.json")} == clean
    assert CacheReader(str(url)).verify(bookkeeping=True) == []


def test_finalize_never_rewrites_a_complete_cache(tmp_path):
    from shared.writer import finalize_cache
    from tests.shared.fakes import write_cache

    url = tmp_path / "c"
    write_cache(str(url), num_shards=2)
    before = (url / "manifest.json").read_bytes()
    (url / "shards" / "shard-00000" / "commit.json").write_text("{damaged")
    assert finalize_cache(str(url)).cache_key == CacheReader(str(url)).manifest.cache_key
    assert (url / "manifest.json").read_bytes() == before


def write_sized_cache(url: str, *, num_shards: int, rows_per_shard: int, top_k: int = 64, vocab_size: int = 49152):
    """A cache of SmolLM2's shape (K = 64, V = 49152) with synthetic rows, about 2.8 bytes per (token x K)."""
    import numpy as np

    from shared.writer import CacheWriter
    from tests.shared.fakes import header

    rng = np.random.default_rng(0)
    with CacheWriter(url, header(num_shards, top_k=top_k, vocab_size=vocab_size)) as w:
        for s in w.pending_shards():
            with w.shard(s) as buf:
                for i in range(rows_per_shard // 256):
                    n = 256
                    first = rng.zipf(1.3, size=(n, 1)) % vocab_size  # frequent ids are small, as in real vocabularies
                    ids = (first + np.arange(top_k) * 7919) % vocab_size  # distinct in a row (7919 is prime to V)
                    logp = -np.sort(rng.gamma(2.0, 2.0, size=(n, top_k)), axis=1)
                    mass = rng.uniform(0.5, 0.99, size=(n, 1))  # the top K's share of the probability
                    logp += np.log(mass) - np.log(np.exp(logp).sum(1, keepdims=True))
                    tail = np.log1p(-mass[:, 0])
                    tokens = np.concatenate([[1], ids[:-1, 0]])  # each next token is its row's most likely one
                    target = logp[:, 0].copy()
                    target[-1] = np.nan
                    mask = np.ones(n, bool)
                    mask[-1] = False
                    buf.add_sequence(input_ids=tokens, loss_mask=mask, topk_ids=ids, topk_logprobs=logp,
                                     target_logprob=target, tail_logprob=tail, source_index=i)
        w.finalize()


@pytest.mark.slow
def test_hash_cost(tmp_path):
    """The figures of storage_layout.md section 7: sha256 alone, hashing a cache at start, hashing on read, decoding."""
    from shared.reader import check_objects

    blob = os.urandom(256 * 2**20)
    started = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    sha_mib_s = len(blob) / 2**20 / (time.perf_counter() - started)
    del blob
    url = str(tmp_path / "big")
    write_sized_cache(url, num_shards=4, rows_per_shard=65536)
    reader = CacheReader(url)
    mib = reader.manifest.totals["num_bytes"] / 2**20
    num_tokens = reader.manifest.totals["num_tokens"]

    started = time.perf_counter()
    assert reader.verify() == []  # kdtrain run at start (caches up to 4 GiB)
    at_start_s = time.perf_counter() - started
    started = time.perf_counter()
    first_shard = check_objects(reader.store, reader.shards[0], hashes=True)  # verify_on_read: before shard 0's first row
    on_read_s = time.perf_counter() - started
    assert first_shard == []
    started = time.perf_counter()
    for s in range(reader.num_shards):
        view = CacheReader(url).shard(s)
        for lo in range(0, int(view.offsets[-1]), 8192):
            view.read_rows(lo, min(lo + 8192, int(view.offsets[-1])))
    decode_s = time.perf_counter() - started
    print(f"\nsha256 alone: {sha_mib_s:.0f} MiB/s; cache of {mib:.1f} MiB, {num_tokens:,} tokens x K=64 "
          f"({mib * 2**20 / num_tokens / 64:.2f} B per token x K)\n"
          f"hash at start (verify): {at_start_s:.2f}s = {mib / at_start_s:.0f} MiB/s = {num_tokens / at_start_s:,.0f} "
          "tokens/s\n"
          f"hash on read, first shard: {on_read_s:.2f}s ({mib / 4 / on_read_s:.0f} MiB/s)\n"
          f"decode every row once (what training reads anyway): {decode_s:.2f}s = {num_tokens / decode_s:,.0f} tokens/s")
    assert sha_mib_s > 50


def test_repair_as_verify_says(tmp_path):
    """`kdcache verify` names a damaged shard and says how to repair; doing so restores the clean bytes."""
    url = tmp_path / "c"
    write_shards(url, 3)
    clean = {k: (url / k).read_bytes() for k in stored_keys(url) if k not in ("build.json", "manifest.json")}
    chunk = url / "shards" / "shard-00002" / "topk_prob_steps" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    res = runner.invoke(kdcache_app, ["verify", str(url)])
    text = unwrap(res.output)
    assert res.exit_code == 1
    assert (f"To repair: delete {url}/manifest.json and the commit.json of shard-00002, then rerun the same "
            "`kdcache build` command; it rewrites only those shards.") in text
    (url / "manifest.json").unlink()
    (url / "shards" / "shard-00002" / "commit.json").unlink()
    write_shards(url, 3)  # the same build again
    assert {k: (url / k).read_bytes() for k in stored_keys(url) if k not in ("build.json", "manifest.json")} == clean
    assert runner.invoke(kdcache_app, ["verify", str(url)]).exit_code == 0
