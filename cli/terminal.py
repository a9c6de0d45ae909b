"""Text that reaches a terminal: anything read from a cache (or a plan) is shown, never interpreted.

A cache's teacher or data set name is data someone else wrote. Printed as it is, a control character
(ESC starts a terminal escape sequence, CR rewrites the line, a bidi override reorders it) or rich markup
(`[link=...]`, `[bold]`) would act on the reader's terminal. `shown` makes any value inert for rich:
control and format characters (newlines and tabs aside) become visible escapes (`\\x1b`, `\\u202e`), markup
brackets are escaped. A table cell holds one line: `cell` escapes newlines too.
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape


def printable(value: object) -> str:
    """str(value) with every control or format character (Unicode Cc, Cf) but newline and tab written as a visible
    escape."""
    out = []
    for char in str(value):
        if unicodedata.category(char) in ("Cc", "Cf") and char not in "\n\t":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def shown(value: object) -> str:
    """A value as text that rich prints literally: printable, with rich markup escaped."""
    return escape(printable(value))


def cell(value: object) -> str:
    """A value for one table cell: shown, with newlines and tabs escaped too."""
    return shown(str(value).replace("\n", "\\n").replace("\t", "\\t"))
