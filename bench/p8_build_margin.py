"""P8: `kdcache build` at the margin / a bare forward of the same teacher over the same windows. Target >= 0.85.

What a fast GPU shows, a tiny teacher shows on a CPU: the per-token work a build adds to the teacher's forward
(top-K, validation, compression, writes) and its fixed start-up. Each build is a whole `kdcache build` run as a
user runs it (a subprocess: imports, tokenizer, data, teacher, shards, manifest), timed by the wall clock:
  margin tokens/s = (large tokens - small tokens) / (large build s - small build s)
  start-up s      = small build s - small tokens / margin tokens/s   (what a build costs beyond its tokens)
The bare forward is `model(input_ids).logits` in this process over the large build's windows, in batches of
--batch-tokens, with nothing else. The three run alternately --repeats times after one warm-up of each (which
also fills the build's caches under $KDCACHE_HOME); ratios are medians of per-repeat ratios.

Beside the wall clock, CPU seconds (user + system) of the build process and of its children (the compressing
processes), and of the bare forward: on a machine shared with other work the wall clock of minute-long runs
swings by 2x, the work done does not. cpu_* figures are per token at the margin, and start-up, in CPU seconds.
bare_script_startup_* is what a plain script pays before its first token (import torch and transformers, load the
tokenizer and the weights); *startup_beyond_bare_script_s is the part of a build's start-up that kdcache adds to it.

  python bench/p8_build_margin.py                     # the tiny teacher (bench.common.tiny_teacher), K=16, 65k / 280k tokens
  python bench/p8_build_margin.py --model PATH --dataset FILE
  python bench/p8_build_margin.py --baseline DIR      # + the same builds by another checkout (before/after), alternated
  OMP_NUM_THREADS=1 python bench/p8_build_margin.py   # the teacher on one core, as on a GPU host the GPU runs it and
                                                      # the other cores are left to capture and compress
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, median

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare.txt"  # 250 KB, about 110k tokens of the tiny teacher's vocabulary
DEFAULT_COPIES = 4  # the default --dataset: SHAKESPEARE four times over (about 440k tokens, enough for 280k)
BUILD_LOG_PREFIXES = ("data:", "teacher ready", "teacher:")
# `kdcache build` as its console entry runs it, then the CPU time of the process and of its children. The fork
# server of the compressing processes is stopped first (multiprocessing's own test hook), so that it waits for
# them and its children's time reaches ours.
DRIVER = """
import json, resource, sys
from multiprocessing import forkserver
from cli.kdcache import app
code = 0
try:
    app()
except SystemExit as exc:
    code = exc.code
forkserver._forkserver._stop()
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print("P8CPU " + json.dumps([u.ru_utime + u.ru_stime for u in usage]), flush=True)
sys.exit(code)
"""


# What any script that loads the teacher with transformers pays before its first token: the imports, the tokenizer
# and the weights; the floor under a build's start-up on this machine (kdcache's own share is the rest).
BARE_SCRIPT = """
import json, resource, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
usage = resource.getrusage(resource.RUSAGE_SELF)
print("P8CPU " + json.dumps([usage.ru_utime + usage.ru_stime, 0.0]), flush=True)
"""


def bare_script_startup(model: str) -> tuple[float, float]:
    """(wall s, CPU s) of BARE_SCRIPT in a fresh interpreter."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", BARE_SCRIPT, model], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"the bare transformers script failed ({run.returncode}):\n{run.stderr[-3000:]}")
    line = next(x for x in reversed(run.stdout.splitlines()) if x.startswith("P8CPU "))
    return seconds, json.loads(line[6:])[0]


def build_command(args, num_windows: int, out: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, "build", "--model", args.model, "--dataset", args.dataset,
            "--top-k", str(args.top_k), "--max-length", str(args.max_length), "--limit", str(num_windows),
            "--batch-tokens", str(args.batch_tokens), "--out", out, "--no-reuse", "--overwrite", "--json"]


