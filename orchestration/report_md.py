"""report.md: the report (orchestration/report.py builds it) as GitHub-flavoured Markdown.

The results table (one row per model, shaped like the MSKD paper's), what the held-out set is and how many
training seeds there were, the comparisons the plan was made for with which differences are within noise,
the answer to "is a chain-distilled student a better draft than the directly distilled one" where acceptance
was measured, each trained model's convergence, and the plots. Every name and cell is escaped (md_text): names
come from plans, folders and caches and must never change the table. Knows the report's dict; reads no file.
"""

from __future__ import annotations

import os

from orchestration.noise import CONFIDENCE, RESAMPLES
from orchestration.results import ARROW, BETTER, COLUMNS, CONVERGENCE_FRACTION, human_count, short_name

MARKDOWN_SPECIAL = set("\\`*_[]<>|")
FOUR_DECIMALS = {"top-1 agr.", "KL(T||S)", "accept. α", "α on T samples", "wrong arith.", "no answer", "unsupported"}
DRAFT_METRICS = ("accept. α", "α on T samples")
# Below this many held-out sequences, a percentile bootstrap's interval is too narrow (it sees at most n^n draws of
# n values and no variation beyond them): report.md says so.
FEW_SEQUENCES = 20


def md_text(value) -> str:
    """value as literal text in GitHub-flavoured Markdown, also inside a table cell: the characters Markdown gives
    a meaning (a pipe ends a cell, backticks, emphasis, links, HTML) are backslash-escaped, newlines become
    spaces. Names in a report come from plans, folders and caches, so none of them may change the table."""
    text = " ".join(str(value).splitlines())
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)


