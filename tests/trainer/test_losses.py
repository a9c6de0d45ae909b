"""Tests for trainer/losses.py: sparse KD against dense and unfused references, edge cases, memory shape.

Comparisons run in float64 on tiny random tensors; nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.divergences import (
    EmptyTeacherRowError,
    divergence,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)
from trainer.losses import (
    LOSSES,
    LossOptions,
    cross_entropy_loss,
    dense_kd_loss,
    sparse_kd_loss,
    tail_sample_targets,
)

DIVERGENCES = [name for name in LOSSES if name != "ce"]
NEG_INF = -math.inf


def make_batch(num_tokens=13, vocab=17, num_topk=5, dtype=torch.float64, seed=0, mask_prob=0.7):
    """A fake teacher with fixed logits, its top-K cache fields, student logits, targets and a mask."""
    gen = torch.Generator().manual_seed(seed)
    teacher_logits = 2.0 * torch.randn(num_tokens, vocab, generator=gen, dtype=dtype)
    teacher_logp = teacher_logits.log_softmax(-1)
    topk_logprobs, topk_ids = teacher_logp.topk(num_topk, dim=-1)
    rest = teacher_logp.scatter(1, topk_ids, NEG_INF).logsumexp(-1)  # (N,)
    tail = rest if num_topk < vocab else torch.full_like(rest, NEG_INF)
    student_logits = torch.randn(num_tokens, vocab, generator=gen, dtype=dtype)
    target_ids = torch.randint(0, vocab, (num_tokens,), generator=gen)
    loss_mask = torch.rand(num_tokens, generator=gen) < mask_prob
    loss_mask[0] = True
    target_ids[~loss_mask] = -100
    return {
        "teacher_logits": teacher_logits, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
        "tail_logprob": tail,
        "student_logits": student_logits, "target_ids": target_ids, "loss_mask": loss_mask,
    }


OPTION_FIELDS = {f.name for f in dataclasses.fields(LossOptions)}


def options_of(kwargs: dict) -> LossOptions:
    """Pop the LossOptions fields out of kwargs (loss=, alpha=, ...) into one LossOptions."""
    return LossOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_FIELDS})


def sparse_loss(*args, **kwargs):
    """sparse_kd_loss with the loss options given as keywords, as the tests below write them."""
    options = options_of(kwargs)
    return sparse_kd_loss(*args, options=options, **kwargs)


def dense_loss(*args, **kwargs):
    """dense_kd_loss with the loss options given as keywords."""
    options = options_of(kwargs)
    return dense_kd_loss(*args, options=options, **kwargs)


def cache_args(batch):
    """The positional arguments of sparse_kd_loss after the logits."""
    keys = ("topk_ids", "topk_logprobs", "tail_logprob", "target_ids", "loss_mask")
    return tuple(batch[key] for key in keys)


def run_sparse(batch, logits=None, **kwargs):
    """Returns (loss, stats, d loss / d logits)."""
    logits = (batch["student_logits"] if logits is None else logits).detach().requires_grad_()
    loss, stats = sparse_loss(logits, *cache_args(batch), **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, stats, grad


def unfused_sparse(logits, batch, loss="fkl", alpha=0.0, temperature=1.0, beta=0.5, skew=0.1):
    """The sparse formula in plain autograd over the whole batch: the reference for the fused loss."""
    mask = batch["loss_mask"]
    s = student_bucket_logprobs(logits[mask], batch["topk_ids"][mask])  # (n, K+1)
    t = teacher_bucket_logprobs(batch["topk_logprobs"][mask], batch["tail_logprob"][mask])  # (n, K+1)
    kd = divergence(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), loss, beta, skew)
    ce = F.cross_entropy(logits[mask], batch["target_ids"][mask], reduction="none")
    return (alpha * ce + (1 - alpha) * temperature**2 * kd).mean()


def assert_target_bucket_loss_equals_dense(batch: dict, target_logprob: torch.Tensor, chunk_tokens: int | None = None,
                                           **kwargs) -> None:
    """The fused sparse loss with the target bucket equals dense_kd_loss in value and gradient (float64)."""
    chunking = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    logits = batch["student_logits"].detach().requires_grad_()
    sparse, _ = sparse_loss(logits, *cache_args(batch), target_logprob=target_logprob, **chunking, **kwargs)
    (sparse_grad,) = torch.autograd.grad(sparse, logits)
    dense_logits = batch["student_logits"].detach().requires_grad_()
    dense, _ = dense_loss(dense_logits, batch["teacher_logits"], batch["target_ids"], batch["loss_mask"], **kwargs)
    (dense_grad,) = torch.autograd.grad(dense, dense_logits)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-8, atol=1e-12)


def assert_finite(*tensors):
    for x in tensors:
        assert torch.isfinite(x).all(), x


# ----------------------------------------------------------------------------------------------------
# Sparse with K = V equals dense


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.0), (0.5, 0.3), (1.7, 0.5)])
def test_sparse_with_full_vocab_equals_dense(loss, temperature, alpha):
    batch = make_batch(num_topk=17)  # K = V: ids are the full vocab sorted by teacher log-prob, tail -inf
    kwargs = {"loss": loss, "alpha": alpha, "temperature": temperature, "beta": 0.3, "skew": 0.2}
    sparse, sparse_stats, sparse_grad = run_sparse(batch, chunk_tokens=4, **kwargs)

    logits = batch["student_logits"].detach().requires_grad_()
    dense, dense_stats = dense_loss(
        logits, batch["teacher_logits"], batch["target_ids"], batch["loss_mask"], **kwargs
    )
    (dense_grad,) = torch.autograd.grad(dense, logits)

    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-9, atol=1e-12)
    for key in ("ce", "kd", "num_tokens"):
        torch.testing.assert_close(sparse_stats[key], dense_stats[key], rtol=1e-10, atol=1e-12)
    assert sparse_grad.abs().sum() > 0


def test_full_vocab_ignores_a_stored_tail_that_is_rounding_noise():
    batch = make_batch(num_topk=17)
    noisy = dict(batch, tail_logprob=torch.full_like(batch["tail_logprob"], -9.0))
    clean, _, clean_grad = run_sparse(batch)
    loss, _, grad = run_sparse(noisy)
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grad, clean_grad)


# ----------------------------------------------------------------------------------------------------
# Fused chunked == unfused reference, K < V


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 13, 1024])  # N = 13 masked-in tokens at most
def test_fused_equals_unfused_reference(loss, chunk_tokens):
    batch = make_batch(num_tokens=13, vocab=29, num_topk=6, seed=1)
    kwargs = {"loss": loss, "alpha": 0.25, "temperature": 1.5, "beta": 0.4, "skew": 0.1}
    fused, stats, fused_grad = run_sparse(batch, chunk_tokens=chunk_tokens, **kwargs)

    logits = batch["student_logits"].detach().requires_grad_()
    if loss == "ce":
        reference = cross_entropy_loss(logits, batch["target_ids"], batch["loss_mask"])
    else:
        reference = unfused_sparse(logits, batch, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, logits)

    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-9, atol=1e-12)
    assert stats["num_tokens"] == batch["loss_mask"].sum()
    assert (fused_grad[~batch["loss_mask"]] == 0).all()


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("gap", [30.0, 80.0, 200.0])  # rest mass ~e^-30 (sum path), ~e^-80 and 0 (exact path)
def test_student_certain_of_the_ids_float32_matches_float64_reference(loss, gap):
    """Rows whose student mass outside the K ids is tiny or underflows take the exact path; the rest sum elsewhere."""
    batch = make_batch(num_tokens=13, vocab=29, num_topk=6, seed=2)
    logits = batch["student_logits"].clone()
    boost = torch.zeros_like(logits).scatter(1, batch["topk_ids"], gap)
    logits[::2] += boost[::2]  # every other row: the student is all but certain of the teacher's ids
    kwargs = {"loss": loss, "alpha": 0.2, "temperature": 1.0}
    fused, _, fused_grad = run_sparse(batch, logits=logits.float(), chunk_tokens=4, **kwargs)

    reference_logits = logits.detach().requires_grad_()
    reference = unfused_sparse(reference_logits, batch, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, reference_logits)
    assert_finite(fused, fused_grad)
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad.double(), reference_grad, rtol=1e-4, atol=1e-7)


def test_grad_output_scales_gradient():
    batch = make_batch(vocab=29, num_topk=6)
    logits = batch["student_logits"].detach().requires_grad_()
    args = cache_args(batch)
    loss, _ = sparse_loss(logits, *args, loss="jsd")
    (3.0 * loss).backward()
    _, _, unit_grad = run_sparse(batch, loss="jsd")
    torch.testing.assert_close(logits.grad, 3.0 * unit_grad)


def test_uint16_ids_and_float16_logprobs():
    batch = make_batch(vocab=29, num_topk=6)
    loss, _, grad = run_sparse(batch)
    stored = dict(batch, topk_ids=batch["topk_ids"].to(torch.uint16),
                  topk_logprobs=batch["topk_logprobs"].half(), tail_logprob=batch["tail_logprob"].float())
    stored_loss, _, stored_grad = run_sparse(stored)
    torch.testing.assert_close(stored_loss, loss, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(stored_grad, grad, rtol=1e-2, atol=2e-4)


# ----------------------------------------------------------------------------------------------------
# divergence() by hand


P = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
Q = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64)


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist()) if pi > 0)


def test_divergence_matches_formulas_on_three_outcomes():
    p, q = P.log(), Q.log()

    def value(loss, **kw):
        return divergence(p, q, loss, **kw).item()

    assert value("tvd") == pytest.approx(0.5 * (0.3 + 0.1 + 0.4))
    assert value("fkl") == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.2 * math.log(1 / 3))
    assert value("rkl") == pytest.approx(0.2 * math.log(0.4) + 0.2 * math.log(2 / 3) + 0.6 * math.log(3))
    m = 0.3 * P + 0.7 * Q
    assert value("jsd", beta=0.3) == pytest.approx(0.3 * kl_by_hand(P, m) + 0.7 * kl_by_hand(Q, m))
    assert value("skl", skew=0.1) == pytest.approx(kl_by_hand(P, 0.1 * P + 0.9 * Q))
    assert value("srkl", skew=0.1) == pytest.approx(kl_by_hand(Q, 0.1 * Q + 0.9 * P))
    # skew 0 is plain KL; the symmetric JSD is symmetric.
    assert value("skl", skew=0.0) == pytest.approx(value("fkl"))
    assert value("srkl", skew=0.0) == pytest.approx(value("rkl"))
    assert value("jsd") == pytest.approx(divergence(q, p, "jsd").item())


def test_divergence_zero_probability_conventions():
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64).log()  # log 0 = -inf
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64).log()
    assert divergence(p, q, "fkl").item() == pytest.approx(math.log(2))  # 0 * log(0 / 0.5) = 0
    assert divergence(p, q, "tvd").item() == pytest.approx(0.5)
    # Reverse KL where the teacher rules out an outcome: finite, floored at float32's smallest normal.
    floor = math.log(torch.finfo(torch.float32).tiny)
    expected = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - floor)
    assert divergence(p, q, "rkl").item() == pytest.approx(expected)
    # An outcome both give probability 0 contributes nothing, with finite gradients.
    both = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64).log()
    for loss in DIVERGENCES:
        student = both.clone().requires_grad_()
        value = divergence(both, student, loss)
        (grad,) = torch.autograd.grad(value.sum(), student)
        assert value.item() == pytest.approx(0.0, abs=1e-15)
        assert_finite(grad)


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_divergence_nonnegative_and_zero_iff_equal(loss):
    gen = torch.Generator().manual_seed(3)
    p = (3 * torch.randn(64, 9, generator=gen, dtype=torch.float64)).log_softmax(-1)
    q = (3 * torch.randn(64, 9, generator=gen, dtype=torch.float64)).log_softmax(-1)
    values = divergence(p, q, loss, beta=0.3, skew=0.1)
    assert values.shape == (64,)
    assert (values > 0).all()
    zeros = torch.zeros(64, dtype=torch.float64)
    torch.testing.assert_close(divergence(p, p, loss), zeros, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------------
# Buckets


def test_bucket_logprobs_are_normalized_distributions():
    batch = make_batch(vocab=29, num_topk=6)
    s = student_bucket_logprobs(batch["student_logits"], batch["topk_ids"].to(torch.int32))
    assert s.shape == (13, 7)
    torch.testing.assert_close(s.logsumexp(-1), torch.zeros(13, dtype=torch.float64))
    student_logp = batch["student_logits"].log_softmax(-1)
    torch.testing.assert_close(s[:, :-1], student_logp.gather(1, batch["topk_ids"]))
    # float16 storage: the stored buckets are off by about 1e-3; renormalized ones are exact.
    t = teacher_bucket_logprobs(batch["topk_logprobs"].half(), batch["tail_logprob"].half())
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.logsumexp(-1), torch.zeros(13), rtol=0, atol=1e-6)


def test_student_tail_is_stable_when_top_k_hold_nearly_all_mass():
    logits = torch.tensor([[40.0, 0.0, 0.0, 0.0]])  # tail mass ~ 3e-17: log(1 - sum) would give -inf or junk
    s = student_bucket_logprobs(logits, torch.tensor([[0]]))
    torch.testing.assert_close(s[0, 1], torch.tensor(math.log(3.0) - 40.0), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Finite values and gradients in extreme cases


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "case", ["teacher_neg_inf", "tail_neg_inf", "tiny_logprobs", "peaked_student", "full_vocab"]
)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_extreme_inputs_give_finite_values_and_grads(loss, case, temperature):
    batch = make_batch(vocab=29, num_topk=6, dtype=torch.float32, seed=4)
    topk_logprobs, tail = batch["topk_logprobs"].clone(), batch["tail_logprob"].clone()
    logits = batch["student_logits"]
    if case == "teacher_neg_inf":
        topk_logprobs[:, 3:] = NEG_INF
    elif case == "tail_neg_inf":
        tail[:] = NEG_INF
    elif case == "tiny_logprobs":
        topk_logprobs[:, 2:] = -1e4
        tail[:] = -1e4
    elif case == "peaked_student":
        logits = 1e4 * logits
    elif case == "full_vocab":
        batch = make_batch(vocab=29, num_topk=29, dtype=torch.float32, seed=4)
        topk_logprobs, tail = batch["topk_logprobs"], batch["tail_logprob"]
        topk_logprobs[:, 20:] = NEG_INF
    batch = dict(batch, topk_logprobs=topk_logprobs.half(), tail_logprob=tail)
    value, stats, grad = run_sparse(batch, logits=logits, loss=loss, alpha=0.1, temperature=temperature,
                                    chunk_tokens=5)
    assert_finite(value, stats["ce"], stats["kd"], grad)
    assert value >= 0


# ----------------------------------------------------------------------------------------------------
# Masking, alpha, arguments


@pytest.mark.parametrize("loss", LOSSES)
def test_all_masked_gives_zero_loss_with_zero_grad(loss):
    batch = make_batch(vocab=29, num_topk=6)
    batch["loss_mask"][:] = False
    batch["target_ids"][:] = -100
    batch["topk_ids"][:] = 10**6  # padding rows are never read
    value, stats, grad = run_sparse(batch, loss=loss)
    assert value.item() == 0.0 and value.grad_fn is not None  # a zero that still has a grad path
    assert (grad == 0).all()
    assert stats["num_tokens"] == 0
    logits = batch["student_logits"].detach().requires_grad_()
    dense, _ = dense_loss(
        logits, batch["teacher_logits"], batch["target_ids"], batch["loss_mask"], loss=loss
    )
    dense.backward()
    assert dense.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_alpha_one_is_cross_entropy(loss):
    batch = make_batch(vocab=29, num_topk=6)
    value, stats, grad = run_sparse(batch, loss=loss, alpha=1.0, temperature=3.0)
    logits = batch["student_logits"].detach().requires_grad_()
    ce = cross_entropy_loss(logits, batch["target_ids"], batch["loss_mask"])
    ce.backward()
    torch.testing.assert_close(value, ce)
    torch.testing.assert_close(grad, logits.grad)
    torch.testing.assert_close(stats["ce"], ce.detach())
    if loss != "ce":
        assert stats["kd"] > 0  # still reported for monitoring


def test_ce_loss_ignores_alpha():
    batch = make_batch(vocab=29, num_topk=6)
    a, _, grad_a = run_sparse(batch, loss="ce", alpha=0.0)
    b, _, grad_b = run_sparse(batch, loss="ce", alpha=0.7, temperature=4.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_a, grad_b)


def test_loss_is_mix_of_stats():
    batch = make_batch(vocab=29, num_topk=6)
    value, stats, _ = run_sparse(batch, loss="rkl", alpha=0.3, temperature=2.0)
    torch.testing.assert_close(value, 0.3 * stats["ce"] + 0.7 * 4.0 * stats["kd"])


def test_no_grad_path_returns_the_same_value():
    batch = make_batch(vocab=29, num_topk=6)
    value, _, _ = run_sparse(batch, loss="skl")
    with torch.no_grad():
        again, _ = sparse_loss(batch["student_logits"].requires_grad_(), *cache_args(batch), loss="skl")
    torch.testing.assert_close(again, value.detach())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"loss": "kl"}, "fkl, rkl, jsd, skl, srkl, tvd, ce"),
        ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha=-0.1 must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature=0.0 must be"),
        ({"temperature": -1.0}, "temperature=-1.0 must be"),
        ({"loss": "jsd", "beta": 1.0}, r"beta=1.0 must be in \(0, 1\)"),
        ({"loss": "skl", "skew": 1.0}, r"skew=1.0 must be in \[0, 1\)"),
        ({"chunk_tokens": 0}, "chunk_tokens=0"),
        ({"topk_logprobs": torch.zeros(13, 5)}, r"topk_logprobs \(13, 5\).*topk_ids \(13, 6\)"),
        ({"tail_logprob": torch.zeros(12)}, r"tail_logprob \(12,\).*\(13, 29\)"),
        ({"target_ids": torch.zeros(13, 1, dtype=torch.long)}, r"target_ids \(13, 1\).*\(13, 29\)"),
        ({"loss_mask": torch.ones(12, dtype=torch.bool)}, r"loss_mask \(12,\).*\(13, 29\)"),
        ({"loss_mask": torch.ones(13, dtype=torch.long)}, "loss_mask.bool()"),
        ({"topk_ids": torch.zeros(12, 6, dtype=torch.long)}, r"topk_ids \(12, 6\).*\(13, 29\)"),
        ({"topk_ids": torch.zeros(13, 30, dtype=torch.long), "topk_logprobs": torch.zeros(13, 30)}, "K=30"),
        ({"student_logits": torch.zeros(13, 2, 29)}, r"\(N, V\)"),
        ({"target_ids": torch.full((13,), -100)}, r"target_ids under loss_mask must be in \[0, 29\)"),
        ({"topk_ids": torch.full((13, 6), 29)}, r"topk_ids under loss_mask must be in \[0, 29\)"),
    ],
)
def test_bad_arguments_raise_helpful_errors(change, message):
    batch = make_batch(vocab=29, num_topk=6, dtype=torch.float32)
    args = {
        "student_logits": batch["student_logits"], "topk_ids": batch["topk_ids"],
        "topk_logprobs": batch["topk_logprobs"], "tail_logprob": batch["tail_logprob"],
        "target_ids": batch["target_ids"], "loss_mask": batch["loss_mask"],
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sparse_loss(**args)


def test_dense_and_divergence_check_arguments():
    batch = make_batch(vocab=29, num_topk=6)
    with pytest.raises(ValueError, match=r"teacher_logits \(13, 28\).*\(13, 29\)"):
        dense_loss(batch["student_logits"], torch.zeros(13, 28), batch["target_ids"], batch["loss_mask"])
    with pytest.raises(ValueError, match="expected one of"):
        divergence(P.log(), Q.log(), "ce")
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\)"):
        divergence(P.log(), Q.log()[:, :2], "fkl")


# ----------------------------------------------------------------------------------------------------
# Low precision and memory


@pytest.mark.parametrize("loss", ["fkl", "jsd", "tvd"])
def test_bf16_logits_close_to_float32(loss):
    batch = make_batch(num_tokens=40, vocab=64, num_topk=8, dtype=torch.float32)
    logits_bf16 = batch["student_logits"].bfloat16()
    value, _, grad = run_sparse(
        batch, logits=logits_bf16, loss=loss, alpha=0.2, temperature=2.0, chunk_tokens=16
    )
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    reference, _, reference_grad = run_sparse(batch, logits=logits_bf16.float(), loss=loss, alpha=0.2,
                                              temperature=2.0, chunk_tokens=16)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)  # same inputs, float32 math
    torch.testing.assert_close(grad.float(), reference_grad, rtol=2e-2, atol=1e-5)  # bf16 grad rounding


def saved_full_size_tensors(fn, logits):
    """Shapes of (N, V)-sized tensors autograd saves for backward while fn(logits) runs."""
    saved = []

    def pack(x):
        if x.numel() >= logits.numel():
            saved.append((tuple(x.shape), x.dtype))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(logits)
    return saved


def test_fused_loss_keeps_only_one_logits_sized_tensor_for_backward():
    batch = make_batch(num_tokens=64, vocab=50, num_topk=8, dtype=torch.float32, mask_prob=1.0)
    args = cache_args(batch)
    logits = batch["student_logits"].bfloat16().requires_grad_()

    fused = saved_full_size_tensors(lambda x: sparse_loss(x, *args, loss="jsd", chunk_tokens=16), logits)
    assert fused == [((64, 50), torch.bfloat16)]  # the gradient buffer, in the logits' dtype, nothing else
    # The check can fail: plain autograd saves several logits-sized tensors.
    unfused = saved_full_size_tensors(lambda x: unfused_sparse(x.float(), batch, loss="jsd"), logits)
    assert len(unfused) >= 2

    # backward returns the buffer computed in forward, scaled, not a recomputation.
    loss, _ = sparse_loss(logits, *args, loss="jsd", chunk_tokens=16)
    (buffer,) = loss.grad_fn.saved_tensors
    expected = buffer.clone() * 2
    (2 * loss).backward()
    assert torch.equal(logits.grad, expected)


# ----------------------------------------------------------------------------------------------------
# The target's own bucket (target_logprob given): K + 2 outcomes


def target_batch(num_topk=6, vocab=29, seed=3):
    """make_batch plus the teacher's log-prob of each real next token; about half the targets outside the ids."""
    batch = make_batch(num_tokens=13, vocab=vocab, num_topk=num_topk, seed=seed)
    teacher_logp = batch["teacher_logits"].log_softmax(-1)
    gen = torch.Generator().manual_seed(seed + 100)
    inside = torch.rand(13, generator=gen) < 0.5
    pick = batch["topk_ids"][torch.arange(13), torch.randint(0, num_topk, (13,), generator=gen)]
    outside_ids = teacher_logp.scatter(1, batch["topk_ids"], -math.inf).argmax(-1)  # best token not in the ids
    target = torch.where(inside, pick, outside_ids)
    target[~batch["loss_mask"]] = 0
    batch["target_ids"] = target
    batch["target_logprob"] = teacher_logp.gather(1, target[:, None])[:, 0]
    return batch


