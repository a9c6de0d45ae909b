"""`kdcache`: build, inspect, verify and list teacher caches.

Only wiring: parse arguments, call one library function, print. Errors derived from
shared.format.CacheError (and the cacher's own errors) become a red one-line message and exit 2
(exit 1 is reserved for `verify` finding damage).
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from shared.catalog import describe, find_caches
from shared.format import CacheError
from shared.reader import CacheReader

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run a teacher once; cache its top-k distribution.")
console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def info(cache: str = typer.Argument(..., help="Cache folder or URL (file://, memory://, s3://...)."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")):
    """Teacher, tokenizer, data set, K, counts, bytes on disk and top-K coverage of a cache."""
    try:
        d = describe(CacheReader(cache))
    except CacheError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(d))
        return
    t = Table(show_header=False, title=f"kdcache {cache}")
    rows = [
        ("teacher", f"{d['teacher'].get('name')} ({d['teacher'].get('dtype')}, {d['teacher'].get('engine')} "
                    f"{d['teacher'].get('engine_version')})"),
        ("tokenizer", f"{d['tokenizer'].get('name')} (vocab {d['tokenizer']['vocab_size']})"),
        ("dataset", f"{d['dataset'].get('name')} split={d['dataset'].get('split')} mode={d['settings']['mode']}"),
        ("top_k / max_length", f"{d['settings']['top_k']} / {d['settings']['max_length']}"),
        ("shards / sequences / tokens", f"{d['num_shards']} / {d['num_sequences']:,} / {d['num_tokens']:,}"),
        ("loss tokens", f"{d['num_loss_tokens']:,}"),
        ("bytes on disk", human_bytes(d["num_bytes"])),
        ("bytes per token", f"{d['bytes_per_token']:.2f}"),
        ("bytes per token x K", f"{d['bytes_per_token_k']:.3f}"),
        ("mean top-K mass", f"{d['mean_topk_mass']:.4f}"),
        ("cache_key", d["cache_key"]),
        ("created", f"{d['created_at']} by kdcache {d['tool_version']}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache folder or URL.")):
    """Recompute every checksum. Exit 0 when good; exit 1 naming every bad shard and object."""
    try:
        reader = CacheReader(cache, check_sizes=False)
        problems = reader.verify()
    except CacheError as exc:
        fail(str(exc), code=1)
    if problems:
        for p in problems:
            console.print(f"[red]BAD[/] {p}", highlight=False, soft_wrap=True)
        bad = sorted({p.shard for p in problems})
        console.print(f"[bold red]{len(problems)} problem(s) in {len(bad)} shard(s): {', '.join(bad)}[/]")
        raise typer.Exit(1)
    m = reader.manifest
    out.print(f"OK: {len(m.shards)} shards, {sum(len(s.objects) for s in m.shards)} objects, "
              f"{human_bytes(m.totals['num_bytes'])} verified")


@app.command("ls")
def ls(root: str = typer.Argument("./cache", help="Folder or URL holding caches."),
       key: str = typer.Option(None, "--key", help="Only caches whose cache_key starts with this."),
       as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")):
    """One line per cache under ROOT: complete or not, teacher, data, K, tokens, size, cache_key."""
    try:
        found = find_caches(root, key_prefix=key)
    except CacheError as exc:
        fail(str(exc))
    if as_json:
        for s in found:
            out.print(json.dumps(s), soft_wrap=True)
        return
    if not found:
        console.print(f"no caches under {root}")
        return
    t = Table(title=f"caches under {root}")
    for col in ("path", "state", "teacher", "dataset", "K", "tokens", "size", "cache_key"):
        t.add_column(col)
    for s in found:
        state = "complete" if s.get("complete") else (
            f"building {s.get('shards_committed')}/{s.get('shards_planned')}" if "shards_planned" in s else "broken")
        t.add_row(s["path"], state, str(s.get("teacher", "-")), str(s.get("dataset", "-")), str(s.get("top_k", "-")),
                  f"{s['num_tokens']:,}" if s.get("num_tokens") is not None else "-", human_bytes(s.get("num_bytes")),
                  (s.get("cache_key") or "-")[:12])
    out.print(t)


@app.command()
def finalize(cache: str = typer.Argument(..., help="Cache folder or URL whose workers have all finished.")):
    """Write manifest.json once every planned shard is committed (after `--num-workers` builds)."""
    from shared.writer import finalize_cache

    try:
        manifest = finalize_cache(cache)
    except CacheError as exc:
        fail(str(exc))
    if manifest is None:
        fail(f"{cache}: not every planned shard is committed yet; run the missing workers first")
    out.print(f"complete: {len(manifest.shards)} shards, cache_key {manifest.cache_key[:12]}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
