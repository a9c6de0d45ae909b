"""trainer/acceptance.py: speculative-decoding acceptance of a student drafting for its teacher.

The pure functions are checked in float64 against an independent numpy computation of
sum_x min(p(x), q(x)); the metric runs tiny models over tiny caches (tests/trainer/teacher_cache.py).
"""

import math

import numpy as np
import pytest
import torch

from trainer.acceptance import (
    acceptance_dense,
    acceptance_from_cache,
    acceptance_metric,
    acceptance_summary,
    continuation_prompt_length,
    teacher_continuations,
    tokens_per_teacher_forward,
)
from trainer.divergences import EmptyTeacherRowError


def numpy_alpha(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> np.ndarray:
    """The reference: softmax of each side in numpy float64, then sum of the elementwise minimum."""
    def softmax(z):
        z = z.numpy().astype(np.float64)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return np.minimum(softmax(teacher_logits), softmax(student_logits)).sum(-1)


def cache_row(teacher_logits: torch.Tensor, k: int, targets: torch.Tensor | None = None):
    """A cache row written exactly (float64): top-k ids and log-probs, the tail log-prob, the target's log-prob."""
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)  # (N, V)
    top_lp, top_ids = torch.topk(logp, k, dim=-1)  # (N, K)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0))  # (N,) -inf at K = V
    target_lp = None if targets is None else logp.gather(1, targets[:, None])[:, 0]
    return top_ids, top_lp, tail, target_lp


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 50, generator=g, dtype=torch.float64) * 2
    student = torch.randn(32, 50, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, 50, (32,), generator=g)
    return teacher, student, targets


def test_dense_equals_the_numpy_reference(logits):
    teacher, student, _ = logits
    np.testing.assert_allclose(acceptance_dense(teacher, student).numpy(), numpy_alpha(teacher, student), rtol=0,
                               atol=1e-12)


