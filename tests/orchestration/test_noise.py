"""The noise rule: a paired bootstrap over held-out sequences, checked against what it must give by construction
and against the normal approximation it converges to."""

import math

import numpy as np
import pytest

from orchestration.noise import interval, paired_difference, ratio


def test_ratio_is_the_token_weighted_metric():
    nll, tokens = np.array([20.0, 3.0]), np.array([10.0, 1.0])
    assert ratio(nll, tokens) == pytest.approx(23 / 11)
    assert ratio(nll, tokens, "exp") == pytest.approx(math.exp(23 / 11))


def test_a_constant_gap_on_every_sequence_is_outside_noise():
    tokens = [50, 70, 30, 90]
    base = [0.5 * n for n in tokens]
    out = paired_difference([0.6 * n for n in tokens], tokens, base, tokens)
    assert out["difference"] == pytest.approx(0.1) and out["interval"] == pytest.approx([0.1, 0.1])
    assert out["within_noise"] is False and out["num_items"] == 4 and out["num_tokens"] == 240


def test_a_model_against_itself_is_within_noise():
    values, tokens = [3.0, 7.5, 1.25], [10, 20, 5]
    out = paired_difference(values, tokens, values, tokens, "exp")
    assert out["difference"] == 0 and out["interval"] == [0.0, 0.0] and out["within_noise"] is True


def test_other_held_out_sets_are_not_paired():
    assert paired_difference([1.0, 2.0], [4, 4], [1.0, 2.0], [4, 5]) is None  # other token counts
    assert paired_difference([1.0, 2.0], [4, 4], [1.0], [4]) is None
    assert paired_difference([], [], [], []) is None
    with pytest.raises(ValueError, match="one length"):
        interval([1.0, 2.0], [3])


def test_each_models_own_samples_pair_by_prompt_when_counts_may_differ():
    """Exposure: each model samples the same prompts at its own lengths; same_counts=False pairs them by prompt.
    Per token, b is a's rate + 0.1 on every prompt, so every draw's difference is exactly -0.1."""
    a_tokens, b_tokens = np.array([4.0, 9.0, 5.0, 12.0]), np.array([6.0, 3.0, 8.0, 10.0])
    a = [0.5 * n for n in a_tokens]
    b = [0.6 * n for n in b_tokens]
    assert paired_difference(a, a_tokens, b, b_tokens) is None  # as held-out sets, other counts do not pair
    out = paired_difference(a, a_tokens, b, b_tokens, same_counts=False)
    assert out["difference"] == pytest.approx(-0.1) and out["interval"] == pytest.approx([-0.1, -0.1])
    assert out["within_noise"] is False and out["num_items"] == 4 and out["num_tokens"] == 30


def test_paired_interval_matches_the_normal_approximation():
    """400 items with one count each: the bootstrap's 95% interval of a mean difference is mean +- 1.96 sd/sqrt(n)
    to within a few percent (the central limit theorem; computed here without the bootstrap)."""
    rng = np.random.default_rng(7)
    a = rng.normal(0.55, 0.2, 400)
    b = a - rng.normal(0.02, 0.05, 400)  # paired: b tracks a
    out = paired_difference(a.tolist(), None, b.tolist(), None)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    low, high = out["interval"]
    assert out["difference"] == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.1 * half) and high == pytest.approx(d.mean() + half, abs=0.1 * half)
    # unpaired, the same two models look much noisier: pairing removes what both share
    width_a = np.subtract(*interval(a.tolist())[::-1])
    assert high - low < width_a / 2


def test_within_noise_about_95_percent_of_the_time_when_there_is_no_difference():
    """Two equally good models (same distribution per sequence): the rule calls their difference within noise in about
    95% of held-out samples (a binomial 95% band for 200 trials is about 0.92-0.98)."""
    rng = np.random.default_rng(11)
    calls = []
    for trial in range(200):
        tokens = rng.integers(50, 150, 30)
        a, b = rng.binomial(tokens, 0.6), rng.binomial(tokens, 0.6)
        calls.append(paired_difference(a.tolist(), tokens.tolist(), b.tolist(), tokens.tolist(), resamples=500,
                                       seed=trial)["within_noise"])
    assert 0.9 <= np.mean(calls) <= 0.99


def test_the_rule_is_reproducible():
    values, tokens = [1.0, 2.0, 4.0, 3.0], [2, 3, 4, 3]
    assert interval(values, tokens) == interval(values, tokens)
    assert interval([], []) is None
