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

from common.settings import build, coerce_values, options_of, to_argv
from orchestration.identity import default_of, settings_class
from orchestration.plan import ONPOLICY, TEACHER, Plan

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
            "eval": ("cli.kdtrain", "eval"), "make": ("cli.kdtrain", "make-teacher"),
            "generate": ("cli.kdtrain", "generate"), "exposure": ("cli.kdtrain", "eval")}
# kdcache build settings only generate mode reads: an on-policy round's cache scores the student's own samples.
GENERATE_ONLY = {"mode", "max_new_tokens", "temperature", "num_samples", "filter"}


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
    resume = ["--overwrite" if overwrite else "--resume"]
    flags = {"cache": ["--json"], "train": resume, "make": resume, "generate": ["--overwrite"]}.get(kind, [])
    cls = settings_class(kind)
    config = build(cls, coerce_values(cls, settings))
    return python_cli(module) + [subcommand] + to_argv(config, keep=frozenset(settings)) + flags


def heldout_fraction(plan: Plan) -> float:
    """The share of the data every model of the plan is evaluated on (train.eval_fraction): the teacher it makes
    and the on-policy prompts hold it out too."""
    return plan.train.get("eval_fraction", default_of("train", "eval_fraction"))


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

    if "make" in plan.teacher:  # the teacher is made first (kdtrain make-teacher), into the plan's teacher folder
        # it holds out the rows the plan evaluates every model on (unless the plan says otherwise for it)
        make = {"eval_fraction": heldout_fraction(plan),
                **plan.teacher["make"]}
        add("make", TEACHER, {**make, "out": plan.teacher["model"]}, {"dataset": ("local", make["dataset"])},
            run=plan.teacher["model"])
    for node in [TEACHER] + nodes_of(plan):
        if node != TEACHER:  # train the node first: it is the teacher of its own cache
            parent, student = node.rsplit(">", 1)
            add("train", node, *_train_stage(plan, student, parent, model_dir_of(plan, node), None),
                run=model_dir_of(plan, node))
        if node in teacher_nodes:
            settings = {"model": model_dir_of(plan, node), "out": CACHE_DIR, **plan.data, **plan.cache}
            model = _root_teacher(plan) if node == TEACHER else ("stage", stage_id("train", node))
            add("cache", node, settings, {"model": model, **_data_input(plan.data)})
    for student in _baseline_students(plan):
        node = f"ce:{student}"
        add("train", node, *_train_stage(plan, student, TEACHER, model_dir_of(plan, node), "ce"),
            run=model_dir_of(plan, node))
    for student in plan.onpolicy.get("students", []):
        _onpolicy_stages(plan, student, add)
    for node in [TEACHER] + nodes_of(plan) + [f"ce:{s}" for s in _baseline_students(plan)] + onpolicy_nodes(plan):
        out_file = os.path.join(plan.out, "eval", f"{slug(node)}.json")
        add("eval", node, *_eval_stage(plan, node, out_file), eval=out_file)
    for node in exposure_nodes(plan):
        out_file = os.path.join(plan.out, "eval", f"exposure-{slug(node)}.json")
        add("exposure", node, *_exposure_stage(plan, node, out_file), eval=out_file)
    return stages


def _root_teacher(plan: Plan) -> tuple[str, str]:
    """The root teacher as an input: the stage that makes it, else its files (or its name)."""
    return ("stage", stage_id("make", TEACHER)) if "make" in plan.teacher else ("local", plan.teacher["model"])


def onpolicy_nodes(plan: Plan) -> list[str]:
    """The nodes of the students trained by on-policy rounds (their last round's train stage)."""
    return [ONPOLICY + s for s in plan.onpolicy.get("students", [])]


def exposure_nodes(plan: Plan) -> list[str]:
    """The models the exposure measure compares, per on-policy student: its off-policy KD (a direct path), its CE
    baseline, and its on-policy rounds (each that the plan trains)."""
    baselines, direct = _baseline_students(plan), nodes_of(plan)
    nodes = []
    for s in plan.onpolicy.get("students", []):
        nodes += [n for n in (f"{TEACHER}>{s}",) if n in direct] + ([f"ce:{s}"] if s in baselines else [])
        nodes.append(ONPOLICY + s)
    return nodes


def _onpolicy_stages(plan: Plan, student: str, add) -> None:
    """On-policy rounds r = 1..R of student (docs/runs-and-plans.md 3.7), each three processes: generate (the student
    as round r - 1 left it answers the data's training prompts), cache (the teacher scores exactly those tokens),
    train (on that cache, mixed with the teacher cache at onpolicy.mix, from round r - 1's weights)."""
    op, previous = plan.onpolicy, None
    train = {**plan.train, **op["train"]}
    for r in range(1, op["rounds"] + 1):
        node = f"{ONPOLICY}{student}@{r}"
        samples = os.path.join(plan.out, "samples", f"{slug(node)}.jsonl")
        add("generate", node, *_generate_stage(plan, student, previous, r, samples, train), samples=samples)
        add("cache", node, *_round_cache_stage(plan, student, node, r, samples))
        trained = ONPOLICY + student if r == op["rounds"] else node
        add("train", trained, *_round_train_stage(plan, student, node, previous, model_dir_of(plan, trained)),
            run=model_dir_of(plan, trained))
        previous = trained


