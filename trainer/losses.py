"""Knowledge-distillation losses over a cached sparse teacher: the functions the trainer calls.

The cache holds, for every token, the teacher's top-K token ids, their raw (temperature 1) log-probs
and `tail_logprob`, the log of the probability mass outside those K ids. Every KD loss here is a true
divergence between two distributions over K + 1 outcomes: the K cached ids plus one "rest" bucket
(K + 2 with the target's own bucket). With K = V (and an empty rest bucket) the sparse losses equal the
dense ones exactly, at any temperature. The math, the -inf conventions and the temperature design are in
docs/losses.md; the divergences and buckets in trainer/divergences.py; the chunked kernels in
trainer/fused_loss.py.

- `sparse_kd_loss(student_logits, ...)`: from the student's (N, V) logits; besides them only one
  logits-sized gradient buffer exists.
- `linear_kd_loss(hidden, head_weight, ...)`: from the final hidden states and the LM head's weight; the
  logits are made chunk by chunk and never exist whole (the trainer's path for a plain linear head).
- `dense_kd_loss`, `cross_entropy_loss`: plain-autograd references and baselines.
Every loss takes its settings as one frozen `LossOptions`.

This module knows tensors and the cache's per-token fields. It must not know about models, tokenizers,
the storage format, data loading or the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import LOSSES
from trainer.divergences import check_beta_skew, divergence
from trainer.fused_loss import ChunkSettings, FusedLinearKD, FusedSparseKD, TeacherTensors, compute_dtype


@dataclass(frozen=True)
class LossOptions:
    """What a loss computes: alpha * CE(next token) + (1 - alpha) * T^2 * KD(teacher, student)."""

    loss: str = "fkl"
    """One of LOSSES; "ce" is cross-entropy alone (KD weight 0 whatever alpha is)."""
    alpha: float = 0.0
    """Weight of cross-entropy on the real next token, in [0, 1]."""
    temperature: float = 1.0
    """Both distributions re-tempered by it (docs/losses.md); finite, > 0."""
    beta: float = 0.5
    """JSD's mixture weight on the teacher, in (0, 1) (used by "jsd" only)."""
    skew: float = 0.1
    """DistiLLM's skew, in [0, 1) (used by "skl" and "srkl" only)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is unknown: expected one of {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]: it weighs CE against KD (alpha * CE + ...)")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be a finite number > 0 (1.0 means no tempering)")
        check_beta_skew(self.loss, self.beta, self.skew)

    @property
    def weights(self) -> tuple[float, float]:
        """(CE weight, KD weight) per token: alpha and (1 - alpha) * T^2; "ce" is CE alone."""
        if self.loss == "ce":
            return 1.0, 0.0
        return self.alpha, (1.0 - self.alpha) * self.temperature**2

    def chunk_settings(self, chunk_tokens: int, compute_grad: bool) -> ChunkSettings:
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive int (e.g. 1024)")
        ce_weight, kd_weight = self.weights
        return ChunkSettings(self.loss, self.temperature, self.beta, self.skew, ce_weight, kd_weight, chunk_tokens,
                             compute_grad)


DEFAULT_OPTIONS = LossOptions()


# ----------------------------------------------------------------------------------------------------
# Argument checks


def _check_common(num_rows: int, target_ids, loss_mask, what: str) -> None:
    if target_ids.shape != (num_rows,):
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must be (N,) to match {what}")
    if loss_mask.shape != (num_rows,):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must be (N,) to match {what}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}; pass loss_mask.bool()")


def _check_logits(student_logits, target_ids, loss_mask) -> None:
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a float tensor of shape (N, V); got {tuple(student_logits.shape)} "
            f"{student_logits.dtype} (flatten batch and time first: logits.view(-1, V))"
        )
    _check_common(student_logits.shape[0], target_ids, loss_mask, f"student_logits {tuple(student_logits.shape)}")


def _check_targets(target_ids: torch.Tensor, vocab_size: int) -> None:
    """target_ids: (n,) targets of the masked tokens only."""
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab_size)).any()):
        raise ValueError(
            f"target_ids under loss_mask must be in [0, {vocab_size}); ignored targets (-100) are only "
            "allowed where loss_mask is False"
        )


def _teacher_tensors(num_rows: int, vocab_size: int, rows: torch.Tensor, topk_ids, topk_logprobs, tail_logprob,
                     target_logprob, what: str, *, check_ids: bool = True) -> TeacherTensors:
    """Check the teacher's (N, ...) rows against N and V (and the masked ids' range); ids as int64."""
    if topk_ids is None or topk_ids.dim() != 2 or topk_ids.shape[0] != num_rows or topk_ids.is_floating_point():
        got = "None" if topk_ids is None else f"{tuple(topk_ids.shape)} {topk_ids.dtype}"
        raise ValueError(f"topk_ids {got} must be an integer (N, K) tensor matching {what}")
    num_topk = topk_ids.shape[1]
    if not 1 <= num_topk <= vocab_size:
        raise ValueError(f"topk_ids has K={num_topk} columns; need 1 <= K <= V={vocab_size}")
    if topk_logprobs is None or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs {None if topk_logprobs is None else tuple(topk_logprobs.shape)} must have "
                         f"the shape of topk_ids {tuple(topk_ids.shape)}")
    if tail_logprob is None or tail_logprob.shape != (num_rows,):
        raise ValueError(f"tail_logprob {None if tail_logprob is None else tuple(tail_logprob.shape)} must be (N,) "
                         f"to match {what}")
    if target_logprob is not None and (target_logprob.shape != (num_rows,) or not target_logprob.is_floating_point()):
        raise ValueError(f"target_logprob {tuple(target_logprob.shape)} {target_logprob.dtype} must be a float (N,) "
                         f"tensor matching {what}")
    topk_ids = topk_ids.long()  # gather/scatter need int64; (N, K) is small next to (N, V)
    used_ids = topk_ids.index_select(0, rows) if check_ids else topk_ids[:0]
    if used_ids.numel() and bool(((used_ids < 0) | (used_ids >= vocab_size)).any()):
        raise ValueError(f"topk_ids under loss_mask must be in [0, {vocab_size}) (the student's vocab size)")
    return TeacherTensors(topk_ids, topk_logprobs, tail_logprob, target_logprob)


# ----------------------------------------------------------------------------------------------------
# Sparse KD: the chunked fused losses


def sparse_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    options: LossOptions = DEFAULT_OPTIONS,
    *,
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
    options: the loss, alpha, temperature, beta, skew (LossOptions).
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
    _check_logits(student_logits, target_ids, loss_mask)
    num_rows, vocab_size = student_logits.shape
    what = f"student_logits {tuple(student_logits.shape)}"
    settings = options.chunk_settings(chunk_tokens, student_logits.requires_grad and torch.is_grad_enabled())
    rows = loss_mask.nonzero().squeeze(1)  # (n,) the masked-in tokens; one host sync
    teacher = _teacher_tensors(num_rows, vocab_size, rows, topk_ids, topk_logprobs, tail_logprob,
                               None if options.loss == "ce" else target_logprob, what, check_ids=options.loss != "ce")
    _check_targets(target_ids.index_select(0, rows), vocab_size)
    total, ce, kd = FusedSparseKD.apply(student_logits, None if options.loss == "ce" else teacher, target_ids.long(),
                                        rows, settings)
    return total, {"ce": ce.detach(), "kd": kd.detach(), "num_tokens": loss_mask.sum()}


def linear_kd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    options: LossOptions = DEFAULT_OPTIONS,
    *,
    num_ids: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    chunk_tokens: int = 1024,
    target_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sparse_kd_loss(hidden @ head_weight[:num_ids].T, ...) without ever forming the (N, V) logits.

    hidden: (N, H) float, the student's final hidden states (after its last norm), flattened.
    head_weight: (V', H) float, the LM head's weight (a bias-free linear head: logits = hidden @ weight.T).
    num_ids: V, the logit columns the loss sees (the first num_ids rows of the weight; None: all V'); the
        other rows are a padded head's and get a zero gradient.
    matmul_dtype: dtype of the head's matmul (e.g. torch.bfloat16, as autocast runs it under --bf16);
        None: hidden's dtype. The loss itself runs in float32 (float64 when matmul_dtype is float64).
    topk_ids, topk_logprobs, tail_logprob, target_logprob, target_ids, loss_mask, options, chunk_tokens: as in
        sparse_kd_loss; the teacher's fields may be None for options.loss == "ce".
    Returns (loss, stats) as sparse_kd_loss; gradients flow to hidden and head_weight. Equal to sparse_kd_loss
    on the materialized logits in value and gradient (tested in float64).
    """
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor of shape (N, H); got {tuple(hidden.shape)} {hidden.dtype}")
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"head_weight {tuple(head_weight.shape)} must be (V, H) with H = {hidden.shape[1]} as hidden")
    num_rows, vocab_size = hidden.shape[0], head_weight.shape[0] if num_ids is None else num_ids
    if not 1 <= vocab_size <= head_weight.shape[0]:
        raise ValueError(f"num_ids={num_ids} must be in [1, {head_weight.shape[0]}] (the head's rows)")
    what = f"hidden {tuple(hidden.shape)}"
    _check_common(num_rows, target_ids, loss_mask, what)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    settings = options.chunk_settings(chunk_tokens, grad)
    rows = loss_mask.nonzero().squeeze(1)  # (n,)
    teacher = None
    if options.loss != "ce":
        teacher = _teacher_tensors(num_rows, vocab_size, rows, topk_ids, topk_logprobs, tail_logprob, target_logprob,
                                   what)
    _check_targets(target_ids.index_select(0, rows), vocab_size)
    total, ce, kd = FusedLinearKD.apply(hidden, head_weight, teacher, target_ids.long(), rows, settings, vocab_size,
                                        matmul_dtype or hidden.dtype)
    return total, {"ce": ce.detach(), "kd": kd.detach(), "num_tokens": loss_mask.sum()}


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
    options: LossOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss as sparse_kd_loss from full teacher logits: softmax(logits / T) on both sides.

    student_logits, teacher_logits: (N, V) float. target_ids: (N,) int. loss_mask: (N,) bool.
    Plain autograd, materializes several (n, V) tensors: a reference and an online-KD baseline.
    Returns (loss scalar, {"ce", "kd", "num_tokens"}) exactly as sparse_kd_loss does.
    """
    _check_logits(student_logits, target_ids, loss_mask)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
                         f"{tuple(student_logits.shape)}")
    cdtype = compute_dtype(student_logits.dtype)
    z = student_logits[loss_mask].to(cdtype)  # (n, V)
    target = target_ids[loss_mask].long()  # (n,)
    _check_targets(target, student_logits.shape[1])
    denom = max(z.shape[0], 1)
    ce = F.cross_entropy(z, target, reduction="sum")
    ce_weight, kd_weight = options.weights
    if options.loss == "ce":
        kd = torch.zeros((), dtype=cdtype, device=z.device)
    else:
        t_temp = F.log_softmax(teacher_logits[loss_mask].to(cdtype) / options.temperature, dim=-1)  # (n, V)
        s_temp = F.log_softmax(z / options.temperature, dim=-1)  # (n, V)
        kd = divergence(t_temp, s_temp, options.loss, options.beta, options.skew).sum()
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
    _check_logits(student_logits, target_ids, loss_mask)
    target = torch.where(loss_mask, target_ids.long(), -100)  # (N,)
    _check_targets(target[loss_mask], student_logits.shape[1])
    logits = student_logits.to(compute_dtype(student_logits.dtype))
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return ce / loss_mask.sum().clamp(min=1)
