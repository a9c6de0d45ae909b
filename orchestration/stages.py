"""A plan as an ordered list of stages: build a cache, train a student, evaluate a model.

Each stage runs as its own process (`kdcache build`, `kdtrain run`, `kdtrain eval`), so any stage can
run on another machine. Train stages always run with `--resume`: an interrupted `kdtrain run`
continues from its latest checkpoint, or starts again from step 0 when it was killed before its first.

Caches live under `cache_root` (shared across plans) in folders named
`<plan name>__<node>-<digest of the build's model, data and cache settings>`, so plans that share a
name but not their data never write into one folder.

Students are initialized independently of the path they are trained on (a layer-dropped copy of
the plan's teacher, a model folder or hub id, or a config), so paths are compared from the same
starting point. Knows plans and command lines; runs nothing and reads nothing from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

from orchestration.plan import TEACHER, Plan

# Boolean train settings whose kdtrain flag defaults to on: false in a plan passes --no-<flag>.
ON_BY_DEFAULT = {"target_bucket", "tail_samples"}
# Stands for the root teacher's local folder in train commands until the teacher cache exists and
# names it (a hub id or `smollm2-135m` is resolved to a folder by `kdcache build`).
TEACHER_FOLDER = "{teacher_folder}"
# "{cache:<node>}" stands for the cache of <node> in train and eval commands until its cache stage has
# run and recorded the cache `kdcache build` reported (its own --out, or an identical cache it reused).
CACHE_REF = "{{cache:{}}}"
# What `kdcache build --json` prints last, on a line of its own (cacher.build.BuildResult.to_json).
BUILD_STATUSES = ("built", "already built", "reused", "partial")


@dataclass
class Stage:
    """One step of a plan: build a cache, train a student, or evaluate a model."""

    id: str
    kind: str  # "cache" | "train" | "eval"
    node: str  # "teacher", "teacher>assistant", "ce:student", ...
    command: list[str]
    marker: str
    outputs: dict = field(default_factory=dict)


def nodes_of(plan: Plan) -> list[str]:
    """Every trained node, e.g. 'teacher>assistant>student', deduplicated, parents first."""
    seen: list[str] = []
    for p in plan.paths:
        for depth in range(1, len(p) + 1):
            node = ">".join([TEACHER, *p[:depth]])
            if node not in seen:
                seen.append(node)
    return sorted(seen, key=lambda n: (n.count(">"), seen.index(n)))


def slug(node: str) -> str:
    return node.replace(">", "__").replace(":", "-")


def _python_cli(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _options(settings: dict, mapping: dict[str, str] | None = None) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + (mapping or {}).get(key, key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                args.append(flag)
            elif key in ON_BY_DEFAULT:
                args.append("--no-" + flag[2:])
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args += [flag, str(value)]
    return args


def model_dir_of(plan: Plan, node: str) -> str:
    if node == TEACHER:
        return plan.teacher["model"]
    return os.path.join(plan.out, "runs", slug(node))


def cache_dir_of(plan: Plan, node: str) -> str:
    """The folder the chain asks `kdcache build` to write node's cache to (see cache_of for the one used).

    Named by the plan, the node and a digest of what the build depends on (model, data and cache
    settings), so two plans with one name but other data or teachers never share a folder.
    """
    model = model_dir_of(plan, node)
    if node != TEACHER:
        model = os.path.abspath(model)
    settings = json.dumps({"model": model, "data": plan.data, "cache": plan.cache}, sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return os.path.join(plan.cache_root, f"{plan.name}__{slug(node)}-{digest}")


def marker_of(plan: Plan, kind: str, node: str) -> str:
    return os.path.join(plan.out, "stages", f"{kind}-{slug(node)}.done.json")


def stages_of(plan: Plan) -> list[Stage]:
    """The plan as an ordered list of stages; each runs as its own process."""
    stages: list[Stage] = []
    teacher_nodes = [TEACHER] + [n for n in nodes_of(plan) if any(m.startswith(n + ">") for m in nodes_of(plan))]

    def add(kind, node, command, **outputs):
        sid = f"{kind}:{slug(node)}"
        stages.append(Stage(sid, kind, node, command, marker_of(plan, kind, node), outputs))

    build_common = _options(plan.data) + _options(plan.cache)
    for node in [TEACHER] + nodes_of(plan):
        if node != TEACHER:  # train the node first: it is the teacher of its own cache
            parent = node.rsplit(">", 1)[0]
            student = node.rsplit(">", 1)[1]
            add("train", node, _train_command(plan, student, CACHE_REF.format(parent), model_dir_of(plan, node), None),
                run=model_dir_of(plan, node))
        if node in teacher_nodes:
            add("cache", node, _python_cli("cli.kdcache") + ["build", "--model", model_dir_of(plan, node),
                                                            "--out", cache_dir_of(plan, node), "--json"] + build_common,
                cache=cache_dir_of(plan, node))
    for student in _baseline_students(plan):
        node = f"ce:{student}"
        add("train", node, _train_command(plan, student, CACHE_REF.format(TEACHER), model_dir_of(plan, node), "ce"),
            run=model_dir_of(plan, node))
    for node in [TEACHER] + nodes_of(plan) + [f"ce:{s}" for s in _baseline_students(plan)]:
        out_file = os.path.join(plan.out, "eval", f"{slug(node)}.json")
        model = TEACHER_FOLDER if node == TEACHER and not os.path.isdir(plan.teacher["model"]) else model_dir_of(plan, node)
        add("eval", node, _eval_command(plan, model, out_file), eval=out_file)
    return stages


def _baseline_students(plan: Plan) -> list[str]:
    if isinstance(plan.baselines, list):
        return list(plan.baselines)
    return _students_in_paths(plan) if plan.baselines else []


def _students_in_paths(plan: Plan) -> list[str]:
    seen = []
    for p in plan.paths:
        for s in p:
            if s not in seen:
                seen.append(s)
    return seen


def _train_command(plan: Plan, student: str, cache: str, out: str, loss: str | None) -> list[str]:
    spec = plan.students[student]
    # --resume always: continue from the latest checkpoint, or start from step 0 in a run folder that a
    # killed stage left without one (kdtrain run clears its own files then).
    cmd = _python_cli("cli.kdtrain") + ["run", "--cache", cache, "--out", out, "--resume"]
    if "keep_layers" in spec:
        cmd += ["--student-from-teacher", "--keep-layers", str(spec["keep_layers"]), "--teacher", TEACHER_FOLDER]
    elif "model" in spec:
        cmd += ["--student", spec["model"]]
    else:
        cmd += ["--student-config", spec["config"]]
    settings = dict(plan.train)
    if loss is not None:
        settings["loss"] = loss
        settings.pop("alpha", None)
    return cmd + _options(settings)


def _eval_command(plan: Plan, model: str, out_file: str) -> list[str]:
    """ppl and agreement default to the teacher cache's held-out sequences (the same text for every
    stage, never trained on); generation metrics read eval.dataset (default: the plan's data)."""
    settings = {k: v for k, v in plan.eval.items()}
    metrics = settings.pop("metrics")
    if any(m in metrics for m in ("rouge", "gsm8k", "mauve", "bertscore")) and "dataset" not in settings:
        for key in ("dataset", "dataset_config", "split", "prompt_field", "response_field", "input_field"):
            if key not in settings and key in plan.data:
                settings[key] = plan.data[key]
    cmd = _python_cli("cli.kdtrain") + ["eval", "--model", model, "--metrics", ",".join(metrics), "--out", out_file,
                                        "--eval-fraction", str(plan.train.get("eval_fraction", 0.05))]
    if "agreement" in metrics or ("ppl" in metrics and "dataset" not in settings):
        cmd += ["--cache", CACHE_REF.format(TEACHER)]
    return cmd + _options(settings)
