import math

import numpy as np
import pytest

from shared.format import TARGET_SENTINEL, CacheError, id_dtype
from shared.reader import CacheReader
from shared.topk_codec import codes_to_logprobs, log_topk_mass, prob_codes, prob_levels
from tests.shared.fakes import TOP_K, write_cache


def decoded_topk(topk_logprobs: np.ndarray, tail_logprob: np.ndarray, top_k: int) -> np.ndarray:
    """What a reader returns for these given rows (storage_layout.md 3.1): each log-prob's sqrt-probability code
    against the float16 tail, decoded to float16."""
    tail = np.minimum(tail_logprob, 0).astype(np.float16)
    levels = prob_levels(top_k)
    codes = prob_codes(np.minimum(topk_logprobs.astype(np.float32), 0), log_topk_mass(tail)[:, None], levels)
    return codes_to_logprobs(codes, tail, levels, np.float16)


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
        # the codes of the given values (bounds: test_topk_logprobs_within_half_a_step_of_sqrt_p)
        np.testing.assert_array_equal(got["topk_logprobs"], decoded_topk(seq["topk_logprobs"], seq["tail_logprob"], TOP_K))
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


def test_topk_logprobs_within_half_a_step_of_sqrt_p(tmp_path):
    """storage_layout.md 3.1-3.2, checked in float64 without the codec: each decoded entry's sqrt(q / s) is within
    half a step 1 / (2 L) of sqrt(p / s) (a whole step for entries below the smallest level, which are stored as
    it), plus the float16 rounding of the value a reader hands out; rows stay sorted; the renormalized top K's mean
    KL is within the format's 1e-5; manifest.arrays records L and N."""
    from shared.writer import CacheWriter
    from tests.shared.fakes import header, random_sequence

    top_k, vocab = 64, 1000
    url = str(tmp_path / "c")
    rng = np.random.default_rng(1)
    seq = random_sequence(rng, 200, top_k=top_k)
    seq["topk_logprobs"][:5, -3:] = -np.inf  # probability 0: stored as code 0, read back as -inf
    seq["topk_logprobs"][5:10, -3:] = -30.0  # below the smallest level
    seq["input_ids"][1:11] = seq["topk_ids"][:10, 0]  # rows 0..9: the next token is the top-1, whose target it is
    seq["target_logprob"][:10] = seq["topk_logprobs"][:10, 0]
    with CacheWriter(url, header(1, top_k=top_k)) as w:
        with w.shard(0) as buf:
            buf.add_sequence(**seq, source_index=0)
        w.finalize()
    r = CacheReader(url)
    levels = math.ceil(math.sqrt(top_k / (6 * 4e-6)))
    assert r.manifest.arrays["topk_prob_steps"] == {"dtype": "uint16", "levels": levels}
    assert r.manifest.arrays["topk_id_table"] == {"dtype": "uint16", "table_size": min(vocab, 8192 * top_k // 64)}
    got = r.shard(0).read_sequence(0)["topk_logprobs"].astype(np.float64)
    assert np.all((got[:, 1:] <= got[:, :-1]) | np.isneginf(got[:, 1:]))  # sorted (-inf - -inf is NaN)
    assert np.array_equal(np.isneginf(got), np.isneginf(seq["topk_logprobs"]))
    s = 1 - np.exp(np.float16(seq["tail_logprob"]).astype(np.float64))[:, None]  # the top-K mass the stored tail gives
    with np.errstate(divide="ignore", invalid="ignore"):
        want, have = np.sqrt(np.exp(seq["topk_logprobs"]) / s), np.sqrt(np.exp(got) / s)
    step = np.where(want < 1.5 / levels, 1.0, 0.5) / levels
    float16 = have * np.abs(np.where(np.isfinite(got), got, 0)) * 2.0**-11
    assert np.all(np.abs(have - want) <= step + float16 + 1e-9)
    p = np.exp(seq["topk_logprobs"]) / np.exp(seq["topk_logprobs"]).sum(1, keepdims=True)
    q = np.exp(got) / np.exp(got).sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(q)), 0).sum(1)
    assert 0 < kl.mean() <= 1e-5
