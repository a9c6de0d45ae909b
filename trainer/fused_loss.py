"""The chunked fused KD losses: loss and gradient computed chunk by chunk inside the forward pass.

Two autograd Functions share one per-chunk kernel (`fused_chunks`). The forward pass walks the masked
tokens in chunks of `chunk_tokens`; for each chunk it forms that chunk's (n, V) logits, computes its
loss terms and d(loss)/d(logits) in place, and hands the gradient to the Function, which keeps what its
inputs need; backward only scales what was kept (like Liger's fused losses and torchtune's chunked KD):

- `FusedSparseKD` takes the student's (N, V) logits and keeps one logits-sized gradient buffer.
- `FusedLinearKD` takes the final hidden states (N, H) and the LM head's weight (V', H): each chunk's
  logits are `hidden[chunk] @ weight[:V].T`, and the chunk's logit gradient is turned at once into the
  gradients of the hidden states (N, H) and of the head weight (V', H). The (N, V) logits never exist;
  the largest temporaries are about three (chunk_tokens, V) tensors.

The gradient, per row, with p = softmax(z), c the CE weight per token, g = d loss / d buckets, G = sum(g):

    d loss / d z_j = p_j (c - G + g_rest / rest)   outside the named buckets
                   = p_j (c - G) + g_k             at id_k;   and - c at the target
The rest bucket comes from the softmax (p zeroed at the named ids, then summed). Rows whose rest mass is
below REST_EXACT_BELOW (a student all but certain of the teacher's ids) take the exact logsumexp over the
other logits instead, so neither the loss nor the gradient loses precision to underflow.

Knows tensors and the bucket math (trainer/divergences.py); nothing about models, data or training.
Callers check arguments first (trainer/losses.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.divergences import EmptyTeacherRowError, divergence, target_not_in_ids, teacher_bucket_logprobs

# Below this student mass outside the teacher's K ids, the rest bucket is an exact logsumexp over the other
# logits instead of a sum of softmax terms, which float32 may have rounded to subnormals or to 0
# (docs/losses.md, "The fused loss").
REST_EXACT_BELOW = 1e-30


@dataclass(frozen=True)
class ChunkSettings:
    """What every chunk of one loss call needs (built by trainer/losses.py from LossOptions)."""

    loss: str
    temperature: float
    beta: float
    skew: float
    ce_weight: float  # per token, before the mean
    kd_weight: float  # (1 - alpha) * T^2, 0 for "ce"
    chunk_tokens: int
    compute_grad: bool


@dataclass(frozen=True)
class TeacherTensors:
    """The teacher's (N, ...) rows as the kernel reads them: ids int64, the rest as stored."""

    topk_ids: torch.Tensor  # (N, K) int64
    topk_logprobs: torch.Tensor  # (N, K) float
    tail_logprob: torch.Tensor  # (N,) float
    target_logprob: torch.Tensor | None  # (N,) float, +1.0 = unknown; None: K + 1 buckets


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_chunks(rows: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor],
                 consume: Callable[[torch.Tensor, torch.Tensor], None], teacher: TeacherTensors | None,
                 target_ids: torch.Tensor, settings: ChunkSettings, *, num_rows: int, vocab_size: int,
                 cdtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk the masked rows chunk by chunk; returns (loss, CE mean, KD mean), scalars in cdtype.

    rows: (n,) int64 row numbers of the masked tokens among num_rows. logits_of(idx) -> (m, V) the logits
    of rows idx in cdtype, a fresh tensor (it is edited in place). consume(idx, grad) receives grad (m, V),
    d loss / d logits of those rows (weights and the 1 / n of the mean included), when settings.compute_grad.
    teacher: None for loss "ce". target_ids: (N,) int64.
    """
    s = settings
    denom = max(rows.numel(), 1)
    ce_coeff = s.ce_weight / denom
    total = torch.zeros((), dtype=cdtype, device=device)
    ce_sum = torch.zeros_like(total)
    kd_sum = torch.zeros_like(total)
    for start in range(0, rows.numel(), s.chunk_tokens):
        idx = rows[start : start + s.chunk_tokens]  # (n,) row numbers of masked tokens
        z = logits_of(idx)  # (n, V) edited in place below
        target = target_ids.index_select(0, idx)[:, None]  # (n, 1)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        ce = lse - z.gather(1, target)[:, 0]  # (n,)
        ce_sum += ce.sum()
        total += s.ce_weight * ce.sum()
        if teacher is None:  # cross-entropy alone
            if s.compute_grad:
                grad = z.sub_(lse[:, None]).exp_().mul_(ce_coeff)  # (n, V) c * softmax, reuses z
                grad.scatter_add_(1, target, torch.full_like(target, -ce_coeff, dtype=cdtype))
                consume(idx, grad)
            continue
        kd, grad = _kd_chunk(z, lse, ce, idx, target, logits_of, teacher, s, num_rows, vocab_size, ce_coeff, denom)
        kd_sum += kd.sum()
        total += s.kd_weight * kd.sum()
        if grad is not None:
            consume(idx, grad)
    return total / denom, ce_sum / denom, kd_sum / denom


def _kd_chunk(z, lse, ce, idx, target, logits_of, teacher: TeacherTensors, s: ChunkSettings, num_rows: int,
              vocab_size: int, ce_coeff: float, denom: int):
    """One chunk's KD term (n,) and, if asked, its total gradient (n, V) (reusing z's storage)."""
    cdtype = z.dtype
    ids = teacher.topk_ids.index_select(0, idx)  # (n, K) int64
    top = z.gather(1, ids) - lse[:, None]  # (n, K) student log-probs at the teacher's ids
    p = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, reuses z
    p_ids = p.gather(1, ids)  # (n, K)
    p.scatter_(1, ids, 0.0)  # the softmax outside the ids
    named = torch.full_like(lse, ids.shape[1])  # (n,) tokens with their own bucket
    with_target = teacher.target_logprob is not None
    if with_target:  # the actual next token gets its own bucket where it is not an id
        tlp = teacher.target_logprob.index_select(0, idx)  # (n,)
        outside = target_not_in_ids(ids, target[:, 0], tlp <= 0)  # (n,) sentinel +1.0 = unknown
        p_tgt = torch.where(outside, p.gather(1, target)[:, 0], 0.0)  # (n,)
        p.scatter_(1, target, torch.where(outside[:, None], 0.0, p.gather(1, target)))
        named += outside
    rest = p.sum(-1)  # (n,) exactly 0 when every token has its own bucket (K = V)
    rest_lse = rest.log()  # (n,) -inf then
    t_top, t_tail = teacher.topk_logprobs.index_select(0, idx), teacher.tail_logprob.index_select(0, idx)
    if with_target:
        t = teacher_bucket_logprobs(t_top, t_tail, tlp, outside, vocab_size=vocab_size)  # (n, K+2)
    else:
        t = teacher_bucket_logprobs(t_top, t_tail, vocab_size=vocab_size)  # (n, K+1)
    empty = t[:, 0].isnan()  # (n,) rows without any teacher mass: every entry NaN after normalizing
    low = (rest < REST_EXACT_BELOW) & (named < vocab_size)  # (n,) rows for the exact rest
    any_empty, any_low = torch.stack([empty.any(), low.any()]).tolist()  # the chunk's one host sync
    if any_empty:
        raise EmptyTeacherRowError(int(idx[empty.nonzero()[0, 0]]), num_rows)
    exact = None
    if any_low:
        low = low.nonzero().squeeze(1)  # (m,)
        z_low = logits_of(idx[low]).scatter(1, ids[low], -math.inf)  # (m, V)
        if with_target:
            z_low = torch.where(outside[low, None] & (torch.arange(vocab_size, device=z_low.device) == target[low]),
                                -math.inf, z_low)
        low_lse = torch.logsumexp(z_low, dim=-1)  # (m,)
        rest_lse[low] = low_lse - lse[low]
        exact = (low, z_low.sub_(low_lse[:, None]).exp_())  # softmax over the rest, (m, V)
    if with_target:
        own = torch.where(outside, -ce, -math.inf)  # (n,) student log-prob of the target
        s_buckets = torch.cat([top, own[:, None], rest_lse[:, None]], dim=1)  # (n, K+2)
    else:
        s_buckets = torch.cat([top, rest_lse[:, None]], dim=1)  # (n, K+1)
    t_temp = F.log_softmax(t.to(cdtype) / s.temperature, dim=-1)  # (n, K+1) or (n, K+2)
    g_buckets = None
    with torch.enable_grad():
        s_buckets = s_buckets.detach().requires_grad_(s.compute_grad and s.kd_weight > 0)
        kd = divergence(t_temp, F.log_softmax(s_buckets / s.temperature, dim=-1), s.loss, s.beta, s.skew)  # (n,)
        if s_buckets.requires_grad:
            (g_buckets,) = torch.autograd.grad(kd.sum() * (s.kd_weight / denom), s_buckets)  # like s_buckets
    kd = kd.detach()
    if not s.compute_grad:
        return kd, None
    if g_buckets is None:
        g_buckets = torch.zeros_like(s_buckets)
    g_top, g_tail = g_buckets[:, : ids.shape[1]], g_buckets[:, -1]  # (n, K), (n,)
    keep = ce_coeff - g_buckets.sum(-1)  # (n,) c - G
    per_rest = torch.where(rest >= REST_EXACT_BELOW, g_tail / rest.clamp_min(REST_EXACT_BELOW), 0.0)
    grad = p.mul_((keep + per_rest)[:, None])  # (n, V), reuses p
    if exact is not None:
        low, softmax_rest = exact
        grad[low] += softmax_rest * g_tail[low, None]
    grad.scatter_(1, ids, p_ids * keep[:, None] + g_top)
    if with_target:  # the target's own bucket; grad there is 0 so far on those rows
        own_grad = torch.where(outside, p_tgt * keep + g_buckets[:, -2], 0.0)  # (n,)
        grad.scatter_add_(1, target, own_grad[:, None])
    grad.scatter_add_(1, target, torch.full_like(target, -ce_coeff, dtype=cdtype))
    return kd, grad


class FusedSparseKD(torch.autograd.Function):
    """(N, V) logits -> (loss, CE mean, KD mean); backward scales the one saved logits-sized gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher, target_ids, rows, settings):
        cdtype = compute_dtype(student_logits.dtype)
        grad_buffer = torch.zeros_like(student_logits) if settings.compute_grad else None  # (N, V), logits dtype

        def logits_of(idx):
            return student_logits.index_select(0, idx).to(cdtype)  # (n, V) a fresh copy

        def consume(idx, grad):
            grad_buffer.index_copy_(0, idx, grad.to(grad_buffer.dtype))

        total, ce, kd = fused_chunks(rows, logits_of, consume, teacher, target_ids, settings,
                                     num_rows=student_logits.shape[0], vocab_size=student_logits.shape[1],
                                     cdtype=cdtype, device=student_logits.device)
        if settings.compute_grad:
            ctx.save_for_backward(grad_buffer)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        (grad_buffer,) = ctx.saved_tensors
        # In place: no second logits-sized tensor. The saved-tensor version check makes a second backward
        # through the same graph (retain_graph=True) fail loudly instead of scaling twice.
        grad_buffer.mul_(grad_loss.to(grad_buffer.dtype))
        return grad_buffer, None, None, None, None


