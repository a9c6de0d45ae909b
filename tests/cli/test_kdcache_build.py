"""`kdcache build` (and `kdcache finalize`) through the command line, in-process with typer's CliRunner.

Every bad input must end with one red `error:` line that says what to change, exit code 2, and
nothing written at --out. The default teacher (SmolLM2-135M from its GGUF) runs for real in a test
marked `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import datasets  # noqa: F401  (imported first here: see below)
import numpy as np
import pytest
from typer.testing import CliRunner

from cacher import engine_hf
from cli.kdcache import app
from shared.reader import CacheReader
from tests.cacher.test_build import read_cache, stored_objects, write_speeches
from tests.conftest import GSM8K

runner = CliRunner()
# `datasets` gives its logger a StreamHandler on the sys.stderr of the moment it is first imported; imported inside a
# CliRunner invocation, that is the runner's buffer, closed afterwards, and the next log line then prints a logging
# traceback into another test's output. Imported above, it writes to the test session's stderr.


def one_line(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def speeches(tmp_path_factory) -> Path:
    return write_speeches(tmp_path_factory.mktemp("data") / "speeches.jsonl", num_rows=20)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _no_tokenizer(model: Path, tmp: Path) -> list[str]:
    bare = tmp / "no-tokenizer"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    return ["--model", str(bare)]


def _no_config(model: Path, tmp: Path) -> list[str]:
    bare = tmp / "no-config"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("config.json"))
    return ["--model", str(bare)]


def _empty_file(model: Path, tmp: Path) -> list[str]:
    (tmp / "empty.jsonl").write_text("")
    return ["--dataset", str(tmp / "empty.jsonl")]


def _no_rows(model: Path, tmp: Path) -> list[str]:
    (tmp / "blank.jsonl").write_text("\n\n")
    return ["--dataset", str(tmp / "blank.jsonl")]


def _malformed(model: Path, tmp: Path) -> list[str]:
    (tmp / "broken.jsonl").write_text('{"text": "to be or"}\n{"text": \n')
    return ["--dataset", str(tmp / "broken.jsonl")]


def _unsupported(model: Path, tmp: Path) -> list[str]:
    (tmp / "speech.pdf").write_text("%PDF-1.4")
    return ["--dataset", str(tmp / "speech.pdf")]


def _empty_texts(model: Path, tmp: Path) -> list[str]:
    (tmp / "texts.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    return ["--dataset", str(tmp / "texts.jsonl")]


def _damaged(name: str, content: str):
    def make(model: Path, tmp: Path) -> list[str]:
        copy = tmp / f"damaged-{name}"
        shutil.copytree(model, copy)
        (copy / name).write_text(content)
        return ["--model", str(copy)]
    return make


def _configured_dataset(model: Path, tmp: Path) -> list[str]:
    from tests.cacher.test_build import write_configured_dataset

    with GSM8K.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    return ["--dataset", str(write_configured_dataset(tmp / "gsm8k-like", rows)), "--prompt-field", "question",
            "--response-field", "answer"]


def _without_chat_template(model: Path, tmp: Path) -> list[str]:
    bare = tmp / "no-chat-template"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("chat_template*"))
    return ["--model", str(bare), "--dataset", str(GSM8K), "--prompt-field", "question", "--response-field", "answer",
            "--prompt-template", "chat"]


GSM8K_PAIRS = ["--dataset", str(GSM8K), "--prompt-field", "question", "--response-field", "answer"]
BAD_INPUTS = {
    "missing data set": (lambda m, t: ["--dataset", str(t / "nope" / "missing.jsonl")], ["no such file or folder"]),
    "unknown text field": (lambda m, t: ["--dataset", str(GSM8K), "--text-field", "body"],
                           ["--text-field 'body' is not a field of", "its fields are: question, answer"]),
    "no text field": (lambda m, t: ["--dataset", str(GSM8K)],
                      ["--text-field 'text' is not a field of", "its fields are: question, answer", "--prompt-field"]),
    "unknown prompt field": (lambda m, t: ["--dataset", str(GSM8K), "--prompt-field", "q", "--response-field",
                                           "answer"],
                             ["--prompt-field 'q' is not a field of", "its fields are: question, answer"]),
    "empty file": (_empty_file, ["is an empty file (0 bytes)"]),
    "file without rows": (_no_rows, ["has no rows"]),
    "malformed file": (_malformed, ["broken.jsonl: could not be read", "well-formed"]),
    "unsupported file type": (_unsupported, ["unsupported file type '.pdf'"]),
    "only empty texts": (_empty_texts, ["gave no sequences to train on (2 rows read, 2 skipped)"]),
    "top-k 0": (lambda m, t: ["--top-k", "0"], ["--top-k must be >= 1, got 0"]),
    "top-k above vocab": (lambda m, t: ["--top-k", "385"],
                          ["--top-k 385 is larger than the teacher's vocabulary (384); use at most 384"]),
    "max-length above context": (lambda m, t: ["--max-length", "513"],
                                 ["--max-length 513 exceeds the model's context of 512 tokens; use --max-length 512"]),
    "max-length 1": (lambda m, t: ["--max-length", "1"], ["--max-length must be >= 2"]),
    "model without tokenizer": (_no_tokenizer, ["has no tokenizer", "save_pretrained"]),
    "model without config": (_no_config, ["has no config.json"]),
    "hub id offline": (lambda m, t: ["--model", "kdcache-tests/no-such-model"],
                       ["'kdcache-tests/no-such-model' is not a local folder", "HF_HUB_OFFLINE",
                        "pass a local folder"]),
    "tail samples with vllm": (lambda m, t: ["--engine", "vllm", "--tail-samples", "8"],
                               ["--tail-samples needs the hf engine", "Pass --engine hf"]),
    "tail samples above 255": (lambda m, t: ["--tail-samples", "256"], ["--tail-samples must be in [0, 255]"]),
    "top-k + tail samples above vocab": (lambda m, t: ["--top-k", "380", "--tail-samples", "8"],
                                         ["--top-k 380 + --tail-samples 8 exceeds the teacher's vocabulary (384)"]),
    "unknown engine": (lambda m, t: ["--engine", "tpu"], ["--engine must be one of auto, hf, vllm; got 'tpu'"]),
    "unknown mode": (lambda m, t: ["--mode", "sample"], ["--mode must be one of score, generate; got 'sample'"]),
    "generate without prompts": (lambda m, t: ["--mode", "generate"], ["--mode generate needs --prompt-field"]),
    "filter in score mode": (lambda m, t: ["--filter", "gsm8k-answer"], ["--filter applies to --mode generate only"]),
    "unknown filter": (lambda m, t: ["--mode", "generate", "--dataset", str(GSM8K), "--prompt-field", "question",
                                     "--response-field", "answer", "--filter", "exact"],
                       ["--filter must be one of gsm8k-answer; got 'exact'"]),
    "tensor-parallel-size 0": (lambda m, t: ["--tensor-parallel-size", "0"],
                               ["--tensor-parallel-size must be >= 1 (GPUs per teacher), got 0"]),
    "gpu-memory-utilization 0": (lambda m, t: ["--gpu-memory-utilization", "0"],
                                 [("--gpu-memory-utilization is the fraction of GPU memory vLLM may take: it must be "
                                   "in "
                                   "(0, 1], got 0.0")]),
    "gpu-memory-utilization 1.5": (lambda m, t: ["--gpu-memory-utilization", "1.5"],
                                   [("--gpu-memory-utilization is the fraction of GPU memory vLLM may take: it must be "
                                     "in (0, 1], got 1.5")]),
    "split of a single file": (lambda m, t: ["--split", "test"],
                               ["--split test: --dataset", "is a single file, which is one split named 'train'",
                                "--split 'train[:1000]'"]),
    "split of a built-in": (lambda m, t: ["--dataset", "builtin:pydoc-topics", "--split", "test"],
                            [("--dataset builtin:pydoc-topics is a built-in data set with one split and no "
                              "configurations")]),
    "dataset config of a single file": (lambda m, t: ["--dataset-config", "main"],
                                        ["--dataset-config main: --dataset", ("is a single file, which has no "
                                                                              "configurations")]),
    "data set with configurations, none given": (_configured_dataset,
                                                 ["has several configurations: pass --dataset-config NAME",
                                                  "['main', 'socratic']"]),
    "unknown prompt template": (lambda m, t: [*GSM8K_PAIRS, "--prompt-template", "alpaca"],
                                ["--prompt-template must be one of chat, plain, minillm; got 'alpaca'"]),
    "prompt template on text data": (lambda m, t: ["--prompt-template", "minillm"],
                                     [("--prompt-template applies to prompt/response data: give --prompt-field and "
                                       "--response-field too")]),
    "input field without minillm": (lambda m, t: [*GSM8K_PAIRS, "--input-field", "answer"],
                                    ["--input-field answer is read by --prompt-template minillm only",
                                     "add --prompt-template minillm, or drop --input-field"]),
    "unknown input field": (lambda m, t: [*GSM8K_PAIRS, "--prompt-template", "minillm", "--input-field", "context"],
                            ["--input-field 'context' is not a field of", "its fields are: question, answer"]),
    "chat template the tokenizer lacks": (_without_chat_template,
                                          [("--prompt-template chat: this tokenizer has no chat template; use "
                                            "--prompt-template plain or minillm")]),
    "damaged config.json": (_damaged("config.json", "{not json"), ["config.json is not valid JSON", "save_pretrained"]),
    "damaged tokenizer.json": (_damaged("tokenizer.json", "{not json"),
                               ["could not load the tokenizer of", "JSONDecodeError", ("check its config.json and "
                                                                                       "tokenizer files")]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_args, messages = BAD_INPUTS[case]
    out = tmp_path / "root" / "cache"
    args = ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32", "--limit", "2",
            "--out", str(out), *make_args(tiny_gpt2_dir, tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = one_line(res.output)
    assert "error:" in text and "Traceback" not in text
    for message in messages:
        assert message in text
    assert not (tmp_path / "root").exists()


def test_out_that_is_a_file(tiny_gpt2_dir, speeches, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32",
                              "--limit", "2", "--out", str(out)])
    assert res.exit_code == 2
    assert f"error: --out {out} is a file, not a directory; pass a new folder path" in one_line(res.output)
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("python", ["", "/nonexistent/bin/python"])
def test_engine_vllm_without_vllm(python, tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    if python == "" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in this interpreter")
    monkeypatch.setenv("KDCACHE_VLLM_PYTHON", python)
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32",
                              "--limit", "2", "--engine", "vllm", "--out", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    text = one_line(res.output)
    expected = "vLLM is not installed here" if python == "" else f"KDCACHE_VLLM_PYTHON={python} is not an executable"
    assert expected in text
    assert "--engine hf" in text and not (tmp_path / "cache").exists()


def test_damaged_weights_are_a_clear_error(tiny_gpt2_dir, speeches, tmp_path):
    """Weights transformers cannot read (here: a truncated safetensors file): one error line, exit 2, no manifest."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    res = runner.invoke(app, ["build", "--model", str(model), "--dataset", str(speeches), "--max-length", "32",
                              "--limit", "2", "--engine", "hf", "--out", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    text = one_line(res.output)
    assert f"error: could not load model {model} (SafetensorError:" in text and "Traceback" not in text
    assert "re-save with model.save_pretrained" in text and not (tmp_path / "cache" / "manifest.json").exists()


