"""A stage's settings as its command takes them, their validation, and the stage's identity.

A stage's settings are checked by the command's own settings dataclass (BuildConfig, TrainConfig,
EvalConfig): the plan's values are converted to the field types as the command line would convert them,
the dataclass is built, and its checks run; so a plan is refused before anything runs for exactly
what its stage's command would refuse, naming the plan key (`train.loss`) instead of the flag.

A stage's identity is everything that determines its output: every setting of its command after
defaults (the whole dataclass, less the fields that only say where to write or how to resume: the settings
metadata `identity: False`, whose paths are identified by their inputs' identities instead) and
the identities of its inputs: the cache key of the cache it reads (from that cache's manifest), the
identity of the teacher (its weights hash, from the teacher cache's manifest) or of the model an
earlier stage trained (that stage's identity), and local files by content (files up to
CONTENT_HASH_LIMIT bytes) or by size and modification time (larger ones). Knows the settings
dataclasses; runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os

from common.settings import build, coerce_values, flat_values, options_of
from common.settings import default_of as setting_default
from orchestration.plan import COMMAND_SETTINGS, ONPOLICY, PlanError
from shared.errors import UserError

# Files up to this size are identified by their content; larger ones (model weights) by size and mtime.
CONTENT_HASH_LIMIT = 16 << 20
# Settings of an on-policy round's generate stage written in the plan under another name or section (3.7).
GENERATE_KEYS = {"num_samples": "onpolicy.samples", "temperature": "onpolicy.sample_temperature",
                 "seed": "train.seed", "eval_fraction": "train.eval_fraction"}
# Fields of a train stage that come from the plan's students section.
STUDENT_FIELDS = {"student": "model", "student_config": "config", "keep_layers": "keep_layers",
                  "student_from_teacher": "keep_layers"}


def settings_class(kind: str) -> type:
    """The settings dataclass of a stage kind's command."""
    return COMMAND_SETTINGS[kind]


def default_of(kind: str, name: str):
    """The default of a command's setting, as its settings dataclass defines it."""
    return setting_default(settings_class(kind), name)


def student_of(node: str) -> str:
    """The student a node trains: teacher>a>s -> s, ce:s -> s, onpolicy:s and its rounds onpolicy:s@r -> s."""
    for prefix in ("ce:", ONPOLICY):
        if node.startswith(prefix):
            return node[len(prefix):].split("@", 1)[0]
    return node.rsplit(">", 1)[-1]


def plan_key(stage, name: str) -> str:
    """Where a stage's setting comes from in the plan: 'train.loss', 'data.limit', 'students.s.keep_layers'."""
    if stage.kind in ("train", "generate") and name in STUDENT_FIELDS:
        return f"students.{student_of(stage.node)}.{STUDENT_FIELDS[name]}"
    if stage.kind in ("eval", "exposure") and name == "eval_fraction":
        return "train.eval_fraction"  # an eval stage holds out the rows its train stages held out
    if stage.kind == "generate" and name in GENERATE_KEYS:
        return GENERATE_KEYS[name]
    option = next((o for o in options_of(settings_class(stage.kind)) if o.name == name), None)
    return f"{option.section}.{name}" if option is not None and option.plan else name


def typed_settings(stage) -> dict:
    """The stage's settings converted to its settings dataclass's field types (as the command line converts)."""
    try:
        return coerce_values(settings_class(stage.kind), stage.settings, spell=lambda name: plan_key(stage, name))
    except UserError as exc:
        raise PlanError(f"plan: {exc.template} (stage {stage.id})", spell=lambda name: plan_key(stage, name)) from exc


def validate(stage, settings: dict):
    """Build the stage's settings dataclass, so that its own checks run; PlanError naming the plan key if not.

    Placeholders for what earlier stages make (`{cache:teacher}`, `{teacher_folder}`, `{cache_dir}`) stand in
    for the path they will be: the dataclasses check values, not whether paths exist.
    """
    try:
        return build(settings_class(stage.kind), settings)
    except UserError as exc:
        raise PlanError(f"plan: {exc.template} (stage {stage.id})", spell=lambda name: plan_key(stage, name)) from exc


def identity_settings(stage, config) -> dict:
    """Every setting of the stage's command after defaults, as JSON values, less those that do not change what it
    computes (where it writes, how it resumes or logs: metadata identity False)."""
    values = json.loads(json.dumps(flat_values(config), default=str))
    return {o.name: values[o.name] for o in options_of(type(config)) if o.identity}


def stage_identity(kind: str, settings: dict, inputs: dict) -> str:
    """sha256 over the stage's kind, settings after defaults and inputs' identities (canonical JSON)."""
    blob = json.dumps({"kind": kind, "settings": settings, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def local_identity(value: str) -> str:
    """A model, data set or config named by a plan: local files by content (or size and mtime when larger than
    CONTENT_HASH_LIMIT), anything else (a hub id, builtin:NAME) by its name. In a folder, hidden files and
    folders are left out: tools keep their own notes there (kdcache build's .kdcache-weights-sha256.json)."""
    if os.path.isfile(value):
        return "file:" + _file_digest(value)
    if os.path.isdir(value):
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(value):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    digest.update(f"{os.path.relpath(path, value)}\0{_file_digest(path)}\n".encode())
        return "folder:" + digest.hexdigest()
    return "name:" + value


def _file_digest(path: str) -> str:
    info = os.stat(path)
    if info.st_size > CONTENT_HASH_LIMIT:
        return f"size={info.st_size},mtime_ns={info.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256=" + digest.hexdigest()


def changes(stage, old: dict, settings: dict, inputs: dict) -> list[str]:
    """What differs between a stage's recorded settings and inputs and the current ones, one line each:
    'train.loss fkl -> jsd', 'input cache 1a2b3c4d5e6f -> 9f8e7d6c5b4a'."""
    if not isinstance(old.get("settings"), dict) or not isinstance(old.get("inputs"), dict):
        return ["its marker records no settings (written by an older kdcache)"]
    lines = []
    for name in sorted(set(old["settings"]) | set(settings)):
        before, after = old["settings"].get(name, "(unset)"), settings.get(name, "(unset)")
        if before != after:
            lines.append(f"{plan_key(stage, name)} {_shown(before)} -> {_shown(after)}")
    for name in sorted(set(old["inputs"]) | set(inputs)):
        before, after = old["inputs"].get(name, "(none)"), inputs.get(name, "(none)")
        if before != after:
            source = stage.inputs.get(name, ("", ""))
            what = f" (from {source[1]})" if source[0] in ("stage", "teacher") else ""
            lines.append(f"input {name}{what} {_shown(before, 24)} -> {_shown(after, 24)}")
    return lines or ["its identity differs (same settings and inputs: written by another kdcache version)"]


def _shown(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
