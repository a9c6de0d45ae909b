"""Tests for trainer.losses.linear_kd_loss: the loss from hidden states and the head weight, logits chunk by chunk.

Its independent reference is sparse_kd_loss (itself tested against dense and unfused references) on the
logits hidden @ weight.T materialized by plain autograd: value and both gradients must agree in float64,
for every loss, with the target bucket, with tail samples, over chunk boundaries and with a padded head.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.divergences import EmptyTeacherRowError
from trainer.losses import (
    LOSSES,
    LossOptions,
    dense_kd_loss,
    linear_kd_loss,
    sparse_kd_loss,
    tail_sample_targets,
)

DIVERGENCES = [name for name in LOSSES if name != "ce"]


def make_rows(num_tokens=23, hidden_size=6, vocab=19, padded=0, num_topk=5, dtype=torch.float64, seed=0,
              mask_prob=0.7):
    """Hidden states, a (V + padded, H) head, a teacher's top-K rows from its own logits, targets, a mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, dtype=dtype)
    weight = torch.randn(vocab + padded, hidden_size, generator=gen, dtype=dtype)
    teacher_logits = 2.0 * torch.randn(num_tokens, vocab, generator=gen, dtype=dtype)
    teacher_logp = teacher_logits.log_softmax(-1)
    topk_logprobs, topk_ids = teacher_logp.topk(num_topk, dim=-1)
    rest = teacher_logp.scatter(1, topk_ids, -math.inf).logsumexp(-1)
    tail = rest if num_topk < vocab else torch.full_like(rest, -math.inf)
    target_ids = torch.randint(0, vocab, (num_tokens,), generator=gen)
    loss_mask = torch.rand(num_tokens, generator=gen) < mask_prob
    loss_mask[0] = True
    target_ids[~loss_mask] = -100
    target_logprob = teacher_logp.gather(1, target_ids.clamp(min=0)[:, None])[:, 0]
    target_logprob[~loss_mask] = 1.0  # the cache's "unknown" sentinel
    return {"hidden": hidden, "weight": weight, "vocab": vocab, "teacher_logits": teacher_logits,
            "teacher": (topk_ids, topk_logprobs, tail), "target_ids": target_ids, "loss_mask": loss_mask,
            "target_logprob": target_logprob}


def both_losses(rows, options, *, chunk_tokens=4, teacher=None, target_logprob=None, matmul_dtype=None):
    """(linear loss, its grads), (sparse loss on materialized logits, its grads); grads = (d hidden, d weight)."""
    teacher = rows["teacher"] if teacher is None else teacher
    h1, w1 = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    linear, linear_stats = linear_kd_loss(h1, w1, *teacher, rows["target_ids"], rows["loss_mask"], options,
                                          num_ids=rows["vocab"], chunk_tokens=chunk_tokens,
                                          target_logprob=target_logprob, matmul_dtype=matmul_dtype)
    linear_grads = torch.autograd.grad(linear, (h1, w1))
    h2, w2 = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    md = matmul_dtype or h2.dtype
    logits = (h2.to(md) @ w2.to(md).T)[:, : rows["vocab"]]  # (N, V) materialized
    sparse, sparse_stats = sparse_kd_loss(logits, *teacher, rows["target_ids"], rows["loss_mask"], options,
                                          chunk_tokens=chunk_tokens, target_logprob=target_logprob)
    sparse_grads = torch.autograd.grad(sparse, (h2, w2))
    return (linear, linear_stats, linear_grads), (sparse, sparse_stats, sparse_grads)


