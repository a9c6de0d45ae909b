"""`kdtrain chain PLAN.yaml`: sequential and parallel distillation as one resumable plan.

A plan names a teacher, the data, cache and training settings, named students, and paths:
`[assistant, student]` means teacher -> assistant -> student (each trained student becomes the next
teacher and its cache is regenerated from it); `[student]` means teacher -> student directly.
Paths that share a prefix share its stages, so `[[assistant, student], [assistant]]` trains the
assistant once. With `baselines: true`, every student is also trained with plain cross-entropy on
the teacher cache's tokens (same data, order and steps): the baseline every comparison needs.

Each stage runs as its own process (`kdcache build`, `kdtrain run`, `kdtrain eval`), so any stage
can run on another machine; a stage that finished has a marker in `<out>/stages/` and is skipped on
the next run. Train stages always run with `--resume`: an interrupted `kdtrain run` continues from
its latest checkpoint, or starts again from step 0 when it was killed before its first one.

Caches live under `cache_root` (shared across plans) in folders named
`<plan name>__<node>-<digest of the build's model, data and cache settings>`, so plans that share a
name but not their data never write into one folder. `kdcache build` returns an existing complete
cache with the same cache_key at once (anywhere under the root) instead of building a second one; the
chain reads the cache the build reports (its `--json` line), records it in the cache stage's marker, and every
later stage (train, eval, the teacher's folder) uses that cache. So a teacher never runs twice on the same data and
settings, whichever plan built its cache first.

Students are initialized independently of the path they are trained on (a layer-dropped copy of
the plan's teacher, a model folder or hub id, or a config), so paths are compared from the same
starting point. Before any stage runs (and on --dry-run), students given as model folders or hub ids
already in the local Hugging Face cache are checked to share the teacher's tokenizer (layer-dropped
and config students use the teacher's by construction). Knows plans and processes; never imports the
cacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from shared.format import CacheError

PLAN_KEYS = {
    "name": "plan name (used in cache folder names)",
    "teacher": "{model: hub id | folder | smollm2-135m}",
    "data": "dataset, dataset_config, split, text_field | prompt_field + response_field [+ prompt_template (chat, plain, "
            "minillm) + input_field], limit, max_length",
    "cache": "top_k, engine, dtype, batch_tokens, shard_tokens, mode, generate settings (max_new_tokens, temperature, num_samples, seed, filter)",
    "train": "kdtrain run settings: loss, alpha, temperature, steps, epochs, lr, batch_tokens, seed, eval_every, warmup_steps, save_every (checkpoint every N steps; long stages should set it), ...",
    "students": "name -> {keep_layers: N} | {model: path or hub id} | {config: file.json}",
    "paths": "list of student-name lists: [assistant, student] is teacher -> assistant -> student",
    "baselines": "true: train every student with plain cross-entropy too",
    "eval": "metrics (ppl, agreement, rouge, gsm8k, ...), dataset, dataset_config and fields (default: data's), limit, max_length, gsm8k_instruction, bertscore_layers",
    "cache_root": "folder (or URL) shared by plans for caches; an identical cache anywhere under it is reused (default <out>/caches)",
    "out": "output folder (default runs/<name>)",
}
# dataset_config is passed as `kdcache build --dataset-config` (a hub data set's configuration, e.g. gsm8k's "main");
# prompt_template and input_field as --prompt-template / --input-field (minillm: the prompts eval's ROUGE-L uses).
DATA_KEYS = {"dataset", "dataset_config", "split", "text_field", "prompt_field", "response_field", "prompt_template",
             "input_field", "limit", "max_length"}
CACHE_KEYS = {"top_k", "tail_samples", "engine", "dtype", "batch_tokens", "shard_tokens", "chunk_rows", "mode", "max_new_tokens",
              "temperature", "num_samples", "seed", "filter", "tensor_parallel_size", "gpu_memory_utilization",
              "trust_remote_code"}
TRAIN_KEYS = {"loss", "alpha", "temperature", "steps", "epochs", "lr", "batch_tokens", "seed", "eval_every",
              "warmup_steps", "weight_decay", "grad_accum", "clip", "bf16", "beta", "skew", "save_every", "log_every",
              "eval_fraction", "target_bucket", "tail_samples"}
# Boolean train settings whose kdtrain flag defaults to on: false in a plan passes --no-<flag>.
ON_BY_DEFAULT = {"target_bucket", "tail_samples"}
EVAL_KEYS = {"metrics", "dataset", "split", "text_field", "prompt_field", "response_field", "input_field", "limit",
             "max_length", "max_prompt_length", "greedy", "seeds", "batch_size", "bertscore_layers", "dataset_config",
             "gsm8k_instruction"}
STUDENT_KEYS = {"keep_layers", "model", "config"}
TEACHER = "teacher"
# Stands for the root teacher's local folder in train commands until the teacher cache exists and
# names it (a hub id or `smollm2-135m` is resolved to a folder by `kdcache build`).
TEACHER_FOLDER = "{teacher_folder}"
# "{cache:<node>}" stands for the cache of <node> in train and eval commands until its cache stage has
# run and recorded the cache `kdcache build` reported (its own --out, or an identical cache it reused).
CACHE_REF = "{{cache:{}}}"
# What `kdcache build --json` prints last, on a line of its own (cacher.build.BuildResult.to_json).
BUILD_STATUSES = ("built", "already built", "reused", "partial")


class PlanError(ValueError):
    """A plan that cannot run; the message names the key and the valid choices."""


@dataclass
class Stage:
    """One step of a plan: build a cache, train a student, or evaluate a model."""

    id: str
    kind: str  # "cache" | "train" | "eval"
    node: str  # "teacher", "teacher>assistant", "ce:student", ...
    command: list[str]
    marker: str
    outputs: dict = field(default_factory=dict)


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


def _check_keys(obj, allowed, where: str) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise PlanError(f"plan: {where} must be a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise PlanError(f"plan: unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(allowed))}")
    return dict(obj)


def load_plan(path: str, *, out: str | None = None) -> Plan:
    """Read and validate a plan file (see PLAN_KEYS); relative paths are relative to the plan file."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise PlanError(f"plan file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise PlanError(f"plan file {path} is not valid YAML: {exc}") from exc
    return parse_plan(raw, base_dir=os.path.dirname(os.path.abspath(path)), out=out, source=path)


