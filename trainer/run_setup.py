"""`kdtrain run`'s setup around the data: the student and its tokenizer check, the learning-rate schedule, and what a
checkpoint must agree on to be resumed.

- The student is --student, the teacher with --keep-layers of its layers (--student-from-teacher), or a fresh
  model of --student-config; the teacher folder is --teacher, else the cache's teacher.path.
- The student's tokenizer must be the cache's (its vocabulary fingerprint); the loss sees the first num_ids
  logits (trainer.student.cache_token_ids), padded rows beyond them never.
- The schedule is a linear warm-up, then a cosine from --lr down to 10% of it.
- A checkpoint is resumed only under the data and training settings it was written with; --steps may grow (the
  schedule keeps the horizon the run started with) but not shrink.

Knows TrainConfig, the cache's manifest, trainer/student.py and trainer/checkpoint.py; nothing about the data
order, the losses or the loop.
"""

from __future__ import annotations

import math
import os

import torch

from shared.reader import CacheReader
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.run_data import uses_tail_samples
from trainer.student import cache_token_ids, check_tokenizer_matches, enable_gradient_checkpointing


def find_teacher(config: TrainConfig, reader: CacheReader | None) -> str | None:
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


def prepare_student(config: TrainConfig, teacher_path: str | None, reader: CacheReader | None, log) -> tuple:
    """(model, tokenizer, name, num_ids): the student, its tokenizer checked against the cache's, and the number of
    token ids the loss sees (the cache's; without a cache the smaller of the embedding rows and the tokenizer)."""
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
    return model, tokenizer, student_name, num_ids


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
        return (student_from_config(config.student_config, vocab_size or len(tokenizer)), tokenizer,
                config.student_config)
    except (FileNotFoundError, OSError) as exc:
        raise TrainError(str(exc)) from exc


def gradient_checkpointing(model) -> None:
    """{gradient_checkpointing}: recompute activations in the backward pass, or refuse for a student without it."""
    try:
        enable_gradient_checkpointing(model)
    except ValueError as exc:
        raise TrainError(f"{{gradient_checkpointing}}: {exc}; train without it, or with a smaller {{batch_tokens}}") \
            from exc


def lr_schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up, then cosine from 1 to 0.1."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def training_settings(config: TrainConfig, reader: CacheReader | None) -> dict:
    """The settings besides the data order that a bit-exact resume depends on (kept in each checkpoint)."""
    return {"loss": config.loss, "alpha": config.alpha, "temperature": config.temperature,
            "beta": config.beta if config.loss == "jsd" else None,
            "skew": config.skew if config.loss in ("skl", "srkl") else None,
            "target_bucket": config.target_bucket, "tail_samples": uses_tail_samples(config, reader),
            "lr": config.lr, "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
            "clip": config.clip, "grad_accum": config.grad_accum, "bf16": config.bf16}


def check_resume_state(state: dict, data_state: dict, training: dict, total_steps: int, path: str) -> int:
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


def resume(path: str, model, optimizer, scheduler, total_steps: int, schedule_steps: int, log) -> tuple:
    """(step, cursors, non-finite steps skipped) of checkpoint `path`, its weights and states loaded into the model,
    optimizer and scheduler."""
    try:
        state = load_checkpoint(path, model, optimizer, scheduler)
    except ValueError as exc:
        raise TrainError(f"{exc}; resume with the student the run started with, or start over with {{overwrite}}") \
            from exc
    log(f"resumed from {path} at step {state['step']}" + (f"; steps {schedule_steps + 1}-{total_steps} run at the "
        "final learning rate (the schedule keeps the run's first horizon)" if total_steps > schedule_steps else ""))
    return state["step"], state["cursors"], state.get("nonfinite_skips", 0)
