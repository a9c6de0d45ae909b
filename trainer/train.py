"""`kdtrain run`: train a student from a teacher cache (or a plain data set) in one explicit loop.

`train(config)` reads top to bottom: prepare --out, open and verify the cache, build the student and
check its tokenizer, split off the held-out sequences, start the prefetching batcher, restore a
checkpoint, then the loop (forward, sparse KD loss, backward, clip, step, log, evaluate, checkpoint),
then save the student as a plain Hugging Face folder in --out with run.json beside it.

- Loss per micro-batch is the masked mean over its loss tokens (trainer/losses.py); with --grad-accum
  the micro-batches are averaged, and under DDP the ranks are.
- `--loss ce` with a cache trains on the cache's tokens in the same order and ignores the teacher's
  log-probs (the fair baseline). Without a cache, `--dataset` is tokenized with the student's
  tokenizer (shared.data.load_sequences) and the same loop trains cross-entropy.
- Under `torchrun` every rank trains on its own stripe of blocks (trainer/data.py) with DDP (gloo on
  CPU, nccl on CUDA); rank 0 logs, evaluates and saves.

Knows models, losses, the cache reader and the data path; never imports the cacher.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shared.format import CacheError
from shared.reader import CacheReader
from trainer.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from trainer.data import (
    Batcher,
    Source,
    cache_index,
    cache_source,
    collate,
    epoch_order,
    heldout_hash,
    heldout_mask,
    pack_batches,
    sequence_source,
)
from trainer.losses import (
    LOSSES,
    cross_entropy_loss,
    divergence,
    sparse_kd_loss,
    student_bucket_logprobs,
    tail_sample_targets,
    teacher_bucket_logprobs,
)
from trainer.metrics import MetricsLog

# Caches up to this size are hashed completely before training starts (a few seconds per GiB);
# larger ones are hashed shard by shard the first time a shard is read (CacheReader verify_on_read),
# still before any of its rows is trained on.
VERIFY_ALL_BYTES = 4 * 2**30
# Chunk-aligned blocks whose sequences are shuffled together (trainer/data.py).
SHUFFLE_WINDOW_BLOCKS = 4


class TrainError(ValueError):
    """A run that cannot start as asked; the message says what to change."""


@dataclass
class TrainConfig:
    """Settings of one `kdtrain run` (each field's docstring is its --help text)."""

    out: str
    """Output folder: the student (save_pretrained), metrics.jsonl, run.json, checkpoints/."""
    cache: str | None = None
    """Teacher cache (folder or URL). Without it, --dataset trains plain cross-entropy."""
    student: str | None = None
    """Student: a hub id or local model folder."""
    student_from_teacher: bool = False
    """Student = the cache's teacher keeping --keep-layers evenly spaced layers."""
    keep_layers: int | None = None
    """Layers kept by --student-from-teacher."""
    student_config: str | None = None
    """Student = random init from this JSON config (with model_type); uses the teacher's tokenizer."""
    teacher: str | None = None
    """Teacher folder for --student-from-teacher / --student-config (default: the cache's teacher.path)."""
    loss: str = "fkl"
    """fkl | rkl | jsd | skl | srkl | tvd | ce."""
    alpha: float = 0.0
    """Weight of cross-entropy on the real next token: alpha * CE + (1 - alpha) * T^2 * KD."""
    temperature: float = 1.0
    """Distillation temperature (both distributions re-tempered; see docs/losses.md)."""
    beta: float = 0.5
    """JSD mixing weight, in (0, 1)."""
    skew: float = 0.1
    """Skew of skl / srkl (DistiLLM), in [0, 1)."""
    target_bucket: bool = True
    """Give the actual next token its own bucket where it is outside the teacher's top K (K + 2 outcomes;
    uses the cache's target_logprob; docs/losses.md). Off: K + 1 buckets. Not used with tail samples."""
    tail_samples: bool = True
    """Use the cache's tail samples (a cache built with --tail-samples) with loss fkl: the K top-K entries plus
    M importance-weighted draws from the tail replace the rest bucket (docs/losses.md). Ignored otherwise."""
    steps: int | None = None
    """Optimizer steps (default: --epochs over the training sequences)."""
    epochs: float = 1.0
    """Passes over the training sequences when --steps is not given."""
    lr: float = 5e-4
    """Peak learning rate (AdamW, betas 0.9/0.95)."""
    warmup_steps: int = 0
    """Linear warm-up steps; then cosine decay to 10% of --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    batch_tokens: int = 4096
    """Padded tokens (rows x longest sequence) per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    bf16: bool = False
    """bfloat16 autocast for the student's forward."""
    seed: int = 0
    """Seed of the data order and of a random student init."""
    eval_every: int = 0
    """Evaluate every N steps, and at step 0 (0: only at the end)."""
    eval_fraction: float = 0.05
    """Fraction of sequences held out for evaluation (rule in trainer/data.py)."""
    eval_max_sequences: int = 64
    """At most this many held-out sequences per evaluation (the first ones in storage order)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: none besides the final model)."""
    resume: bool = False
    """Continue from the latest checkpoint in --out."""
    overwrite: bool = False
    """Replace a non-empty --out."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <out>/tensorboard (needs the tensorboard package)."""
    dataset: str | None = None
    """No-cache path: data set to train on with --loss ce (tokenized with the student's tokenizer)."""
    split: str | None = None
    """No-cache path: split."""
    text_field: str | None = None
    """No-cache path: text field."""
    prompt_field: str | None = None
    """No-cache path: prompt field."""
    response_field: str | None = None
    """No-cache path: response field."""
    max_length: int = 256
    """No-cache path: window length."""
    limit: int | None = None
    """No-cache path: first N source rows only."""
    stop_after: int | None = None
    """Checkpoint and stop after this step, as if killed (tests of --resume)."""
    trace_data: bool = False
    """Write the (shard, sequence) ids each rank trains on to <out>/trace/rank-R.jsonl."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise TrainError(f"--loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"--alpha must be in [0, 1] (it weighs CE against KD), got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise TrainError(f"--temperature must be > 0 (1.0 means no tempering), got {self.temperature}")
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise TrainError(f"--beta must be in (0, 1) for --loss jsd (at 0 or 1 the JSD is 0), got {self.beta}")
        if self.loss in ("skl", "srkl") and not 0.0 <= self.skew < 1.0:
            raise TrainError(f"--skew must be in [0, 1) for --loss {self.loss}, got {self.skew}")
        chosen = [name for name, value in (("--student", self.student), ("--student-from-teacher", self.student_from_teacher),
                                           ("--student-config", self.student_config)) if value]
        if len(chosen) != 1:
            raise TrainError("give exactly one of --student, --student-from-teacher (with --keep-layers), --student-config"
                             + (f"; got {' and '.join(chosen)}" if chosen else "; got none"))
        if self.student_from_teacher and (self.keep_layers is None or self.keep_layers < 1):
            raise TrainError("--student-from-teacher needs --keep-layers N (N >= 1)")
        if self.keep_layers is not None and not self.student_from_teacher:
            raise TrainError("--keep-layers only applies to --student-from-teacher")
        if self.cache is None and self.dataset is None:
            raise TrainError("give --cache (distillation) or --dataset (plain cross-entropy with --loss ce)")
        if self.cache is not None and self.dataset is not None:
            raise TrainError("give --cache or --dataset, not both (--loss ce with --cache trains on the cache's tokens)")
        if self.cache is None and self.loss != "ce":
            raise TrainError(f"without --cache there is no teacher: use --loss ce (got --loss {self.loss})")
        if self.cache is None and (self.student_from_teacher or self.student_config) and self.teacher is None:
            raise TrainError("without --cache, --student-from-teacher and --student-config need --teacher FOLDER")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"--steps must be >= 1, got {self.steps}")
        for name, value, low in (("--epochs", self.epochs, 0), ("--lr", self.lr, 0)):
            if not value > low:
                raise TrainError(f"{name} must be > {low}, got {value}")
        for name, value, low in (("--batch-tokens", self.batch_tokens, 2), ("--grad-accum", self.grad_accum, 1),
                                 ("--log-every", self.log_every, 1), ("--warmup-steps", self.warmup_steps, 0),
                                 ("--eval-every", self.eval_every, 0), ("--save-every", self.save_every, 0),
                                 ("--max-length", self.max_length, 2), ("--clip", self.clip, 0),
                                 ("--weight-decay", self.weight_decay, 0)):
            if value < low:
                raise TrainError(f"{name} must be >= {low}, got {value}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite contradict each other; pass one")


# ---------------------------------------------------------------------------------------------
# setup helpers


def _dist() -> tuple[int, int]:
    """(rank, world_size); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _prepare_out(config: TrainConfig, rank: int) -> None:
    """Refuse a non-empty --out without --resume/--overwrite (every rank checks; rank 0 acts)."""
    if os.path.isfile(config.out):
        raise TrainError(f"--out {config.out} is a file; pass a folder")
    if os.path.isdir(config.out) and os.listdir(config.out) and not (config.resume or config.overwrite):
        raise TrainError(f"--out {config.out} is not empty; pass --resume to continue the run in it or --overwrite "
                         "to replace it")
    if rank == 0:
        if config.overwrite and os.path.isdir(config.out):
            shutil.rmtree(config.out)
        os.makedirs(config.out, exist_ok=True)


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
        raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
    if reader.manifest.totals["num_loss_tokens"] == 0:
        raise TrainError(f"cache {config.cache} has no rows with loss_mask set, so there is nothing to distill; "
                         "rebuild it from data with response tokens (check --prompt-field/--response-field)")
    return reader


def _teacher_path(config: TrainConfig, reader: CacheReader | None) -> str | None:
    """The teacher folder a student is made from (--teacher, else the cache's teacher.path)."""
    if config.teacher:
        if not os.path.isdir(config.teacher):
            raise TrainError(f"--teacher {config.teacher} is not a folder")
        return config.teacher
    if reader is not None and (config.student_from_teacher or config.student_config):
        path = reader.manifest.teacher.get("path")
        if not (path and os.path.isdir(path)):
            raise TrainError(f"the cache's teacher folder {path!r} is not on this machine (the cache was built "
                             "elsewhere); pass --teacher FOLDER")
        return path
    return None


def _build_student(config: TrainConfig, teacher_path: str | None, vocab_size: int | None):
    """(model, tokenizer, name) from --student, --student-from-teacher or --student-config."""
    from trainer.student import (
        load_student,
        load_student_tokenizer,
        student_from_config,
        student_from_teacher,
    )

    torch.manual_seed(config.seed)
    try:
        if config.student:
            return load_student(config.student), load_student_tokenizer(config.student), config.student
        tokenizer = load_student_tokenizer(teacher_path)
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


def _flat(batch: dict, key: str) -> torch.Tensor:
    t = batch[key]
    return t.reshape(-1, *t.shape[2:])  # (B, L, ...) -> (B*L, ...)


def _loss(model, batch: dict, config: TrainConfig, has_teacher: bool) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=config.bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V)
    targets, mask = _flat(batch, "target_ids"), _flat(batch, "loss_mask")
    if not has_teacher:
        ce = cross_entropy_loss(flat_logits, targets, mask)
        return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
    return _sparse_loss(flat_logits, {k: _flat(batch, k) for k in batch if k in TEACHER_FIELDS}, targets, mask, config)


