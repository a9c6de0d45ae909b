"""`kdtrain run`: train a student from a teacher cache (or a plain data set) in one explicit loop.

`train(config)` reads top to bottom: prepare --out, open and verify the cache, build the student and
check its tokenizer, split off the held-out sequences, start the prefetching batcher, restore a
checkpoint, then the loop (forward, sparse KD loss, backward, clip, step, log, evaluate, checkpoint),
then save the student as a plain Hugging Face folder in --out with run.json beside it.

- Loss per micro-batch is the masked mean over its loss tokens (trainer/losses.py); with --grad-accum
  the micro-batches are averaged, and under DDP the ranks are.
- `--loss ce` with a cache trains on the cache's tokens in the same order and ignores the teacher's
  log-probs (the fair baseline); its held-out metrics still include eval_kl and eval_top1_agreement
  against the cache's teacher, so it compares with the KD runs. Without a cache, `--dataset` is tokenized
  with the student's tokenizer (common.sequences.load_sequences) and the same loop trains cross-entropy.
- The loss and the held-out metrics see the student's logits of token ids only (trainer.student.cache_token_ids:
  the cache's vocab_size, which kdcache build sets to the tokenizer's size; without a cache the tokenizer's
  size): padded embedding rows beyond them (Qwen2.5-0.5B: 151936 rows for 151665 ids) never enter a softmax,
  so a student whose padding differs from the teacher's trains on the same outcomes.
- Under `torchrun` every rank trains on its own stripe of blocks (trainer/data.py) with DDP (gloo on
  CPU; nccl on CUDA, rank r of a node on cuda:LOCAL_RANK); rank 0 logs, evaluates and saves.
- `--resume` continues from the latest checkpoint only under the settings it was written with (data
  order, loss, optimizer, schedule; the student's weights must fit the checkpoint key for key). A larger
  --steps is allowed: the learning-rate schedule keeps the horizon the run started with, so the extra
  steps run at its final value (10% of --lr). Without a complete checkpoint, `--resume` on a run folder
  starts over from step 0, first deleting what this tool wrote there, and says so.
- --out is a run folder (trainer/run_folder.py, docs/runs-and-plans.md 1): marked at creation, locked while a
  run uses it (rank 0 holds the lock), written only through names kdtrain owns, never through a link.
- A step whose loss or gradient norm is not finite is never applied: the run stops naming the step (or, with
  --skip-nonfinite N, skips up to N such steps); weights are checked before every checkpoint and the final save.

Knows models, losses, the cache reader and the data path; never imports the cacher.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from shared.errors import flagged
from shared.format import CacheError
from shared.reader import CacheReader
from trainer.batch import Batch, TeacherRows, collate
from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from trainer.config import TrainConfig
from trainer.data import (
    Source,
    cache_index,
    cache_source,
    epoch_order,
    heldout_hash,
    heldout_mask,
    pack_batches,
    sequence_source,
)
from trainer.divergences import EmptyTeacherRowError
from trainer.errors import TrainError
from trainer.loader import Batcher, plan_spans
from trainer.losses import (
    LossOptions,
    cross_entropy_loss,
    linear_kd_loss,
    sparse_kd_loss,
    tail_sample_targets,
)
from trainer.metrics import MetricsLog
from trainer.mixed import MixedBatcher, mix_source
from trainer.run_folder import RunFolder
from trainer.step import data_workers, make_optimizer, packing_row_tokens, setup_step
from trainer.throughput import peak_flops, step_flops

# Caches up to this size are hashed completely before training starts (a few seconds per GiB);
# larger ones are hashed shard by shard the first time a shard is read (CacheReader verify_on_read),
# still before any of its rows is trained on.
VERIFY_ALL_BYTES = 4 * 2**30
# Chunk-aligned blocks whose sequences are shuffled together (trainer/data.py).
SHUFFLE_WINDOW_BLOCKS = 4


# ---------------------------------------------------------------------------------------------
# setup helpers


def select_device(env, *, cuda_available: bool, num_cuda_devices: int) -> torch.device:
    """This process's device: cuda:LOCAL_RANK on a CUDA machine (torchrun sets LOCAL_RANK; alone it is 0), else cpu.

    env: the environment (os.environ). A pure function of its arguments, so tests can call it directly.
    """
    if not cuda_available:
        return torch.device("cpu")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= local_rank < num_cuda_devices:
        raise TrainError(f"LOCAL_RANK={local_rank} but this machine shows {num_cuda_devices} CUDA device(s), so that "
                         f"rank has no GPU of its own: start at most {num_cuda_devices} processes per node "
                         "(torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


def _dist() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); binds the process to its GPU, then joins the process group under torchrun."""
    device = select_device(os.environ, cuda_available=torch.cuda.is_available(),
                           num_cuda_devices=torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl uses the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, device


def _ddp(model, device: torch.device):
    """The model wrapped in DistributedDataParallel, on its own GPU on CUDA (else every rank would use cuda:0)."""
    if device.type == "cuda":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return torch.nn.parallel.DistributedDataParallel(model)


def _no_sync(forward):
    """DDP's no_sync() of the step's forward, through a torch.compile wrapper if there is one."""
    return getattr(forward, "_orig_mod", forward).no_sync()


def _gpu_peak_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated since the previous call (None on a CPU); resets the peak."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _open_cache(config: TrainConfig, log) -> CacheReader:
    try:
        reader = CacheReader(config.cache, verify_on_read=True)
        num_bytes = reader.manifest.totals["num_bytes"]
        if num_bytes <= VERIFY_ALL_BYTES:
            started = time.time()
            problems = reader.verify()
            if problems:
                raise TrainError(f"cache {config.cache} is damaged, refusing to train on it: "
                                 + "; ".join(str(p) for p in problems[:5])
                                 + ". Rebuild the named shards (rerun the same `kdcache build`) or use another cache.")
            reader.verify_on_read = False  # every object was just hashed
            log(f"verified every object of {config.cache} ({num_bytes / 2**20:.1f} MiB) in {time.time() - started:.1f}s")
    except CacheError as exc:
        raise TrainError(f"cannot train from {config.cache}: {exc.template}") from exc
    if reader.manifest.totals["num_loss_tokens"] == 0:
        raise TrainError(f"cache {config.cache} has no rows with loss_mask set, so there is nothing to distill; "
                         "rebuild it from data with response tokens (check kdcache build's --prompt-field and "
                         "--response-field)")
    return reader


def _mix_source(config: TrainConfig, reader: CacheReader | None, log) -> tuple[tuple[Source, ...], dict]:
    """((the training sequences of {mix_cache},), what a checkpoint must agree on) (trainer/mixed.py); ((), {})
    without it."""
    if config.mix_cache is None:
        return (), {}
    mix_reader = _open_cache(replace(config, cache=config.mix_cache), log)
    source = mix_source(mix_reader, reader, config.eval_fraction, has_teacher=config.loss != "ce",
                        tail_samples=_uses_tail_samples(config, mix_reader), window_blocks=SHUFFLE_WINDOW_BLOCKS)
    log(f"mixing: {config.mix:.0%} of the batches from {config.mix_cache} ({len(source)} training sequences)")
    return (source,), {"mix_cache_key": mix_reader.manifest.cache_key, "mix": config.mix}


def _lengths(*sources: Source) -> list[np.ndarray]:
    return [source.lengths for source in sources]


def _batches(config: TrainConfig, train_src: Source, mixed: tuple[Source, ...], cursor: dict | None, **options):
    """The run's batches: train_src's Batcher, or with {mix_cache} a MixedBatcher of both sources' Batchers."""
    def make(source: Source, at: dict | None) -> Batcher:
        return Batcher(source, batch_tokens=config.batch_tokens, seed=config.seed, cursor=at,
                       group_tokens=source.window_rows, **options)

    if not mixed:
        return make(train_src, cursor)
    return MixedBatcher(make, train_src, mixed[0], config.mix, config.seed, cursor)


def _teacher_path(config: TrainConfig, reader: CacheReader | None) -> str | None:
    """The teacher folder a student is made from (config.teacher, else the cache's teacher.path)."""
    if config.teacher:
        if not os.path.isdir(config.teacher):
            raise TrainError(f"{{teacher}} {config.teacher} is not a folder")
        return config.teacher
    if reader is not None and (config.student_from_teacher or config.student_config):
        path = reader.manifest.teacher.get("path")
        if not (path and os.path.isdir(path)):
            raise TrainError(f"the cache's teacher folder {path!r} is not on this machine (the cache was built "
                             "elsewhere); pass {teacher} FOLDER")
        return path
    return None


def _build_student(config: TrainConfig, teacher_path: str | None, vocab_size: int | None):
    """(model, tokenizer, name) from config.student, student_from_teacher or student_config."""
    from common.tokenizers import tokenizer_of
    from trainer.student import load_student, student_from_config, student_from_teacher

    torch.manual_seed(config.seed)
    try:
        if config.student:
            return load_student(config.student), tokenizer_of(config.student), config.student
        tokenizer = tokenizer_of(teacher_path)
        if config.student_from_teacher:
            return (student_from_teacher(teacher_path, config.keep_layers), tokenizer,
                    f"{teacher_path} keeping {config.keep_layers} layers")
        return student_from_config(config.student_config, vocab_size or len(tokenizer)), tokenizer, config.student_config
    except (FileNotFoundError, OSError) as exc:
        raise TrainError(str(exc)) from exc


def _schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up, then cosine from 1 to 0.1."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def token_logits(logits: torch.Tensor, num_ids: int | None) -> torch.Tensor:
    """(..., V') logits -> (..., V) the first num_ids columns (a view): a student's padded rows beyond the token
    ids (cache_token_ids) never reach a loss or a metric. None or num_ids >= V' keeps every column."""
    return logits if num_ids is None or num_ids >= logits.shape[-1] else logits[..., :num_ids]


def _loss(model, batch: Batch, config: TrainConfig, num_ids: int | None = None, *, head_weight=None,
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
    with _naming_rows(batch, torch.arange(mask.numel()), config.cache):
        if head_weight is not None:
            hidden = out.reshape(-1, out.shape[-1])  # (B*L, H)
            ids, top_lp, tail, target_lp = _teacher_targets(teacher, config)
            return linear_kd_loss(hidden, head_weight, ids, top_lp, tail, targets, mask, loss_options(config),
                                  num_ids=num_ids, matmul_dtype=torch.bfloat16 if config.bf16 else None,
                                  chunk_tokens=chunk_tokens, target_logprob=target_lp)
        logits = token_logits(out.logits, num_ids)  # (B, L, V)
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V); a view also when cut (rows of stride V')
        if config.loss == "ce":
            ce = cross_entropy_loss(flat_logits, targets, mask)
            return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
        return _sparse_loss(flat_logits, teacher, targets, mask, config)


@contextlib.contextmanager
def _naming_rows(batch: Batch, positions: torch.Tensor, cache: str | None):
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


def _teacher_targets(teacher: TeacherRows | None, config: TrainConfig) -> tuple:
    """(ids, log-probs, rest, target log-prob or None) the KD loss compares with, from the teacher's (N, ...) rows.

    With tail samples (present only for loss fkl, see _split_data): K + M outcomes with an empty rest bucket
    and no target bucket; else K + 2 (target bucket) or K + 1 outcomes. None without a teacher (loss ce).
    """
    if teacher is None:
        return None, None, None, None
    ids, top_lp, tail = teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob
    target_lp = teacher.target_logprob if config.target_bucket else None
    if teacher.tail_ids is not None:
        ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, teacher.tail_ids, teacher.tail_counts)
        target_lp = None
    return ids, top_lp, tail, target_lp


def _sparse_loss(rows: torch.Tensor, teacher: TeacherRows, targets: torch.Tensor, mask: torch.Tensor,
                 config: TrainConfig):
    """sparse_kd_loss on (N, V) logits and the teacher's (N, ...) rows, as the config asks (_teacher_targets)."""
    ids, top_lp, tail, target_lp = _teacher_targets(teacher, config)
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
            with _naming_rows(batch, mask.reshape(-1).nonzero().squeeze(1).cpu(), config.cache):
                kl_sum += float(heldout_kl(rows, teacher, targets)) * num
                if config.loss != "ce":
                    objective, _ = _sparse_loss(rows, teacher, targets, torch.ones_like(targets, dtype=torch.bool),
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


def _split_data(config: TrainConfig, reader: CacheReader | None, tokenizer) -> tuple[Source, Source, dict]:
    """(training source, evaluation source, description) by the held-out rule of trainer/data.py."""
    if reader is not None:
        try:
            index = cache_index(reader)
        except CacheError as exc:
            raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
        held = heldout_mask(index.hashes, config.eval_fraction)
        tail = _uses_tail_samples(config, reader)
        # --loss ce trains without the teacher's arrays, but is evaluated against them like every KD run
        train_src = cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=config.loss != "ce",
                                 window_blocks=SHUFFLE_WINDOW_BLOCKS, tail_samples=tail)
        eval_src = cache_source(reader, index, np.flatnonzero(held)[: config.eval_max_sequences].tolist(),
                                has_teacher=True, tail_samples=tail)
        info = {"num_sequences": len(index), "num_heldout": int(held.sum()),
                "teacher_outcomes": _outcomes_note(config, reader.manifest.top_k, reader.manifest.tail_samples, tail)}
    else:
        from common.sequences import load_sequences

        sequences, data_info = load_sequences(
            config.dataset, tokenizer, split=config.split, text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, max_length=config.max_length,
            limit=config.limit, prompt_template=config.prompt_template, input_field=config.input_field)
        held = heldout_mask(np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences],
                                       dtype=np.int64), config.eval_fraction)
        train_src = sequence_source(sequences, np.flatnonzero(~held).tolist())
        eval_src = sequence_source(sequences, np.flatnonzero(held)[: config.eval_max_sequences].tolist())
        info = {"num_sequences": len(sequences), "num_heldout": int(held.sum()), "data": data_info.to_json()}
    if len(train_src) == 0:
        raise TrainError(f"no training sequences left after holding out {info['num_heldout']} of "
                         f"{info['num_sequences']} "
                         "for evaluation; use more data or a smaller {eval_fraction}")
    return train_src, eval_src, info


