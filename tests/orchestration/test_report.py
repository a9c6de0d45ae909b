"""The report: its table as GitHub-flavoured Markdown renders it (read back with a Markdown parser), parameter
counts, the comparisons the plan was made for."""

import json
import math
import os
import shutil
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from orchestration.plan import parse_plan
from orchestration.report import write_report
from orchestration.report_md import md_text, render_markdown
from orchestration.results import count_parameters
from orchestration.stages import stages_of

TITLES = ["teacher", "assistant(s)", "student", "params", "ppl", "top-1 agr.", "KL(T||S)", "ROUGE-L"]


class Cells(HTMLParser):
    """The text of every table cell of an HTML page, row by row, as a browser shows it."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def rendered_tables(markdown: str) -> list[list[list[str]]]:
    """Tables as GitHub-flavoured Markdown renders them (CommonMark + the GFM table extension)."""
    parser = Cells()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    return parser.tables


def plan_with_results(tmp_path, teacher):
    plan = parse_plan({"name": "p", "teacher": {"model": str(teacher)}, "data": {"dataset": "builtin:pydoc-topics"},
                       "students": {"a": {"keep_layers": 2}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]],
                       "baselines": ["s"], "eval": {"metrics": ["ppl", "agreement", "rouge"]}},
                      out=str(tmp_path / "out"))
    stages = stages_of(plan)
    ppl = {"teacher": 20.0, "teacher>a": 30.0, "teacher>s": 40.0, "teacher>a>s": 35.0, "ce:s": 50.0}
    rouge = {"teacher": 27.0, "teacher>a": 25.0, "teacher>s": 21.5, "teacher>a>s": 22.25, "ce:s": 20.0}
    for st in stages:
        if st.kind == "eval":
            os.makedirs(os.path.dirname(st.outputs["eval"]), exist_ok=True)
            with open(st.outputs["eval"], "w") as f:
                json.dump({"metrics": {"ppl": {"ppl": ppl[st.node]},
                                       "agreement": {"top1_agreement": 0.5, "kl": 0.25},
                                       "rouge": {"rougeL": rouge[st.node], "rougeL_std": 0.5}}}, f)
        if st.kind == "train":
            os.makedirs(st.outputs["run"], exist_ok=True)
            with open(os.path.join(st.outputs["run"], "run.json"), "w") as f:
                json.dump({"num_parameters": 1_234_567 if st.node.endswith("a") else 45_600}, f)
    return plan, stages


def test_report_table_renders_as_one_table_with_every_column(tmp_path, tiny_gpt2_dir):
    """Issue 17: the KL(T||S) header's pipes split the header row, so GitHub showed no table at all. The teacher's
    folder here has a pipe, a backtick and an underscore in its name too: every cell must stay one cell."""
    teacher = tmp_path / "my|odd`teacher_1"
    shutil.copytree(tiny_gpt2_dir, teacher)
    plan, stages = plan_with_results(tmp_path, teacher)
    write_report(plan, stages)
    tables = rendered_tables((tmp_path / "out" / "report.md").read_text())
    assert len(tables) == 1
    header, *rows = tables[0]
    assert header == TITLES
    shown = {tuple(row[:3]): row[3:] for row in rows}
    assert len(rows) == 5 and all(len(row) == len(TITLES) for row in rows)
    assert shown[("my|odd`teacher_1", "a", "s")] == ["45.6k", "35.00", "0.5000", "0.2500", "22.25 ± 0.50"]
    assert shown[("my|odd`teacher_1", "-", "- (the teacher itself)")][1] == "20.00"
    assert shown[("- (CE baseline)", "-", "s")][:2] == ["45.6k", "50.00"]


def test_md_text_keeps_any_name_literal():
    for name in ["a|b", "x`y`", "*bold*", "[link](http://x)", "<b>html</b>", "back\\slash", "two\nlines", "_u_"]:
        markdown = f"| name |\n| --- |\n| {md_text(name)} |\n"
        assert rendered_tables(markdown) == [[["name"], [name.replace("\n", " ")]]], name


def test_report_counts_parameters_and_compares_multi_step_with_direct(tmp_path, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    plan, stages = plan_with_results(tmp_path, tiny_gpt2_dir)
    report = write_report(plan, stages)
    md = (tmp_path / "out" / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    teacher_params = sum(p.numel() for p in model.parameters())
    assert count_parameters(str(tiny_gpt2_dir)) == teacher_params
    rows = {r["node"]: r for r in report["rows"]}
    assert rows["teacher"]["num_parameters"] == teacher_params and rows["teacher>a"]["num_parameters"] == 1_234_567
    teacher = os.path.basename(str(tiny_gpt2_dir))
    table = {tuple(row[:3]): row[3:] for row in rendered_tables(md)[0][1:]}
    assert table[(teacher, "-", "s")][:2] == ["45.6k", "40.00"] and table[(teacher, "-", "a")][:2] == ["1.23M", "30.00"]
    assert (teacher, "a", "-") not in table
    direct = [c for c in report["comparisons"] if c["against"] == "direct"]
    assert [(c["path"], c["baseline"]) for c in direct] == [("teacher → a → s", "teacher → s")]
    assert direct[0]["metrics"]["ppl"] == {"value": 35.0, "baseline": 40.0, "better": True, "difference": -5.0,
                                           "interval": None, "within_noise": None}  # no per-sequence sums: no noise
    assert direct[0]["metrics"]["ROUGE-L"]["better"] is True and direct[0]["metrics"]["top-1 agr."]["better"] is None
    assert "## Multi-step against direct distillation (same student)" in md
    assert "- teacher → a → s vs teacher → s: ppl 35.00 vs 40.00 (better)" in md
    ce = {c["path"] for c in report["comparisons"] if c["against"] == "ce"}
    assert ce == {"teacher → s", "teacher → a → s"}  # a has no CE baseline in this plan
    assert render_markdown(report) == md


# ---------------------------------------------------------------------------------------------
# Issue 17/18: acceptance and hallucination columns, noise, convergence and held-out curves

NODES = ("teacher", "teacher>a", "teacher>s", "teacher>a>s", "ce:s")
TOKENS = [100, 90, 110, 100, 95, 105]  # six held-out sequences


def per_token(values):
    return [v * n for v, n in zip(values, TOKENS)]


def eval_json(node):
    """Per-sequence sums by design: the chained student's alpha is 0.1 above the direct one's on every sequence
    (outside noise whatever the draw); its NLL is 0.3 above or below on alternate sequences (within noise)."""
    alpha = {"teacher": [1.0] * 6, "teacher>a": [0.8] * 6, "teacher>s": [0.5, 0.55, 0.45, 0.5, 0.52, 0.48],
             "teacher>a>s": [0.6, 0.65, 0.55, 0.6, 0.62, 0.58], "ce:s": [0.4] * 6}[node]
    nll = {"teacher": [2.0] * 6, "teacher>a": [2.5] * 6, "teacher>s": [3.0] * 6,
           "teacher>a>s": [3.3, 2.7, 3.3, 2.7, 3.3, 2.8], "ce:s": [3.5] * 6}[node]
    mean = lambda v: sum(per_token(v)) / sum(TOKENS)
    return {"metrics": {
        "ppl": {"ppl": math.exp(mean(nll)), "num_tokens": sum(TOKENS), "sequence_nll": per_token(nll),
                "sequence_tokens": TOKENS},
        "acceptance": {"alpha": mean(alpha), "sequence_alpha": per_token(alpha), "sequence_tokens": TOKENS,
                       "teacher_continuations": {"alpha": mean(alpha) - 0.05}},
        "gsm8k": {"gsm8k_exact_match": 0.25, "wrong_statement_rate": 0.125, "no_final_answer_rate": 0.5},
        "grounding": {"unsupported_rate": 0.0625}}}


def metrics_log(node):
    """Held-out evaluations every 10 steps; the direct student converges at step 20, the chained one at step 10."""
    kl = {"teacher>a": [2.0, 1.0, 0.9, 0.85], "teacher>s": [3.0, 2.5, 1.2, 1.0],
          "teacher>a>s": [2.0, 1.1, 1.05, 1.0], "ce:s": [3.0, 2.9, 2.9, 2.8]}[node]
    rows = []
    for i, value in enumerate(kl):
        if i:
            rows.append({"step": 10 * i, "loss": value + 1, "ce": 4.0 - i, "tokens": 1000 * i})
        rows.append({"step": 10 * i, "eval_loss": value, "eval_kl": value, "eval_ppl": math.exp(value + 2),
                     "eval_tokens": 600})
    return rows


def plan_with_measures(tmp_path, teacher):
    plan = parse_plan({"name": "m", "teacher": {"model": str(teacher)}, "data": {"dataset": "builtin:pydoc-topics"},
                       "students": {"a": {"keep_layers": 2}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]],
                       "baselines": ["s"], "eval": {"metrics": ["ppl", "acceptance"]}}, out=str(tmp_path / "out"))
    stages = stages_of(plan)
    for st in stages:
        if st.kind == "eval":
            os.makedirs(os.path.dirname(st.outputs["eval"]), exist_ok=True)
            with open(st.outputs["eval"], "w") as f:
                json.dump(eval_json(st.node), f)
        if st.kind == "train":
            os.makedirs(st.outputs["run"], exist_ok=True)
            with open(os.path.join(st.outputs["run"], "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in metrics_log(st.node))
        if st.kind in ("train", "eval"):
            os.makedirs(os.path.dirname(st.marker), exist_ok=True)
            with open(st.marker, "w") as f:
                json.dump({"settings": {"seed": 0, "eval_fraction": 0.15}}, f)
    return plan, stages


def test_report_has_the_acceptance_and_hallucination_columns(tmp_path, tiny_gpt2_dir):
    plan, stages = plan_with_measures(tmp_path, tiny_gpt2_dir)
    write_report(plan, stages)
    header, *rows = rendered_tables((tmp_path / "out" / "report.md").read_text())[0]
    assert header[4:] == ["ppl", "accept. α", "α on T samples", "GSM8K EM", "wrong arith.", "no answer", "unsupported"]
    shown = {tuple(row[:3]): row[4:] for row in rows}
    chained = shown[(os.path.basename(str(tiny_gpt2_dir)), "a", "s")]
    assert chained[1:] == ["0.5980", "0.5480", "0.25", "0.1250", "0.5000", "0.0625"]  # alpha: 358.8 / 600 tokens
    assert shown[(os.path.basename(str(tiny_gpt2_dir)), "-", "- (the teacher itself)")][1] == "1.0000"


def test_differences_within_noise_by_a_paired_bootstrap_over_sequences(tmp_path, tiny_gpt2_dir):
    plan, stages = plan_with_measures(tmp_path, tiny_gpt2_dir)
    report = write_report(plan, stages)
    md = (tmp_path / "out" / "report.md").read_text()
    direct = next(c for c in report["comparisons"] if c["against"] == "direct")["metrics"]
    alpha = direct["accept. α"]
    assert alpha["better"] is True and alpha["within_noise"] is False
    assert alpha["difference"] == pytest.approx(0.1) and alpha["interval"] == pytest.approx([0.1, 0.1])  # same gap on each
    ppl = direct["ppl"]
    assert ppl["within_noise"] is True and ppl["interval"][0] < 0 < ppl["interval"][1]
    assert direct["α on T samples"]["within_noise"] is None  # no per-sequence sums recorded for it
    assert report["heldout"] == {"metric": "ppl", "num_sequences": 6, "num_tokens": 600, "eval_fraction": 0.15}
    assert report["seeds"] == [0]
    assert "Held-out set: 6 sequences, 600 tokens" in md and "Training seeds: 1 (0)" in md
    assert "95% paired-bootstrap interval" in md
    assert "Only 6 held-out sequences: a bootstrap over so few understates the noise" in md
    assert "## Is the chain-distilled student a better draft?" in md
    assert "- teacher → a → s vs teacher → s, accept. α: 0.5980 vs 0.4980: yes, outside noise" in md
    assert "ppl 20.54 vs 20.09 (worse, within noise:" in md  # exp(1813.5 / 600) vs exp(3)
    rows = {r["node"]: r for r in report["rows"]}
    low, high = rows["teacher>s"]["intervals"]["accept. α"]
    assert low < rows["teacher>s"]["metrics"]["accept. α"] < high


def test_convergence_per_path_and_held_out_curves(tmp_path, tiny_gpt2_dir):
    plan, stages = plan_with_measures(tmp_path, tiny_gpt2_dir)
    report = write_report(plan, stages)
    rows = {r["node"]: r for r in report["rows"]}
    # 90% of the way from the first to the last held-out KL: direct 3.0 -> 1.0 passes 1.2 at step 20; chained 2.0 ->
    # 1.0 passes 1.1 at step 10
    assert rows["teacher>s"]["convergence"]["eval_kl"]["steps"] == 20
    assert rows["teacher>a>s"]["convergence"]["eval_kl"]["steps"] == 10
    assert rows["teacher>a>s"]["convergence"]["eval_kl"]["tokens"] == 1000
    assert [p[0] for p in rows["ce:s"]["convergence"]["eval_ppl"]["curve"]] == [0, 10, 20, 30]
    assert "convergence" not in rows["teacher"]
    md = (tmp_path / "out" / "report.md").read_text()
    table = next(t for t in rendered_tables(md) if t[0][0] == "path")
    assert ["teacher → a → s", "eval_kl", "2", "1", "10", "1,000", "4"] in table
    for png in ("loss_curves.png", "convergence.png", "metric_accept_alpha.png", "metric_no_answer.png",
                "agreement_along_chain.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
        assert f"]({png})" in md
