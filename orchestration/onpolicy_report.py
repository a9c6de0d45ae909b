"""The report's on-policy comparison: for each student of a plan's onpolicy section, its on-policy rounds against
its off-policy KD (the direct path teacher -> student) and its CE baseline, with the same initial weights, data and
steps (docs/runs-and-plans.md 3.7).

Per way of training: the held-out metrics of the results table, the exposure-bias measure (KL(teacher || student) on
the student's own samples of the held-out prompts: trainer/exposure.py, the `exposure:<node>` stages) with its
bootstrap interval, and what it cost: optimizer steps and tokens trained (run.json), tokens the teacher scored (the
manifests of the caches it read: the teacher cache for KD, and for the rounds each round's cache plus the teacher
cache when mixed), teacher runs (cache builds), and tokens the student sampled (the rounds' samples files). Online
GKD would run the teacher on every trained batch: its teacher tokens are the rounds' trained tokens, its teacher
runs one per micro-batch.

Differences: the cache metrics by the report's paired bootstrap over held-out sequences (orchestration/noise.py);
the exposure KL by the same rule over held-out prompts, each prompt's samples (one per seed) summed first, since
the two models' samples of a prompt differ in length and so cannot be paired token for token.

Reads eval JSON files, run.json, samples files and manifests; never runs a model, writes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np

from orchestration.caches import read_manifest
from orchestration.noise import CONFIDENCE, interval, paired_difference
from orchestration.plan import ONPOLICY, TEACHER
from orchestration.report_md import md_text
from orchestration.results import read_json
from orchestration.stages import stage_id
from shared.format import CacheError

METRICS = ("ppl", "KL(T||S)", "top-1 agr.")  # the results-table columns the comparison repeats
EXPOSURE = "KL on own samples"
LOWER_IS_BETTER = {"ppl": True, "KL(T||S)": True, "top-1 agr.": False, EXPOSURE: True}


def _cache_tokens(markers: dict, cache_stage: str) -> int | None:
    url = markers.get(cache_stage, {}).get("cache")
    try:
        return int(read_manifest(url).totals["num_tokens"]) if isinstance(url, str) else None
    except (CacheError, OSError, ValueError, KeyError):
        return None


def _sampled_tokens(path: str) -> int:
    total = 0
    with open(path) as f:
        for line in f:
            total += len(json.loads(line).get("response_ids") or [])
    return total


def _cost(plan, stages, markers: dict, node: str) -> dict:
    """Steps, tokens trained and micro-batches of node's train stage(s); what the teacher and the student ran."""
    student = node[len(ONPOLICY):] if node.startswith(ONPOLICY) else None
    mine = [st for st in stages if st.kind == "train" and (st.node == node or (
        student is not None and st.node.startswith(f"{ONPOLICY}{student}@")))]
    steps = tokens = batches = 0
    for st in mine:
        run = read_json(os.path.join(st.outputs["run"], "run.json")) or {}
        steps += int(run.get("steps") or 0)
        tokens += int((run.get("final") or {}).get("tokens") or 0)
        batches += int(run.get("steps") or 0) * int((run.get("config") or {}).get("grad_accum") or 1)
    teacher_cache = _cache_tokens(markers, stage_id("cache", TEACHER))
    if node.startswith("ce:"):
        return {"steps": steps, "tokens_trained": tokens, "teacher_tokens": 0, "teacher_runs": 0, "sampled_tokens": 0}
    if student is None:
        return {"steps": steps, "tokens_trained": tokens, "teacher_tokens": teacher_cache, "teacher_runs": 1,
                "sampled_tokens": 0}
    rounds = [st for st in stages if st.kind == "cache" and st.node.startswith(f"{ONPOLICY}{student}@")]
    round_tokens = [_cache_tokens(markers, st.id) for st in rounds]
    mixed = plan.onpolicy.get("mix", 0) > 0
    scored = None if None in round_tokens or (mixed and teacher_cache is None) else (
        sum(round_tokens) + (teacher_cache if mixed else 0))
    samples = [st.outputs["samples"] for st in stages if st.kind == "generate" and st.node.startswith(
        f"{ONPOLICY}{student}@") and os.path.isfile(st.outputs["samples"])]
    return {"steps": steps, "tokens_trained": tokens, "teacher_tokens": scored,
            "teacher_runs": len(rounds) + (1 if mixed else 0), "sampled_tokens": sum(map(_sampled_tokens, samples)),
            "online_teacher_tokens": tokens, "online_teacher_runs": batches}


