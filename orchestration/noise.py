"""Which differences between two evaluated models are within the noise of the held-out set.

The rule (docs/evaluation.md, "Noise"): a paired bootstrap over held-out sequences. Two models of a plan
are scored on the same held-out sequences (the teacher cache's held-out rows; for GSM8K the same
questions), and `kdtrain eval` records each sequence's sums (sequence_nll, sequence_agreed, sequence_kl,
sequence_alpha, with sequence_tokens; example_correct per question). Draw the N sequences with
replacement RESAMPLES times (one fixed seed, so a report is reproducible), recompute both models' metric
on each draw as the metric is defined (token-weighted: sum of values / sum of tokens; perplexity is exp of
the mean NLL), and take the central CONFIDENCE interval of the difference. A difference is within noise
when that interval contains 0.

Sequences, not tokens, are resampled: tokens of one sequence are correlated, so a token bootstrap would
understate the noise. What this does not measure: the spread between training seeds (a plan trains each
student once) and the noise of sampled generation (ROUGE-L reports its own spread over sampling seeds).

Pure numpy functions of lists of numbers; knows nothing about models, files or plans.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


def ratio(values: np.ndarray, counts: np.ndarray, transform: str | None = None) -> np.ndarray:
    """The metric from per-sequence sums: sum(values) / sum(counts) along the last axis, exp'd for "exp"."""
    mean = values.sum(-1) / counts.sum(-1)
    return np.exp(mean) if transform == "exp" else mean


def _draws(num_items: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, num_items) how often each sequence is drawn in each bootstrap sample."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num_items, size=(resamples, num_items))
    return np.stack([np.bincount(row, minlength=num_items) for row in picks])


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _arrays(values, counts) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    c = np.ones_like(v) if counts is None else np.asarray(counts, dtype=np.float64)
    if v.ndim != 1 or v.shape != c.shape:
        raise ValueError(f"per-sequence values ({v.shape}) and counts ({c.shape}) must be two lists of one length")
    return v, c


def interval(values, counts=None, transform: str | None = None, *, resamples: int = RESAMPLES,
             confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float] | None:
    """The bootstrap interval of one model's metric from its per-sequence sums (counts None: one per item).

    None when there are no items. Draws whose sequences hold no tokens are left out.
    """
    v, c = _arrays(values, counts)
    if v.size == 0:
        return None
    weights = _draws(v.size, resamples, seed)  # (R, N)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        samples = ratio(weights * v, weights * c, transform)
    return _interval(samples, confidence)


def paired_difference(a_values, a_counts, b_values, b_counts, transform: str | None = None, *,
                      same_counts: bool = True, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = SEED) -> dict | None:
    """Model a's metric minus model b's on the same items, with its paired bootstrap interval.

    a_*, b_*: per-sequence sums of the two models, in the same sequence order (counts None: one per item).
    Returns {"difference", "interval": [low, high], "within_noise", "num_items", "num_tokens"} (num_tokens: a's),
    or None when the two were not scored on the same items (other lengths, or, with same_counts, other token counts
    per sequence: another held-out set), so they cannot be paired. same_counts=False pairs items whose token counts
    differ by nature: each model's own samples of the same prompts.
    """
    av, ac = _arrays(a_values, a_counts)
    bv, bc = _arrays(b_values, b_counts)
    if av.size == 0 or av.shape != bv.shape or (same_counts and not np.array_equal(ac, bc)):
        return None
    difference = float(ratio(av, ac, transform) - ratio(bv, bc, transform))
    weights = _draws(av.size, resamples, seed)  # (R, N): both models see the same draws
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        samples = ratio(weights * av, weights * ac, transform) - ratio(weights * bv, weights * bc, transform)
    found = _interval(samples, confidence)
    if found is None or not math.isfinite(difference):
        return None
    low, high = found
    return {"difference": difference, "interval": [low, high], "within_noise": bool(low <= 0 <= high),
            "num_items": int(av.size), "num_tokens": int(ac.sum())}