def _generate_stage(plan: Plan, student: str, previous: str | None, r: int, samples: str,
                    train: dict) -> tuple[dict, dict]:
    """(settings, inputs) of `kdtrain generate`: round r's samples, from the student as round r - 1 left it."""
    spec, op = plan.students[student], plan.onpolicy
    if previous is not None:
        head, inputs = {"model": model_dir_of(plan, previous)}, {"model": ("stage", stage_id("train", previous))}
    elif "keep_layers" in spec:
        head = {"model": TEACHER_FOLDER, "keep_layers": spec["keep_layers"]}
        inputs = {"model": ("teacher", stage_id("cache", TEACHER))}
    else:
        head, inputs = {"model": spec["model"]}, {"model": ("local", spec["model"])}
    data_keys = {o.name for o in options_of(settings_class("generate")) if o.section == "data"}
    settings = {**head, **{k: v for k, v in plan.data.items() if k in data_keys}, "prompts": "train",
                "eval_fraction": train.get("eval_fraction", heldout_fraction(plan)),
                "num_samples": op["samples"], "seed": train.get("seed", default_of("train", "seed")), "round": r,
                "out": samples}
    for key, name in (("sample_temperature", "temperature"), ("max_new_tokens", "max_new_tokens")):
        if key in op:
            settings[name] = op[key]
    return settings, {**inputs, **_data_input(plan.data)}


def _round_cache_stage(plan: Plan, student: str, node: str, r: int, samples: str) -> tuple[dict, dict]:
    """(settings, inputs) of `kdcache build` scoring round r's samples with the root teacher, token for token."""
    data = {k: plan.data[k] for k in ("prompt_template", "max_length") if k in plan.data}
    settings = {"model": model_dir_of(plan, TEACHER), "out": CACHE_DIR, "dataset": samples, "prompt_field": "prompt",
                "response_field": "response", "ids_field": "token_ids",
                **({"input_field": "input"} if plan.data.get("input_field") else {}), **data,
                **{k: v for k, v in plan.cache.items() if k not in GENERATE_ONLY},
                "samples_from": f"plan {plan.name}: {student} after {r - 1} on-policy round(s) (round {r}'s samples)"}
    inputs = {"model": ("teacher", stage_id("cache", TEACHER)), "dataset": ("stage", stage_id("generate", node))}
    return settings, inputs


def _round_train_stage(plan: Plan, student: str, cache_node: str, previous: str | None, out: str) -> tuple[dict, dict]:
    """(settings, inputs) of `kdtrain run` for one round: the round's cache (mixed with the teacher cache), from the
    plan's initial student in round 1, else from the weights round r - 1 saved; onpolicy's train keys and steps."""
    settings, inputs = _train_stage(plan, student, cache_node, out, None)
    if previous is not None:
        for key in ("student_from_teacher", "keep_layers", "teacher", "student_config"):
            settings.pop(key, None)
        inputs.pop("teacher", None)
        settings["student"], inputs["student"] = model_dir_of(plan, previous), ("stage", stage_id("train", previous))
    op = plan.onpolicy
    settings.update(op["train"], steps=op["steps"])
    if op["mix"] > 0:
        settings.update(mix_cache=CACHE_REF.format(TEACHER), mix=op["mix"])
        inputs["mix_cache"] = ("stage", stage_id("cache", TEACHER))
    return settings, inputs


def _exposure_stage(plan: Plan, node: str, out_file: str) -> tuple[dict, dict]:
    """(settings, inputs) of `kdtrain eval --metrics exposure` on node's model: KL(teacher || model) on the model's
    own samples of the teacher cache's held-out prompts (trainer/exposure.py)."""
    teacher = plan.teacher["model"] if os.path.isdir(plan.teacher["model"]) else TEACHER_FOLDER
    settings = {"model": model_dir_of(plan, node), "metrics": ["exposure"], "teacher": teacher,
                "cache": CACHE_REF.format(TEACHER), "out": out_file,
                "eval_fraction": heldout_fraction(plan),
                "max_length": plan.data.get("max_length", default_of("cache", "max_length")),
                **{k: plan.eval[k] for k in ("seeds", "greedy", "batch_size", "limit") if k in plan.eval}}
    teacher_stage = stage_id("cache", TEACHER)
    return settings, {"model": ("stage", stage_id("train", node)), "teacher": ("teacher", teacher_stage),
                      "cache": ("stage", teacher_stage)}


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
            "eval_fraction": heldout_fraction(plan)}
    if "agreement" in metrics or "acceptance" in metrics or ("ppl" in metrics and "dataset" not in settings):
        head["cache"] = CACHE_REF.format(TEACHER)
        inputs["cache"] = ("stage", stage_id("cache", TEACHER))
    if "acceptance" in metrics:
        head["teacher"] = teacher
        inputs["teacher"] = ("teacher", stage_id("cache", TEACHER))
    return {**head, **settings}, {**inputs, **_data_input(settings)}
