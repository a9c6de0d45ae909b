"""What both command-line tools do alike: the app's habits, reporting the errors a user can fix, --version.

An error meant for the user (shared.errors.UserError) or from the operating system (OSError) ends as one red
`error:` line and exit code 2; its `{field}` names are spelled as the command's flags. Anything else is a bug
and keeps its traceback. Only wiring: no library logic.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Callable, Iterator

import typer
from rich.console import Console

from cli.terminal import shown
from common.settings import flag_speller, render
from shared.errors import UserError

# -h as well as --help; help rendered by click (no `<bool>` metavars, no boxes)
APP_SETTINGS = {"add_completion": False, "no_args_is_help": True, "rich_markup_mode": None,
                "context_settings": {"help_option_names": ["-h", "--help"]}}


def fail(console: Console, message: str, code: int = 2) -> None:
    """One red line; the message may quote a cache's own text, so it is shown, never interpreted (cli.terminal)."""
    console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported(console: Console, settings: type | None = None, code: int = 2) -> Iterator[None]:
    """Errors the user can fix (UserError, OSError) as one red line and exit `code`; `{field}` spelled as the flags
    of `settings` (a settings dataclass) or as --its-name."""
    spell = flag_speller(settings) if settings is not None else None
    try:
        yield
    except UserError as exc:
        fail(console, exc.render(spell) if spell else exc.render(lambda name: "--" + name.replace("_", "-")), code)
    except OSError as exc:
        fail(console, str(exc), code)


def spelled(settings: type) -> Callable[[str], str]:
    """A library message (a log line, a warning) with its `{field}` names spelled as the flags of `settings`."""
    spell = flag_speller(settings)
    return lambda message: render(message, spell)


def version_option(tool: str) -> Callable:
    """An app callback with --version (the installed package's version, from its metadata)."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{tool} {importlib.metadata.version('kdcache')}")
            raise typer.Exit()

    def callback(version: bool = typer.Option(False, "--version", callback=show, is_eager=True,
                                              help="Print the version and exit.")) -> None:
        pass

    return callback
