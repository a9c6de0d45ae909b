"""kdcache build --tail-samples: the draws follow the teacher's tail, are seeded per sequence, and validate."""

import numpy as np
import pytest
import torch

from cacher import engine_hf
from cacher import rows as engine_rows
from cacher.build import BuildConfig, BuildError, build
from shared.format import row_arrays
from shared.reader import CacheReader
from tests.conftest import SHAKESPEARE

QUIET = {"log": lambda m: None}


def test_distinct_counts_orders_by_count_then_id():
    draws = np.array([[5, 3, 5, 9, 3, 5], [7, 7, 7, 7, 7, 7], [4, 2, 8, 6, 0, 1]])
    ids, counts = engine_rows.distinct_counts(draws, vocab_size=10)
    np.testing.assert_array_equal(ids, [[5, 3, 9, 0, 0, 0], [7, 0, 0, 0, 0, 0], [0, 1, 2, 4, 6, 8]])
    np.testing.assert_array_equal(counts, [[3, 2, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_fill_unused_gives_smallest_free_ids():
    ids = np.array([[5, 3, 9, 0], [7, 0, 0, 0]])
    counts = np.array([[3, 2, 1, 0], [6, 0, 0, 0]])
    topk = np.array([[0, 1], [2, 0]])
    out = engine_rows.fill_unused(ids, counts, topk)
    np.testing.assert_array_equal(out, [[5, 3, 9, 2], [7, 1, 3, 4]])
    for row, k in zip(out, topk):
        assert len(set(row) | set(k)) == len(row) + len(k)


def test_draws_follow_the_tail_distribution():
    """20,000 rows of one distribution x 4 draws: the frequencies match p_j / tail mass; no top-K id is drawn."""
    torch.manual_seed(0)
    vocab, top_k, m, rows = 40, 5, 4, 20_000
    logits = (torch.randn(vocab) * 2).repeat(rows, 1)  # (R, V)
    uniforms = np.random.default_rng(0).random((rows, m))
    targets = torch.full((rows,), -1, dtype=torch.long)
    ids, lps, _, tail, tail_ids, tail_counts = engine_rows.topk_rows(logits, top_k, targets, 4096, uniforms=uniforms)
    p = torch.softmax(logits[0].double(), -1).numpy()
    top = set(ids[0].tolist())
    freq = np.zeros(vocab)
    np.add.at(freq, tail_ids.ravel(), tail_counts.ravel())
    assert freq.sum() == rows * m
    assert all(freq[j] == 0 for j in top)
    expected = p.copy()
    expected[list(top)] = 0
    expected /= expected.sum()
    assert np.abs(freq / freq.sum() - expected).max() < 0.01  # 80,000 draws: standard error < 0.002
    assert np.exp(tail[0]) == pytest.approx(1 - np.exp(lps[0].astype(np.float64)).sum(), abs=1e-6)


def test_draws_do_not_depend_on_batching(tiny_gpt2_dir):
    teacher = engine_hf.load_hf_teacher(str(tiny_gpt2_dir))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, teacher.vocab_size, int(n)) for n in rng.integers(5, 30, 7)]
    keys = [(10 + i, 0) for i in range(len(seqs))]
    a = engine_hf.score_hf(teacher, seqs, top_k=6, batch_tokens=4096, tail_samples=8, tail_seed=3, sample_keys=keys)
    b = engine_hf.score_hf(teacher, seqs, top_k=6, batch_tokens=40, tail_samples=8, tail_seed=3, sample_keys=keys)
    c = engine_hf.score_hf(teacher, seqs[3:], top_k=6, batch_tokens=64, tail_samples=8, tail_seed=3, sample_keys=keys[3:])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tail_ids"], y["tail_ids"])
        np.testing.assert_array_equal(x["tail_counts"], y["tail_counts"])
    for x, y in zip(a[3:], c):
        np.testing.assert_array_equal(x["tail_ids"], y["tail_ids"])
    d = engine_hf.score_hf(teacher, seqs, top_k=6, tail_samples=8, tail_seed=4, sample_keys=keys)
    assert any(not np.array_equal(x["tail_ids"], y["tail_ids"]) for x, y in zip(a, d))  # the seed matters


def test_build_with_tail_samples(tiny_gpt2_dir, tmp_path):
    common = {"model": str(tiny_gpt2_dir), "dataset": str(SHAKESPEARE), "max_length": 32, "limit": 10, "top_k": 6,
              "tail_samples": 10, "reuse": False}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    build(BuildConfig(out=one, shard_tokens=1 << 20, **common), **QUIET)
    build(BuildConfig(out=two, shard_tokens=60, batch_tokens=50, **common), **QUIET)
    r1, r2 = CacheReader(one), CacheReader(two)
    assert r1.manifest.tail_samples == 10 and r1.manifest.settings["tail_seed"] == 0
    assert r1.manifest.teacher["engine"] == "hf"
    assert r1.manifest.cache_key == r2.manifest.cache_key  # the shard plan is not part of the content
    s1 = [s for _, _, s in r1.iter_sequences(row_arrays(10))]
    s2 = [s for _, _, s in r2.iter_sequences(row_arrays(10))]
    assert len(s1) == len(s2) == 10
    for x, y in zip(s1, s2):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
        assert (x["tail_counts"].sum(1) == 10).all()
    assert r1.verify() == []


def test_tail_samples_refusals(tiny_gpt2_dir, tmp_path):
    with pytest.raises(BuildError, match="--tail-samples needs the hf engine"):
        BuildConfig(model="m", engine="vllm", tail_samples=4)
    with pytest.raises(BuildError, match=r"--tail-samples must be in \[0, 255\]"):
        BuildConfig(model="m", tail_samples=256)
    vocab = engine_hf.load_hf_teacher(str(tiny_gpt2_dir)).vocab_size
    with pytest.raises(BuildError, match="exceeds the teacher's vocabulary"):
        build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(SHAKESPEARE), limit=2, max_length=16,
                          top_k=vocab - 3, tail_samples=4, out=str(tmp_path / "x"), reuse=False), **QUIET)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_near_certain_rows_whose_stored_tail_is_empty_get_no_draws():
    """Regression (found by the demo on a peaked student): the float64 top-K mass can round to >= 1, so the
    stored tail is -inf, while the float32 sampler still sees a positive tail; such rows must get no draws."""
    vocab, top_k, m = 40, 5, 4
    logits = torch.zeros(3, vocab)
    logits[0, 7] = 30.0  # near-certain: the rest has mass ~4e-12
    logits[1] = torch.linspace(0, 3, vocab)  # an ordinary row
    logits[2, 3] = 30.0
    uniforms = np.random.default_rng(0).random((3, m))
    ids, _, _, tail, tail_ids, tail_counts = engine_rows.topk_rows(logits, top_k, torch.full((3,), -1), 4096,
                                                               uniforms=uniforms)
    assert np.isneginf(tail[0]) and np.isneginf(tail[2]) and np.isfinite(tail[1])
    assert tail_counts[0].sum() == 0 and tail_counts[2].sum() == 0 and tail_counts[1].sum() == m
    for r in range(3):  # unused slots are filled with ids not otherwise in the row
        assert len(set(ids[r]) | set(tail_ids[r])) == top_k + m
