"""The one root of kdcache's errors, and the errors meant for the user.

`KdError` is the root. `UserError` is an error a user can fix (a bad option, a damaged cache, a
missing file): its message says what is wrong and how to fix it, and the command-line tools print it
as one line and exit non-zero. Anything else (a bug) keeps its traceback: the CLIs catch only
`UserError` and `OSError`.

A `UserError` names settings fields, not command-line flags: `{top_k}` in its message stands for the
field `top_k`, rendered by whoever shows the message (`--top-k` on a command line, `cache.top_k` in a
plan). `str(error)` spells them as flags, the commands' way (a field's flag is its name with dashes,
common.settings). Library warnings use the same `{field}` names (`flagged` renders them).
This module is the bottom layer: it knows nothing of the CLI, the format or models.
"""

from __future__ import annotations

import re
from collections.abc import Callable

FIELD_RE = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class KdError(Exception):
    """Root of every error kdcache raises on purpose."""


class UserError(KdError):
    """An error the user can fix; the message states the problem, the limit and the fix.

    `{name}` in the message names the settings field `name`; `render` spells it for the reader, unless the error
    was made with its own `spell` (a plan's error names plan keys whoever shows it).
    """

    def __init__(self, message: str, *args, spell: Callable[[str], str] | None = None):
        super().__init__(message, *args)
        self.template = message
        self.spell = spell

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with each `{field}` replaced by spell(field) (e.g. a flag or a plan key)."""
        own = self.spell or spell
        return FIELD_RE.sub(lambda m: own(m.group(1)), self.template)

    def __str__(self) -> str:
        return self.render(as_flag)


def as_flag(name: str) -> str:
    """A settings field as its command-line flag: top_k -> --top-k."""
    return "--" + name.replace("_", "-")


def flagged(text: str) -> str:
    """text with each `{field}` written as its flag (`--top-k`)."""
    return FIELD_RE.sub(lambda m: as_flag(m.group(1)), text)
