"""trainer/exposure.py: KL(teacher || model) on the model's own samples, against a dense reference."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.reader import CacheReader
from tests.conftest import build_tiny_model
from tests.trainer.teacher_cache import write_teacher_cache
from trainer.evaluate import cache_sequences
from trainer.exposure import exposure_metric, prompt_of, response_kl
from trainer.sampling import sample_responses, sample_seed, stop_ids


def kl_reference(t_logits: np.ndarray, s_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, written out in float64 numpy."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(t_logits.astype(np.float64)), log_softmax(s_logits.astype(np.float64))
    return (np.exp(p) * (p - q)).sum(-1)


def test_response_kl_equals_the_dense_reference_and_is_zero_on_itself():
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(7, 50, generator=gen) * 3, torch.randn(7, 50, generator=gen) * 3
    np.testing.assert_allclose(response_kl(t, s).numpy(), kl_reference(t.numpy(), s.numpy()), rtol=1e-10)
    assert float(response_kl(t, t).abs().max()) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        response_kl(t, s[:, :40])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir):
    return write_teacher_cache(str(tmp_path_factory.mktemp("exposure") / "cache"), tiny_gpt2_dir, num_sequences=40,
                               max_length=32)


def test_prompts_are_cut_where_the_response_starts():
    mask = np.array([0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert prompt_of({"input_ids": np.arange(7), "loss_mask": mask}, 100) == [0, 1, 2, 3]
    text = np.ones(10, dtype=bool)
    text[-1] = False  # a text window: every row but the last is trained, there is no prompt
    assert prompt_of({"input_ids": np.arange(10), "loss_mask": text}, 100) == [0, 1, 2, 3, 4]
    assert prompt_of({"input_ids": np.arange(10), "loss_mask": text}, 3) == [0, 1, 2]


def test_the_teacher_against_itself_gives_zero(cache, tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    got = exposure_metric(model, tok, model, cache, eval_fraction=0.2, seeds=(1,), greedy=False, max_length=40,
                          max_prompt_length=16, limit=None, batch_size=4)
    assert got["num_responses"] == got["num_prompts"] >= 2 and got["kl"] == 0.0


def test_exposure_equals_a_dense_computation_one_response_at_a_time(cache, tiny_gpt2_dir, tiny_tokenizer_dir,
                                                                    tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "s", "llama", tiny_tokenizer_dir,
                                                                    seed=4)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    got = exposure_metric(student, tok, teacher, cache, eval_fraction=0.2, seeds=(3, 4), greedy=False, max_length=40,
                          max_prompt_length=16, limit=None, batch_size=3)
    prompts = [prompt_of(s, 16) for s in cache_sequences(CacheReader(cache), heldout_only=True, limit=None,
                                                        eval_fraction=0.2)]
    expected, lengths = [], []
    for seed in (3, 4):
        for i, p in enumerate(prompts):
            [(ids, _)] = sample_responses(student, [p], [sample_seed(seed, i)], [40 - len(p)], temperature=1.0,
                                          stops=stop_ids(tok, None), pad_id=0)
            full = torch.tensor([p + ids])
            with torch.no_grad():
                t, s = teacher(full).logits[0].numpy(), student(full).logits[0].numpy()
            rows = slice(len(p) - 1, len(p) - 1 + len(ids))
            expected.append(kl_reference(t[rows], s[rows]).sum())
            lengths.append(len(ids))
    np.testing.assert_allclose(got["sequence_kl"], expected, rtol=1e-4)
    assert got["sequence_tokens"] == lengths and got["num_tokens"] == sum(lengths)
    assert got["kl"] == pytest.approx(sum(expected) / sum(lengths), rel=1e-4)
    per = np.asarray(expected) / np.asarray(lengths)
    assert got["kl_stderr"] == pytest.approx(per.std(ddof=1) / np.sqrt(len(per)), rel=1e-3)
    assert got["kl"] > 0.1  # a random Llama is far from the GPT-2 teacher


def test_kdtrain_eval_reports_exposure_and_refuses_it_without_a_teacher(cache, tiny_gpt2_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.kdtrain import app

    out = tmp_path / "e.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--metrics", "exposure", "--cache", cache,
                                   "--teacher", str(tiny_gpt2_dir), "--seeds", "1,2", "--max-length", "40",
                                   "--eval-fraction", "0.2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    value = json.loads(out.read_text())["metrics"]["exposure"]
    assert value["kl"] == 0.0 and value["seeds"] == [1, 2] and value["source"] == "cache held-out"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_gpt2_dir), "--metrics", "exposure", "--cache", cache])
    assert res.exit_code == 2
    assert "metric 'exposure' needs --cache (its held-out prompts) and --teacher" in " ".join(res.output.split())
