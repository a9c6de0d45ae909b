"""A student as the draft model of its teacher in speculative decoding: the expected acceptance rate.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) accepts a token x drafted from the student q
with probability min(1, p(x) / q(x)) under the teacher p, so the acceptance rate at one position is
alpha = sum_x min(p(x), q(x)) = 1 - TVD(p, q). With the mean alpha over positions and draft length gamma, the
expected number of tokens per teacher forward is (1 - alpha^(gamma + 1)) / (1 - alpha) (their eq. 1, which
assumes the acceptances of successive positions are independent with mean alpha).

Two sources of p:
- a teacher cache row (top-K ids, their log-probs, the tail mass, optionally the real next token's log-prob):
  the sum over the named tokens is exact; the tokens outside them add between 0 and
  min(tail_teacher, tail_student). `acceptance_from_cache` returns both bounds; the reported point value is
  the lower bound (docs/evaluation.md, "Acceptance").
- the teacher's full logits (`acceptance_dense`), exact.

Pure tensor functions first, then `acceptance_metric`, which runs models over a cache's held-out sequences
and over continuations the teacher samples. Knows tensors, models' forward/generate and the cache's row
fields (as arrays); not the storage format, data sets or the training loop.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from trainer.divergences import (
    EmptyTeacherRowError,
    student_bucket_logprobs,
    target_not_in_ids,
    teacher_bucket_logprobs,
)
from trainer.errors import EvalError

GAMMAS = tuple(range(1, 9))  # draft lengths reported

# ---------------------------------------------------------------------------------------------
# Pure functions


def acceptance_dense(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """alpha per row: sum_x min(p_teacher(x), p_student(x)), both softmax over V.

    teacher_logits, student_logits: (N, V) over the same token ids (entries may be -inf). Returns (N,) in
    the promoted dtype (at least float32).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape (N, V) over the same token ids")
    dtype = torch.promote_types(torch.promote_types(teacher_logits.dtype, student_logits.dtype), torch.float32)
    p = torch.softmax(teacher_logits.to(dtype), dim=-1)  # (N, V)
    q = torch.softmax(student_logits.to(dtype), dim=-1)  # (N, V)
    return torch.minimum(p, q).sum(-1)


