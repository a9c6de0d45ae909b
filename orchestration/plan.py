"""Plan files: load them with bounded resources, parse and check their keys, resolve their paths.

A plan names a teacher, the data, cache and training settings, named students, and paths:
`[assistant, student]` means teacher -> assistant -> student (each trained student becomes the next
teacher and its cache is regenerated from it); `[student]` means teacher -> student directly.
Paths that share a prefix share their stages, so `[[assistant, student], [assistant]]` trains the
assistant once. With `baselines: true`, every student is also trained with plain cross-entropy on
the teacher cache's tokens (same data, order and steps): the baseline every comparison needs.

Knows the plan's keys and shapes; knows nothing of stages, processes or models.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

import yaml

from cacher.config import BuildConfig
from common.settings import options_of, schema_of
from shared.errors import UserError
from trainer.config import METRICS, EvalConfig, TrainConfig
from trainer.generate import GenerateConfig
from trainer.make_teacher import MakeTeacherConfig

# The plan's own keys. A section's keys are its command's settings (common.settings: a field's plan `section`), so
# a setting added to BuildConfig, TrainConfig or EvalConfig is a plan key with nothing else written (`plan_schema`).
PLAN_KEYS = {
    "name": "plan name (used in cache folder names)",
    "teacher": "kdcache build's model: a hub id, a local folder or smollm2-135m",
    "data": "kdcache build's data settings: the data set, its split and fields, limit, max_length",
    "cache": "kdcache build's capture settings: top_k, engine, dtype, batch sizes, generate mode's settings",
    "train": "kdtrain run's settings: loss, lr, steps, batch_tokens, eval_every, save_every (long stages should set it)",
    "students": "name -> {keep_layers: N} | {model: path or hub id} | {config: file.json}",
    "paths": "list of student-name lists: [assistant, student] is teacher -> assistant -> student",
    "baselines": "true: train every student with plain cross-entropy too",
    "eval": "kdtrain eval's settings: metrics, dataset and fields (default: data's), limits, decoding",
    "cache_root": "folder (or URL) shared by plans for caches; an identical cache anywhere under it is reused (default "
                  "<out>/caches)",
    "out": "output folder (default runs/<name>)",
    "onpolicy": "on-policy distillation rounds (section 3.7): students, rounds, samples, mix, sample_temperature, "
                "max_new_tokens, and train keys for the rounds' training (steps: per round)",
}
# teacher.make (kdtrain make-teacher's settings) and the onpolicy section's own keys; the rest of onpolicy is train's.
MAKE_SETTINGS = MakeTeacherConfig
ONPOLICY_KEYS = {"students", "rounds", "samples", "mix", "sample_temperature", "max_new_tokens"}
ONPOLICY_DEFAULTS = {"rounds": 2, "samples": 1, "mix": 0.0}
COMMAND_SETTINGS = {"cache": BuildConfig, "train": TrainConfig, "eval": EvalConfig,  # a stage kind's command's settings
                    "make": MakeTeacherConfig, "generate": GenerateConfig, "exposure": EvalConfig}
SECTIONS = {"teacher": "cache", "data": "cache", "cache": "cache", "train": "train", "eval": "eval"}  # -> stage kind
DEFAULT_METRICS = ("ppl", "agreement")  # a plan's eval.metrics when it names none
STUDENT_KEYS = {"keep_layers", "model", "config"}
TEACHER = "teacher"  # the root of every path; no student may take its name
# The node of a student trained by on-policy rounds: onpolicy:<student> (its last round; round r before it trains
# onpolicy:<student>@r, and round r's samples and their cache are onpolicy:<student>@r; section 3.7).
ONPOLICY = "onpolicy:"
# Bounds of a plan file (read_yaml): the shipped plans have a few kilobytes and four levels.
MAX_PLAN_BYTES = 1 << 20
MAX_PLAN_DEPTH = 32


class PlanError(UserError):
    """A plan that cannot run; the message names the key and the valid choices."""


@dataclass
class Plan:
    name: str
    teacher: dict
    data: dict
    cache: dict
    train: dict
    students: dict
    paths: list[list[str]]
    baselines: bool | list
    eval: dict
    out: str
    cache_root: str
    source: str = ""
    onpolicy: dict = field(default_factory=dict)  # normalized by onpolicy_section; {} without on-policy rounds


def _check_keys(obj, allowed, where: str) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise PlanError(f"plan: {where} must be a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise PlanError(f"plan: unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(allowed))}")
    return dict(obj)


def load_plan(path: str, *, out: str | None = None, overrides: list[str] | None = None) -> Plan:
    """Read and validate a plan file (see PLAN_KEYS); relative paths are relative to the plan file.

    overrides: "section.key=value" items (`kdtrain chain --set`) applied to the file's values before they are
    checked; a value is read as YAML, and a path starting with ./ or ../ is relative to the working directory.
    """
    raw = read_yaml(path, "plan file")
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_plan(raw, base_dir=os.path.dirname(os.path.abspath(path)), out=out, source=path)


def read_yaml(path: str, what: str = "plan file"):
    """A YAML file (a plan, a run's config file) with bounded resources: a regular file of at most MAX_PLAN_BYTES,
    then load_yaml's bounds."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise PlanError(f"{what} {path} does not exist") from exc
    if not stat.S_ISREG(info.st_mode):
        raise PlanError(f"{what} {path} is not a regular file; pass a YAML file")
    with open(path, "rb") as f:
        data = f.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"{what} {path} is larger than {MAX_PLAN_BYTES} bytes, the most a plan may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{what} {path} is not UTF-8 text: {exc}") from exc
    return load_yaml(text, f"{what} {path}")