def test_missing_vllm_result_is_one_error_line(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    """A vLLM subprocess that ends early without saying so: exit 2 and a message, not a StopIteration traceback."""
    import sys

    from cacher import build as build_module
    from cacher import engine_vllm
    from tests.cacher.test_build import _valid_rows

    def short_run(python, model_dir, sequences, settings, workdir, **kwargs):
        yield {"sequence_index": 0, **_valid_rows(len(sequences[0]), settings["top_k"])}

    monkeypatch.setattr(build_module, "vllm_problem", lambda: None)
    monkeypatch.setattr(engine_vllm, "probe_vllm_python", lambda python: ("vllm 0", None))
    monkeypatch.setattr(engine_vllm, "find_vllm_python", lambda: sys.executable)
    monkeypatch.setattr(engine_vllm, "run_vllm_subprocess", short_run)
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32",
                              "--limit", "3", "--top-k", "4", "--engine", "vllm", "--out", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    text = one_line(res.output)
    assert "error: the vLLM engine returned 1 of the 3 sequences asked for" in text and "Traceback" not in text
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_ignored_option_is_one_warning_line(tiny_gpt2_dir, speeches, tmp_path):
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32",
                              "--limit", "2", "--top-k", "4", "--engine", "hf", "--tensor-parallel-size", "2",
                              "--gpu-memory-utilization", "0.5", "--out", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: --tensor-parallel-size applies to the vllm engine only; the hf engine ignores it",
                     "warning: --gpu-memory-utilization applies to the vllm engine only; the hf engine ignores it"]
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_dataset_config_through_the_cli(tiny_gpt2_dir, speeches, tmp_path):
    args = _configured_dataset(tiny_gpt2_dir, tmp_path)
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), *args, "--dataset-config", "socratic",
                              "--max-length", "400", "--top-k", "4", "--out", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    manifest = CacheReader(str(tmp_path / "cache")).manifest
    assert manifest.dataset["config"] == "socratic" and manifest.totals["num_sequences"] == 5


