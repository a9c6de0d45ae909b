"""`kdtrain run`'s loss on a batch and its held-out metrics: what the loop and the evaluation compute per token.

- `batch_loss`: the student's forward on a Batch and the step's loss, the masked mean over its loss tokens: the
  sparse KD loss as the run's settings ask (`loss_options`, `teacher_targets`), or cross-entropy with --loss ce.
- `evaluate_heldout`: the held-out metrics the run logs (eval_loss, eval_ppl; with a teacher eval_kl and
  eval_top1_agreement, also under --loss ce); `heldout_kl` is also kdtrain eval's agreement KL.
- Only the logits of token ids reach a loss or a metric (`token_logits`); a teacher row with no probability
  becomes a TrainError naming the cache sequence and token (`naming_rows`).

Knows the Batch and its TeacherRows, TrainConfig's loss fields and trainer/losses.py; nothing about how the rows
were read, their order, the optimizer or the loop.
"""

from __future__ import annotations

import contextlib
import math

import torch

from trainer.batch import Batch, TeacherRows
from trainer.config import TrainConfig
from trainer.divergences import EmptyTeacherRowError
from trainer.errors import TrainError
from trainer.losses import (
    LossOptions,
    cross_entropy_loss,
    linear_kd_loss,
    sparse_kd_loss,
    tail_sample_targets,
)


def token_logits(logits: torch.Tensor, num_ids: int | None) -> torch.Tensor:
    """(..., V') logits -> (..., V) the first num_ids columns (a view): a student's padded rows beyond the token
    ids (cache_token_ids) never reach a loss or a metric. None or num_ids >= V' keeps every column."""
    return logits if num_ids is None or num_ids >= logits.shape[-1] else logits[..., :num_ids]


def batch_loss(model, batch: Batch, config: TrainConfig, num_ids: int | None = None, *, head_weight=None,
               chunk_tokens: int = 1024) -> tuple[torch.Tensor, dict]:
    """The step's loss on a batch on the model's device.

    model returns the student's logits; or, with head_weight (trainer/step.py), its final hidden states, and the
    loss makes the logits from them and the head's weight chunk by chunk (linear_kd_loss; the same loss).
    """
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
        out = model(**batch.model_inputs(), use_cache=False)  # (B, L, H) hidden states, or .logits (B, L, V')
    targets, mask = batch.target_ids.reshape(-1), batch.loss_mask.reshape(-1)
    teacher = batch.teacher.flat() if config.loss != "ce" else None
    with naming_rows(batch, torch.arange(mask.numel()), config.cache):
        if head_weight is not None:
            hidden = out.reshape(-1, out.shape[-1])  # (B*L, H)
            ids, top_lp, tail, target_lp = teacher_targets(teacher, config)
            return linear_kd_loss(hidden, head_weight, ids, top_lp, tail, targets, mask, loss_options(config),
                                  num_ids=num_ids, matmul_dtype=torch.bfloat16 if config.bf16 else None,
                                  chunk_tokens=chunk_tokens, target_logprob=target_lp)
        logits = token_logits(out.logits, num_ids)  # (B, L, V)
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V); a view also when cut (rows of stride V')
        if config.loss == "ce":
            ce = cross_entropy_loss(flat_logits, targets, mask)
            return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
        return sparse_loss(flat_logits, teacher, targets, mask, config)


@contextlib.contextmanager
def naming_rows(batch: Batch, positions: torch.Tensor, cache: str | None):
    """Turn an EmptyTeacherRowError of the loss into a TrainError naming the cache sequence and token.

    positions: (N,) the flattened (B*L) index in `batch` of each of the N rows given to the loss.
    """
    try:
        yield
    except EmptyTeacherRowError as exc:
        b, t = divmod(int(positions[exc.row]), batch.loss_mask.shape[1])
        ids = batch.ids
        where = f"shard {ids[b][0]} sequence {ids[b][1]}" if ids else f"batch row {b}"
        raise TrainError(f"cache {cache}, {where}, token {t}: the teacher's stored log-probs hold no "
                         "probability (all -inf, or NaN), so there is nothing to distill there; a cache writer must "
                         "never store such a row: rebuild the cache (or that shard) with `kdcache build`") from exc


def teacher_targets(teacher: TeacherRows | None, config: TrainConfig) -> tuple:
    """(ids, log-probs, rest, target log-prob or None) the KD loss compares with, from the teacher's (N, ...) rows.

    With tail samples (present only for loss fkl, see trainer.run_data.split_data): K + M outcomes with an empty
    rest bucket and no target bucket; else K + 2 (target bucket) or K + 1 outcomes. None without a teacher (loss ce).
    """
    if teacher is None:
        return None, None, None, None
    ids, top_lp, tail = teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob
    target_lp = teacher.target_logprob if config.target_bucket else None
    if teacher.tail_ids is not None:
        ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, teacher.tail_ids, teacher.tail_counts)
        target_lp = None
    return ids, top_lp, tail, target_lp


