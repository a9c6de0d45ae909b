"""A command's options generated from its settings dataclass (common.settings): `typer_command(cls, run)`.

Each field of cls becomes one option (its flag, its type, its help with `{field}` names spelled as flags, its
default); the command builds cls from the values (its checks run) and calls run(config). Optionally the values
come first from elsewhere (a config file: `base`), and options given on the command line override them. Only
wiring: knows Typer and common.settings, no command.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import typer

from common.settings import CliError, Option, build, coerce_option, flag_speller, options_of, render
from shared.errors import UserError

CONTEXT = "typer_context"  # the click context Typer passes a generated command (which options were given)




def _typer_parameter(option: Option, spell: Callable[[str], str], *, optional_required: bool) -> inspect.Parameter:
    if option.required:
        default = None if optional_required else ...
    elif option.kind is tuple and option.default is not None:
        default = ",".join(map(str, option.default))
    else:
        default = option.default
    names = [option.flag] if option.off_flag is None else [f"{option.flag}/{option.off_flag}"]
    if option.short:
        names.append(option.short)
    extra = {}
    if option.kind is tuple:
        annotation = str | None
        extra["metavar"] = "A,B,..."
    elif option.kind is bool:
        annotation = bool
    elif option.choices is not None:  # checked by the dataclass (check_choices), one message for every reader
        annotation = str | None
        extra["metavar"] = "<" + "|".join(map(str, option.choices)) + ">"
    else:
        annotation = option.kind | None if option.optional or option.kind is str or default is None else option.kind
    help_text = render(option.help, spell) + (" [required]" if option.required and optional_required else "")
    info = typer.Option(default, *names, help=help_text, hidden=option.hidden, **extra)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def typer_command(cls: type, run: Callable, *, extra: tuple[inspect.Parameter, ...] = (), doc: str | None = None,
                  exclude: tuple[str, ...] = (), base: Callable[[dict], dict] | None = None,
                  guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """A function whose signature is cls's options (plus extra parameters), for `app.command()(fn)`.

    Called by Typer with the parsed values, it builds cls (its checks run) and returns
    run(config, **extra values). base(extra values), when given, returns settings from elsewhere (a config
    file, already typed: coerce_values); options given on the command line override them, and required
    options may come from either. Everything runs inside guard() (the CLI's error reporting); a UserError
    raised while building is re-raised as a CliError with `{field}` names spelled as flags.
    """
    spell = flag_speller(cls)
    options = [o for o in options_of(cls) if o.cli and o.name not in exclude]
    parameters = [_typer_parameter(o, spell, optional_required=base is not None) for o in options] + list(extra)
    parameters.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    extra_names = {p.name for p in extra}

    def command(**values):
        context = values.pop(CONTEXT, None)
        with guard():
            given = _given(options, context) if base is not None else {o.name for o in options}
            flat = dict(base({k: values[k] for k in extra_names})) if base is not None else {}
            for o in options:
                if o.name in given:
                    value = values[o.name]
                    flat[o.name] = coerce_option(o, value, o.flag) if o.kind is tuple and value is not None else value
            try:
                config = build(cls, flat)
            except UserError as exc:
                raise CliError(exc.render(spell)) from exc
            return run(config, **{k: values[k] for k in extra_names})

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = getattr(run, "__name__", "command")
    command.__doc__ = doc if doc is not None else run.__doc__
    return command


def _given(options: list[Option], context) -> set[str]:
    """The options given on the command line (or by environment), not left at their defaults."""
    if context is None:  # called directly, not by click: every value counts
        return {o.name for o in options}
    sources = {o.name: context.get_parameter_source(o.name) for o in options}
    return {name for name, source in sources.items() if source is not None
            and source.name in ("COMMANDLINE", "ENVIRONMENT")}
