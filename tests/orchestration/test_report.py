"""The report: its table as GitHub-flavoured Markdown renders it (read back with a Markdown parser), parameter
counts, the comparisons the plan was made for."""

import json
import os
import shutil
from html.parser import HTMLParser

from markdown_it import MarkdownIt

from orchestration.plan import parse_plan
from orchestration.report import count_parameters, md_text, render_markdown, write_report
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
    assert direct[0]["metrics"]["ppl"] == {"value": 35.0, "baseline": 40.0, "better": True}
    assert direct[0]["metrics"]["ROUGE-L"]["better"] is True and direct[0]["metrics"]["top-1 agr."]["better"] is None
    assert "## Multi-step against direct distillation (same student)" in md
    assert "- teacher → a → s vs teacher → s: ppl 35.00 vs 40.00 (better)" in md
    ce = {c["path"] for c in report["comparisons"] if c["against"] == "ce"}
    assert ce == {"teacher → s", "teacher → a → s"}  # a has no CE baseline in this plan
    assert render_markdown(report) == md
