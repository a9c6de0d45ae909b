"""The report of a plan: report.json, report.md and PNG plots under the plan's out folder.

report.json holds the results table's rows (orchestration/results.py: metrics, bootstrap intervals,
convergence with the held-out curves), the comparisons the plan was made for with which differences are
within noise (orchestration/noise.py), the held-out set's size, the training seeds and the settings the
results were produced with. report.md renders it (orchestration/report_md.py); the plots are
orchestration/plots.py's. Reads what the stages left on disk; never runs a model. Imported by the runner,
never importing it.
"""

from __future__ import annotations

import json
import os

from orchestration.caches import read_marker
from orchestration.noise import CONFIDENCE, RESAMPLES, SEED
from orchestration.onpolicy_report import onpolicy_comparison, onpolicy_markdown
from orchestration.plan import TEACHER
from orchestration.plots import make_plots
from orchestration.report_md import render_markdown
from orchestration.results import comparisons, eval_rows, heldout_size, shared_settings
from orchestration.stages import stage_id

NOISE_RULE = (f"paired bootstrap over held-out sequences: {RESAMPLES} resamples (seed {SEED}), "
              f"{CONFIDENCE:.0%} percentile interval of the difference; within noise when it contains 0")


def write_report(plan, stages) -> dict:
    """report.json, report.md and the plots under plan.out, from what the stages left on disk.

    The settings it states are those each stage's done-marker recorded (the settings its result was produced
    with, state.marker_record), never the plan's current ones: "train" holds the settings every KD train
    stage shared, each row its own train stage's, "cache" the root teacher cache stage's.
    """
    markers = {st.id: read_marker(st.marker) or {} for st in stages}
    rows, items = eval_rows(plan, stages, markers)
    caches = {st.node: markers[st.id].get("cache") for st in stages if st.kind == "cache"}
    trained = {st.node: markers[st.id].get("settings") or {} for st in stages if st.kind == "train"}
    kd_settings = [s for node, s in trained.items() if not node.startswith("ce:")]
    heldout = heldout_size(rows, items)
    if heldout is not None:
        fractions = {(markers[st.id].get("settings") or {}).get("eval_fraction") for st in stages if st.kind == "eval"}
        heldout["eval_fraction"] = fractions.pop() if len(fractions) == 1 else None
    report = {"plan": plan.name, "teacher": plan.teacher["model"], "train": shared_settings(kd_settings),
              "cache": markers.get(stage_id("cache", TEACHER), {}).get("settings"), "caches": caches,
              "heldout": heldout, "seeds": sorted({s["seed"] for s in trained.values() if isinstance(s.get("seed"), int)}),
              "noise_rule": NOISE_RULE, "rows": rows, "comparisons": comparisons(rows, items)}
    os.makedirs(plan.out, exist_ok=True)
    report["plots"] = make_plots(plan, stages, rows)
    report["onpolicy"] = onpolicy_comparison(plan, stages, markers, rows, items)  # orchestration/onpolicy_report.py
    with open(os.path.join(plan.out, "report.md"), "w") as f:
        f.write(render_markdown(report) + onpolicy_markdown(report["onpolicy"]))
    with open(os.path.join(plan.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
