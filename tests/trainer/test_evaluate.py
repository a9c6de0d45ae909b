"""Each metric on fixtures with known answers."""

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from cli.kdtrain import app
from common.gsm8k import extract_gsm8k_answer
from common.sequences import Sequence
from tests.conftest import GSM8K
from trainer.evaluate import EvalConfig, EvalError, agreement, evaluate, load_model, perplexity
from trainer.generation_metrics import rouge_l

runner = CliRunner()


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l(["completely different words"], ["the cat sat"]) == pytest.approx(0.0)
    # LCS "the cat" of 2 tokens; P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    assert rouge_l(["the cat"], ["the big cat sat"]) == pytest.approx(100 * 2 / 3)


def test_gsm8k_answer_extraction_on_real_rows():
    with open(GSM8K) as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    answers = [extract_gsm8k_answer(r["answer"]) for r in rows]
    assert all(a is not None and a.lstrip("-").replace(".", "").isdigit() for a in answers)
    assert answers[0] == "72"  # Natalia sold 48 + 24 = 72 clips
    assert extract_gsm8k_answer("The answer is\n#### 1,000") == "1000"
    assert extract_gsm8k_answer("no marker 42") is None


def test_perplexity_matches_manual_cross_entropy(tiny_gpt2_dir):
    model, _ = load_model(str(tiny_gpt2_dir))
    ids = torch.arange(5, 25)
    mask = torch.ones(20, dtype=torch.bool)
    mask[-1] = False
    got = perplexity(model, [Sequence(ids.numpy(), mask.numpy(), 0)])
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert got["ppl"] == pytest.approx(expected, rel=1e-5) and got["num_tokens"] == 19


def test_teacher_agrees_with_its_own_cache(tiny_cache, tiny_gpt2_dir, tiny_llama_dir):
    model, _ = load_model(str(tiny_gpt2_dir))
    own = agreement(model, tiny_cache, heldout_only=False)
    assert own["top1_agreement"] > 0.97 and own["kl"] < 1e-3  # float16 storage and near-ties only
    other, _ = load_model(str(tiny_llama_dir))
    assert agreement(other, tiny_cache, heldout_only=False)["kl"] > own["kl"] + 0.01


def test_eval_cli_writes_json(tiny_cache, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "e.json"
    res = runner.invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--cache", tiny_cache, "--metrics", "ppl,agreement",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"ppl", "agreement"} and data["metrics"]["ppl"]["source"] == "cache held-out"
    res = runner.invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--cache", tiny_cache, "--metrics", "ppl",
                              "--out", str(out)])  # an earlier result of kdtrain eval: replaced
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["metrics"]) == {"ppl"}


def test_eval_out_never_replaces_a_file_it_did_not_write(tiny_cache, tiny_gpt2_dir, tmp_path):
    """--out naming someone's file (a model's config.json), a link or a folder is refused before any model is loaded,
    and the file is untouched."""
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2"}')
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    for out, message in ((config, "exists and is not a kdtrain eval result"), (link, "is not a regular file"),
                         (tmp_path, "is not a regular file")):
        res = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-such-model"), "--cache", tiny_cache,
                                  "--metrics", "ppl", "--out", str(out)])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and message in text and "pass a new file name" in text, text
    assert config.read_text() == '{"model_type": "gpt2"}' and victim.read_text() == "{}"


def test_generation_metrics_run_on_gsm8k_rows(tiny_gpt2_dir, tmp_path):
    res = evaluate(EvalConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), metrics=("gsm8k", "rouge"),
                              prompt_field="question", response_field="answer", limit=2, max_length=160,
                              max_prompt_length=150, seeds=(1, 2)), log=lambda m: None)
    assert 0.0 <= res.metrics["gsm8k"]["gsm8k_exact_match"] <= 1.0
    assert len(res.metrics["rouge"]["rougeL_per_seed"]) == 2


def test_optional_metrics_skip_with_reason(tiny_gpt2_dir):
    res = evaluate(EvalConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), metrics=("mauve", "bertscore"),
                              prompt_field="question", response_field="answer", limit=1), log=lambda m: None)
    for m in ("mauve", "bertscore"):
        assert "skipped" in res.metrics[m] and ("pip install" in res.metrics[m]["skipped"] or "KDCACHE_" in res.metrics[m]["skipped"])


