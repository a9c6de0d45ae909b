"""Candidate KD losses for P6 that give the student's tail a shape: pure tensor functions (bench only).

Why (forward KL, exact for any partition of the vocabulary into named ids and rest buckets B_g):

    KL(p || q) = KL over the buckets  +  sum_g P_g * KL(p(. | B_g) || q(. | B_g))

with P_g the teacher's mass of bucket g. trainer.losses.sparse_kd_loss trains the first term only (one
rest bucket, or the rest minus the real next token), so every logit inside a rest bucket moves by the
same factor: the shape of the student's tail gets no signal. The candidates here keep the bucket term
and replace the unknown p(. | B_g) by something a cache can afford:

- a prior over the vocabulary (`prior`, (V,) or per row (N, V)): p(j | B_g) is taken proportional to
  prior_j on the tokens of B_g. The teacher's mean distribution over the cache (one (V,) vector per
  cache), the token frequencies of the data, a uniform prior, or a per-row prior such as the teacher's
  mean distribution given the current input token. With the teacher's own per-row distribution as the
  prior the loss equals dense forward KL exactly (tested), which is how the decomposition is checked.
- the real next token (`tail_target_fill`): on a row whose next token y is in the rest bucket, add
  -log q(y | rest). Its expectation over y ~ p is the missing term's cross-entropy part when the
  teacher is calibrated (E[1{y in R} f(y)] = P_R E_{p(.|R)}[f]), so its weight is 1, not P_R.
- a finer fixed partition of the rest (`groups`: (V,) group of every token, C groups, and the
  teacher's mass of each group outside the named ids, (N, C)): K + C (+ 1) buckets instead of K + 1,
  still a true divergence; the cache would store C extra log-masses per row.

Plain autograd in float64 (no fusing): these are candidates to measure, not the trainer's loss.
Forward KL at temperature 1 only. Knows tensors and the cache's per-token fields; nothing of models,
data loading or the training loop. trainer.losses is the reference the bucket term is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) elementwise; -inf where b >= a."""
    safe = b < a
    diff = torch.where(safe, b - a, -1.0)
    return torch.where(safe, a + torch.log1p(-torch.exp(diff)), -math.inf)


