"""A plan as an ordered list of stages: build a cache, train a student, evaluate a model.

Each stage runs as its own process (`kdcache build`, `kdtrain run`, `kdtrain eval`), so any stage can
run on another machine. A stage is its command's settings (keyed by the field names of the command's
settings dataclass: BuildConfig, TrainConfig, EvalConfig) plus the inputs that earlier stages or
local files provide; its command line is produced from those settings. Values that only an earlier
stage can provide are placeholders until it has run: the cache a node's cache stage recorded
(`{cache:<node>}`), the root teacher's local folder (`{teacher_folder}`), and a cache stage's own
folder (`{cache_dir}`, named by the stage's identity).

Caches live under `cache_root` (shared across plans) in folders named
`<plan name>__<node>-<first 8 hex digits of the cache stage's identity>`, so plans that share a name
but not their data, settings or teacher never write into one folder, and a retrained assistant gets a
new cache folder instead of overwriting its old one (another plan may still use that).

Students are initialized independently of the path they are trained on (a layer-dropped copy of
the plan's teacher, a model folder or hub id, or a config), so paths are compared from the same
starting point. Knows plans and command lines; runs nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from common.settings import build, coerce_values, to_argv
from orchestration.identity import default_of, settings_class
from orchestration.plan import TEACHER, Plan

# Stands for the root teacher's local folder in train commands until the teacher cache exists and
# names it (a hub id or `smollm2-135m` is resolved to a folder by `kdcache build`).
TEACHER_FOLDER = "{teacher_folder}"
# "{cache:<node>}" stands for the cache of <node> in train and eval commands until its cache stage has
# run and recorded the cache `kdcache build` reported (its own --out, or an identical cache it reused).
CACHE_REF = "{{cache:{}}}"
# A cache stage's --out until its identity is known (cache_dir_of).
CACHE_DIR = "{cache_dir}"
# What `kdcache build --json` prints last, on a line of its own (cacher.build.BuildResult.to_json).
BUILD_STATUSES = ("built", "already built", "reused", "partial")
# The module and subcommand each kind of stage runs.
COMMANDS = {"cache": ("cli.kdcache", "build"), "train": ("cli.kdtrain", "run"),
            "eval": ("cli.kdtrain", "eval")}


@dataclass
class Stage:
    """One step of a plan: build a cache, train a student, or evaluate a model.

    settings: the command's options by settings-dataclass field name (placeholders where an earlier
    stage provides the value). inputs: what else determines the output, name -> (kind, value):
    ("stage", id) the output of an earlier stage (a cache stage's cache_key, a train stage's identity),
    ("teacher", id) the teacher weights recorded in that cache stage's manifest, ("local", path or
    name) a local file or folder's fingerprint, or the name itself when it is not a local path.
    """

    id: str
    kind: str  # "cache" | "train" | "eval"
    node: str  # "teacher", "teacher>assistant", "ce:student", ...
    settings: dict
    marker: str
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        """The command with its placeholders (runner.resolve fills them in)."""
        return command_of(self.kind, self.settings)

    @property
    def started_marker(self) -> str:
        """Written before the stage's process starts: the identity it was started with."""
        return self.marker[: -len(".done.json")] + ".started.json"


def command_of(kind: str, settings: dict, *, overwrite: bool = False) -> list[str]:
    """The stage's command line: its settings as options (common.settings.to_argv of the command's settings
    dataclass: every setting the stage was given, typed as the command takes it), and the flags the chain always
    passes.

    kdcache build prints its JSON report (--json), which the chain reads. kdtrain run gets --resume (an
    interrupted run continues from its latest checkpoint, or starts over when it was killed before its
    first), or --overwrite when the stage's identity changed since its run folder was written.
    """
    module, subcommand = COMMANDS[kind]
    flags = {"cache": ["--json"], "train": ["--overwrite" if overwrite else "--resume"], "eval": []}[kind]
    cls = settings_class(kind)
    config = build(cls, coerce_values(cls, settings))
    return python_cli(module) + [subcommand] + to_argv(config, keep=frozenset(settings)) + flags


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


def stage_id(kind: str, node: str) -> str:
    return f"{kind}:{slug(node)}"


def python_cli(module: str) -> list[str]:
    """The interpreter running this plan, on one of kdcache's installed command modules.

    `python -m` puts the working directory first on sys.path, so a `cli/` or `shared/` folder there would
    run instead of the installed kdcache; -P (Python 3.11+) leaves it out, and -I (3.10) isolates the
    interpreter (it also ignores PYTHON* variables and the user's site-packages).
    """
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", "-m", module]


def model_dir_of(plan: Plan, node: str) -> str:
    if node == TEACHER:
        return plan.teacher["model"]
    return os.path.join(plan.out, "runs", slug(node))


def cache_dir_of(plan: Plan, node: str, identity: str) -> str:
    """The folder the chain asks `kdcache build` to write node's cache to (the cache used is the one the build
    reports: caches.recorded_cache). Named by the plan, the node and the cache stage's identity, which covers
    the model (the root teacher's name or files, a trained node's train stage), the data and every build
    setting: a plan whose data, settings or teacher changed never writes into an earlier build's folder."""
    return os.path.join(plan.cache_root, f"{plan.name}__{slug(node)}-{identity[:8]}")


