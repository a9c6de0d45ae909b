"""The tail_samples extension (storage_layout.md 3.3): round trip, manifest rules, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from shared.catalog import describe
from shared.format import ROW_ARRAYS, TAIL_ARRAYS, CacheFormatError, row_arrays
from shared.reader import CacheReader
from shared.writer import CacheWriter, ShardBuffer, validate_shard_arrays
from tests.shared.fakes import TOP_K, VOCAB, header, random_sequence, reseal

M = 6


def with_tail(rng: np.random.Generator, seq: dict, m: int = M) -> dict:
    """Add M draws from the row's distribution outside its top K, as distinct ids + counts, unused slots
    holding the smallest ids not otherwise in the row (what cacher.engines produces)."""
    n = seq["topk_ids"].shape[0]
    ids = np.zeros((n, m), dtype=np.int64)
    counts = np.zeros((n, m), dtype=np.int64)
    for r in range(n):
        weights = rng.random(VOCAB)
        weights[seq["topk_ids"][r]] = 0
        draws = rng.choice(VOCAB, size=m, p=weights / weights.sum())
        uniq, cnt = np.unique(draws, return_counts=True)
        order = np.lexsort((uniq, -cnt))
        used = len(uniq)
        ids[r, :used], counts[r, :used] = uniq[order], cnt[order]
        taken = set(seq["topk_ids"][r].tolist()) | set(uniq.tolist())
        ids[r, used:] = [i for i in range(VOCAB) if i not in taken][: m - used]
    return {**seq, "tail_ids": ids, "tail_counts": counts}


def write_tail_cache(url: str, *, num_shards: int = 2, seqs: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    written = {}
    with CacheWriter(url, header(num_shards, tail_samples=M, tail_seed=0)) as w:
        for s in w.pending_shards():
            with w.shard(s) as buf:
                for i in range(seqs):
                    seq = with_tail(rng, random_sequence(rng, int(rng.integers(5, 30))))
                    buf.add_sequence(**seq, source_index=s * seqs + i, text_sha256=f"{s}-{i}")
                    written[(s, i)] = seq
        w.finalize()
    return written


@pytest.fixture
def tail_cache(tmp_path):
    url = str(tmp_path / "tail")
    return url, write_tail_cache(url)


def test_roundtrip_and_manifest(tail_cache):
    url, written = tail_cache
    reader = CacheReader(url)
    m = reader.manifest
    assert m.tail_samples == M
    assert m.extensions == {"tail_samples": {"must_understand": True}}
    assert m.arrays["tail_ids"]["dtype"] == "uint16" and m.arrays["tail_counts"]["dtype"] == "uint8"
    for (s, i), seq in written.items():
        got = reader.shard(s).read_sequence(i, row_arrays(M))
        np.testing.assert_array_equal(got["tail_ids"], seq["tail_ids"])
        np.testing.assert_array_equal(got["tail_counts"], seq["tail_counts"])
        np.testing.assert_array_equal(got["topk_ids"], seq["topk_ids"])
    assert reader.verify() == []
    # info counts K + M entries per row
    d = describe(reader)
    assert d["bytes_per_token_k"] == pytest.approx(d["num_bytes"] / (d["num_tokens"] * (TOP_K + M)))


def test_cache_without_tail_samples_has_no_tail_arrays(tmp_path):
    from tests.shared.fakes import write_cache

    url = str(tmp_path / "plain")
    write_cache(url, num_shards=1)
    reader = CacheReader(url)
    assert reader.manifest.tail_samples == 0 and reader.manifest.extensions == {}
    assert row_arrays(0) == ROW_ARRAYS
    with pytest.raises(KeyError, match="built without --tail-samples"):
        reader.shard(0).read_rows(0, 2, ("tail_ids",))


def _edit(url, fn):
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    fn(m)
    with open(path, "w") as f:
        json.dump(reseal(m), f)


def test_extension_and_setting_go_together(tail_cache):
    url, _ = tail_cache
    _edit(url, lambda m: m["extensions"].clear())
    with pytest.raises(CacheFormatError, match="tail_samples = 6 but extensions lacks"):
        CacheReader(url)


def test_tail_arrays_must_be_described(tail_cache):
    url, _ = tail_cache
    _edit(url, lambda m: m["arrays"].pop("tail_counts"))
    with pytest.raises(CacheFormatError, match="arrays must describe exactly"):
        CacheReader(url)


@pytest.mark.parametrize("bad", [-1, 256, 2.5, True, "16", None])
def test_tail_samples_setting_validated(tail_cache, bad):
    url, _ = tail_cache
    _edit(url, lambda m: m["settings"].update(tail_samples=bad))
    # the message names where the bad value is (the 520-mutant test found a None refused without it)
    with pytest.raises(CacheFormatError, match="^manifest: settings.tail_samples must be an integer"):
        CacheReader(url)


def test_older_reader_contract_unknown_extension_refused(tail_cache):
    """A reader that does not know an extension marked must_understand refuses the cache."""
    url, _ = tail_cache
    _edit(url, lambda m: m["extensions"].update(sparkles={"must_understand": True}))
    with pytest.raises(CacheFormatError, match="extension 'sparkles' is marked must_understand"):
        CacheReader(url)


def _arrays(seed=1, n=12):
    rng = np.random.default_rng(seed)
    seq = with_tail(rng, random_sequence(rng, n))
    buf = ShardBuffer(0)
    buf.add_sequence(**seq, source_index=0, text_sha256="x")
    return buf.arrays()


def _validate(arrays):
    return validate_shard_arrays(arrays, vocab_size=VOCAB, top_k=TOP_K, where="shard-00000", tail_samples=M)


def test_writer_accepts_valid_and_casts():
    out = _validate(_arrays())
    assert out["tail_ids"].dtype == np.uint16 and out["tail_counts"].dtype == np.uint8


@pytest.mark.parametrize("damage, message", [
    (lambda a: a["tail_counts"].__setitem__((0, 0), a["tail_counts"][0, 0] + 1), r"counts are in \[0, M\] and sum to M"),
    (lambda a: a["tail_ids"].__setitem__((0, 0), a["topk_ids"][0, 0]), ("a row's K top-K ids and M tail ids are all "
                                                                        "distinct")),
    (lambda a: a["tail_ids"].__setitem__((1, 1), a["tail_ids"][1, 0]), "tail_ids row 1: breaks the rule that a row's K"),
    (lambda a: a["tail_ids"].__setitem__((0, 0), VOCAB), ("tail_ids row 0: breaks the rule that every id is below the "
                                                          "vocabulary size V")),
    (lambda a: a["tail_counts"].__setitem__((0, slice(None)), [1, 2, 1, 1, 1, 0]), "counts do not increase along M"),
    (lambda a: a["tail_counts"].__setitem__((0, slice(None)), [7, 0, 0, 0, 0, -1]), r"counts are in \[0, M\]"),
], ids=["counts-sum", "a-top-k-id", "repeated-id", "id-beyond-vocabulary", "counts-unsorted", "count-out-of-range"])
def test_writer_refuses_bad_tail_samples(damage, message):
    arrays = _arrays()
    damage(arrays)
    with pytest.raises(CacheFormatError, match=message):
        _validate(arrays)


def test_writer_refuses_missing_or_unexpected_tail_arrays():
    arrays = _arrays()
    with pytest.raises(CacheFormatError, match="has tail samples but the build's settings.tail_samples is 0"):
        validate_shard_arrays(arrays, vocab_size=VOCAB, top_k=TOP_K, where="s")
    for name in TAIL_ARRAYS:
        arrays.pop(name)
    with pytest.raises(CacheFormatError, match="no tail_ids / tail_counts"):
        _validate(arrays)


def test_empty_tail_row_has_no_draws():
    arrays = _arrays()
    arrays["tail_logprob"][0] = -np.inf  # the top K hold all the mass of row 0 (and its next token is not there)
    arrays["topk_logprobs"][0] = np.log(1 / TOP_K)
    arrays["target_logprob"][0] = np.log(1 / TOP_K) if arrays["input_ids"][1] in arrays["topk_ids"][0] else -np.inf
    with pytest.raises(CacheFormatError, match="tail_counts, tail_logprob row 0: breaks the rule that a row whose "
                                               "tail_logprob is -inf has no draws"):
        _validate(arrays)
    arrays["tail_counts"][0] = 0
    _validate(arrays)


def test_buffer_refuses_mixed_sequences():
    rng = np.random.default_rng(0)
    buf = ShardBuffer(0)
    buf.add_sequence(**with_tail(rng, random_sequence(rng, 5)), source_index=0, text_sha256="a")
    with pytest.raises(CacheFormatError, match="every sequence of a shard has tail samples or none does"):
        buf.add_sequence(**random_sequence(rng, 5), source_index=1, text_sha256="b")


def test_reader_refuses_counts_above_m(tail_cache, monkeypatch):
    """Values are checked as rows are read (a damaged chunk with a valid checksum is someone else's cache)."""
    import shared.reader as reader_mod

    url, _ = tail_cache
    view = CacheReader(url).shard(0)
    real = view._read

    def inflated(name, rows):
        out = real(name, rows)
        if name == "tail_counts":
            out = out.copy()
            out[0, -1] = 5
        return out

    monkeypatch.setattr(view, "_read", inflated)
    with pytest.raises(reader_mod.CacheFormatError, match=r"tail_counts row 0: breaks the rule that a row's counts are "
                                                           r"in \[0, M\]"):
        view.read_rows(0, 3, ("tail_counts",))