def unfused_target_sparse(logits, batch, loss="fkl", alpha=0.0, temperature=1.0, beta=0.5, skew=0.1):
    """The K + 2 bucket formula in plain autograd: the reference for the fused loss with target_logprob."""
    mask = batch["loss_mask"]
    ids, target, tlp = batch["topk_ids"][mask], batch["target_ids"][mask], batch["target_logprob"][mask]
    known = tlp <= 0
    outside = ~(ids == target[:, None]).any(-1) & known
    s = student_bucket_logprobs(logits[mask], ids, target, known)  # (n, K+2)
    t = teacher_bucket_logprobs(batch["topk_logprobs"][mask], batch["tail_logprob"][mask], tlp, outside)
    kd = divergence(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), loss, beta, skew)
    ce = F.cross_entropy(logits[mask], target, reduction="none")
    return (alpha * ce + (1 - alpha) * temperature**2 * kd).mean()


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_target_bucket_fused_equals_unfused_reference(loss, chunk_tokens):
    batch = target_batch()
    batch["target_logprob"][3] = 1.0  # the cache's sentinel: unknown, that row keeps K + 1 buckets
    kwargs = {"loss": loss, "alpha": 0.25, "temperature": 1.5, "beta": 0.4, "skew": 0.1}
    logits = batch["student_logits"].detach().requires_grad_()
    fused, _ = sparse_loss(logits, *cache_args(batch), chunk_tokens=chunk_tokens,
                              target_logprob=batch["target_logprob"], **kwargs)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    reference_logits = batch["student_logits"].detach().requires_grad_()
    reference = unfused_target_sparse(reference_logits, batch, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, reference_logits)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-9, atol=1e-12)
    without, _, _ = run_sparse(batch, **kwargs)
    assert not torch.isclose(fused.detach(), without)  # the extra bucket changes the loss


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_target_bucket_with_the_only_missing_token_equals_dense(loss):
    """K = V - 1 and every target the one token outside the ids: K + 2 buckets are the whole vocabulary."""
    vocab = 11
    batch = make_batch(num_tokens=9, vocab=vocab, num_topk=vocab - 1, seed=5, mask_prob=1.0)
    teacher_logp = batch["teacher_logits"].log_softmax(-1)
    missing = teacher_logp.argmin(-1)  # topk(V - 1) leaves out the least likely token
    batch["target_ids"] = missing
    batch["tail_logprob"] = teacher_logp.gather(1, missing[:, None])[:, 0]
    kwargs = {"loss": loss, "alpha": 0.0, "temperature": 1.3, "beta": 0.3, "skew": 0.2}
    assert_target_bucket_loss_equals_dense(batch, batch["tail_logprob"], **kwargs)


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("tail_offset", [0.0, 1e-7, 1e-3, -1e-3])  # log tail - log p(target): stored rounding
def test_target_bucket_with_the_only_missing_token_and_a_perturbed_tail_equals_dense(loss, tail_offset):
    """K = V - 1, target outside: the named buckets cover every id, so the stored tail (however it rounds,
    here a little above or below the target's mass) leaves no rest; the loss is the dense one, float64."""
    vocab = 11
    batch = make_batch(num_tokens=9, vocab=vocab, num_topk=vocab - 1, seed=6, mask_prob=1.0)
    teacher_logp = batch["teacher_logits"].log_softmax(-1)
    missing = teacher_logp.argmin(-1)
    batch["target_ids"] = missing
    target_logprob = teacher_logp.gather(1, missing[:, None])[:, 0]
    batch["tail_logprob"] = target_logprob + tail_offset
    kwargs = {"loss": loss, "alpha": 0.2, "temperature": 1.0, "beta": 0.3, "skew": 0.2}
    assert_target_bucket_loss_equals_dense(batch, target_logprob, chunk_tokens=4, **kwargs)


