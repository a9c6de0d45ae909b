"""Progress on stderr: a live bar on a terminal, one plain line every few seconds anywhere else.

A bar redrawn in place shows nothing in a file or a pipe (a log, CI, a chain's stage log) until the work
ends: `kdcache build` printed no line for 54 s of a 58 s build. When stderr is not a terminal, `LineProgress`
writes a line when the work starts, then at most one every LOG_EVERY_S seconds, and one when it is done:
sequences done of the total, tokens, tokens per second and the time left at that rate.

Only wiring: the library calls progress(total_sequences, total_tokens) -> tick(num_sequences, num_tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOG_EVERY_S = 5.0


def duration(seconds: float | None) -> str:
    """3725.2 -> '1:02:05'; '-' when unknown."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class LineProgress:
    """progress(total_sequences, total_tokens) -> tick(num_sequences, num_tokens), writing plain lines with `write`.

    A context manager that does nothing, so it stands where a rich Progress bar would (`with bar:`). clock: seconds,
    monotonic (a test passes its own).
    """

    def __init__(self, write: Callable[[str], None], *, label: str = "teacher", every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.label, self.every_s, self.clock = write, label, every_s, clock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __call__(self, total_sequences: int, total_tokens: int) -> Callable[[int, int], None]:
        start = last = self.clock()
        done = {"sequences": 0, "tokens": 0}
        self.write(f"{self.label}: {total_sequences:,} sequences, {total_tokens:,} tokens to go")

        def tick(num_sequences: int, num_tokens: int) -> None:
            nonlocal last
            done["sequences"] += num_sequences
            done["tokens"] += num_tokens
            now = self.clock()
            finished = done["sequences"] >= total_sequences
            if now - last < self.every_s and not finished:
                return
            last = now
            rate = done["tokens"] / (now - start) if now > start else None
            left = max(0, total_tokens - done["tokens"]) / rate if rate else None
            share = done["sequences"] / total_sequences if total_sequences else 1.0
            self.write(f"{self.label}: {done['sequences']:,}/{total_sequences:,} sequences ({share:.0%}), "
                       f"{done['tokens']:,} tokens, {f'{rate:,.0f}' if rate else '-'} tokens/s, "
                       f"{'done in ' + duration(now - start) if finished else 'ETA ' + duration(left)}")

        return tick


def teacher_progress(console):
    """(context manager, progress factory) for `kdcache build` on `console` (a rich Console on stderr): the rich bar
    on a terminal, LineProgress otherwise."""
    if not console.is_terminal:
        lines = LineProgress(lambda message: console.print(message, highlight=False, soft_wrap=True, markup=False))
        return lines, lines
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("seqs"),
                   TextColumn("{task.fields[tps]:>8} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console, transient=False)

    def progress(total_sequences: int, total_tokens: int):
        task = bar.add_task("score", total=total_sequences, tps="-")
        start = time.time()
        seen = [0]

        def tick(num_sequences: int, num_tokens: int):
            seen[0] += num_tokens
            rate = seen[0] / max(time.time() - start, 1e-9)
            bar.update(task, advance=num_sequences, tps=f"{rate:,.0f}")
        return tick

    return bar, progress
