"""Peak memory of one loss forward + backward on (N, V) logits: sparse KD vs plain CE vs dense KD.

Each loss runs in its own child process (so one's high-water mark cannot hide another's). The child
allocates the logits and the cached teacher fields, records its resident set size, runs the loss and
its backward once, and reports the growth of its peak RSS (VmHWM, reset first) over that point, in units of one
(N, V) float32 logits tensor. Large tensors are served by mmap and given back on free, so RSS tracks
live tensors. On a GPU the same numbers come from torch.cuda.max_memory_allocated.

  python -m bench.loss_memory --quick     # N = 2048, V = 49152 (SmolLM2's vocabulary), K = 64
  python -m bench.loss_memory             # N = 8192

Expected: CE keeps log-probs and their gradient (about 2 logits); the fused sparse KD keeps one gradient
buffer plus per-chunk temporaries (about 1 + chunk/N); dense KD (the reference) several.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOSSES = ("ce", "sparse_kd", "dense_kd")


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(kind: str, num_tokens: int, vocab: int, top_k: int, chunk_tokens: int) -> dict:
    import torch

    from trainer.losses import cross_entropy_loss, dense_kd_loss, sparse_kd_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, vocab, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    teacher_logits = None
    if kind == "dense_kd":
        teacher_logits = torch.randn(num_tokens, vocab, generator=gen)
    ids = torch.randperm(vocab, generator=gen)[:top_k].repeat(num_tokens, 1)
    logprobs = torch.log_softmax(torch.randn(num_tokens, top_k, generator=gen), -1).sort(-1, descending=True)[0] - 0.1
    tail = torch.full((num_tokens,), -2.3)
    logits_bytes = logits.numel() * logits.element_size()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        logits = logits.detach().cuda().requires_grad_()
        targets, mask, ids, logprobs, tail = (t.cuda() for t in (targets, mask, ids, logprobs, tail))
        teacher_logits = None if teacher_logits is None else teacher_logits.cuda()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    if kind == "ce":
        loss = cross_entropy_loss(logits, targets, mask)
    elif kind == "sparse_kd":
        loss, _ = sparse_kd_loss(logits, ids, logprobs, tail, targets, mask, chunk_tokens=chunk_tokens)
    else:
        loss, _ = dense_kd_loss(logits, teacher_logits, targets, mask)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if on_gpu else _status_bytes("VmHWM")
    return {"loss": kind, "extra_peak_bytes": peak - before, "logits_bytes": logits_bytes,
            "extra_peak_in_logits": (peak - before) / logits_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="2048 tokens (a CPU)")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=LOSSES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens = 2048
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.top_k, args.chunk_tokens)))
        return None
    from bench.common import emit

    results = {}
    for kind in LOSSES:
        out = subprocess.run([sys.executable, "-m", "bench.loss_memory", "--child", kind, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--top-k", str(args.top_k),
                              "--chunk-tokens", str(args.chunk_tokens)],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    ce = results["ce"]["extra_peak_bytes"]
    return emit({"id": "P1-memory", "tokens": args.tokens, "vocab": args.vocab, "top_k": args.top_k,
                 "chunk_tokens": args.chunk_tokens,
                 **{f"{k}_extra_peak_in_logits": round(v["extra_peak_in_logits"], 3) for k, v in results.items()},
                 "sparse_kd_over_ce_peak": results["sparse_kd"]["extra_peak_bytes"] / ce,
                 "dense_kd_over_ce_peak": results["dense_kd"]["extra_peak_bytes"] / ce}, args.json)


if __name__ == "__main__":
    main()