def load_yaml(text: str, where: str):
    """YAML text with bounded resources: no aliases, at most MAX_PLAN_DEPTH nested collections; then the safe
    loader (plain values only, never Python objects).

    Aliases are refused because a few hundred bytes of nested aliases (`b: [*a, *a, ...]`) expand to
    billions of nodes when loaded; a plan writes each value out instead.
    """
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise PlanError(f"{where}: an alias (*{event.anchor}) at {_where(event)}; plans may not use "
                                "YAML anchors and aliases (they can expand without bound): write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_PLAN_DEPTH:
                    raise PlanError(f"{where}: collections nested deeper than {MAX_PLAN_DEPTH} at "
                                    f"{_where(event)}; a plan needs a few levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{where} is not valid YAML: {exc}") from exc


def apply_overrides(raw, overrides: list[str]) -> dict:
    """The plan's values with each "section.key=value" item set (nested keys as dots: students.s.keep_layers=2)."""
    if not isinstance(raw, dict):
        raise PlanError(f"plan: the plan must be a mapping of keys, got {type(raw).__name__}")
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise PlanError(f"plan override {item!r}: write SECTION.KEY=VALUE, e.g. train.lr=3e-4")
        value = load_yaml(text, f"plan override {key}")
        if isinstance(value, str) and value.startswith(("./", "../")):
            value = os.path.abspath(value)  # given on the command line: relative to the working directory
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise PlanError(f"plan override {item!r}: {'.'.join(parts[:depth + 1])} is not a section of the plan")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def section_keys(section: str) -> set[str]:
    """The keys a plan section takes: its command's settings written in that section."""
    return {o.name for o in options_of(COMMAND_SETTINGS[SECTIONS[section]]) if o.plan and o.section == section}


def plan_schema() -> dict:
    """{section: {key: type, default, required, choices, help}} of every section a plan takes (`kdtrain chain
    --schema`); the other keys of a plan with their description."""
    def spell(cls):
        keys = {o.name: f"{o.section}.{o.name}" for o in options_of(cls) if o.plan}
        return lambda name: keys.get(name, name)

    schema = {}
    for section, kind in SECTIONS.items():
        cls = COMMAND_SETTINGS[kind]
        schema[section] = schema_of(cls, include=lambda o, s=section: o.plan and o.section == s, spell=spell(cls))
    return {**schema, **{key: about for key, about in PLAN_KEYS.items() if key not in SECTIONS}}


def _where(event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def parse_plan(raw, *, base_dir: str = ".", out: str | None = None, source: str = "") -> Plan:
    raw = _check_keys(raw, PLAN_KEYS, "the plan")
    name = str(raw.get("name") or "plan")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PlanError(f"plan: name {name!r} may only use letters, digits, '.', '_' and '-'")
    teacher = _check_keys(raw.get("teacher"), section_keys("teacher") | {"make"}, "teacher")
    if "model" not in teacher and "make" not in teacher:
        raise PlanError("plan: teacher needs model (a hub id, a local folder, or smollm2-135m) or make (the settings "
                        "of kdtrain make-teacher, which makes it as the plan's first stage)")
    data = _check_keys(raw.get("data"), section_keys("data"), "data")
    if "dataset" in data:
        data["dataset"] = _resolve_local(str(data["dataset"]), base_dir)
    cache = _check_keys(raw.get("cache"), section_keys("cache"), "cache")
    train = _check_keys(raw.get("train"), section_keys("train"), "train")
    evaluation = _check_keys(raw.get("eval"), section_keys("eval"), "eval")
    if "dataset" in evaluation:
        evaluation["dataset"] = _resolve_local(str(evaluation["dataset"]), base_dir)
    students_raw = raw.get("students")
    if not isinstance(students_raw, dict) or not students_raw:
        raise PlanError("plan: students must name at least one student, e.g. students: {student: {keep_layers: 2}}")
    students = {}
    for sname, spec in students_raw.items():
        if sname == TEACHER or not re.fullmatch(r"[A-Za-z0-9_-]+", str(sname)):
            raise PlanError(f"plan: student name {sname!r} must be letters/digits/_/- and not 'teacher'")
        spec = _check_keys(spec, STUDENT_KEYS, f"students.{sname}")
        if len(spec) != 1:
            raise PlanError(f"plan: students.{sname} needs exactly one of keep_layers, model, config; got "
                            f"{sorted(spec) or 'none'}")
        if "keep_layers" in spec and (not isinstance(spec["keep_layers"], int) or spec["keep_layers"] < 1):
            raise PlanError(f"plan: students.{sname}.keep_layers must be a positive integer")
        if "model" in spec:
            spec["model"] = _resolve_local(str(spec["model"]), base_dir)
        if "config" in spec:
            spec["config"] = _resolve_local(str(spec["config"]), base_dir)
        students[str(sname)] = spec
    paths_raw = raw.get("paths")
    if not isinstance(paths_raw, list) or not paths_raw:
        raise PlanError("plan: paths must be a non-empty list, e.g. paths: [[assistant, student], [student]]")
    paths = []
    for i, p in enumerate(paths_raw):
        if isinstance(p, str):
            p = [p]
        if not isinstance(p, list) or not p:
            raise PlanError(f"plan: paths[{i}] must be a non-empty list of student names")
        for s in p:
            if s == TEACHER:
                raise PlanError(f"plan: paths[{i}] lists the teacher; paths start after it (teacher -> {p[-1]} is "
                                f"[{p[-1]}])")
            if s not in students:
                raise PlanError(f"plan: paths[{i}] names {s!r}, which is not a student; students: {', '.join(students)}")
        if len(set(p)) != len(p):
            raise PlanError(f"plan: paths[{i}] {p} visits a student twice (a cycle)")
        paths.append([str(s) for s in p])
    baselines = raw.get("baselines", True)
    if isinstance(baselines, list):
        unknown = [b for b in baselines if b not in students]
        if unknown:
            raise PlanError(f"plan: baselines names {unknown}, which are not students; students: {', '.join(students)}")
    elif not isinstance(baselines, bool):
        raise PlanError("plan: baselines must be true, false, or a list of student names")
    out_dir = out or raw.get("out") or os.path.join("runs", name)
    out_dir = _resolve_local(str(out_dir), base_dir) if raw.get("out") and not out else out_dir
    cache_root = raw.get("cache_root")
    cache_root = _resolve_local(str(cache_root), base_dir) if cache_root else os.path.join(out_dir, "caches")
    teacher = teacher_section(teacher, base_dir, out_dir)
    onpolicy = onpolicy_section(raw.get("onpolicy"), students, paths, data, train)
    metrics = evaluation.get("metrics", list(DEFAULT_METRICS))
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",")]
    evaluation["metrics"] = list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise PlanError(f"plan: eval.metrics has unknown {bad}; valid: {', '.join(METRICS)}")
    return Plan(name=name, teacher=teacher, data=data, cache=cache, train=train, students=students, paths=paths,
                baselines=baselines, eval=evaluation, out=out_dir, cache_root=cache_root, source=source,
                onpolicy=onpolicy)


