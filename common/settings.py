"""One definition per setting: settings dataclasses -> command-line options, plan sections and argv.

Each command's settings are one dataclass (nested dataclasses group fields: teacher, data, capture,
...). A field is written once, with its default, its type and its help: the string literal right under
the field (litgpt's convention), read here from the source. From that one definition this module
derives what every other place used to spell again:

- `options_of(cls)`: the flat list of `Option`s (nested groups flattened; a field's flag is its name,
  `top_k` -> `--top-k`, so names are unique across a command's groups);
- `typer_command(cls, run)`: a function whose signature Typer turns into the command's options;
- `from_values(cls, values, where)`: the dataclass from flat values (a plan section, a YAML config),
  refusing unknown keys and values of the wrong type, naming them;
- `to_argv(config)`: the flags that reproduce `config` on a command line (a plan stage's argv);
- `schema_of(cls)`: name, type, default, choices and help of every field (a plan's schema).

Field metadata (dataclasses.field(metadata=...)) can set: "flag" (another flag name), "short" (e.g.
"-m"), "cli": False (not a command-line option), "plan": False (set by the plan runner, not a plan
key), "hidden": True (not in --help). A `typing.Literal[...]` annotation gives the choices. Tuples of
str/int/float are written comma-separated on a command line.

This module knows dataclasses, typing and Typer's option objects; it knows no command.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass

from shared.errors import UserError, as_flag

SCALARS = (bool, int, float, str)


class SettingError(UserError):
    """A settings value that cannot be used; `{field}` names in the message are rendered by the reader."""


@dataclass(frozen=True)
class Option:
    """One setting as the command line and a plan see it."""

    name: str  # the field name, unique within a command ("top_k")
    path: tuple[str, ...]  # where it lives in the (nested) dataclass: ("capture", "top_k")
    kind: type  # bool, int, float, str, or tuple (of `item`)
    item: type | None  # the element type of a tuple setting
    optional: bool  # None is a valid value
    default: object  # MISSING when required
    help: str
    choices: tuple | None
    flag: str  # "--top-k"
    short: str | None
    cli: bool
    plan: bool
    hidden: bool

    @property
    def required(self) -> bool:
        return self.default is MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal written right under it} from cls's source (and its bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap(annotation) -> tuple[type, type | None, bool, tuple | None]:
    """(kind, item, optional, choices) of a field's annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"settings fields hold one type (or None), got {annotation}")
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), None, optional, choices
    if origin is tuple:
        args = typing.get_args(annotation)
        item = args[0]
        if item not in SCALARS or (len(args) == 2 and args[1] is not Ellipsis):
            raise TypeError(f"tuple settings are tuple[scalar, ...], got {annotation}")
        if typing.get_origin(item) is typing.Literal:
            raise TypeError("tuple of Literal is not supported")
        return tuple, item, optional, None
    if annotation not in SCALARS:
        raise TypeError(f"a settings field is bool, int, float, str, a Literal, a tuple of those or a dataclass; "
                        f"got {annotation}")
    return annotation, None, optional, None


@functools.cache
def options_of(cls: type) -> tuple[Option, ...]:
    """Every setting of cls, nested groups flattened in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    found: list[Option] = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            for sub in options_of(annotation):
                found.append(dataclasses.replace(sub, path=(f.name, *sub.path)))
            continue
        kind, item, optional, choices = _unwrap(annotation)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        meta = f.metadata
        found.append(Option(
            name=f.name, path=(f.name,), kind=kind, item=item, optional=optional, default=default,
            help=meta.get("help", docs.get(f.name, "")), choices=choices,
            flag=meta.get("flag", as_flag(f.name)), short=meta.get("short"), cli=meta.get("cli", True),
            plan=meta.get("plan", True), hidden=meta.get("hidden", False)))
    names = [o.name for o in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"{cls.__name__}: field names must be unique across nested groups, repeated: {duplicates}")
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Values in: plan sections, YAML configs, the command line


def _coerce(option: Option, value, where: str):
    """value as option's type, or SettingError naming where and the expected type."""
    if value is None:
        if option.optional:
            return None
        raise SettingError(f"{where} must not be empty (null); default: {option.default!r}")
    if option.kind is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_scalar(option.item, v, option, where) for v in value)
    value = _scalar(option.kind, value, option, where)
    if option.choices is not None and value not in option.choices:
        raise SettingError(f"{where} must be one of {', '.join(map(str, option.choices))}; got {value!r}")
    return value


