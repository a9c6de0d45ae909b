"""P2: online dense-KD step (teacher forward every step) / offline sparse-KD step. Target >= 2.0.

The teacher has >= --param-ratio (4) times the student's parameters; the student is its layer-dropped
copy (trainer.student.student_from_teacher). Both steps train the same student on the same batch:

- online: teacher forward under no_grad -> full (B, L, V) logits, student forward,
  trainer.losses.dense_kd_loss (fkl), backward, clip, AdamW step;
- offline: the step `kdtrain run` takes (bench.p1_kd_overhead.make_step: the student's forward and the sparse KD
  loss on the cached top-K, chunked from the hidden states for a plain linear head; real teacher rows from
  cacher.engine_hf.score_hf, stored through shared.writer's validation), backward, clip, step.

Alternated, median of the per-pair ratios.

  python -m bench.p2_online_vs_offline --quick     # SmolLM2-135M teacher, 1-layer student, 1 x 256 tokens
  python -m bench.p2_online_vs_offline             # 8 x 512 tokens (a GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    real_sequences,
    split_rows,
    stored_rows,
)
from bench.p1_kd_overhead import make_step, trainer_optimizer


def make_online_step(student, teacher, optimizer, batch, kind: str, bf16: bool = False):
    """Online KD: the teacher runs on every batch; the dense loss sees all V logits."""
    from trainer.losses import LossOptions, dense_kd_loss

    params = [p for p in student.parameters() if p.requires_grad]

    def step():
        with torch.no_grad(), torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
            t_logits = teacher(**batch.model_inputs()).logits  # (B, L, V)
        with torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
            logits = student(**batch.model_inputs()).logits  # (B, L, V)
        vocab = logits.shape[-1]
        loss, _ = dense_kd_loss(logits.reshape(-1, vocab), t_logits.reshape(-1, vocab)[:, :vocab],
                                batch.target_ids.reshape(-1), batch.loss_mask.reshape(-1), LossOptions(loss=kind))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device() == "cuda":
            torch.cuda.synchronize()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="teacher (the student is its layer-dropped copy)")
    ap.add_argument("--param-ratio", type=float, default=4.0, help="teacher params / student params, at least")
    ap.add_argument("--keep-layers", type=int, help="student layers (overrides --param-ratio)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 x 256 tokens, 4 repeats (a 2-core CPU)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.repeats = 1, 256, 4
    from cacher.engine_hf import load_hf_teacher, score_hf
    from common.tokenizers import load_tokenizer
    from trainer.batch import collate
    from trainer.step import setup_step
    from trainer.student import student_from_teacher

    torch.manual_seed(0)
    path = model_path(args.model)
    teacher = load_hf_teacher(path, dtype="float32")
    seqs = real_sequences(load_tokenizer(path), args.batch_size * args.max_length, args.max_length)[: args.batch_size]
    results = score_hf(teacher, seqs, top_k=args.top_k)
    keep = args.keep_layers or keep_layers_for_ratio(teacher.model, args.param_ratio)
    vocab = teacher.vocab_size
    batch = collate(split_rows(stored_rows(seqs, results, vocab, args.top_k)), has_teacher=True).to(device())

    student = student_from_teacher(path, keep).to(device()).train()
    optimizer = trainer_optimizer(student)
    setup = setup_step(student, device=torch.device(device()), compile_setting="off", num_ids=vocab)
    online = make_online_step(student, teacher.model, optimizer, batch, args.loss, args.bf16)
    offline = make_step(setup, student, optimizer, batch, args.loss, vocab, args.bf16)
    t_on, t_off = alternate(online, offline, args.repeats)
    ratio = paired_ratio(t_on, t_off)
    p_teacher, p_student = num_parameters(teacher.model), num_parameters(student)
    emit({"id": "P2", "model": args.model, "student_layers": keep, "teacher_params": p_teacher,
          "student_params": p_student, "param_ratio": p_teacher / p_student, "top_k": args.top_k, "loss": args.loss,
          "bf16": args.bf16, "batch": [args.batch_size, args.max_length], "tokens": batch.num_tokens,
          "repeats": args.repeats, "online_step_s_median": median(t_on), "offline_step_s_median": median(t_off),
          "ratio_online_over_offline": ratio, "ratio_of_medians": median(t_on) / median(t_off),
          "target": ">= 2.0", "met": ratio >= 2.0}, args.json)


if __name__ == "__main__":
    main()