@pytest.mark.parametrize("kwargs,message", [
    ({"metrics": ("bleu",)}, "unknown metric"),
    ({"metrics": ("agreement",)}, "needs --cache"),
    ({"metrics": ("rouge",), "dataset": "x.jsonl"}, "needs --prompt-field and --response-field"),
    ({"metrics": ("ppl",)}, "need --dataset"),
])
def test_bad_eval_configs(kwargs, message):
    with pytest.raises(EvalError, match=message):
        EvalConfig(model="m", **kwargs)


def test_eval_data_without_needed_fields(tiny_gpt2_dir):
    res = runner.invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--dataset", str(GSM8K), "--metrics", "rouge",
                              "--prompt-field", "instruction", "--response-field", "answer", "--limit", "1"])
    assert res.exit_code == 2 and "instruction" in res.output and "question" in res.output


# ---------------------------------------------------------------------------------------------
# gsm8k: the instruction and the answers it scores


def test_gsm8k_model_answer_falls_back_to_the_last_boxed_number():
    """common.gsm8k.extract_gsm8k_answer: the one reader of the gsm8k metric and of kdcache build --filter gsm8k-answer."""
    assert extract_gsm8k_answer("so 48 + 24 = 72.\n#### 72") == "72"
    assert extract_gsm8k_answer("first \\boxed{3} then \\boxed{\\$4.50}") == "4.5"  # the last box counts
    assert extract_gsm8k_answer("#### 7 and \\boxed{8}") == "7"  # '####' wins when both are there
    assert extract_gsm8k_answer("no final answer 42") is None
    assert extract_gsm8k_answer("The answer is $\\boxed{1,000}$.") == "1000"


def test_gsm8k_scores_known_answers_and_asks_for_the_marker(tiny_tokenizer_dir, monkeypatch):
    """A fake generator answers the first three GSM8K questions (72, 10, 5): right with '####', right with
    \\boxed{}, wrong; the metric must score 2/3 and must have asked each question with the instruction."""
    from transformers import AutoTokenizer

    import trainer.generation_metrics as ev

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    seen = []

    def fake_generate(model, tok, prompts, **kwargs):
        seen.extend(tok.decode(p) for p in prompts)
        return ["48 / 2 = 24 and 48 + 24 = 72\n#### 72", "12 / 60 * 50 = 10, so \\boxed{10}", "She needs #### 15"]

    monkeypatch.setattr(ev, "generate", fake_generate)
    config = EvalConfig(model="unused", dataset=str(GSM8K), metrics=("gsm8k",), prompt_field="question",
                        response_field="answer", limit=3, max_prompt_length=400)
    result = ev.gsm8k_metric(None, tokenizer, config)
    assert result["num_examples"] == 3 and result["num_correct"] == 2
    assert result["gsm8k_exact_match"] == pytest.approx(2 / 3)
    assert result["num_boxed_answers"] == 1 and result["num_without_answer"] == 0
    assert len(seen) == 3 and all(ev.GSM8K_INSTRUCTION in text for text in seen)
    assert "Natalia sold clips" in seen[0] and "<|im_start|>user" in seen[0]  # the chat template, as before


def test_gsm8k_instruction_is_added_once():
    from trainer.generation_metrics import GSM8K_INSTRUCTION, gsm8k_prompt

    once = gsm8k_prompt("How many?")
    assert once == f"How many?\n\n{GSM8K_INSTRUCTION}" and gsm8k_prompt(once) == once
    assert gsm8k_prompt("How many?", "") == "How many?"


def test_prepared_gsm8k_prompts_are_the_ones_the_metric_asks(tmp_path, tiny_tokenizer_dir):
    """examples/prepare_gsm8k.py writes training prompts equal to what `kdtrain eval --metrics gsm8k` sends."""
    from transformers import AutoTokenizer

    from common.templates import prompt_only_ids
    from examples.prepare_gsm8k import prepare_gsm8k
    from trainer.generation_metrics import GSM8K_INSTRUCTION, prompts_for

    out = tmp_path / "data" / "gsm8k_train.jsonl"
    assert prepare_gsm8k(str(out), source=str(GSM8K), limit=3) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["question"].endswith(GSM8K_INSTRUCTION) and "####" in r["answer"] for r in rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    asked, _, _ = prompts_for(EvalConfig(model="m", dataset=str(GSM8K), metrics=("gsm8k",), prompt_field="question",
                                         response_field="answer", limit=3, max_prompt_length=400), tokenizer, "gsm8k")
    assert asked == [prompt_only_ids(tokenizer, r["question"]) for r in rows]
    # the prepared file asked again gets no second instruction
    again, _, _ = prompts_for(EvalConfig(model="m", dataset=str(out), metrics=("gsm8k",), prompt_field="question",
                                         response_field="answer", max_prompt_length=400), tokenizer, "gsm8k")
    assert again == asked