def write_dolly_like(path: Path, num_rows: int = 8) -> Path:
    """databricks-dolly-15k's fields (instruction, context, response), from GSM8K rows: every other row has a
    context (a sentence, or null/'' as dolly has for open questions)."""
    with GSM8K.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(num_rows)]
    contexts = ["Use whole numbers only.", None, "Show each step on its own line.", ""]
    path.write_text("".join(json.dumps({"instruction": r["question"], "context": contexts[i % 4],
                                        "response": r["answer"], "category": "open_qa"}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def test_minillm_prompts_are_the_rouge_prompts(tiny_gpt2_dir, tmp_path):
    """--prompt-template minillm --input-field context: every cached prompt is byte-identical to the prompt
    kdtrain eval's ROUGE-L generates from (MiniLLM's template, '### Input:' when the context is non-empty),
    loss_mask covers the response (then EOS) only, and the template and field count in the cache_key."""
    from transformers import AutoTokenizer

    from common.templates import MINILLM_TEMPLATE, MINILLM_TEMPLATE_WITH_INPUT
    from trainer.evaluate import EvalConfig
    from trainer.generation_metrics import prompts_for

    data = write_dolly_like(tmp_path / "dolly.jsonl")
    pairs = ["--dataset", str(data), "--prompt-field", "instruction", "--response-field", "response",
             "--max-length", "512", "--top-k", "4"]
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), *pairs, "--prompt-template", "minillm",
                              "--input-field", "context", "--out", str(tmp_path / "minillm")])
    assert res.exit_code == 0, res.output
    reader, sequences = read_cache(tmp_path / "minillm")
    assert reader.manifest.settings["template"] == "minillm"
    assert reader.manifest.dataset["fields"] == {"prompt": "instruction", "response": "response", "input": "context"}

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    asked, references, _ = prompts_for(EvalConfig(model=str(tiny_gpt2_dir), dataset=str(data), metrics=("rouge",),
                                                  prompt_field="instruction", response_field="response",
                                                  input_field="context", max_prompt_length=510), tokenizer, "minillm")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(sequences) == len(rows) == len(asked)
    for seq in sequences:
        i, ids, p = seq["source_index"], seq["input_ids"].tolist(), seq["prompt_length"]
        row = rows[i]
        assert ids[:p] == asked[i]  # the very ids the ROUGE-L eval generates from
        want = (MINILLM_TEMPLATE_WITH_INPUT.format(instruction=row["instruction"], input=row["context"])
                if row["context"] else MINILLM_TEMPLATE.format(instruction=row["instruction"]))
        assert tokenizer.decode(ids[:p]) == want
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[p:] == response[: len(ids) - p] and references[i] == row["response"]
        positions = np.arange(len(ids))
        assert seq["loss_mask"].tolist() == ((positions >= p - 1) & (positions < len(ids) - 1)).tolist()
    assert {bool(rows[s["source_index"]]["context"]) for s in sequences} == {True, False}  # both variants

    keys = {reader.manifest.cache_key}
    for extra, template in (([], "chat"), (["--prompt-template", "plain"], "plain"),
                            (["--prompt-template", "minillm"], "minillm")):
        out = tmp_path / template / str(len(keys))
        other = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), *pairs, *extra, "--out", str(out)])
        assert other.exit_code == 0, other.output
        manifest = CacheReader(str(out)).manifest
        assert manifest.settings["template"] == template  # the default: the tokenizer's chat template
        keys.add(manifest.cache_key)
    assert len(keys) == 4  # template and input field are part of the cache_key


