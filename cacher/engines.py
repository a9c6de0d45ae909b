"""Teacher engines: token sequences in, per-row top-K ids, log-probs, target log-prob and tail out.

Two engines give the same result format (tests prove they agree):
- `hf`: transformers forward passes in length-sorted batches that fill a token budget. The output
  head, log-softmax, top-K, target gather and tail run in float32 on row chunks of the last hidden
  states, so no (batch, length, vocab) tensor is ever made, and a bf16 teacher still gets float32
  logits (architectures whose logits are not just head(hidden) use the plain forward instead).
- `vllm`: vLLM's prompt_logprobs, run in a vLLM interpreter (cacher/engine_vllm.py) because vLLM's
  pins may differ from the training environment's.

Every result is a dict of numpy arrays for one sequence of T tokens:
  topk_ids (T, K) int64, most likely first; topk_logprobs (T, K) float32; target_logprob (T,) float32
  (NaN on the last row: there is no next token); tail_logprob (T,) float32 = log(1 - sum of the top-K
  probabilities), computed in float64 from float32 log-probs (error ~1e-6 in probability).
With tail samples (hf engine only; storage_layout.md 3.3) a result also has tail_ids (T, M) int64 and
tail_counts (T, M) int64: M ids drawn from the teacher's distribution restricted to the tokens outside
the top K, as the distinct ids with their counts, most drawn first (ties: smaller id first); unused
slots have count 0 and the smallest ids not otherwise in the row, so each row's K + M ids are distinct. The draws of a sequence come from its own seeded generator, so they do not
depend on batching, shard plans or workers.

Padded embedding rows: a teacher may have more logit rows W than its tokenizer has ids S (Qwen2.5-7B:
W = 152064, S = 151665); rows >= S are padding that no tokenizer produces. Both engines store the
same thing for them, computable exactly by both: the log-probs are those of the teacher's softmax
over all W logits (what vLLM returns, and it cannot restrict prompt_logprobs to some ids); the top K
are the K most likely ids below S; so tail_logprob = log(1 - sum of the top K) holds the padded rows'
mass with the rest of the tail (a renormalization over the S ids would need that mass, which vLLM
does not report). Tail samples are drawn among ids below S outside the top K, and generate mode never
samples an id >= S. No stored id is ever >= S.

Knows models and torch; nothing about the cache's files (that is shared/'s job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class EngineError(RuntimeError):
    """The teacher could not be run as asked (bad model, NaN outputs, vLLM unavailable...)."""


@dataclass
class HFTeacher:
    model: object
    device: str
    dtype: str
    vocab_size: int  # the width of the logits (W)
    max_positions: int | None
    num_token_ids: int = 0  # S: ids >= S (padded rows) are never stored; 0 (default) or == vocab_size: no padding
    head_weight: object = None  # (V, H) float32 copy of the output head, when the hidden-state path is exact
    head_bias: object = None

    def __post_init__(self):
        if not self.num_token_ids:
            self.num_token_ids = self.vocab_size


def load_hf_teacher(path: str, *, dtype: str = "float32", device: str | None = None,
                    trust_remote_code: bool = False, num_token_ids: int | None = None) -> HFTeacher:
    """The teacher in eval mode; num_token_ids: the tokenizer's ids S (default: every logit row); see the module
    docstring on padded rows."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise EngineError(f"--dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, SafetensorError) as exc:  # unknown architecture, missing or damaged weight files
        if "trust_remote_code" in str(exc):
            raise EngineError(f"model {path} needs custom code; rerun with --trust-remote-code if you trust it") from exc
        raise EngineError(f"could not load model {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                          "check its config.json and weight files (re-save with model.save_pretrained)") from exc
    model.to(device).eval()
    cfg = model.config
    max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    head = model.get_output_embeddings()
    rows = int(head.weight.shape[0])
    teacher = HFTeacher(model=model, device=device, dtype=dtype, vocab_size=rows, max_positions=max_positions,
                        num_token_ids=min(rows, num_token_ids) if num_token_ids else rows)
    if _hidden_path_is_exact(model):
        # The head runs in float32 on row chunks of the last hidden states: a bf16 teacher still gets
        # float32 logits (bf16 logits carry ~3 significant digits), and no (B, L, V) tensor is made.
        teacher.head_weight = head.weight.detach().float()
        teacher.head_bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    return teacher


def _hidden_path_is_exact(model) -> bool:
    """True when logits == output_head(base_model(...).last_hidden_state) for this architecture.

    Checked once on a short probe; models that scale or soft-cap their logits fail it and use the
    plain forward instead.
    """
    import torch

    try:
        with torch.inference_mode():
            ids = torch.arange(1, 9, device=next(model.parameters()).device).unsqueeze(0) % model.config.vocab_size
            full = model(input_ids=ids).logits.float()
            hidden = model.base_model(input_ids=ids).last_hidden_state
            head = model.get_output_embeddings()
            mine = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                              head.bias.float() if getattr(head, "bias", None) is not None else None)
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 0.25
        return bool(torch.allclose(full, mine, atol=tol, rtol=tol * 0.1))
    except Exception:  # noqa: BLE001 - any architecture quirk means: use the plain forward
        return False