def timed_build(args, num_windows: int, work: str, repo: Path = REPO) -> tuple[float, int, list[str], list[float]]:
    """(wall seconds, tokens built, the build's own timing lines, [CPU s of the build process, of its children]) of
    one fresh `kdcache build` of checkout `repo`."""
    out = tempfile.mkdtemp(prefix="build-", dir=work)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    run = subprocess.run(build_command(args, num_windows, out), cwd=repo, env=env, capture_output=True, text=True,
                         check=False)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"kdcache build ({repo}) failed ({run.returncode}):\n{run.stderr[-3000:]}")
    stdout = run.stdout.strip().splitlines()
    result = json.loads(next(line for line in reversed(stdout) if line.startswith("{")))
    cpu = json.loads(next(line for line in reversed(stdout) if line.startswith("P8CPU "))[6:])
    shutil.rmtree(out, ignore_errors=True)
    lines = [" ".join(line.split()) for line in run.stderr.splitlines() if line.strip().startswith(BUILD_LOG_PREFIXES)]
    return seconds, int(result["num_tokens"]), lines, cpu


def bare_forward(args, num_windows: int):
    """A function running the teacher's own forward over the large build's windows; and their token count."""
    import torch
    from transformers import AutoModelForCausalLM

    from cacher.engine_hf import length_sorted_batches
    from common.sequences import load_sequences
    from common.tokenizers import load_tokenizer

    if not os.environ.get("OMP_NUM_THREADS"):  # as the build's teacher does
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seqs = [s.input_ids for s in load_sequences(args.dataset, load_tokenizer(args.model), max_length=args.max_length,
                                                limit=num_windows)[0]]
    lengths = [len(s) for s in seqs]
    batches = []
    for batch in length_sorted_batches(lengths, args.batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.as_tensor(seqs[i])
            mask[row, : lengths[i]] = 1
        batches.append((ids, mask))

    def run():
        with torch.inference_mode():
            for ids, mask in batches:
                _ = model(input_ids=ids, attention_mask=mask).logits
    return run, sum(lengths)


def cpu_figures(name: str, small: list, large: list, small_tokens: int, large_tokens: int, bare_us: float) -> dict:
    """CPU per token at the margin (all processes, and the build process alone: its critical path when the others run
    on other cores), CPU start-up, and the bare forward's CPU per token over the margin's."""
    margin = [1e6 * (sum(lg) - sum(sm)) / (large_tokens - small_tokens) for sm, lg in zip(small, large)]
    main_margin = [1e6 * (lg[0] - sm[0]) / (large_tokens - small_tokens) for sm, lg in zip(small, large)]
    return {f"{name}cpu_margin_us_per_token": median(margin), f"{name}cpu_margin_main_us_per_token": median(main_margin),
            f"{name}cpu_ratio_bare_over_margin": bare_us / median(margin),
            f"{name}cpu_ratio_bare_over_margin_main": bare_us / median(main_margin),
            f"{name}cpu_startup_s": median([sum(sm) - small_tokens * m / 1e6 for sm, m in zip(small, margin)]),
            f"{name}cpu_build_small": small, f"{name}cpu_build_large": large}


def repeated_text(path: Path, copies: int) -> str:
    """A file in the temporary folder holding path's text `copies` times over (written once; the build's token cache
    keys on path, size and mtime, so an unchanged file is tokenized once across repeats)."""
    text = path.read_text(encoding="utf-8")
    out = Path(tempfile.gettempdir()) / f"kdcache-p8-{path.stem}-x{copies}.txt"
    if not out.is_file() or out.stat().st_size != copies * len(text.encode("utf-8")):
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text * copies, encoding="utf-8")
        os.replace(tmp, out)
    return str(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="teacher folder (default: bench.common.tiny_teacher(), built once)")
    ap.add_argument("--dataset", help="a text file long enough for --large-tokens (default: the repository's "
                    f"data/shakespeare.txt {DEFAULT_COPIES} times over, written to a temporary folder)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--small-tokens", type=int, default=65_000)
    ap.add_argument("--large-tokens", type=int, default=280_000)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout (e.g. `git worktree add /tmp/old COMMIT`) whose "
                    "builds run alternately with this one's; its figures are reported beside")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.dataset is None:
        args.dataset = repeated_text(SHAKESPEARE, DEFAULT_COPIES)
    if not os.path.isfile(args.dataset):
        raise SystemExit(f"--dataset {args.dataset} is not a file; pass a text file of at least --large-tokens tokens "
                         "(250 KB of English holds about 110,000 tokens of the tiny teacher's 512-id vocabulary)")
    if not 0 < args.small_tokens < args.large_tokens:
        raise SystemExit("--small-tokens must be > 0 and below --large-tokens")
    if args.model is None:
        from bench.common import tiny_teacher

        args.model = tiny_teacher()
    small, large = (math.ceil(n / args.max_length) for n in (args.small_tokens, args.large_tokens))
    bare, bare_tokens = bare_forward(args, large)
    repos = {"": REPO, **({"baseline_": args.baseline.resolve()} if args.baseline else {})}
    times = {"bare": [], "script": [], **{f"{name}{size}": [] for name in repos for size in ("small", "large")}}
    cpu = {key: [] for key in times}  # bare: CPU s; builds: [process, children] CPU s
    logs = {}
    with tempfile.TemporaryDirectory(prefix="p8-") as work:
        bare()
        for repo in repos.values():  # warm-up: fills the token and weight-hash caches, and the page cache
            timed_build(args, small, work, repo)
            timed_build(args, large, work, repo)
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            bare()
            times["bare"].append(time.perf_counter() - started)
            cpu["bare"].append(time.process_time() - started_cpu)
            seconds, used = bare_script_startup(args.model)
            times["script"].append(seconds)
            cpu["script"].append(used)
            for name, repo in repos.items():
                seconds, small_tokens, _, used = timed_build(args, small, work, repo)
                times[f"{name}small"].append(seconds)
                cpu[f"{name}small"].append(used)
                seconds, large_tokens, logs[name], used = timed_build(args, large, work, repo)
                times[f"{name}large"].append(seconds)
                cpu[f"{name}large"].append(used)
    if large_tokens < 2 * small_tokens:
        raise SystemExit(f"--dataset gave only {large_tokens:,} tokens for the large build; pass a longer text")
    bare_rate = [bare_tokens / t for t in times["bare"]]
    result = {"id": "P8", "model": args.model, "dataset": args.dataset, "top_k": args.top_k,
              "max_length": args.max_length, "small_tokens": small_tokens, "large_tokens": large_tokens,
              "repeats": args.repeats, "bare_tokens_per_s": median(bare_rate), "bare_s": times["bare"],
              "bare_cpu_us_per_token": 1e6 * median(cpu["bare"]) / bare_tokens,
              "bare_script_startup_s": median(times["script"]), "bare_script_startup_cpu_s": median(cpu["script"])}
    for name in repos:
        small_s, large_s = times[f"{name}small"], times[f"{name}large"]
        margin = [(large_tokens - small_tokens) / (tl - ts) for ts, tl in zip(small_s, large_s)]
        result.update({
            f"{name}margin_tokens_per_s": median(margin),
            f"{name}ratio_margin_over_bare": median([m / b for m, b in zip(margin, bare_rate)]),
            f"{name}ratio_end_to_end_over_bare": median([large_tokens / tl / b for tl, b in zip(large_s, bare_rate)]),
            f"{name}startup_s": median([ts - small_tokens / m for ts, m in zip(small_s, margin)]),
            f"{name}build_small_s": small_s, f"{name}build_large_s": large_s, f"{name}large_build_log": logs[name]})
        result.update(cpu_figures(name, cpu[f"{name}small"], cpu[f"{name}large"], small_tokens, large_tokens,
                                  result["bare_cpu_us_per_token"]))
        result[f"{name}startup_beyond_bare_script_s"] = result[f"{name}startup_s"] - result["bare_script_startup_s"]
        result[f"{name}cpu_startup_beyond_bare_script_s"] = (result[f"{name}cpu_startup_s"]
                                                             - result["bare_script_startup_cpu_s"])
    met = result["ratio_margin_over_bare"] >= 0.85 and result["startup_s"] < 2
    emit({**result, "target": ">= 0.85 at the margin, start-up < 2 s", "met": bool(met)}, args.json)


if __name__ == "__main__":
    main()