# ---------------------------------------------------------------------------------------------
# bertscore / mauve with local feature models


def _feature_model_dir(path, num_layers=3):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": num_layers}))
    return path


def _fake_module(monkeypatch, name, **attrs):
    import sys
    import types

    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_bertscore_gets_num_layers_for_a_local_folder(tiny_gpt2_dir, tmp_path, monkeypatch):
    """bert_score.score(model_type=<path>, num_layers=None) raises KeyError (its model2layers lookup);
    kdtrain eval passes --bertscore-layers, bert_score's layer for a known folder name, or the last layer."""
    calls = []

    def score(cands, refs, model_type=None, num_layers=None, lang=None, **kwargs):
        if num_layers is None:
            raise KeyError(model_type)  # what the real bert_score does for a path
        calls.append({"model_type": model_type, "num_layers": num_layers, "n": len(cands)})
        return None, None, torch.tensor([0.5] * len(cands))

    fake = _fake_module(monkeypatch, "bert_score", score=score)
    fake.utils = _fake_module(monkeypatch, "bert_score.utils", model2layers={"roberta-large": 17})
    kwargs = {"model": str(tiny_gpt2_dir), "dataset": str(GSM8K), "metrics": ("bertscore",), "prompt_field": "question",
              "response_field": "answer", "limit": 1, "max_length": 160, "max_prompt_length": 150}
    plain = _feature_model_dir(tmp_path / "my-encoder", num_layers=3)
    monkeypatch.setenv("KDCACHE_BERTSCORE_MODEL", str(plain))
    res = evaluate(EvalConfig(**kwargs), log=lambda m: None)
    assert res.metrics["bertscore"]["bertscore_f1"] == pytest.approx(0.5)
    assert calls[-1] == {"model_type": str(plain), "num_layers": 3, "n": 1}  # the folder's last layer
    evaluate(EvalConfig(**kwargs, bertscore_layers=2), log=lambda m: None)
    assert calls[-1]["num_layers"] == 2
    known = _feature_model_dir(tmp_path / "models" / "roberta-large", num_layers=24)
    monkeypatch.setenv("KDCACHE_BERTSCORE_MODEL", str(known))
    evaluate(EvalConfig(**kwargs), log=lambda m: None)
    assert calls[-1]["num_layers"] == 17  # as bert_score.score(model_type="roberta-large") would pick
    with pytest.raises(EvalError, match="--bertscore-layers 30: .* has 24 layers"):
        evaluate(EvalConfig(**kwargs, bertscore_layers=30), log=lambda m: None)


def test_bertscore_failure_is_a_clear_error(tiny_gpt2_dir, tmp_path, monkeypatch):
    def score(*args, **kwargs):
        raise OverflowError("int too big to convert")

    _fake_module(monkeypatch, "bert_score", score=score)
    _fake_module(monkeypatch, "bert_score.utils", model2layers={})
    folder = _feature_model_dir(tmp_path / "enc")
    monkeypatch.setenv("KDCACHE_BERTSCORE_MODEL", str(folder))
    with pytest.raises(EvalError) as err:
        evaluate(EvalConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), metrics=("bertscore",), prompt_field="question",
                            response_field="answer", limit=1, max_length=160, max_prompt_length=150), log=lambda m: None)
    assert f"bertscore failed with feature model {folder} (num_layers=3, OverflowError" in str(err.value)


def test_mauve_refuses_a_feature_folder_without_gpt2_before_generating(tiny_gpt2_dir, tmp_path, monkeypatch):
    import trainer.evaluate as ev

    calls = []
    _fake_module(monkeypatch, "mauve", compute_mauve=lambda **kw: calls.append(kw) or type("R", (), {"mauve": 0.75})())

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the feature model")

    monkeypatch.setattr(ev, "load_model", no_generation)
    kwargs = {"model": str(tiny_gpt2_dir), "dataset": str(GSM8K), "metrics": ("mauve",), "prompt_field": "question",
              "response_field": "answer", "limit": 1, "max_length": 160, "max_prompt_length": 150}
    monkeypatch.setenv("KDCACHE_MAUVE_MODEL", str(_feature_model_dir(tmp_path / "large-encoder")))
    with pytest.raises(EvalError, match="path contains 'gpt2'"):
        evaluate(EvalConfig(**kwargs), log=lambda m: None)
    monkeypatch.setattr(ev, "load_model", load_model)
    folder = _feature_model_dir(tmp_path / "gpt2-large")
    monkeypatch.setenv("KDCACHE_MAUVE_MODEL", str(folder))
    res = evaluate(EvalConfig(**kwargs), log=lambda m: None)
    assert res.metrics["mauve"]["mauve"] == pytest.approx(0.75) and calls[0]["featurize_model_name"] == str(folder)


