"""cacher/varlen.py and the hf engine's packed batches, checked on CPU.

Packed batches run only on CUDA (torch's varlen flash attention); here torch.nn.attention.varlen.varlen_attn is
replaced by a dense reference with its signature (each sequence's causal attention on its own), so that the
packing itself (one row, restarting positions, cumulative lengths, the attention hook in transformers, GQA) is
checked against the padded forward of the same model, for GPT-2 and Llama.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cacher import engine_hf, varlen


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """(N, H, D) causal attention within each [cu[i], cu[i+1]) block, by plain softmax: what flash varlen computes."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k)
    out = torch.empty_like(query)
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))  # (H, n, D)
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
        scores = q @ k.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


@pytest.fixture
def reference_attention(monkeypatch):
    from torch.nn.attention import varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", reference_varlen_attn)


def sequences(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n) for n in (7, 1, 30, 12)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_rows_equal_padded_rows(family, tiny_gpt2_dir, tiny_llama_dir, reference_attention):
    teacher = engine_hf.load_hf_teacher(str(tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir))
    assert not teacher.packed  # CPU: padded batches
    seqs = sequences(teacher.vocab_size)
    batch = list(range(len(seqs)))
    with torch.inference_mode():
        padded, padded_targets = engine_hf._forward_padded(teacher, seqs, batch)
        packed, packed_targets = engine_hf._forward_packed(teacher, seqs, batch)
    assert torch.equal(padded_targets, packed_targets)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert teacher.model.config._attn_implementation != varlen.ATTENTION_NAME  # restored after the batch

    teacher.packed = True  # the whole engine on packed batches gives the padded engine's rows
    rows = engine_hf.score_hf(teacher, seqs, top_k=4, batch_tokens=40)
    teacher.packed = False
    expected = engine_hf.score_hf(teacher, seqs, top_k=4, batch_tokens=40)
    for got, want in zip(rows, expected):
        np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(got["target_logprob"], want["target_logprob"], atol=1e-4)


def test_pack_restarts_positions_and_ends_targets():
    ids, positions, targets, cu, longest = varlen.pack([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])], "cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]] and positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert targets.tolist() == [6, 7, -1, -1, 10, -1]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6] and longest == 3


def test_packed_batches_keep_input_order_within_the_budget():
    assert engine_hf.packed_batches([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert engine_hf.packed_batches([], 7) == []


def test_packing_only_where_flash_kernels_run():
    assert not varlen.available("cpu", "bfloat16")
    assert not varlen.available("cuda", "float32")


def test_the_hook_refuses_to_run_outside_a_packed_batch():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="runs only inside"):
        varlen._varlen_attention(None, q, q, q, None)
