"""Each metric on fixtures with known answers."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cli.kdtrain import app
from shared.data import Sequence, extract_gsm8k_answer
from tests.conftest import GSM8K
from trainer.evaluate import EvalConfig, EvalError, agreement, evaluate, load_model, perplexity, rouge_l

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