def test_rest_bucket_is_empty_where_the_named_buckets_cover_the_vocabulary():
    """teacher_bucket_logprobs(vocab_size=V): K = V, or K = V - 1 with the target outside, has no rest;
    K = V - 1 with the target among the ids keeps the stored tail (one token is left); None trusts it."""
    top = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64))
    noise = torch.full((2,), -12.0, dtype=torch.float64)
    t = teacher_bucket_logprobs(top, noise, vocab_size=3)  # K = V
    assert torch.isneginf(t[:, -1]).all()
    torch.testing.assert_close(t[:, :3], top)
    assert torch.isfinite(teacher_bucket_logprobs(top, noise)[:, -1]).all()  # vocab_size=None: as stored
    top2 = top[:, :2]  # K = 2 ids of V = 3; the missing token has 0.2
    target_lp = torch.tensor([math.log(0.2), 1.0], dtype=torch.float64)  # row 0: the missing token; row 1: unknown
    outside = torch.tensor([True, False])
    tail = torch.tensor([math.log(0.2) + 1e-6, math.log(0.2)], dtype=torch.float64)  # row 0: a little too much
    t = teacher_bucket_logprobs(top2, tail, target_lp, outside, vocab_size=3)  # (2, K + 2)
    assert t[0, -1] == -math.inf and t[1, -2] == -math.inf  # row 0: no rest; row 1: no target bucket
    torch.testing.assert_close(t.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(t[1, -1].exp(), torch.tensor(0.2, dtype=torch.float64))  # the missing token's mass


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_row_without_teacher_mass_is_refused_naming_it(loss, chunk_tokens):
    """A masked-in row whose top-K log-probs and tail are all -inf has no teacher distribution: a clear error
    with its index instead of a NaN loss; the same row outside the mask is never read."""
    batch = make_batch(vocab=29, num_topk=6, dtype=torch.float32)
    batch["topk_logprobs"][5] = NEG_INF
    batch["tail_logprob"][5] = NEG_INF
    batch["loss_mask"][5] = True
    batch["target_ids"][5] = 3
    with pytest.raises(EmptyTeacherRowError, match="row 5 of 13: the teacher's stored log-probs hold no") as info:
        run_sparse(batch, loss=loss, chunk_tokens=chunk_tokens)
    assert info.value.row == 5
    batch["loss_mask"][5] = False
    value, _, grad = run_sparse(batch, loss=loss, chunk_tokens=chunk_tokens)
    assert_finite(value, grad)
    batch["loss_mask"][5] = True
    value, _, grad = run_sparse(batch, loss="ce")  # cross-entropy alone reads no teacher entry
    assert_finite(value, grad)


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("gap", [30.0, 200.0])
def test_target_bucket_certain_student_float32_matches_float64(loss, gap):
    batch = target_batch(seed=7)
    logits = batch["student_logits"].clone()
    logits[::2] += torch.zeros_like(logits).scatter(1, batch["topk_ids"], gap)[::2]
    kwargs = {"loss": loss, "alpha": 0.2}
    f32 = logits.float().requires_grad_()
    fused, _ = sparse_loss(f32, *cache_args(batch), chunk_tokens=4, target_logprob=batch["target_logprob"],
                              **kwargs)
    (fused_grad,) = torch.autograd.grad(fused, f32)
    reference_logits = logits.detach().requires_grad_()
    reference = unfused_target_sparse(reference_logits, batch, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, reference_logits)
    assert_finite(fused, fused_grad)
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad.double(), reference_grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Tail samples (storage_layout.md 3.3): top-K plus importance-weighted draws from the tail


def _one_draw_targets(batch, choice):
    """Every row's tail sample is its choice[n]-th tail id (M = 1, count 1): the union target."""
    vocab = batch["student_logits"].shape[1]
    in_top = torch.zeros_like(batch["student_logits"], dtype=torch.bool).scatter_(1, batch["topk_ids"], True)
    tail_ids = torch.stack([(~row).nonzero().squeeze(1) for row in in_top])  # (N, V - K), ascending
    drawn = tail_ids.gather(1, choice.unsqueeze(1))  # (N, 1)
    return tail_ids, tail_sample_targets(batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], drawn,
                                         torch.ones_like(drawn)), vocab


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_tail_samples_expected_gradient_is_the_dense_gradient(alpha):
    """E over the draw of the sparse forward-KL gradient equals the dense forward-KL gradient, exactly.

    With M = 1, row n draws tail id j with probability p_j / tail mass; summing the gradients of every
    outcome with those weights must give dense_kd_loss's gradient (float64).
    """
    batch = make_batch(num_tokens=9, vocab=17, num_topk=5)
    logits = batch["student_logits"].detach().requires_grad_()
    dense, _ = dense_loss(logits, batch["teacher_logits"], batch["target_ids"], batch["loss_mask"], alpha=alpha)
    (dense_grad,) = torch.autograd.grad(dense, logits)

    teacher_p = batch["teacher_logits"].softmax(-1)
    expected_grad = torch.zeros_like(dense_grad)
    for c in range(17 - 5):
        choice = torch.full((9,), c, dtype=torch.long)
        tail_ids, (ids, lps, rest), _ = _one_draw_targets(batch, choice)
        assert torch.isneginf(rest).all()  # every row has a draw: no rest bucket
        loss, _ = sparse_loss(logits, ids, lps, rest, batch["target_ids"], batch["loss_mask"], alpha=alpha)
        (grad,) = torch.autograd.grad(loss, logits)
        weight = teacher_p.gather(1, tail_ids[:, c:c + 1]) / batch["tail_logprob"].exp().unsqueeze(1)  # (N, 1)
        expected_grad += weight * grad
    torch.testing.assert_close(expected_grad, dense_grad, rtol=1e-9, atol=1e-12)


