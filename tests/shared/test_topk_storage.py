"""The top-K rows as format 3 stores them (storage_layout.md 3.1): the writer's objects, row ranges across chunks,
and the writer's refusals of what the encoding cannot hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.encode import array_metadata, encode_zarr_group, shard_shapes, stored_rows, topk_coding
from shared.format import CacheError, CacheFormatError
from shared.reader import CacheReader
from shared.topk_codec import id_table_size, prob_levels
from shared.writer import CacheWriter, validate_shard_arrays
from tests.shared.fakes import VOCAB, header, random_sequence, write_cache


def test_every_zarr_json_is_what_zarr_writes_for_the_format_metadata():
    """array_metadata (what a reader accepts, exactly) is what Zarr itself writes for each stored array, the transpose
    codec of the steps, the bit shuffle of the top-K arrays and the one-table chunks included."""
    rng = np.random.default_rng(0)
    seq = random_sequence(rng, 30)
    arrays = validate_shard_arrays({**seq, "offsets": np.array([0, 30])}, vocab_size=VOCAB, top_k=8, where="test")
    shapes = shard_shapes(30, 1, 8, 0, VOCAB, chunk_rows=7, table_size=11)
    stored = stored_rows(arrays, shapes, 7, VOCAB)
    assert {name: (values.shape, str(values.dtype)) for name, values in stored.items()} == \
        {name: (shape, dtype) for name, (shape, dtype) in shapes.items()}
    assert shapes["topk_id_table"][0] == (5, 11)  # ceil(30 / 7) chunks, one table each
    objects = encode_zarr_group(stored, chunk_rows=7)
    for name, (shape, dtype) in shapes.items():
        assert json.loads(objects[f"{name}/zarr.json"]) == array_metadata(name, shape, dtype, 7), name
    assert array_metadata("topk_prob_steps", (30, 8), "uint16", 7)["codecs"][0] == \
        {"name": "transpose", "configuration": {"order": [1, 0]}}
    chunks = [k.split("/c/")[0] for k in objects if "/c/" in k]
    assert chunks.count("topk_id_table") == chunks.count("topk_id_codes") == 5


@pytest.mark.parametrize("chunk_rows", [1, 7, 8192])
def test_any_row_range_reads_what_the_whole_shard_holds(tmp_path, chunk_rows):
    """A range touching several chunks reads those chunks' tables (storage_layout.md 3.1): every range decodes to the
    rows of the whole shard, and those are the ids given."""
    url = str(tmp_path / "c")
    written = write_cache(url, num_shards=1, seqs_per_shard=4, chunk_rows=chunk_rows)
    view = CacheReader(url).shard(0)
    num_rows = int(view.offsets[-1])
    whole = view.read_rows(0, num_rows)
    np.testing.assert_array_equal(whole["topk_ids"], np.concatenate([written[(0, i)]["topk_ids"] for i in range(4)]))
    rng = np.random.default_rng(chunk_rows)
    for start in sorted(rng.integers(0, num_rows, 6)):
        stop = int(rng.integers(start, num_rows + 1))
        part = view.read_rows(int(start), stop, ("topk_ids", "topk_logprobs"))
        for name in ("topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(part[name], whole[name][start:stop])


def test_every_shard_of_a_cache_has_tables_of_one_size(tmp_path):
    """N is one value per cache (manifest.arrays): a shard shorter than a chunk has tables of the full chunk's N."""
    url = str(tmp_path / "c")
    write_cache(url, num_shards=2, seqs_per_shard=2, chunk_rows=100)
    reader = CacheReader(url)
    n = id_table_size(100, 8, VOCAB)
    assert reader.manifest.arrays["topk_id_table"]["table_size"] == n == topk_coding(8, VOCAB, 100)[0] == 12
    for s, entry in enumerate(reader.shards):
        assert entry.num_tokens < 100 and reader.shard(s)._arrays["topk_id_table"].shape == (1, n)
    assert reader.manifest.arrays["topk_prob_steps"]["levels"] == prob_levels(8)


def test_a_tail_that_rounds_to_zero_is_refused_by_the_writer():
    """s = 1 - exp(tail) scales the codes; a tail of 0 in float16 (the top K hold under 3e-8) leaves nothing."""
    rng = np.random.default_rng(0)
    seq = random_sequence(rng, 6)
    seq["topk_logprobs"][3] = np.log(np.full(8, 1e-9))
    seq["tail_logprob"][3] = np.log1p(-8e-9)
    seq["target_logprob"][3] = -30.0
    with pytest.raises(CacheFormatError, match=r"shard-00000: tail_logprob row 3: rounds to 0 in float16 \(the top K "
                                               r"hold under 3e-8 of the probability\).* use a larger --top-k"):
        validate_shard_arrays({**seq, "offsets": np.array([0, 6])}, vocab_size=VOCAB, top_k=8, where="shard-00000")


def test_a_vocabulary_over_two_to_the_24_is_refused_before_anything_is_written(tmp_path):
    """Readers decode ids through a permutation of V entries and refuse V > 2^24 (storage_layout.md 6.2)."""
    with pytest.raises(CacheError, match=r"the tokenizer has 16,777,217 ids; the format holds at most 16,777,216"):
        CacheWriter(str(tmp_path / "c"), header(1, vocab_size=2**24 + 1))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("version", [1, 2])
def test_a_cache_of_an_older_format_is_refused_in_one_place_with_one_message(tmp_path, version):
    """Format 3 stores the top K otherwise: a version 1 or 2 manifest or build.json is refused by check_format_version,
    saying to rebuild (storage_layout.md 10, 11); a resumed build meets it in build.json."""
    from tests.shared.fakes import reseal

    url = tmp_path / "c"
    write_cache(str(url), num_shards=1)
    manifest = json.loads((url / "manifest.json").read_text())
    (url / "manifest.json").write_text(json.dumps(reseal({**manifest, "format_version": version}, rekey=False)))
    rebuild = (rf"this cache has format_version {version}, written by an older kdcache; this kdcache reads version 3 "
               r"only \(storage_layout.md 11 .*\). Rebuild it with this kdcache: delete the cache folder")
    with pytest.raises(CacheFormatError, match="manifest.json: " + rebuild):
        CacheReader(str(url))
    (url / "manifest.json").unlink()
    build = json.loads((url / "build.json").read_text())
    (url / "build.json").write_text(json.dumps({**build, "format_version": version}))
    with pytest.raises(CacheFormatError, match="build.json: " + rebuild), CacheWriter(str(url), header(1)):
        pass
