"""Running a plan: each stage not yet done, in order, as its own process; done-markers; the dry run.

A stage that finished has a marker in `<out>/stages/` and is skipped on the next run; a stage's output
goes to `<out>/logs/<stage>.log`. When every stage is done the report is written (report.py).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

from orchestration.caches import cache_of, cache_state, reported_cache, teacher_folder
from orchestration.checks import check_plan
from orchestration.plan import Plan, PlanError
from orchestration.report import write_report
from orchestration.stages import TEACHER_FOLDER, Stage, stages_of


def stage_done(stage: Stage, plan: Plan | None = None) -> bool:
    """A stage is done when its marker exists; a cache stage also needs its recorded cache to be complete."""
    if not os.path.exists(stage.marker):
        return False
    if stage.kind == "cache" and plan is not None:
        return cache_state(cache_of(plan, stage.node)) == "complete"
    return True


def resolve_command(plan: Plan, command: list[str], *, strict: bool = True) -> list[str]:
    """Replace the placeholders of a stage's command: the teacher's folder and the caches of nodes.

    strict=False (for --dry-run) keeps a placeholder that cannot be resolved yet.
    """
    out = []
    for c in command:
        if c == TEACHER_FOLDER:
            try:
                c = teacher_folder(plan)
            except PlanError:
                if strict:
                    raise
        elif c.startswith("{cache:") and c.endswith("}"):
            c = cache_of(plan, c[len("{cache:"):-1])
        out.append(c)
    return out


def describe_stages(plan: Plan) -> list[dict]:
    rows = []
    for st in stages_of(plan):
        row = {"stage": st.id, "kind": st.kind, "node": st.node, "done": stage_done(st, plan)}
        if st.kind == "cache":
            cache = cache_of(plan, st.node)
            row["cache"] = cache
            row["cache_state"] = cache_state(cache)
            if cache != st.outputs["cache"]:
                row["reused"] = True  # an identical cache another build (another plan) wrote
        row["command"] = " ".join(shlex.quote(c) for c in resolve_command(plan, st.command, strict=False))
        rows.append(row)
    return rows


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


def run_plan(plan: Plan, *, log=print, env: dict | None = None, progress=None) -> dict:
    """Run every stage not yet done, in order; then write the report. Returns the report dict.

    progress, if given, is called as progress(stages_finished, num_stages, stage_id, last_log_line) about
    twice a second while a stage runs and once after each stage (the CLI draws it as a progress bar).
    """
    check_plan(plan)  # before anything is written
    os.makedirs(os.path.join(plan.out, "stages"), exist_ok=True)
    os.makedirs(os.path.join(plan.out, "logs"), exist_ok=True)
    with open(os.path.join(plan.out, "plan.json"), "w") as f:
        json.dump(plan.__dict__, f, indent=1, default=str)
    stages = stages_of(plan)
    for i, st in enumerate(stages, 1):
        if stage_done(st, plan):
            log(f"[{i}/{len(stages)}] {st.id}: done earlier, skipped")
            continue
        command = resolve_command(plan, st.command)
        log(f"[{i}/{len(stages)}] {st.id}: " + " ".join(shlex.quote(c) for c in command[2:]))
        started = time.time()
        log_path = os.path.join(plan.out, "logs", st.id.replace(":", "-") + ".log")
        on_line = None if progress is None else (lambda line, i=i, sid=st.id: progress(i - 1, len(stages), sid, line))
        rc = run_stage(command, log_path, {**os.environ, **(env or {})}, on_line)
        if rc != 0:
            with open(log_path) as lf:
                tail = lf.read()[-3000:]
            raise PlanError(f"stage {st.id} failed with exit code {rc}; log: {log_path}\n{tail}\n"
                            "Fix the cause and rerun the same command: finished stages are skipped.")
        marker = {"stage": st.id, "seconds": round(time.time() - started, 1), "command": command}
        if st.kind == "cache":
            with open(log_path) as lf:
                marker.update(reported_cache(plan, lf.read()))
            if marker["cache"] != st.outputs["cache"]:
                log(f"    {marker['status']}: {marker['cache']} (cache_key {marker['cache_key'][:12]})")
        with open(st.marker + ".tmp", "w") as f:
            json.dump(marker, f)
        os.replace(st.marker + ".tmp", st.marker)
        log(f"    done in {time.time() - started:.0f}s")
        if progress is not None:
            progress(i, len(stages), st.id, "")
    return write_report(plan, stages)
