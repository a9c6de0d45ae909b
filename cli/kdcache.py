"""`kdcache`: build, inspect, verify and list teacher caches.

Only wiring: parse arguments, call one library function, print. `kdcache build`'s options are generated from
its settings (cacher.config.BuildConfig). Errors the user can fix (shared.errors.UserError, OSError) become a red
one-line message and exit 2 (exit 1 is reserved for `verify` finding damage); anything else keeps its traceback.
"""

from __future__ import annotations

import inspect
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from cacher.config import BuildConfig
from cli.common import APP_SETTINGS, reported, spelled, version_option
from cli.common import fail as fail_on
from cli.options import typer_command
from cli.progress import teacher_progress
from cli.terminal import cell, shown
from shared.catalog import describe, find_caches
from shared.reader import CacheReader

app = typer.Typer(**APP_SETTINGS, help="Run a teacher once; cache its top-k distribution.")
app.callback()(version_option("kdcache"))
console = Console(stderr=True)
stdout = Console()
for_build = spelled(BuildConfig)  # a library message with `{field}` names spelled as kdcache build's flags


def fail(message: str, code: int = 2) -> None:
    fail_on(console, message, code)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def build(config: BuildConfig, as_json: bool) -> None:
    """Run a teacher once over a data set and write its top-K cache (resumable; see storage_layout.md)."""
    from cacher.build import build as run_build

    bar, progress = teacher_progress(console)  # a live bar on a terminal, else a line every few seconds
    try:
        with bar:
            result = run_build(config, progress=progress,
                               log=lambda m: console.print(shown(for_build(m)), highlight=False, soft_wrap=True),
                               warn=lambda m: console.print(f"[bold yellow]warning:[/] {shown(for_build(m))}",
                                                            highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        fail("interrupted; committed shards are kept: rerun the same command to resume", code=130)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    summary = (f"{result.status}: {result.url}  shards {result.num_shards} (written now: {result.num_shards_written})  "
               f"sequences {result.num_sequences:,}  tokens {result.num_tokens:,}  {human_bytes(result.num_bytes)}"
               f"  cache_key {result.cache_key[:12]}  {result.seconds:.1f}s")
    stdout.print(summary, highlight=False, soft_wrap=True)


JSON_OPTION = inspect.Parameter(
    "as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
    default=typer.Option(False, "--json", help="Print one JSON object at the end (status, cache, cache_key, counts) "
                         "instead of the summary line; progress and messages stay on stderr."))
app.command("build")(typer_command(BuildConfig, build, extra=(JSON_OPTION,),
                                   guard=lambda: reported(console, BuildConfig)))


@app.command()
def info(cache: str = typer.Argument(..., help="Cache folder or URL (file://, memory://, s3://...)."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")):
    """Teacher, tokenizer, data set, K, counts, bytes on disk and top-K coverage of a cache."""
    with reported(console, BuildConfig):
        d = describe(CacheReader(cache))
    if as_json:
        typer.echo(json.dumps(d))  # JSON escapes every control character; never parsed as markup
        return
    teacher, tokenizer, dataset, settings = d["teacher"], d["tokenizer"], d["dataset"], d["settings"]
    t = Table(show_header=False, title=f"kdcache {shown(cache)}")
    rows = [
        ("teacher", (f"{teacher.get('name')} ({teacher.get('dtype')}, {teacher.get('engine')} "
                     f"{teacher.get('engine_version')})")),
        ("tokenizer", f"{tokenizer.get('name')} (vocab {tokenizer['vocab_size']})"),
        ("dataset", f"{dataset.get('name')} split={dataset.get('split')} mode={settings['mode']}"),
        ("top_k / max_length", f"{settings['top_k']} / {settings['max_length']}"),
        *([("responses written by", str(d["dataset"]["samples_from"]))] if d["dataset"].get("samples_from") else []),
        ("tail samples per row", str(settings.get("tail_samples", 0))),
        ("shards / sequences / tokens", f"{d['num_shards']} / {d['num_sequences']:,} / {d['num_tokens']:,}"),
        ("loss tokens", f"{d['num_loss_tokens']:,}"),
        ("bytes on disk", human_bytes(d["num_bytes"])),
        ("bytes per token", f"{d['bytes_per_token']:.2f}"),
        ("bytes per token x " + ("(K + M)" if settings.get("tail_samples") else "K"), f"{d['bytes_per_token_k']:.3f}"),
        ("mean top-K mass", f"{d['mean_topk_mass']:.4f}"),
        ("cache_key", d["cache_key"]),
        ("created", f"{d['created_at']} by kdcache {d['tool_version']}"),
    ]
    for k, v in rows:
        t.add_row(k, cell(v))  # names come from the cache: shown, never interpreted
    stdout.print(t)


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache folder or URL."),
           against_teacher: bool = typer.Option(
               False, "--against-teacher", help="Also recompute --rows rows, chosen at random, with the teacher and "
               "compare ids and log-probabilities (storage_layout.md 8.1): the only check that the rows are the "
               "teacher's."),
           model: str = typer.Option(None, "--model", help="--against-teacher: the teacher's folder (default: the "
                                     "cache's teacher.path)."),
           rows: int = typer.Option(64, "--rows", help="--against-teacher: how many rows to recompute."),
           seed: int = typer.Option(0, "--seed", help="--against-teacher: the seed that chooses the rows.")):
    """Recompute every checksum, check every zarr.json, meta file and row. Exit 0 when good; exit 1 naming every
    bad shard and object or row. With --against-teacher, also recompute rows with the teacher."""
    with reported(console, BuildConfig, code=1):
        reader = CacheReader(cache, check_sizes=False)
        problems = reader.verify(bookkeeping=True, rows=True)
    if problems:
        for p in problems:
            console.print(f"[red]BAD[/] {shown(p)}", highlight=False, soft_wrap=True)
        bad = sorted({p.shard for p in problems})
        console.print(f"[bold red]{len(problems)} problem(s) in {len(bad)} shard(s): {shown(', '.join(bad))}[/]",
                      soft_wrap=True)
        bookkeeping = ("commit.json", "build.json", "owner.json")
        content = sorted({p.shard for p in problems if not p.object.endswith(bookkeeping)})
        if content:
            console.print(f"To repair: delete {shown(cache)}/manifest.json and the commit.json of "
                          f"{shown(', '.join(content))}, "
                          "then rerun the same `kdcache build` command; it rewrites only those shards.",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    m = reader.manifest
    stdout.print(f"OK: {len(m.shards)} shards, {sum(len(s.objects) for s in m.shards)} objects, "
                 f"{human_bytes(m.totals['num_bytes'])}, {m.totals['num_tokens']:,} rows verified", highlight=False)
    if against_teacher:
        _against_teacher(cache, model=model, rows=rows, seed=seed)


def _against_teacher(cache: str, *, model: str | None, rows: int, seed: int) -> None:
    from cacher.verify_teacher import check_against_teacher

    with reported(console, code=1):
        report = check_against_teacher(cache, num_rows=rows, seed=seed, model=model,
                                       log=lambda line: console.print(shown(line), highlight=False, soft_wrap=True))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)
    checked = (f"{len(report.rows)} row(s) (seed {report.seed}) recomputed with {report.model} ({report.engine}, "
               f"{report.dtype})")
    if report.findings:
        for finding in report.findings:
            console.print(f"[red]NOT THE TEACHER'S[/] {shown(finding)}", highlight=False, soft_wrap=True)
        console.print(f"[bold red]{len(report.findings)} of {shown(checked)} disagree with the teacher beyond the "
                      "tolerance of storage_layout.md 8.1: these rows are not what the teacher computes[/]",
                      soft_wrap=True)
        raise typer.Exit(1)
    stdout.print(f"OK: {shown(checked)} agree with the teacher (largest difference of a stored log-probability "
                 f"{report.worst:.2g})", highlight=False, soft_wrap=True)


@app.command("ls")
def ls(root: str = typer.Argument("./cache", help="Folder or URL holding caches."),
       key: str = typer.Option(None, "--key", help="Only caches whose cache_key starts with this."),
       as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")):
    """One line per cache under ROOT: complete or not, teacher, data, K, tokens, size, cache_key."""
    with reported(console, BuildConfig):
        found = find_caches(root, key_prefix=key)
    if as_json:
        for s in found:
            typer.echo(json.dumps(s))  # JSON escapes every control character; never parsed as markup
        return
    if not found:
        console.print(f"no caches under {shown(root)}", highlight=False)
        return
    t = Table(title=f"caches under {shown(root)}")
    longest = max(len(cell(s["path"])) for s in found)
    t.add_column("path", no_wrap=True, min_width=longest)  # whole, never cut: paths often differ only at their end
    for col in ("state", "teacher", "dataset", "K", "tokens", "size", "cache_key"):
        t.add_column(col)
    for s in found:
        state = "complete" if s.get("complete") else (
            f"building {s.get('shards_committed')}/{s.get('shards_planned')}" if "shards_planned" in s else "broken")
        cells = (s["path"], state, s.get("teacher", "-"), s.get("dataset", "-"), s.get("top_k", "-"),
                 f"{s['num_tokens']:,}" if isinstance(s.get("num_tokens"), int) else "-",
                 human_bytes(s.get("num_bytes")) if isinstance(s.get("num_bytes"), int) else "-",
                 str(s.get("cache_key") or "-")[:12])
        t.add_row(*(cell(c) for c in cells))  # everything here was read from the caches
    stdout.print(t)
    for s in found:
        if "error" in s:
            console.print(f"[yellow]broken[/] {shown(s['path'])}: {shown(s['error'])}", highlight=False, soft_wrap=True)


@app.command()
def finalize(cache: str = typer.Argument(..., help="Cache folder or URL whose workers have all finished.")):
    """Write manifest.json once every planned shard is committed (after `--num-workers` builds of `kdcache build`)."""
    from shared.writer import finalize_cache

    with reported(console, BuildConfig):
        manifest = finalize_cache(cache)
    if manifest is None:
        fail(f"{cache}: not every planned shard is committed yet; run the missing workers first")
    stdout.print(f"complete: {len(manifest.shards)} shards, cache_key {manifest.cache_key[:12]}", highlight=False)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":
    app()