def _number(title: str, v: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{v:{sign}.4f}" if title in FOUR_DECIMALS else f"{v:{sign}.2f}"


def _cell(title: str, metrics: dict) -> str:
    v = metrics.get(title)
    if v is None:
        return "-"
    if title == "ROUGE-L" and isinstance(metrics.get("ROUGE-L std"), (int, float)):
        return f"{v:.2f} ± {metrics['ROUGE-L std']:.2f}"
    return _number(title, v)


def _verdict(title: str, m: dict) -> str:
    """'better', 'worse' or 'same', and where the noise is known: the difference, its interval, within noise or not."""
    word = "same" if m["better"] is None else ("better" if m["better"] else "worse")
    if m.get("interval") is None:
        return word
    return f"{word}, {'within' if m['within_noise'] else 'outside'} noise: {_difference(title, m)}"


def _difference(title: str, m: dict) -> str:
    """'+0.1000, 95% interval [+0.0735, +0.1237]'."""
    low, high = m["interval"]
    return (f"{_number(title, m['difference'], True)}, {CONFIDENCE:.0%} interval "
            f"[{_number(title, low, True)}, {_number(title, high, True)}]")


def _table_row(cells) -> str:
    return "| " + " | ".join(md_text(c) for c in cells) + " |"


def _results_table(report: dict, titles: list[str]) -> list[str]:
    lines = [_table_row(["teacher", "assistant(s)", "student", "params", *titles]),
             "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in titles) + " |"]
    for r in report["rows"]:
        if r["kind"] == "teacher":
            who = [short_name(r["teacher"]), "-", "- (the teacher itself)"]
        elif r["kind"] == "ce":
            who = ["- (CE baseline)", "-", r["student"]]
        else:
            who = [short_name(r["teacher"]), ARROW.join(r["assistants"]) or "-",
                   r["student"] + (" (on-policy rounds)" if r["kind"] == "onpolicy" else "")]
        lines.append(_table_row([*who, human_count(r.get("num_parameters")), *(_cell(t, r["metrics"]) for t in titles)]))
    return lines


def _setup_lines(report: dict) -> list[str]:
    """The held-out set, the training seeds and the noise rule, in words."""
    lines = []
    held = report.get("heldout")
    if held:
        fraction = f", eval_fraction {held['eval_fraction']}" if held.get("eval_fraction") is not None else ""
        lines.append(md_text(f"Held-out set: {held['num_sequences']} sequences, {held['num_tokens']:,} tokens (the "
                             "teacher "
                             f"cache's held-out sequences{fraction}), the same for every model; never trained on."))
    seeds = report.get("seeds") or []
    if seeds:
        lines.append(md_text(f"Training seeds: {len(seeds)} ({', '.join(str(s) for s in seeds)}); each student was "
                             "trained once per path."))
    noise_shown = any(m.get("interval") is not None for c in report["comparisons"] for m in c["metrics"].values())
    if noise_shown:
        lines.append(md_text(
            f"Noise: a difference is within noise when its {CONFIDENCE:.0%} paired-bootstrap interval over the "
            "held-out "
            f"sequences ({RESAMPLES} resamples of the sequences; both models on the same draws) contains 0. This is "
            "the "
            "noise of the held-out sample only: with one training seed the spread between seeds is not measured "
            "(docs/evaluation.md, Noise). Metrics without per-sequence values show no interval."))
    if noise_shown and held and held["num_sequences"] < FEW_SEQUENCES:
        lines.append(md_text(f"Only {held['num_sequences']} held-out sequences: a bootstrap over so few understates "
                             "the "
                             f"noise (fewer than {FEW_SEQUENCES}); hold out more (train.eval_fraction, or more data) "
                             "before trusting a verdict."))
    return [line for item in lines for line in ("", item)]


def _comparison_lines(report: dict) -> list[str]:
    lines = []
    sections = (("ce", "## KD against the cross-entropy baseline (same student, data and steps)"),
                ("direct", "## Multi-step against direct distillation (same student)"))
    for against, heading in sections:
        entries = [c for c in report["comparisons"] if c["against"] == against]
        if not entries:
            continue
        lines += ["", heading, ""]
        for c in entries:
            shown = "; ".join(f"{t} {_cell(t, {t: m['value']})} vs {_cell(t, {t: m['baseline']})} ({_verdict(t, m)})"
                              for t, m in c["metrics"].items())
            lines.append(f"- {md_text(c['path'])} vs {md_text(c['baseline'])}: {md_text(shown)}")
    return lines


def draft_answer(m: dict) -> str:
    """The answer to 'is the chain-distilled student the better draft?' from one compared acceptance metric."""
    if m.get("within_noise") is None:
        word = {None: "equal", True: "yes", False: "no"}[m["better"]]
        return f"{word} (noise not estimated)"
    if m["within_noise"]:
        return "no measurable difference (within noise)"
    return "yes, outside noise" if m["better"] else "no: the direct student is the better draft, outside noise"


def _draft_lines(report: dict) -> list[str]:
    """Is a chain-distilled student a better speculative-decoding draft than the directly distilled one?"""
    entries = [c for c in report["comparisons"] if c["against"] == "direct"
               and any(t in c["metrics"] for t in DRAFT_METRICS)]
    if not entries:
        return []
    lines = ["", "## Is the chain-distilled student a better draft? (speculative decoding, same student size)", "",
             md_text("alpha: the expected share of drafted tokens the teacher accepts, sum over x of min(p_teacher, "
                     "p_student), on the held-out text and on continuations the teacher sampled "
                     "(docs/evaluation.md, Acceptance)."), ""]
    for c in entries:
        for title in DRAFT_METRICS:
            m = c["metrics"].get(title)
            if m is not None:
                lines.append(f"- {md_text(c['path'])} vs {md_text(c['baseline'])}, {md_text(title)}: "
                             f"{md_text(_cell(title, {title: m['value']}))} vs "
                             f"{md_text(_cell(title, {title: m['baseline']}))}: {md_text(draft_answer(m))}"
                             + (f" ({md_text(_difference(title, m))})" if m.get("interval") is not None else ""))
    return lines


def _convergence_lines(report: dict) -> list[str]:
    rows = [(r, metric, c) for r in report["rows"] for metric, c in (r.get("convergence") or {}).items()]
    if not rows:
        return []
    lines = ["", f"## Convergence (held-out, steps to {CONVERGENCE_FRACTION:.0%} of each run's own improvement)", "",
             md_text(f"A run has converged at the first evaluation from which every later one is at least "
                     f"{CONVERGENCE_FRACTION:.0%} of the way from its first held-out value to its last "
                     "(docs/evaluation.md, "
                     "Convergence speed); steps are resolved to the evaluation interval. eval_kl is the KL to the "
                     "teacher "
                     "the run was trained from (the previous model on its path; the root teacher for CE baselines); "
                     "eval_ppl is the perplexity of the real next tokens."), "",
             _table_row(["path", "held-out metric", "first", "last", "steps", "tokens", "evaluations"]),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r, metric, c in rows:
        first = f"{c['start_value']:.4g}" if c.get("start_value") is not None else "-"
        last = f"{c['final_value']:.4g}" if c.get("final_value") is not None else "-"
        steps = str(c["steps"]) if c["status"] == "ok" else c["status"].replace("_", " ")
        tokens = f"{c['tokens']:,}" if c.get("tokens") is not None else "-"
        lines.append(_table_row([r["path"], metric, first, last, steps, tokens, c["num_points"]]))
    return lines


def render_markdown(report: dict) -> str:
    titles = [t for _, _, t, _ in COLUMNS if any(t in r["metrics"] for r in report["rows"])]
    lines = [f"# kdcache plan {md_text(report['plan'])}", "", f"Teacher: {md_text(report['teacher'])}",
             *_setup_lines(report), "", *_results_table(report, titles)]
    lines += ["", md_text("Lower is better for " + ", ".join(t for t in titles if BETTER[t] == "lower")
                          + "; higher for the rest.") if titles else ""]
    if "ROUGE-L" in titles:
        lines.append("ROUGE-L: mean ± standard deviation over the sampling seeds.")
    skipped = [(r["path"], k, v) for r in report["rows"] for k, v in r["metrics"].items() if k.endswith("(skipped)")]
    if skipped:
        lines += ["", "Skipped metrics:"] + [f"- {md_text(p)}: {md_text(k[:-10])}: {md_text(v)}" for p, k, v in skipped]
    lines += _comparison_lines(report) + _draft_lines(report) + _convergence_lines(report)
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{md_text(os.path.basename(p))}]({os.path.basename(p)})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