def marker_of(plan: Plan, kind: str, node: str) -> str:
    return os.path.join(plan.out, "stages", f"{kind}-{slug(node)}.done.json")


def stages_of(plan: Plan) -> list[Stage]:
    """The plan as an ordered list of stages; each runs as its own process after the stages it needs."""
    stages: list[Stage] = []
    teacher_nodes = [TEACHER] + [n for n in nodes_of(plan) if any(m.startswith(n + ">") for m in nodes_of(plan))]

    def add(kind, node, settings, inputs, **outputs):
        stages.append(Stage(stage_id(kind, node), kind, node, settings, marker_of(plan, kind, node), inputs, outputs))

    for node in [TEACHER] + nodes_of(plan):
        if node != TEACHER:  # train the node first: it is the teacher of its own cache
            parent, student = node.rsplit(">", 1)
            add("train", node, *_train_stage(plan, student, parent, model_dir_of(plan, node), None),
                run=model_dir_of(plan, node))
        if node in teacher_nodes:
            settings = {"model": model_dir_of(plan, node), "out": CACHE_DIR, **plan.data, **plan.cache}
            model = ("local", plan.teacher["model"]) if node == TEACHER else ("stage", stage_id("train", node))
            add("cache", node, settings, {"model": model, **_data_input(plan.data)})
    for student in _baseline_students(plan):
        node = f"ce:{student}"
        add("train", node, *_train_stage(plan, student, TEACHER, model_dir_of(plan, node), "ce"),
            run=model_dir_of(plan, node))
    for node in [TEACHER] + nodes_of(plan) + [f"ce:{s}" for s in _baseline_students(plan)]:
        out_file = os.path.join(plan.out, "eval", f"{slug(node)}.json")
        add("eval", node, *_eval_stage(plan, node, out_file), eval=out_file)
    return stages


def _data_input(settings: dict) -> dict:
    return {"dataset": ("local", settings["dataset"])} if settings.get("dataset") else {}


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


def _train_stage(plan: Plan, student: str, parent: str, out: str, loss: str | None) -> tuple[dict, dict]:
    """(settings, inputs) of `kdtrain run` training student on parent's cache into out."""
    spec = plan.students[student]
    settings: dict = {"cache": CACHE_REF.format(parent), "out": out}
    inputs = {"cache": ("stage", stage_id("cache", parent))}
    if "keep_layers" in spec:
        settings.update(student_from_teacher=True, keep_layers=spec["keep_layers"], teacher=TEACHER_FOLDER)
        inputs["teacher"] = ("teacher", stage_id("cache", TEACHER))
    elif "model" in spec:
        settings["student"] = spec["model"]
        inputs["student"] = ("local", spec["model"])
    else:
        settings["student_config"] = spec["config"]
        inputs["student"] = ("local", spec["config"])
    train = dict(plan.train)
    if loss is not None:
        train["loss"] = loss
        train.pop("alpha", None)
    return {**settings, **train}, inputs


def _eval_stage(plan: Plan, node: str, out_file: str) -> tuple[dict, dict]:
    """(settings, inputs) of `kdtrain eval` on node's model.

    ppl, agreement and acceptance default to the teacher cache's held-out sequences (the same text for every
    stage, never trained on); acceptance also gets the plan's teacher (--teacher: the exact alpha, and on the
    teacher's own samples), identified by its weights. Generation metrics read eval.dataset (default: the plan's
    data).
    """
    settings = dict(plan.eval)
    metrics = settings.pop("metrics")
    if any(m in metrics for m in ("rouge", "gsm8k", "mauve", "bertscore", "grounding")) and "dataset" not in settings:
        for key in ("dataset", "dataset_config", "split", "prompt_field", "response_field", "input_field"):
            if key not in settings and key in plan.data:
                settings[key] = plan.data[key]
    teacher = plan.teacher["model"] if os.path.isdir(plan.teacher["model"]) else TEACHER_FOLDER
    if node == TEACHER:
        model, inputs = teacher, {"model": ("teacher", stage_id("cache", TEACHER))}
    else:
        model, inputs = model_dir_of(plan, node), {"model": ("stage", stage_id("train", node))}
    head = {"model": model, "metrics": list(metrics), "out": out_file,
            "eval_fraction": plan.train.get("eval_fraction", default_of("train", "eval_fraction"))}
    if "agreement" in metrics or "acceptance" in metrics or ("ppl" in metrics and "dataset" not in settings):
        head["cache"] = CACHE_REF.format(TEACHER)
        inputs["cache"] = ("stage", stage_id("cache", TEACHER))
    if "acceptance" in metrics:
        head["teacher"] = teacher
        inputs["teacher"] = ("teacher", stage_id("cache", TEACHER))
    return {**head, **settings}, {**inputs, **_data_input(settings)}
