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

The setup the loop needs lives beside it: trainer/run_data.py (the cache, the held-out split, the mix, the
batches), trainer/run_setup.py (the student, the schedule, resuming), trainer/run_loss.py (the step's loss and the
held-out metrics), trainer/step.py (the forward, the optimizer, the processes). This file keeps the loop and the
rules that stop it.

Knows the loop's parts (the modules above, checkpoint.py, metrics.py, run_folder.py) and torch's optimizer and
process group; never imports the cacher.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from shared.errors import flagged
from trainer.checkpoint import latest_checkpoint, read_state, save_checkpoint
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.metrics import MetricsLog
from trainer.run_data import (
    check_context,
    count_steps,
    heldout_batches,
    mix_sources,
    open_cache,
    split_data,
    training_batches,
)
from trainer.run_folder import RunFolder
from trainer.run_loss import (
    batch_loss,
    evaluate_heldout,
)
from trainer.run_setup import (
    check_resume_state,
    find_teacher,
    gradient_checkpointing,
    lr_schedule,
    prepare_student,
    resume,
    training_settings,
)
from trainer.step import (
    data_workers,
    ddp,
    gpu_peak_bytes,
    init_distributed,
    make_optimizer,
    no_sync,
    nonfinite_step,
    packing_row_tokens,
    setup_step,
)
from trainer.throughput import peak_flops, step_flops

# ---------------------------------------------------------------------------------------------
# the rules that stop a run


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
    rank, world, device = init_distributed()
    log = log if rank == 0 else (lambda message: None)
    folder = RunFolder.open(config.out, resume=config.resume, overwrite=config.overwrite, log=log) if rank == 0 else None
    try:
        return _train(config, folder, rank, world, device, progress=progress, log=log)
    except Exception as exc:
        if folder is not None:
            _record_failure(folder, exc)
        raise
    finally:
        if folder is not None:
            folder.release()


def _record_failure(folder: RunFolder, exc: Exception) -> None:
    """A run.json that still says "running" when an error stops the run (a damaged row in a batch, a full disk)
    says "failed", with the error, as the rules above record theirs (_failed)."""
    try:
        with open(os.path.join(folder.path, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(run, dict) and run.get("status") == "running":
        folder.write_json("run.json", {**run, "status": "failed", "error": str(exc) or type(exc).__name__})


def _train(config: TrainConfig, folder: RunFolder | None, rank: int, world: int, device: torch.device, *, progress,
           log) -> dict:
    """train()'s body, with --out held (`folder`, rank 0 only; None on the other ranks)."""
    if world > 1:
        torch.distributed.barrier()

    # -- cache, student, data ------------------------------------------------------------------
    reader = open_cache(config, log) if config.cache else None
    teacher_path = find_teacher(config, reader)
    model, tokenizer, student_name, num_ids = prepare_student(config, teacher_path, reader, log)
    train_src, eval_src, data_info = split_data(config, reader, tokenizer)
    mixed, mix_state = mix_sources(config, reader, log)  # () or (the mix cache's source,)
    check_context(config, model, student_name, [(config.cache, (train_src, eval_src)), (config.mix_cache, mixed)])
    if "teacher_outcomes" in data_info:
        log(f"teacher targets: {data_info['teacher_outcomes']}")
    eval_batches = heldout_batches(eval_src, config.batch_tokens)
    row_tokens = packing_row_tokens(model, config.pack,
                                    np.concatenate([src.lengths for src in (train_src, eval_src, *mixed)]))
    data_state = {"seed": config.seed, "batch_tokens": config.batch_tokens, "eval_fraction": config.eval_fraction,
                  "num_train_sequences": len(train_src), "world_size": world,
                  "cache_key": reader.manifest.cache_key if reader else None, "row_tokens": row_tokens,
                  **mix_state}
    training = training_settings(config, reader)
    total_steps = count_steps(config, train_src, world, row_tokens, mixed)

    # -- model, optimizer, checkpoint ----------------------------------------------------------
    ckpt = latest_checkpoint(config.out) if config.resume else None
    schedule_steps = total_steps  # the LR schedule's horizon; a resumed run keeps the one it started with
    if ckpt is not None:
        schedule_steps = check_resume_state(read_state(ckpt), data_state, training, total_steps, ckpt)
    model.to(device).train()
    if config.gradient_checkpointing:
        gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_schedule(s, config.warmup_steps,
                                                                                   schedule_steps))
    step, cursors, skipped = 0, [None] * world, 0  # skipped: steps not applied (non-finite), --skip-nonfinite
    if ckpt is not None:
        step, cursors, skipped = resume(ckpt, model, optimizer, scheduler, total_steps, schedule_steps, log)
    setup = setup_step(model, device=device, compile_setting=config.compile, num_ids=num_ids,
                       wrap=(lambda m: ddp(m, device)) if world > 1 else None)
    workers = data_workers(config.data_workers, device)
    log(f"step: {'logits from the hidden states chunk by chunk' if setup.head_weight is not None else 'full logits'}"
        f"{', compiled' if setup.compiled else ''}{', gradient checkpointing' if config.gradient_checkpointing else ''}; "
        f"{'packed' if row_tokens else 'padded'} rows; "
        f"{workers or 'no'} data worker process(es)")
    batcher = training_batches(config, train_src, mixed, cursors[rank], rank=rank, world_size=world,
                               row_tokens=row_tokens, num_workers=workers, device=device)
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
                with no_sync(setup.forward) if (world > 1 and not last_micro) else contextlib.nullcontext():
                    loss, stats = batch_loss(setup.forward, batch, config, num_ids, head_weight=setup.head_weight,
                                              chunk_tokens=setup.chunk_tokens)
                    (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                ce_sum += float(stats["ce"]) / config.grad_accum
                kd_sum += float(stats["kd"]) / config.grad_accum
                step_tokens += batch.num_tokens
                flops += step_flops(model, batch.sequence_lengths)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip) if config.clip > 0 else
                              torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            reason = nonfinite_step(loss_sum, grad_norm, world, device)
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
                    "gpu_peak_bytes": gpu_peak_bytes(device)}
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
