"""P3: capture tokens/s / bare teacher forward tokens/s (hf engine, same batches). Target >= 0.85.

Both sides see the same length-sorted batches of real text. "bare" is the model's own forward
producing (B, L, V) logits and nothing else; "capture" is cacher.engines.score_hf (float32 head on
hidden-state row chunks, top-K, target, tail). Alternated, median of the per-pair ratios.

A stricter second baseline, "hidden+head", runs the base model and the output head on the same row
chunks as the engine but stops at the logits (no log-softmax, top-K, gather or copies to numpy): its
ratio isolates what capturing costs beyond producing the logits.

  python -m bench.p3_capture_speed --quick          # SmolLM2-135M, 1024 tokens (4 x 256), 3 repeats
  python -m bench.p3_capture_speed --model PATH     # any local teacher
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import alternate, emit, median, model_path, paired_ratio, real_sequences


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 3 repeats")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 1024, 3
    from cacher.engines import length_sorted_batches, load_hf_teacher, score_hf
    from cacher.models import load_tokenizer

    path = model_path(args.model)
    teacher = load_hf_teacher(path, dtype=args.dtype)
    seqs = real_sequences(load_tokenizer(path), args.tokens, args.max_length)
    lengths = [len(s) for s in seqs]
    batches = length_sorted_batches(lengths, args.batch_tokens)
    num_tokens = sum(lengths)

    def padded(batch):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = torch.as_tensor(np.asarray(seqs[i], dtype=np.int64))
            attn[r, : lengths[i]] = 1
        return ids.to(teacher.device), attn.to(teacher.device)

    def sync():
        if teacher.device == "cuda":
            torch.cuda.synchronize()

    def bare():
        with torch.inference_mode():
            for batch in batches:
                ids, attn = padded(batch)
                _ = teacher.model(input_ids=ids, attention_mask=attn).logits
        sync()

    chunk_rows = max(1, (16 * 2**20) // teacher.vocab_size)  # as score_hf

    def hidden_head():
        with torch.inference_mode():
            for batch in batches:
                ids, attn = padded(batch)
                if teacher.head_weight is None:
                    _ = teacher.model(input_ids=ids, attention_mask=attn).logits
                    continue
                rows = teacher.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[attn.bool()]
                for start in range(0, rows.shape[0], chunk_rows):
                    torch.nn.functional.linear(rows[start:start + chunk_rows].float(), teacher.head_weight,
                                               teacher.head_bias)
        sync()

    def capture():
        score_hf(teacher, seqs, top_k=args.top_k, batch_tokens=args.batch_tokens)

    t_bare, t_cap = alternate(bare, capture, args.repeats)
    t_head, t_cap2 = alternate(hidden_head, capture, args.repeats)
    ratio = paired_ratio(t_bare, t_cap)
    emit({"id": "P3", "model": args.model, "dtype": args.dtype, "top_k": args.top_k, "tokens": num_tokens,
          "batch_tokens": args.batch_tokens, "repeats": args.repeats,
          "bare_tokens_per_s": num_tokens / median(t_bare), "capture_tokens_per_s": num_tokens / median(t_cap + t_cap2),
          "hidden_head_tokens_per_s": num_tokens / median(t_head),
          "ratio_capture_over_bare": ratio, "ratio_of_medians": median(t_bare) / median(t_cap),
          "ratio_capture_over_hidden_head": paired_ratio(t_head, t_cap2),
          "target": ">= 0.85", "met": ratio >= 0.85}, args.json)


if __name__ == "__main__":
    main()
