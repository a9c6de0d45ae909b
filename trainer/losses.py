"""Knowledge-distillation losses over a cached sparse teacher: pure functions of tensors.

The cache holds, for every token, the teacher's top-K token ids, their raw (temperature 1) log-probs
and `tail_logprob`, the log of the probability mass outside those K ids. Every KD loss here is a true
divergence between two distributions over K + 1 outcomes: the K cached ids plus one "rest" bucket.
With K = V (and an empty rest bucket) the sparse losses equal the dense ones exactly, at any
temperature. The math, the -inf conventions and the temperature design are in docs/losses.md.

`sparse_kd_loss` is the entry point the trainer calls. It is a chunked fused loss (like Liger's fused
losses and torchtune's chunked KD loss): the forward pass walks the masked tokens in chunks, computes
each chunk's loss and its gradient with respect to that chunk's logits, writes the gradient into one
preallocated buffer shaped like the logits and returns the scalar; backward only scales that buffer.
Nothing larger than the student's logits is ever held; per-chunk temporaries are (chunk_tokens, V).

This module knows tensors and the cache's per-token fields. It must not know about models, tokenizers,
the storage format, data loading or the training loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ce")

# A teacher probability below float32's smallest normal number (e^-87.3) counts as that number in the
# reverse-KL log-ratio, so that an outcome the teacher rules out (log-prob -inf) costs a large but finite
# amount instead of +inf. No other divergence needs a floor: their second argument is a mixture that is
# positive wherever the first argument is.
TEACHER_LOGPROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)

# Below this student mass outside the teacher's K ids, the fused loss computes the rest bucket by an
# exact logsumexp over the other logits instead of summing softmax terms, which float32 may have
# rounded to subnormals or to 0 (docs/losses.md, "The fused loss").
REST_EXACT_BELOW = 1e-30


# ----------------------------------------------------------------------------------------------------
# Divergences between log-distributions (pure, any number of outcomes M)


def _kl(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row with the 0 * log 0 = 0 convention, finite gradients where a == 0.

    a_logp, b_logp: (N, M) log-probabilities (entries may be -inf). Returns (N,).
    Where a > 0 and b == 0 the value is +inf (a true infinite divergence); callers avoid that case.
    """
    a_support = a_logp > -math.inf
    # where() before the product, not after: 0 * (-inf - x) would be NaN in forward or in backward.
    log_ratio = torch.where(a_support, a_logp - b_logp, 0.0)
    return (a_logp.exp() * log_ratio).sum(-1)


def _log_mix(weight: float, a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), elementwise; -inf where a == b == 0, with finite gradients.

    a_logp, b_logp: (N, M) log-probabilities. weight in [0, 1]. Returns (N, M).
    """
    both_zero = (a_logp == -math.inf) & (b_logp == -math.inf)
    # logaddexp(-inf, -inf) has a NaN gradient; feed it zeros there and put the -inf back afterwards.
    a_safe = torch.where(both_zero, 0.0, a_logp)
    b_safe = torch.where(both_zero, 0.0, b_logp)
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1mw = math.log1p(-weight) if weight < 1 else -math.inf
    mixed = torch.logaddexp(a_safe + log_w, b_safe + log_1mw)
    return torch.where(both_zero, -math.inf, mixed)


def _fkl(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return _kl(p, q)


def _rkl(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return _kl(q, p.clamp(min=TEACHER_LOGPROB_FLOOR))


def _jsd(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    m = _log_mix(beta, p, q)
    return beta * _kl(p, m) + (1.0 - beta) * _kl(q, m)


def _skl(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return _kl(p, _log_mix(skew, p, q))


def _srkl(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return _kl(q, _log_mix(skew, q, p))


def _tvd(p: torch.Tensor, q: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return 0.5 * (p.exp() - q.exp()).abs().sum(-1)


_DIVERGENCES = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "skl": _skl, "srkl": _srkl, "tvd": _tvd}


def divergence(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, loss: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-row divergence D(teacher p, student q) between two log-distributions over the same outcomes.

    teacher_logp, student_logp: (N, M) normalized log-probabilities; -inf means probability 0.
    loss: one of "fkl", "rkl", "jsd", "skl", "srkl", "tvd" (see docs/losses.md for each formula).
    beta: JSD mixture weight on the teacher, in (0, 1). skew: DistiLLM skew alpha, in [0, 1).
    Returns (N,) in the inputs' dtype. Used for both the K + 1 sparse buckets and dense references.
    """
    if loss not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {loss!r}: expected one of {sorted(_DIVERGENCES)}")
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp {tuple(teacher_logp.shape)} and student_logp {tuple(student_logp.shape)} "
            "must have the same shape (N, M)"
        )
    _check_beta_skew(loss, beta, skew)
    return _DIVERGENCES[loss](teacher_logp, student_logp, beta, skew)