def student_context(model) -> tuple[int, str] | None:
    """(longest input the model's config allows, the config field saying so), or None when it names none."""
    stored = model.config.to_dict()  # the names config.json uses (GPT-2's n_positions, not its alias)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = stored.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def _check_context(config: TrainConfig, model, student_name: str, sources: tuple[Source, ...]) -> None:
    """Refuse, before training, sequences longer than the student's context (they crashed deep inside torch).

    kdtrain never cuts a cache's sequences: the teacher's rows of a cut window would describe a context the
    student does not see.
    """
    context = student_context(model)
    if context is None:
        return
    limit, key = context
    if config.cache is None and config.max_length > limit:
        raise TrainError(f"{{max_length}} {config.max_length} exceeds the context of student {student_name} ({key} = "
                         f"{limit} tokens); use {{max_length}} {limit} or less")
    longer = [(int(src.lengths[i]), src.ids[i]) for src in sources for i in np.flatnonzero(src.lengths > limit)]
    if longer:
        length, where = max(longer, key=lambda item: item[0])
        where = f"shard {where[0]} sequence {where[1]}" if config.cache else f"sequence {where}"
        raise TrainError(f"cache {config.cache}: {len(longer)} sequence(s) are longer than the context of student "
                         f"{student_name} ({key} = {limit} tokens), the longest {where} with "
                         f"{length} tokens; kdtrain does not cut a cache's sequences (the teacher's rows describe the "
                         f"whole window): use a student with a context of at least {length}, or rebuild the cache with "
                         f"kdcache build --max-length {limit} or less")