def length_sorted_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size stays within batch_tokens.

    A sequence longer than batch_tokens forms a batch of its own. Deterministic: ties keep input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def distinct_counts(draws: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, M) drawn ids -> the distinct ids (R, M) and their counts (R, M), most drawn first, ties by id.

    Unused slots (a row with fewer than M distinct ids) hold id 0 and count 0 (fill_unused gives them
    their stored ids).
    """
    num_rows, m = draws.shape
    s = np.sort(draws, axis=1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(first, axis=1) - 1  # (R, M) index of each draw's run
    rows = np.repeat(np.arange(num_rows), m).reshape(num_rows, m)
    counts = np.zeros((num_rows, m), dtype=np.int64)
    np.add.at(counts, (rows, run), 1)
    ids = np.zeros((num_rows, m), dtype=np.int64)
    ids[rows[first], run[first]] = s[first]
    key = counts * (vocab_size + 1) + (vocab_size - ids)  # unique per used slot; unused slots sort last
    key[counts == 0] = -1
    order = np.argsort(-key, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    counts = np.take_along_axis(counts, order, 1)
    ids[counts == 0] = 0
    return ids, counts


def fill_unused(tail_ids: np.ndarray, counts: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Unused tail slots (count 0) get the smallest ids that are neither in the row's top K nor drawn,
    in increasing order, so that every row's K + M ids are distinct (storage_layout.md 3.3).

    The first K + M ids always hold enough free ones: at most K + (used slots) of them are taken.
    """
    num_rows, m = tail_ids.shape
    width = topk_ids.shape[1] + m
    taken = np.zeros((num_rows, width), dtype=bool)
    for ids, keep in ((topk_ids, None), (tail_ids, counts > 0)):
        hit = ids < width if keep is None else (ids < width) & keep
        r, c = np.nonzero(hit)
        taken[r, ids[r, c]] = True
    free = np.argsort(taken, axis=1, kind="stable")[:, :m]  # free ids first, in increasing order
    unused = counts == 0
    slot_of_unused = np.cumsum(unused, axis=1) - 1  # j-th unused slot of its row takes the j-th free id
    out = tail_ids.copy()
    r, c = np.nonzero(unused)
    out[r, c] = free[r, slot_of_unused[r, c]]
    return out


def sample_uniforms(keys: list, lengths: list[int], num_samples: int, seed: int) -> np.ndarray:
    """(sum(lengths), M) uniforms in [0, 1): sequence i's rows come from a generator seeded (seed, *keys[i])."""
    parts = [np.random.default_rng([seed, *key]).random((n, num_samples)) for key, n in zip(keys, lengths)]
    return np.concatenate(parts) if parts else np.zeros((0, num_samples))


