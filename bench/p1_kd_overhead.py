"""P1: offline sparse-KD step time / plain CE step time, same student, batch and data, K=64. Target <= 1.10.

One optimizer step exactly as trainer/train.py takes it: the student's forward as trainer.step.setup_step
builds it for `kdtrain run` (for a plain linear head, the student without its head: hidden states), the
step's loss through trainer.run_loss.batch_loss with TrainConfig's defaults (fkl, alpha 0, T 1, the target bucket,
i.e. K + 2 outcomes from the cache's target_logprob; for a plain linear head the logits are made from the
hidden states chunk by chunk by trainer.losses.linear_kd_loss, CE included, so `--loss ce` is the same
chunked path without the teacher), backward, gradient clip, AdamW (fused on CUDA). The batch is
trainer.batch.collate of rows as the cache stores them, moved to the device. The two steps are alternated
on the same batch, median of the per-pair ratios. The student is a layer-dropped copy of the teacher
(trainer.student.student_from_teacher) with ~param-ratio fewer parameters, the teacher's top-K are real
(cacher.engine_hf.score_hf on real text, stored through shared.writer's validation).
The loss alone (forward + backward on fixed hidden states or logits) is timed too, to say where an overhead
comes from. With --tail-split K+M (default 48+16) the same is timed for a cache built with `--top-k K
--tail-samples M` (what the trainer does with such a cache: tail_sample_targets, K + M outcomes), an extra
printed ratio. --compare-logits also times the KD step with the full-logits loss (sparse_kd_loss on the
model's logits, the trainer's fallback for other heads) against the chunked one: ratio_linear_over_logits_kd.
--compile on|off|auto: torch.compile the forward as `kdtrain run --compile` (default off here: compiling
takes minutes on a GPU and the ratio compares two steps that share the forward).

--profile runs torch.profiler over a few more steps of each kind and prints the top ops by self CPU time
and the share of the step spent in the loss (its forward region plus its autograd backward nodes), so a
claim such as "the loss is 4-5% of a step" is read off a profile.

  python -m bench.p1_kd_overhead --quick       # SmolLM2-135M -> 1-layer student, 1 x 256 tokens, CPU
  python -m bench.p1_kd_overhead               # 8 x 512 tokens (a GPU)
  python -m bench.p1_kd_overhead --quick --profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (
    alternate,
    device,
    emit,
    keep_layers_for_ratio,
    median,
    model_path,
    num_parameters,
    paired_ratio,
    raw_rows,
    real_sequences,
    split_rows,
    stored_rows,
)


def trainer_config(**changes):
    """TrainConfig's defaults (what `kdtrain run` uses when no flag is given), with `changes`, as a namespace."""
    from dataclasses import MISSING, fields
    from types import SimpleNamespace

    from trainer.train import TrainConfig

    values = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return SimpleNamespace(**{**values, **changes})


def step_loss(setup, batch, kind: str, num_ids: int, bf16: bool = False):
    """The loss `kdtrain run --loss kind` computes on the batch (kind "ce" or a KD loss name), as its step does."""
    from trainer.run_loss import batch_loss

    return batch_loss(setup.forward, batch, trainer_config(loss=kind, bf16=bf16), num_ids,
                      head_weight=setup.head_weight, chunk_tokens=setup.chunk_tokens)[0]


