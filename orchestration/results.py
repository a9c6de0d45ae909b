"""What a plan's stages left on disk, as the report's rows: metrics, parameters, noise, convergence.

- One row per evaluated model (its eval JSON): its path split into teacher | assistant(s) | student, its
  parameter count (run.json, else the safetensors headers of its folder), the metric of every COLUMNS entry it
  has, the bootstrap interval of each metric with per-sequence sums (orchestration/noise.py), and, for a trained
  model, its convergence (trainer.convergence on its run's metrics.jsonl: steps and tokens to reach
  CONVERGENCE_FRACTION of its final held-out improvement, and the held-out curve itself).
- The comparisons the plan was made for: each KD path against the student's cross-entropy baseline, and each
  multi-step path (teacher -> assistants -> student) against the direct path to the same student; every
  compared metric with its paired-bootstrap difference and whether it is within noise.

Reads eval JSON files, run.json, metrics.jsonl and safetensors headers; never runs a model, writes nothing.
"""

from __future__ import annotations

import json
import os
import struct

from orchestration.caches import teacher_folder
from orchestration.noise import interval, paired_difference
from orchestration.plan import ONPOLICY, TEACHER, PlanError
from orchestration.stages import model_dir_of, stage_id
from trainer.convergence import convergence_speed

ARROW = " → "
COLUMNS = (  # (metric in the eval JSON, "." for a nested one; value key; column title; better)
    ("ppl", "ppl", "ppl", "lower"),
    ("agreement", "top1_agreement", "top-1 agr.", "higher"),
    ("agreement", "kl", "KL(T||S)", "lower"),
    ("acceptance", "alpha", "accept. α", "higher"),
    ("acceptance.teacher_continuations", "alpha", "α on T samples", "higher"),
    ("rouge", "rougeL", "ROUGE-L", "higher"),
    ("gsm8k", "gsm8k_exact_match", "GSM8K EM", "higher"),
    ("gsm8k", "wrong_statement_rate", "wrong arith.", "lower"),
    ("gsm8k", "no_final_answer_rate", "no answer", "lower"),
    ("grounding", "unsupported_rate", "unsupported", "lower"),
    ("bertscore", "bertscore_f1", "BERTScore", "higher"),
    ("mauve", "mauve", "MAUVE", "higher"),
)
BETTER = {title: better for _, _, title, better in COLUMNS}
# Column title -> (per-sequence values key, per-sequence counts key or None: one per item, transform): the sums a
# metric is the ratio of (trainer/evaluate.py, trainer/acceptance.py record them), for the noise rule.
PER_SEQUENCE = {
    "ppl": ("sequence_nll", "sequence_tokens", "exp"),
    "top-1 agr.": ("sequence_agreed", "sequence_tokens", None),
    "KL(T||S)": ("sequence_kl", "sequence_tokens", None),
    "accept. α": ("sequence_alpha", "sequence_tokens", None),
    "α on T samples": ("sequence_alpha", "sequence_tokens", None),
    "GSM8K EM": ("example_correct", None, None),
}
CONVERGENCE_FRACTION = 0.9
# Held-out curves of a train stage: its KL to the teacher it was trained from (the training loss where a run logs
# no KL), and the perplexity of the real next tokens, comparable across every path and the CE baselines.
CURVE_METRICS = (("eval_kl", "eval_loss"), ("eval_ppl",))


def read_json(path: str):
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
    if node.startswith(ONPOLICY):
        return f"{TEACHER}{ARROW}{node[len(ONPOLICY):]} (on-policy rounds)"
    return node.replace(">", ARROW)


def path_parts(node: str) -> tuple[str, list[str], str]:
    """(teacher, assistants, student) of a node: 'teacher>a>b>s' -> ('teacher', ['a', 'b'], 's').

    The teacher itself is ('teacher', [], ''); a CE baseline 'ce:s' has no teacher: ('', [], 's').
    """
    if node.startswith("ce:"):
        return "", [], node[3:]
    if node.startswith(ONPOLICY):
        return TEACHER, [], node[len(ONPOLICY):]
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
        info = read_json(os.path.join(run_dir, "run.json")) or {}
        if isinstance(info.get("num_parameters"), int):
            return info["num_parameters"]
        return count_parameters(run_dir)
    try:
        return count_parameters(teacher_folder(plan))
    except PlanError:
        return None


def metric_dict(metrics: dict, metric: str) -> dict:
    """metrics["a"]["b"] for metric "a.b" ({} where a level is missing or not a dict)."""
    found = metrics
    for part in metric.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    return found if isinstance(found, dict) else {}


def per_sequence(metrics: dict) -> dict[str, tuple[list, list | None, str | None]]:
    """{column title: (values, counts, transform)} of every PER_SEQUENCE metric the eval JSON recorded."""
    out = {}
    for metric, _, title, _ in COLUMNS:
        if title not in PER_SEQUENCE:
            continue
        values_key, counts_key, transform = PER_SEQUENCE[title]
        found = metric_dict(metrics, metric)
        values, counts = found.get(values_key), found.get(counts_key) if counts_key else None
        if isinstance(values, list) and values and (counts_key is None or isinstance(counts, list)):
            out[title] = (values, counts, transform)
    return out