def _uses_tail_samples(config: TrainConfig, reader: CacheReader | None) -> bool:
    """Whether the loss trains on the cache's tail samples: a cache that has them, --tail-samples, --loss fkl."""
    return bool(reader is not None and reader.manifest.tail_samples and config.tail_samples and config.loss == "fkl")


def _outcomes_note(config: TrainConfig, top_k: int, tail_samples: int, used: bool) -> str:
    """One line on what the KD loss compares (logged at start, kept in run.json)."""
    if config.loss == "ce":
        return "cross-entropy only"
    if used:
        return f"top-{top_k} + {tail_samples} importance-weighted tail samples (forward KL)"
    why = ""
    if tail_samples and config.tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused: they estimate forward KL only (--loss fkl)"
    elif tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused (--no-tail-samples)"
    buckets = f"top-{top_k} + rest bucket" + (" + target bucket" if config.target_bucket else "")
    return buckets + why


def _training_settings(config: TrainConfig, reader: CacheReader | None) -> dict:
    """The settings besides the data order that a bit-exact resume depends on (kept in each checkpoint)."""
    return {"loss": config.loss, "alpha": config.alpha, "temperature": config.temperature,
            "beta": config.beta if config.loss == "jsd" else None,
            "skew": config.skew if config.loss in ("skl", "srkl") else None,
            "target_bucket": config.target_bucket, "tail_samples": _uses_tail_samples(config, reader),
            "lr": config.lr, "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
            "clip": config.clip, "grad_accum": config.grad_accum, "bf16": config.bf16}