def _per_prompt(exposure: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(KL sums, token counts) per held-out prompt, its samples (one per seed) summed."""
    kl, tokens, prompts = exposure.get("sequence_kl"), exposure.get("sequence_tokens"), exposure.get("num_prompts")
    if not (isinstance(kl, list) and isinstance(tokens, list) and isinstance(prompts, int) and prompts > 0
            and len(kl) == len(tokens) and len(kl) % prompts == 0):
        return None
    shape = (len(kl) // prompts, prompts)
    return np.asarray(kl, dtype=np.float64).reshape(shape).sum(0), np.asarray(tokens, dtype=np.float64).reshape(
        shape).sum(0)


def onpolicy_comparison(plan, stages, markers: dict, rows: list[dict], items: dict) -> list[dict]:
    """One entry per on-policy student: {"student", "rounds", "samples", "mix", "steps_per_round", "ways": [{"way",
    "node", "metrics", "intervals", "cost"}], "differences": [{"way", "against", "metrics": {title: {"difference",
    "interval", "within_noise"}}}]}."""
    by_node = {r["node"]: r for r in rows}
    exposure = {st.node: ((read_json(st.outputs["eval"]) or {}).get("metrics") or {}).get("exposure")
                for st in stages if st.kind == "exposure"}
    out = []
    for student in plan.onpolicy.get("students", []):
        ways, prompts = [], {}
        for way, node in (("on-policy rounds", ONPOLICY + student), ("off-policy KD", f"{TEACHER}>{student}"),
                          ("CE", f"ce:{student}")):
            row, found = by_node.get(node), exposure.get(node)
            if row is None and not isinstance(found, dict):
                continue
            metrics = {t: row["metrics"][t] for t in METRICS if row is not None and t in row["metrics"]}
            intervals = {t: (row or {}).get("intervals", {}).get(t) for t in metrics}
            if isinstance(found, dict) and isinstance(found.get("kl"), (int, float)):
                metrics[EXPOSURE] = found["kl"]
                prompts[node] = _per_prompt(found)
                intervals[EXPOSURE] = interval(*prompts[node]) if prompts[node] is not None else None
            ways.append({"way": way, "node": node, "metrics": metrics, "intervals": intervals,
                         "cost": _cost(plan, stages, markers, node)})
        differences = []
        for other in ways[1:] if ways and ways[0]["node"] == ONPOLICY + student else []:
            mine, theirs = ways[0]["node"], other["node"]
            compared = {}
            for title in METRICS:
                a, b = items.get(mine, {}).get(title), items.get(theirs, {}).get(title)
                if a and b:
                    compared[title] = paired_difference(a[0], a[1], b[0], b[1], a[2])
            if prompts.get(mine) is not None and prompts.get(theirs) is not None:
                # each model's own samples of the same prompts: their token counts differ by nature
                compared[EXPOSURE] = paired_difference(*prompts[mine], *prompts[theirs], same_counts=False)
            differences.append({"way": ways[0]["way"], "against": other["way"],
                                "metrics": {t: d for t, d in compared.items() if d is not None}})
        out.append({"student": student, "rounds": plan.onpolicy["rounds"], "samples": plan.onpolicy["samples"],
                    "mix": plan.onpolicy["mix"], "steps_per_round": plan.onpolicy["steps"],
                    "exposure_prompts": next((int(p[0].size) for p in prompts.values() if p is not None), None),
                    "ways": ways, "differences": differences})
    return out


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _value(title: str, value) -> str:
    return "-" if value is None else (f"{value:.4f}" if title != "ppl" else f"{value:.2f}")


def _shown(title: str, way: dict) -> str:
    value, found = way["metrics"].get(title), way["intervals"].get(title)
    text = _value(title, value)
    return text + (f" [{_value(title, found[0])}, {_value(title, found[1])}]" if value is not None and found else "")


def onpolicy_markdown(section: list[dict]) -> str:
    """The comparison as report.md's section (empty without on-policy students)."""
    lines = []
    titles = (*METRICS, EXPOSURE)
    for entry in section:
        lines += ["", (f"## On-policy rounds against off-policy KD and CE ({md_text(entry['student'])}: the same "
                       "initial weights, data and steps)"), "",
                  md_text(f"{entry['rounds']} rounds of {entry['steps_per_round']} steps; per round the student "
                          f"answers each training prompt {entry['samples']} time(s), the teacher scores exactly "
                          f"those tokens, and {entry['mix']:.0%} of the batches come from the teacher cache. "
                          f"{EXPOSURE}: KL(teacher || student) per token on the student's own samples of the "
                          f"{entry['exposure_prompts'] or '?'} held-out prompts (exposure bias). In brackets: "
                          f"{CONFIDENCE:.0%} bootstrap intervals over held-out sequences (prompts for {EXPOSURE})."),
                  "", ("| training | steps | tokens trained | teacher tokens scored (runs) | student tokens sampled | "
                       + " | ".join(md_text(t) for t in titles) + " |"),
                  "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in titles) + " |"]
        for way in entry["ways"]:
            c = way["cost"]
            teacher = f"{_count(c['teacher_tokens'])} ({c['teacher_runs']})" if c["teacher_runs"] else "-"
            cells = [way["way"], _count(c["steps"]), _count(c["tokens_trained"]), teacher,
                     _count(c["sampled_tokens"] or None), *(_shown(t, way) for t in titles)]
            lines.append("| " + " | ".join(md_text(x) for x in cells) + " |")
        lines.append("")
        for d in entry["differences"]:
            shown = []
            for title, m in d["metrics"].items():
                better = (m["difference"] < 0) == LOWER_IS_BETTER[title]
                verdict = "within noise" if m["within_noise"] else ("better" if better else "worse")
                shown.append(f"{title} {m['difference']:+.4f} [{m['interval'][0]:+.4f}, {m['interval'][1]:+.4f}] "
                             f"({verdict})")
            if shown:
                lines.append(f"- {md_text(d['way'])} minus {md_text(d['against'])}: {md_text('; '.join(shown))}")
        onpolicy = next((w["cost"] for w in entry["ways"] if w["node"].startswith(ONPOLICY)), None)
        if onpolicy and onpolicy.get("online_teacher_runs"):
            lines += ["", md_text(
                f"Teacher cost against online GKD: here the teacher ran {onpolicy['teacher_runs']} times (one cache "
                f"per round{' and the teacher cache' if entry['mix'] > 0 else ''}) over "
                f"{_count(onpolicy['teacher_tokens'])} tokens; online, with the teacher in memory beside the student, "
                f"it runs on every one of the {onpolicy['online_teacher_runs']:,} micro-batches, over the "
                f"{_count(onpolicy['online_teacher_tokens'])} tokens trained.")]
    return "\n".join(lines) + ("\n" if lines else "")