def topk_rows(logits, top_k: int, targets, chunk_rows: int, head=None, uniforms=None, num_ids: int | None = None):
    """Per-row top-K, target log-prob and tail, in float32 row chunks.

    logits: (R, V) any float dtype, or (R, H) hidden states when head = (weight (V, H), bias) is given
    (the head is then applied chunk by chunk in float32); targets: (R,) int64, -1 where there is no
    next token. Returns numpy (R, K) int64, (R, K) float32, (R,) float32 (NaN where target < 0),
    (R,) float32. The tail is log(1 - sum exp(top-K)) in float64: its error in probability is about
    1e-6, far inside the format's 1e-3.

    uniforms: (R, M) numpy floats in [0, 1), or None. When given, row r also gets M draws from its
    distribution outside the top K by inverse transform (draw = the first id whose cumulative tail
    probability exceeds u * tail mass), returned as two more (R, M) int64 arrays of distinct ids
    and counts (distinct_counts; unused slots filled by fill_unused). A row whose tail mass is 0 in
    float32 gets no draws (counts 0).

    num_ids: S, when the logits have padded rows beyond the tokenizer's ids (module docstring): log-probs
    are of the softmax over all V logits, the top K and the draws are among ids < S.
    """
    import torch

    num_rows = logits.shape[0]
    sampled = uniforms is not None
    if sampled:
        tail_ids = np.zeros((num_rows, uniforms.shape[1]), dtype=np.int64)
        tail_counts = np.zeros((num_rows, uniforms.shape[1]), dtype=np.int64)
    ids = np.empty((num_rows, top_k), dtype=np.int64)
    lps = np.empty((num_rows, top_k), dtype=np.float32)
    target_lp = np.full(num_rows, np.nan, dtype=np.float32)
    tail = np.empty(num_rows, dtype=np.float32)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        x = logits[start:stop].float()
        if head is not None:
            x = torch.nn.functional.linear(x, head[0], head[1])  # (c, V) float32
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (c, 1) over all V logits, padded rows included
        real = x[:, :num_ids] if num_ids is not None and num_ids < x.shape[1] else x  # (c, S) ids a tokenizer has
        values, indices = torch.topk(real, top_k, dim=-1)  # (c, K), sorted, raw logits
        topk_lp = values - lse
        tgt = targets[start:stop]
        gathered = (x.gather(1, tgt.clamp(min=0).unsqueeze(1)) - lse).squeeze(1)
        ids[start:stop] = indices.cpu().numpy()
        lps[start:stop] = topk_lp.cpu().numpy()
        target_lp[start:stop] = torch.where(tgt >= 0, gathered, torch.full_like(gathered, float("nan"))).cpu().numpy()
        mass = torch.exp(topk_lp.double()).sum(-1)
        tail[start:stop] = torch.log1p(-mass.clamp(max=1.0)).float().cpu().numpy()
        if sampled:  # rows whose stored tail is -inf (the top K hold all the mass in float64) get no draws
            tail_ids[start:stop], tail_counts[start:stop] = _draw_tail(real, lse, indices, uniforms[start:stop],
                                                                       np.isneginf(tail[start:stop]))
    if sampled:
        return ids, lps, target_lp, tail, tail_ids, tail_counts
    return ids, lps, target_lp, tail


def _draw_tail(x, lse, top_ids, uniforms: np.ndarray, no_tail: np.ndarray):
    """M inverse-transform draws per row from softmax(x) with the top-K ids removed; (distinct ids, counts).

    Rows where no_tail is set, or whose tail mass is 0 in float32, get no draws (the format ties draws to
    a stored tail_logprob > -inf; the two masses can disagree by rounding on a near-certain row).
    """
    import torch

    p = torch.exp(x - lse)  # (c, S) float32: x holds the ids that may be drawn, lse is over the whole row
    p.scatter_(1, top_ids, 0.0)
    cdf = torch.cumsum(p, dim=1)  # (c, V), non-decreasing; flat over zeroed ids
    total = cdf[:, -1:]  # (c, 1) the tail mass
    u = torch.as_tensor(uniforms, dtype=torch.float64).to(x.device)
    draws = torch.searchsorted(cdf, (u * total.double()).to(cdf.dtype), right=True)  # (c, M): first cdf > u*total
    draws.clamp_(max=x.shape[1] - 1)
    # searchsorted(right=True) never lands on a zero-probability id inside the row; only u*total
    # rounding up to the total can overshoot, clamped above. Send any such draw to the row's most
    # likely tail id instead.
    zero = p.gather(1, draws) <= 0
    if zero.any():
        draws = torch.where(zero, p.argmax(dim=1, keepdim=True).expand_as(draws), draws)
    draws = draws.cpu().numpy()
    ids, counts = distinct_counts(draws, x.shape[1])
    empty = (total[:, 0] <= 0).cpu().numpy() | no_tail
    ids[empty], counts[empty] = 0, 0
    return fill_unused(ids, counts, top_ids.cpu().numpy()), counts


