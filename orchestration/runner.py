"""Running a plan: each stage not yet done, in order, as its own process; done-markers; the dry run.

A stage runs when it is not done (state.py: never run, interrupted, or its identity changed); before its
process starts, `<out>/stages/<stage>.started.json` records the identity it runs with, and when it
finishes `<out>/stages/<stage>.done.json` records that identity, its settings after defaults, its
inputs and (a cache stage) the cache `kdcache build` reported. A train stage whose identity changed
runs `kdtrain run --overwrite` on its run folder; any other runs with `--resume`. A stage's output goes
to `<out>/logs/<stage>.log`. When every stage is done the report is written (report.py).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

from orchestration.caches import cache_state, reported_cache
from orchestration.checks import check_plan
from orchestration.plan import Plan, PlanError
from orchestration.plan_folder import PLAN_LOCK, claim_plan_folder
from orchestration.report import write_report
from orchestration.stages import CACHE_DIR, TEACHER_FOLDER, stage_id, stages_of
from orchestration.state import CHANGED, DONE, assess, marker_record, output_after_run, predicted_output
from trainer.run_folder import drop_lock, take_lock

STATE_WORDS = {DONE: "done", "new": "to run", CHANGED: "reruns", "interrupted": "continues", "waits": "may rerun"}


def describe_stages(plan: Plan) -> list[dict]:
    """What a run would do now, stage by stage (the dry run): {"stage", "kind", "node", "done", "state", "reasons",
    "waits_for", "command"} and, for cache stages, {"cache", "cache_state", "reused"}. A stage after one that
    is still to run is assessed with what that one is known to give (state.predicted_output)."""
    rows, known = [], {}
    for st in stages_of(plan):
        a = assess(plan, st, known)
        known[st.id] = a.output if a.state == DONE else predicted_output(a)
        row = {"stage": st.id, "kind": st.kind, "node": st.node, "done": a.state == DONE, "state": a.state,
               "reasons": a.reasons, "waits_for": a.waits_for, "identity": a.identity}
        if st.kind == "cache":
            planned = a.values["out"] if a.identity is not None else None  # None: known once its model is
            row["cache"] = a.output["cache"] if a.state == DONE else planned
            row["cache_state"] = cache_state(row["cache"]) if row["cache"] else "missing"
            if row["cache"] != planned:
                row["reused"] = True  # an identical cache another build (another plan) wrote
        row["command"] = shlex.join(_shown_placeholder(c, st) for c in a.command)
        rows.append(row)
    return rows


def _shown_placeholder(arg: str, stage) -> str:
    """A placeholder a dry run cannot resolve yet, as words that say what it waits for."""
    if arg == TEACHER_FOLDER:
        return "<the teacher folder that cache:teacher records>"
    if arg == CACHE_DIR:
        return f"<a folder named by the identity of this stage, known once {stage.inputs['model'][1]} ran>"
    if arg.startswith("{cache:") and arg.endswith("}"):
        return f"<the cache {stage_id('cache', arg[len('{cache:'):-1])} reports>"
    return arg


def dry_run_lines(plan: Plan, rows: list[dict]) -> list[str]:
    """The dry run as text: per stage its state and why, then its whole command (placeholders resolved where
    they can be; otherwise which stage it waits for)."""
    lines = [f"plan {plan.name}: {len(rows)} stages -> {plan.out}"]
    for r in rows:
        state = STATE_WORDS[r["state"]]
        if r["kind"] == "cache" and r["state"] == DONE:
            state += f": {r['cache']}" + (" (reused)" if r.get("reused") else "")
        lines.append(f"{r['stage']}: {state}" + "".join(f"\n    - {reason}" for reason in r["reasons"]))
        lines.append(f"    $ {r['command']}")
    return lines


def printable(text: str) -> str:
    """text with control characters (terminal escapes, carriage returns) shown as escapes; newlines and tabs kept."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else repr(c)[1:-1] for c in text)