# ----------------------------------------------------------------------------------------------------
# The buckets: K ids, optionally the actual next token, and the rest


def _target_outside(ids: torch.Tensor, target_ids: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: the row's actual next token is not among its K ids (and, if given, its log-prob is known)."""
    outside = ~(ids == target_ids[:, None]).any(-1)
    return outside if known is None else outside & known


def student_bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                            target_ids: torch.Tensor | None = None,
                            target_known: torch.Tensor | None = None) -> torch.Tensor:
    """The student's log-distribution over the teacher's K ids, [the actual next token,] and the rest.

    student_logits: (N, V) float. topk_ids: (N, K) integer, distinct per row.
    target_ids: (N,) integer actual next tokens, or None. target_known: (N,) bool rows whose teacher
    target log-prob is known (None: all).
    Returns (N, K+1) without target_ids: log_softmax(logits) at topk_ids, then the log of the mass outside
    them. With target_ids, (N, K+2): the K ids, the target's own bucket (-inf, i.e. empty, on rows where
    the target is one of the ids or not known), then the rest without it.
    Plain autograd (the reference the fused loss is tested against); finite gradients when a bucket is
    empty, e.g. the rest when K = V.
    """
    z, ids = student_logits, topk_ids.long()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
    top = z.gather(1, ids) - lse  # (N, K)
    # The rest is a logsumexp over the other logits, not log(1 - sum(top)): stable when the named
    # buckets hold almost all the mass, and exactly -inf (not rounding noise) when nothing is left.
    z_rest = z.scatter(1, ids, -math.inf)  # (N, V)
    if target_ids is None:
        return torch.cat([top, torch.logsumexp(z_rest, dim=-1, keepdim=True) - lse], dim=1)
    target = target_ids.long()[:, None]  # (N, 1)
    outside = _target_outside(ids, target_ids.long(), target_known)[:, None]  # (N, 1)
    own = torch.where(outside, z.gather(1, target) - lse, -math.inf)  # (N, 1)
    z_rest = torch.where(outside & (torch.arange(z.shape[1], device=z.device) == target), -math.inf, z_rest)
    return torch.cat([top, own, torch.logsumexp(z_rest, dim=-1, keepdim=True) - lse], dim=1)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) elementwise; -inf where b >= a (nothing left, or rounding said so)."""
    safe = b < a
    diff = torch.where(safe, b - a, -1.0)
    return torch.where(safe, a + torch.log1p(-torch.exp(diff)), -math.inf)


def teacher_bucket_logprobs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
                            target_logprob: torch.Tensor | None = None,
                            target_outside: torch.Tensor | None = None, *,
                            vocab_size: int | None = None) -> torch.Tensor:
    """The teacher's cached log-distribution over K + 1 (or K + 2) buckets, renormalized to sum to 1.

    topk_logprobs: (N, K) float16/32 raw (T = 1) log-probs. tail_logprob: (N,) log of the mass outside.
    target_logprob: (N,) the teacher's log-prob of the actual next token, and target_outside: (N,) bool rows
    where that token is not among the K ids (see student_bucket_logprobs); both or neither.
    vocab_size: V, the width of the student's logits. On rows whose named buckets cover all V ids (K = V,
    or K = V - 1 and the target outside the ids) the rest bucket is empty, as the student's is: its true
    mass is 0 and a stored remainder is float rounding noise, which would make forward KL infinite against
    the student's empty bucket. Pass it wherever the student's buckets are built from V logits; None
    trusts the stored tail.
    Returns (N, K+1): the K log-probs and the tail; or (N, K+2): the K log-probs, the target's own bucket
    (target_logprob where target_outside, else -inf) and the tail less the target's mass. In float32
    (float64 if an input is float64). float16 storage makes the stored buckets sum to 1 only to about
    1e-3; renormalizing makes every divergence a true one. A row whose entries are all -inf (no mass) comes
    out NaN; sparse_kd_loss refuses such rows (EmptyTeacherRowError).
    """
    dtype = torch.promote_types(torch.promote_types(topk_logprobs.dtype, tail_logprob.dtype), torch.float32)
    buckets = [topk_logprobs.to(dtype)]  # (N, K)
    rest = tail_logprob.to(dtype)  # (N,)
    num_named = torch.full_like(rest, topk_logprobs.shape[1], dtype=torch.long)  # (N,) ids with their own bucket
    if target_logprob is not None:
        own = torch.where(target_outside, target_logprob.to(dtype), -math.inf)  # (N,)
        rest = torch.where(target_outside, _log_sub_exp(rest, own), rest)  # (N,) the rest without the target
        num_named = num_named + target_outside.long()
        buckets.append(own[:, None])
    if vocab_size is not None:
        rest = torch.where(num_named >= vocab_size, -math.inf, rest)  # nothing is left outside the named ids
    t = torch.cat([*buckets, rest[:, None]], dim=1)  # (N, K+1) or (N, K+2)
    return t - torch.logsumexp(t, dim=-1, keepdim=True)


class EmptyTeacherRowError(ValueError):
    """A masked-in row whose teacher buckets hold no probability (every entry -inf, or NaN).

    `row` is its index among the N rows given to sparse_kd_loss, so a caller can name the cache row.
    """

    def __init__(self, row: int, num_rows: int):
        self.row = row
        super().__init__(
            f"row {row} of {num_rows}: the teacher's stored log-probs hold no probability (the top-K entries and "
            "tail_logprob are all -inf, or NaN), so no divergence is defined there; a cache writer must never "
            "store such a row: rebuild the cache (or the shard holding it)"
        )


# ----------------------------------------------------------------------------------------------------
# Argument checks


def _check_options(loss: str, alpha: float, temperature: float, beta: float, skew: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: expected one of {', '.join(LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]: it weighs CE against KD (alpha * CE + ...)")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a finite number > 0 (1.0 means no tempering)")
    _check_beta_skew(loss, beta, skew)


def _check_beta_skew(loss: str, beta: float, skew: float) -> None:
    if loss == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta={beta} must be in (0, 1) for jsd: at 0 or 1 the JSD is identically 0; "
            "use loss='fkl' or 'rkl' for TRL's beta=0 / beta=1 special cases"
        )
    if loss in ("skl", "srkl") and not 0.0 <= skew < 1.0:
        raise ValueError(
            f"skew={skew} must be in [0, 1) for {loss}: at 1 the skew divergence is identically 0"
        )


def _check_common(student_logits, target_ids, loss_mask, what="student_logits"):
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"{what} must be a float tensor of shape (N, V); got {tuple(student_logits.shape)} "
            f"{student_logits.dtype} (flatten batch and time first: logits.view(-1, V))"
        )
    num_tokens = student_logits.shape[0]
    if target_ids.shape != (num_tokens,):
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must be (N,) to match {what} "
                         f"{tuple(student_logits.shape)}")
    if loss_mask.shape != (num_tokens,):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must be (N,) to match {what} "
                         f"{tuple(student_logits.shape)}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}; pass loss_mask.bool()")


def _check_targets(target_ids: torch.Tensor, vocab_size: int) -> None:
    """target_ids: (n,) targets of the masked tokens only."""
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab_size)).any()):
        raise ValueError(
            f"target_ids under loss_mask must be in [0, {vocab_size}); ignored targets (-100) are only "
            "allowed where loss_mask is False"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(loss: str, alpha: float, temperature: float) -> tuple[float, float]:
    """(CE weight, KD weight) per token: alpha and (1 - alpha) * T^2; 'ce' is CE alone."""
    if loss == "ce":
        return 1.0, 0.0
    return alpha, (1.0 - alpha) * temperature**2


# ----------------------------------------------------------------------------------------------------
# Sparse KD: the chunked fused loss


class _FusedSparseKD(torch.autograd.Function):
    """Forward computes the loss and d(loss)/d(logits) chunk by chunk; backward scales the saved gradient.

    One (n, V) temporary per chunk: the chunk's logits are copied once, turned into the softmax in
    place, and that same tensor becomes the gradient. The rest bucket comes from the softmax too:

        p = exp(z - lse);  p_ids = p[ids];  p[ids] = 0;  rest = sum(p)     (a sum of positive terms)
        d loss / d z_j = p_j (c - G + g_tail / rest)   outside the ids
                       = p_j (c - G) + g_k             at id_k;   and - c at the target
    with c the CE weight per token, g = d loss / d buckets and G = sum(g). Rows whose rest mass is below
    REST_EXACT_BELOW (a student all but certain of the teacher's K ids) take the exact logsumexp over the
    other logits instead, so neither the loss nor the gradient loses precision to underflow.
    """

    @staticmethod
    def forward(ctx, student_logits, topk_ids, topk_logprobs, tail_logprob, target_ids, target_logprob, rows,
                options):
        loss, temperature, beta, skew, ce_weight, kd_weight, chunk_tokens, compute_grad = options
        cdtype = _compute_dtype(student_logits.dtype)
        vocab_size = student_logits.shape[1]
        denom = max(rows.numel(), 1)
        ce_coeff = ce_weight / denom
        total = torch.zeros((), dtype=cdtype, device=student_logits.device)
        ce_sum = torch.zeros_like(total)
        kd_sum = torch.zeros_like(total)
        grad_buffer = torch.zeros_like(student_logits) if compute_grad else None  # (N, V), logits dtype

        for start in range(0, rows.numel(), chunk_tokens):
            idx = rows[start : start + chunk_tokens]  # (n,) row numbers of masked tokens
            z = student_logits.index_select(0, idx).to(cdtype)  # (n, V) a fresh copy, edited in place below
            target = target_ids.index_select(0, idx)[:, None]  # (n, 1)
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            ce = lse - z.gather(1, target)[:, 0]  # (n,)
            ce_sum += ce.sum()
            total += ce_weight * ce.sum()

            if loss == "ce":
                if compute_grad:
                    grad = z.sub_(lse[:, None]).exp_().mul_(ce_coeff)  # (n, V) c * softmax, reuses z
                    grad.scatter_add_(1, target, torch.full_like(target, -ce_coeff, dtype=cdtype))
                    grad_buffer.index_copy_(0, idx, grad.to(grad_buffer.dtype))
                continue

            ids = topk_ids.index_select(0, idx)  # (n, K) int64
            top = z.gather(1, ids) - lse[:, None]  # (n, K) student log-probs at the teacher's ids
            p = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, reuses z
            p_ids = p.gather(1, ids)  # (n, K)
            p.scatter_(1, ids, 0.0)  # the softmax outside the ids
            named = torch.full_like(lse, ids.shape[1])  # (n,) tokens with their own bucket
            if target_logprob is not None:  # the actual next token gets its own bucket where it is not an id
                tlp = target_logprob.index_select(0, idx)  # (n,)
                outside = _target_outside(ids, target[:, 0], tlp <= 0)  # (n,) sentinel +1.0 = unknown
                p_tgt = torch.where(outside, p.gather(1, target)[:, 0], 0.0)  # (n,)
                p.scatter_(1, target, torch.where(outside[:, None], 0.0, p.gather(1, target)))
                named += outside
            rest = p.sum(-1)  # (n,) exactly 0 when every token has its own bucket (K = V)
            rest_lse = rest.log()  # (n,) -inf then
            exact = None
            low = ((rest < REST_EXACT_BELOW) & (named < vocab_size)).nonzero().squeeze(1)
            if low.numel():
                z_low = student_logits.index_select(0, idx[low]).to(cdtype).scatter(1, ids[low], -math.inf)
                if target_logprob is not None:
                    z_low = torch.where(outside[low, None] & (torch.arange(vocab_size, device=z_low.device)
                                                              == target[low]), -math.inf, z_low)
                low_lse = torch.logsumexp(z_low, dim=-1)  # (m,)
                rest_lse[low] = low_lse - lse[low]
                exact = (low, z_low.sub_(low_lse[:, None]).exp_())  # softmax over the rest, (m, V)
            t_top, t_tail = topk_logprobs.index_select(0, idx), tail_logprob.index_select(0, idx)
            if target_logprob is None:
                s = torch.cat([top, rest_lse[:, None]], dim=1)  # (n, K+1)
                t = teacher_bucket_logprobs(t_top, t_tail, vocab_size=vocab_size)  # (n, K+1)
            else:
                own = torch.where(outside, -ce, -math.inf)  # (n,) student log-prob of the target
                s = torch.cat([top, own[:, None], rest_lse[:, None]], dim=1)  # (n, K+2)
                t = teacher_bucket_logprobs(t_top, t_tail, tlp, outside, vocab_size=vocab_size)  # (n, K+2)
            empty = t[:, 0].isnan()  # (n,) rows without any teacher mass: every entry NaN after normalizing
            if bool(empty.any()):
                raise EmptyTeacherRowError(int(idx[empty.nonzero()[0, 0]]), student_logits.shape[0])
            t_temp = F.log_softmax(t.to(cdtype) / temperature, dim=-1)  # (n, K+1) or (n, K+2)
            g_buckets = None
            with torch.enable_grad():
                s = s.detach().requires_grad_(compute_grad and kd_weight > 0)
                kd = divergence(t_temp, F.log_softmax(s / temperature, dim=-1), loss, beta, skew)  # (n,)
                if s.requires_grad:
                    (g_buckets,) = torch.autograd.grad(kd.sum() * (kd_weight / denom), s)  # like s
            kd = kd.detach()
            kd_sum += kd.sum()
            total += kd_weight * kd.sum()

            if not compute_grad:
                continue
            if g_buckets is None:
                g_buckets = torch.zeros_like(s)
            g_top, g_tail = g_buckets[:, : ids.shape[1]], g_buckets[:, -1]  # (n, K), (n,)
            keep = ce_coeff - g_buckets.sum(-1)  # (n,) c - G
            per_rest = torch.where(rest >= REST_EXACT_BELOW, g_tail / rest.clamp_min(REST_EXACT_BELOW), 0.0)
            grad = p.mul_((keep + per_rest)[:, None])  # (n, V), reuses p
            if exact is not None:
                low, softmax_rest = exact
                grad[low] += softmax_rest * g_tail[low, None]
            grad.scatter_(1, ids, p_ids * keep[:, None] + g_top)
            if target_logprob is not None:  # the target's own bucket; grad there is 0 so far on those rows
                own_grad = torch.where(outside, p_tgt * keep + g_buckets[:, -2], 0.0)  # (n,)
                grad.scatter_add_(1, target, own_grad[:, None])
            grad.scatter_add_(1, target, torch.full_like(target, -ce_coeff, dtype=cdtype))
            grad_buffer.index_copy_(0, idx, grad.to(grad_buffer.dtype))

        if compute_grad:
            ctx.save_for_backward(grad_buffer)
        ce_mean, kd_mean = ce_sum / denom, kd_sum / denom
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return total / denom, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        (grad_buffer,) = ctx.saved_tensors
        # In place: no second logits-sized tensor. The saved-tensor version check makes a second backward
        # through the same graph (retain_graph=True) fail loudly instead of scaling twice.
        grad_buffer.mul_(grad_loss.to(grad_buffer.dtype))
        return grad_buffer, None, None, None, None, None, None, None


def sparse_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss: str = "fkl",
    alpha: float = 0.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_tokens: int = 1024,
    target_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE(next token) + (1 - alpha) * T^2 * KD(teacher buckets, student buckets), masked mean.

    student_logits: (N, V) float32/bf16/float16/float64 logits (flatten batch and time first).
    topk_ids: (N, K) any integer dtype (uint16 included), the teacher's top-K ids, distinct per row.
    topk_logprobs: (N, K) float16/32 raw (T = 1) teacher log-probs; -inf allowed.
    tail_logprob: (N,) float, log of the teacher mass outside topk_ids; -inf allowed. Ignored (taken as
        -inf) on rows whose named buckets cover all V ids (teacher_bucket_logprobs, vocab_size).
    target_ids: (N,) integer real next tokens; any value (e.g. -100) where loss_mask is False.
    loss_mask: (N,) bool, the tokens that count.
    loss: one of LOSSES; "ce" is cross-entropy alone (KD weight 0 whatever alpha is).
    chunk_tokens: masked tokens per chunk; per-chunk temporaries are about one (chunk_tokens, V) float tensor.
    target_logprob: (N,) float, the teacher's log-prob of target_ids (the cache's `target_logprob`), or
        None. When given, a row whose actual next token is not among its K ids splits the rest bucket in
        two: that token's own bucket and everything else (K + 2 outcomes; docs/losses.md). Values > 0
        (the cache's +1.0 sentinel) mean "unknown" and keep K + 1 buckets on that row.

    Returns (loss, stats): loss is a float32 (float64 for float64 logits) scalar, 0 with a zero gradient
    when no token is masked in; stats holds detached "ce" and "kd" (masked means, KD without the T^2
    factor; "kd" is 0 for loss="ce") and "num_tokens".
    Raises EmptyTeacherRowError (a ValueError, with the row's index) when a masked-in row's teacher entries
    are all -inf or NaN: there is no teacher distribution to compare with, and the loss would be NaN.
    """
    _check_options(loss, alpha, temperature, beta, skew)
    _check_common(student_logits, target_ids, loss_mask)
    num_rows, vocab_size = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_rows or topk_ids.is_floating_point():
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} {topk_ids.dtype} must be an integer (N, K) "
                         f"tensor matching student_logits {tuple(student_logits.shape)}")
    num_topk = topk_ids.shape[1]
    if not 1 <= num_topk <= vocab_size:
        raise ValueError(f"topk_ids has K={num_topk} columns; need 1 <= K <= V={vocab_size}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs {tuple(topk_logprobs.shape)} must have the shape of topk_ids "
                         f"{tuple(topk_ids.shape)}")
    if tail_logprob.shape != (num_rows,):
        raise ValueError(f"tail_logprob {tuple(tail_logprob.shape)} must be (N,) to match student_logits "
                         f"{tuple(student_logits.shape)}")
    if target_logprob is not None and (target_logprob.shape != (num_rows,) or not target_logprob.is_floating_point()):
        raise ValueError(f"target_logprob {tuple(target_logprob.shape)} {target_logprob.dtype} must be a float (N,) "
                         f"tensor matching student_logits {tuple(student_logits.shape)}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive int (e.g. 1024)")

    rows = loss_mask.nonzero().squeeze(1)  # (n,) the masked-in tokens; one host sync
    topk_ids = topk_ids.long()  # gather/scatter need int64; (N, K) is small next to (N, V)
    _check_targets(target_ids.index_select(0, rows), vocab_size)
    if loss != "ce":
        used_ids = topk_ids.index_select(0, rows)
        if used_ids.numel() and bool(((used_ids < 0) | (used_ids >= vocab_size)).any()):
            raise ValueError(
                f"topk_ids under loss_mask must be in [0, {vocab_size}) (the student's vocab size)"
            )
    ce_weight, kd_weight = _weights(loss, alpha, temperature)
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    options = (loss, temperature, beta, skew, ce_weight, kd_weight, chunk_tokens, compute_grad)
    total, ce, kd = _FusedSparseKD.apply(
        student_logits, topk_ids, topk_logprobs, tail_logprob, target_ids.long(),
        None if loss == "ce" else target_logprob, rows, options
    )
    stats = {"ce": ce.detach(), "kd": kd.detach(), "num_tokens": loss_mask.sum()}
    return total, stats