def parse_plan(raw, *, base_dir: str = ".", out: str | None = None, source: str = "") -> Plan:
    raw = _check_keys(raw, PLAN_KEYS, "the plan")
    name = str(raw.get("name") or "plan")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PlanError(f"plan: name {name!r} may only use letters, digits, '.', '_' and '-'")
    teacher = _check_keys(raw.get("teacher"), {"model"}, "teacher")
    if "model" not in teacher:
        raise PlanError("plan: teacher needs model (a hub id, a local folder, or smollm2-135m)")
    teacher["model"] = _resolve_local(str(teacher["model"]), base_dir)
    data = _check_keys(raw.get("data"), DATA_KEYS, "data")
    if "dataset" in data:
        data["dataset"] = _resolve_local(str(data["dataset"]), base_dir)
    cache = _check_keys(raw.get("cache"), CACHE_KEYS, "cache")
    train = _check_keys(raw.get("train"), TRAIN_KEYS, "train")
    evaluation = _check_keys(raw.get("eval"), EVAL_KEYS, "eval")
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
            raise PlanError(f"plan: students.{sname} needs exactly one of keep_layers, model, config; got {sorted(spec) or 'none'}")
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
                raise PlanError(f"plan: paths[{i}] lists the teacher; paths start after it (teacher -> {p[-1]} is [{p[-1]}])")
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
    metrics = evaluation.get("metrics", ["ppl", "agreement"])
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",")]
    evaluation["metrics"] = list(metrics)
    from trainer.evaluate import METRICS

    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise PlanError(f"plan: eval.metrics has unknown {bad}; valid: {', '.join(METRICS)}")
    return Plan(name=name, teacher=teacher, data=data, cache=cache, train=train, students=students, paths=paths,
                baselines=baselines, eval=evaluation, out=out_dir, cache_root=cache_root, source=source)


def _resolve_local(value: str, base_dir: str) -> str:
    """Paths that start with ./ or ../ are relative to the plan file; everything else is kept."""
    if value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base_dir, value))
    return os.path.expanduser(value)


# ---------------------------------------------------------------------------------------------
# Stages


def nodes_of(plan: Plan) -> list[str]:
    """Every trained node, e.g. 'teacher>assistant>student', deduplicated, parents first."""
    seen: list[str] = []
    for p in plan.paths:
        for depth in range(1, len(p) + 1):
            node = ">".join([TEACHER, *p[:depth]])
            if node not in seen:
                seen.append(node)
    return sorted(seen, key=lambda n: (n.count(">"), seen.index(n)))


def _slug(node: str) -> str:
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
    return os.path.join(plan.out, "runs", _slug(node))


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
    return os.path.join(plan.cache_root, f"{plan.name}__{_slug(node)}-{digest}")


def _marker_of(plan: Plan, kind: str, node: str) -> str:
    return os.path.join(plan.out, "stages", f"{kind}-{_slug(node)}.done.json")


def recorded_cache(plan: Plan, node: str) -> str | None:
    """The cache node's finished cache stage recorded (what `kdcache build` reported), if any."""
    try:
        with open(_marker_of(plan, "cache", node)) as f:
            recorded = json.load(f).get("cache")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and recorded else None