def test_tail_sample_targets_values():
    ids = torch.tensor([[3, 1], [0, 2]])
    lps = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1]], dtype=torch.float64))
    tail = torch.log(torch.tensor([0.2, 0.3], dtype=torch.float64))
    tail_ids = torch.tensor([[4, 0, 2], [1, 3, 4]])
    counts = torch.tensor([[3, 1, 0], [0, 0, 0]], dtype=torch.uint8)  # row 1: no draws
    u_ids, u_lps, rest = tail_sample_targets(ids, lps, tail, tail_ids, counts)
    assert u_ids.tolist() == [[3, 1, 4, 0, 2], [0, 2, 1, 3, 4]]
    probs = u_lps.exp()
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64))
    torch.testing.assert_close(probs[1], torch.tensor([0.6, 0.1, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert rest[0] == -math.inf and rest[1] == pytest.approx(math.log(0.3))
    with pytest.raises(ValueError, match="must both be \\(N, M\\)"):
        tail_sample_targets(ids, lps, tail, tail_ids, counts[:, :2])


def test_tail_samples_in_the_fused_loss_match_a_dense_reference():
    """The union target through the fused loss equals plain cross-entropy against the sparse weights."""
    batch = make_batch(num_tokens=11, vocab=17, num_topk=4)
    gen = torch.Generator().manual_seed(3)
    choice = torch.randint(0, 13, (11,), generator=gen)
    _, (ids, lps, rest), vocab = _one_draw_targets(batch, choice)
    logits = batch["student_logits"].detach().requires_grad_()
    loss, _ = sparse_loss(logits, ids, lps, rest, batch["target_ids"], batch["loss_mask"], chunk_tokens=3)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = batch["student_logits"].detach().requires_grad_()
    mask = batch["loss_mask"]
    q = torch.zeros(11, vocab, dtype=torch.float64).scatter_(1, ids, lps.double().exp())  # the sparse target
    log_s = ref_logits.log_softmax(-1)
    ref = (q * (torch.log(q.clamp(min=1e-300)) - log_s)).sum(-1)[mask].mean()  # KL(q || student)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