def score_hf(teacher: HFTeacher, sequences: list[np.ndarray], *, top_k: int, batch_tokens: int = 8192,
             on_batch=None, tail_samples: int = 0, tail_seed: int = 0, sample_keys: list | None = None) -> list[dict]:
    """Run the teacher over sequences (lists of token ids); results in input order.

    on_batch(num_sequences, num_tokens) is called after each batch (progress bars).
    tail_samples = M > 0 adds tail_ids / tail_counts (see the module docstring); sequence i's draws are
    seeded by (tail_seed, *sample_keys[i]) (default key: (i,)), so pass each sequence's place in the
    whole data set to make them independent of how the sequences are split into calls.
    """
    import torch

    if top_k > teacher.num_token_ids:
        raise EngineError(f"--top-k {top_k} is larger than the teacher's vocabulary ({teacher.num_token_ids} token ids)")
    if sample_keys is not None and len(sample_keys) != len(sequences):
        raise ValueError(f"sample_keys has {len(sample_keys)} entries for {len(sequences)} sequences")
    lengths = [len(s) for s in sequences]
    results: list[dict | None] = [None] * len(sequences)
    # One float32 chunk of log-probs at most ~64 MiB besides the batch's logits.
    chunk_rows = max(1, (16 * 2**20) // teacher.vocab_size)
    pad_id = 0
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_tokens):
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.full((len(batch), width), -1, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = torch.as_tensor(np.asarray(sequences[i], dtype=np.int64))
                input_ids[row, : len(seq)] = seq
                attention[row, : len(seq)] = 1
                targets[row, : len(seq) - 1] = seq[1:]
            valid = attention.bool().to(teacher.device)
            kwargs = {"input_ids": input_ids.to(teacher.device), "attention_mask": attention.to(teacher.device)}
            if teacher.head_weight is not None:
                rows = teacher.model.base_model(**kwargs).last_hidden_state[valid]  # (R, H) real rows only
                head = (teacher.head_weight, teacher.head_bias)
            else:
                rows = teacher.model(**kwargs).logits[valid]  # (R, V)
                head = None
            flat_targets = targets.to(teacher.device)[valid]
            uniforms = None
            if tail_samples:
                keys = [tuple(sample_keys[i]) if sample_keys is not None else (i,) for i in batch]
                uniforms = sample_uniforms(keys, [lengths[i] for i in batch], tail_samples, tail_seed)
            out = topk_rows(rows, top_k, flat_targets, chunk_rows, head, uniforms, teacher.num_token_ids)
            del rows
            pos = 0
            for i in batch:
                n = lengths[i]
                results[i] = {"topk_ids": out[0][pos:pos + n], "topk_logprobs": out[1][pos:pos + n],
                              "target_logprob": out[2][pos:pos + n], "tail_logprob": out[3][pos:pos + n]}
                if tail_samples:
                    results[i].update(tail_ids=out[4][pos:pos + n], tail_counts=out[5][pos:pos + n])
                pos += n
            if on_batch is not None:
                on_batch(len(batch), sum(lengths[i] for i in batch))
    for i, r in enumerate(results):
        if not np.all(np.isfinite(r["topk_logprobs"])) or np.isnan(r["tail_logprob"]).any():
            raise EngineError(
                f"the teacher produced NaN/inf log-probs for sequence {i} (length {lengths[i]}); nothing of this shard "
                "is committed. Try --dtype float32, or check the model's weights."
            )
    return results


def generate_hf(teacher: HFTeacher, prompts: list[np.ndarray], *, max_new_tokens: int, temperature: float,
                num_samples: int, seed: int, eos_token_id: int | None, pad_token_id: int | None,
                max_length: int | None = None, prompt_indices: list[int] | None = None) -> list[list[np.ndarray]]:
    """Sample num_samples responses per prompt (greedy when temperature == 0); ids of the responses only.

    Each response stops at its first EOS (kept), after max_new_tokens, or when prompt + response reach
    max_length tokens (default: the model's positions; generating past them would index outside the
    position table). Prompt p is sampled from seed `seed * 1_000_003 + prompt_indices[p]` (default: p),
    so passing each prompt's index in the whole data set makes its samples independent of batching.
    Padded logit rows (ids >= teacher.num_token_ids) are never sampled.
    """
    import torch

    limits = [x for x in (max_length, teacher.max_positions) if x is not None]
    limit = min(limits) if limits else None
    out = []
    with torch.inference_mode():
        for p_index, prompt in zip(prompt_indices if prompt_indices is not None else range(len(prompts)), prompts):
            new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt))
            if new_tokens < 1:
                out.append([])
                continue
            torch.manual_seed(seed * 1_000_003 + p_index)
            ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64)).unsqueeze(0).to(teacher.device)
            kwargs = {"max_new_tokens": new_tokens, "num_return_sequences": num_samples,
                      "pad_token_id": pad_token_id if pad_token_id is not None else (eos_token_id or 0),
                      "eos_token_id": eos_token_id, "attention_mask": torch.ones_like(ids)}
            if teacher.num_token_ids < teacher.vocab_size:
                kwargs["suppress_tokens"] = list(range(teacher.num_token_ids, teacher.vocab_size))
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False, num_return_sequences=1)
            gen = teacher.model.generate(ids, **kwargs)[:, ids.shape[1]:]
            samples = []
            for row in gen.cpu().numpy():
                if eos_token_id is not None and (row == eos_token_id).any():
                    row = row[: int(np.argmax(row == eos_token_id)) + 1]  # keep the first EOS, drop padding
                samples.append(row.astype(np.int64))
            out.append(samples)
    return out