def sparse_loss(rows: torch.Tensor, teacher: TeacherRows, targets: torch.Tensor, mask: torch.Tensor,
                config: TrainConfig):
    """sparse_kd_loss on (N, V) logits and the teacher's (N, ...) rows, as the config asks (teacher_targets)."""
    ids, top_lp, tail, target_lp = teacher_targets(teacher, config)
    return sparse_kd_loss(rows, ids, top_lp, tail, targets, mask, loss_options(config), target_logprob=target_lp)


def loss_options(config: TrainConfig) -> LossOptions:
    """The run's loss settings as the losses take them."""
    return LossOptions(loss=config.loss, alpha=config.alpha, temperature=config.temperature, beta=config.beta,
                       skew=config.skew)


def heldout_kl(rows: torch.Tensor, teacher: TeacherRows, targets: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the K + 1 buckets at T = 1: sparse_kd_loss's KD term, rules and all.

    rows: (N, V) student logits of token ids only (token_logits); teacher: the cache's (N, ...) topk_ids,
    topk_logprobs, tail_logprob; targets: (N,) next tokens. The rest bucket is empty on rows whose K ids
    cover all V (K = V), whatever rounding left in the stored tail. Also kdtrain eval's agreement KL.
    """
    everything = torch.ones_like(targets, dtype=torch.bool)
    _, stats = sparse_kd_loss(rows, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob, targets,
                              everything, LossOptions(loss="fkl"))
    return stats["kd"]


@torch.no_grad()
def evaluate_heldout(model, batches: list[Batch], config: TrainConfig | None, has_teacher: bool,
                     num_ids: int | None = None) -> dict:
    """Held-out metrics over the loss rows of `batches`, one mean per token.

    eval_loss: the training objective. eval_ppl: exp(mean CE of the real next tokens).
    With a teacher (whatever the training loss, --loss ce included): eval_kl = KL(teacher || student) over
    the K+1 buckets at T=1, and eval_top1_agreement = fraction of rows where the student's argmax is the
    teacher's top-1. config may be None without a teacher. num_ids: the token ids the loss sees (token_logits).
    """
    device = next(model.parameters()).device
    model.eval()
    loss_sum = ce_sum = kl_sum = 0.0
    agree = count = 0
    for batch in batches:
        batch = batch.to(device)
        mask = batch.loss_mask  # (B, L)
        num = int(mask.sum())
        if num == 0:
            continue
        logits = model(**batch.model_inputs()).logits.float()
        rows = token_logits(logits, num_ids)[mask]  # (M, V)
        targets = batch.target_ids[mask]  # (M,)
        ce = float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum"))
        ce_sum += ce
        objective_sum = ce
        if has_teacher:
            teacher = batch.teacher.select(mask)
            with naming_rows(batch, mask.reshape(-1).nonzero().squeeze(1).cpu(), config.cache):
                kl_sum += float(heldout_kl(rows, teacher, targets)) * num
                if config.loss != "ce":
                    objective, _ = sparse_loss(rows, teacher, targets, torch.ones_like(targets, dtype=torch.bool),
                                               config)
                    objective_sum = float(objective) * num
            agree += int((rows.argmax(-1) == teacher.topk_ids[:, 0]).sum())
        loss_sum += objective_sum
        count += num
    model.train()
    if count == 0:
        return {}
    out = {"eval_loss": loss_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_tokens": count}
    if has_teacher:
        out.update(eval_kl=kl_sum / count, eval_top1_agreement=agree / count)
    return out