def test_teacher_as_its_own_draft_gives_one(logits):
    teacher, _, targets = logits
    assert torch.allclose(acceptance_dense(teacher, teacher), torch.ones(32, dtype=torch.float64), atol=1e-12)
    ids, lp, tail, target_lp = cache_row(teacher, 50, targets)
    lower, upper = acceptance_from_cache(teacher, ids, lp, tail, targets, target_lp)
    assert torch.allclose(lower, torch.ones(32, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(upper, torch.ones(32, dtype=torch.float64), atol=1e-12)
    # K < V: the named tokens give 1 - P_rest exactly, and the upper bound is 1 (the rests are the same)
    ids, lp, tail, _ = cache_row(teacher, 8)
    lower, upper = acceptance_from_cache(teacher, ids, lp, tail)
    assert torch.allclose(lower, 1 - tail.exp(), atol=1e-12)
    assert torch.allclose(upper, torch.ones(32, dtype=torch.float64), atol=1e-12)


def test_full_vocabulary_cache_equals_dense(logits):
    teacher, student, targets = logits
    exact = torch.as_tensor(numpy_alpha(teacher, student))
    ids, lp, tail, target_lp = cache_row(teacher, 50, targets)
    for args in ((), (targets, target_lp)):
        lower, upper = acceptance_from_cache(student, ids, lp, tail, *args)
        assert torch.allclose(lower, exact, atol=1e-12) and torch.allclose(upper, exact, atol=1e-12)
    # a rounding remainder stored as the tail of a K = V row is not mass (the losses' rule): still exact
    lower, upper = acceptance_from_cache(student, ids, lp, torch.full_like(tail, math.log(1e-4)))
    assert torch.allclose(lower, exact, atol=1e-12) and torch.allclose(upper, exact, atol=1e-12)


def test_k_equals_v_minus_one_with_the_target_outside_equals_dense(logits):
    teacher, student, _ = logits
    ids, lp, tail, _ = cache_row(teacher, 49)
    missing = torch.as_tensor([min(set(range(50)) - set(r.tolist())) for r in ids])  # (N,) the one left out
    target_lp = torch.log_softmax(teacher, -1).gather(1, missing[:, None])[:, 0]
    lower, upper = acceptance_from_cache(student, ids, lp, tail, missing, target_lp)
    exact = torch.as_tensor(numpy_alpha(teacher, student))
    assert torch.allclose(lower, exact, atol=1e-12) and torch.allclose(upper, exact, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 20, 49])
@pytest.mark.parametrize("with_target", [False, True])
def test_bounds_contain_the_exact_value(logits, k, with_target):
    teacher, student, targets = logits
    ids, lp, tail, target_lp = cache_row(teacher, k, targets)
    args = (targets, target_lp) if with_target else ()
    lower, upper = acceptance_from_cache(student, ids, lp, tail, *args)
    exact = torch.as_tensor(numpy_alpha(teacher, student))
    assert bool((lower <= exact + 1e-12).all()) and bool((exact <= upper + 1e-12).all())
    assert bool((upper - lower <= tail.exp() + 1e-12).all())  # the gap is at most the teacher's tail mass


def test_target_bucket_tightens_the_bounds(logits):
    teacher, student, targets = logits
    ids, lp, tail, target_lp = cache_row(teacher, 5, targets)
    plain = acceptance_from_cache(student, ids, lp, tail)
    split = acceptance_from_cache(student, ids, lp, tail, targets, target_lp)
    assert bool((split[0] >= plain[0] - 1e-12).all()) and bool((split[1] <= plain[1] + 1e-12).all())
    # the cache's +1.0 sentinel (target log-prob unknown) keeps K + 1 buckets
    unknown = acceptance_from_cache(student, ids, lp, tail, targets, torch.ones_like(target_lp))
    assert torch.equal(unknown[0], plain[0]) and torch.equal(unknown[1], plain[1])


def test_each_bound_is_attained():
    # V = 4, teacher's top-2 = {0, 1} with 0.4 each, rest {2, 3} with 0.1 each
    teacher = torch.tensor([[0.4, 0.4, 0.1, 0.1]], dtype=torch.float64).log()
    ids, lp, tail, _ = cache_row(teacher, 2)
    # student spreads its rest like the teacher: the overlap outside is min(0.2, 0.2) = 0.2, the upper bound
    same_shape = torch.tensor([[0.5, 0.3, 0.1, 0.1]], dtype=torch.float64).log()
    lower, upper = acceptance_from_cache(same_shape, ids, lp, tail)
    assert float(lower) == pytest.approx(0.4 + 0.3) and float(upper) == pytest.approx(0.9)
    assert float(acceptance_dense(teacher, same_shape)) == pytest.approx(0.9)
    # ... or on other rest tokens: 0 outside, the lower bound (here the student has no mass on 2 and 3)
    elsewhere = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64).log()
    lower, upper = acceptance_from_cache(elsewhere, ids, lp, tail)
    assert float(lower) == pytest.approx(0.7) and float(upper) == pytest.approx(0.9)
    assert float(acceptance_dense(teacher, elsewhere)) == pytest.approx(0.4 + 0.3 + 0.1)  # token 2: min(0.1, 0.2)


def test_row_without_teacher_mass_is_refused(logits):
    teacher, student, _ = logits
    ids, lp, tail, _ = cache_row(teacher, 5)
    lp[3], tail[3] = -math.inf, -math.inf
    with pytest.raises(EmptyTeacherRowError, match="row 3 of 32"):
        acceptance_from_cache(student, ids, lp, tail)


def test_target_ids_and_logprob_go_together(logits):
    teacher, student, targets = logits
    ids, lp, tail, _ = cache_row(teacher, 5)
    with pytest.raises(ValueError, match="together"):
        acceptance_from_cache(student, ids, lp, tail, targets)


def test_dense_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        acceptance_dense(torch.zeros(2, 5), torch.zeros(2, 6))


def test_no_rows():
    lower, upper = acceptance_from_cache(torch.zeros(0, 6), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                                         torch.zeros(0))
    assert lower.shape == upper.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Tokens per teacher forward and the summary


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_tokens_per_forward_is_the_closed_form(alpha, gamma):
    assert tokens_per_teacher_forward(alpha, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))