def test_bertscore_with_the_real_package_and_a_tiny_local_model(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Runs only where bert-score is installed (pip install bert-score): a 3-layer BERT in a local folder."""
    pytest.importorskip("bert_score")
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of", "to", "and", "is", "she", "he", "how", "many"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    monkeypatch.setenv("KDCACHE_BERTSCORE_MODEL", str(folder))
    res = evaluate(EvalConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), metrics=("bertscore",),
                              prompt_field="question", response_field="answer", limit=2, max_length=160,
                              max_prompt_length=150), log=lambda m: None)
    assert 0.0 < res.metrics["bertscore"]["bertscore_f1"] <= 1.0 and res.metrics["bertscore"]["num_layers"] == 3


# ---------------------------------------------------------------------------------------------
# agreement with a teacher whose embedding matrix is padded beyond its tokenizer


def test_agreement_with_a_teacher_that_has_padded_embedding_rows(tmp_path, tiny_gpt2_dir):
    """Teacher: the tiny GPT-2 with 40 extra (padded) rows, near-copies of rows 0..39, so they hold real
    probability. Student: the tiny GPT-2 itself (same first rows). The cache is what kdcache build writes for such
    a teacher (storage_layout.md 3): vocab_size = the tokenizer's ids, the top K among them under the softmax over
    all rows, the padded rows' mass in the tail. Agreement must match a dense computation in which that mass
    belongs to the rest bucket."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tokenizers import vocab_fingerprint
    from shared.writer import BuildHeader, CacheWriter
    from tests.trainer.teacher_cache import shakespeare_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    num_ids = student.config.vocab_size
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    teacher.resize_token_embeddings(num_ids + 40)
    with torch.no_grad():
        teacher.get_input_embeddings().weight[num_ids:] = 0.99 * teacher.get_input_embeddings().weight[:40]  # no exact ties
    teacher.eval()

    def rows_below_ids(input_ids: np.ndarray) -> dict:
        """The cache arrays of one sequence: the 16 most likely ids below num_ids, log-probs over all rows."""
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=torch.as_tensor(input_ids)[None]).logits[0].float(), -1)
        top_lp, top_ids = torch.topk(logp[:, :num_ids], 16, dim=-1)  # (T, 16)
        target = np.full(len(input_ids), np.nan)
        target[:-1] = logp[torch.arange(len(input_ids) - 1), torch.as_tensor(input_ids[1:])].double().numpy()
        mask = np.ones(len(input_ids), dtype=bool)
        mask[-1] = False
        return {"topk_ids": top_ids.numpy(), "topk_logprobs": top_lp.numpy(), "target_logprob": target,
                "tail_logprob": torch.log1p(-top_lp.double().exp().sum(-1).clamp(max=1.0)).numpy(), "loss_mask": mask}

    sequences = shakespeare_windows(tokenizer, num_sequences=6, max_length=32)
    header = BuildHeader(
        teacher={"name": "padded", "dtype": "float32", "engine": "test", "engine_version": "0", "path": str(tmp_path)},
        tokenizer={"name": "padded", "vocab_size": len(tokenizer), "tokenizer_size": len(tokenizer),
                   "vocab_sha256": vocab_fingerprint(tokenizer)},
        dataset={"name": "shakespeare", "fingerprint": "x", "num_sequences": len(sequences)},
        settings={"mode": "score", "top_k": 16, "max_length": 32, "chunk_rows": 512}, num_shards=1)
    url = str(tmp_path / "cache")
    with CacheWriter(url, header, chunk_rows=512) as writer:
        with writer.shard(0) as buf:
            for seq in sequences:
                buf.add_sequence(input_ids=seq["input_ids"], **rows_below_ids(seq["input_ids"]),
                                 source_index=seq["source_index"], window_index=seq["window_index"],
                                 text_sha256=seq["text_sha256"])
        writer.finalize()
    got = agreement(student, url, heldout_only=False)
    kl, agree, count, padded_mass = 0.0, 0, 0, 0.0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.as_tensor(seq["input_ids"])[None]
            p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1).exp()  # (T-1, V + 40)
            q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1).exp()  # (T-1, V)
            top = p[:, :num_ids].topk(16, dim=-1).indices  # (T-1, 16)
            padded_mass = max(padded_mass, float(p[:, num_ids:].sum(-1).max()))
            p_top, q_top = p.gather(1, top), q.gather(1, top)
            p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)  # the teacher's rest holds its padded rows' mass
            kl += float((p_top * (p_top.log() - q_top.log())).sum() + (p_rest * (p_rest.log() - q_rest.log())).sum())
            agree += int((q.argmax(-1) == top[:, 0]).sum())
            count += len(top)
    assert padded_mass > 0.01  # the padded rows really hold mass that only the tail carries
    assert got["num_tokens"] == count and got["top1_agreement"] == pytest.approx(agree / count)
    assert got["kl"] == pytest.approx(kl / count, rel=0.05, abs=2e-3)  # float16 storage