def _group_logsumexp(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """logsumexp of values (n, V) (entries may be -inf) over each group of columns; (n, C), -inf if empty."""
    finite = values > -math.inf
    top = torch.where(finite, values, -math.inf).amax(-1, keepdim=True)  # (n, 1)
    top = torch.where(top > -math.inf, top, 0.0).detach()
    e = torch.where(finite, (values - top).exp(), 0.0)  # (n, V)
    sums = torch.zeros(values.shape[0], num_groups, dtype=values.dtype, device=values.device)
    sums = sums.index_add(1, groups, e)  # (n, C)
    positive = sums > 0
    return torch.where(positive, torch.log(torch.where(positive, sums, 1.0)) + top, -math.inf)


def tail_fill_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    alpha: float = 0.0,
    target_logprob: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    group_logprobs: torch.Tensor | None = None,
    tail_target_fill: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + (1 - alpha) * (KL over the buckets + the rest buckets' inner KL against a fill).

    student_logits: (N, V) float. topk_ids: (N, K) int, distinct per row. topk_logprobs: (N, K) float.
    tail_logprob: (N,) log of the teacher's mass outside topk_ids. target_ids: (N,) int, loss_mask: (N,) bool.
    target_logprob: (N,) the teacher's log-prob of target_ids, or None; given, the real next token gets its
        own bucket where it is not an id (the K + 2 buckets of sparse_kd_loss; values > 0 mean unknown).
    prior: None, (V,) or (N, V) non-negative weights; inside each rest bucket the teacher's distribution is
        taken proportional to it (KL(prior | B_g || q | B_g), weighted by the teacher's mass of B_g).
    groups: (V,) int64 in [0, C), a fixed partition of the rest into C buckets, with group_logprobs (N, C)
        the teacher's log-mass of each group outside topk_ids (their logsumexp is tail_logprob). None: C = 1.
    tail_target_fill: add -log q(y | rest bucket of y) on rows whose real next token y is in a rest
        bucket (weight 1; see the module docstring). Not with target_logprob (y would have its own bucket).
    Returns (loss, stats) like sparse_kd_loss: a float64 scalar (masked mean), stats "ce", "kd" (bucket KL
    plus fill), "fill" (the fill term alone) and "num_tokens".
    """
    if tail_target_fill and target_logprob is not None:
        raise ValueError("tail_target_fill needs K + 1 buckets: pass target_logprob=None")
    if (groups is None) != (group_logprobs is None):
        raise ValueError("groups and group_logprobs go together")
    rows = loss_mask.nonzero().squeeze(1)  # (n,)
    n = max(rows.numel(), 1)
    z = student_logits.index_select(0, rows).double()  # (n, V)
    vocab = z.shape[1]
    ids = topk_ids.index_select(0, rows).long()  # (n, K)
    y = target_ids.index_select(0, rows).long()  # (n,)
    logq = z - torch.logsumexp(z, -1, keepdim=True)  # (n, V)
    ce = -logq.gather(1, y[:, None])[:, 0]  # (n,)

    if groups is None:
        groups = torch.zeros(vocab, dtype=torch.long, device=z.device)
        t_groups = tail_logprob.index_select(0, rows).double()[:, None]  # (n, 1)
    else:
        groups = groups.long().to(z.device)
        t_groups = group_logprobs.index_select(0, rows).double()  # (n, C)
    num_groups = t_groups.shape[1]

    named = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)  # (n, V) tokens with their own bucket
    t_top = topk_logprobs.index_select(0, rows).double()  # (n, K)
    s_top = logq.gather(1, ids)  # (n, K)
    t_cols, s_cols = [t_top], [s_top]
    if target_logprob is not None:
        tlp = target_logprob.index_select(0, rows).double()
        outside = ~(ids == y[:, None]).any(-1) & (tlp <= 0)  # (n,)
        t_own = torch.where(outside, tlp, -math.inf)
        s_own = torch.where(outside, -ce, -math.inf)
        named = named | (outside[:, None] & (torch.arange(vocab, device=z.device) == y[:, None]))
        g_y = groups[y]  # (n,) the group the target leaves
        at_y = F.one_hot(g_y, num_groups).bool() & outside[:, None]  # (n, C)
        t_groups = torch.where(at_y, _log_sub_exp(t_groups, t_own[:, None]), t_groups)
        t_cols.append(t_own[:, None])
        s_cols.append(s_own[:, None])
    s_groups = _group_logsumexp(logq.masked_fill(named, -math.inf), groups, num_groups)  # (n, C)
    t = torch.cat(t_cols + [t_groups], 1)
    t = t - torch.logsumexp(t, -1, keepdim=True)  # renormalized teacher buckets, (n, K [+1] + C)
    s = torch.cat(s_cols + [s_groups], 1)
    support = t > -math.inf
    bucket_kl = (t.exp() * torch.where(support, t - s, 0.0)).sum(-1)  # (n,)

    fill = torch.zeros_like(bucket_kl)
    inner = logq - s_groups.gather(1, groups.expand(z.shape[0], -1))  # (n, V) log q(j | bucket of j)
    if prior is not None:
        prior = prior.index_select(0, rows) if prior.dim() == 2 else prior  # per-row priors: the masked rows
        w = prior.double().to(z.device).expand(z.shape[0], -1).masked_fill(named, 0.0)  # (n, V)
        totals = torch.zeros_like(t_groups).index_add(1, groups, w)  # (n, C)
        w_hat = w / totals.gather(1, groups.expand(z.shape[0], -1)).clamp_min(1e-300)  # prior | bucket, (n, V)
        mass = t[:, -num_groups:].exp().gather(1, groups.expand(z.shape[0], -1))  # (n, V) P_g of j's bucket
        log_w = torch.where(w_hat > 0, w_hat.clamp_min(1e-300).log(), 0.0)
        fill = fill + (mass * w_hat * torch.where(w_hat > 0, log_w - inner, 0.0)).sum(-1)
    if tail_target_fill:
        in_rest = ~named.gather(1, y[:, None])[:, 0]  # (n,)
        fill = fill + torch.where(in_rest, -inner.gather(1, y[:, None])[:, 0], 0.0)
    kd = bucket_kl + fill
    total = (alpha * ce.sum() + (1.0 - alpha) * kd.sum()) / n
    stats = {"ce": ce.detach().sum() / n, "kd": kd.detach().sum() / n, "fill": fill.detach().sum() / n,
             "num_tokens": loss_mask.sum()}
    return total, stats


# ---------------------------------------------------------------------------------------------
# What the fills are made of (from a teacher's full distributions, or from the cache alone)


def vocab_groups(head_weight: torch.Tensor, num_groups: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """A fixed partition of the vocabulary: k-means (cosine) on the teacher's output-embedding rows.

    head_weight: (V, H) float. Returns (V,) int64 group ids in [0, num_groups); every group non-empty.
    Computed once per cache from the teacher's head (the cacher has it).
    """
    x = F.normalize(head_weight.detach().double(), dim=-1)  # (V, H)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(x.shape[0], generator=gen)[:num_groups]].clone()  # (C, H)
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iterations):
        assign = (x @ centers.T).argmax(-1)  # (V,)
        for g in range(num_groups):
            members = x[assign == g]
            if len(members):
                centers[g] = F.normalize(members.mean(0), dim=0)
            else:  # re-seed an empty group with the point farthest from its center
                far = (x * centers[assign]).sum(-1).argmin()
                centers[g] = x[far]
    assign = (x @ centers.T).argmax(-1)
    # relabel to 0..C'-1 in order of first appearance, so every label is used
    _, assign = torch.unique(assign, return_inverse=True)
    return assign


def group_tail_logprobs(teacher_logprobs: torch.Tensor, topk_ids: torch.Tensor, groups: torch.Tensor,
                        num_groups: int) -> torch.Tensor:
    """The teacher's log-mass of each group outside its top-K ids: (N, V), (N, K), (V,) -> (N, C)."""
    masked = teacher_logprobs.double().scatter(1, topk_ids.long(), -math.inf)
    return _group_logsumexp(masked, groups.long(), num_groups)


def cache_unigram(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A (V,) prior from a top-K cache alone: each id's summed top-K probability over the rows, normalized.

    topk_ids, topk_logprobs: (N, K). A token that is in the tail of one row is in the top K of others, so
    this needs no extra storage; tokens never in any top K get 0.
    """
    w = torch.zeros(vocab_size, dtype=torch.float64)
    w.index_add_(0, topk_ids.reshape(-1).long(), topk_logprobs.reshape(-1).double().exp())
    return w / w.sum()


def cache_bigram(input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 vocab_size: int) -> torch.Tensor:
    """A (V, V) prior from a top-K cache alone: row x = the summed top-K probabilities of the rows whose
    current input token is x, normalized; rows of tokens never seen are cache_unigram.

    input_ids: (N,) the token at each row (the row predicts the next one). topk_ids, topk_logprobs: (N, K).
    """
    table = torch.zeros(vocab_size * vocab_size, dtype=torch.float64)
    flat = (input_ids.long()[:, None] * vocab_size + topk_ids.long()).reshape(-1)  # (N*K,) x * V + id
    table.index_add_(0, flat, topk_logprobs.reshape(-1).double().exp())
    table = table.view(vocab_size, vocab_size)
    totals = table.sum(-1, keepdim=True)
    unigram = cache_unigram(topk_ids, topk_logprobs, vocab_size)
    return torch.where(totals > 0, table / totals.clamp_min(1e-300), unigram)