def convergence_of(run_dir: str) -> dict:
    """{held-out metric: trainer.convergence.convergence_speed(...)} for CURVE_METRICS the run logged."""
    rows = read_metrics_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    out = {}
    for choices in CURVE_METRICS:
        metric = next((m for m in choices if any(m in r for r in rows)), None)
        if metric is not None:
            out[metric] = convergence_speed(rows, metric, CONVERGENCE_FRACTION)
    return out


def eval_rows(plan, stages, markers: dict) -> tuple[list[dict], dict]:
    """(rows, items): a row per eval stage, and {node: per_sequence(...)} for the noise rule."""
    runs = {st.node: st.outputs["run"] for st in stages if st.kind == "train"}
    rows, items = [], {}
    for st in stages:
        if st.kind != "eval":
            continue
        metrics = (read_json(st.outputs["eval"]) or {}).get("metrics", {})
        node = st.node
        kind = "teacher" if node == TEACHER else ("ce" if node.startswith("ce:") else f"kd-{node.count('>')}-step")
        kind = "onpolicy" if node.startswith(ONPOLICY) else kind
        teacher, assistants, student = path_parts(node)
        student = student or node  # the teacher's row
        run = runs.get(node) if node != TEACHER else None
        row = {"node": node, "path": path_label(node), "student": student, "kind": kind,
               "teacher": plan.teacher["model"] if teacher else "", "assistants": assistants,
               "model": model_dir_of(plan, node), "num_parameters": _model_parameters(plan, node, run),
               "train_settings": markers.get(stage_id("train", node), {}).get("settings"), "metrics": {},
               "intervals": {}}
        for metric, key, title, _ in COLUMNS:
            value = metric_dict(metrics, metric).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row["metrics"][title] = value
        std = metrics.get("rouge", {}).get("rougeL_std")
        if isinstance(std, (int, float)) and "ROUGE-L" in row["metrics"]:
            row["metrics"]["ROUGE-L std"] = std
        for metric, value in metrics.items():
            if isinstance(value, dict) and "skipped" in value:
                row["metrics"][f"{metric} (skipped)"] = value["skipped"]
        items[node] = per_sequence(metrics)
        for title, (values, counts, transform) in items[node].items():
            row["intervals"][title] = interval(values, counts, transform)
        if run is not None:
            row["convergence"] = convergence_of(run)
        rows.append(row)
    return rows, items


def heldout_size(rows: list[dict], items: dict) -> dict | None:
    """{"metric", "num_sequences", "num_tokens"} of the held-out set the cache metrics were measured on, read from the
    first metric with per-sequence token counts (ppl first); None when no eval recorded any."""
    for title in PER_SEQUENCE:
        for r in rows:
            found = items.get(r["node"], {}).get(title)
            if found and found[1] is not None:
                return {"metric": title, "num_sequences": len(found[1]), "num_tokens": int(sum(found[1]))}
    return None


def comparisons(rows: list[dict], items: dict | None = None) -> list[dict]:
    """What the plan compares, on every metric both rows have:

    - against "ce": each KD path to a student vs that student's cross-entropy baseline;
    - against "direct": each multi-step path (teacher -> assistants -> student) vs the direct path
      teacher -> student, the question sequential distillation asks.

    One entry per (path, baseline): {"against", "student", "path", "baseline", "metrics": {title: {"value",
    "baseline", "better", "difference", "interval", "within_noise"}}}; better is True / False, or None on a tie;
    difference is value - baseline; interval its 95% paired-bootstrap interval over the held-out sequences, and
    within_noise whether it holds 0 (both None where the metric has no per-sequence sums).
    """
    items = items or {}
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
                if title not in BETTER or not isinstance(value, (int, float)) or not isinstance(other, (int, float)):
                    continue
                better = None if value == other else ((value < other) == (BETTER[title] == "lower"))
                mine, theirs = items.get(r["node"], {}).get(title), items.get(base["node"], {}).get(title)
                noise = paired_difference(mine[0], mine[1], theirs[0], theirs[1], mine[2]) if mine and theirs else None
                compared[title] = {"value": value, "baseline": other, "better": better, "difference": value - other,
                                   "interval": noise["interval"] if noise else None,
                                   "within_noise": noise["within_noise"] if noise else None}
            if compared:
                out.append({"against": against, "student": r["student"], "path": r["path"], "baseline": base["path"],
                            "metrics": compared})
    return out


def shared_settings(settings: list[dict]) -> dict:
    """The items every one of settings has with one value (the student's own fields differ per stage)."""
    if not settings:
        return {}
    return {k: v for k, v in settings[0].items() if all(k in s and s[k] == v for s in settings[1:])}