def teacher_section(teacher: dict, base_dir: str, out_dir: str) -> dict:
    """The teacher: `model`, or `make` (kdtrain make-teacher's settings; the teacher is made into <out>/teacher by
    the plan's first stage). A given model (also `--teacher`, `--set teacher.model=`) is the teacher, and make is
    then not run."""
    if "model" in teacher:
        return {"model": _resolve_local(str(teacher["model"]), base_dir)}
    allowed = {o.name for o in options_of(MAKE_SETTINGS) if o.plan}
    make = _check_keys(teacher["make"], allowed, "teacher.make")
    if "dataset" not in make:
        raise PlanError("plan: teacher.make needs dataset (the text the teacher and its tokenizer are trained on)")
    make["dataset"] = _resolve_local(str(make["dataset"]), base_dir)
    return {"model": os.path.join(out_dir, TEACHER), "make": make}


def onpolicy_section(raw, students: dict, paths: list[list[str]], data: dict, train: dict) -> dict:
    """The onpolicy section (docs/runs-and-plans.md 3.7), normalized: its own keys with their defaults, `steps` per
    round, and `train`: the train keys it sets for the rounds' training. {} when the plan has none."""
    if raw is None:
        return {}
    section = _check_keys(raw, ONPOLICY_KEYS | section_keys("train"), "onpolicy")
    if not (data.get("prompt_field") and data.get("response_field")):
        raise PlanError("plan: onpolicy needs prompt/response data (data.prompt_field and data.response_field): in "
                        "each round the student answers the data's prompts")
    direct = [p[0] for p in paths if len(p) == 1]
    chosen = section.get("students", direct)
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, list) or not chosen:
        raise PlanError("plan: onpolicy.students must name students of the plan, e.g. students: [student] (default: "
                        "the students of direct paths, of which this plan has none)")
    for s in chosen:
        if s not in students:
            raise PlanError(f"plan: onpolicy.students names {s!r}, which is not a student; students: "
                            f"{', '.join(students)}")
        if "config" in students[s]:
            raise PlanError(f"plan: onpolicy.students: {s} is a random init (students.{s}.config), which cannot write "
                            "the first round's samples; give it as keep_layers or a model")
    out = {**ONPOLICY_DEFAULTS, **{k: v for k, v in section.items() if k in ONPOLICY_KEYS}, "students": list(chosen)}
    for key, low in (("rounds", 1), ("samples", 1)):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise PlanError(f"plan: onpolicy.{key} must be an integer >= {low}, got {out[key]!r}")
    if isinstance(out["mix"], bool) or not isinstance(out["mix"], (int, float)) or not 0 <= out["mix"] <= 1:
        raise PlanError(f"plan: onpolicy.mix is the share of batches drawn from the teacher cache: a number in [0, 1], "
                        f"got {out['mix']!r}")
    overrides = {k: v for k, v in section.items() if k not in ONPOLICY_KEYS}
    steps = overrides.pop("steps", None)
    if steps is None:
        total = train.get("steps")
        if not isinstance(total, int) or isinstance(total, bool) or total % out["rounds"]:
            raise PlanError(f"plan: onpolicy.steps (steps per round) is needed: train.steps ({total}) does not split "
                            f"into onpolicy.rounds ({out['rounds']}) rounds of equal steps")
        steps = total // out["rounds"]
    return {**out, "steps": steps, "train": overrides}


def _resolve_local(value: str, base_dir: str) -> str:
    """Paths that start with ./ or ../ are relative to the plan file; everything else is kept."""
    if value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base_dir, value))
    return os.path.expanduser(value)
