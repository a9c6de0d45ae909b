"""The report of a plan: report.json, report.md (a table shaped like the MSKD paper's) and PNG plots.

The table has one row per evaluated model with its path split into teacher | assistant(s) | student,
the model's parameter count (run.json, else the safetensors headers of its folder) and every metric
(ROUGE-L as mean ± std over the sampling seeds). Below it, the comparisons the plan was made for: each
KD path against the student's cross-entropy baseline, and each multi-step path (teacher -> assistants
-> student) against the direct path to the same student (teacher -> student).

Reads what the stages left on disk (eval JSON files, run.json, each run's metrics.jsonl, safetensors
headers); never runs a model. Imported by the runner, never importing it.
"""

from __future__ import annotations

import json
import os
import struct

from orchestration.caches import read_marker, teacher_folder
from orchestration.plan import TEACHER, PlanError
from orchestration.stages import model_dir_of, stage_id

ARROW = " → "
MARKDOWN_SPECIAL = set("\\`*_[]<>|")
COLUMNS = (  # (metric file key, value key, column title, better)
    ("ppl", "ppl", "ppl", "lower"),
    ("agreement", "top1_agreement", "top-1 agr.", "higher"),
    ("agreement", "kl", "KL(T||S)", "lower"),
    ("rouge", "rougeL", "ROUGE-L", "higher"),
    ("gsm8k", "gsm8k_exact_match", "GSM8K EM", "higher"),
    ("bertscore", "bertscore_f1", "BERTScore", "higher"),
    ("mauve", "mauve", "MAUVE", "higher"),
)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def read_metrics_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
    except FileNotFoundError:
        pass
    return rows


def path_label(node: str) -> str:
    if node.startswith("ce:"):
        return f"CE baseline ({node[3:]})"
    return node.replace(">", ARROW)


def path_parts(node: str) -> tuple[str, list[str], str]:
    """(teacher, assistants, student) of a node: 'teacher>a>b>s' -> ('teacher', ['a', 'b'], 's').

    The teacher itself is ('teacher', [], ''); a CE baseline 'ce:s' has no teacher: ('', [], 's').
    """
    if node.startswith("ce:"):
        return "", [], node[3:]
    parts = node.split(">")
    if len(parts) == 1:
        return parts[0], [], ""
    return parts[0], parts[1:-1], parts[-1]


def count_parameters(folder: str) -> int | None:
    """Parameters stored in a model folder's *.safetensors files, from their headers only (no weights read).

    A safetensors file starts with a little-endian u64 N and N bytes of JSON mapping each tensor to its
    shape; tied weights are stored once, so this matches sum(p.numel() for p in model.parameters()).
    None when the folder has no readable safetensors file.
    """
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except OSError:
        return None
    total = 0
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= int(dim)
                total += count
    return total or None


