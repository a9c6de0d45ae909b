import numpy as np
import pytest

from shared.format import TARGET_SENTINEL, CacheError, id_dtype
from shared.reader import CacheReader
from tests.shared.fakes import write_cache


@pytest.mark.parametrize("where", ["local", "memory"])
def test_roundtrip_several_shards(tmp_path, where):
    url = str(tmp_path / "c") if where == "local" else f"memory://rt-{tmp_path.name}"
    written = write_cache(url, num_shards=3, seqs_per_shard=4)
    r = CacheReader(url)
    assert r.num_shards == 3
    assert r.manifest.totals["num_sequences"] == 12
    assert r.verify() == []
    for (s, i), seq in written.items():
        got = r.shard(s).read_sequence(i)
        np.testing.assert_array_equal(got["input_ids"], seq["input_ids"])
        np.testing.assert_array_equal(got["topk_ids"], seq["topk_ids"])
        np.testing.assert_array_equal(got["loss_mask"], seq["loss_mask"])
        # float16 storage: within half an ulp of the float32 value
        np.testing.assert_allclose(got["topk_logprobs"].astype(np.float32), seq["topk_logprobs"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got["target_logprob"][:-1].astype(np.float32), seq["target_logprob"][:-1], rtol=1e-3, atol=1e-4)
        assert got["target_logprob"][-1] == TARGET_SENTINEL
        # The tail is recoverable to within 1e-3 in probability.
        tail_p = np.exp(got["tail_logprob"].astype(np.float64))
        assert np.max(np.abs(tail_p - np.exp(seq["tail_logprob"]))) < 1e-3
    meta = r.meta(1).to_pydict()
    assert meta["source_index"] == [4, 5, 6, 7]
    assert meta["num_tokens"] == [len(written[(1, i)]["input_ids"]) for i in range(4)]


def test_read_rows_partial_and_sequences(tmp_path):
    url = str(tmp_path / "c")
    written = write_cache(url, num_shards=1, seqs_per_shard=5)
    view = CacheReader(url).shard(0)
    seqs = view.read_sequences([1, 3])
    np.testing.assert_array_equal(seqs[1]["input_ids"], written[(0, 3)]["input_ids"])
    rows = view.read_rows(2, 7, fields=("input_ids",))
    assert set(rows) == {"input_ids"} and len(rows["input_ids"]) == 5
    with pytest.raises(IndexError):
        view.read_rows(0, 10**9)


def test_id_dtype_is_narrowest():
    assert id_dtype(256) == np.uint8
    assert id_dtype(257) == np.uint16
    assert id_dtype(65536) == np.uint16
    assert id_dtype(65537) == np.uint32
    assert id_dtype(151_936) == np.uint32


def test_tail_error_in_probability_is_at_most_e_inv_times_2_pow_minus_11():
    """storage_layout.md 3.2: the stored tail's error in probability is at most max_r r|ln r| 2^-11 = e^-1 2^-11
    (about 1.8e-4, within the format's 1e-3), and that bound is reached (near r = 1/e), so 2^-12 would be wrong."""
    import math

    from shared.writer import validate_shard_arrays

    tails = np.concatenate([np.linspace(0, 1, 400_001)[1:-1], np.logspace(-12, 0, 10_000)[:-1]])
    n = len(tails)
    arrays = {"input_ids": np.zeros(n, np.int64), "offsets": np.array([0, n]), "loss_mask": np.zeros(n, bool),
              "topk_ids": np.zeros((n, 1), np.int64), "topk_logprobs": np.log1p(-tails)[:, None],
              "target_logprob": np.log1p(-tails), "tail_logprob": np.log(tails)}  # id 0 comes next: its own entry
    stored = validate_shard_arrays(arrays, vocab_size=2, top_k=1, where="test")["tail_logprob"]  # as the writer stores it
    error = np.abs(np.exp(stored.astype(np.float64)) - tails)
    bound = math.exp(-1) * 2**-11
    assert error.max() <= bound * (1 + 2**-10)  # second order of exp, and the float32 step before float16
    assert error.max() < 1.8e-4  # the figure the spec states (and < 1e-3, the format's requirement)
    assert error.max() > 0.99 * bound > math.exp(-1) * 2**-12


def test_missing_cache_folder_is_clear(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(str(tmp_path / "nope"))


def test_low_ranks_rounded_within_bound_and_order_kept(tmp_path):
    """Ranks > 16 keep 7 mantissa bits: relative error <= 2^-8, still sorted (storage_layout.md 3.1)."""
    from shared.encode import round_mantissa
    from shared.writer import CacheWriter
    from tests.shared.fakes import header, random_sequence

    rng = np.random.default_rng(1)
    url = str(tmp_path / "c")
    seq = random_sequence(rng, 50, top_k=64)
    with CacheWriter(url, header(1, top_k=64)) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**seq, source_index=0)
        w.finalize()
    r = CacheReader(url)
    got = r.shard(0).read_sequence(0)["topk_logprobs"].astype(np.float64)
    want = seq["topk_logprobs"]
    np.testing.assert_allclose(got[:, :16], want[:, :16], rtol=2**-11, atol=1e-7)
    rel = np.abs(got[:, 16:] - want[:, 16:]) / np.abs(want[:, 16:])
    assert rel.max() <= 2**-8 + 2**-11
    assert np.all(np.diff(got, axis=1) <= 0)
    assert r.manifest.arrays["topk_logprobs"]["rounding"] == {"exact_ranks": 16, "mantissa_bits": 7}
    x = np.array([-1.0009765625, -np.inf], dtype=np.float16)
    assert round_mantissa(x, 10).tolist() == x.tolist() and np.isneginf(round_mantissa(x, 7)[1])
