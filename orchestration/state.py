"""Where each stage of a plan stands: done, to run, to rerun (and why), or waiting for an earlier stage.

A stage is done when its done-marker records the identity the stage has now (identity.py) and its
output is still there: a cache stage's recorded cache is complete and holds the recorded cache_key, a
train stage's run.json says complete, an eval stage's JSON file exists. A stage whose identity changed
reruns, and so does every stage after it that reads its output (their inputs changed with it). The
stages are assessed in order; `known` holds what each stage before gives the stages after it: "output"
(a cache stage's cache_key, a train or eval stage's identity), and a cache stage's "cache", "teacher"
(weights identity) and "teacher_path". A dry run also puts there what it can predict of stages that are
still to run (a train stage's identity, the folder a cache stage will ask for). Reads markers and
manifests; runs nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from orchestration.caches import cache_output, read_marker
from orchestration.identity import (
    changes,
    identity_settings,
    local_identity,
    stage_identity,
    typed_settings,
    validate,
)
from orchestration.plan import TEACHER, Plan
from orchestration.stages import (
    CACHE_DIR,
    TEACHER_FOLDER,
    Stage,
    cache_dir_of,
    command_of,
    stage_id,
    stages_of,
)

DONE, NEW, CHANGED, INTERRUPTED, WAITS = "done", "new", "changed", "interrupted", "waits"


@dataclass
class Assessment:
    """A stage as it stands now. identity is None while an input is not known yet (waits_for says which)."""

    stage: Stage
    state: str  # DONE | NEW | CHANGED | INTERRUPTED | WAITS
    settings: dict  # the command's settings after defaults, as the identity counts them
    inputs: dict  # input name -> its identity (None: not known yet)
    identity: str | None
    values: dict  # the command's settings with every placeholder that can be resolved resolved
    reasons: list[str] = field(default_factory=list)
    waits_for: list[str] = field(default_factory=list)
    output: dict | None = None  # what the stage gives later stages when it is DONE

    @property
    def command(self) -> list[str]:
        """The stage's command: --overwrite for a train stage whose identity changed, --resume otherwise."""
        return command_of(self.stage.kind, self.values, overwrite=self.state == CHANGED)


def assess(plan: Plan, stage: Stage, known: dict[str, dict]) -> Assessment:
    """The stage's identity and state, given what the current stages before it give (`known`)."""
    inputs, waits = {}, []
    for name, (kind, value) in stage.inputs.items():
        if kind == "local":
            inputs[name] = local_identity(value)
            continue
        inputs[name] = (known.get(value) or {}).get("teacher" if kind == "teacher" else "output")
        if inputs[name] is None:
            waits.append(value)
    typed = typed_settings(stage)
    settings = identity_settings(stage, validate(stage, typed))
    identity = None if waits else stage_identity(stage.kind, settings, inputs)
    values = _resolve(plan, stage, typed, identity, known)
    waits += [s for s in map(_placeholder_stage, values.values()) if s and s not in waits]
    done, started = read_marker(stage.marker), read_marker(stage.started_marker)
    a = Assessment(stage, NEW, settings, inputs, identity, values, waits_for=sorted(set(waits)))
    if waits:
        before = done or started
        changed = [c for c in changes(stage, before, settings, {}) if not c.startswith("input ")] if before else []
        a.state = CHANGED if changed else (WAITS if before else NEW)
        after = f"runs after {', '.join(a.waits_for)}"
        if before and not changed:
            after += ", and reruns if what that makes differs from what this stage last used"
        a.reasons = changed + [after]
    elif done and done.get("identity") == identity:
        a.output = _output(stage, done, identity)
        if a.output is not None:
            a.state = DONE
        else:
            a.state, a.reasons = CHANGED, [_missing(stage, done)]
    elif done:
        a.state, a.reasons = CHANGED, changes(stage, done, settings, inputs)
    elif started and started.get("identity") != identity:
        a.state, a.reasons = CHANGED, ["started with other settings or inputs: " + "; ".join(
            changes(stage, started, settings, inputs))]
    elif started:
        a.state, a.reasons = INTERRUPTED, ["started earlier and not finished: continues"]
    return a