# ---------------------------------------------------------------------------------------------
# agreement on a cache holding every token id (K = V)


def test_agreement_on_a_full_vocab_cache_with_a_noisy_tail_is_the_dense_kl(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    """K = V = 384 and a stored tail of 1e-4 (float rounding a cache may hold when the top K are everything):
    agreement's KL is finite and equals the dense KL(teacher || model) over the 384 ids, the stored teacher log-probs
    renormalized, as the trainer's eval_kl (sparse_kd_loss's rule: the rest bucket is empty when K = V). It was
    +inf: the teacher's rest bucket kept the noise, the model's was empty."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tokenizers import vocab_fingerprint
    from shared.reader import CacheReader
    from shared.writer import BuildHeader, CacheWriter
    from tests.trainer.teacher_cache import shakespeare_windows, teacher_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    vocab = teacher.config.vocab_size
    sequences = shakespeare_windows(tokenizer, num_sequences=4, max_length=24)
    header = BuildHeader(
        teacher={"name": "full", "dtype": "float32", "engine": "test", "engine_version": "0", "path": str(tmp_path)},
        tokenizer={"name": "full", "vocab_size": vocab, "tokenizer_size": len(tokenizer),
                   "vocab_sha256": vocab_fingerprint(tokenizer)},
        dataset={"name": "shakespeare", "fingerprint": "x", "num_sequences": len(sequences)},
        settings={"mode": "score", "top_k": vocab, "max_length": 24, "chunk_rows": 512}, num_shards=1)
    url = str(tmp_path / "cache")
    with CacheWriter(url, header, chunk_rows=512) as writer:
        with writer.shard(0) as buf:
            for seq in sequences:
                rows = teacher_rows(teacher, seq["input_ids"], vocab)
                rows["tail_logprob"] = np.full(len(seq["input_ids"]), math.log(1e-4), dtype=np.float32)  # noise
                buf.add_sequence(input_ids=seq["input_ids"], **rows, source_index=seq["source_index"],
                                 window_index=seq["window_index"], text_sha256=seq["text_sha256"])
        writer.finalize()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    got = agreement(student, url, heldout_only=False)
    assert math.isfinite(got["kl"])

    view = CacheReader(url).shard(0)
    kl, count = 0.0, 0
    with torch.no_grad():
        for i in range(view.num_sequences):
            stored = view.read_sequence(i)
            mask = torch.as_tensor(stored["loss_mask"])
            ids = torch.as_tensor(stored["input_ids"].astype(np.int64))[None]
            q = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)[mask]  # (M, V)
            p = torch.full_like(q, -math.inf).scatter(1, torch.as_tensor(stored["topk_ids"].astype(np.int64))[mask],
                                                      torch.as_tensor(stored["topk_logprobs"]).double()[mask])
            p = p.log_softmax(-1)  # the stored distribution over all V ids, renormalized
            kl += float((p.exp() * (p - q)).sum())
            count += int(mask.sum())
    assert got["num_tokens"] == count
    assert got["kl"] == pytest.approx(kl / count, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# the held-out rows of a run: eval reads the split rule from the run it evaluates (docs/runs-and-plans.md 2)


def heldout_by_hand(cache: str, fraction: float) -> int:
    """How many sequences the documented rule holds out, computed from the meta Parquet files without trainer code."""
    import glob
    import hashlib

    import pyarrow.parquet as pq

    values = []
    for path in sorted(glob.glob(f"{cache}/meta/*.parquet")):
        meta = pq.read_table(path).to_pydict()
        for text, window, source in zip(meta["text_sha256"], meta["window_index"], meta["source_index"]):
            values.append(int(hashlib.sha256(f"{text}:{source}:{window}".encode()).hexdigest()[:8], 16) % 10_000)
    held = sum(v < round(fraction * 10_000) for v in values)
    assert 0 < held < len(values)  # the guards of the rule play no part at these fractions
    return held


@pytest.fixture(scope="module")
def run_with_a_large_heldout(tiny_cache, tiny_gpt2_dir, tmp_path_factory):
    """A kdtrain run that held out 30% of the cache's sequences (the default is 5%), with a checkpoint."""
    from trainer.train import TrainConfig, train

    out = str(tmp_path_factory.mktemp("heldout-run") / "run")
    train(TrainConfig(out=out, cache=tiny_cache, student=str(tiny_gpt2_dir), steps=2, save_every=1, batch_tokens=512,
                      eval_fraction=0.3), log=lambda m: None)
    return out


def test_eval_of_a_run_uses_the_runs_heldout_rows(run_with_a_large_heldout, tiny_cache):
    """The run held out 30%: eval on the cache's held-out rows must use exactly those (it used 5%, the default, and
    called them "cache held-out"), from the run folder and from one of its checkpoints."""
    expected = heldout_by_hand(tiny_cache, 0.3)
    checkpoint = os.path.join(run_with_a_large_heldout, "checkpoints", "step-000002")
    for model in (run_with_a_large_heldout, checkpoint):
        res = evaluate(EvalConfig(model=model, cache=tiny_cache, metrics=("ppl", "agreement")), log=lambda m: None)
        ppl, agree = res.metrics["ppl"], res.metrics["agreement"]
        assert ppl["num_windows"] == expected and ppl["source"] == "cache held-out" and ppl["eval_fraction"] == 0.3
        assert "run.json" in ppl["split_from"] and agree["eval_fraction"] == 0.3


def test_eval_refuses_a_fraction_that_reaches_a_runs_training_rows(run_with_a_large_heldout, tiny_cache):
    """--eval-fraction 0.5 on a run that held out 0.3 would score training rows: refused, naming both. A smaller
    fraction selects a subset of the run's held-out rows (a threshold on a fixed number): accepted."""
    with pytest.raises(EvalError, match=r"--eval-fraction 0.5 selects more sequences than the run held out "
                                        r"\(eval_fraction 0.3 in "
                       r".*run\.json\), so it would score training rows as held-out"):
        evaluate(EvalConfig(model=run_with_a_large_heldout, cache=tiny_cache, metrics=("ppl",), eval_fraction=0.5),
                 log=lambda m: None)
    res = evaluate(EvalConfig(model=run_with_a_large_heldout, cache=tiny_cache, metrics=("ppl",), eval_fraction=0.1),
                   log=lambda m: None)
    assert res.metrics["ppl"]["num_windows"] == heldout_by_hand(tiny_cache, 0.1)
    assert res.metrics["ppl"]["eval_fraction"] == 0.1


def test_eval_labels_other_models_and_all_rows_truthfully(tiny_cache, tiny_gpt2_dir):
    """A model that is not a kdtrain run: the default fraction, and the result says its training rows are unknown.
    --all-rows: never labelled held-out."""
    res = evaluate(EvalConfig(model=str(tiny_gpt2_dir), cache=tiny_cache, metrics=("ppl",)), log=lambda m: None)
    assert res.metrics["ppl"]["num_windows"] == heldout_by_hand(tiny_cache, 0.05)
    assert res.metrics["ppl"]["eval_fraction"] == 0.05 and "unknown" in res.metrics["ppl"]["split_from"]
    res = evaluate(EvalConfig(model=str(tiny_gpt2_dir), cache=tiny_cache, metrics=("ppl",), heldout_only=False),
                   log=lambda m: None)
    assert res.metrics["ppl"]["source"] == "cache, all rows (training rows included)"
    assert res.metrics["ppl"]["num_windows"] == 120


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), -0.1, 1.0])
def test_eval_fraction_out_of_range_refused(fraction):
    with pytest.raises(EvalError, match=r"--eval-fraction must be a finite number in \[0, 1\)"):
        EvalConfig(model="m", cache="c", metrics=("ppl",), eval_fraction=fraction)
