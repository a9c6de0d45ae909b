"""Teacher rows from logits or last hidden states: top-K, target, tail and tail samples, on the teacher's device.

The output head, log-softmax, top-K, target gather and tail run in float32 on row chunks, so no
(rows, vocabulary) tensor larger than one chunk is ever made, and only what the cache stores leaves the
device: K ids (int32), K log-probs, target and tail (float32), through pinned memory without blocking on
CUDA (DeviceRows.to_host), so that the next batch runs while they travel. On CPU the same operations
run in the same order as they always have, so CPU rows are unchanged bit for bit.

Tail samples (storage_layout.md 3.3): M ids drawn from the teacher's distribution restricted to the
tokens outside the top K, as the distinct ids with their counts, most drawn first (ties: smaller id
first); unused slots have count 0 and the smallest ids not otherwise in the row, so each row's K + M ids
are distinct. Each sequence's draws come from its own seeded generator (sample_uniforms), so they do not
depend on batching, shard plans or workers.

Padded logit rows (num_ids = S below the logits' width W, cacher/engine_hf.py): log-probs are those of the
softmax over all W logits, the top K and the draws are among ids < S.

Knows torch and numpy; nothing about models, engines or the cache's files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_NAMES = ("topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")


@dataclass
class Head:
    """The output head applied to hidden-state chunks, giving float32 logits.

    weight (V, H), bias (V,) or None. With low_precision_mm (CUDA, bf16/fp16 teachers, where torch.mm takes
    out_dtype) the product runs on the teacher's own weights with float32 accumulation and output: the
    same products as a float32 matmul of the upcast values (exact in float32), at tensor-core speed.
    Otherwise weight and bias are float32 copies and the chunk is upcast first.
    """

    weight: object
    bias: object = None
    low_precision_mm: bool = False

    def __call__(self, x):
        import torch

        if self.low_precision_mm:
            out = torch.mm(x, self.weight.t(), out_dtype=torch.float32)  # (c, V)
            return out if self.bias is None else out + self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight, self.bias)  # (c, V) float32


class HostRows:
    """Rows on their way to host memory; numpy() waits for them (a no-op on CPU)."""

    def __init__(self, tensors: dict, sampled: tuple | None, event=None):
        self._tensors, self._sampled, self._event = tensors, sampled, event

    def numpy(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        out = {name: t.numpy() for name, t in self._tensors.items()}
        if self._sampled is not None:
            out["tail_ids"], out["tail_counts"] = self._sampled
        return out


def device_rows(logits, top_k: int, targets, chunk_rows: int, head: Head | None = None, uniforms=None,
                num_ids: int | None = None) -> HostRows:
    """Per-row top-K, target log-prob and tail of R rows, in float32 row chunks on the rows' device.

    logits: (R, V) any float dtype, or (R, H) hidden states when head is given; targets: (R,) int64 on the
    same device, -1 where there is no next token. The rows come back (HostRows.numpy()) as topk_ids (R, K)
    int32, topk_logprobs (R, K) float32, target_logprob (R,) float32 (NaN where target < 0), tail_logprob
    (R,) float32 = log(1 - sum exp(top-K)) computed in float64 (error ~1e-6 in probability, far inside the
    format's 1e-3). uniforms: (R, M) numpy floats in [0, 1) or None: row r also gets M draws from its
    distribution outside the top K by inverse transform (tail_ids, tail_counts (R, M) int64); a row whose
    tail mass is 0 in float32, or whose stored tail is -inf, gets no draws (counts 0).
    """
    import torch

    num_rows, device = logits.shape[0], logits.device
    ids = torch.empty((num_rows, top_k), dtype=torch.int32, device=device)
    lps = torch.empty((num_rows, top_k), dtype=torch.float32, device=device)
    target_lp = torch.empty(num_rows, dtype=torch.float32, device=device)
    tail = torch.empty(num_rows, dtype=torch.float32, device=device)
    draws = []
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        x = head(logits[start:stop]) if head is not None else logits[start:stop].float()  # (c, V) float32
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (c, 1) over all V logits, padded rows included
        real = x[:, :num_ids] if num_ids is not None and num_ids < x.shape[1] else x  # (c, S) ids a tokenizer has
        values, indices = torch.topk(real, top_k, dim=-1)  # (c, K), sorted, raw logits
        topk_lp = values - lse
        tgt = targets[start:stop]
        gathered = (x.gather(1, tgt.clamp(min=0).unsqueeze(1)) - lse).squeeze(1)
        ids[start:stop] = indices
        lps[start:stop] = topk_lp
        target_lp[start:stop] = torch.where(tgt >= 0, gathered, torch.full_like(gathered, float("nan")))
        mass = torch.exp(topk_lp.double()).sum(-1)
        tail[start:stop] = torch.log1p(-mass.clamp(max=1.0)).float()
        if uniforms is not None:  # rows whose stored tail is -inf (the top K hold all the mass) get no draws
            draws.append(_draw_tail(real, lse, indices, uniforms[start:stop],
                                    torch.isneginf(tail[start:stop]).cpu().numpy()))
    sampled = None
    if uniforms is not None:
        m = uniforms.shape[1]
        sampled = tuple(np.concatenate([d[i] for d in draws]) if draws else np.zeros((0, m), dtype=np.int64)
                        for i in (0, 1))
    tensors = {"topk_ids": ids, "topk_logprobs": lps, "target_logprob": target_lp, "tail_logprob": tail}
    if device.type != "cuda":
        return HostRows(tensors, sampled)
    pinned = {}
    for name, t in tensors.items():  # only what the cache stores leaves the device, without blocking it
        pinned[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned[name].copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return HostRows(pinned, sampled, event)


def topk_rows(logits, top_k: int, targets, chunk_rows: int, head=None, uniforms=None, num_ids: int | None = None):
    """device_rows as a tuple of numpy arrays: ids, log-probs, target, tail (+ tail_ids, tail_counts with uniforms).

    head may be a Head or a (weight, bias) pair of float32 tensors.
    """
    if head is not None and not isinstance(head, Head):
        head = Head(*head)
    rows = device_rows(logits, top_k, targets, chunk_rows, head, uniforms, num_ids).numpy()
    return tuple(rows[name] for name in ROW_NAMES + (("tail_ids", "tail_counts") if uniforms is not None else ()))


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