class FusedLinearKD(torch.autograd.Function):
    """(N, H) hidden states and the (V', H) head weight -> (loss, CE mean, KD mean), logits chunk by chunk.

    Only the first num_ids rows of the weight make logits (a padded head's extra rows get a zero gradient).
    matmul_dtype: the dtype of the head's matmul (bf16 under --bf16, as autocast would run nn.Linear); the
    loss itself is computed in float32 (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher, target_ids, rows, settings, num_ids, matmul_dtype):
        cdtype = compute_dtype(matmul_dtype)
        head = weight[:num_ids].to(matmul_dtype)  # (V, H)
        grad_hidden = torch.zeros_like(hidden) if settings.compute_grad else None  # (N, H)
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # the head's gradient, summed over chunks
        grad_weight = None  # (V', H), made by the first chunk (no zero-fill pass over the head when V = V')

        def inputs_of(idx):
            return hidden.index_select(0, idx).to(matmul_dtype)  # (n, H)

        def logits_of(idx):
            return (inputs_of(idx) @ head.T).to(cdtype)  # (n, V), a fresh tensor

        def consume(idx, grad):
            nonlocal grad_weight
            g = grad.to(matmul_dtype)  # (n, V)
            grad_hidden.index_copy_(0, idx, (g @ head).to(grad_hidden.dtype))  # (n, H)
            if grad_weight is None and num_ids == weight.shape[0]:
                grad_weight = (g.T @ inputs_of(idx)).to(accumulate)  # (V, H)
                return
            if grad_weight is None:
                grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
            if matmul_dtype == accumulate:
                grad_weight[:num_ids].addmm_(g.T, inputs_of(idx))  # in place, no (V, H) temporary
            else:
                grad_weight[:num_ids] += (g.T @ inputs_of(idx)).to(accumulate)

        total, ce, kd = fused_chunks(rows, logits_of, consume, teacher, target_ids, settings,
                                     num_rows=hidden.shape[0], vocab_size=num_ids, cdtype=cdtype, device=hidden.device)
        if settings.compute_grad:
            if grad_weight is None:  # no row masked in
                grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        # A pass over the (V', H) head gradient is skipped when the incoming gradient is 1 (the usual case); on
        # CUDA that test would cost a host synchronization, so there the multiply always runs.
        if grad_loss.device.type == "cuda" or float(grad_loss) != 1.0:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None, None, None
