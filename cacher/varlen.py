"""Packed batches for the hf engine on CUDA: several sequences in one row, no padding, no cross-attention.

A batch of sequences is concatenated into one row of N tokens with position ids that restart at 0 for
each sequence. While `packed(model, ...)` is active, the model's attention is torch's variable-length
flash attention (torch.nn.attention.varlen) over the sequences' cumulative lengths, registered with
transformers' AttentionInterface under ATTENTION_NAME; transformers makes no mask for a name its mask
functions do not know, so nothing of size N x N exists. Outside `packed` the model keeps its own attention
(generation uses it).

Only where all of this holds: CUDA, a float16/bfloat16 teacher (flash kernels), torch with varlen_attn,
transformers with AttentionInterface, and a model whose attention passes no sliding window, soft-cap or
sinks. engine_hf checks each model once on a probe (packed == padded), so anything else (CPU included)
keeps the padded batches.

Knows torch and transformers' attention interface; nothing about engines' rows or the cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect

ATTENTION_NAME = "kdcache_varlen"
_SEQUENCES = contextvars.ContextVar("kdcache_packed_sequences", default=None)  # (cu_seqlens int32 (n+1,), max length)
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks")


def available(device: str, dtype: str) -> bool:
    """Whether packed batches can run here at all (each model is still probed: engine_hf)."""
    if not device.startswith("cuda") or dtype not in ("bfloat16", "float16"):
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
        from transformers import AttentionInterface  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query (1, H, N, D), key/value (1, H_kv, N, D) -> ((1, N, H, D), None)."""
    from torch.nn.attention.varlen import varlen_attn

    packing = _SEQUENCES.get()
    if packing is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside cacher.varlen.packed()")
    used = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if used or dropout or query.shape[0] != 1:
        raise NotImplementedError(f"packed attention does not support {used or 'dropout or batch > 1'}")
    cu_seqlens, max_length = packing
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    params = inspect.signature(varlen_attn).parameters
    options = {"scale": scaling} if "scale" in params else {}
    if "window_size" in params:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None and "scale" not in params and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise NotImplementedError("this torch's varlen_attn has no scale argument")
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **options)  # (N, H, D)
    return out.unsqueeze(0), None


@contextlib.contextmanager
def packed(model, cu_seqlens, max_length: int):
    """Within the block, `model` attends within each sequence of a packed row; cu_seqlens (n+1,) int32 on its device."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _varlen_attention)
    config = model.config
    before = config._attn_implementation
    token = _SEQUENCES.set((cu_seqlens, max_length))
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _SEQUENCES.reset(token)


def pack(sequences, device):
    """(input_ids (1, N), position_ids (1, N), targets (N,) with -1 after each sequence's last token,
    cu_seqlens (n+1,) int32, the longest length), on `device`."""
    import numpy as np
    import torch

    lengths = [len(s) for s in sequences]
    ids = torch.as_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    positions = torch.cat([torch.arange(n) for n in lengths])
    targets = torch.full_like(ids, -1)
    ends = torch.as_tensor(np.cumsum(lengths))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[ends - 1] = False  # the last row of each sequence has no next token
    targets[:-1][keep[:-1]] = ids[1:][keep[:-1]]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = ends.to(torch.int32)
    cuda = torch.device(device).type == "cuda"

    def to_device(t):
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    return (to_device(ids).unsqueeze(0), to_device(positions).unsqueeze(0), to_device(targets), to_device(cu),
            max(lengths))
