"""A plan's output folder (`kdtrain chain --out`, `kdtrain demo --out`): which folders a plan may write into.

The rule is docs/runs-and-plans.md 3.9. A plan writes under its folder only the names in PLAN_NAMES (its records,
stage logs, run folders, caches, evaluations, samples, the teacher it makes, the report and its plots), and marks
the folder with `owner.json` (tool kdtrain, kind plan, a random id: the marker run folders and caches carry, so
each tool recognizes the others' folders) before it writes anything else. A folder that exists, is not empty and
is not so marked is used only when it holds nothing but those names (and the plan file itself) and a plan's own
records (plan.json or stages/): a plan run by a kdcache older than the marker, which is then marked. Anything
else (someone's folder, a run folder, a cache, a model) is refused before anything is written in it, naming what
it holds.

Knows files and JSON; nothing about stages or commands.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid

from orchestration.plan import PlanError
from trainer.run_folder import MARKER_FILE, listed, read_marker_file, write_file_atomically

PLAN_LOCK = "plan.lock"  # held (flock) while a plan runs in the folder (trainer.run_folder.take_lock)
PLAN_NAMES = frozenset({MARKER_FILE, PLAN_LOCK, "plan.json", "stages", "logs", "runs", "caches", "eval", "samples",
                        "teacher", "report.md", "report.json", "demo_plan.yaml"})
PLAN_RECORDS = ("plan.json", "stages")  # what only a plan's folder holds


def _is_plan_name(name: str) -> bool:
    return name in PLAN_NAMES or name.endswith(".png")  # the report's plots (orchestration/plots.py)


def _marker(out: str) -> dict | None:
    """The folder's owner.json as a dict; None when there is none; PlanError when it is not one kdcache writes."""
    exists, marker, _ = read_marker_file(out)
    if not exists:
        return None
    if not (isinstance(marker, dict) and isinstance(marker.get("tool"), str) and isinstance(marker.get("kind"), str)):
        raise PlanError(f"plan folder {out}: its {MARKER_FILE} is not a marker kdcache or kdtrain writes (damaged, or "
                        "someone else's), so the plan cannot tell what it owns there: pass another --out")
    return marker


def _own_file(out: str, plan_file: str) -> str | None:
    """The plan file's name when it lies in `out` itself (a plan kept in its experiment's folder), else None."""
    if plan_file and os.path.dirname(os.path.abspath(plan_file)) == os.path.abspath(out):
        return os.path.basename(plan_file)
    return None


def plan_folder_problem(out: str, plan_file: str = "") -> str | None:
    """Why `out` cannot be a plan's folder (a sentence naming what it holds and what to do), or None. The plan's own
    file (plan_file) may lie in it."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"plan folder {out} is a file; pass a folder as --out"
    if not os.path.isdir(out):
        return None
    try:
        marker = _marker(out)
    except PlanError as exc:
        return str(exc)
    if marker is not None:
        if (marker["tool"], marker["kind"]) == ("kdtrain", "plan"):
            return None
        return (f"plan folder {out} is a {marker['tool']!s:.24} {marker['kind']!s:.24} folder (its {MARKER_FILE} says "
                "so), not a plan's: a plan never writes into a run folder or a cache. Pass a new or empty folder as "
                "--out")
    entries = set(os.listdir(out)) - {_own_file(out, plan_file)}
    if not entries:
        return None
    foreign = sorted(n for n in entries if not _is_plan_name(n))
    if foreign:
        return (f"plan folder {out} holds {listed(foreign)}, which no plan writes, and no {MARKER_FILE} marking it "
                "as a plan's folder; a plan writes only into a folder it created. Pass a new or empty folder as --out")
    if not entries & set(PLAN_RECORDS):
        return (f"plan folder {out} holds {listed(entries)} but none of a plan's records ({', '.join(PLAN_RECORDS)}) "
                f"and no {MARKER_FILE}, so it is not a plan's folder; pass a new or empty folder as --out")
    return None


def claim_plan_folder(out: str, log=print, plan_file: str = "") -> None:
    """Check `out` (PlanError naming the problem), create it if needed and mark it as a plan's folder."""
    problem = plan_folder_problem(out, plan_file)
    if problem:
        raise PlanError(problem)
    adopted = os.path.isdir(out) and bool(set(os.listdir(out)) - {_own_file(out, plan_file)}) and _marker(out) is None
    os.makedirs(out, exist_ok=True)
    if _marker(out) is None:
        write_file_atomically(os.path.join(out, MARKER_FILE), json.dumps({
            "tool": "kdtrain", "kind": "plan", "id": uuid.uuid4().hex, "host": socket.gethostname(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}, indent=1).encode())
        if adopted:
            log(f"plan folder {out}: an earlier plan's folder without a {MARKER_FILE}; marked it as this plan's")
