"""`kdtrain run`: train a student from a teacher cache (or a plain data set) in one explicit loop.

train(config) reads top to bottom: open and check the cache, build the student, split held-out
sequences, make the batcher, then the loop (forward, sparse KD loss, backward, clip, step, log,
evaluate, checkpoint), then save the student as a plain Hugging Face folder.

Under `torchrun` each rank trains on its own stripe of the data (DDP, gloo on CPU, nccl on CUDA);
rank 0 logs, evaluates and saves. Knows models, losses and the cache reader; never imports the
cacher.
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
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.data import (
    Batcher,
    cache_items,
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
    divergence,
    sparse_kd_loss,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)

# Caches up to this size are hashed completely before training starts; larger ones are hashed shard
# by shard the first time each shard is read (CacheReader verify_on_read), before any of it is used.
VERIFY_ALL_BYTES = 4 * 2**30


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
    """Teacher folder for --student-from-teacher / the tokenizer (default: the cache manifest's teacher.path)."""
    loss: str = "fkl"
    """fkl | rkl | jsd | skl | srkl | tvd | ce."""
    alpha: float = 0.0
    """Weight of cross-entropy on the real next token: alpha * CE + (1 - alpha) * T^2 * KD."""
    temperature: float = 1.0
    """Distillation temperature (both distributions re-tempered; see docs/losses.md)."""
    beta: float = 0.5
    """JSD mixing weight."""
    skew: float = 0.1
    """Skew of skl / srkl (DistiLLM)."""
    steps: int | None = None
    """Optimizer steps (default: --epochs over the data)."""
    epochs: float = 1.0
    """Passes over the training sequences when --steps is not given."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warm-up steps; then cosine decay to 10% of --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_tokens: int = 4096
    """Padded tokens per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    bf16: bool = False
    """bfloat16 autocast for the student's forward."""
    seed: int = 0
    """Seed of the data order and the student's random init."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_fraction: float = 0.05
    """Fraction of sequences held out for evaluation (rule in trainer/data.py)."""
    eval_max_sequences: int = 64
    """At most this many held-out sequences per evaluation."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: none besides the final model)."""
    resume: bool = False
    """Continue from the latest checkpoint in --out."""
    overwrite: bool = False
    """Replace a non-empty --out."""
    dataset: str | None = None
    """No-cache path: data set to train on with --loss ce."""
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
    """No-cache path: first N sequences only."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this step, as if killed (tests of resume)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise TrainError(f"--loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise TrainError(f"--temperature must be > 0, got {self.temperature}")
        chosen = [n for n, v in (("--student", self.student), ("--student-from-teacher", self.student_from_teacher),
                                 ("--student-config", self.student_config)) if v]
        if len(chosen) != 1:
            raise TrainError("give exactly one of --student, --student-from-teacher (with --keep-layers), --student-config"
                             + (f"; got {', '.join(chosen)}" if chosen else ""))
        if self.student_from_teacher and (self.keep_layers is None or self.keep_layers < 1):
            raise TrainError("--student-from-teacher needs --keep-layers N (N >= 1)")
        if self.cache is None and self.dataset is None:
            raise TrainError("give --cache (distillation) or --dataset (plain cross-entropy with --loss ce)")
        if self.cache is None and self.loss != "ce":
            raise TrainError(f"without --cache there is no teacher: use --loss ce (got --loss {self.loss})")
        if self.cache is None and self.student_from_teacher and self.teacher is None:
            raise TrainError("--student-from-teacher without --cache needs --teacher FOLDER")
        if self.steps is not None and self.steps < 1:
            raise TrainError("--steps must be >= 1")
        if self.epochs <= 0 or self.batch_tokens < 2 or self.grad_accum < 1 or self.lr <= 0:
            raise TrainError("--epochs and --lr must be > 0, --batch-tokens >= 2, --grad-accum >= 1")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError("--eval-fraction must be in [0, 1)")


# ---------------------------------------------------------------------------------------------
# setup helpers


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _prepare_out(config: TrainConfig, rank: int) -> None:
    if rank != 0:
        return
    if os.path.isfile(config.out):
        raise TrainError(f"--out {config.out} is a file; pass a folder")
    if os.path.isdir(config.out) and os.listdir(config.out) and not config.resume:
        if not config.overwrite:
            raise TrainError(f"--out {config.out} is not empty; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(config.out)
    os.makedirs(config.out, exist_ok=True)


def _open_cache(config: TrainConfig) -> CacheReader:
    try:
        reader = CacheReader(config.cache, verify_on_read=True)
    except CacheError as exc:
        raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
    if reader.manifest.totals["num_bytes"] <= VERIFY_ALL_BYTES:
        problems = reader.verify()
        if problems:
            raise TrainError(f"cache {config.cache} is damaged, refusing to train: " + "; ".join(str(p) for p in problems[:5])
                             + ". Rebuild the named shards (rerun kdcache build) or use another cache.")
    if reader.manifest.totals["num_loss_tokens"] == 0:
        raise TrainError(f"cache {config.cache} has no rows with loss_mask set: nothing to distill")
    return reader


def _teacher_path(config: TrainConfig, reader: CacheReader | None) -> str | None:
    if config.teacher:
        return config.teacher
    if reader is not None:
        path = reader.manifest.teacher.get("path")
        if path and os.path.isdir(path):
            return path
        if config.student_from_teacher or config.student_config:
            raise TrainError(f"the cache's teacher folder {path!r} is not on this machine; pass --teacher FOLDER")
    return None


def _build_student(config: TrainConfig, teacher_path: str | None, vocab_size: int | None):
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
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _flat(batch: dict, key: str):
    t = batch[key]
    return t.reshape(-1, *t.shape[2:])


def _loss(model, batch, config: TrainConfig, has_teacher: bool):
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=config.bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V), a view
    if not has_teacher:
        num = _flat(batch, "input_ids").shape[0]
        topk_ids = torch.zeros((num, 1), dtype=torch.long)
        topk_lp = torch.zeros((num, 1))
        tail = torch.full((num,), float("-inf"))
    else:
        topk_ids, topk_lp, tail = _flat(batch, "topk_ids"), _flat(batch, "topk_logprobs"), _flat(batch, "tail_logprob")
    loss = config.loss if has_teacher else "ce"
    return sparse_kd_loss(flat_logits, topk_ids, topk_lp, tail, _flat(batch, "target_ids"), _flat(batch, "loss_mask"),
                          loss=loss, alpha=config.alpha, temperature=config.temperature, beta=config.beta, skew=config.skew)


@torch.no_grad()
def evaluate_heldout(model, batches: list[dict], config: TrainConfig, has_teacher: bool) -> dict:
    """eval_loss (the training objective), eval_ppl (real next tokens), eval_kl and eval_top1_agreement
    (KL(teacher || student) over the K+1 buckets at T=1, argmax vs the teacher's top-1)."""
    model.eval()
    loss_sum = ce_sum = kl_sum = 0.0
    agree = count = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        mask = batch["loss_mask"]
        n = int(mask.sum())
        if n == 0:
            continue
        lg = logits[mask]  # (M, V)
        targets = batch["target_ids"][mask]
        ce = torch.nn.functional.cross_entropy(lg, targets, reduction="sum")
        ce_sum += float(ce)
        if has_teacher:
            ids = batch["topk_ids"][mask]
            t_lp = teacher_bucket_logprobs(batch["topk_logprobs"][mask], batch["tail_logprob"][mask])
            s_lp = student_bucket_logprobs(lg, ids)
            kl_sum += float(divergence(t_lp, s_lp, "fkl").sum())
            agree += int((lg.argmax(-1) == ids[:, 0]).sum())
            objective, _ = sparse_kd_loss(lg, ids, batch["topk_logprobs"][mask], batch["tail_logprob"][mask], targets,
                                          torch.ones(n, dtype=torch.bool), loss=config.loss, alpha=config.alpha,
                                          temperature=config.temperature, beta=config.beta, skew=config.skew)
            loss_sum += float(objective) * n
        else:
            loss_sum += float(ce)
        count += n
    model.train()
    if count == 0:
        return {}
    out = {"eval_loss": loss_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_tokens": count}
    if has_teacher:
        out.update(eval_kl=kl_sum / count, eval_top1_agreement=agree / count)
    return out


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, *, progress=None, log=print) -> dict:
    """Run training; returns the final summary (also written to <out>/run.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world = _dist()
    _prepare_out(config, rank)
    if world > 1:
        torch.distributed.barrier()

    # -- data ----------------------------------------------------------------------------------
    reader = _open_cache(config) if config.cache else None
    teacher_path = _teacher_path(config, reader)
    vocab_size = reader.manifest.vocab_size if reader else None
    model, tokenizer, student_name = _build_student(config, teacher_path, vocab_size)
    if reader is not None:
        from trainer.student import check_tokenizer_matches

        try:
            check_tokenizer_matches(tokenizer, reader.manifest.tokenizer["vocab_sha256"], reader.manifest.vocab_size,
                                    num_student_embeddings=model.get_output_embeddings().weight.shape[0],
                                    student_name=student_name, teacher_name=reader.manifest.teacher.get("name", "?"))
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        items, lengths, hashes, blocks = cache_items(reader)
        held = heldout_mask(hashes, config.eval_fraction)
        train_idx = [i for i in range(len(items)) if not held[i]]
        eval_idx = [i for i in range(len(items)) if held[i]][: config.eval_max_sequences]
        source = cache_source(reader, train_idx, items, lengths, blocks)
        eval_source = cache_source(reader, eval_idx, items, lengths, blocks)
        has_teacher = config.loss != "ce"
        if not has_teacher:
            source.has_teacher = eval_source.has_teacher = False
    else:
        from shared.data import load_sequences

        sequences, _ = load_sequences(config.dataset, tokenizer, split=config.split, text_field=config.text_field,
                                      prompt_field=config.prompt_field, response_field=config.response_field,
                                      max_length=config.max_length, limit=config.limit)
        hashes = np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences])
        held = heldout_mask(hashes, config.eval_fraction)
        source = sequence_source(sequences, [i for i in range(len(sequences)) if not held[i]])
        eval_source = sequence_source(sequences, [i for i in range(len(sequences)) if held[i]][: config.eval_max_sequences])
        has_teacher = False
    if len(source.items) == 0:
        raise TrainError("no training sequences left after holding out the evaluation slice; use more data or a smaller --eval-fraction")
    eval_batches = [collate(eval_source.read(list(range(a, b))), eval_source.has_teacher)
                    for a, b in pack_batches(eval_source.lengths, config.batch_tokens)] if len(eval_source.items) else []

    # -- steps ---------------------------------------------------------------------------------
    if config.steps is not None:
        total_steps = config.steps
    else:
        per_epoch = min(len(pack_batches(source.lengths[epoch_order(len(source.items), config.seed, 0, r, world,
                                                                     source.blocks)], config.batch_tokens))
                        for r in range(world))
        total_steps = max(1, int(config.epochs * per_epoch / config.grad_accum))

    # -- model, optimizer ----------------------------------------------------------------------
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.warmup_steps, total_steps))
    step, cursors = 0, [None] * world
    if config.resume:
        ckpt = latest_checkpoint(config.out)
        if ckpt is None:
            log(f"--resume: no checkpoint in {config.out}; starting from step 0")
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            step, cursors = state["step"], state["cursors"]
            if len(cursors) != world:
                raise TrainError(f"checkpoint {ckpt} was written by {len(cursors)} ranks; resume with the same number")
            log(f"resumed from {ckpt} at step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batcher = Batcher(source, batch_tokens=config.batch_tokens, seed=config.seed, rank=rank, world_size=world,
                      cursor=cursors[rank])

    metrics_path = os.path.join(config.out, "metrics.jsonl")
    metrics_file = open(metrics_path, "a") if rank == 0 else None

    def write(row: dict):
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    if rank == 0:
        with open(os.path.join(config.out, "config.json.kdtrain"), "w") as f:
            json.dump(asdict(config), f, indent=1)
    tick = progress(total_steps, step) if (progress and rank == 0) else (lambda **kw: None)
    started = time.time()
    tokens_seen = 0
    last = {}
    if rank == 0 and config.eval_every and step == 0 and eval_batches:
        write({"step": 0, **evaluate_heldout(model, eval_batches, config, has_teacher)})
    try:
        while step < total_steps:
            t0 = time.time()
            loss_sum, ce_sum, kd_sum, step_tokens = 0.0, 0.0, 0.0, 0
            for micro in range(config.grad_accum):
                batch = next(batcher)
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                sync = micro == config.grad_accum - 1
                ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
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
            tokens_seen += step_tokens * world
            tps = step_tokens * world / max(time.time() - t0, 1e-9)
            last = {"step": step, "loss": loss_sum, "ce": ce_sum, "kd": kd_sum, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens_seen, "epoch": batcher.cursor["epoch"]}
            if step % config.log_every == 0 or step == total_steps:
                write(last)
            tick(step=step, loss=loss_sum, tps=tps)
            if rank == 0 and ((config.eval_every and step % config.eval_every == 0) or step == total_steps) and eval_batches:
                ev = evaluate_heldout(model, eval_batches, config, has_teacher)
                if ev:
                    write({"step": step, **ev})
                    last.update(ev)
            stopping = config.stop_after is not None and step >= config.stop_after
            if (config.save_every and step % config.save_every == 0) or stopping:
                all_cursors = [None] * world
                if world > 1:
                    torch.distributed.all_gather_object(all_cursors, batcher.cursor)
                else:
                    all_cursors = [batcher.cursor]
                if rank == 0:
                    save_checkpoint(config.out, step, model, optimizer, scheduler, all_cursors)
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                log(f"stopped after step {step} (--stop-after); rerun with --resume to continue")
                return {"status": "stopped", "step": step}
    finally:
        batcher.close()
        if metrics_file:
            metrics_file.close()

    summary = {"status": "complete", "steps": step, "seconds": round(time.time() - started, 2), "student": student_name,
               "cache": config.cache, "dataset": config.dataset, "loss": config.loss, "final": last,
               "num_parameters": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        from trainer.student import save_student

        save_student(model, tokenizer, config.out)
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump({"config": asdict(config), **summary}, f, indent=1)
    if world > 1:
        torch.distributed.barrier()
    return summary