def test_json_report_for_every_status(tiny_gpt2_dir, speeches, tmp_path):
    """--json: stdout is exactly one JSON object (status, cache, full cache_key, counts); no summary line."""
    args = ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32", "--limit", "4",
            "--top-k", "4", "--json"]
    a, b, w = tmp_path / "root" / "a", tmp_path / "root" / "b", tmp_path / "workers" / "w"

    def report(result):
        assert result.exit_code == 0, result.output
        assert "(written now:" not in result.output  # the human summary line is not printed
        (line,) = result.stdout.splitlines()  # progress and messages go to stderr
        return json.loads(line)

    built = report(runner.invoke(app, [*args, "--out", str(a)]))
    manifest = CacheReader(str(a)).manifest
    assert built == {"status": "built", "cache": str(a), "cache_key": manifest.cache_key, "num_shards": 1,
                     "num_shards_written": 1, "num_sequences": 4, "num_tokens": manifest.totals["num_tokens"],
                     "num_bytes": manifest.totals["num_bytes"], "seconds": built["seconds"]}
    again = report(runner.invoke(app, [*args, "--out", str(a)]))
    assert (again["status"], again["cache"], again["cache_key"], again["num_shards_written"]) == (
        "already built", str(a), manifest.cache_key, 0)
    reused = report(runner.invoke(app, [*args, "--out", str(b)]))
    assert (reused["status"], reused["cache"], reused["cache_key"]) == ("reused", str(a), manifest.cache_key)
    assert not b.exists()
    partial = report(runner.invoke(app, [*args, "--shard-tokens", "40", "--num-workers", "2", "--out", str(w)]))
    assert (partial["status"], partial["cache"], partial["cache_key"]) == ("partial", str(w), manifest.cache_key)
    assert partial["num_shards"] > 1 and partial["num_sequences"] == 0  # other workers still owe shards