def _scalar(kind: type, value, option: Option, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SettingError(f"{where} is true or false; got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SettingError(f"{where} is a whole number; got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{where} is a number; got {value!r}")
        return float(value)
    if isinstance(value, (dict, list, tuple)):
        raise SettingError(f"{where} is a string; got a {type(value).__name__}")
    return str(value)


def from_values(cls: type, values: dict, where: str = "", *, allow: Callable[[Option], bool] = lambda o: True,
                base: dict | None = None):
    """An instance of cls from flat {field name: value}; unknown or ill-typed keys raise SettingError.

    where prefixes names in messages ("train" -> "train.lr"); allow filters the keys accepted (a plan
    section accepts only plan keys); base holds values given elsewhere (e.g. --out set by the runner).
    The dataclass's own checks (__post_init__) run as usual.
    """
    if not isinstance(values, dict):
        raise SettingError(f"{where or 'settings'} must be a mapping of settings, got {type(values).__name__}")
    options = {o.name: o for o in options_of(cls)}
    accepted = {n for n, o in options.items() if allow(o)}
    unknown = sorted(set(values) - accepted)
    if unknown:
        raise SettingError(f"unknown setting(s) {', '.join(_named(where, u) for u in unknown)}; valid: "
                           f"{', '.join(sorted(accepted))}")
    flat = dict(base or {})
    for key, value in values.items():
        flat[key] = _coerce(options[key], value, _named(where, key))
    return build(cls, flat)


def _named(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def build(cls: type, flat: dict):
    """An instance of cls (nested groups built too) from flat {field name: value}; absent fields default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], flat)
        elif f.name in flat:
            kwargs[f.name] = flat[f.name]
    return cls(**kwargs)


def flat_values(config) -> dict:
    """{field name: value} of every setting of a (nested) settings instance."""
    out = {}
    for option in options_of(type(config)):
        value = config
        for part in option.path:
            value = getattr(value, part)
        out[option.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Values out: argv, schema


def to_argv(config, *, include: Callable[[Option], bool] = lambda o: o.cli) -> list[str]:
    """Flags that reproduce config on a command line: every setting whose value differs from its default."""
    argv: list[str] = []
    values = flat_values(config)
    for option in options_of(type(config)):
        value = values[option.name]
        if not include(option) or (option.default is not MISSING and _same(value, option.default)):
            continue
        if value is None:
            continue
        if option.kind is bool:
            argv.append(option.flag if value else "--no-" + option.flag[2:])
        elif option.kind is tuple:
            argv += [option.flag, ",".join(str(v) for v in value)]
        else:
            argv += [option.flag, _text(value)]
    return argv


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and not isinstance(a, bool)
                                              and isinstance(b, (int, float)) and not isinstance(b, bool) and a == b)


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def schema_of(cls: type, *, include: Callable[[Option], bool] = lambda o: o.plan) -> dict:
    """{field name: {type, default, choices, help}} of the settings a plan (or config file) may set."""
    out = {}
    for o in options_of(cls):
        if not include(o):
            continue
        kind = f"list of {o.item.__name__}" if o.kind is tuple else o.kind.__name__
        out[o.name] = {"type": kind + (" or null" if o.optional else ""),
                       "default": None if o.default is MISSING else o.default,
                       "required": o.required, "choices": list(o.choices) if o.choices else None, "help": o.help}
    return out


# ---------------------------------------------------------------------------------------------
# Typer


def _typer_parameter(option: Option) -> inspect.Parameter:
    import typer

    default = ... if option.required else (None if option.kind is tuple else option.default)
    names = [option.flag] if option.kind is not bool else [f"{option.flag}/--no-{option.flag[2:]}"]
    if option.short:
        names.append(option.short)
    extra = {}
    if option.kind is tuple:
        annotation = str | None
        default_text = ",".join(map(str, option.default)) if option.default not in (MISSING, None) else None
        if default_text:
            extra["show_default"] = default_text
        extra["metavar"] = "A,B,..."
    elif option.kind is bool:
        annotation = bool
    elif option.choices is not None:
        annotation = typing.Literal[option.choices]
        annotation = annotation | None if option.optional else annotation
    else:
        annotation = option.kind | None if option.optional or option.kind is str else option.kind
    info = typer.Option(default, *names, help=option.help, hidden=option.hidden, **extra)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def typer_command(cls: type, run: Callable, *, extra: tuple[inspect.Parameter, ...] = (), doc: str | None = None,
                  exclude: tuple[str, ...] = ()):
    """A function whose signature is cls's options (plus extra parameters), for `app.command()(fn)`.

    Called by Typer with the parsed values, it builds cls (its checks run) and returns
    run(config, **extra values). SettingError raised while building is re-raised with `{field}`
    names spelled as flags.
    """
    options = [o for o in options_of(cls) if o.cli and o.name not in exclude]
    parameters = [_typer_parameter(o) for o in options] + list(extra)
    extra_names = {p.name for p in extra}

    def command(**values):
        flat = {}
        for o in options:
            value = values[o.name]
            if o.kind is tuple:
                value = o.default if value is None else _coerce(o, value, o.flag)
            flat[o.name] = value
        try:
            config = build(cls, flat)
        except UserError as exc:
            raise CliError(exc.render(_flag_of(cls))) from exc
        return run(config, **{k: values[k] for k in extra_names})

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = getattr(run, "__name__", "command")
    command.__doc__ = doc if doc is not None else run.__doc__
    return command


def _flag_of(cls: type) -> Callable[[str], str]:
    flags = {o.name: o.flag for o in options_of(cls)}
    return lambda name: flags.get(name, as_flag(name))


def spell_for_plan(cls: type, section: str) -> Callable[[str], str]:
    """Render `{field}` as the plan key (section.field) of a field of cls."""
    names = {o.name for o in options_of(cls)}
    return lambda name: f"{section}.{name}" if name in names else name


class CliError(UserError):
    """A UserError whose message is already spelled for the command line."""