def alternate_cpu(a, b, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """bench.common.alternate timed by this process's CPU seconds (time.process_time) instead of wall time."""
    import time

    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.process_time()
            fn()
            out.append(time.process_time() - t0)
    return ta, tb


def _region(name: str, profiling: bool):
    from contextlib import nullcontext

    return torch.profiler.record_function(name) if profiling else nullcontext()


def make_step(setup, model, optimizer, batch, kind: str, num_ids: int, bf16: bool = False, profiling: bool = False):
    """One training step as trainer/train.py's loop runs it; kind = "ce" or a KD loss name.

    The "step.loss" region is the whole loss call (student forward included: trainer.run_loss.batch_loss runs both);
    "step.forward" is the student's forward alone, timed inside it by a forward hook pair.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if profiling:
        _time_forward(setup.forward)

    def step():
        with _region("step", profiling):
            with _region("step.loss", profiling):
                loss = step_loss(setup, batch, kind, num_ids, bf16)
            with _region("step.backward", profiling):
                loss.backward()
            with _region("step.optimizer", profiling):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device() == "cuda":
                torch.cuda.synchronize()

    return step


def _time_forward(module) -> None:
    """A "step.forward" profiler region around every call of module (forward pre-hook opens it, hook closes it)."""
    if getattr(module, "_p1_timed", False):
        return
    open_regions = []

    def enter(mod, args, kwargs):
        region = torch.profiler.record_function("step.forward")
        region.__enter__()
        open_regions.append(region)

    def leave(mod, args, kwargs, output):
        open_regions.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True)
    module._p1_timed = True


def make_loss_only(setup, model, batch, kind: str, num_ids: int, bf16: bool = False):
    """Forward + backward of the loss alone on the student's fixed hidden states (or logits, without a plain head)."""
    from trainer.losses import cross_entropy_loss, linear_kd_loss, sparse_kd_loss
    from trainer.run_loss import loss_options, teacher_targets, token_logits

    config = trainer_config(loss=kind, bf16=bf16)
    with torch.no_grad(), torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
        out = setup.forward(**batch.model_inputs(), use_cache=False)
    fixed = out if setup.head_weight is not None else token_logits(out.logits, num_ids)
    leaf = fixed.reshape(-1, fixed.shape[-1]).detach().requires_grad_(True)  # (N, H) or (N, V)
    targets, mask = batch.target_ids.reshape(-1), batch.loss_mask.reshape(-1)
    teacher = teacher_targets(batch.teacher.flat() if kind != "ce" else None, config)

    def run():
        leaf.grad = None
        if setup.head_weight is not None:
            loss, _ = linear_kd_loss(leaf, setup.head_weight, *teacher[:3], targets, mask, loss_options(config),
                                     num_ids=num_ids, matmul_dtype=torch.bfloat16 if bf16 else None,
                                     chunk_tokens=setup.chunk_tokens, target_logprob=teacher[3])
        elif kind == "ce":
            loss = cross_entropy_loss(leaf, targets, mask)
        else:
            loss, _ = sparse_kd_loss(leaf, *teacher[:3], targets, mask, loss_options(config), target_logprob=teacher[3])
        loss.backward()
        if device() == "cuda":
            torch.cuda.synchronize()

    return run


# Autograd nodes that are the loss's own backward (the rest of backward is the model's):
# F.cross_entropy = log_softmax + nll_loss; the fused losses' backward scales their saved gradients.
LOSS_BACKWARD_NODES = ("NllLossBackward", "LogSoftmaxBackward", "FusedSparseKDBackward", "FusedLinearKDBackward",
                       "DivBackward")


def profile_step(step, steps: int, row_limit: int = 15) -> dict:
    """torch.profiler over `steps` calls of step (after one warm-up): top ops by self CPU time, loss share.

    Returns {"table": the printed table, "step_ms", "loss_ms", "loss_share", "regions_ms"}: CPU totals per
    step of the step.* regions; loss_ms = the step.loss region less the student's forward in it, plus the loss's
    autograd backward nodes.
    """
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device() == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total / 1000.0 / steps for e in events}  # ms per step
    regions = {k: v for k, v in totals.items() if k.startswith("step")}
    nodes = {k.split(": ", 1)[1]: v for k, v in totals.items() if k.startswith("autograd::engine::evaluate_function: ")
             and k.split(": ", 1)[1].startswith(LOSS_BACKWARD_NODES)}
    loss_ms = regions.get("step.loss", 0.0) - regions.get("step.forward", 0.0) + sum(nodes.values())
    step_ms = regions.get("step", float("nan"))
    return {"table": events.table(sort_by="self_cpu_time_total", row_limit=row_limit), "step_ms": step_ms,
            "loss_ms": loss_ms, "loss_share": loss_ms / step_ms, "regions_ms": regions, "loss_backward_ms": nodes}


