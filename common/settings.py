"""One definition per setting: settings dataclasses -> command-line options, plan sections, config files and argv.

Each command's settings are one dataclass (nested dataclasses may group fields). A field is written
once, with its default, its type and its help: the string literal right under the field (litgpt's
convention), read here from the source. From that one definition this module derives what every other
place used to spell again:

- `options_of(cls)`: the flat list of `Option`s (nested groups flattened; a field's flag is its name,
  `top_k` -> `--top-k`, so names are unique across a command's groups);
- the command-line options (cli/options.py's `typer_command` builds a command from `options_of`);
- `coerce_values(cls, values)` and `build(cls, values)`: the dataclass from flat values (a plan section, a YAML
  config), refusing unknown keys and values of the wrong type, naming them;
- `to_argv(config)`: the flags that reproduce `config` on a command line (a plan stage's argv);
- `schema_of(cls)`: name, type, default, choices and help of every field (a plan's schema);
- `check_choices(config)`: every `Literal` field holds one of its choices (call it in `__post_init__`).

Field metadata (dataclasses.field(metadata=...)) can set: "flag" (another flag name), "short" (e.g.
"-m"), "cli": False (not a command-line option), "plan": False (set by the plan runner, not a plan
key), "hidden": True (not in --help), "off" (the flag that sets a bool to False; default --no-NAME, none for a bool
that is False by default), "section" (the plan section it is written in; default: the class's
`SECTION`), "identity": False (does not change what the command computes: where it writes, how it
logs). A `typing.Literal[...]` annotation gives the choices. Tuples of str/int/float are written
comma-separated on a command line. Help text and error messages may name fields as `{field}`; each
reader spells them (`--top-k` on a command line, `cache.top_k` in a plan).

This module knows dataclasses and typing; it knows no command and no command-line library.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass

from shared.errors import FIELD_RE, UserError, as_flag

SCALARS = (bool, int, float, str)
INT_RE = re.compile(r"[-+]?\d+")


class SettingError(UserError):
    """A settings value that cannot be used; `{field}` names in the message are rendered by the reader."""


class CliError(UserError):
    """A UserError whose message is already spelled for the command line (rendering leaves it as it is)."""

    def __init__(self, message: str):
        super().__init__(message, spell=lambda name: "{" + name + "}")


@dataclass(frozen=True)
class Option:
    """One setting as the command line and a plan see it."""

    name: str  # the field name, unique within a command ("top_k")
    path: tuple[str, ...]  # where it lives in the (nested) dataclass: ("capture", "top_k")
    kind: type  # bool, int, float, str, or tuple (of `item`)
    item: type | None  # the element type of a tuple setting
    optional: bool  # None is a valid value
    default: object  # MISSING when required
    help: str  # may name fields as {field}
    choices: tuple | None
    flag: str  # "--top-k"
    off_flag: str | None  # a bool's flag for False ("--no-reuse"); None for a plain flag (False by default)
    short: str | None
    cli: bool
    plan: bool
    hidden: bool
    section: str | None  # the plan section the setting is written in ("data", "cache", "train", ...)
    identity: bool  # whether it changes what the command computes (a plan stage's identity)

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
        flag = meta.get("flag", as_flag(f.name))
        off_flag = meta.get("off", "--no-" + flag[2:]) if kind is bool and default is not False else None
        found.append(Option(
            name=f.name, path=(f.name,), kind=kind, item=item, optional=optional, default=default,
            help=meta.get("help", docs.get(f.name, "")), choices=choices,
            flag=flag, off_flag=off_flag, short=meta.get("short"), cli=meta.get("cli", True),
            plan=meta.get("plan", True), hidden=meta.get("hidden", False),
            section=meta.get("section", getattr(cls, "SECTION", None)), identity=meta.get("identity", True)))
    names = [o.name for o in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"{cls.__name__}: field names must be unique across nested groups, repeated: {duplicates}")
    return tuple(found)


def default_of(cls: type, name: str):
    """The default of cls's setting `name`, as its dataclass defines it."""
    return next(o.default for o in options_of(cls) if o.name == name)


def render(text: str, spell: Callable[[str], str]) -> str:
    """text with each {field} spelled by spell."""
    return FIELD_RE.sub(lambda m: spell(m.group(1)), text)


def flag_speller(cls: type) -> Callable[[str], str]:
    """Spell `{field}` as its command-line flag (cls's own flag names; any other name as --its-name)."""
    flags = {o.name: o.flag for o in options_of(cls)}
    return lambda name: flags.get(name, as_flag(name))


