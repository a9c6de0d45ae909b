"""shared.topk_codec: id codes with per-chunk tables (lossless) and sqrt-p steps (within half a step of sqrt(p))."""

import math

import numpy as np
import pytest

from shared import topk_codec as codec


def _rows(rng, num_rows: int, top_k: int, vocab_size: int, zipf: float = 1.1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted top-K rows of random softmax distributions over a Zipf-skewed vocabulary (ids distinct per row)."""
    weights = 1.0 / np.arange(1, vocab_size + 1) ** zipf
    ids = np.stack([rng.choice(vocab_size, top_k, replace=False, p=weights / weights.sum()) for _ in range(num_rows)])
    logits = rng.normal(0, 3, (num_rows, vocab_size))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.sort(logp, axis=1)[:, ::-1][:, :top_k]  # (T, K) most likely first
    return ids, top


# ---------------------------------------------------------------------------------------------
# ids


@pytest.mark.parametrize(("vocab_size", "table_size", "chunk_rows"), [(300, 64, 7), (300, 300, 10), (5, 2, 3),
                                                                      (70000, 512, 16)])
def test_ids_come_back_exactly_whatever_the_row_range(vocab_size, table_size, chunk_rows):
    rng = np.random.default_rng(0)
    k = min(4, vocab_size)
    ids, _ = _rows(rng, 37, k, vocab_size)
    ids = ids.astype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    codes, tables = codec.encode_id_rows(ids, chunk_rows, vocab_size, table_size)
    assert codes.dtype == ids.dtype and tables.dtype == ids.dtype
    assert tables.shape == (math.ceil(37 / chunk_rows), table_size)
    assert codes.max() < vocab_size
    np.testing.assert_array_equal(codec.decode_id_rows(codes, tables, 0, chunk_rows, vocab_size), ids)
    for start, stop in [(0, 1), (chunk_rows - 1, chunk_rows + 1), (5, 37), (36, 37), (3, 3)]:
        first, last = start // chunk_rows, max(start, stop - 1) // chunk_rows
        got = codec.decode_id_rows(codes[start:stop], tables[first:last + 1], start, chunk_rows, vocab_size)
        np.testing.assert_array_equal(got, ids[start:stop])


def test_the_most_frequent_ids_get_the_smallest_codes():
    ids = np.array([[9, 7, 3], [9, 7, 1], [9, 2, 4], [9, 7, 5]], dtype=np.uint16)  # 9 x4, 7 x3, then one each
    codes, tables = codec.encode_id_rows(ids, 4, 10, 4)
    # most frequent first; ties broken by the smaller id (1, 2 among the ids seen once)
    np.testing.assert_array_equal(tables[0], [9, 7, 1, 2])
    assert codes[0, 0] == 0 and codes[0, 1] == 1 and codes[1, 2] == 2 and codes[2, 1] == 3


def test_a_chunk_with_fewer_distinct_ids_than_the_table_fills_it_with_unused_ids():
    ids = np.array([[5, 6], [6, 5]], dtype=np.uint16)
    codes, tables = codec.encode_id_rows(ids, 2, 8, 4)
    np.testing.assert_array_equal(tables[0], [5, 6, 0, 1])  # the ids never seen, smallest first
    np.testing.assert_array_equal(codec.decode_id_rows(codes, tables, 0, 2, 8), ids)


@pytest.mark.parametrize("table", [[3, 9, 0, 7], [0, 1, 2, 3], [9, 8, 7, 6], [2]])
def test_id_permutation_is_a_permutation_that_puts_the_table_first(table):
    perm = codec.id_permutation(np.array(table), 10)
    np.testing.assert_array_equal(np.sort(perm), np.arange(10))
    np.testing.assert_array_equal(perm[: len(table)], table)
    # every id outside the table and at least N keeps its own code
    n = len(table)
    for i in range(n, 10):
        if i not in table:
            assert perm[i] == i


@pytest.mark.parametrize(("table", "message"), [([1, 1, 2], "repeats"), ([1, 10], "outside"), ([-1, 2], "outside"),
                                                ([], "1 to 10")])
def test_id_permutation_refuses_a_table_that_is_not_distinct_ids_below_v(table, message):
    with pytest.raises(ValueError, match=message):
        codec.id_permutation(np.array(table, dtype=np.int64), 10)


def test_decoding_refuses_codes_outside_the_vocabulary_and_rows_without_their_table():
    codes, tables = codec.encode_id_rows(np.array([[1, 2], [3, 4], [5, 6]], np.uint16), 2, 8, 2)
    with pytest.raises(ValueError, match="outside"):
        codec.decode_id_rows(np.array([[8, 0]], np.uint16), tables, 0, 2, 8)
    with pytest.raises(ValueError, match="chunk 1"):
        codec.decode_id_rows(codes, tables[:1], 0, 2, 8)


def test_encoding_refuses_ids_outside_the_vocabulary_and_a_table_larger_than_v():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codec.encode_id_chunk(np.array([[8]]), 8, 2)
    with pytest.raises(ValueError, match="table_size"):
        codec.encode_id_chunk(np.array([[1]]), 8, 9)


def test_id_table_size_is_one_per_64_entries_within_1_and_v():
    assert codec.id_table_size(8192, 64, 49152) == 8192
    assert codec.id_table_size(8192, 64, 1000) == 1000
    assert codec.id_table_size(3, 1, 1000) == 1


# ---------------------------------------------------------------------------------------------
# log-probs


def _tail(lp: np.ndarray) -> np.ndarray:
    """log(1 - sum_k p_k) of each row, in float64 (as the engines compute it)."""
    return np.log1p(-np.exp(lp).sum(1))


def _kl_renormalized(lp: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(true top-K || stored top-K) of each row, each renormalized over its K entries, in float64."""
    p = np.exp(lp) / np.exp(lp).sum(1, keepdims=True)
    qn = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    return np.sum(p * np.log(p / qn), axis=1)


@pytest.mark.parametrize("levels", [2, 255, 1633, codec.MAX_LEVELS])
def test_decoded_sqrt_of_the_renormalized_p_is_within_half_a_step_of_the_truth(levels):
    rng = np.random.default_rng(1)
    _, lp = _rows(rng, 200, 32, 2000)
    tail = _tail(lp)
    steps = codec.encode_prob_steps(lp, tail, levels)
    assert steps.dtype == np.uint16 and steps.shape == lp.shape
    decoded = codec.decode_prob_steps(steps, tail, levels, dtype=np.float64)
    mass = np.exp(lp).sum(1, keepdims=True)  # s, the top-K mass the tail gives
    root_true = np.sqrt(np.exp(lp) / mass)  # float64 reference
    root_stored = np.sqrt(np.exp(decoded) / mass)
    floored = root_true * levels < 0.5  # rounds to 0, stored as 1/L so that p > 0 stays > 0
    np.testing.assert_allclose(root_stored[floored], 1.0 / levels, rtol=1e-6)
    assert np.all(np.abs(root_stored - root_true)[~floored] <= 0.5 / levels + 1e-6)
    assert np.all(np.isfinite(decoded))
    assert np.all(np.diff(decoded, axis=1) <= 0)  # still most likely first


def test_zero_probability_stays_zero_and_only_it():
    lp = np.array([[-0.1, -30.0, -np.inf, -np.inf]])
    decoded = codec.decode_prob_steps(codec.encode_prob_steps(lp, _tail(lp), 100), _tail(lp), 100, dtype=np.float64)
    assert np.isfinite(decoded[0, :2]).all() and np.isneginf(decoded[0, 2:]).all()
    # p = e^-30 is stored as the smallest level of the renormalized row
    assert decoded[0, 1] == pytest.approx(2 * np.log(1 / 100) + np.log(np.exp(-0.1) + np.exp(-30.0)))


def test_a_row_whose_tail_leaves_less_than_its_top_entry_is_clamped_not_refused():
    """A caller's tail may be off by rounding (storage_layout.md 3): sqrt(p / s) > 1 is stored as L."""
    lp = np.array([[-0.1, -3.0]])
    tail = np.array([np.log(1 - 0.8)])  # says the top K hold 0.8, but p_1 alone is 0.905
    steps = codec.encode_prob_steps(lp, tail, 100)
    assert steps[0, 0] == 0  # c_1 = L
    assert codec.decode_prob_steps(steps, tail, 100)[0, 0] == pytest.approx(np.log(0.8), abs=1e-6)


@pytest.mark.parametrize("bad", [[[-1.0, -0.5]], [[0.2, -1.0]], [[np.nan, -1.0]]])
def test_encoding_refuses_unsorted_positive_or_nan_rows(bad):
    with pytest.raises(ValueError, match="sorted|<= 0"):
        codec.encode_prob_steps(np.array(bad), np.array([-1.0]), 100)


@pytest.mark.parametrize("tail", [0.0, np.nan, 0.5])
def test_a_tail_that_leaves_the_top_k_no_mass_is_refused(tail):
    with pytest.raises(ValueError, match="mass"):
        codec.encode_prob_steps(np.array([[-1.0, -2.0]]), np.array([tail]), 100)
    with pytest.raises(ValueError, match="mass"):
        codec.decode_prob_steps(np.array([[1, 2]], np.uint16), np.array([tail]), 100)


def test_decoding_refuses_steps_that_sum_past_the_levels():
    steps = np.array([[3, 0], [60, 41]], dtype=np.uint16)
    with pytest.raises(ValueError, match="row 1"):
        codec.decode_prob_steps(steps, np.array([-1.0, -1.0]), 100)


@pytest.mark.parametrize("top_k", [16, 64, 128])
@pytest.mark.parametrize("spread", [3.0, 0.3])  # peaked rows, and flat ones whose top K hold little mass
def test_the_mean_kl_of_the_rule_is_near_its_design_whatever_the_top_k_mass(top_k, spread):
    """KL(true top-K || decoded top-K), each renormalized, in float64: about K / (6 L^2) = the design."""
    rng = np.random.default_rng(top_k)
    logits = rng.normal(0, spread, (400, 4000))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    lp = np.sort(logp, axis=1)[:, ::-1][:, :top_k]
    levels = codec.prob_levels(top_k)
    tail = _tail(lp).astype(np.float16)  # as stored
    q = codec.decode_prob_steps(codec.encode_prob_steps(lp, tail, levels), tail, levels, dtype=np.float64)
    mean_kl = float(_kl_renormalized(lp, q).mean())
    assert 0.3 * codec.DESIGN_MEAN_KL < mean_kl < 2 * codec.DESIGN_MEAN_KL, (np.exp(lp).sum(1).mean(), mean_kl)


def test_rounding_adds_at_most_sqrt_k_over_l_of_the_top_k_mass():
    """sum q - sum p <= s sum (2 e sqrt(p/s) + e^2) <= s (sqrt(K)/L + K/(4 L^2)): 0.005 s at the design,
    far below MAX_TOPK_MASS - 1."""
    rng = np.random.default_rng(2)
    _, lp = _rows(rng, 300, 64, 500, zipf=0.0)
    levels = codec.prob_levels(64)
    tail = _tail(lp)
    q = codec.decode_prob_steps(codec.encode_prob_steps(lp, tail, levels), tail, levels, dtype=np.float64)
    mass = np.exp(lp).sum(1)
    extra = np.exp(q).sum(1) - mass
    assert np.all(extra <= mass * (math.sqrt(64) / levels + 64 / (4 * levels**2)) + 1e-12)
    assert math.sqrt(64) / levels < 0.006


def test_float16_output_is_the_float32_output_rounded():
    rng = np.random.default_rng(3)
    _, lp = _rows(rng, 20, 16, 100)
    tail = _tail(lp).astype(np.float16)
    steps = codec.encode_prob_steps(lp, tail, 817)
    np.testing.assert_array_equal(codec.decode_prob_steps(steps, tail, 817, dtype=np.float16),
                                  codec.decode_prob_steps(steps, tail, 817, dtype=np.float32).astype(np.float16))


def test_prob_levels_follow_k_over_6_kl():
    assert codec.prob_levels(64) == math.ceil(math.sqrt(64 / (6 * codec.DESIGN_MEAN_KL)))
    assert codec.prob_levels(128, 1e-5) == math.ceil(math.sqrt(128 / 6e-5))
    assert codec.prob_levels(1) >= 2
    assert codec.prob_levels(10**9) == codec.MAX_LEVELS
    with pytest.raises(ValueError):
        codec.prob_levels(0)


def test_prob_codes_are_what_the_steps_decode_to():
    """A writer compares a target's log-prob with its stored entry by code: the entry's code is prob_codes'."""
    rng = np.random.default_rng(4)
    _, lp = _rows(rng, 30, 8, 300)
    tail = _tail(lp)
    steps = codec.encode_prob_steps(lp, tail, 500)
    log_mass = codec.log_topk_mass(tail)
    np.testing.assert_array_equal(500 - np.cumsum(steps.astype(np.int64), axis=1), codec.prob_codes(lp, log_mass[:, None], 500))
    assert codec.prob_codes(np.float32(-np.inf), 0.0, 500) == 0 and codec.prob_codes(np.float32(-80.0), 0.0, 500) == 1
    assert codec.prob_codes(np.float32(np.log(0.25)), np.log(0.25), 500) == 500


def test_every_true_logprob_lies_within_the_bounds_of_its_stored_code():
    """code_bounds, the interval a code stands for, contains the float64 truth of every entry (and no wider
    than a code: the bounds of neighbouring codes meet)."""
    rng = np.random.default_rng(5)
    _, lp = _rows(rng, 100, 64, 3000)
    lp[:3, -5:] = -np.inf  # zero-probability entries
    tail = _tail(lp).astype(np.float16)
    levels = codec.prob_levels(64)
    codes = codec.decode_prob_codes(codec.encode_prob_steps(lp, tail, levels), levels)
    log_mass = codec.log_topk_mass(tail)[:, None]
    low, high = codec.code_bounds(codes, log_mass, levels)
    assert np.all((low <= lp) & (lp <= high))
    assert np.all(np.isneginf(high[:3, -5:]))
    inner_low, _ = codec.code_bounds(codes + 1, log_mass, levels)
    _, inner_high = codec.code_bounds(codes, log_mass, levels)
    meet = (codes >= 1) & (codes < levels - 1)
    np.testing.assert_allclose(inner_low[meet], inner_high[meet])


def test_a_readers_row_range_decodes_to_what_the_writer_encoded_for_those_rows():
    """decode_topk_rows over any row range equals the whole-shard decode's rows, and both equal the input
    (ids exactly, log-probs within half a step of sqrt(p / s))."""
    rng = np.random.default_rng(6)
    ids, lp = _rows(rng, 45, 16, 700)
    ids = ids.astype(np.uint16)
    tail = _tail(lp).astype(np.float16)
    levels = codec.prob_levels(16)
    codes, tables, steps = codec.encode_topk_rows(ids, lp, tail, chunk_rows=10, vocab_size=700, levels=levels)
    assert tables.shape == (5, codec.id_table_size(10, 16, 700))
    whole_ids, whole_lp, whole_codes = codec.decode_topk_rows(codes, tables, steps, tail, first_row=0, chunk_rows=10,
                                                              vocab_size=700, levels=levels)
    np.testing.assert_array_equal(whole_ids, ids)
    assert whole_lp.dtype == np.float16
    np.testing.assert_array_equal(whole_codes, codec.prob_codes(lp, codec.log_topk_mass(tail)[:, None], levels))
    for start, stop in [(0, 45), (7, 23), (10, 20), (44, 45)]:
        c0, c1 = start // 10, (stop - 1) // 10 + 1
        got = codec.decode_topk_rows(codes[start:stop], tables[c0:c1], steps[start:stop], tail[start:stop],
                                     first_row=start, chunk_rows=10, vocab_size=700, levels=levels)
        np.testing.assert_array_equal(got[0], ids[start:stop])
        np.testing.assert_array_equal(got[1], whole_lp[start:stop])
