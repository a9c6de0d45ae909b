"""Every way a cache can be wrong is refused with a message naming what and where."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shared.format import (
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    CacheLockedError,
    CacheMismatchError,
    IncompleteCacheError,
)
from shared.reader import CacheReader
from shared.writer import CacheWriter, ShardBuffer
from tests.shared.fakes import header, random_sequence, reseal, write_cache


@pytest.fixture
def cache(tmp_path):
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2)
    return url


def edit_manifest(url, fn):
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    fn(m)
    with open(path, "w") as f:
        json.dump(reseal(m), f)


def test_unknown_version_refused(cache):
    edit_manifest(cache, lambda m: m.update(format_version=99))
    with pytest.raises(CacheFormatError, match="unsupported format_version 99"):
        CacheReader(cache)


def test_unknown_top_level_field_refused(cache):
    edit_manifest(cache, lambda m: m.update(compression_v2={"x": 1}))
    with pytest.raises(CacheFormatError, match="unknown field.*compression_v2"):
        CacheReader(cache)


def test_unknown_must_understand_extension_refused_optional_accepted(cache):
    edit_manifest(cache, lambda m: m.update(extensions={"fancy": {"must_understand": False}}))
    CacheReader(cache)
    edit_manifest(cache, lambda m: m.update(extensions={"fancy": {"must_understand": True}}))
    with pytest.raises(CacheFormatError, match="extension 'fancy' is marked must_understand"):
        CacheReader(cache)


def test_missing_mandatory_field_refused(cache):
    edit_manifest(cache, lambda m: m["tokenizer"].pop("vocab_sha256"))
    with pytest.raises(CacheFormatError, match="tokenizer is missing mandatory field 'vocab_sha256'"):
        CacheReader(cache)


@pytest.mark.parametrize("path", ["/etc/passwd", "../other/shard-00000", "shards/../../x", "s3://evil/shard-00000", "shards/shard-00001"])
def test_shard_path_outside_cache_refused(cache, path):
    edit_manifest(cache, lambda m: m["shards"][0].update(path=path))
    with pytest.raises(CacheFormatError):
        CacheReader(cache)


@pytest.mark.parametrize("field,value,match", [
    ("num_tokens", -5, "outside"),
    ("num_tokens", 2**60, "outside"),
    ("num_sequences", "3", "must be int"),
    ("objects", [], "must be dict"),
])
def test_hostile_shard_fields_refused(cache, field, value, match):
    edit_manifest(cache, lambda m: m["shards"][0].update({field: value}))
    with pytest.raises(CacheFormatError, match=match):
        CacheReader(cache)


def test_totals_must_add_up(cache):
    edit_manifest(cache, lambda m: m["totals"].update(num_tokens=m["totals"]["num_tokens"] + 1))
    with pytest.raises(CacheFormatError, match="totals.num_tokens"):
        CacheReader(cache)


def test_not_json(cache):
    Path(cache, "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        CacheReader(cache)


def test_missing_manifest_is_incomplete_with_count(cache):
    os.remove(os.path.join(cache, "manifest.json"))
    with pytest.raises(IncompleteCacheError, match="2 of 2 shards committed"):
        CacheReader(cache)


def test_flipped_byte_named_by_verify(cache):
    key = "shards/shard-00001/topk_prob_steps/c/0/0"
    path = os.path.join(cache, key)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    reader = CacheReader(cache)  # sizes still match: opening is fine
    problems = reader.verify()
    assert [(p.shard, p.object) for p in problems] == [("shard-00001", key)]
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        CacheReader(cache, verify_on_read=True).shard(1)


def test_truncated_object_refused_at_open(cache):
    path = os.path.join(cache, "meta/shard-00000.parquet")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-10])
    with pytest.raises(CacheCorruptError, match="shard-00000.*meta/shard-00000.parquet.*truncated"):
        CacheReader(cache)


def test_empty_plan_is_a_clear_error():
    with pytest.raises(CacheError, match="no sequences"):
        header(num_shards=0)


def test_nan_logprobs_never_committed(tmp_path):
    url = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    with CacheWriter(url, header(1)) as w:
        seq = random_sequence(rng, 10)
        seq["topk_logprobs"][3, 2] = np.nan
        with pytest.raises(CacheFormatError, match="NaN"), w.shard(0) as buf:
            buf.add_sequence(**seq, source_index=0)
        assert w.committed_shards() == set()
        assert w.finalize() is None
    assert not os.path.exists(os.path.join(url, "shards", "shard-00000"))
    with pytest.raises(IncompleteCacheError, match="0 of 1"):
        CacheReader(url)


def test_resume_skips_committed_and_refuses_other_settings(tmp_path):
    url = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    with CacheWriter(url, header(3)) as w, w.shard(1) as buf:
        buf.add_sequence(**random_sequence(rng, 7), source_index=0)
    with CacheWriter(url, header(3)) as w:
        assert w.pending_shards() == [0, 2]
    with pytest.raises(CacheMismatchError, match="settings.top_k: 8 -> 4"), CacheWriter(url, header(3, top_k=4)):
        pass
    with CacheWriter(url, header(3, top_k=4), overwrite=True) as w:
        assert w.pending_shards() == [0, 1, 2]


def test_complete_cache_with_same_key_is_reported_complete(cache):
    with CacheWriter(cache, header(2)) as w:
        assert w.complete and w.manifest is not None


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match="is a file"), CacheWriter(str(f), header(1)):
        pass


def test_non_kdcache_folder_not_touched(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(CacheMismatchError, match="is not a kdcache cache folder"), CacheWriter(str(tmp_path), header(1)):
        pass
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_live_lock_refused_dead_lock_recovered(tmp_path):
    url = str(tmp_path / "c")
    held = f"pid {os.getpid()}"
    with CacheWriter(url, header(1)), pytest.raises(CacheLockedError, match=held), CacheWriter(url, header(1)):
        pass
    # a lock left by a process that no longer exists is taken over
    lock = tmp_path / "c" / "locks" / "worker-00000-of-00001.json"
    import socket
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "since": "then", "heartbeat": 0}))
    with CacheWriter(url, header(1)):
        pass


def test_workers_own_disjoint_shards(tmp_path):
    url = str(tmp_path / "c")
    with CacheWriter(url, header(5), worker=0, num_workers=2) as w0:
        assert w0.my_shards() == [0, 2, 4]
    with CacheWriter(url, header(5), worker=1, num_workers=2) as w1:
        assert w1.my_shards() == [1, 3]
    with pytest.raises(CacheError, match="--worker 2"):
        CacheWriter(url, header(5), worker=2, num_workers=2)


@pytest.mark.parametrize("value,shown", [
    (0.5, "0.5"), ("x", "'x'"), (-3, "-3"), (0, "0"), (True, "True"), (None, "None"), (2**40, "1099511627776"),
], ids=["fraction", "string", "negative", "zero", "bool", "null", "huge"])
def test_chunk_rows_setting_validated_for_every_reader(cache, value, shown):
    """A trainer divides row indices by settings.chunk_rows: anything but a positive int in range is refused here."""
    edit_manifest(cache, lambda m: m["settings"].update(chunk_rows=value))
    with pytest.raises(CacheFormatError, match=r"manifest: settings.chunk_rows \(rows per Zarr chunk\) must be an "
                                               r"integer "
                                               r"in \[1, 67,108,864\] for top_k 8 and a vocabulary of 1000, got "
                                               rf"{shown}"):
        CacheReader(cache)
    with pytest.raises(CacheFormatError, match="settings.chunk_rows"):  # and no build starts with it
        header(1, chunk_rows=value)


def test_chunk_rows_setting_in_range_accepted_and_must_be_the_stored_one(tmp_path):
    """Caches chunked by 1, 7 or 8192 rows read back; a manifest claiming another chunk_rows than the stored chunks
    is refused: the zarr.json files and chunk keys follow from it (storage_layout.md 3.1, 6.2)."""
    for value in (1, 7, 8192):
        url = str(tmp_path / f"c{value}")
        written = write_cache(url, num_shards=1, chunk_rows=value)
        reader = CacheReader(url)
        assert reader.manifest.settings["chunk_rows"] == value
        np.testing.assert_array_equal(reader.shard(0).read_sequence(0)["input_ids"], written[(0, 0)]["input_ids"])
    edit_manifest(url, lambda m: m["settings"].update(chunk_rows=7))
    with pytest.raises(CacheFormatError, match=r"manifest: shard-00000 lists 18 objects, but \d+ rows in chunks of 7 rows"):
        CacheReader(url)


def test_top_k_mass_bound_is_one_rule_for_writer_and_reader(tmp_path):
    """Rows may sum to 1.02 as decoded (storage_layout.md 3); a shard of such rows is committed and read back, and a
    manifest claiming more than 1.02 x num_tokens is refused (section 6.3). The steps move a row's sum of 1.015 by at
    most sqrt(K) / L + K / (4 L^2) (section 3.2): 0.005 at K = 8."""
    url = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    seq = random_sequence(rng, 12)
    seq["topk_logprobs"] = np.full_like(seq["topk_logprobs"], np.log(1.015 / seq["topk_logprobs"].shape[1]))
    seq["tail_logprob"] = np.full(12, -np.inf)
    with CacheWriter(url, header(1)) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**seq, source_index=0)
        assert w.finalize() is not None
    reader = CacheReader(url)
    assert reader.manifest.shards[0].topk_mass_sum == pytest.approx(12 * 1.015, rel=5e-3)
    assert reader.verify() == []
    edit_manifest(url, lambda m: m["shards"][0].update(topk_mass_sum=12 * 1.021))
    with pytest.raises(CacheFormatError, match=r"shards\[0\].topk_mass_sum = 12.25\d* is not in \[0, 1.02 x num_tokens "
                                               r"= 12.24\]"):
        CacheReader(url)
    seq["topk_logprobs"][:] = np.log(1.03 / seq["topk_logprobs"].shape[1])
    buf = ShardBuffer(0)
    buf.add_sequence(**seq, source_index=0)
    with CacheWriter(str(tmp_path / "d"), header(1)) as w, \
            pytest.raises(CacheFormatError, match=r"topk_logprobs row 0: breaks the rule that a row's top-K "
                                                  r"probabilities "
                                                  r"sum to at most 1.02 \(log-probabilities, not logits\)"):
        w.write_shard(buf)


def test_verify_on_read_refuses_a_damaged_shard_at_its_first_read(cache):
    """What kdtrain run does above 4 GiB: open (sizes only), then hash each shard when first read (section 7)."""
    key = "shards/shard-00001/topk_id_codes/c/0/0"
    data = bytearray(Path(cache, key).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a hash finds it
    Path(cache, key).write_bytes(bytes(data))
    reader = CacheReader(cache, verify_on_read=True)  # opening does not hash
    assert reader.shard(0).read_sequence(0)["input_ids"].size  # an intact shard reads
    with pytest.raises(CacheCorruptError, match=f"shard-00001: {key}: sha256 [0-9a-f]{{12}}... does not match the "
                                               "manifest's") as refused:
        reader.shard(1)
    assert [(shard, obj) for shard, obj, _ in refused.value.problems] == [("shard-00001", key)]
    assert 1 not in reader._views  # nothing of it was opened
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        reader.shard(1)  # and it stays refused
    assert CacheReader(cache).shard(1).read_sequence(0)  # without hashing the flipped byte goes unnoticed


def test_verify_on_read_hashes_a_meta_file_before_reading_it(cache):
    """A trainer reads every meta table at start (its index) before any shard: those are hashed too."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "meta/shard-00001.parquet"
    table = pq.read_table(Path(cache, key))
    i = table.schema.get_field_index("text_sha256")
    changed = table.set_column(i, "text_sha256", pa.array(["9" + v[1:] for v in table.column(i).to_pylist()]))
    sink = io.BytesIO()
    pq.write_table(changed, sink, compression="zstd")
    assert len(sink.getvalue()) == Path(cache, key).stat().st_size  # a same-size, valid, different file
    Path(cache, key).write_bytes(sink.getvalue())
    assert CacheReader(cache).meta(1).column("text_sha256").to_pylist()[0].startswith("9")  # read as is
    with pytest.raises(CacheCorruptError, match=f"shard-00001: {key}: sha256 .* does not match the manifest's"):
        CacheReader(cache, verify_on_read=True).meta(1)
    assert CacheReader(cache, verify_on_read=True).meta(0).num_rows == 3
