"""The report of a plan: report.json, report.md (a table shaped like the MSKD paper's) and PNG plots.

Reads what the stages left on disk (eval JSON files, each run's metrics.jsonl); never runs a model.
"""

from __future__ import annotations

import json
import os

ARROW = " → "
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


def write_report(plan, stages) -> dict:
    rows = []
    for st in stages:
        if st.kind != "eval":
            continue
        result = _read_json(st.outputs["eval"]) or {}
        metrics = result.get("metrics", {})
        node = st.node
        student = node[3:] if node.startswith("ce:") else node.rsplit(">", 1)[-1]
        kind = "teacher" if node == "teacher" else ("ce" if node.startswith("ce:") else f"kd-{node.count('>')}-step")
        row = {"node": node, "path": path_label(node), "student": student, "kind": kind, "metrics": {}}
        for metric, key, title, _ in COLUMNS:
            value = metrics.get(metric, {}).get(key)
            if isinstance(value, (int, float)):
                row["metrics"][title] = value
        for metric, value in metrics.items():
            if isinstance(value, dict) and "skipped" in value:
                row["metrics"][f"{metric} (skipped)"] = value["skipped"]
        rows.append(row)
    report = {"plan": plan.name, "teacher": plan.teacher["model"], "train": plan.train, "cache": plan.cache,
              "rows": rows, "comparisons": _comparisons(rows)}
    os.makedirs(plan.out, exist_ok=True)
    with open(os.path.join(plan.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plots = _plots(plan, stages, rows)
    report["plots"] = plots
    with open(os.path.join(plan.out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    with open(os.path.join(plan.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _comparisons(rows: list[dict]) -> list[dict]:
    """For each student: its best KD path vs its CE baseline, and direct vs multi-step, on ppl."""
    out = []
    by_student: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] != "teacher":
            by_student.setdefault(r["student"], []).append(r)
    for student, rs in by_student.items():
        ce = next((r for r in rs if r["kind"] == "ce"), None)
        for r in rs:
            if r["kind"] == "ce" or "ppl" not in r["metrics"]:
                continue
            entry = {"student": student, "path": r["path"], "ppl": r["metrics"]["ppl"]}
            if ce and "ppl" in ce["metrics"]:
                entry["ce_ppl"] = ce["metrics"]["ppl"]
                entry["beats_ce"] = r["metrics"]["ppl"] < ce["metrics"]["ppl"]
            out.append(entry)
    return out


def render_markdown(report: dict) -> str:
    titles = [t for _, _, t, _ in COLUMNS if any(t in r["metrics"] for r in report["rows"])]
    lines = [f"# kdcache plan `{report['plan']}`", "", f"Teacher: `{report['teacher']}`", "",
             "| path | student | " + " | ".join(titles) + " |", "| --- | --- | " + " | ".join("---:" for _ in titles) + " |"]
    for r in report["rows"]:
        cells = []
        for t in titles:
            v = r["metrics"].get(t)
            cells.append("-" if v is None else (f"{v:.4f}" if t in ("top-1 agr.", "KL(T||S)") else f"{v:.2f}"))
        lines.append(f"| {r['path']} | {r['student'] if r['kind'] != 'teacher' else '-'} | " + " | ".join(cells) + " |")
    better = {t: b for _, _, t, b in COLUMNS}
    lines += ["", "Lower is better for " + ", ".join(t for t in titles if better[t] == "lower") + "; higher for the rest."
              if titles else ""]
    skipped = [(r["path"], k, v) for r in report["rows"] for k, v in r["metrics"].items() if k.endswith("(skipped)")]
    if skipped:
        lines += ["", "Skipped metrics:"] + [f"- {p}: {k[:-10]}: {v}" for p, k, v in skipped]
    if report["comparisons"]:
        lines += ["", "## Against the cross-entropy baseline (held-out perplexity)", ""]
        for c in report["comparisons"]:
            if "ce_ppl" in c:
                verdict = "beats" if c["beats_ce"] else "does not beat"
                lines.append(f"- {c['path']}: ppl {c['ppl']:.2f} {verdict} CE baseline {c['ce_ppl']:.2f}")
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


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