def predicted_output(a: Assessment) -> dict | None:
    """What a stage still to run will give the stages after it, as far as a dry run can tell: a train stage's
    identity (its output's identity once it ran), the folder a cache stage asks for (its key is known only
    once it is built)."""
    if a.stage.kind in ("train", "make", "generate") and a.identity is not None:
        return {"output": a.identity}
    if a.stage.kind == "cache" and a.values.get("out") != CACHE_DIR:
        return {"cache": a.values["out"]}
    return None


def marker_record(a: Assessment) -> dict:
    """What a stage's markers record about it (the report reads the settings from here)."""
    return {"stage": a.stage.id, "kind": a.stage.kind, "node": a.stage.node, "identity": a.identity,
            "settings": a.settings, "inputs": a.inputs}


def output_after_run(stage: Stage, marker: dict) -> dict | None:
    """What a stage that just finished gives the stages after it (None: its output is not there)."""
    return _output(stage, marker, marker["identity"])


def _output(stage: Stage, marker: dict, identity: str) -> dict | None:
    if stage.kind == "cache":
        url = marker.get("cache")
        found = cache_output(url) if isinstance(url, str) else None
        if found is None or found["cache_key"] != marker.get("cache_key"):
            return None
        return {**found, "output": found["cache_key"]}
    if stage.kind in ("train", "make"):  # a run folder (a made teacher is one too)
        try:
            with open(os.path.join(stage.outputs["run"], "run.json")) as f:
                complete = json.load(f).get("status") == "complete"
        except (OSError, ValueError, AttributeError):
            complete = False
        return {"output": identity} if complete else None
    return {"output": identity} if os.path.isfile(_output_file(stage)) else None


def _output_file(stage: Stage) -> str:
    """The file an eval or exposure stage (its results) or a generate stage (its samples) writes."""
    return stage.outputs.get("eval") or stage.outputs["samples"]


def _missing(stage: Stage, marker: dict) -> str:
    if stage.kind == "cache":
        return (f"its recorded cache {marker.get('cache')} is gone, incomplete or holds another cache_key than "
                f"{str(marker.get('cache_key'))[:12]}")
    if stage.kind in ("train", "make"):
        return f"its run {stage.outputs['run']} is gone or not complete"
    return f"its output {_output_file(stage)} is gone"


def _resolve(plan: Plan, stage: Stage, values: dict, identity: str | None, known: dict) -> dict:
    """values with the placeholders resolved that can be: a node's recorded cache, the teacher's folder, the
    cache stage's own folder. The others stay as they are (_placeholder_stage names the stage they wait for)."""
    out = {}
    for key, value in values.items():
        if value == CACHE_DIR and identity is not None:
            value = cache_dir_of(plan, stage.node, identity)
        elif value == TEACHER_FOLDER:
            if os.path.isdir(plan.teacher["model"]):
                value = plan.teacher["model"]
            elif (known.get(stage_id("cache", TEACHER)) or {}).get("teacher_path"):
                value = known[stage_id("cache", TEACHER)]["teacher_path"]
        elif isinstance(value, str) and value.startswith("{cache:") and value.endswith("}"):
            value = (known.get(stage_id("cache", value[len("{cache:"):-1])) or {}).get("cache", value)
        out[key] = value
    return out


def _placeholder_stage(value) -> str | None:
    """The stage an unresolved placeholder waits for, or None when value is not a placeholder."""
    if value == TEACHER_FOLDER:
        return stage_id("cache", TEACHER)
    if isinstance(value, str) and value.startswith("{cache:") and value.endswith("}"):
        return stage_id("cache", value[len("{cache:"):-1])
    return None


def planned_cache_dir(plan: Plan, node: str = TEACHER) -> str:
    """The folder node's cache stage asks `kdcache build` for, given the stages that are done (for the root
    teacher it is always known: its inputs are the plan's own)."""
    known: dict[str, dict] = {}
    for stage in stages_of(plan):
        a = assess(plan, stage, known)
        if stage.kind == "cache" and stage.node == node:
            if a.identity is None:
                raise ValueError(f"the cache folder of {node} is known once {', '.join(a.waits_for)} ran")
            return cache_dir_of(plan, node, a.identity)
        known[stage.id] = a.output if a.state == DONE else predicted_output(a)
    raise ValueError(f"{node} has no cache stage")