def cache_of(plan: Plan, node: str) -> str:
    """The cache that node's students train on: the one its cache stage recorded, else where it asks for one."""
    return recorded_cache(plan, node) or cache_dir_of(plan, node)


def stages_of(plan: Plan) -> list[Stage]:
    """The plan as an ordered list of stages; each runs as its own process."""
    stages: list[Stage] = []
    teacher_nodes = [TEACHER] + [n for n in nodes_of(plan) if any(m.startswith(n + ">") for m in nodes_of(plan))]

    def add(kind, node, command, **outputs):
        sid = f"{kind}:{_slug(node)}"
        stages.append(Stage(sid, kind, node, command, _marker_of(plan, kind, node), outputs))

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
        out_file = os.path.join(plan.out, "eval", f"{_slug(node)}.json")
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


# ---------------------------------------------------------------------------------------------
# Running


def teacher_folder(plan: Plan) -> str:
    """The root teacher's local folder: the plan's model if it is a folder, else what its cache recorded."""
    if os.path.isdir(plan.teacher["model"]):
        return plan.teacher["model"]
    cache = cache_of(plan, TEACHER)
    try:
        return _read_manifest(cache).teacher["path"]
    except (CacheError, OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot find the teacher's folder: {plan.teacher['model']} is not a folder and the teacher "
                        f"cache {cache} has no readable manifest.json ({exc})") from exc


def _read_manifest(url: str):
    from shared.format import MANIFEST_FILE
    from shared.manifest import parse_manifest
    from shared.store import open_store

    return parse_manifest(open_store(url).read_bytes(MANIFEST_FILE))


def stage_done(stage: Stage, plan: Plan | None = None) -> bool:
    """A stage is done when its marker exists; a cache stage also needs its recorded cache to be complete."""
    if not os.path.exists(stage.marker):
        return False
    if stage.kind == "cache" and plan is not None:
        return cache_state(cache_of(plan, stage.node)) == "complete"
    return True


def cache_state(url: str) -> str:
    """'complete' (manifest.json), 'partial' (build.json only) or 'missing'; url is a folder or store URL."""
    from shared.format import BUILD_FILE, MANIFEST_FILE
    from shared.store import open_store

    try:
        store = open_store(url)
        if store.exists(MANIFEST_FILE):
            return "complete"
        if store.exists(BUILD_FILE):
            return "partial"
    except (CacheError, OSError, ValueError):
        pass
    return "missing"


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


def build_report(log_text: str) -> dict | None:
    """The JSON object `kdcache build --json` printed last in a stage's log, or None when there is none.

    The log holds the build's stderr too (progress, messages), so the object is the last line that parses
    as a JSON object with a `status` and a `cache_key`.
    """
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "status" in obj and "cache_key" in obj:
            return obj
    return None


def reported_cache(plan: Plan, log_text: str) -> dict:
    """The cache a finished `kdcache build --json` reported in its log: {"cache", "cache_key", "status"}.

    `reused` names an identical cache elsewhere under the cache root, and nothing is written at --out.
    The reported cache is checked against the reported cache_key (its manifest's); if it cannot be read
    or holds another key, the cache is looked up by that key under the plan's cache root.
    """
    from shared.catalog import find_caches

    report = build_report(log_text)
    if report is None:
        raise PlanError("kdcache build finished without printing its JSON report (--json), so the chain cannot tell "
                        "which cache it built or reused; see the stage's log")
    status, url, key = report.get("status"), report.get("cache"), report.get("cache_key")
    if status not in BUILD_STATUSES or not isinstance(url, str) or not isinstance(key, str) or not key:
        raise PlanError(f"kdcache build printed a report the chain cannot read ({json.dumps(report)[:300]}); expected "
                        f"status in {BUILD_STATUSES}, cache and cache_key; see the stage's log")
    if status == "partial":
        raise PlanError(f"kdcache build left {url} partial: other workers still owe shards. Run them (or "
                        f"`kdcache finalize {url}`), then rerun the plan")
    try:
        found_key = _read_manifest(url).cache_key
    except (CacheError, OSError, ValueError):
        found_key = None
    if found_key != key:
        try:
            found = [c for c in find_caches(plan.cache_root, key_prefix=key) if c.get("complete")]
        except CacheError:
            found = []
        if not found:
            raise PlanError(f"kdcache build reported cache {url} (cache_key {key[:12]}...), but no complete cache with "
                            f"that key is there or under {plan.cache_root}; see the stage's log")
        url = plan.cache_root if found[0]["path"] == "." else f"{plan.cache_root.rstrip('/')}/{found[0]['path']}"
    return {"cache": url, "cache_key": key, "status": status}


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