def assert_same(got, want, rtol=1e-9, atol=1e-12):
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = got, want
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for key in ("ce", "kd"):
        torch.testing.assert_close(stats_a[key], stats_b[key], rtol=rtol, atol=atol)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_linear_equals_sparse_on_materialized_logits(loss, alpha, temperature, chunk_tokens):
    rows = make_rows(padded=3)  # a padded head: 3 rows beyond the token ids, never in a softmax
    options = LossOptions(loss=loss, alpha=alpha, temperature=temperature, beta=0.3, skew=0.2)
    got, want = both_losses(rows, options, chunk_tokens=chunk_tokens)
    assert_same(got, want)
    assert torch.count_nonzero(got[2][1][rows["vocab"]:]) == 0  # the padded rows get no gradient


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_linear_with_the_target_bucket_equals_sparse(loss):
    rows = make_rows(seed=1)
    options = LossOptions(loss=loss, alpha=0.2, temperature=1.5, beta=0.3, skew=0.2)
    got, want = both_losses(rows, options, target_logprob=rows["target_logprob"])
    assert_same(got, want)
    plain, _ = both_losses(rows, options)
    assert not torch.allclose(got[0], plain[0])  # the target bucket changes the loss: the check can fail


def test_linear_with_tail_samples_equals_sparse():
    rows = make_rows(seed=2, vocab=23, num_topk=4)
    gen = torch.Generator().manual_seed(5)
    topk_ids = rows["teacher"][0]
    outside = torch.stack([(~torch.isin(torch.arange(23), ids)).nonzero().squeeze(1) for ids in topk_ids])  # (N, 19)
    tail_ids = outside[:, torch.randperm(19, generator=gen)[:3]]  # (N, 3) distinct, outside the top K
    tail_counts = torch.randint(0, 3, tail_ids.shape, generator=gen)
    teacher = tail_sample_targets(*rows["teacher"], tail_ids, tail_counts)
    got, want = both_losses(rows, LossOptions(loss="fkl", alpha=0.1), teacher=teacher)
    assert_same(got, want)


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_linear_with_full_vocab_equals_dense(loss):
    """K = V: the sparse buckets are the whole distribution, so the linear loss is dense KD (float64)."""
    rows = make_rows(vocab=11, num_topk=11, seed=3)
    options = LossOptions(loss=loss, alpha=0.25, temperature=2.0, beta=0.3, skew=0.2)
    h, w = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    value, _ = linear_kd_loss(h, w, *rows["teacher"], rows["target_ids"], rows["loss_mask"], options, chunk_tokens=5)
    grads = torch.autograd.grad(value, (h, w))
    h2, w2 = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    reference, _ = dense_kd_loss(h2 @ w2.T, rows["teacher_logits"], rows["target_ids"], rows["loss_mask"], options)
    reference_grads = torch.autograd.grad(reference, (h2, w2))
    torch.testing.assert_close(value, reference, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_linear_all_masked_out_is_zero_with_zero_gradients(loss):
    rows = make_rows()
    rows["loss_mask"][:] = False
    h, w = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    value, stats = linear_kd_loss(h, w, *rows["teacher"], rows["target_ids"], rows["loss_mask"], LossOptions(loss=loss))
    value.backward()
    assert value.item() == 0.0 and stats["ce"].item() == 0.0 and stats["kd"].item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_linear_certain_student_takes_the_exact_rest_in_float32(loss):
    """Logits far above the rest on the teacher's top id: the rest mass underflows float32's softmax sum, so
    the exact logsumexp path runs (it recomputes those rows' logits from the hidden states); the result equals
    the logits-input loss, whose exact path is checked against float64 in test_losses.py."""
    rows = make_rows(seed=4, hidden_size=8, num_topk=8, dtype=torch.float32)
    ids = rows["teacher"][0]
    certain = ids[0, 0]  # one id far above every other logit; the rows that have it among their ids count
    rows["loss_mask"] &= (ids == certain).any(-1)
    rows["weight"][:, 0] = -100.0
    rows["weight"][certain, 0] = 100.0
    rows["hidden"][:, 0] = 1.0
    logits = rows["hidden"] @ rows["weight"].T  # (N, V)
    rest = logits.softmax(-1).scatter(1, ids, 0.0).sum(-1)
    assert rows["loss_mask"].sum() >= 3 and (rest[rows["loss_mask"]] < 1e-30).all()  # the exact path's case
    got, want = both_losses(rows, LossOptions(loss=loss, alpha=0.2))
    assert_same(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])


