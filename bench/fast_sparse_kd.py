"""A candidate for trainer.losses.sparse_kd_loss with fewer passes over the (tokens, V) logits (P1).

Same math, same API subset, same result as trainer.losses.sparse_kd_loss (tests/bench compare them).
The shipped fused loss builds, per chunk, a second (n, V) copy of the logits with the K ids set to
-inf (`z_rest`), a logsumexp over it, and an exp over it again for the gradient. This candidate
derives the rest bucket from the one softmax it needs anyway:

    p = exp(z - lse)                     one (n, V) tensor, in place over the chunk's copy
    p_ids = p[ids];  p[ids] = 0          (n, K) gather + scatter
    rest = p.sum(-1)                     a sum of positive terms: no cancellation, exact to rounding
    grad = p * (c - G + g_tail / rest)   in place: the softmax outside the ids, rescaled
    grad[ids] = p_ids * (c - G) + g_top  (n, K) scatter;  grad[target] -= c

with c the CE weight per token and G = sum of the bucket gradients. Rows whose rest mass underflows
to 0 although K < V (a student sure of the teacher's K ids beyond float32's range) fall back to the
exact logsumexp over the other logits, as the shipped loss computes it.

Knows tensors; reuses trainer.losses' divergences and argument rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.losses import _compute_dtype, _weights, divergence, teacher_bucket_logprobs


class _FastSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, topk_ids, topk_logprobs, tail_logprob, target_ids, rows, options):
        loss, temperature, beta, skew, ce_weight, kd_weight, chunk_tokens = options
        cdtype = _compute_dtype(student_logits.dtype)
        vocab_size = student_logits.shape[1]
        denom = max(rows.numel(), 1)
        total = torch.zeros((), dtype=cdtype, device=student_logits.device)
        ce_sum, kd_sum = torch.zeros_like(total), torch.zeros_like(total)
        grad_buffer = torch.zeros_like(student_logits)  # (N, V)
        ce_coeff = ce_weight / denom
        for start in range(0, rows.numel(), chunk_tokens):
            idx = rows[start:start + chunk_tokens]  # (n,)
            z = student_logits.index_select(0, idx).to(cdtype)  # (n, V) fresh copy
            target = target_ids.index_select(0, idx)[:, None]  # (n, 1)
            ids = topk_ids.index_select(0, idx)  # (n, K)
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            ce = lse - z.gather(1, target)[:, 0]  # (n,)
            ce_sum += ce.sum()
            total += ce_weight * ce.sum()
            top = z.gather(1, ids) - lse[:, None]  # (n, K) student log-probs at the ids
            p = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, reuses z
            p_ids = p.gather(1, ids)  # (n, K)
            p.scatter_(1, ids, 0.0)  # p now holds the softmax outside the ids
            rest = p.sum(-1)  # (n,)
            rest_lse = torch.log(rest)  # -inf when K = V (or on underflow, fixed below)
            if ids.shape[1] < vocab_size and bool((rest == 0).any()):
                bad = (rest == 0).nonzero().squeeze(1)
                zb = student_logits.index_select(0, idx[bad]).to(cdtype).scatter(1, ids[bad], -math.inf)
                rest_lse[bad] = torch.logsumexp(zb, dim=-1) - lse[bad]
            s = torch.cat([top, rest_lse[:, None]], dim=1)  # (n, K+1)
            t = teacher_bucket_logprobs(topk_logprobs.index_select(0, idx), tail_logprob.index_select(0, idx))
            t_temp = F.log_softmax(t.to(cdtype) / temperature, dim=-1)  # (n, K+1)
            with torch.enable_grad():
                s = s.detach().requires_grad_(kd_weight > 0)
                kd = divergence(t_temp, F.log_softmax(s / temperature, dim=-1), loss, beta, skew)  # (n,)
                g = torch.autograd.grad(kd.sum() * (kd_weight / denom), s)[0] if s.requires_grad else torch.zeros_like(s)
            kd = kd.detach()
            kd_sum += kd.sum()
            total += kd_weight * kd.sum()
            g_top, g_tail = g[:, :-1], g[:, -1]  # (n, K), (n,)
            big_g = g.sum(-1)  # (n,)
            # outside the ids: p_j (c - G) + g_tail p_j / rest; rows with rest = 0 have p = 0 there
            scale_rest = torch.where(rest > 0, g_tail / torch.where(rest > 0, rest, 1.0), 0.0)
            grad = p.mul_((ce_coeff - big_g + scale_rest)[:, None])  # (n, V), reuses p
            if ids.shape[1] < vocab_size and bool((rest == 0).any()):  # underflow rows: softmax_rest from logits
                bad = (rest == 0).nonzero().squeeze(1)
                zb = student_logits.index_select(0, idx[bad]).to(cdtype).scatter(1, ids[bad], -math.inf)
                grad[bad] = torch.softmax(zb, dim=-1) * g_tail[bad, None]
            grad.scatter_(1, ids, p_ids * (ce_coeff - big_g)[:, None] + g_top)
            grad.scatter_add_(1, target, torch.full_like(target, -ce_coeff, dtype=cdtype))
            grad_buffer.index_copy_(0, idx, grad.to(grad_buffer.dtype))
        ctx.save_for_backward(grad_buffer)
        ce_mean, kd_mean = ce_sum / denom, kd_sum / denom
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return total / denom, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        (grad_buffer,) = ctx.saved_tensors
        grad_buffer.mul_(grad_loss.to(grad_buffer.dtype))
        return grad_buffer, None, None, None, None, None, None


def fast_sparse_kd_loss(student_logits, topk_ids, topk_logprobs, tail_logprob, target_ids, loss_mask, *,
                        loss: str = "fkl", alpha: float = 0.0, temperature: float = 1.0, beta: float = 0.5,
                        skew: float = 0.1, chunk_tokens: int = 1024):
    """trainer.losses.sparse_kd_loss's contract (validated inputs assumed; "ce" not handled here).

    student_logits: (N, V) float requiring grad. topk_ids: (N, K) int, distinct per row.
    topk_logprobs: (N, K). tail_logprob: (N,). target_ids: (N,) int. loss_mask: (N,) bool.
    Returns (loss, {"ce", "kd"}).
    """
    rows = loss_mask.nonzero().squeeze(1)
    if topk_ids.shape[1] == student_logits.shape[1]:
        tail_logprob = torch.full_like(tail_logprob, -math.inf)
    ce_weight, kd_weight = _weights(loss, alpha, temperature)
    options = (loss, temperature, beta, skew, ce_weight, kd_weight, chunk_tokens)
    total, ce, kd = _FastSparseKD.apply(student_logits, topk_ids.long(), topk_logprobs, tail_logprob,
                                        target_ids.long(), rows, options)
    return total, {"ce": ce.detach(), "kd": kd.detach()}
