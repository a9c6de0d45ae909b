"""P1: offline sparse-KD step time / plain CE step time, same student, batch and data, K=64. Target <= 1.10.

One optimizer step as trainer/train.py takes it: student forward on the collated batch
(trainer.data.collate of rows as the cache stores them), the loss (trainer.losses.sparse_kd_loss with
fkl, or cross_entropy_loss for `--loss ce`), backward, gradient clip, AdamW step. The two steps are
alternated on the same batch, median of the per-pair ratios. The student is a layer-dropped copy of
the teacher (trainer.student.student_from_teacher) with ~param-ratio fewer parameters, the teacher's
top-K are real (cacher.engines.score_hf on real text, stored through shared.writer's validation).
The loss alone (forward + backward on fixed logits) is timed too, to say where an overhead comes from.

  python -m bench.p1_kd_overhead --quick       # SmolLM2-135M -> 1-layer student, 1 x 256 tokens, CPU
  python -m bench.p1_kd_overhead               # 8 x 512 tokens (a GPU)
"""

from __future__ import annotations

import argparse

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


def flat(batch: dict, name: str) -> torch.Tensor:
    value = batch[name]
    return value.reshape(-1, *value.shape[2:])  # (B, L, ...) -> (B*L, ...)


def kd_or_ce(flat_logits: torch.Tensor, batch: dict, kind: str) -> torch.Tensor:
    """The loss trainer/train.py computes: "ce" or a KD loss name."""
    from trainer.losses import cross_entropy_loss, sparse_kd_loss

    targets, mask = flat(batch, "target_ids"), flat(batch, "loss_mask")
    if kind == "ce":
        return cross_entropy_loss(flat_logits, targets, mask)
    return sparse_kd_loss(flat_logits, flat(batch, "topk_ids"), flat(batch, "topk_logprobs"),
                          flat(batch, "tail_logprob"), targets, mask, loss=kind)[0]


def make_step(model, optimizer, batch: dict, kind: str, bf16: bool = False):
    """One training step as trainer/train.py's loop runs it; kind = "ce" or a KD loss name."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*L, V)
        loss = kd_or_ce(flat_logits, batch, kind)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device() == "cuda":
            torch.cuda.synchronize()

    return step


def make_loss_only(logits: torch.Tensor, batch: dict, kind: str):
    """Forward + backward of the loss alone on fixed (N, V) logits."""
    leaf = logits.detach().requires_grad_(True)

    def run():
        leaf.grad = None
        kd_or_ce(leaf, batch, kind).backward()
        if device() == "cuda":
            torch.cuda.synchronize()

    return run


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
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the student forward (as --bf16)")
    ap.add_argument("--quick", action="store_true", help="1 x 256 tokens, 5 repeats (a 2-core CPU)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_length, args.repeats = 1, 256, 5
    from cacher.engines import load_hf_teacher, score_hf
    from cacher.models import load_tokenizer
    from trainer.data import collate
    from trainer.student import student_from_teacher

    torch.manual_seed(0)
    path = model_path(args.model)
    teacher = load_hf_teacher(path, dtype="float32")
    seqs = real_sequences(load_tokenizer(path), args.batch_size * args.max_length, args.max_length)[: args.batch_size]
    results = score_hf(teacher, seqs, top_k=args.top_k)
    keep = args.keep_layers or keep_layers_for_ratio(teacher.model, args.param_ratio)
    teacher_params, vocab_size = num_parameters(teacher.model), teacher.vocab_size
    del teacher
    batch = collate(split_rows(stored_rows(seqs, results, vocab_size, args.top_k)), has_teacher=True)
    batch = {k: (v.to(device()) if torch.is_tensor(v) else v) for k, v in batch.items()}

    student = student_from_teacher(path, keep).to(device()).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.95))
    ce_step = make_step(student, optimizer, batch, "ce", args.bf16)
    kd_step = make_step(student, optimizer, batch, args.loss, args.bf16)
    t_ce, t_kd = alternate(ce_step, kd_step, args.repeats)
    ratio = paired_ratio(t_kd, t_ce)

    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    l_ce, l_kd = alternate(make_loss_only(logits, batch, "ce"), make_loss_only(logits, batch, args.loss), args.repeats)
    emit({"id": "P1", "model": args.model, "student_layers": keep, "student_params": num_parameters(student),
          "teacher_params": teacher_params, "top_k": args.top_k, "loss": args.loss, "bf16": args.bf16,
          "batch": [args.batch_size, args.max_length], "tokens": int(batch["num_tokens"]), "repeats": args.repeats,
          "ce_step_s_median": median(t_ce), "kd_step_s_median": median(t_kd),
          "ratio_kd_over_ce": ratio, "ratio_of_medians": median(t_kd) / median(t_ce),
          "loss_only_ratio_kd_over_ce": paired_ratio(l_kd, l_ce),
          "loss_only_extra_s_over_ce_step": (median(l_kd) - median(l_ce)) / median(t_ce),
          "target": "<= 1.10", "met": ratio <= 1.10}, args.json)


if __name__ == "__main__":
    main()
