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

from cli.progress import teacher_progress
from cli.terminal import cell, shown
from shared.catalog import describe, find_caches
from shared.format import CacheError
from shared.reader import CacheReader

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run a teacher once; cache its top-k distribution.")
console = Console(stderr=True)
stdout = Console()


def fail(message: str, code: int = 2) -> None:
    """One red line; the message may quote a cache's own text, so it is shown, never interpreted (cli.terminal)."""
    console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
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
def build(
    model: str = typer.Option(None, "--model", help="Teacher: hub id, local folder, or the embedded default smollm2-135m."),
    dataset: str = typer.Option(None, "--dataset", help="Hub name, local .jsonl/.json/.parquet/.csv/.txt file or folder, or builtin:NAME (default builtin:pydoc-topics)."),
    dataset_config: str = typer.Option(None, "--dataset-config", help="Configuration (subset) of a hub/folder data set that has several, e.g. main for openai/gsm8k."),
    split: str = typer.Option(None, "--split", help="Split (default train); a single file is the split train, sliceable as 'train[:1000]'."),
    text_field: str = typer.Option(None, "--text-field", help="Field with plain text (default 'text')."),
    prompt_field: str = typer.Option(None, "--prompt-field", help="Prompt field of prompt/response data."),
    response_field: str = typer.Option(None, "--response-field", help="Response field; only response tokens are distilled."),
    prompt_template: str = typer.Option(
        None, "--prompt-template", help="Prompt format of prompt/response data: chat (the tokenizer's chat template; the "
        "default when it has one), plain (### Instruction/### Response; the default otherwise) or minillm (MiniLLM's "
        "template, the one kdtrain eval's ROUGE-L uses)."),
    input_field: str = typer.Option(None, "--input-field", help="With --prompt-template minillm: field of its '### Input:' "
                                    "section (dolly's context); empty values use the template without it."),
    samples_from: str = typer.Option(None, "--samples-from", help="Who wrote the data's responses (e.g. a student and "
                                     "round, for kdtrain generate's samples): recorded in the cache's header and "
                                     "cache_key; shown by kdcache info."),
    mode: str = typer.Option("score", "--mode", help="score | generate"),
    top_k: int = typer.Option(64, "--top-k", help="Most likely next tokens stored per position."),
    tail_samples: int = typer.Option(
        0, "--tail-samples", help="Also store M ids drawn from the teacher's distribution outside the top K, with "
        "their counts (hf engine; docs/losses.md). E.g. --top-k 48 --tail-samples 16."),
    max_length: int = typer.Option(256, "--max-length", help="Longest sequence in tokens (text is windowed to it)."),
    engine: str = typer.Option("auto", "--engine", help="auto | vllm | hf"),
    out: str = typer.Option(None, "--out", help="Output folder or URL (default ./cache/<model name>)."),
    shard_tokens: int = typer.Option(1 << 20, "--shard-tokens", help="Rows per shard (about)."),
    worker: int = typer.Option(0, "--worker", help="This worker's index in [0, --num-workers)."),
    num_workers: int = typer.Option(1, "--num-workers", help="Workers splitting the shards."),
    limit: int = typer.Option(None, "--limit", help="Only the first N sequences (prompts in generate mode)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different or unfinished build at --out."),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Padded tokens per forward batch (hf engine)."),
    chunk_rows: int = typer.Option(8192, "--chunk-rows", help="Rows per Zarr chunk."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM: GPUs per teacher."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="vLLM: GPU memory fraction."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model repo's own code."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generate mode: longest response."),
    temperature: float = typer.Option(1.0, "--temperature", help="Generate mode: sampling temperature (0 = greedy)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Generate mode: responses per prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed of generate mode's sampling and of --tail-samples' draws."),
    filter: str = typer.Option(None, "--filter", help="Generate mode: gsm8k-answer keeps samples with the right final answer."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Return an identical complete cache (same cache_key) found beside --out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end (status, cache, cache_key, "
                                 "counts) instead of the summary line; progress and messages stay on stderr."),
):
    """Run a teacher once over a data set and write its top-K cache (resumable; see storage_layout.md)."""
    from cacher.build import BuildConfig, BuildError
    from cacher.build import build as run_build
    from cacher.engine import EngineError
    from common.datasets import DEFAULT_DATASET, DataError
    from common.models import EMBEDDED_DEFAULT, ModelError

    try:
        config = BuildConfig(
            model=model or EMBEDDED_DEFAULT, dataset=dataset or DEFAULT_DATASET, dataset_config=dataset_config,
            split=split, text_field=text_field,
            prompt_field=prompt_field, response_field=response_field, prompt_template=prompt_template,
            input_field=input_field, samples_from=samples_from, mode=mode, top_k=top_k, tail_samples=tail_samples, max_length=max_length,
            engine=engine, out=out, shard_tokens=shard_tokens, worker=worker, num_workers=num_workers, limit=limit,
            dtype=dtype, overwrite=overwrite, batch_tokens=batch_tokens, chunk_rows=chunk_rows,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, temperature=temperature,
            num_samples=num_samples, seed=seed, filter=filter, reuse=reuse,
        )
    except BuildError as exc:
        fail(str(exc))
    bar, progress = teacher_progress(console)  # a live bar on a terminal, else a line every few seconds

    try:
        with bar:
            result = run_build(config, progress=progress, log=lambda m: console.print(m, highlight=False, soft_wrap=True),
                               warn=lambda m: console.print(f"[bold yellow]warning:[/] {m}", highlight=False, soft_wrap=True))
    except (CacheError, BuildError, DataError, EngineError, ModelError, OSError, ImportError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; committed shards are kept: rerun the same command to resume", code=130)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    summary = (f"{result.status}: {result.url}  shards {result.num_shards} (written now: {result.num_shards_written})  "
               f"sequences {result.num_sequences:,}  tokens {result.num_tokens:,}  {human_bytes(result.num_bytes)}"
               f"  cache_key {result.cache_key[:12]}  {result.seconds:.1f}s")
    stdout.print(summary, highlight=False, soft_wrap=True)


@app.command()
def info(cache: str = typer.Argument(..., help="Cache folder or URL (file://, memory://, s3://...)."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")):
    """Teacher, tokenizer, data set, K, counts, bytes on disk and top-K coverage of a cache."""
    try:
        d = describe(CacheReader(cache))
    except CacheError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(d))  # JSON escapes every control character; never parsed as markup
        return
    teacher, tokenizer, dataset, settings = d["teacher"], d["tokenizer"], d["dataset"], d["settings"]
    t = Table(show_header=False, title=f"kdcache {shown(cache)}")
    rows = [
        ("teacher", f"{teacher.get('name')} ({teacher.get('dtype')}, {teacher.get('engine')} {teacher.get('engine_version')})"),
        ("tokenizer", f"{tokenizer.get('name')} (vocab {tokenizer['vocab_size']})"),
        ("dataset", f"{dataset.get('name')} split={dataset.get('split')} mode={settings['mode']}"),
        ("top_k / max_length", f"{settings['top_k']} / {settings['max_length']}"),
        *([("responses written by", str(d["dataset"]["samples_from"]))] if d["dataset"].get("samples_from") else []),
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
    try:
        reader = CacheReader(cache, check_sizes=False)
        problems = reader.verify(bookkeeping=True, rows=True)
    except CacheError as exc:
        fail(str(exc), code=1)
    if problems:
        for p in problems:
            console.print(f"[red]BAD[/] {shown(p)}", highlight=False, soft_wrap=True)
        bad = sorted({p.shard for p in problems})
        console.print(f"[bold red]{len(problems)} problem(s) in {len(bad)} shard(s): {shown(', '.join(bad))}[/]",
                      soft_wrap=True)
        content = sorted({p.shard for p in problems if not p.object.endswith(("commit.json", "build.json", "owner.json"))})
        if content:
            console.print(f"To repair: delete {shown(cache)}/manifest.json and the commit.json of {shown(', '.join(content))}, "
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
    from shared.errors import UserError, as_flag

    try:
        report = check_against_teacher(cache, num_rows=rows, seed=seed, model=model,
                                       log=lambda line: console.print(shown(line), highlight=False, soft_wrap=True))
    except UserError as exc:
        fail(exc.render(as_flag), code=1)
    except (CacheError, OSError) as exc:
        fail(str(exc), code=1)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)
    checked = f"{len(report.rows)} row(s) (seed {report.seed}) recomputed with {report.model} ({report.engine}, {report.dtype})"
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
    try:
        found = find_caches(root, key_prefix=key)
    except CacheError as exc:
        fail(str(exc))
    if as_json:
        for s in found:
            typer.echo(json.dumps(s))  # JSON escapes every control character; never parsed as markup
        return
    if not found:
        console.print(f"no caches under {shown(root)}", highlight=False)
        return
    t = Table(title=f"caches under {shown(root)}")
    for col in ("path", "state", "teacher", "dataset", "K", "tokens", "size", "cache_key"):
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
    """Write manifest.json once every planned shard is committed (after `--num-workers` builds)."""
    from shared.writer import finalize_cache

    try:
        manifest = finalize_cache(cache)
    except CacheError as exc:
        fail(str(exc))
    if manifest is None:
        fail(f"{cache}: not every planned shard is committed yet; run the missing workers first")
    stdout.print(f"complete: {len(manifest.shards)} shards, cache_key {manifest.cache_key[:12]}", highlight=False)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":
    app()
