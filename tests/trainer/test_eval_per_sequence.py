"""Per-sequence sums of the cache metrics (what a report bootstraps over): each sequence's value equals the metric
computed on that sequence alone, and they add up to the reported totals."""

import numpy as np
import pytest
import torch

from common.sequences import Sequence
from trainer.acceptance import acceptance_metric
from trainer.evaluate import agreement, cache_sequences, load_model, perplexity


def test_perplexity_per_sequence_is_each_sequence_alone(tiny_gpt2_dir):
    model, _ = load_model(str(tiny_gpt2_dir))
    rng = np.random.default_rng(0)
    sequences = []
    for length in (9, 14, 5, 12):  # padded together in one batch of 3, then one of 1
        mask = rng.random(length) < 0.7
        mask[-1] = False
        sequences.append(Sequence(rng.integers(3, 200, length), mask, 0))
    got = perplexity(model, sequences, batch_size=3)
    for s, nll, tokens in zip(sequences, got["sequence_nll"], got["sequence_tokens"], strict=True):
        alone = perplexity(model, [s])
        assert tokens == alone["num_tokens"] == int(s.loss_mask[:-1].sum())
        assert nll == pytest.approx(alone["nll"] * tokens, rel=1e-5)
    assert sum(got["sequence_nll"]) / sum(got["sequence_tokens"]) == pytest.approx(got["nll"], rel=1e-9)


def test_agreement_per_sequence_adds_up(tiny_cache, tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir))
    got = agreement(model, tiny_cache, heldout_only=False, batch_size=3)
    assert sum(got["sequence_tokens"]) == got["num_tokens"]
    assert sum(got["sequence_agreed"]) / got["num_tokens"] == pytest.approx(got["top1_agreement"])
    assert sum(got["sequence_kl"]) / got["num_tokens"] == pytest.approx(got["kl"], rel=1e-6)
    # the first sequence alone, by hand: its rows' argmax against the teacher's top-1
    from shared.reader import CacheReader

    first = cache_sequences(CacheReader(tiny_cache), heldout_only=False, limit=1)[0]
    mask = torch.as_tensor(first["loss_mask"].astype(bool))
    with torch.no_grad():
        logits = model(torch.as_tensor(first["input_ids"].astype(np.int64))[None]).logits[0]
    agreed = int((logits[mask].argmax(-1) == torch.as_tensor(first["topk_ids"][mask.numpy(), 0].astype(np.int64))).sum())
    assert (got["sequence_agreed"][0], got["sequence_tokens"][0]) == (agreed, int(mask.sum()))


def test_acceptance_per_sequence_adds_up(trained_cache, trained_teacher_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from shared.reader import CacheReader

    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    sequences = cache_sequences(CacheReader(trained_cache), heldout_only=False, limit=4)
    got = acceptance_metric(student, sequences, teacher.config.vocab_size, teacher=teacher, batch_size=3)
    assert len(got["sequence_alpha"]) == 4 and sum(got["sequence_tokens"]) == got["num_tokens"]
    assert sum(got["sequence_alpha"]) / got["num_tokens"] == pytest.approx(got["alpha"], rel=1e-9)
    alone = acceptance_metric(student, sequences[1:2], teacher.config.vocab_size, teacher=teacher)
    assert got["sequence_alpha"][1] == pytest.approx(alone["alpha"] * alone["num_tokens"], rel=1e-5)
    continued = got["teacher_continuations"]
    assert sum(continued["sequence_alpha"]) / sum(continued["sequence_tokens"]) == pytest.approx(continued["alpha"])
    without = acceptance_metric(student, sequences, teacher.config.vocab_size, batch_size=3)
    assert sum(without["sequence_alpha"]) / without["num_tokens"] == pytest.approx(without["alpha_cache_lower"])
