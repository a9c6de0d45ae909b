"""The report's PNG plots, from the report's rows and each train stage's metrics.jsonl.

- loss_curves.png: per path, the training cross-entropy on the real next token beside the held-out curves
  (perplexity of the real next tokens, comparable across paths and CE baselines; KL to the teacher each run
  was trained from), with each run's convergence point marked on its held-out curves. Training loss alone
  misleads: a CE run fits its training tokens best and generalizes worst.
- convergence.png: steps to CONVERGENCE_FRACTION of each run's own held-out improvement, per path.
- metric_<name>.png: each metric by path, with its bootstrap interval over the held-out sequences.
- agreement_along_chain.png: top-1 agreement and acceptance alpha along each sequential path.

Needs matplotlib (none is made without it); knows the report's dict and metrics.jsonl rows.
"""

from __future__ import annotations

import os
import re

from orchestration.results import ARROW, CONVERGENCE_FRACTION, path_label, read_metrics_jsonl

CURVE_PANELS = (  # (metrics.jsonl key, y label)
    ("ce", "training cross-entropy (real next token)"),
    ("eval_ppl", "held-out perplexity (real next token)"),
    ("eval_kl", "held-out KL to the teacher it learns from"),
)
BAR_METRICS = ("ppl", "top-1 agr.", "KL(T||S)", "accept. α", "α on T samples", "ROUGE-L", "GSM8K EM", "wrong arith.",
               "no answer", "unsupported")
CHAIN_METRICS = ("top-1 agr.", "accept. α")


def make_plots(plan, stages, rows) -> list[str]:
    """The plots above under plan.out; the paths written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = [_curves(plt, plan.out, stages, rows), _convergence(plt, plan.out, rows)]
    made += [_bars(plt, plan.out, rows, title) for title in BAR_METRICS]
    made.append(_along_chain(plt, plan, rows))
    return [m for m in made if m]


def file_name(title: str) -> str:
    """'top-1 agr.' -> 'metric_top1_agr.png'; 'accept. α' -> 'metric_accept_alpha.png'."""
    text = title.replace("α", "alpha").replace("-", "").replace(".", "")
    return "metric_" + re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") + ".png"


def _save(plt, fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _curves(plt, out: str, stages, rows) -> str | None:
    convergence = {r["node"]: r.get("convergence") or {} for r in rows}
    logs = [(st.node, read_metrics_jsonl(os.path.join(st.outputs["run"], "metrics.jsonl")))
            for st in stages if st.kind == "train"]
    panels = [(key, label) for key, label in CURVE_PANELS if any(key in r for _, log in logs for r in log)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for i, (node, log) in enumerate(logs):
            points = sorted({int(r["step"]): r[key] for r in log if key in r and "step" in r}.items())
            if not points:
                continue
            color = f"C{i % 10}"
            ax.plot(*zip(*points), label=path_label(node), color=color, marker="o" if key != "ce" else None,
                    markersize=3)
            c = convergence.get(node, {}).get(key)
            if c and c["status"] == "ok":
                value = dict(points).get(c["steps"])
                if value is not None:
                    ax.plot([c["steps"]], [value], marker="*", markersize=12, color=color, linestyle="none")
        values = [r[key] for _, log in logs for r in log if isinstance(r.get(key), (int, float))]
        if key == "eval_ppl" and values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # a random start can be orders of magnitude above the end
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0])
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"training beside held-out curves (★: {CONVERGENCE_FRACTION:.0%} of the run's held-out improvement)")
    fig.tight_layout()
    return _save(plt, fig, out, "loss_curves.png")


def _convergence(plt, out: str, rows) -> str | None:
    metrics = sorted({m for r in rows for m, c in (r.get("convergence") or {}).items() if c["status"] == "ok"})
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.8 + 0.45 * len(rows)), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [(r["path"], r["convergence"][metric]["steps"]) for r in rows
                if (r.get("convergence") or {}).get(metric, {}).get("status") == "ok"]
        ax.barh([d[0] for d in data], [d[1] for d in data], color="#66aa55")
        ax.invert_yaxis()
        ax.set_xlabel(f"steps to {CONVERGENCE_FRACTION:.0%} of the final {metric} improvement")
        ax.set_title(f"convergence speed ({metric})")
    fig.tight_layout()
    return _save(plt, fig, out, "convergence.png")


def _bars(plt, out: str, rows, title: str) -> str | None:
    data = [(r["path"], r["metrics"][title], (r.get("intervals") or {}).get(title)) for r in rows if title in r["metrics"]]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(data)))
    values = [d[1] for d in data]
    errors = None
    if all(d[2] for d in data):  # asymmetric error bars from each row's bootstrap interval
        errors = [[max(0.0, v - d[2][0]) for v, d in zip(values, data)], [max(0.0, d[2][1] - v) for v, d in zip(values, data)]]
    ax.barh([d[0] for d in data], values, xerr=errors, color="#4477aa", capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(title + ("  (bars: 95% bootstrap interval over held-out sequences)" if errors else ""))
    ax.set_title(f"{title} by path")
    fig.tight_layout()
    return _save(plt, fig, out, file_name(title))


def _along_chain(plt, plan, rows) -> str | None:
    by_node = {r["node"]: r for r in rows}
    shown = [t for t in CHAIN_METRICS if any(t in r["metrics"] for r in rows)]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    drawn = False
    for ax, title in zip(axes[0], shown):
        for p in plan.paths:
            nodes = ["teacher"] + [">".join(["teacher", *p[:d]]) for d in range(1, len(p) + 1)]
            pts = [(i, by_node[n]["metrics"][title]) for i, n in enumerate(nodes)
                   if n in by_node and title in by_node[n]["metrics"]]
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=ARROW.join(["teacher", *p]))
                drawn = True
        ax.set_xlabel("distillation step along the path (0 = teacher)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(f"{title} with the teacher" if title == "top-1 agr."
                      else f"{title} (student as the teacher's draft)")
        ax.set_title(f"{title} along the chain")
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return _save(plt, fig, out=plan.out, name="agreement_along_chain.png")