def test_tokens_per_forward_by_hand():
    assert tokens_per_teacher_forward(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert tokens_per_teacher_forward(1.0, 4) == 5.0  # every draft accepted, plus the teacher's own token
    assert tokens_per_teacher_forward(0.0, 8) == 1.0  # only the teacher's token


def test_summary_uses_the_mean_alpha():
    out = acceptance_summary(torch.tensor([0.2, 0.8, 0.99]), mask=torch.tensor([True, True, False]))
    assert out["alpha"] == pytest.approx(0.5) and out["num_tokens"] == 2
    # gamma 2 from the mean: 1 + 0.5 + 0.25 = 1.75 (averaging per position would give (1.24 + 2.44) / 2 = 1.84)
    assert out["tokens_per_teacher_forward"]["2"] == pytest.approx(1.75)
    assert sorted(out["tokens_per_teacher_forward"], key=int) == [str(g) for g in range(1, 9)]


def test_summary_of_all_masked_rows():
    out = acceptance_summary(torch.tensor([0.3, 0.4]), mask=torch.tensor([False, False]))
    assert out["alpha"] is None and out["num_tokens"] == 0
    assert set(out["tokens_per_teacher_forward"].values()) == {None}


# ---------------------------------------------------------------------------------------------
# The metric on tiny models


def test_continuation_prompt_length():
    assert continuation_prompt_length(np.array([0, 0, 0, 1, 1, 1, 0], dtype=bool)) == 4  # after the prompt
    assert continuation_prompt_length(np.array([1] * 9 + [0], dtype=bool)) == 5  # plain text: halfway
    assert continuation_prompt_length(np.array([1, 0], dtype=bool)) == 1


def read_sequences(cache, count):
    from shared.reader import CacheReader

    shard = CacheReader(cache, verify_on_read=True).shard(0)
    return [shard.read_sequence(i) for i in range(count)]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def full_vocab_cache(tmp_path_factory, trained_teacher_dir):
    from tests.trainer.teacher_cache import write_teacher_cache

    vocab = load(trained_teacher_dir).config.vocab_size
    return write_teacher_cache(str(tmp_path_factory.mktemp("cache") / "full"), trained_teacher_dir,
                               num_sequences=3, max_length=32, top_k=vocab)


def test_metric_teacher_as_its_own_draft(trained_cache, trained_teacher_dir):
    teacher = load(trained_teacher_dir)
    sequences = read_sequences(trained_cache, 3)
    out = acceptance_metric(teacher, sequences, teacher.config.vocab_size, teacher=teacher, seed=1, batch_size=2)
    assert out["alpha_source"] == "teacher logits" and out["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert out["tokens_per_teacher_forward"]["8"] == pytest.approx(9.0, abs=1e-3)
    continuations = out["teacher_continuations"]
    assert continuations["alpha"] == pytest.approx(1.0, abs=1e-5) and continuations["num_tokens"] > 0
    # from the top-16 cache alone: the upper bound is 1 up to the cache's float16 rounding; the lower is 1 - tail
    assert out["alpha_cache_upper"] == pytest.approx(1.0, abs=2e-3)
    assert out["alpha_cache_lower"] < out["alpha_cache_upper"]


def test_metric_bounds_contain_the_exact_value(trained_cache, trained_teacher_dir, tiny_llama_dir):
    teacher, student = load(trained_teacher_dir), load(tiny_llama_dir)
    out = acceptance_metric(student, read_sequences(trained_cache, 4), teacher.config.vocab_size, teacher=teacher,
                            batch_size=3)
    # float16 storage moves each stored probability by a relative 1e-3 at most
    assert out["alpha_cache_lower"] - 2e-3 <= out["alpha_exact"] <= out["alpha_cache_upper"] + 2e-3
    assert 0 < out["alpha_exact"] < 1 and out["num_tokens"] == sum(int(s["loss_mask"].sum()) for s in
                                                                  read_sequences(trained_cache, 4))


def test_metric_on_a_full_vocabulary_cache_is_exact(full_vocab_cache, trained_teacher_dir, tiny_llama_dir):
    teacher, student = load(trained_teacher_dir), load(tiny_llama_dir)
    out = acceptance_metric(student, read_sequences(full_vocab_cache, 3), teacher.config.vocab_size, teacher=teacher,
                            batch_size=2)
    assert out["alpha_cache_lower"] == pytest.approx(out["alpha_cache_upper"], abs=1e-6)
    assert out["alpha_cache_lower"] == pytest.approx(out["alpha_exact"], abs=2e-3)  # float16 storage


def test_metric_without_teacher_reports_the_cache_lower_bound(trained_cache, tiny_llama_dir):
    student = load(tiny_llama_dir)
    out = acceptance_metric(student, read_sequences(trained_cache, 2), student.config.vocab_size)
    assert out["alpha_source"] == "cache lower bound" and out["alpha"] == out["alpha_cache_lower"]
    assert "teacher_continuations" not in out and "alpha_exact" not in out
    from trainer.errors import EvalError

    with pytest.raises(EvalError, match="no cache sequences"):
        acceptance_metric(student, [], student.config.vocab_size)


def test_continuations_are_seeded_and_sized(trained_cache, trained_teacher_dir):
    teacher = load(trained_teacher_dir)
    sequences = read_sequences(trained_cache, 3)
    first = teacher_continuations(teacher, sequences, seed=5, batch_size=2)
    again = teacher_continuations(teacher, sequences, seed=5, batch_size=2)
    assert all(np.array_equal(a, b) and m == n for (a, m), (b, n) in zip(first, again))
    for (ids, prompt), s in zip(first, sequences):
        n = len(s["input_ids"])
        assert prompt == continuation_prompt_length(s["loss_mask"])
        assert np.array_equal(ids[:prompt], s["input_ids"][:prompt])
        assert 1 <= len(ids) - prompt <= n - prompt  # no longer than the text it replaces


# ---------------------------------------------------------------------------------------------
# kdtrain eval --metrics acceptance


def quiet(message):
    pass


def test_kdtrain_eval_acceptance(trained_cache, trained_teacher_dir, tiny_llama_dir, tmp_path):
    import json

    from trainer.evaluate import EvalConfig, evaluate

    out = tmp_path / "eval.json"
    result = evaluate(EvalConfig(model=str(tiny_llama_dir), cache=trained_cache, teacher=str(trained_teacher_dir),
                                 metrics=("acceptance",), limit=3, batch_size=2, out=str(out)), log=quiet)
    value = result.metrics["acceptance"]
    assert value["alpha_source"] == "teacher logits" and value["alpha"] == value["alpha_exact"]
    assert value["alpha_cache_lower"] - 2e-3 <= value["alpha"] <= value["alpha_cache_upper"] + 2e-3
    assert 0 < value["alpha_teacher_continuations"] < 1
    assert value["source"] == "cache held-out" and value["eval_fraction"] == pytest.approx(0.05)
    assert json.loads(out.read_text())["metrics"]["acceptance"]["alpha"] == value["alpha"]


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics": ("acceptance",)}, "'acceptance' needs --cache"),
    ({"metrics": ("ppl",), "cache": "c", "teacher": "t"},
     "--teacher is used by metrics 'acceptance', 'exposure' and 'speculative' only"),
], ids=["no cache", "teacher without acceptance"])
def test_kdtrain_eval_acceptance_refusals(kwargs, message):
    from trainer.evaluate import EvalConfig, EvalError

    with pytest.raises(EvalError, match=message):
        EvalConfig(model="m", **kwargs)


def test_kdtrain_eval_acceptance_refuses_a_teacher_with_fewer_token_ids(trained_cache, tiny_llama_dir,
                                                                        tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from trainer.evaluate import EvalConfig, EvalError, evaluate

    small = tmp_path / "small-teacher"
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(small)
    with pytest.raises(EvalError, match=r"--teacher: its vocabulary \(16\) is smaller than the cache's"):
        evaluate(EvalConfig(model=str(tiny_llama_dir), cache=trained_cache, teacher=str(small),
                            metrics=("acceptance",), limit=1), log=quiet)
