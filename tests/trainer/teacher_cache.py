"""Teacher caches for trainer tests, written with torch and shared.writer.CacheWriter (no cacher).

The trainer must not depend on the cacher, and neither do its tests: `write_teacher_cache` runs a
tiny teacher over token windows of tiny Shakespeare itself and writes what storage_layout.md asks
for (top-K of the float32 log-softmax, the tail `log1p(-sum exp top-K)` in float64, the real next
token's log-prob, a loss mask false on each last row, meta with `text_sha256` / `window_index`).
`train_tiny_teacher` gives a teacher a few optimizer steps on Shakespeare so it beats a fresh student.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from shared.writer import BuildHeader, CacheWriter
from tests.conftest import build_tiny_model, shakespeare_text


def shakespeare_windows(tokenizer, *, num_sequences: int, max_length: int) -> list[dict]:
    """Paragraphs of Shakespeare cut into windows of max_length tokens, as the cacher's text mode does."""
    paragraphs = [p for p in shakespeare_text(100_000).split("\n\n") if p.strip()]
    out = []
    for source_index, text in enumerate(paragraphs):
        ids = tokenizer(text)["input_ids"]
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        for window_index, start in enumerate(range(0, len(ids), max_length)):
            window = np.asarray(ids[start:start + max_length], dtype=np.int64)
            if len(window) < 2:
                continue
            out.append({"input_ids": window, "source_index": source_index, "window_index": window_index,
                        "text_sha256": digest})
            if len(out) == num_sequences:
                return out
    return out


def train_tiny_teacher(out_dir: Path, tokenizer_dir: Path, *, seed: int = 1, steps: int = 40,
                       lr: float = 3e-3) -> Path:
    """A 2-layer GPT-2 (seed `seed`) trained `steps` AdamW steps on 8 x 64-token Shakespeare windows."""
    from transformers import AutoModelForCausalLM

    build_tiny_model(out_dir, "gpt2", tokenizer_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(out_dir)(shakespeare_text(60_000))["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])  # (B, 65)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def draw_tail(logp: torch.Tensor, top_ids: torch.Tensor, num_samples: int, generator: torch.Generator):
    """storage_layout.md 3.3 by hand: num_samples draws per row outside the top K, as distinct ids with
    counts (most drawn first, ties by id), unused slots holding the smallest ids not otherwise in the row."""
    p = logp.double().exp()
    p.scatter_(1, top_ids, 0.0)
    draws = torch.multinomial(p, num_samples, replacement=True, generator=generator).numpy()  # (T, M)
    ids = np.zeros(draws.shape, dtype=np.int64)
    counts = np.zeros(draws.shape, dtype=np.int64)
    for r, row in enumerate(draws):
        uniq, cnt = np.unique(row, return_counts=True)
        order = np.lexsort((uniq, -cnt))
        used = len(uniq)
        ids[r, :used], counts[r, :used] = uniq[order], cnt[order]
        taken = set(top_ids[r].tolist()) | set(uniq.tolist())
        ids[r, used:] = [i for i in range(p.shape[1]) if i not in taken][: num_samples - used]
    return ids, counts


@torch.no_grad()
def teacher_rows(model, input_ids: np.ndarray, top_k: int, tail_samples: int = 0,
                 generator: torch.Generator | None = None) -> dict:
    """The cache arrays of one sequence from a direct forward pass (plus tail samples if asked)."""
    ids = torch.as_tensor(input_ids)[None]  # (1, T)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    top_lp, top_ids = torch.topk(logp, top_k, dim=-1)  # (T, K)
    mass = top_lp.double().exp().sum(-1)  # (T,)
    tail = torch.log1p(-mass.clamp(max=1.0))  # -inf when the top K hold everything
    target = torch.full((len(input_ids),), float("nan"), dtype=torch.float64)
    target[:-1] = logp[torch.arange(len(input_ids) - 1), ids[0, 1:]].double()
    loss_mask = np.ones(len(input_ids), dtype=bool)
    loss_mask[-1] = False
    out = {"topk_ids": top_ids.numpy(), "topk_logprobs": top_lp.numpy(), "tail_logprob": tail.numpy(),
           "target_logprob": target.numpy(), "loss_mask": loss_mask}
    if tail_samples:
        out["tail_ids"], out["tail_counts"] = draw_tail(logp, top_ids, tail_samples, generator)
    return out


def write_teacher_cache(url: str, teacher_dir: Path, *, num_sequences: int = 120, max_length: int = 64,
                        top_k: int = 16, shard_tokens: int = 2000, chunk_rows: int = 512, tail_samples: int = 0) -> str:
    """Run the teacher over Shakespeare windows and write a complete cache at url; returns url."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tokenizers import vocab_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    sequences = shakespeare_windows(tokenizer, num_sequences=num_sequences, max_length=max_length)
    shards, size = [[]], 0
    for i, seq in enumerate(sequences):
        if size and size + len(seq["input_ids"]) > shard_tokens:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += len(seq["input_ids"])
    fingerprint = hashlib.sha256(b"".join(s["input_ids"].tobytes() for s in sequences)).hexdigest()
    header = BuildHeader(
        teacher={"name": Path(teacher_dir).name, "dtype": "float32", "engine": "test", "engine_version": "0",
                 "path": str(teacher_dir)},
        tokenizer={"name": Path(teacher_dir).name, "vocab_size": model.config.vocab_size,
                   "vocab_sha256": vocab_fingerprint(tokenizer)},
        dataset={"name": "tinyshakespeare-paragraphs", "fingerprint": fingerprint, "num_sequences": len(sequences)},
        settings={"mode": "score", "top_k": top_k, "max_length": max_length, "chunk_rows": chunk_rows,
                  **({"tail_samples": tail_samples} if tail_samples else {})},
        num_shards=len(shards),
    )
    generator = torch.Generator().manual_seed(0)
    with CacheWriter(url, header, chunk_rows=chunk_rows) as writer:
        for s in writer.pending_shards():
            with writer.shard(s) as buf:
                for i in shards[s]:
                    seq = sequences[i]
                    buf.add_sequence(input_ids=seq["input_ids"], **teacher_rows(model, seq["input_ids"], top_k, tail_samples, generator),
                                     source_index=seq["source_index"], window_index=seq["window_index"],
                                     text_sha256=seq["text_sha256"])
        writer.finalize()
    return url