def acceptance_from_cache(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                          tail_logprob: torch.Tensor, target_ids: torch.Tensor | None = None,
                          target_logprob: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds on alpha per row from a cache row and the student's full logits.

    student_logits: (N, V). topk_ids: (N, K) distinct ids < V; topk_logprobs: (N, K) the teacher's raw log-probs;
    tail_logprob: (N,) log of its mass outside the K ids. target_ids: (N,) the real next tokens and
    target_logprob: (N,) the teacher's log-prob of each (the cache's +1.0 means unknown), both or neither: the
    target then has its own bucket where it is not among the K ids (docs/losses.md, K + 2 outcomes).
    The teacher's buckets are renormalized and its rest is empty where the named ids cover all V
    (trainer.divergences.teacher_bucket_logprobs, the rule of the losses and eval_kl).
    lower = sum over the named tokens of min(p, q), exact for them; upper = lower + min(P_rest, Q_rest), since
    sum_{x in rest} min(p(x), q(x)) <= min(sum p, sum q). Equal when K = V. Returns two (N,) tensors.
    """
    target_lp = outside = None
    if (target_ids is None) != (target_logprob is None):
        raise ValueError("pass target_ids and target_logprob together (the target bucket needs both), or neither")
    if target_ids is not None:
        known = target_logprob <= 0  # (N,) the cache's +1.0 sentinel: unknown
        outside = target_not_in_ids(topk_ids.long(), target_ids.long(), known)  # (N,)
        target_lp = target_logprob
    student = student_bucket_logprobs(student_logits, topk_ids, target_ids, None if target_ids is None else known)
    teacher = teacher_bucket_logprobs(topk_logprobs, tail_logprob, target_lp, outside,
                                      vocab_size=student_logits.shape[-1])  # (N, K+1) or (N, K+2)
    bad = torch.isnan(teacher).any(-1)
    if bool(bad.any()):
        raise EmptyTeacherRowError(int(bad.nonzero()[0, 0]), teacher.shape[0])
    both = torch.minimum(teacher.exp(), student.to(teacher.dtype).exp())  # (N, K+1|K+2)
    lower = both[:, :-1].sum(-1)  # (N,) the named tokens, one each
    return lower, lower + both[:, -1]


def tokens_per_teacher_forward(alpha: float, gamma: int) -> float:
    """Expected tokens per teacher forward with draft length gamma: (1 - alpha^(gamma+1)) / (1 - alpha), written
    as 1 + alpha + ... + alpha^gamma (the same value, also at alpha = 1: gamma + 1)."""
    return float(sum(alpha ** j for j in range(gamma + 1)))


def acceptance_summary(alpha: torch.Tensor, mask: torch.Tensor | None = None, gammas=GAMMAS) -> dict:
    """Mean alpha over the rows of `alpha` (N,) where `mask` (N,) bool is True, and the expected tokens per teacher
    forward for each gamma from that mean (Leviathan et al.'s formula takes the mean alpha). No rows: None."""
    values = alpha if mask is None else alpha[mask]
    count = int(values.numel())
    mean = float(values.double().mean()) if count else None
    return {"alpha": mean, "num_tokens": count,
            "tokens_per_teacher_forward": {str(g): (tokens_per_teacher_forward(mean, g) if count else None)
                                           for g in gammas}}


# ---------------------------------------------------------------------------------------------
# Models over cache sequences and teacher continuations


def _columns(logits: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(..., V') -> (..., num_ids): a model's padded rows beyond the cache's ids cut off (the trainer's
    token_logits rule); ids it has no row for get probability 0 (-inf)."""
    if logits.shape[-1] >= num_ids:
        return logits[..., :num_ids]
    return torch.nn.functional.pad(logits, (0, num_ids - logits.shape[-1]), value=-math.inf)


def _batched_logits(model, sequences: list[np.ndarray], num_ids: int, batch_size: int):
    """Yield (index, (n, num_ids) float32 logits) for each id sequence, batches right-padded."""
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            attn[r, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float().cpu()  # (B, L, V')
        for r, s in enumerate(batch):
            yield start + r, _columns(logits[r, :len(s)], num_ids)


def continuation_prompt_length(loss_mask: np.ndarray) -> int:
    """Where a teacher continuation starts in a cache sequence of n tokens: after the prompt (the token after the
    first loss row) on prompt/response data; halfway on plain text, where every row is a loss row."""
    first = int(np.argmax(loss_mask)) if loss_mask.any() else 0
    return first + 1 if first > 0 else max(1, len(loss_mask) // 2)


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


@torch.no_grad()
def teacher_continuations(teacher, sequences: list[dict], *, seed: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """(prompt + continuation ids, prompt length) per cache sequence: the teacher samples at temperature 1 (top-k 0,
    top-p 1: its own distribution, the one speculative sampling targets) as many tokens as the sequence has after
    the prompt (continuation_prompt_length), stopping after an end-of-sequence token. Seeded: the same seed gives
    the same continuations on the same machine."""
    eos = _eos_ids(teacher)
    pad = min(eos) if eos else 0
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        prompts = [s["input_ids"][:continuation_prompt_length(s["loss_mask"])].astype(np.int64) for s in batch]
        lengths = [len(s["input_ids"]) - len(p) for s, p in zip(batch, prompts)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left-padded, as generate expects
            ids[r, width - len(p):] = torch.as_tensor(p)
            attn[r, width - len(p):] = 1
        generated = teacher.generate(ids.to(device), attention_mask=attn.to(device), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=max(1, max(lengths)), pad_token_id=pad,
                                     eos_token_id=sorted(eos) or None)[:, width:].cpu().numpy()  # (B, <= max new)
        for p, n, row in zip(prompts, lengths, generated):
            row = row[:max(1, n)]
            stops = [i for i, t in enumerate(row) if int(t) in eos]
            if stops:
                row = row[:stops[0] + 1]
            out.append((np.concatenate([p, row]), len(p)))
    return out


@torch.no_grad()
def acceptance_metric(model, sequences: list[dict], num_ids: int, *, teacher=None, seed: int = 0,
                      batch_size: int = 8) -> dict:
    """`kdtrain eval --metrics acceptance`: the model as a draft for the teacher, on cache sequences.

    sequences: cache sequences (dicts of input_ids, loss_mask, topk_ids, topk_logprobs, tail_logprob,
    target_logprob arrays, as CacheReader reads them); num_ids: the cache's token ids (cache_token_ids).
    Always: bounds from the cache on the loss rows. With `teacher` (a model): the exact alpha from its logits on
    the same rows, and on continuations it samples (teacher_continuations). `alpha` is the exact held-out value
    when there is a teacher, else the cache's lower bound. Per sequence with loss rows, in order: sequence_alpha
    (the summed alpha `alpha` is the mean of) and sequence_tokens, so a report can bootstrap over sequences.
    """
    if not sequences:
        raise EvalError("acceptance: no cache sequences to measure on (an empty held-out set? a larger "
                        "{eval_fraction}, or --all-rows)")
    lower, upper, exact = [], [], []
    ids = [s["input_ids"] for s in sequences]
    students = _batched_logits(model, ids, num_ids, batch_size)
    teachers = _batched_logits(teacher, ids, num_ids, batch_size) if teacher is not None else itertools.repeat(None)
    for (i, student_logits), teacher_item in zip(students, teachers):  # one batch of logits held at a time
        s, n = sequences[i], len(ids[i])
        mask = torch.as_tensor(s["loss_mask"].astype(bool))[: n - 1]  # (n-1,) row t predicts token t+1
        if not mask.any():
            continue
        rows = student_logits[: n - 1][mask]  # (M, V)
        field = {k: torch.as_tensor(s[k][: n - 1][mask.numpy()]) for k in
                 ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprob")}
        targets = torch.as_tensor(ids[i][1:].astype(np.int64))[mask]  # (M,)
        lo, up = acceptance_from_cache(rows, field["topk_ids"].long(), field["topk_logprobs"].float(),
                                       field["tail_logprob"].float(), targets, field["target_logprob"].float())
        lower.append(lo)
        upper.append(up)
        if teacher_item is not None:
            exact.append(acceptance_dense(teacher_item[1][: n - 1][mask], rows))
    if not lower:
        raise EvalError("acceptance: the selected cache sequences have no loss rows")
    cache_lower, cache_upper = acceptance_summary(torch.cat(lower)), acceptance_summary(torch.cat(upper))
    reported = exact if teacher is not None else lower  # what `alpha` is the mean of
    out = {"alpha": cache_lower["alpha"], "alpha_source": "cache lower bound",
           "alpha_cache_lower": cache_lower["alpha"], "alpha_cache_upper": cache_upper["alpha"],
           "tokens_per_teacher_forward": cache_lower["tokens_per_teacher_forward"],
           "tokens_per_teacher_forward_cache_upper": cache_upper["tokens_per_teacher_forward"],
           "num_tokens": cache_lower["num_tokens"], **_per_sequence(reported)}
    if teacher is not None:
        heldout = acceptance_summary(torch.cat(exact))
        out.update(alpha=heldout["alpha"], alpha_source="teacher logits", alpha_exact=heldout["alpha"],
                   tokens_per_teacher_forward=heldout["tokens_per_teacher_forward"])
        out["teacher_continuations"] = _continuation_acceptance(model, teacher, sequences, num_ids, seed, batch_size)
        out["alpha_teacher_continuations"] = out["teacher_continuations"]["alpha"]
    return out


def _continuation_acceptance(model, teacher, sequences: list[dict], num_ids: int, seed: int, batch_size: int) -> dict:
    """acceptance_summary of the exact alpha on the rows that predict the teacher's sampled tokens."""
    continued = teacher_continuations(teacher, sequences, seed=seed, batch_size=batch_size)
    ids = [c for c, _ in continued]
    alphas = []
    for (i, student_logits), (_, teacher_logits) in zip(_batched_logits(model, ids, num_ids, batch_size),
                                                          _batched_logits(teacher, ids, num_ids, batch_size)):
        start, end = continued[i][1] - 1, len(ids[i]) - 1  # rows predicting the generated tokens
        alphas.append(acceptance_dense(teacher_logits[start:end], student_logits[start:end]))
    summary = acceptance_summary(torch.cat(alphas))
    return {**summary, "seed": seed, "num_sequences": len(continued), **_per_sequence(alphas)}


def _per_sequence(alphas: list[torch.Tensor]) -> dict:
    """sequence_alpha (summed alpha) and sequence_tokens (rows) of each sequence's (M,) alpha tensor, in order."""
    return {"sequence_alpha": [float(a.double().sum()) for a in alphas],
            "sequence_tokens": [int(a.numel()) for a in alphas]}