def tail_sample_targets(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K exact top-K entries plus M importance-weighted tail draws, as one sparse target.

    topk_ids (N, K) int, topk_logprobs (N, K) float, tail_logprob (N,) float: as in sparse_kd_loss.
    tail_ids (N, M) int, tail_counts (N, M) int/float: the cache's tail samples (storage_layout.md 3.3):
        M draws from the teacher's distribution outside the top K, as distinct ids with counts; a row's
        K + M ids are distinct; a row without draws has counts 0.
    Returns ids (N, K + M) int64, logprobs (N, K + M) and rest (N,) (float32, or float64 when
    topk_logprobs is float64) for sparse_kd_loss:
    a drawn id j gets log(tail mass * count_j / drawn), unused slots -inf; a row with draws has an empty
    rest bucket (-inf), a row without draws keeps tail_logprob as its rest bucket.

    Since E[count_j / M] = p_j / tail mass, each drawn id's weight is an unbiased estimate of the teacher's
    p_j, and forward KL's gradient (student softmax - teacher weights) is linear in the weights: its
    expectation over the draws is the dense forward KL's gradient (tested). For the other divergences it
    is not, which is why the trainer uses tail samples with loss="fkl" only (docs/losses.md).
    """
    if tail_ids.shape != tail_counts.shape or tail_ids.dim() != 2 or tail_ids.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"tail_ids {tuple(tail_ids.shape)} and tail_counts {tuple(tail_counts.shape)} must both be "
                         f"(N, M) with N = {topk_ids.shape[0]} rows like topk_ids")
    dtype = torch.promote_types(topk_logprobs.dtype, torch.float32)
    counts = tail_counts.to(dtype)  # (N, M)
    drawn = counts.sum(-1, keepdim=True)  # (N, 1) M, or 0 on rows without draws
    tail = tail_logprob.to(dtype)  # (N,)
    slot_logprobs = tail.unsqueeze(1) + torch.log(counts) - torch.log(drawn.clamp(min=1.0))  # (N, M); log 0 = -inf
    rest = torch.where(drawn.squeeze(1) > 0, torch.full_like(tail, -math.inf), tail)  # (N,)
    ids = torch.cat([topk_ids.long(), tail_ids.long()], dim=1)  # (N, K + M)
    logprobs = torch.cat([topk_logprobs.to(dtype), slot_logprobs], dim=1)  # (N, K + M)
    return ids, logprobs, rest


# ----------------------------------------------------------------------------------------------------
# Dense references (plain autograd)


def dense_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss: str = "fkl",
    alpha: float = 0.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss as sparse_kd_loss from full teacher logits: softmax(logits / T) on both sides.

    student_logits, teacher_logits: (N, V) float. target_ids: (N,) int. loss_mask: (N,) bool.
    Plain autograd, materializes several (n, V) tensors: a reference and an online-KD baseline.
    Returns (loss scalar, {"ce", "kd", "num_tokens"}) exactly as sparse_kd_loss does.
    """
    _check_options(loss, alpha, temperature, beta, skew)
    _check_common(student_logits, target_ids, loss_mask)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
                         f"{tuple(student_logits.shape)}")
    cdtype = _compute_dtype(student_logits.dtype)
    z = student_logits[loss_mask].to(cdtype)  # (n, V)
    target = target_ids[loss_mask].long()  # (n,)
    _check_targets(target, student_logits.shape[1])
    denom = max(z.shape[0], 1)
    ce = F.cross_entropy(z, target, reduction="sum")
    ce_weight, kd_weight = _weights(loss, alpha, temperature)
    if loss == "ce":
        kd = torch.zeros((), dtype=cdtype, device=z.device)
    else:
        t_temp = F.log_softmax(teacher_logits[loss_mask].to(cdtype) / temperature, dim=-1)  # (n, V)
        kd = divergence(t_temp, F.log_softmax(z / temperature, dim=-1), loss, beta, skew).sum()
    total = (ce_weight * ce + kd_weight * kd) / denom
    stats = {"ce": ce.detach() / denom, "kd": kd.detach() / denom, "num_tokens": loss_mask.sum()}
    return total, stats


def cross_entropy_loss(
    student_logits: torch.Tensor, target_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Plain masked mean cross-entropy of the real next tokens; 0 with a gradient path if none is masked in.

    student_logits: (N, V) float. target_ids: (N,) int. loss_mask: (N,) bool. Returns a float32 scalar
    (float64 for float64 logits).
    """
    _check_common(student_logits, target_ids, loss_mask)
    target = torch.where(loss_mask, target_ids.long(), -100)  # (N,)
    _check_targets(target[loss_mask], student_logits.shape[1])
    logits = student_logits.to(_compute_dtype(student_logits.dtype))
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return ce / loss_mask.sum().clamp(min=1)