def _last_line(path: str) -> str:
    """The last non-empty line (or carriage-return-separated progress update) of a growing log file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n")]
    return next((p for p in reversed(parts) if p), "")


def run_stage(command: list[str], log_path: str, env: dict, on_line=None, poll_s: float = 0.5) -> int:
    """Run one stage's process with its output in log_path; call on_line(last log line) while it runs."""
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(command, stdout=lf, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    return proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    if on_line is not None:
                        on_line(_last_line(log_path))
        except BaseException:  # Ctrl-C or an error in on_line: never leave the stage running alone
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def run_plan(plan: Plan, *, log=print, env: dict | None = None, progress=None, only: set[str] | None = None) -> dict:
    """Run every stage not yet done, in order; then write the report. Returns the report dict.

    only: run only these stage ids (the others must be done already, where a selected stage needs them);
    the report is then written only when every stage is done.
    progress, if given, is called as progress(stages_finished, num_stages, stage_id, last_log_line) about
    twice a second while a stage runs and once after each stage (the CLI draws it as a progress bar).
    """
    check_plan(plan)  # before anything is written
    claim_plan_folder(plan.out, log, plan.source)
    lock = take_lock(plan.out, PLAN_LOCK, "kdtrain chain")  # one run of a plan at a time in a folder
    try:
        return _run_stages(plan, log=log, env=env, progress=progress, only=only)
    finally:
        drop_lock(plan.out, lock, PLAN_LOCK)


def _run_stages(plan: Plan, *, log, env: dict | None, progress, only: set[str] | None) -> dict:
    """run_plan's body, with the plan's folder held."""
    os.makedirs(os.path.join(plan.out, "stages"), exist_ok=True)
    os.makedirs(os.path.join(plan.out, "logs"), exist_ok=True)
    with open(os.path.join(plan.out, "plan.json"), "w") as f:
        json.dump(plan.__dict__, f, indent=1, default=str)
    stages = stages_of(plan)
    known: dict[str, dict] = {}
    for i, st in enumerate(stages, 1):
        a = assess(plan, st, known)
        if a.state == DONE:
            log(f"[{i}/{len(stages)}] {st.id}: done earlier, skipped")
            known[st.id] = a.output
            continue
        if only is not None and st.id not in only:
            log(f"[{i}/{len(stages)}] {st.id}: not selected ({STATE_WORDS[a.state]})")
            continue
        if a.waits_for:
            raise PlanError(f"stage {st.id} needs {', '.join(a.waits_for)} done first; run the plan without --stage, "
                            "or select those stages too")
        for reason in a.reasons:
            log(f"[{i}/{len(stages)}] {st.id}: {STATE_WORDS[a.state]}: {reason}")
        known[st.id] = _run_one(plan, a, f"[{i}/{len(stages)}]", log, env,
                                None if progress is None else (lambda line, i=i, sid=st.id: progress(i - 1, len(stages), sid, line)))
        if progress is not None:
            progress(i, len(stages), st.id, "")
    if len(known) < len(stages):
        return {}
    return write_report(plan, stages)


def _run_one(plan: Plan, a, counter: str, log, env: dict | None, on_line) -> dict:
    """Run one assessed stage's process, write its done-marker; what it gives the stages after it."""
    st, command = a.stage, a.command
    log(f"{counter} {st.id}: " + shlex.join(command[command.index("-m") + 1:]))
    started = time.time()
    _write_json(st.started_marker, {**marker_record(a), "started_at": started})
    log_path = os.path.join(plan.out, "logs", st.id.replace(":", "-") + ".log")
    rc = run_stage(command, log_path, {**os.environ, **(env or {})}, on_line)
    if rc != 0:
        with open(log_path) as lf:
            tail = lf.read()[-3000:]
        raise PlanError(f"stage {st.id} failed with exit code {rc}; log: {log_path}\n{tail}\n"
                        "Fix the cause and rerun the same command: finished stages are skipped.")
    marker = {**marker_record(a), "seconds": round(time.time() - started, 1), "command": command}
    if st.kind == "cache":
        with open(log_path) as lf:
            marker.update(reported_cache(plan, lf.read()))
        if marker["cache"] != a.values["out"]:
            log(f"    {marker['status']}: {marker['cache']} (cache_key {marker['cache_key'][:12]})")
    output = output_after_run(st, marker)
    if output is None:
        raise PlanError(f"stage {st.id} exited 0 but left no complete output ({st.outputs or marker.get('cache')}); "
                        f"see its log {log_path}")
    _write_json(st.marker, marker)
    log(f"    done in {time.time() - started:.0f}s")
    return output
