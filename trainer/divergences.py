"""The math of the sparse KD losses: divergences between log-distributions and the K + 1 (K + 2) buckets.

Pure functions of tensors (shapes in each docstring), used by the chunked fused losses (trainer/fused_loss.py),
the dense references (trainer/losses.py) and the tests. The buckets, the -inf conventions and the
temperature design are in docs/losses.md.

Knows tensors and the cache's per-token fields; nothing about models, chunking, data or training.
"""

from __future__ import annotations

import math

import torch

from shared.errors import KdError

# A teacher probability below float32's smallest normal number (e^-87.3) counts as that number in the
# reverse-KL log-ratio, so that an outcome the teacher rules out (log-prob -inf) costs a large but finite
# amount instead of +inf. No other divergence needs a floor: their second argument is a mixture that is
# positive wherever the first argument is.
TEACHER_LOGPROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)

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
    check_beta_skew(loss, beta, skew)
    return _DIVERGENCES[loss](teacher_logp, student_logp, beta, skew)


def check_beta_skew(loss: str, beta: float, skew: float) -> None:
    """Refuse a JSD beta outside (0, 1) or a skew outside [0, 1) for the losses that use them."""
    if loss == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta={beta} must be in (0, 1) for jsd: at 0 or 1 the JSD is identically 0; "
            "use loss='fkl' or 'rkl' for TRL's beta=0 / beta=1 special cases"
        )
    if loss in ("skl", "srkl") and not 0.0 <= skew < 1.0:
        raise ValueError(
            f"skew={skew} must be in [0, 1) for {loss}: at 1 the skew divergence is identically 0"
        )


# ----------------------------------------------------------------------------------------------------
# The buckets: K ids, optionally the actual next token, and the rest


def target_not_in_ids(ids: torch.Tensor, target_ids: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
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
    outside = target_not_in_ids(ids, target_ids.long(), target_known)[:, None]  # (N, 1)
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


class EmptyTeacherRowError(KdError):
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
