"""trainer/convergence.py: steps and tokens to reach a fraction of the final held-out improvement.

Curves are written by hand as metrics.jsonl rows (training rows with `tokens`, evaluation rows with
eval_*), and once by a real `kdtrain run`.
"""

import pytest

from trainer.convergence import convergence_speed, run_convergence, tokens_at, training_tokens


def log_rows(values, *, every=10, tokens_per_step=100, metric="eval_loss", train_every=None):
    """metrics.jsonl rows: an evaluation every `every` steps from step 0 with the given values, and a training
    row every `train_every` steps (default: at each evaluation but step 0) with tokens = tokens_per_step * step."""
    last = every * (len(values) - 1)
    train_every = train_every or every
    rows = [{"step": s, "loss": 1.0, "tokens": tokens_per_step * s} for s in range(train_every, last + 1, train_every)]
    rows += [{"step": every * i, metric: v, "eval_tokens": 640} for i, v in enumerate(values)]
    return sorted(rows, key=lambda r: r["step"])


def test_monotone_curve():
    # start 10, final 1: improvement 9; 90% of it is reached at 10 - 8.1 = 1.9: first at step 40 (1.5), and
    # step 30 (2.0) is not there yet
    out = convergence_speed(log_rows([10.0, 6.0, 3.0, 2.0, 1.5, 1.0]))
    assert out["status"] == "ok"
    assert (out["start_step"], out["start_value"], out["final_step"], out["final_value"]) == (0, 10.0, 50, 1.0)
    assert out["improvement"] == pytest.approx(9.0) and out["threshold"] == pytest.approx(1.9)
    assert (out["steps"], out["tokens"], out["tokens_interpolated"]) == (40, 4000, False)
    assert out["first_reached_step"] == 40
    assert out["curve"] == [[0, 0, 10.0], [10, 1000, 6.0], [20, 2000, 3.0], [30, 3000, 2.0], [40, 4000, 1.5],
                            [50, 5000, 1.0]]


def test_other_fractions():
    rows = log_rows([10.0, 6.0, 3.0, 2.0, 1.5, 1.0])
    # 50%: 10 - 4.5 = 5.5, first reached at step 20 (3.0); 100%: only the final value, step 50
    assert convergence_speed(rows, fraction=0.5)["steps"] == 20
    assert convergence_speed(rows, fraction=1.0)["steps"] == 50


def test_non_monotone_curve_counts_from_where_it_stays():
    # threshold 1.9 (as above); the curve dips to 1.5 at step 10, comes back to 5 at step 20 and stays below 1.9
    # only from step 30 on
    out = convergence_speed(log_rows([10.0, 1.5, 5.0, 1.8, 1.0]))
    assert (out["steps"], out["first_reached_step"]) == (30, 10)


def test_improvement_is_to_the_final_value_not_the_best():
    # best 0.5 at step 10, final 2.0: improvement 8, threshold 10 - 7.2 = 2.8; step 10 (0.5) and step 20 (2.0)
    # are beyond it
    out = convergence_speed(log_rows([10.0, 0.5, 2.0]))
    assert out["improvement"] == pytest.approx(8.0) and out["threshold"] == pytest.approx(2.8)
    assert out["steps"] == 10


def test_higher_is_better_for_agreement():
    # 0.1 -> 0.6: improvement 0.5, threshold 0.1 + 0.45 = 0.55: step 20 (0.58), not step 10 (0.5)
    rows = log_rows([0.1, 0.5, 0.58, 0.6], metric="eval_top1_agreement")
    out = convergence_speed(rows, metric="eval_top1_agreement")
    assert out["higher_is_better"] and out["threshold"] == pytest.approx(0.55) and out["steps"] == 20
    # told otherwise, the same curve got worse
    assert convergence_speed(rows, metric="eval_top1_agreement", higher_is_better=False)["status"] == "no_improvement"


@pytest.mark.parametrize("values", [[3.0, 4.0], [3.0, 3.0], [3.0, 1.0, 5.0]])
def test_no_improvement(values):
    out = convergence_speed(log_rows(values))
    assert out["status"] == "no_improvement" and out["steps"] is None and out["tokens"] is None
    assert out["improvement"] <= 0


def test_too_few_points():
    assert convergence_speed([])["status"] == "too_few_points"
    one = convergence_speed(log_rows([3.0]))
    assert one["status"] == "too_few_points" and one["num_points"] == 1 and one["curve"] == [[0, 0, 3.0]]


def test_start_without_a_step_zero_evaluation():
    # evaluations at steps 10, 20, 30 only: the first one is the start
    rows = [r for r in log_rows([9.0, 4.0, 2.0, 1.0]) if r["step"] != 0]
    out = convergence_speed(rows)
    # start 4 (step 10), final 1: improvement 3, threshold 4 - 2.7 = 1.3: step 30
    assert (out["start_step"], out["start_value"], out["steps"]) == (10, 4.0, 30)


def test_non_finite_values_are_skipped():
    rows = log_rows([10.0, float("inf"), 3.0, 1.0])
    out = convergence_speed(rows)
    assert [p[0] for p in out["curve"]] == [0, 20, 30] and out["steps"] == 30  # threshold 1.9


def test_tokens_between_training_rows_are_interpolated():
    # training rows every 20 steps (tokens 100 per step), evaluations every 10: step 30 lies between 20 and 40
    rows = log_rows([10.0, 8.0, 6.0, 1.5, 1.0], every=10, train_every=20)
    out = convergence_speed(rows)
    assert (out["steps"], out["tokens"], out["tokens_interpolated"]) == (30, 3000, True)


def test_tokens_at():
    logged = training_tokens([{"step": 2, "tokens": 200}, {"step": 6, "tokens": 1000}, {"step": 4, "eval_loss": 1.0}])
    assert logged == {0: 0, 2: 200, 6: 1000}
    assert tokens_at(logged, 0) == (0, False) and tokens_at(logged, 6) == (1000, False)
    assert tokens_at(logged, 4) == (600, True)  # 200 + (1000 - 200) * 2/4
    assert tokens_at(logged, 7) == (None, False)  # after the last training row: unknown


def test_bad_fraction_and_unknown_metric():
    rows = log_rows([3.0, 1.0])
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            convergence_speed(rows, fraction=fraction)
    with pytest.raises(ValueError, match="'eval_kl' is in no row.*: eval_loss$"):
        convergence_speed(rows, metric="eval_kl")


def quiet(message):
    pass


def test_a_real_runs_metrics_log(tiny_cache, tmp_path):
    from trainer.metrics import read_metrics
    from trainer.train import TrainConfig, train

    out = str(tmp_path / "run")
    train(TrainConfig(out=out, cache=tiny_cache, student_from_teacher=True, keep_layers=1, lr=2e-3, batch_tokens=384,
                      steps=6, eval_every=2, log_every=1, warmup_steps=1), log=quiet)
    rows = read_metrics(out)
    result = run_convergence(out, "eval_kl")
    # evaluations at 0, 2, 4, 6; tokens from the training rows of the same steps
    assert [p[0] for p in result["curve"]] == [0, 2, 4, 6]
    tokens = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
    assert [p[1] for p in result["curve"]] == [0, tokens[2], tokens[4], tokens[6]]
    assert result["status"] in ("ok", "no_improvement")
    if result["status"] == "ok":
        assert result["steps"] in (2, 4, 6) and result["tokens"] == tokens[result["steps"]]