def _check_resume_state(state: dict, data_state: dict, training: dict, total_steps: int, path: str) -> int:
    """Refuse a checkpoint written under other settings; returns the LR schedule's horizon in steps.

    The data cursor only means something under the same order settings, the optimizer and scheduler
    states only under the same loss and optimizer settings. --steps may grow (the schedule keeps its
    horizon, so the extra steps run at its final LR) but not shrink. Keys a checkpoint lacks (written
    by an older kdtrain) are not checked.
    """
    def differing(saved: dict, now: dict) -> str:
        return "; ".join(f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v)

    diffs = differing(state.get("data", {}), data_state)
    if diffs:
        raise TrainError(f"checkpoint {path} was written with other data settings ({diffs}); resume with "
                         "the same {seed}, {batch_tokens}, {eval_fraction}, data and number of processes, or start "
                         "over with {overwrite}")
    diffs = differing(state.get("train", {}), training)
    if diffs:
        raise TrainError(f"checkpoint {path} was written with other training settings ({diffs}); a resumed run "
                         "continues the same run only with the same {loss}, {alpha}, {temperature}, {beta}/{skew}, "
                         "{target_bucket}, {tail_samples}, {lr}, {warmup_steps}, {weight_decay}, {clip}, {grad_accum} "
                         "and {bf16}: resume with the values the run started with, or start over with {overwrite}")
    horizon = state.get("schedule_steps", total_steps)
    if total_steps < horizon:
        raise TrainError(f"checkpoint {path} belongs to a run of {horizon} steps; {total_steps} steps would cut its "
                         f"learning-rate schedule short: pass {{steps}} {horizon} or more (steps past {horizon} run at "
                         "the final learning rate), or start over with {overwrite}")
    return horizon


