"""Sampling responses from a causal LM, each response seeded on its own, in left-padded batches with a KV cache.

`sample_responses` gives every response its own torch.Generator, seeded by the caller (kdtrain generate seeds
by (seed, round, prompt, sample)), so a response depends on its seed and prompt only, not on which other
prompts share its batch, the batch size or the order: the draws of one generator are the same whatever
the batch (up to float differences of padded batches, where a near-tie may rarely flip). Temperature 0
is greedy. Only the first `num_ids` logits (the tokenizer's ids) are ever sampled, so a model's padded
embedding rows are never drawn. A response ends at a stop id (included in it) or at its budget.

`stop_ids` are the ids a response of the data's template ends with: EOS, and for a chat template the
special tokens it writes after the assistant's turn (`<|im_end|>`), so a response stops where the
template's turn ends and `kdcache build` re-appends the same ending when it formats the response.

Knows torch and the Hugging Face model call; nothing about caches, losses or data sets.
"""

from __future__ import annotations

import torch

from common.templates import prompt_ids_with_template


def stop_ids(tokenizer, template: str | None) -> set[int]:
    """EOS and the first token the template puts after a response: the first token of what two formatted rows
    with different responses end with alike (see the module docstring)."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if template is None:
        return stops
    ends = []
    for response in ("A", "B"):
        prompt, full, _ = prompt_ids_with_template(tokenizer, "Q", response, template)
        ends.append(full[len(prompt):][::-1])
    common = 0
    while common < min(map(len, ends)) and ends[0][common] == ends[1][common]:
        common += 1
    return stops | ({ends[0][common - 1]} if common else set())


def _choose(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> list[int]:
    """(B, V) float logits -> one token per row: argmax at temperature 0, else a draw from each row's generator."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.double() / temperature, dim=-1).cpu()
    return [int(torch.multinomial(probs[b], 1, generator=g)) for b, g in enumerate(generators)]


@torch.no_grad()
def _sample_batch(model, prompts: list[list[int]], seeds: list[int], budgets: list[int], *, temperature: float,
                  stops: set[int], pad_id: int, num_ids: int | None) -> list[tuple[list[int], bool]]:
    device = next(model.parameters()).device
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        attention[r, width - len(p):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
    responses: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    done = [b <= 0 for b in budgets]
    next_position = positions[:, -1:] + 1  # (B, 1)
    while True:
        logits = out.logits[:, -1].float()
        tokens = _choose(logits if num_ids is None else logits[:, :num_ids], temperature, generators)
        for r, token in enumerate(tokens):
            if done[r]:
                continue
            responses[r].append(token)
            finished[r] = token in stops
            done[r] = finished[r] or len(responses[r]) >= budgets[r]
        if all(done):
            break
        step = torch.as_tensor([pad_id if d else t for t, d in zip(tokens, done)], dtype=torch.long, device=device)
        attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=step[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    return list(zip(responses, finished))


def sample_responses(model, prompts: list[list[int]], seeds: list[int], budgets: list[int], *, temperature: float,
                     stops: set[int], pad_id: int, num_ids: int | None = None,
                     batch_size: int = 16) -> list[tuple[list[int], bool]]:
    """(response ids, finished) for each prompt: sampled with its own seed, at most its budget of new tokens.

    prompts: token ids (formatted); seeds, budgets: one per prompt. finished: the response ended at a stop id
    (the last id), not at its budget. Batches group prompts of similar length (less padding).
    """
    if not (len(prompts) == len(seeds) == len(budgets)):
        raise ValueError("prompts, seeds and budgets need one entry each per prompt")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = _sample_batch(model, [prompts[i] for i in chosen], [seeds[i] for i in chosen],
                              [budgets[i] for i in chosen], temperature=temperature, stops=stops, pad_id=pad_id,
                              num_ids=num_ids)
        for i, result in zip(chosen, batch):
            results[i] = result
    model.train(was_training)
    return results


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, round, prompt, sample): the same parts always give the same seed."""
    import hashlib

    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