# ---------------------------------------------------------------------------------------------
# Values in: plan sections, YAML configs, the command line


def coerce_option(option: Option, value, where: str):
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
        return tuple(_scalar(option.item, v, where) for v in value)
    value = _scalar(option.kind, value, where)
    if option.choices is not None and value not in option.choices:
        raise SettingError(f"{where} must be one of {', '.join(map(str, option.choices))}; got {value!r}")
    return value


def _scalar(kind: type, value, where: str):
    """value as kind: numbers may be written as text, as on a command line (YAML reads 3e-4 as text)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SettingError(f"{where} is true or false; got {value!r}")
    if kind is int:
        if isinstance(value, str) and INT_RE.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"{where} is a whole number; got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{where} is a number; got {value!r}")
        return float(value)
    if isinstance(value, (dict, list, tuple)):
        raise SettingError(f"{where} is a string; got a {type(value).__name__}")
    return str(value)


def coerce_values(cls: type, values: dict, where: str = "", *, allow: Callable[[Option], bool] = lambda o: True,
                  spell: Callable[[str], str] | None = None) -> dict:
    """{field name: value as the field's type} of a flat mapping; SettingError for unknown or ill-typed keys.

    where prefixes names in messages ("train" -> "train.lr"), or spell names each key; allow filters the keys
    accepted (a plan section accepts only plan keys).
    """
    name_of = spell or (lambda key: f"{where}.{key}" if where else key)
    if not isinstance(values, dict):
        raise SettingError(f"{where or 'settings'} must be a mapping of settings, got {type(values).__name__}")
    options = {o.name: o for o in options_of(cls)}
    accepted = {n for n, o in options.items() if allow(o)}
    unknown = sorted(set(map(str, values)) - accepted)
    if unknown:
        raise SettingError(f"unknown setting(s) {', '.join(name_of(u) for u in unknown)}; valid: "
                           f"{', '.join(sorted(accepted))}")
    return {key: coerce_option(options[key], value, name_of(key)) for key, value in values.items()}


def build(cls: type, flat: dict):
    """An instance of cls (nested groups built too) from flat {field name: value}; absent fields default."""
    missing = [o.name for o in options_of(cls) if o.required and o.name not in flat]
    if missing:
        raise SettingError(" and ".join("{" + name + "}" for name in missing) + " must be given")
    return _build(cls, flat)


def _build(cls: type, flat: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], flat)
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


def check_choices(config, error: type[UserError] = SettingError) -> None:
    """`error` (a UserError class) naming the first Literal field whose value is not one of its choices."""
    values = flat_values(config)
    for option in options_of(type(config)):
        value = values[option.name]
        if option.choices is not None and value not in option.choices and not (value is None and option.optional):
            raise error("{" + option.name + "} must be one of " + ", ".join(map(str, option.choices))
                               + f"; got {value!r}")


# ---------------------------------------------------------------------------------------------
# Values out: argv, schema


def to_argv(config, *, include: Callable[[Option], bool] = lambda o: o.cli, keep: frozenset = frozenset()) -> list[str]:
    """Flags that reproduce config on a command line: every setting whose value differs from its default, and those
    named in `keep` whatever their value (a plan stage states every setting its plan gave)."""
    argv: list[str] = []
    values = flat_values(config)
    for option in options_of(type(config)):
        value = values[option.name]
        if not include(option) or (option.name not in keep and option.default is not MISSING
                                   and _same(value, option.default)):
            continue
        if option.kind is bool and not value and option.off_flag is None:
            continue  # a plain flag, off by default
        if value is None:
            continue
        if option.kind is bool:
            argv.append(option.flag if value else option.off_flag)
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


def schema_of(cls: type, *, include: Callable[[Option], bool] = lambda o: o.plan,
              spell: Callable[[str], str] = lambda name: name) -> dict:
    """{field name: {type, default, required, choices, help}} of the settings a plan (or config file) may set."""
    out = {}
    for o in options_of(cls):
        if not include(o):
            continue
        kind = f"list of {o.item.__name__}" if o.kind is tuple else o.kind.__name__
        out[o.name] = {"type": kind + (" or null" if o.optional else ""),
                       "default": None if o.default is MISSING else o.default,
                       "required": o.required, "choices": list(o.choices) if o.choices else None,
                       "help": render(o.help, spell)}
    return out
