"""`kdtrain eval --metrics exposure`: KL(teacher || model) on the model's own generations (exposure bias).

A student trained on the teacher's distributions over the data's text (off-policy KD) or on the data alone (CE)
is judged on text it never writes itself; at generation time it conditions on its own earlier tokens, where it
may drift from anything the teacher taught it (exposure bias). On-policy distillation (GKD, MiniLLM) trains on
the student's own samples to close that gap. This metric measures it:

1. prompts: the held-out sequences of the teacher cache (`--cache`, trainer/data.py's held-out rule, so never
   trained on by any student of the plan), each cut where its response starts (the first row of its loss mask;
   for plain-text windows, which have no prompt: the first half of the window, at most --max-prompt-length);
2. the model samples a response to each (temperature 1, one per --seeds seed; --greedy: one greedy response),
   ending at the cache template's stop tokens or --max-length (trainer/sampling.py);
3. the teacher (`--teacher`) and the model score prompt + response, and at every position that predicts a response
   token the dense KL(p_teacher || p_model) over the cache's token ids is taken (`response_kl`).

Reported: `kl` (mean per response token), `kl_stderr` (standard error of the per-response means: how noisy the
mean is over prompts and samples), per-response sums (`sequence_kl`, `sequence_tokens`, so a report can bootstrap),
response counts and lengths, and the share that ended at a stop token. The teacher as its own model gives 0.

Knows models, the cache reader and the sampler; never imports the cacher.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.sampling import sample_responses, sample_seed, stop_ids


def response_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(softmax(teacher) || softmax(student)) per row of (N, V) logits over the same token ids, in float64."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and model logits "
                         f"{tuple(student_logits.shape)} must have one shape (rows, token ids)")
    t = torch.log_softmax(teacher_logits.double(), dim=-1)
    s = torch.log_softmax(student_logits.double(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).clamp(min=0.0)


def prompt_of(sequence: dict, max_prompt_length: int) -> list[int]:
    """A held-out cache sequence's prompt: its ids before the first response row (see the module docstring)."""
    ids = np.asarray(sequence["input_ids"], dtype=np.int64)
    rows = np.flatnonzero(np.asarray(sequence["loss_mask"], dtype=bool))
    cut = int(rows[0]) + 1 if len(rows) else len(ids)
    if cut <= 1:  # plain-text window: every row is trained, so there is no prompt; take its first half
        cut = max(1, min(len(ids) // 2, max_prompt_length))
    return ids[:cut].tolist()


@torch.no_grad()
def _kl_sums(teacher, model, prompts: list[list[int]], responses: list[list[int]], num_ids: int,
             batch_size: int) -> list[float]:
    """Sum over each response's tokens of KL(teacher || model) at the positions predicting them."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        batch = [p + r for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        width = max(len(b) for b in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, :len(b)] = torch.as_tensor(b)
            attention[i, :len(b)] = 1
        ids, attention = ids.to(device), attention.to(device)
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits[..., :num_ids]
        s_logits = model(input_ids=ids, attention_mask=attention).logits[..., :num_ids]
        for i, (p, r) in enumerate(zip(prompts[start:start + batch_size], responses[start:start + batch_size])):
            rows = slice(len(p) - 1, len(p) - 1 + len(r))  # the positions whose next token is a response token
            out.append(float(response_kl(t_logits[i, rows], s_logits[i, rows]).sum()))
    return out


def exposure_metric(model, tokenizer, teacher, cache: str, *, eval_fraction: float, seeds: tuple[int, ...],
                    greedy: bool, max_length: int, max_prompt_length: int, limit: int | None, batch_size: int) -> dict:
    """The exposure-bias KL of `model` against `teacher` on the cache's held-out prompts (module docstring).

    model, teacher: causal LMs sharing the cache's tokenizer; tokenizer: the model's (for the stop tokens).
    """
    from shared.reader import CacheReader
    from trainer.data import cache_sequences
    from trainer.student import cache_token_ids

    reader = CacheReader(cache, verify_on_read=True)
    num_ids = cache_token_ids(reader.manifest.tokenizer)
    for name, m in (("{model}", model), ("{teacher}", teacher)):
        if m.get_output_embeddings().weight.shape[0] < num_ids:
            raise ValueError(f"{name}: its vocabulary is smaller than the cache's {num_ids} token ids (another "
                             "tokenizer?); the model and the teacher must share the cache's tokenizer")
    sequences = cache_sequences(reader, heldout_only=True, limit=limit, eval_fraction=eval_fraction)
    prompts = [prompt_of(s, max_prompt_length) for s in sequences]
    stops = stop_ids(tokenizer, reader.manifest.settings.get("template"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    runs = (0,) if greedy else tuple(seeds)
    jobs = [(i, seed) for seed in runs for i in range(len(prompts))]
    asked = [prompts[i] for i, _ in jobs]
    sampled = sample_responses(model, asked, [sample_seed(seed, i) for i, seed in jobs],
                               [max(1, max_length - len(p)) for p in asked], temperature=0.0 if greedy else 1.0,
                               stops=stops, pad_id=pad, num_ids=num_ids, batch_size=batch_size)
    responses = [ids for ids, _ in sampled]
    was_training = teacher.training
    teacher.eval()
    sums = _kl_sums(teacher, model, asked, responses, num_ids, batch_size)
    teacher.train(was_training)
    lengths = [len(r) for r in responses]
    per_response = np.asarray([s / n for s, n in zip(sums, lengths)])
    tokens = int(sum(lengths))
    return {"kl": sum(sums) / max(tokens, 1),
            "kl_stderr": float(per_response.std(ddof=1) / math.sqrt(len(per_response))) if len(per_response) > 1 else None,
            "num_prompts": len(prompts), "num_responses": len(responses), "num_tokens": tokens,
            "mean_response_tokens": tokens / max(len(responses), 1),
            "finished": sum(f for _, f in sampled) / max(len(sampled), 1), "seeds": list(runs), "greedy": greedy,
            "sequence_kl": sums, "sequence_tokens": lengths, "eval_fraction": eval_fraction, "cache": cache}
