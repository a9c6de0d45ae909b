"""A stage's settings as its command takes them, their validation, and the stage's identity.

A stage's settings are checked by the command's own settings dataclass (BuildConfig, TrainConfig,
EvalConfig): the plan's values are converted to the field types as the command line would convert them,
the dataclass is built, and its checks run; so a plan is refused before anything runs for exactly
what its stage's command would refuse, naming the plan key (`train.loss`) instead of the flag.

A stage's identity is everything that determines its output: every setting of its command after
defaults (the whole dataclass, less the fields that only say where to write or how to resume) and
the identities of its inputs: the cache key of the cache it reads (from that cache's manifest), the
identity of the teacher (its weights hash, from the teacher cache's manifest) or of the model an
earlier stage trained (that stage's identity), and local files by content (files up to
CONTENT_HASH_LIMIT bytes) or by size and modification time (larger ones). Knows the settings
dataclasses; runs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing

from orchestration.plan import CACHE_KEYS, DATA_KEYS, EVAL_KEYS, TRAIN_KEYS, PlanError

# Fields that say where a stage writes or how it resumes, not what it computes; the inputs that replace a
# path (the cache, the teacher, the model) are identified by their own identity instead.
NOT_IDENTITY = {"cache": {"out", "overwrite", "reuse", "worker", "num_workers", "model"},
                "train": {"out", "resume", "overwrite", "cache", "teacher"},
                "eval": {"out", "model", "cache", "teacher"}}
# Files up to this size are identified by their content; larger ones (model weights) by size and mtime.
CONTENT_HASH_LIMIT = 16 << 20
# Fields of a train stage that come from the plan's students section.
STUDENT_FIELDS = {"student": "model", "student_config": "config", "keep_layers": "keep_layers",
                  "student_from_teacher": "keep_layers"}


def settings_class(kind: str):
    """(settings dataclass, its error class) of a stage kind's command."""
    if kind == "cache":
        from cacher.build import BuildConfig, BuildError

        return BuildConfig, BuildError
    if kind == "train":
        from trainer.train import TrainConfig, TrainError

        return TrainConfig, TrainError
    from trainer.evaluate import EvalConfig, EvalError

    return EvalConfig, EvalError


def default_of(kind: str, name: str):
    """The default of a command's setting, as its settings dataclass defines it."""
    cls, _ = settings_class(kind)
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


def plan_key(stage, name: str) -> str:
    """Where a stage's setting comes from in the plan: 'train.loss', 'data.limit', 'students.s.keep_layers'."""
    if stage.kind == "cache":
        if name in DATA_KEYS:
            return f"data.{name}"
        return f"cache.{name}" if name in CACHE_KEYS else name
    if stage.kind == "train":
        if name in STUDENT_FIELDS:
            student = stage.node[3:] if stage.node.startswith("ce:") else stage.node.rsplit(">", 1)[-1]
            return f"students.{student}.{STUDENT_FIELDS[name]}"
        return f"train.{name}" if name in TRAIN_KEYS else name
    if name == "eval_fraction":
        return "train.eval_fraction"
    return f"eval.{name}" if name in EVAL_KEYS else name


def _convert(value, hint, where: str):
    """value as the command line would parse it into a field of type hint; PlanError naming where if it cannot."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise PlanError(f"plan: {where} must be a list or a comma-separated string, got {value!r}")
        return tuple(_convert(v, args[0], where) for v in items)
    if hint is bool:
        if not isinstance(value, bool):
            raise PlanError(f"plan: {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"[-+]?\d+", str(value)):
            raise PlanError(f"plan: {where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            number = None if isinstance(value, bool) or not isinstance(value, (int, float, str)) else float(value)
        except ValueError:
            number = None
        if number is None:
            raise PlanError(f"plan: {where} must be a number, got {value!r}")
        return number
    if hint is str and isinstance(value, (dict, list, tuple)):
        raise PlanError(f"plan: {where} must be a single value, got {value!r}")
    return str(value) if hint is str else value


def typed_settings(stage) -> dict:
    """The stage's settings converted to its settings dataclass's field types (as the command line converts)."""
    cls, _ = settings_class(stage.kind)
    hints = typing.get_type_hints(cls)
    return {k: _convert(v, hints[k], plan_key(stage, k)) for k, v in stage.settings.items()}


def validate(stage, settings: dict):
    """Build the stage's settings dataclass, so that its own checks run; PlanError naming the plan key if not.

    Placeholders for what earlier stages make (`{cache:teacher}`, `{teacher_folder}`, `{cache_dir}`) stand in
    for the path they will be: the dataclasses check values, not whether paths exist.
    """
    cls, error = settings_class(stage.kind)
    try:
        return cls(**settings)
    except error as exc:
        message = str(exc)
        found = {k: re.search(rf"(--{k.replace('_', '-')}|\b{k})\b", message) for k in settings}
        named = sorted((k for k in found if found[k]), key=lambda k: found[k].start())  # as the message names them
        where = ", ".join(plan_key(stage, k) for k in named) or f"the settings of stage {stage.id}"
        raise PlanError(f"plan: {where}: {message} (stage {stage.id})") from exc


def identity_settings(stage, config) -> dict:
    """Every setting of the stage's command after defaults, as JSON values, less the NOT_IDENTITY fields."""
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY[stage.kind]}


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