def human_count(n: int | None) -> str:
    """124439808 -> '124M', 1557611200 -> '1.56B'; '-' for None."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def short_name(model: str) -> str:
    """A model as the table shows it: a local folder by its last component, a hub id as it is."""
    return os.path.basename(model.rstrip("/")) if os.path.isabs(model) or os.path.isdir(model) else model


def _model_parameters(plan, node: str, run_dir: str | None) -> int | None:
    if run_dir is not None:
        info = _read_json(os.path.join(run_dir, "run.json")) or {}
        if isinstance(info.get("num_parameters"), int):
            return info["num_parameters"]
        return count_parameters(run_dir)
    try:
        return count_parameters(teacher_folder(plan))
    except PlanError:
        return None


def write_report(plan, stages) -> dict:
    """report.json, report.md and the plots under plan.out, from what the stages left on disk.

    The settings it states are those each stage's done-marker recorded (the settings its result was produced
    with, state.marker_record), never the plan's current ones: "train" holds the settings every KD train
    stage shared, each row its own train stage's, "cache" the root teacher cache stage's.
    """
    markers = {st.id: read_marker(st.marker) or {} for st in stages}
    runs = {st.node: st.outputs["run"] for st in stages if st.kind == "train"}
    rows = []
    for st in stages:
        if st.kind != "eval":
            continue
        result = _read_json(st.outputs["eval"]) or {}
        metrics = result.get("metrics", {})
        node = st.node
        student = node[3:] if node.startswith("ce:") else node.rsplit(">", 1)[-1]
        kind = "teacher" if node == "teacher" else ("ce" if node.startswith("ce:") else f"kd-{node.count('>')}-step")
        teacher, assistants, _ = path_parts(node)
        row = {"node": node, "path": path_label(node), "student": student, "kind": kind,
               "teacher": plan.teacher["model"] if teacher else "", "assistants": assistants,
               "model": model_dir_of(plan, node),
               "num_parameters": _model_parameters(plan, node, runs.get(node) if node != TEACHER else None),
               "train_settings": markers.get(stage_id("train", node), {}).get("settings"),
               "metrics": {}}
        for metric, key, title, _ in COLUMNS:
            value = metrics.get(metric, {}).get(key)
            if isinstance(value, (int, float)):
                row["metrics"][title] = value
        std = metrics.get("rouge", {}).get("rougeL_std")
        if isinstance(std, (int, float)) and "ROUGE-L" in row["metrics"]:
            row["metrics"]["ROUGE-L std"] = std
        for metric, value in metrics.items():
            if isinstance(value, dict) and "skipped" in value:
                row["metrics"][f"{metric} (skipped)"] = value["skipped"]
        rows.append(row)
    caches = {st.node: markers[st.id].get("cache") for st in stages if st.kind == "cache"}
    kd_settings = [markers[st.id].get("settings") or {} for st in stages
                   if st.kind == "train" and not st.node.startswith("ce:")]
    report = {"plan": plan.name, "teacher": plan.teacher["model"], "train": _shared(kd_settings),
              "cache": markers.get(stage_id("cache", TEACHER), {}).get("settings"),
              "caches": caches, "rows": rows, "comparisons": _comparisons(rows)}
    os.makedirs(plan.out, exist_ok=True)
    report["plots"] = _plots(plan, stages, rows)
    with open(os.path.join(plan.out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    with open(os.path.join(plan.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _shared(settings: list[dict]) -> dict:
    """The items every one of settings has with one value (the student's own fields differ per stage)."""
    if not settings:
        return {}
    return {k: v for k, v in settings[0].items() if all(k in s and s[k] == v for s in settings[1:])}


def _comparisons(rows: list[dict]) -> list[dict]:
    """What the plan compares, on every metric both rows have:

    - against "ce": each KD path to a student vs that student's cross-entropy baseline;
    - against "direct": each multi-step path (teacher -> assistants -> student) vs the direct path
      teacher -> student, the question sequential distillation asks.

    One entry per (path, baseline): {"against", "student", "path", "baseline", "metrics": {title:
    {"value", "baseline", "better"}}}; better is True / False, or None on a tie.
    """
    better_is = {title: b for _, _, title, b in COLUMNS}
    by_node = {r["node"]: r for r in rows}
    out = []
    for r in rows:
        if r["kind"] in ("teacher", "ce"):
            continue
        baselines = [("ce", by_node.get(f"ce:{r['student']}"))]
        if r["node"].count(">") > 1:
            baselines.append(("direct", by_node.get(f"teacher>{r['student']}")))
        for against, base in baselines:
            if base is None:
                continue
            compared = {}
            for title, value in r["metrics"].items():
                other = base["metrics"].get(title)
                if title not in better_is or not isinstance(value, (int, float)) or not isinstance(other, (int, float)):
                    continue
                better = None if value == other else ((value < other) == (better_is[title] == "lower"))
                compared[title] = {"value": value, "baseline": other, "better": better}
            if compared:
                out.append({"against": against, "student": r["student"], "path": r["path"], "baseline": base["path"],
                            "metrics": compared})
    return out


def _cell(title: str, metrics: dict) -> str:
    v = metrics.get(title)
    if v is None:
        return "-"
    if title in ("top-1 agr.", "KL(T||S)"):
        return f"{v:.4f}"
    if title == "ROUGE-L" and isinstance(metrics.get("ROUGE-L std"), (int, float)):
        return f"{v:.2f} ± {metrics['ROUGE-L std']:.2f}"
    return f"{v:.2f}"


def _verdict(better) -> str:
    return "same" if better is None else ("better" if better else "worse")


def md_text(value) -> str:
    """value as literal text in GitHub-flavoured Markdown, also inside a table cell: the characters Markdown gives
    a meaning (a pipe ends a cell, backticks, emphasis, links, HTML) are backslash-escaped, newlines become
    spaces. Names in a report come from plans, folders and caches, so none of them may change the table."""
    text = " ".join(str(value).splitlines())
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)