TEACHER_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprob", "tail_ids", "tail_counts")


def _sparse_loss(rows: torch.Tensor, teacher: dict, targets: torch.Tensor, mask: torch.Tensor, config: TrainConfig):
    """sparse_kd_loss on (N, V) logits and the teacher's (N, ...) fields, as the config asks.

    With tail samples in `teacher` (present only for loss fkl, see _split_data): K + M outcomes with an
    empty rest bucket and no target bucket; else K + 2 (target bucket) or K + 1 outcomes.
    """
    ids, top_lp, tail = teacher["topk_ids"], teacher["topk_logprobs"], teacher["tail_logprob"]
    target_lp = teacher["target_logprob"] if config.target_bucket else None
    if "tail_ids" in teacher:
        ids, top_lp, tail = tail_sample_targets(ids, top_lp, tail, teacher["tail_ids"], teacher["tail_counts"])
        target_lp = None
    return sparse_kd_loss(rows, ids, top_lp, tail, targets, mask, loss=config.loss, alpha=config.alpha,
                          temperature=config.temperature, beta=config.beta, skew=config.skew, target_logprob=target_lp)


@torch.no_grad()
def evaluate_heldout(model, batches: list[dict], config: TrainConfig, has_teacher: bool) -> dict:
    """Held-out metrics over the loss rows of `batches`, one mean per token.

    eval_loss: the training objective. eval_ppl: exp(mean CE of the real next tokens).
    With a teacher: eval_kl = KL(teacher || student) over the K+1 buckets at T=1, and
    eval_top1_agreement = fraction of rows where the student's argmax is the teacher's top-1.
    """
    device = next(model.parameters()).device
    model.eval()
    loss_sum = ce_sum = kl_sum = 0.0
    agree = count = 0
    for batch in batches:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        mask = batch["loss_mask"]  # (B, L)
        num = int(mask.sum())
        if num == 0:
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        rows = logits[mask]  # (M, V)
        targets = batch["target_ids"][mask]  # (M,)
        ce = float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum"))
        ce_sum += ce
        if has_teacher:
            ids, top_lp, tail = batch["topk_ids"][mask], batch["topk_logprobs"][mask], batch["tail_logprob"][mask]
            t_lp = teacher_bucket_logprobs(top_lp, tail)  # (M, K+1)
            s_lp = student_bucket_logprobs(rows, ids)  # (M, K+1)
            kl_sum += float(divergence(t_lp, s_lp, "fkl").sum())
            agree += int((rows.argmax(-1) == ids[:, 0]).sum())
            objective, _ = _sparse_loss(rows, {k: batch[k][mask] for k in batch if k in TEACHER_FIELDS}, targets,
                                        torch.ones_like(targets, dtype=torch.bool), config)
            loss_sum += float(objective) * num
        else:
            loss_sum += ce
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
        has_teacher = config.loss != "ce"
        tail = bool(reader.manifest.tail_samples and config.tail_samples and config.loss == "fkl")
        train_src = cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=has_teacher,
                                 window_blocks=SHUFFLE_WINDOW_BLOCKS, tail_samples=tail)
        eval_src = cache_source(reader, index, np.flatnonzero(held)[: config.eval_max_sequences].tolist(),
                                has_teacher=has_teacher, tail_samples=tail)
        info = {"num_sequences": len(index), "num_heldout": int(held.sum()),
                "teacher_outcomes": _outcomes_note(config, reader.manifest.top_k, reader.manifest.tail_samples, tail)}
    else:
        from shared.data import load_sequences

        sequences, data_info = load_sequences(
            config.dataset, tokenizer, split=config.split, text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, max_length=config.max_length,
            limit=config.limit)
        held = heldout_mask(np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences],
                                       dtype=np.int64), config.eval_fraction)
        train_src = sequence_source(sequences, np.flatnonzero(~held).tolist())
        eval_src = sequence_source(sequences, np.flatnonzero(held)[: config.eval_max_sequences].tolist())
        info = {"num_sequences": len(sequences), "num_heldout": int(held.sum()), "data": data_info.to_json()}
    if len(train_src) == 0:
        raise TrainError(f"no training sequences left after holding out {info['num_heldout']} of {info['num_sequences']} "
                         "for evaluation; use more data or a smaller --eval-fraction")
    return train_src, eval_src, info


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