# ---------------------------------------------------------------------------------------------
# Where the cache goes, what is printed, what is found again


def test_default_out_and_printed_counts(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    """--out defaults to ./cache/<last path component of --model>; the data line gives every count."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["build", "--model", f"{tiny_gpt2_dir}/", "--dataset", str(speeches), "--text-field",
                              "text", "--max-length", "24", "--top-k", "4"])
    assert res.exit_code == 0, res.output
    out = Path("cache") / tiny_gpt2_dir.name
    reader, sequences = read_cache(out)
    m = reader.manifest
    num_tokens = sum(len(s["input_ids"]) for s in sequences)
    text = one_line(res.output)
    assert (f"data: 20 rows -> {len(sequences)} sequences, {num_tokens:,} tokens in 1 shards (dropped tokens: "
            f"{m.dataset['num_dropped']}, truncated: 0, skipped rows: 0)") in text
    assert f"built: {out}" in text and f"sequences {len(sequences)}" in text and f"cache_key {m.cache_key[:12]}" in text
    assert m.dataset["fields"] == {"text": "text"} and m.dataset["num_source_rows"] == 20


def test_found_again_refused_and_overwritten(tiny_gpt2_dir, speeches, tmp_path, monkeypatch):
    args = ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32", "--limit", "4",
            "--top-k", "4"]
    a, b = tmp_path / "root" / "a", tmp_path / "root" / "b"
    first = runner.invoke(app, [*args, "--out", str(a)])
    assert first.exit_code == 0 and "built: " in first.output

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although an identical cache exists")

    monkeypatch.setattr(engine_hf, "load_hf_teacher", no_teacher)
    again = runner.invoke(app, [*args, "--out", str(a)])
    assert again.exit_code == 0 and f"already built: {a}" in one_line(again.output)
    reused = runner.invoke(app, [*args, "--out", str(b)])
    assert reused.exit_code == 0, reused.output
    assert f"reused: {a}" in one_line(reused.output) and not b.exists()

    refused = runner.invoke(app, [*args, "--top-k", "5", "--out", str(a)])
    assert refused.exit_code == 2
    text = one_line(refused.output)
    assert "already holds a complete cache with another cache_key" in text and "settings.top_k: 4 -> 5" in text
    assert "--overwrite" in text and CacheReader(str(a)).manifest.top_k == 4
    monkeypatch.undo()
    replaced = runner.invoke(app, [*args, "--top-k", "5", "--out", str(a), "--overwrite"])
    assert replaced.exit_code == 0 and CacheReader(str(a)).manifest.top_k == 5


def test_two_workers_equal_one_and_finalize(tiny_gpt2_dir, speeches, tmp_path):
    """--num-workers 2 into one folder holds the same bytes as one worker; the last worker writes the manifest."""
    args = ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(speeches), "--max-length", "32", "--limit", "10",
            "--top-k", "4", "--shard-tokens", "70", "--no-reuse"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert runner.invoke(app, [*args, "--out", str(one)]).exit_code == 0
    num_shards = len(CacheReader(str(one)).shards)
    assert num_shards >= 4

    worker0 = runner.invoke(app, [*args, "--out", str(two), "--num-workers", "2", "--worker", "0"])
    assert worker0.exit_code == 0 and "partial:" in worker0.output
    assert "shards still owed by other workers" in one_line(worker0.output)
    assert not (two / "manifest.json").exists()
    assert sorted(int(p.parent.name[-5:]) for p in two.glob("shards/*/commit.json")) == list(range(0, num_shards, 2))
    early = runner.invoke(app, ["finalize", str(two)])
    assert early.exit_code == 2 and "not every planned shard is committed yet" in one_line(early.output)
    assert not (two / "manifest.json").exists()

    worker1 = runner.invoke(app, [*args, "--out", str(two), "--num-workers", "2", "--worker", "1"])
    assert worker1.exit_code == 0 and f"built: {two}" in one_line(worker1.output)
    assert stored_objects(one) == stored_objects(two)  # every array, meta table and commit file, byte for byte
    _, a = read_cache(one)
    _, b = read_cache(two)
    assert [(s["source_index"], s["window_index"]) for s in a] == [(s["source_index"], s["window_index"]) for s in b]

    manifest = (two / "manifest.json").read_bytes()
    (two / "manifest.json").unlink()
    finalized = runner.invoke(app, ["finalize", str(two)])
    assert finalized.exit_code == 0 and f"complete: {num_shards} shards" in finalized.output
    assert (two / "manifest.json").read_bytes() == manifest


# ---------------------------------------------------------------------------------------------
# The default teacher, for real


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_smollm2_on_the_builtin_corpus(tmp_path_factory, tmp_path, monkeypatch):
    """`kdcache build --limit 4 --max-length 64`: SmolLM2-135M (converted once into KDCACHE_HOME) over pydoc topics."""
    if not os.environ.get("KDCACHE_HOME"):
        monkeypatch.setenv("KDCACHE_HOME", str(tmp_path_factory.getbasetemp() / "kdcache-home"))
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["build", "--limit", "4", "--max-length", "64"])
    assert res.exit_code == 0, res.output
    assert "built: cache/smollm2-135m" in one_line(res.output)
    reader, sequences = read_cache(tmp_path / "cache" / "smollm2-135m")
    m = reader.manifest
    assert (m.vocab_size, m.top_k, m.settings["max_length"]) == (49152, 64, 64)
    assert m.dataset["name"] == "builtin:pydoc-topics"
    assert m.teacher["engine"] == "hf" and m.teacher["dtype"] == "float32"
    assert len(sequences) == 4 and all(len(s["input_ids"]) <= 64 for s in sequences)
    assert 0.5 < m.totals["mean_topk_mass"] < 1.0
    targets = np.concatenate([s["target_logprob"][:-1][s["loss_mask"][:-1]] for s in sequences]).astype(np.float64)
    assert np.exp(-targets.mean()) < 60  # a working language model on English prose, not a broken conversion
    build_json = json.loads((tmp_path / "cache" / "smollm2-135m" / "build.json").read_text())
    assert build_json["teacher"]["name"] == "smollm2-135m"
