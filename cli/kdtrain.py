"""`kdtrain`: train students from teacher caches, evaluate them, run distillation plans, the demo.

Only wiring: parse arguments, call one library function, print. Errors the user can fix become a
red one-line message and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import typer
from rich.console import Console
from rich.table import Table

from cli import terminal

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train students from a teacher cache with sparse KD losses; evaluate; run chains.")
console = Console(stderr=True)
stdout = Console()


def fail(message: str, code: int = 2) -> None:
    """One red line; the message may quote a cache's own text, so it is shown, never interpreted (cli.terminal)."""
    console.print(f"[bold red]error:[/] {terminal.shown(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _progress_factory():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps  loss {task.fields[loss]}"),
                   TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, disable=not console.is_terminal)

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


@app.command()
def run(
    out: str = typer.Option(..., "--out", help="Output folder: the student, metrics.jsonl, run.json, checkpoints/."),
    cache: str = typer.Option(None, "--cache", help="Teacher cache (folder or URL)."),
    student: str = typer.Option(None, "--student", help="Student: hub id or local model folder."),
    student_from_teacher: bool = typer.Option(False, "--student-from-teacher", help="Student = the teacher keeping --keep-layers layers."),
    keep_layers: int = typer.Option(None, "--keep-layers", help="Layers kept by --student-from-teacher."),
    student_config: str = typer.Option(None, "--student-config", help="Student = random init from this JSON config."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher folder (default: the cache's teacher.path)."),
    loss: str = typer.Option("fkl", "--loss", help="fkl | rkl | jsd | skl | srkl | tvd | ce"),
    alpha: float = typer.Option(0.0, "--alpha", help="CE weight: alpha*CE + (1-alpha)*T^2*KD."),
    temperature: float = typer.Option(1.0, "--temperature", help="Distillation temperature."),
    beta: float = typer.Option(0.5, "--beta", help="JSD mixing weight."),
    skew: float = typer.Option(0.1, "--skew", help="Skew of skl/srkl."),
    target_bucket: bool = typer.Option(True, "--target-bucket/--no-target-bucket",
                                       help="The real next token gets its own bucket when outside the top K."),
    tail_samples: bool = typer.Option(True, "--tail-samples/--no-tail-samples",
                                      help="With --loss fkl, use the cache's tail samples (built with kdcache build "
                                      "--tail-samples) in place of the rest bucket."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs over the data); may grow on --resume (extra steps at the final LR)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data when --steps is not given."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="Padded tokens (rows x longest) per micro-batch per rank."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clip (0 = off)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack sequences into rows of the data's longest sequence "
                              "when the student keeps them apart (checked on it); off: one padded sequence per row."),
    compile_: str = typer.Option("auto", "--compile", help="torch.compile the student's forward: auto (CUDA only), on, off."),
    data_workers: int = typer.Option(None, "--data-workers", help="Processes reading and collating batches (0: a thread; "
                                     "default 4 on CUDA, 0 on a CPU)."),
    peak_tflops: float = typer.Option(None, "--peak-tflops", help="The device's peak TFLOP/s for the logged MFU (default: "
                                      "the data-sheet bf16 figure of a known GPU under --bf16)."),
    seed: int = typer.Option(0, "--seed", help="Data order and init seed."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps and at step 0 (0: only at the end)."),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", help="Held-out fraction of sequences."),
    log_every: int = typer.Option(1, "--log-every", help="Metrics line every N steps."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out (same settings); without one, start that run over."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out that holds a kdtrain run."),
    dataset: str = typer.Option(None, "--dataset", help="No-cache path: data set for plain CE (--loss ce)."),
    split: str = typer.Option(None, "--split", help="No-cache path: split."),
    text_field: str = typer.Option(None, "--text-field", help="No-cache path: text field."),
    prompt_field: str = typer.Option(None, "--prompt-field", help="No-cache path: prompt field."),
    response_field: str = typer.Option(None, "--response-field", help="No-cache path: response field."),
    prompt_template: str = typer.Option(None, "--prompt-template", help="No-cache path: prompt format, as kdcache build's "
                                        "(chat, plain, minillm; default chat when the tokenizer has one, else plain)."),
    input_field: str = typer.Option(None, "--input-field", help="No-cache path: with --prompt-template minillm, the field "
                                    "of its '### Input:' section (dolly's context)."),
    max_length: int = typer.Option(256, "--max-length", help="No-cache path: window length."),
    limit: int = typer.Option(None, "--limit", help="No-cache path: first N source rows."),
    eval_max_sequences: int = typer.Option(64, "--eval-max-sequences", help="Held-out sequences per evaluation, at most."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard scalars to <out>/tensorboard."),
    stop_after: int = typer.Option(None, "--stop-after", hidden=True, help="Checkpoint and stop after this step (as if killed)."),
    trace_data: bool = typer.Option(False, "--trace-data", hidden=True, help="Write each rank's sequence ids to <out>/trace/."),
    skip_nonfinite: int = typer.Option(0, "--skip-nonfinite", help="Skip up to N steps whose loss or gradient norm is "
                                       "not finite (counted in metrics.jsonl) before stopping; 0: the first one stops the run."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute each layer's "
                                                "activations in the backward pass instead of keeping them, for students "
                                                "that do not fit otherwise (same loss and gradients, about one more "
                                                "forward per step)."),
):
    """Train a student from a teacher cache with a sparse KD loss (or plain CE on a data set)."""
    from common.datasets import DataError
    from shared.format import CacheError
    from trainer.train import TrainConfig, TrainError, train

    try:
        config = TrainConfig(
            out=out, cache=cache, student=student, student_from_teacher=student_from_teacher, keep_layers=keep_layers,
            student_config=student_config, teacher=teacher, loss=loss, alpha=alpha, temperature=temperature, beta=beta,
            skew=skew, target_bucket=target_bucket, tail_samples=tail_samples, steps=steps, epochs=epochs, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
            batch_tokens=batch_tokens, grad_accum=grad_accum, clip=clip, bf16=bf16, seed=seed, eval_every=eval_every,
            eval_fraction=eval_fraction, log_every=log_every, save_every=save_every, resume=resume, overwrite=overwrite,
            dataset=dataset, split=split, text_field=text_field, prompt_field=prompt_field, response_field=response_field,
            prompt_template=prompt_template, input_field=input_field, max_length=max_length, limit=limit,
            eval_max_sequences=eval_max_sequences, tensorboard=tensorboard, stop_after=stop_after, trace_data=trace_data,
            skip_nonfinite=skip_nonfinite, pack=pack, compile=compile_, data_workers=data_workers,
            peak_tflops=peak_tflops, gradient_checkpointing=gradient_checkpointing,
        )
        bar, progress = _progress_factory()
        with bar:
            summary = train(config, progress=progress,
                            log=lambda m: console.print(terminal.shown(m), highlight=False, soft_wrap=True))  # may quote a cache
    except (TrainError, CacheError, DataError, ValueError, OSError) as exc:
        fail(str(exc))
    if summary.get("status") == "complete":
        final = summary["final"]
        shown = ", ".join(f"{k}={final[k]:.4g}" for k in ("loss", "eval_kl", "eval_top1_agreement", "eval_ppl") if k in final)
        stdout.print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s ({summary['tokens_per_s']:,.0f} tokens/s); "
                     f"{shown}; student saved to {out}",
                     highlight=False, soft_wrap=True)


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", help="Model folder to evaluate."),
    dataset: str = typer.Option(None, "--dataset", help="Evaluation data (ppl, rouge, gsm8k)."),
    dataset_config: str = typer.Option(None, "--dataset-config", help="Configuration of a hub data set, e.g. main for openai/gsm8k."),
    metrics: str = typer.Option("ppl", "--metrics", help="Comma-separated: ppl, agreement, rouge, gsm8k, mauve, bertscore, "
                                "acceptance, grounding."),
    cache: str = typer.Option(None, "--cache", help="Teacher cache: agreement, and ppl on its held-out rows when no --dataset."),
    teacher: str = typer.Option(None, "--teacher", help="acceptance: the teacher model folder (exact alpha, and on its "
                                "sampled continuations); without it, bounds from the cache's top-K."),
    out: str = typer.Option(None, "--out", help="Write all numbers to this JSON file."),
    split: str = typer.Option(None, "--split"),
    text_field: str = typer.Option(None, "--text-field"),
    prompt_field: str = typer.Option(None, "--prompt-field"),
    response_field: str = typer.Option(None, "--response-field"),
    input_field: str = typer.Option(None, "--input-field", help="rouge: extra input/context field."),
    max_length: int = typer.Option(512, "--max-length"),
    max_prompt_length: int = typer.Option(256, "--max-prompt-length"),
    limit: int = typer.Option(None, "--limit"),
    seeds: str = typer.Option("10,20,30,40,50", "--seeds", help="rouge: sampling seeds."),
    greedy: bool = typer.Option(False, "--greedy", help="rouge: greedy decoding."),
    batch_size: int = typer.Option(8, "--batch-size"),
    gsm8k_instruction: str = typer.Option(None, "--gsm8k-instruction",
                                          help="gsm8k: line appended to each question (default: ask for '#### N'; '' for none)."),
    bertscore_layers: int = typer.Option(None, "--bertscore-layers",
                                         help="bertscore: feature layer (default: bert_score's for a known model name, else the last)."),
    all_rows: bool = typer.Option(False, "--all-rows", help="agreement/ppl on every cache row, not only held-out ones."),
    eval_fraction: float = typer.Option(None, "--eval-fraction", help="Held-out fraction of the cache (default: the "
                                        "evaluated run's, from its run.json, else 0.05); on a run, at most the run's."),
):
    """Evaluate a model: perplexity, agreement with a teacher cache, ROUGE-L, GSM8K, ..."""
    from common.datasets import DataError
    from shared.format import CacheError
    from trainer.evaluate import GSM8K_INSTRUCTION, EvalConfig, EvalError, evaluate

    try:
        config = EvalConfig(model=model, dataset=dataset, dataset_config=dataset_config, metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
                            cache=cache, teacher=teacher, split=split, text_field=text_field, prompt_field=prompt_field,
                            response_field=response_field, input_field=input_field, max_length=max_length,
                            max_prompt_length=max_prompt_length, limit=limit,
                            seeds=tuple(int(s) for s in seeds.split(",") if s.strip()), greedy=greedy,
                            batch_size=batch_size, heldout_only=not all_rows, eval_fraction=eval_fraction,
                            gsm8k_instruction=GSM8K_INSTRUCTION if gsm8k_instruction is None else gsm8k_instruction,
                            bertscore_layers=bertscore_layers, out=out)
        result = evaluate(config, log=lambda m: console.print(terminal.shown(m), highlight=False, soft_wrap=True))
    except (EvalError, CacheError, DataError, ValueError, OSError) as exc:
        fail(str(exc))
    table = Table(title=f"kdtrain eval {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, values in result.metrics.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "seconds":
                table.add_row(f"{metric}.{key}", f"{value:.4f}" if isinstance(value, float) else str(value))
            elif key == "skipped":
                table.add_row(f"{metric}", f"skipped: {value}")
    stdout.print(table)


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


@app.command()
def chain(
    plan: str = typer.Argument(..., help="Plan file (YAML): teacher, data, cache, train, students, paths, eval."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages and which caches exist; run nothing."),
    out: str = typer.Option(None, "--out", help="Output folder (default: the plan's out, or runs/<name>)."),
    teacher: str = typer.Option(None, "--teacher", help="Override the plan's teacher model."),
    cache_root: str = typer.Option(None, "--cache-root", help="Override the plan's cache_root."),
    as_json: bool = typer.Option(False, "--json", help="--dry-run: print JSON."),
):
    """Run a sequential/parallel distillation plan, resumably; write report.md/json and plots."""
    from orchestration.checks import check_plan
    from orchestration.plan import PlanError, load_plan
    from orchestration.runner import describe_stages, dry_run_lines, printable, run_plan

    try:
        p = load_plan(plan, out=out)
        if teacher:
            p.teacher["model"] = teacher
        if cache_root:
            p.cache_root = cache_root
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
    except (PlanError, ValueError, OSError) as exc:
        fail(str(exc))
    with open(f"{p.out}/report.md") as f:
        stdout.print(f.read(), highlight=False, soft_wrap=True, markup=False)
    stdout.print(f"report: {p.out}/report.md, {p.out}/report.json; plots: {', '.join(report.get('plots', []))}")


@app.command()
def demo(out: str = typer.Option("runs/demo", "--out", help="Output folder of the demo plan."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages; run nothing.")):
    """The embedded default: SmolLM2-135M teacher, built-in corpus, sequential vs parallel vs CE (~6 min on a 2-core CPU)."""
    from orchestration.demo import run_demo, write_demo_plan
    from orchestration.plan import PlanError, load_plan
    from orchestration.runner import describe_stages

    try:
        if dry_run:
            for r in describe_stages(load_plan(write_demo_plan(out), out=out)):
                stdout.print(f"{r['stage']}: {'done' if r['done'] else 'to run'}", highlight=False)
            return
        with _plan_progress() as (log, progress):
            report = run_demo(out, log=log, progress=progress)
    except (PlanError, ValueError, OSError) as exc:
        fail(str(exc))
    with open(f"{out}/report.md") as f:
        stdout.print(f.read(), highlight=False, soft_wrap=True, markup=False)
    stdout.print(f"report: {out}/report.md; plots: {', '.join(report.get('plots', []))}", highlight=False)


def _guarded(command):
    """A generated command (common.settings.typer_command) whose settings errors end as one red line, exit 2."""
    import functools

    from common.settings import CliError

    @functools.wraps(command)
    def run(**values):
        try:
            return command(**values)
        except CliError as exc:
            fail(str(exc))
    return run


def _make_teacher(config) -> None:
    """Make a small teacher on the spot: a tokenizer and a GPT-2/Llama trained with cross-entropy on a data set."""
    from common.datasets import DataError
    from shared.errors import UserError, as_flag
    from trainer.make_teacher import make_teacher
    from trainer.train import TrainError

    try:
        bar, progress = _progress_factory()
        with bar:
            summary = make_teacher(config, progress=progress,
                                   log=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False))
    except UserError as exc:
        fail(exc.render(as_flag))
    except (TrainError, DataError, ValueError, OSError) as exc:
        fail(str(exc))
    final = summary.get("final", {})
    stdout.print(f"teacher saved to {config.out}: {summary.get('num_parameters', 0):,} parameters, {summary['steps']} "
                 f"steps, held-out ppl {final.get('eval_ppl', float('nan')):.2f}", highlight=False, soft_wrap=True)


def _generate(config) -> None:
    """A model writes responses to a data set's prompts (an on-policy round's samples): a JSON-lines data set."""
    from common.datasets import DataError
    from shared.errors import UserError, as_flag
    from trainer.generate import generate_samples

    try:
        counts = generate_samples(config, log=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False))
    except UserError as exc:
        fail(exc.render(as_flag))
    except (DataError, ValueError, OSError) as exc:
        fail(str(exc))
    stdout.print(json.dumps({"out": config.out, **counts}), highlight=False, soft_wrap=True)


def _register_generated_commands() -> None:
    from common.settings import typer_command
    from trainer.generate import GenerateConfig
    from trainer.make_teacher import MakeTeacherConfig

    app.command("make-teacher")(_guarded(typer_command(MakeTeacherConfig, _make_teacher)))
    app.command("generate")(_guarded(typer_command(GenerateConfig, _generate)))


_register_generated_commands()


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":
    app()