def _nonfinite_step(loss: float, grad_norm: float, world: int, device: torch.device) -> str | None:
    """Why a step must not be applied (its loss or gradient norm is not finite), else None; all ranks agree."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if world > 1:
        flag = torch.tensor([float(bad)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        bad = bool(flag.item())
    return f"loss {loss:.6g}, gradient norm {grad_norm:.6g} (not finite on this or another rank)" if bad else None


def _failed(folder, run_info: dict, message: str) -> TrainError:
    """Record the failure in run.json (rank 0) and return the error to raise; checkpoints stay, no student is saved."""
    if folder is not None:
        folder.write_json("run.json", {**run_info, "status": "failed", "error": flagged(message)})
    return TrainError(message)


def _stop_nonfinite(config: TrainConfig, folder, run_info: dict, step: int, reason: str, skipped: int) -> TrainError:
    kept = latest_checkpoint(config.out)
    budget = (f" after {skipped - 1} such step(s) skipped ({{skip_nonfinite}} {config.skip_nonfinite})"
              if config.skip_nonfinite else "")
    return _failed(folder, run_info,
                   f"step {step}: {reason}, so the step was not applied and the run stops{budget}. Kept: "
                   f"{kept or 'no checkpoint yet'}; no student was saved. Lower {{lr}} (now {config.lr}) or add "
                   "{warmup_steps}, check the cache or data, or pass {skip_nonfinite} N to skip up to N such steps; "
                   "then rerun with {resume} to continue from the last checkpoint")


def _refuse_nonfinite_weights(config: TrainConfig, folder, run_info: dict, model, step: int) -> None:
    """Never write a student holding NaN or infinity: stop before a checkpoint or the final save."""
    name = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if name is not None:
        raise _failed(folder, run_info,
                      f"after step {step} the student's weights are not finite ({name}), so they were not saved; "
                      f"kept: {latest_checkpoint(config.out) or 'no checkpoint yet'}. Lower {{lr}} (now {config.lr}) "
                      "or {weight_decay}, then rerun with {resume} to continue from the last checkpoint")


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, *, progress=None, log=print) -> dict:
    """Run training; returns the final summary (also written to <out>/run.json).

    progress: optional factory `progress(total_steps, start_step) -> tick(step=, loss=, tps=)` (rank 0).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world, device = _dist()
    log = log if rank == 0 else (lambda message: None)
    folder = RunFolder.open(config.out, resume=config.resume, overwrite=config.overwrite, log=log) if rank == 0 else None
    try:
        return _train(config, folder, rank, world, device, progress=progress, log=log)
    finally:
        if folder is not None:
            folder.release()