def tail_split_batch(teacher, seqs, vocab_size: int, spec: str):
    """A collated batch as `kdcache build --top-k K --tail-samples M` stores it (spec "K+M")."""
    from cacher.engine_hf import score_hf
    from shared.writer import validate_shard_arrays
    from trainer.batch import collate

    k, m = (int(x) for x in spec.split("+"))
    results = score_hf(teacher, seqs, top_k=k, tail_samples=m, tail_seed=0, sample_keys=[(i, 0) for i in range(len(seqs))])
    arrays = raw_rows(seqs, results, k)
    arrays.update(tail_ids=np.concatenate([r["tail_ids"] for r in results]),
                  tail_counts=np.concatenate([r["tail_counts"] for r in results]))
    stored = validate_shard_arrays(arrays, vocab_size=vocab_size, top_k=k, where="bench", tail_samples=m)
    return collate(split_rows(stored), has_teacher=True)


def trainer_optimizer(model, lr: float = 1e-5):
    """AdamW as trainer/train.py builds it (trainer.step.make_optimizer, TrainConfig's weight decay)."""
    from trainer.step import make_optimizer

    return make_optimizer(model, lr=lr, weight_decay=trainer_config().weight_decay, device=torch.device(device()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="teacher (the student is its layer-dropped copy)")
    ap.add_argument("--param-ratio", type=float, default=4.0, help="teacher params / student params, at least")
    ap.add_argument("--keep-layers", type=int, help="student layers (overrides --param-ratio)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--tail-split", default="48+16",
                    help="K+M: also time the step on a top-K + M tail samples cache (fkl); empty: skip")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the student forward (as --bf16)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the KD and the CE step (torch.profiler): top ops by self CPU time, loss share")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--compile", default="off", choices=("auto", "on", "off"),
                    help="torch.compile the forward as `kdtrain run --compile` (default off: compiling takes minutes)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU seconds with torch on one thread (a machine shared with other "
                         "work)")
    ap.add_argument("--compare-logits", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the KD step with the full-logits loss against the trainer's chunked one")
    ap.add_argument("--quick", action="store_true", help="1 x 256 tokens, 5 repeats (a 2-core CPU)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.repeats = 1, 256, 5
    from cacher.engine_hf import load_hf_teacher, score_hf
    from common.tokenizers import load_tokenizer
    from trainer.batch import collate
    from trainer.step import StepSetup, setup_step
    from trainer.student import student_from_teacher

    torch.manual_seed(0)
    path = model_path(args.model)
    teacher = load_hf_teacher(path, dtype="float32")
    seqs = real_sequences(load_tokenizer(path), args.batch_size * args.max_length, args.max_length)[: args.batch_size]
    results = score_hf(teacher, seqs, top_k=args.top_k)
    keep = args.keep_layers or keep_layers_for_ratio(teacher.model, args.param_ratio)
    teacher_params, vocab_size = num_parameters(teacher.model), teacher.vocab_size
    tail_batch = None
    if args.tail_split and args.loss == "fkl":  # the trainer uses tail samples with forward KL only
        tail_batch = tail_split_batch(teacher, seqs, vocab_size, args.tail_split).to(device())
    del teacher
    batch = collate(split_rows(stored_rows(seqs, results, vocab_size, args.top_k)), has_teacher=True).to(device())
    mask = batch.loss_mask
    outside = ~(batch.teacher.topk_ids == batch.target_ids[..., None]).any(-1) & mask  # rows with a target bucket

    student = student_from_teacher(path, keep).to(device()).train()
    optimizer = trainer_optimizer(student)
    setup = setup_step(student, device=torch.device(device()), compile_setting=args.compile, num_ids=vocab_size)
    ce_step = make_step(setup, student, optimizer, batch, "ce", vocab_size, args.bf16)
    kd_step = make_step(setup, student, optimizer, batch, args.loss, vocab_size, args.bf16)
    if args.cpu_time:
        torch.set_num_threads(1)
    timed = alternate_cpu if args.cpu_time else alternate
    t_ce, t_kd = timed(ce_step, kd_step, args.repeats)
    ratio = paired_ratio(t_kd, t_ce)
    extra = {"loss_path": "hidden states + head, chunked" if setup.head_weight is not None else "full logits"}
    if tail_batch is not None:
        tail_step = make_step(setup, student, optimizer, tail_batch, args.loss, vocab_size, args.bf16)
        t_ce2, t_tail = timed(ce_step, tail_step, args.repeats)
        extra["ratio_tail_samples_kd_over_ce"] = paired_ratio(t_tail, t_ce2)
        extra["tail_split"] = args.tail_split
    if args.compare_logits and setup.head_weight is not None:  # the fallback path: the model's own logits
        logits_setup = StepSetup(student, None, setup.chunk_tokens, False)
        logits_kd = make_step(logits_setup, student, optimizer, batch, args.loss, vocab_size, args.bf16)
        t_linear, t_logits = timed(kd_step, logits_kd, args.repeats)
        extra["ratio_linear_over_logits_kd"] = paired_ratio(t_linear, t_logits)

    l_ce, l_kd = timed(make_loss_only(setup, student, batch, "ce", vocab_size, args.bf16),
                           make_loss_only(setup, student, batch, args.loss, vocab_size, args.bf16), args.repeats)
    if args.profile:
        for kind, b in (("ce", batch), (args.loss, batch)) + ((("tail", tail_batch),) if tail_batch else ()):
            prof = profile_step(make_step(setup, student, optimizer, b, args.loss if kind == "tail" else kind,
                                          vocab_size, args.bf16, profiling=True), args.profile_steps)
            print(f"\n== profile: {kind} step ({args.profile_steps} steps; ms are CPU totals per step)")
            print(prof["table"])
            print("regions: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(prof["regions_ms"].items())))
            print("loss backward nodes: " + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["loss_backward_ms"].items()))
            print(f"loss (its region less the student's forward, plus its backward nodes): {prof['loss_ms']:.1f} ms of "
                  f"a {prof['step_ms']:.1f} ms step = {100 * prof['loss_share']:.1f}%", flush=True)
            extra[f"profile_{kind}"] = {k: v for k, v in prof.items() if k != "table"}
    emit({"id": "P1", "model": args.model, "student_layers": keep, "student_params": num_parameters(student),
          "teacher_params": teacher_params, "top_k": args.top_k, "loss": args.loss, "bf16": args.bf16,
          "target_bucket": trainer_config().target_bucket, "target_bucket_rows": int(outside.sum()),
          "loss_rows": int(mask.sum()),
          "batch": [args.batch_size, args.max_length], "tokens": batch.num_tokens, "repeats": args.repeats,
          "clock": "process CPU seconds, 1 thread" if args.cpu_time else "wall",
          "compile": setup.compiled,
          "ce_step_s_median": median(t_ce), "kd_step_s_median": median(t_kd),
          "ratio_kd_over_ce": ratio, "ratio_of_medians": median(t_kd) / median(t_ce),
          "loss_only_ratio_kd_over_ce": paired_ratio(l_kd, l_ce),
          "loss_only_extra_s_over_ce_step": (median(l_kd) - median(l_ce)) / median(t_ce), **extra,
          "target": "<= 1.10", "met": ratio <= 1.10}, args.json)


if __name__ == "__main__":
    main()
