"""`kdtrain`: train students from teacher caches, evaluate them, run distillation plans, the demo.

Only wiring: parse arguments, call one library function, print. `kdtrain run` and `kdtrain eval` take the options
generated from their settings (trainer.config: TrainConfig, EvalConfig); `kdtrain run --config FILE` reads them
from a YAML file first. Errors the user can fix (shared.errors.UserError, OSError) become a red one-line message
and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import time

import typer
from rich.console import Console
from rich.table import Table

from cli import terminal
from cli.common import APP_SETTINGS, reported, spelled, version_option
from cli.common import fail as fail_on
from cli.options import typer_command
from common.settings import coerce_values
from trainer.config import EvalConfig, TrainConfig
from trainer.generate import GenerateConfig
from trainer.make_teacher import MakeTeacherConfig

app = typer.Typer(**APP_SETTINGS, help="Train students from a teacher cache with sparse KD losses; evaluate; run "
                                       "chains.")
app.callback()(version_option("kdtrain"))
console = Console(stderr=True)
stdout = Console()
for_run, for_eval = spelled(TrainConfig), spelled(EvalConfig)  # library messages with `{field}` spelled as flags


def fail(message: str, code: int = 2) -> None:
    fail_on(console, message, code)


def _progress_factory():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("steps  loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                   disable=not console.is_terminal)

    def progress(total_steps: int, start_step: int):
        task = bar.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
        last_print = [0.0]

        def tick(step: int, loss: float, tps: float):
            bar.update(task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
            if not console.is_terminal and (time.time() - last_print[0] > 10 or step == total_steps):
                last_print[0] = time.time()
                console.print(f"step {step}/{total_steps} loss {loss:.4f} {tps:,.0f} tok/s", highlight=False)
        return tick
    return bar, progress


def run(config: TrainConfig, config_file: str | None) -> None:
    """Train a student from a teacher cache with a sparse KD loss (or plain CE on a data set)."""
    from trainer.train import train

    bar, progress = _progress_factory()
    with bar:
        summary = train(config, progress=progress,  # log lines may quote a cache's text: shown, never interpreted
                        log=lambda m: console.print(terminal.shown(for_run(m)), highlight=False, soft_wrap=True))
    if summary.get("status") == "complete":
        final = summary["final"]
        figures = ", ".join(f"{k}={final[k]:.4g}" for k in ("loss", "eval_kl", "eval_top1_agreement", "eval_ppl")
                            if k in final)
        stdout.print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s ({summary['tokens_per_s']:,.0f} "
                     f"tokens/s); {figures}; student saved to {config.out}", highlight=False, soft_wrap=True)


CONFIG_OPTION = inspect.Parameter(
    "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
    default=typer.Option(None, "--config", metavar="FILE",
                         help="A YAML file of settings, one `name: value` per line with the names of the options "
                         "below (lr: 3e-4, student_from_teacher: true); options given on the command line override "
                         "it."))


def settings_file(extra: dict) -> dict:
    """The settings in `kdtrain run --config FILE` (read with a plan's bounds), typed as the command line types them."""
    from orchestration.plan import read_yaml

    path = extra["config_file"]
    if path is None:
        return {}
    return coerce_values(TrainConfig, read_yaml(path, "config file") or {}, path,
                         allow=lambda o: o.cli, spell=lambda name: f"{name} in {path}")


app.command("run")(typer_command(TrainConfig, run, extra=(CONFIG_OPTION,), base=settings_file,
                                 guard=lambda: reported(console, TrainConfig)))


def evaluate(config: EvalConfig) -> None:
    """Evaluate a model: perplexity, agreement with a teacher cache, ROUGE-L, GSM8K, MAUVE, BERTScore, draft
    acceptance, hallucination measures (docs/evaluation.md)."""
    from trainer.evaluate import evaluate as run_evaluation

    result = run_evaluation(config, log=lambda m: console.print(terminal.shown(for_eval(m)), highlight=False,
                                                                soft_wrap=True))
    table = Table(title=f"kdtrain eval {terminal.shown(config.model)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, values in result.metrics.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "seconds":
                table.add_row(f"{metric}.{key}", f"{value:.4f}" if isinstance(value, float) else str(value))
            elif key == "skipped":
                table.add_row(f"{metric}", f"skipped: {terminal.cell(value)}")
    stdout.print(table)


app.command("eval")(typer_command(EvalConfig, evaluate, guard=lambda: reported(console, EvalConfig)))


@contextlib.contextmanager
def _plan_progress():
    """(log, progress) for run_plan: stage lines printed above a live bar of stages with the running
    stage's latest log line (its own progress bar or training step) beside it."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestration.runner import printable

    with Progress(TextColumn("[bold]stages"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as bar:
        task = bar.add_task("", total=None)

        def log(message: str) -> None:
            bar.console.print(printable(message), highlight=False, soft_wrap=True, markup=False)

        def progress(finished: int, total: int, stage_id: str, line: str) -> None:
            shown = escape(printable(f"{stage_id}: {line[-90:]}" if line else stage_id))  # the bar renders markup
            bar.update(task, completed=finished, total=total, description=shown)

        yield log, progress


SET_OPTION = typer.Option(
    None, "--set", metavar="SECTION.KEY=VALUE",
    help="Set a plan value, e.g. --set train.lr=3e-4 --set data.dataset=./my.jsonl (repeatable). The value is read as "
    "YAML; a path starting with ./ or ../ is relative to the working directory. Checked as the plan's own values are.")


@app.command()
def chain(
    plan: str = typer.Argument(None, help="Plan file (YAML): teacher, data, cache, train, students, paths, eval."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages and which caches exist; run nothing."),
    out: str = typer.Option(None, "--out", help="Output folder (default: the plan's out, or runs/<name>)."),
    overrides: list[str] = SET_OPTION,
    teacher: str = typer.Option(None, "--teacher", help="The plan's teacher model (as --set teacher.model=...)."),
    cache_root: str = typer.Option(None, "--cache-root", help="The plan's cache_root (as --set cache_root=...)."),
    schema: bool = typer.Option(False, "--schema", help="Print the keys a plan's sections take (type, default, "
                                "choices, help) as JSON and exit."),
    as_json: bool = typer.Option(False, "--json", help="--dry-run: print JSON."),
):
    """Run a sequential/parallel distillation plan, resumably; write report.md/json and plots."""
    from orchestration.checks import check_plan
    from orchestration.plan import load_plan, plan_schema
    from orchestration.runner import describe_stages, dry_run_lines, printable, run_plan

    if schema:
        typer.echo(json.dumps(plan_schema(), indent=1))
        return
    if plan is None:
        fail("give a PLAN file (examples/tiny_chain.yaml is one), or --schema for the keys a plan takes")
    overrides = [*(overrides or []), *([f"teacher.model={teacher}"] if teacher else []),
                 *([f"cache_root={cache_root}"] if cache_root else [])]
    with reported(console):
        p = load_plan(plan, out=out, overrides=overrides)
        if dry_run:
            for note in check_plan(p, strict=False):  # a tokenizer mismatch or a bad setting is an error here too
                console.print(f"note: {printable(note)}", highlight=False, soft_wrap=True, markup=False)
            rows = describe_stages(p)
            if as_json:
                stdout.print_json(json.dumps(rows))
                return
            for line in dry_run_lines(p, rows):
                stdout.print(line, highlight=False, soft_wrap=True, markup=False)
            return
        with _plan_progress() as (log, progress):
            report = run_plan(p, log=log, progress=progress)
        with open(f"{p.out}/report.md") as f:
            stdout.print(f.read(), highlight=False, soft_wrap=True, markup=False)
    stdout.print(f"report: {p.out}/report.md, {p.out}/report.json; plots: {', '.join(report.get('plots', []))}",
                 highlight=False, markup=False)


@app.command()
def demo(out: str = typer.Option("runs/demo", "--out", help="Output folder of the demo plan."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages; run nothing.")):
    """The embedded default: SmolLM2-135M teacher, built-in corpus, sequential vs parallel vs CE (6-10 min on a 2-core
    CPU)."""
    from orchestration.demo import run_demo, write_demo_plan
    from orchestration.plan import load_plan
    from orchestration.runner import describe_stages

    with reported(console):
        if dry_run:
            for r in describe_stages(load_plan(write_demo_plan(out), out=out)):
                stdout.print(f"{r['stage']}: {'done' if r['done'] else 'to run'}", highlight=False)
            return
        with _plan_progress() as (log, progress):
            report = run_demo(out, log=log, progress=progress)
        with open(f"{out}/report.md") as f:
            stdout.print(f.read(), highlight=False, soft_wrap=True, markup=False)
    stdout.print(f"report: {out}/report.md; plots: {', '.join(report.get('plots', []))}", highlight=False, markup=False)


def make_teacher(config: MakeTeacherConfig) -> None:
    """Make a small teacher on the spot: a tokenizer and a GPT-2/Llama trained with cross-entropy on a data set."""
    from trainer.make_teacher import make_teacher as run_make

    bar, progress = _progress_factory()
    with bar:
        summary = run_make(config, progress=progress,
                           log=lambda m: console.print(terminal.shown(for_run(m)), highlight=False, soft_wrap=True))
    final = summary.get("final", {})
    stdout.print(f"teacher saved to {config.out}: {summary.get('num_parameters', 0):,} parameters, {summary['steps']} "
                 f"steps, held-out ppl {final.get('eval_ppl', float('nan')):.2f}", highlight=False, soft_wrap=True)


def generate(config: GenerateConfig) -> None:
    """A model writes responses to a data set's prompts (an on-policy round's samples): a JSON-lines data set."""
    from trainer.generate import generate_samples

    counts = generate_samples(config, log=lambda m: console.print(terminal.shown(m), highlight=False, soft_wrap=True))
    stdout.print(json.dumps({"out": config.out, **counts}), highlight=False, soft_wrap=True)


app.command("make-teacher")(typer_command(MakeTeacherConfig, make_teacher,
                                          guard=lambda: reported(console, MakeTeacherConfig)))
app.command("generate")(typer_command(GenerateConfig, generate, guard=lambda: reported(console, GenerateConfig)))


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":
    app()