def _train(config: TrainConfig, folder: RunFolder | None, rank: int, world: int, device: torch.device, *, progress,
           log) -> dict:
    """train()'s body, with --out held (`folder`, rank 0 only; None on the other ranks)."""
    if world > 1:
        torch.distributed.barrier()

    # -- cache, student, data ------------------------------------------------------------------
    reader = _open_cache(config, log) if config.cache else None
    teacher_path = _teacher_path(config, reader)
    from trainer.student import cache_token_ids, check_tokenizer_matches, enable_gradient_checkpointing

    num_ids = cache_token_ids(reader.manifest.tokenizer) if reader else None
    model, tokenizer, student_name = _build_student(config, teacher_path, num_ids)
    rows = model.get_input_embeddings().weight.shape[0]
    if reader is not None:
        try:
            check_tokenizer_matches(tokenizer, reader.manifest.tokenizer["vocab_sha256"], num_ids,
                                    num_student_embeddings=rows, student_name=student_name,
                                    teacher_name=reader.manifest.teacher.get("name", "?"))
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
    else:
        num_ids = min(rows, len(tokenizer))
    if num_ids < model.get_output_embeddings().weight.shape[0]:
        log(f"student: {model.get_output_embeddings().weight.shape[0]} logit rows for {num_ids} token ids; the loss "
            f"sees the first {num_ids} (the rest are padding no tokenizer produces)")
    train_src, eval_src, data_info = _split_data(config, reader, tokenizer)
    mixed, mix_state = _mix_source(config, reader, log)  # () or (the mix cache's source,)
    _check_context(config, model, student_name, (train_src, eval_src, *mixed))
    if "teacher_outcomes" in data_info:
        log(f"teacher targets: {data_info['teacher_outcomes']}")
    eval_batches = []  # padded rows, whatever the training layout
    for a, b in pack_batches(eval_src.lengths, config.batch_tokens):
        eval_batches.append(collate(eval_src.read(list(range(a, b))), eval_src.has_teacher))
        eval_batches[-1].ids = eval_src.ids[a:b]
    row_tokens = packing_row_tokens(model, config.pack, np.concatenate(_lengths(train_src, eval_src, *mixed)))
    data_state = {"seed": config.seed, "batch_tokens": config.batch_tokens, "eval_fraction": config.eval_fraction,
                  "num_train_sequences": len(train_src), "world_size": world,
                  "cache_key": reader.manifest.cache_key if reader else None, "row_tokens": row_tokens,
                  **mix_state}
    training = _training_settings(config, reader)

    # -- steps ---------------------------------------------------------------------------------
    if config.steps is not None:
        total_steps = config.steps
    else:  # the rank with the fewest batches sets the length of an epoch
        per_epoch = min(len(plan_spans(train_src.lengths[epoch_order(
            len(train_src), config.seed, 0, r, world, blocks=train_src.blocks, window_blocks=train_src.window_blocks)],
            config.batch_tokens, row_tokens)) for r in range(world))
        total_steps = max(1, int(config.epochs * per_epoch / config.grad_accum))

    # -- model, optimizer, checkpoint ----------------------------------------------------------
    ckpt = latest_checkpoint(config.out) if config.resume else None
    schedule_steps = total_steps  # the LR schedule's horizon; a resumed run keeps the one it started with
    if ckpt is not None:
        schedule_steps = _check_resume_state(read_state(ckpt), data_state, training, total_steps, ckpt)
    model.to(device).train()
    if config.gradient_checkpointing:
        try:
            enable_gradient_checkpointing(model)
        except ValueError as exc:
            raise TrainError(f"{{gradient_checkpointing}}: {exc}; train without it, or with a smaller {{batch_tokens}}") \
                from exc
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.warmup_steps, schedule_steps))
    step, cursors, skipped = 0, [None] * world, 0  # skipped: steps not applied (non-finite), --skip-nonfinite
    if ckpt is not None:
        try:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
        except ValueError as exc:
            raise TrainError(f"{exc}; resume with the student the run started with, or start over with {{overwrite}}") \
                from exc
        step, cursors, skipped = state["step"], state["cursors"], state.get("nonfinite_skips", 0)
        log(f"resumed from {ckpt} at step {step}" + (f"; steps {schedule_steps + 1}-{total_steps} run at the final "
            "learning rate (the schedule keeps the run's first horizon)" if total_steps > schedule_steps else ""))
    setup = setup_step(model, device=device, compile_setting=config.compile, num_ids=num_ids,
                       wrap=(lambda m: _ddp(m, device)) if world > 1 else None)
    workers = data_workers(config.data_workers, device)
    log(f"step: {'logits from the hidden states chunk by chunk' if setup.head_weight is not None else 'full logits'}"
        f"{', compiled' if setup.compiled else ''}{', gradient checkpointing' if config.gradient_checkpointing else ''}; "
        f"{'packed' if row_tokens else 'padded'} rows; "
        f"{workers or 'no'} data worker process(es)")
    batcher = _batches(config, train_src, mixed, cursors[rank], rank=rank, world_size=world, row_tokens=row_tokens,
                       num_workers=workers, device=device)
    peak = peak_flops(device, config.bf16, config.peak_tflops)

    # -- outputs -------------------------------------------------------------------------------
    run_info = {"config": asdict(config), "student": student_name, "teacher_path": teacher_path, "world_size": world,
                "total_steps": total_steps, "schedule_steps": schedule_steps, "num_train_sequences": len(train_src),
                **data_info, "cache_key": data_state["cache_key"]}
    metrics = None
    if rank == 0:
        folder.write_json("run.json", {**run_info, "status": "running"})
        metrics = MetricsLog(config.out, resume_step=step, tensorboard=config.tensorboard, wandb=(
            {"project": config.wandb_project, "name": os.path.basename(os.path.abspath(config.out)),
             "id": folder.marker["id"], "config": run_info["config"]} if config.wandb else None))
    trace = None
    if config.trace_data:
        os.makedirs(os.path.join(config.out, "trace"), exist_ok=True)
        trace = os.fdopen(os.open(os.path.join(config.out, "trace", f"rank-{rank}.jsonl"),  # closed below
                                  os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a")
    tick = progress(total_steps, step) if (progress and rank == 0) else (lambda **kw: None)

    # -- the loop ------------------------------------------------------------------------------
    started = time.time()
    train_seconds, tokens_seen, last = 0.0, 0, {}
    try:
        if metrics and step == 0 and config.eval_every and eval_batches:
            metrics.write({"step": 0, **evaluate_heldout(model, eval_batches, config, eval_src.has_teacher, num_ids)})
        while step < total_steps:
            t0 = time.time()
            loss_sum = ce_sum = kd_sum = 0.0
            step_tokens, flops = 0, 0.0
            for micro in range(config.grad_accum):
                batch = next(batcher)  # on the device
                if trace:
                    trace.write(json.dumps({"step": step + 1, "ids": batch.ids}) + "\n")
                last_micro = micro == config.grad_accum - 1
                with _no_sync(setup.forward) if (world > 1 and not last_micro) else contextlib.nullcontext():
                    loss, stats = _loss(setup.forward, batch, config, num_ids, head_weight=setup.head_weight,
                                        chunk_tokens=setup.chunk_tokens)
                    (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                ce_sum += float(stats["ce"]) / config.grad_accum
                kd_sum += float(stats["kd"]) / config.grad_accum
                step_tokens += batch.num_tokens
                flops += step_flops(model, batch.sequence_lengths)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip) if config.clip > 0 else
                              torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            reason = _nonfinite_step(loss_sum, grad_norm, world, device)
            if reason:  # never applied: the weights, the optimizer state and the schedule stay as they are
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                if skipped > config.skip_nonfinite:
                    raise _stop_nonfinite(config, folder, run_info, step + 1, reason, skipped)
                if metrics:
                    metrics.write({"step": step + 1, "skipped_nonfinite": skipped, "reason": reason})
                log(f"step {step + 1}: {reason}; step skipped ({skipped} of --skip-nonfinite {config.skip_nonfinite})")
                continue
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.time() - t0
            train_seconds += seconds
            tokens_seen += step_tokens * world
            tps = step_tokens * world / max(seconds, 1e-9)
            last = {"step": step, "loss": loss_sum, "ce": ce_sum, "kd": kd_sum, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens_seen, "epoch": batcher.cursor["epoch"],
                    "skipped_nonfinite": skipped, "mfu": None if peak is None else flops / max(seconds, 1e-9) / peak,
                    "gpu_peak_bytes": _gpu_peak_bytes(device)}
            if metrics and (step % config.log_every == 0 or step == total_steps):
                metrics.write(last)
            tick(step=step, loss=loss_sum, tps=tps)
            if metrics and eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                evaluation = evaluate_heldout(model, eval_batches, config, eval_src.has_teacher, num_ids)
                if evaluation:
                    metrics.write({"step": step, **evaluation})
                    last.update(evaluation)
            stopping = config.stop_after is not None and step >= config.stop_after and step < total_steps
            if (config.save_every and step % config.save_every == 0) or stopping:
                all_cursors = [batcher.cursor]
                if world > 1:
                    all_cursors = [None] * world
                    torch.distributed.all_gather_object(all_cursors, batcher.cursor)
                if rank == 0:
                    _refuse_nonfinite_weights(config, folder, run_info, model, step)
                    save_checkpoint(config.out, step, model, optimizer, scheduler,
                                    {"cursors": all_cursors, "data": data_state, "train": training,
                                     "schedule_steps": schedule_steps, "nonfinite_skips": skipped})
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                log(f"stopped after step {step} (--stop-after); rerun with --resume to continue")
                return {"status": "stopped", "step": step}
    finally:
        batcher.close()
        if metrics:
            metrics.close()
        if trace:
            trace.close()

    # -- save ----------------------------------------------------------------------------------
    summary = {"status": "complete", "steps": step, "seconds": round(time.time() - started, 2),
               "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "final": last,
               "num_parameters": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        from trainer.student import save_student

        _refuse_nonfinite_weights(config, folder, run_info, model, step)
        folder.save_student(lambda staging: save_student(model, tokenizer, staging))
        folder.write_json("run.json", {**run_info, **summary})
    if world > 1:
        torch.distributed.barrier()
    return {**summary, "student": student_name, "out": config.out}