@pytest.mark.parametrize("loss", ["fkl", "ce"])
def test_linear_bf16_matmul_equals_sparse_on_bf16_logits(loss):
    """--bf16: the head's matmul in bfloat16 as autocast runs nn.Linear, the loss in float32; equal to the fused
    loss on the same bfloat16 logits up to the rounding of the per-chunk weight gradient."""
    rows = make_rows(num_tokens=40, hidden_size=16, vocab=64, num_topk=8, dtype=torch.float32, seed=6)
    got, want = both_losses(rows, LossOptions(loss=loss), chunk_tokens=16, matmul_dtype=torch.bfloat16)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_linear_keeps_no_logits_sized_tensor_for_backward():
    rows = make_rows(num_tokens=64, hidden_size=4, vocab=50, num_topk=8, dtype=torch.float32, mask_prob=1.0)
    h, w = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
    seen = []

    def pack(x):
        if x.numel() >= 16 * 50:  # a chunk's logits or more
            seen.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        value, _ = linear_kd_loss(h, w, *rows["teacher"], rows["target_ids"], rows["loss_mask"], LossOptions(loss="jsd"),
                                  chunk_tokens=16)
    assert seen == []  # nothing logits-sized is saved, not even one chunk's
    assert [tuple(t.shape) for t in value.grad_fn.saved_tensors] == [(64, 4), (50, 4)]  # the two gradients
    value.backward()
    assert h.grad.shape == (64, 4) and w.grad.shape == (50, 4)


def test_linear_row_without_teacher_mass_is_refused_naming_it():
    rows = make_rows(vocab=29, num_topk=6, dtype=torch.float32)
    _, lps, tail = rows["teacher"]
    lps[5], tail[5] = -math.inf, -math.inf
    rows["loss_mask"][5], rows["target_ids"][5] = True, 3
    with pytest.raises(EmptyTeacherRowError, match="row 5 of 23") as info:
        both_losses(rows, LossOptions(loss="fkl"))
    assert info.value.row == 5


@pytest.mark.parametrize("change,message", [
    ({"head_weight": torch.zeros(19, 5)}, r"head_weight \(19, 5\) must be \(V, H\) with H = 6"),
    ({"hidden": torch.zeros(23, 2, 6)}, r"hidden must be a float tensor of shape \(N, H\)"),
    ({"num_ids": 20}, r"num_ids=20 must be in \[1, 19\]"),
    ({"topk_ids": None}, "topk_ids None must be an integer"),
    ({"target_ids": torch.full((23,), -100)}, r"target_ids under loss_mask must be in \[0, 19\)"),
], ids=["head-width", "hidden-shape", "num-ids", "no-teacher", "ignored-target"])
def test_linear_bad_arguments_raise_helpful_errors(change, message):
    rows = make_rows()
    ids, lps, tail = rows["teacher"]
    args = {"hidden": rows["hidden"], "head_weight": rows["weight"], "topk_ids": ids, "topk_logprobs": lps,
            "tail_logprob": tail, "target_ids": rows["target_ids"], "loss_mask": rows["loss_mask"]}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_kd_loss(**args)


def test_linear_backward_scales_by_the_incoming_gradient():
    """backward multiplies the saved gradients by d(outer)/d(loss): 3 * loss has three times the gradients."""
    rows = make_rows(padded=2)
    grads = []
    for scale in (1.0, 3.0):
        h, w = rows["hidden"].clone().requires_grad_(), rows["weight"].clone().requires_grad_()
        value, _ = linear_kd_loss(h, w, *rows["teacher"], rows["target_ids"], rows["loss_mask"], LossOptions(loss="jsd"),
                                  num_ids=rows["vocab"], chunk_tokens=4)
        (scale * value).backward()
        grads.append((h.grad, w.grad))
    for one, three in zip(*grads):
        torch.testing.assert_close(three, 3 * one, rtol=1e-12, atol=1e-15)
