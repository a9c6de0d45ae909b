"""Convergence speed of a training run, from the held-out curve its metrics.jsonl logs.

A train stage logs two kinds of rows (trainer/train.py, trainer/metrics.py): training rows
{"step", "loss", ..., "tokens", ...} every --log-every steps and at the last step, where `tokens` is the
number of training tokens seen so far (all ranks), and evaluation rows {"step", "eval_loss", "eval_ppl",
"eval_tokens"[, "eval_kl", "eval_top1_agreement"]} every --eval-every steps, at step 0 when --eval-every
is set, and at the last step. `eval_tokens` is the size of the held-out set, not training progress.

Definition (docs/evaluation.md, "Convergence speed"): start = the first evaluation (step 0 when it was
logged), final = the last; improvement = how much better final is than start; the run has converged to
`fraction` at the first evaluation from which every later evaluation is at least start + fraction *
improvement better than start. Steps are resolved to the evaluation interval.

Pure functions of rows (lists of dicts) and a file reader; knows nothing about models or data.
"""

from __future__ import annotations

import bisect
import math

from trainer.metrics import read_metrics

# Held-out metrics where a larger value is better; every other one (eval_loss, eval_kl, eval_ppl) is a loss.
HIGHER_IS_BETTER = ("eval_top1_agreement",)


def heldout_curve(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    """[(step, value)] of the evaluation rows that hold `metric` with a finite value, by step (a step logged
    twice keeps its last row)."""
    by_step = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
            by_step[int(row["step"])] = float(value)
    return sorted(by_step.items())


def training_tokens(rows: list[dict]) -> dict[int, int]:
    """{step: training tokens seen after it} from the training rows, with 0 at step 0."""
    logged = {0: 0}
    for row in rows:
        if isinstance(row.get("tokens"), (int, float)) and "step" in row:
            logged[int(row["step"])] = int(row["tokens"])
    return logged


def tokens_at(logged: dict[int, int], step: int) -> tuple[int | None, bool]:
    """(training tokens seen after `step`, whether it was interpolated), from training_tokens(rows).

    Exact from the training row of that step; otherwise linear between the nearest logged training rows
    before and after it; None when no training row comes after it.
    """
    if step in logged:
        return logged[step], False
    steps = sorted(logged)
    i = bisect.bisect(steps, step)
    if i == len(steps):
        return None, False
    (s0, s1), (t0, t1) = (steps[i - 1], steps[i]), (logged[steps[i - 1]], logged[steps[i]])
    return round(t0 + (t1 - t0) * (step - s0) / (s1 - s0)), True


def convergence_speed(rows: list[dict], metric: str = "eval_loss", fraction: float = 0.9,
                      higher_is_better: bool | None = None) -> dict:
    """Steps and training tokens a run took to reach `fraction` of its final held-out improvement.

    rows: metrics.jsonl's rows (trainer.metrics.read_metrics). metric: a held-out key (eval_loss, eval_kl,
    eval_ppl, eval_top1_agreement). fraction in (0, 1]. higher_is_better: None picks by name
    (HIGHER_IS_BETTER). Returns a dict with `status`:
    - "ok": `steps`/`tokens` at the first evaluation from which every later one is at or beyond `threshold`
      (start + fraction of the way to final); `first_reached_step`, the first evaluation at or beyond it at
      all (earlier when the curve went past it and fell back);
    - "too_few_points": fewer than two evaluations of the metric;
    - "no_improvement": the final value is no better than the first.
    `curve` is the held-out curve itself: [[step, tokens, value]] (tokens None where unknown).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]: the share of the final improvement to reach")
    if rows and not any(metric in row for row in rows):
        keys = sorted({k for row in rows for k in row if k.startswith("eval_") and k != "eval_tokens"})
        raise ValueError(f"metric {metric!r} is in no row of the metrics log; its held-out metrics are: "
                         f"{', '.join(keys) or 'none (was the run started with --eval-every, on held-out data?)'}")
    higher = metric in HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    curve, logged = heldout_curve(rows, metric), training_tokens(rows)
    out = {"metric": metric, "fraction": fraction, "higher_is_better": higher, "num_points": len(curve),
           "curve": [[s, tokens_at(logged, s)[0], v] for s, v in curve], "status": "too_few_points",
           "steps": None, "tokens": None, "first_reached_step": None}
    if len(curve) < 2:
        return out
    sign = 1.0 if higher else -1.0  # gain(v) = how much better v is than the start
    (start_step, start), (final_step, final) = curve[0], curve[-1]
    improvement = sign * (final - start)
    out.update(start_step=start_step, start_value=start, final_step=final_step, final_value=final,
               improvement=improvement)
    if not improvement > 0:
        out["status"] = "no_improvement"
        return out
    threshold = start + sign * fraction * improvement
    reached = [sign * (v - threshold) >= 0 for _, v in curve[:-1]] + [True]  # the final value is 100% by definition
    stays = len(curve) - 1
    while stays > 0 and reached[stays - 1]:
        stays -= 1
    step = curve[stays][0]
    tokens, interpolated = tokens_at(logged, step)
    out.update(status="ok", threshold=threshold, steps=step, tokens=tokens, tokens_interpolated=interpolated,
               first_reached_step=curve[reached.index(True)][0])
    return out


def run_convergence(out_dir: str, metric: str = "eval_loss", fraction: float = 0.9) -> dict:
    """convergence_speed of the run in `out_dir` (its metrics.jsonl)."""
    return convergence_speed(read_metrics(out_dir), metric, fraction)