def render_markdown(report: dict) -> str:
    titles = [t for _, _, t, _ in COLUMNS if any(t in r["metrics"] for r in report["rows"])]
    lines = [f"# kdcache plan {md_text(report['plan'])}", "", f"Teacher: {md_text(report['teacher'])}", "",
             _table_row(["teacher", "assistant(s)", "student", "params", *titles]),
             "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in titles) + " |"]
    for r in report["rows"]:
        if r["kind"] == "teacher":
            who = [short_name(r["teacher"]), "-", "- (the teacher itself)"]
        elif r["kind"] == "ce":
            who = ["- (CE baseline)", "-", r["student"]]
        else:
            who = [short_name(r["teacher"]), ARROW.join(r["assistants"]) or "-", r["student"]]
        lines.append(_table_row([*who, human_count(r.get("num_parameters")), *(_cell(t, r["metrics"]) for t in titles)]))
    better = {t: b for _, _, t, b in COLUMNS}
    lines += ["", md_text("Lower is better for " + ", ".join(t for t in titles if better[t] == "lower")
                          + "; higher for the rest.") if titles else ""]
    if "ROUGE-L" in titles:
        lines.append("ROUGE-L: mean ± standard deviation over the sampling seeds.")
    skipped = [(r["path"], k, v) for r in report["rows"] for k, v in r["metrics"].items() if k.endswith("(skipped)")]
    if skipped:
        lines += ["", "Skipped metrics:"] + [f"- {md_text(p)}: {md_text(k[:-10])}: {md_text(v)}" for p, k, v in skipped]
    sections = (("ce", "## KD against the cross-entropy baseline (same student, data and steps)"),
                ("direct", "## Multi-step against direct distillation (same student)"))
    for against, heading in sections:
        entries = [c for c in report["comparisons"] if c["against"] == against]
        if not entries:
            continue
        lines += ["", heading, ""]
        for c in entries:
            shown = "; ".join(f"{t} {_cell(t, {t: m['value']})} vs {_cell(t, {t: m['baseline']})} ({_verdict(m['better'])})"
                              for t, m in c["metrics"].items())
            lines.append(f"- {md_text(c['path'])} vs {md_text(c['baseline'])}: {md_text(shown)}")
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{md_text(os.path.basename(p))}]({os.path.basename(p)})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _table_row(cells) -> str:
    return "| " + " | ".join(md_text(c) for c in cells) + " |"


def _plots(plan, stages, rows) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # 1. loss curves of every training stage
    fig, ax = plt.subplots(figsize=(7, 4))
    any_curve = False
    for st in stages:
        if st.kind != "train":
            continue
        # the cross-entropy on the real next tokens: comparable across KD and CE runs, unlike the KD loss
        pts = [(r["step"], r["ce"]) for r in read_metrics_jsonl(os.path.join(st.outputs["run"], "metrics.jsonl"))
               if "ce" in r and "step" in r]
        if pts:
            ax.plot(*zip(*pts), label=path_label(st.node))
            any_curve = True
    if any_curve:
        ax.set_xlabel("step")
        ax.set_ylabel("training cross-entropy on the real next token")
        ax.set_title("loss curves (every stage)")
        ax.legend(fontsize=7)
        made.append(_save(fig, plan.out, "loss_curves.png"))
    plt.close(fig)
    # 2. each metric by path
    for title in ("ppl", "top-1 agr.", "ROUGE-L", "GSM8K EM"):
        data = [(r["path"], r["metrics"][title]) for r in rows if title in r["metrics"]]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(data)))
        ax.barh([d[0] for d in data], [d[1] for d in data], color="#4477aa")
        ax.invert_yaxis()
        ax.set_xlabel(title)
        ax.set_title(f"{title} by path")
        fig.tight_layout()
        made.append(_save(fig, plan.out, f"metric_{title.replace(' ', '_').replace('.', '').replace('-', '')}.png"))
        plt.close(fig)
    # 3. agreement with the teacher along each sequential path
    by_node = {r["node"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for p in plan.paths:
        nodes = ["teacher"] + [">".join(["teacher", *p[:d]]) for d in range(1, len(p) + 1)]
        pts = [(i, by_node[n]["metrics"]["top-1 agr."]) for i, n in enumerate(nodes)
               if n in by_node and "top-1 agr." in by_node[n]["metrics"]]
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", label=ARROW.join(["teacher", *p]))
            drawn = True
    if drawn:
        ax.set_xlabel("distillation step along the path (0 = teacher)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("top-1 agreement with the teacher")
        ax.set_title("agreement along the chain")
        ax.legend(fontsize=7)
        made.append(_save(fig, plan.out, "agreement_along_chain.png"))
    plt.close(fig)
    return made


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