# ---------------------------------------------------------------------------------------------
# Checks before any stage runs


def check_plan(plan: Plan, *, strict: bool = True) -> list[str]:
    """What can be checked before a stage runs: local teacher and data exist, model students share the tokenizer.

    Raises PlanError for a student whose tokenizer differs from the teacher's (found now, not after the
    teacher cache is built), and with strict=True for a missing local teacher folder or data file.
    Returns notes on what is missing or could not be checked (a --dry-run prints them).
    """
    notes = []
    teacher = plan.teacher["model"]
    if os.path.isabs(teacher) and not os.path.isdir(teacher):
        message = (f"teacher folder {teacher} does not exist; create it first (see the comment at the top of "
                   f"{plan.source or 'the plan'}) or pass --teacher")
        if strict:
            raise PlanError(message)
        notes.append(message)
    for where, spec in (("data", plan.data), ("eval", plan.eval)):
        dataset = spec.get("dataset")
        if dataset and os.path.isabs(dataset) and not os.path.exists(dataset):
            message = (f"{where}.dataset {dataset} does not exist; create it first (see the comment at the top of "
                       f"{plan.source or 'the plan'})")
            if strict:
                raise PlanError(message)
            notes.append(message)
    return notes + check_student_tokenizers(plan)


def _local_model_folder(model: str) -> str | None:
    """model as a local folder: itself, or its snapshot in the local Hugging Face cache; None if neither."""
    if os.path.isdir(model):
        return model
    if os.path.isabs(model) or model.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except (ValueError, OSError):  # an id the hub library refuses (HFValidationError) is simply not in the cache
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _teacher_tokenizer(plan: Plan) -> tuple[str, int, str, int | None] | None:
    """(vocab sha256, number of token ids, name, recorded tokenizer_size) of the root teacher, from its cache or
    its local folder."""
    from trainer.student import cache_token_ids

    try:
        m = _read_manifest(cache_of(plan, TEACHER))
        return (m.tokenizer["vocab_sha256"], cache_token_ids(m.tokenizer), str(m.teacher.get("name", plan.teacher["model"])),
                m.tokenizer.get("tokenizer_size"))
    except (CacheError, OSError, ValueError, KeyError):
        pass
    folder = _local_model_folder(plan.teacher["model"])
    if folder is None:
        return None
    from trainer.student import load_student_tokenizer, vocab_fingerprint

    try:
        tokenizer = load_student_tokenizer(folder)
    except (OSError, ValueError):
        return None
    # As kdcache build counts them: the tokenizer's ids (padded embedding rows beyond them are never cached).
    return vocab_fingerprint(tokenizer), len(tokenizer), plan.teacher["model"], len(tokenizer)


def _config_vocab_size(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if isinstance(vocab, int) else None


def check_student_tokenizers(plan: Plan) -> list[str]:
    """Raise PlanError if a student given by model folder / locally cached hub id has another tokenizer.

    Students built from the teacher (keep_layers) or from a config use the teacher's tokenizer, and a
    sequential path's later teachers are students, so comparing each model student with the root
    teacher covers every stage. Returns notes on students that could not be checked.
    """
    models = {name: spec["model"] for name, spec in plan.students.items() if "model" in spec}
    if not models:
        return []
    teacher = _teacher_tokenizer(plan)
    if teacher is None:
        return [(f"tokenizers not checked yet: teacher {plan.teacher['model']} is neither a local folder nor in the "
                 "local Hugging Face cache (kdtrain run checks them after the teacher cache is built)")]
    from trainer.student import check_tokenizer_matches, load_student_tokenizer

    notes = []
    for name, model in models.items():
        folder = _local_model_folder(model)
        if folder is None:
            notes.append(f"students.{name}: {model} is neither a local folder nor in the local Hugging Face cache; "
                         "its tokenizer is checked when it trains")
            continue
        try:
            tokenizer = load_student_tokenizer(folder)
        except (OSError, ValueError) as exc:
            raise PlanError(f"plan: students.{name}: {exc}") from exc
        try:
            check_tokenizer_matches(tokenizer, teacher[0], teacher[1], num_student_embeddings=_config_vocab_size(folder),
                                    student_name=name, teacher_name=teacher[2], tokenizer_size=teacher[3])
        except ValueError as exc:
            raise PlanError(f"plan: students.{name} ({model}): {exc}") from exc
    return notes


# ---------------------------------------------------------------------------------------------
# Running


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


def _run_stage(command: list[str], log_path: str, env: dict, on_line=None, poll_s: float = 0.5) -> int:
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
        rc = _run_stage(command, log_path, {**os.environ, **(env or {})}, on_line)
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
    from trainer.report import write_report

    return write_report(plan, stages)