def _check_resume_state(state: dict, data_state: dict, path: str) -> None:
    """The data cursor only means something under the same order settings."""
    saved = state.get("data", {})
    diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in data_state.items() if k in saved and saved[k] != v]
    if diffs:
        raise TrainError(f"checkpoint {path} was written with other data settings ({'; '.join(diffs)}); resume with "
                         "the same --seed/--batch-tokens/--eval-fraction/data and number of processes, or start over "
                         "with --overwrite")


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, *, progress=None, log=print) -> dict:
    """Run training; returns the final summary (also written to <out>/run.json).

    progress: optional factory `progress(total_steps, start_step) -> tick(step=, loss=, tps=)` (rank 0).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world = _dist()
    _prepare_out(config, rank)
    if world > 1:
        torch.distributed.barrier()
    log = log if rank == 0 else (lambda message: None)

    # -- cache, student, data ------------------------------------------------------------------
    reader = _open_cache(config, log) if config.cache else None
    teacher_path = _teacher_path(config, reader)
    model, tokenizer, student_name = _build_student(config, teacher_path, reader.manifest.vocab_size if reader else None)
    if reader is not None:
        from trainer.student import check_tokenizer_matches

        try:
            check_tokenizer_matches(tokenizer, reader.manifest.tokenizer["vocab_sha256"], reader.manifest.vocab_size,
                                    num_student_embeddings=model.get_input_embeddings().weight.shape[0],
                                    student_name=student_name, teacher_name=reader.manifest.teacher.get("name", "?"))
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
    train_src, eval_src, data_info = _split_data(config, reader, tokenizer)
    has_teacher = train_src.has_teacher
    if "teacher_outcomes" in data_info:
        log(f"teacher targets: {data_info['teacher_outcomes']}")
    eval_batches = [collate(eval_src.read(list(range(a, b))), has_teacher)
                    for a, b in pack_batches(eval_src.lengths, config.batch_tokens)]
    data_state = {"seed": config.seed, "batch_tokens": config.batch_tokens, "eval_fraction": config.eval_fraction,
                  "num_train_sequences": len(train_src), "world_size": world}

    # -- steps ---------------------------------------------------------------------------------
    if config.steps is not None:
        total_steps = config.steps
    else:  # the rank with the fewest batches sets the length of an epoch
        per_epoch = min(len(pack_batches(train_src.lengths[epoch_order(
            len(train_src), config.seed, 0, r, world, blocks=train_src.blocks, window_blocks=train_src.window_blocks)],
            config.batch_tokens)) for r in range(world))
        total_steps = max(1, int(config.epochs * per_epoch / config.grad_accum))

    # -- model, optimizer, checkpoint ----------------------------------------------------------
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.warmup_steps, total_steps))
    step, cursors = 0, [None] * world
    ckpt = latest_checkpoint(config.out) if config.resume else None
    if config.resume and ckpt is None:
        log(f"--resume: no checkpoint in {config.out} yet; starting from step 0")
    if ckpt is not None:
        _check_resume_state(read_state(ckpt), data_state, ckpt)
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, cursors = state["step"], state["cursors"]
        log(f"resumed from {ckpt} at step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batcher = Batcher(train_src, batch_tokens=config.batch_tokens, seed=config.seed, rank=rank, world_size=world,
                      cursor=cursors[rank])

    # -- outputs -------------------------------------------------------------------------------
    run_info = {"config": asdict(config), "student": student_name, "teacher_path": teacher_path, "world_size": world,
                "total_steps": total_steps, "num_train_sequences": len(train_src), **data_info,
                "cache_key": reader.manifest.cache_key if reader else None}
    metrics = None
    if rank == 0:
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump({**run_info, "status": "running"}, f, indent=1)
        metrics = MetricsLog(config.out, resume_step=step, tensorboard=config.tensorboard)
    trace = None
    if config.trace_data:
        os.makedirs(os.path.join(config.out, "trace"), exist_ok=True)
        trace = open(os.path.join(config.out, "trace", f"rank-{rank}.jsonl"), "a")  # noqa: SIM115 - closed below
    tick = progress(total_steps, step) if (progress and rank == 0) else (lambda **kw: None)

    # -- the loop ------------------------------------------------------------------------------
    started = time.time()
    train_seconds, tokens_seen, last = 0.0, 0, {}
    try:
        if metrics and step == 0 and config.eval_every and eval_batches:
            metrics.write({"step": 0, **evaluate_heldout(model, eval_batches, config, has_teacher)})
        while step < total_steps:
            t0 = time.time()
            loss_sum = ce_sum = kd_sum = 0.0
            step_tokens = 0
            for micro in range(config.grad_accum):
                batch = next(batcher)
                if trace:
                    trace.write(json.dumps({"step": step + 1, "ids": batch["ids"]}) + "\n")
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                last_micro = micro == config.grad_accum - 1
                with ddp.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext():
                    loss, stats = _loss(ddp, batch, config, has_teacher)
                    (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                ce_sum += float(stats["ce"]) / config.grad_accum
                kd_sum += float(stats["kd"]) / config.grad_accum
                step_tokens += batch["num_tokens"]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip)) if config.clip > 0 else float("nan")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.time() - t0
            train_seconds += seconds
            tokens_seen += step_tokens * world
            tps = step_tokens * world / max(seconds, 1e-9)
            last = {"step": step, "loss": loss_sum, "ce": ce_sum, "kd": kd_sum, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens_seen, "epoch": batcher.cursor["epoch"]}
            if metrics and (step % config.log_every == 0 or step == total_steps):
                metrics.write(last)
            tick(step=step, loss=loss_sum, tps=tps)
            if metrics and eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                evaluation = evaluate_heldout(model, eval_batches, config, has_teacher)
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
                    save_checkpoint(config.out, step, model, optimizer, scheduler,
                                    {"cursors": all_cursors, "data": data_state})
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

        save_student(model, tokenizer, config.out)
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump({**run_info, **summary}, f, indent=1)
    if world > 1:
        torch.distributed.barrier()
    return {**summary, "student": student_name, "out": config.out}
