"""kdcache build on tiny models: agreement with a direct reference, resume, workers, masks, generate."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cacher.build import BuildConfig, BuildError, build
from cli.kdcache import app
from shared.reader import CacheReader
from tests.conftest import GSM8K, SHAKESPEARE

runner = CliRunner()
QUIET = {"log": lambda m: None}


def arrays(url):
    r = CacheReader(url)
    return [seq for _, _, seq in r.iter_sequences()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_build_equals_direct_reference(family, tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir
    out = str(tmp_path / "c")
    build(BuildConfig(model=str(model_dir), dataset=str(SHAKESPEARE), max_length=48, limit=6, top_k=8, out=out,
                      batch_tokens=100, reuse=False), **QUIET)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for seq in arrays(out):
        ids = torch.as_tensor(seq["input_ids"].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
        values, indices = logp.topk(8)
        got_ids = seq["topk_ids"].astype(np.int64)
        same = got_ids == indices.numpy()
        # ids differ only at near-ties
        gaps = np.abs(values.numpy()[~same] - np.take_along_axis(logp.numpy(), got_ids, 1)[~same])
        assert same.mean() > 0.99 and (gaps < 1e-3).all()
        np.testing.assert_allclose(seq["topk_logprobs"].astype(np.float32), values.numpy(), atol=5e-3, rtol=2**-8)
        target = logp[torch.arange(len(ids) - 1), ids[1:]].numpy()
        np.testing.assert_allclose(seq["target_logprob"][:-1].astype(np.float32), target, atol=5e-3, rtol=1e-3)
        tail = 1 - np.exp(values.double().numpy()).sum(-1)
        assert np.abs(np.exp(seq["tail_logprob"].astype(np.float64)) - tail).max() < 1e-3


def test_one_worker_equals_two_workers(tiny_gpt2_dir, tmp_path):
    common = {"model": str(tiny_gpt2_dir), "dataset": str(SHAKESPEARE), "max_length": 32, "limit": 20, "top_k": 4,
                  "shard_tokens": 100, "reuse": False}
    one = str(tmp_path / "one")
    build(BuildConfig(out=one, **common), **QUIET)
    two = str(tmp_path / "two")
    first = build(BuildConfig(out=two, worker=0, num_workers=2, **common), **QUIET)
    assert first.status == "partial" and not os.path.exists(os.path.join(two, "manifest.json"))
    assert build(BuildConfig(out=two, worker=1, num_workers=2, **common), **QUIET).status == "built"
    a, b = CacheReader(one), CacheReader(two)
    assert a.manifest.cache_key == b.manifest.cache_key
    for x, y in zip(arrays(one), arrays(two)):
        for k in x:
            assert np.array_equal(x[k], y[k])
    for entry_a, entry_b in zip(a.manifest.shards, b.manifest.shards):
        assert entry_a.objects == entry_b.objects  # byte-identical objects


def test_prompt_response_masks_on_gsm8k(tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "g")
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), prompt_field="question", response_field="answer",
                      max_length=400, limit=5, top_k=4, out=out, reuse=False), **QUIET)
    r = CacheReader(out)
    meta = r.meta(0).to_pydict()
    for i, (_, _, seq) in enumerate(r.iter_sequences()):
        p = meta["prompt_length"][i]
        mask = seq["loss_mask"]
        assert not mask[: p - 1].any() and mask[p - 1: len(mask) - 1].all() and not mask[-1]
    assert r.manifest.settings["template"] == "chat"


def test_generate_mode_masks_response_and_filter(tiny_gpt2_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "gen")
    res = build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), prompt_field="question", response_field="answer",
                            mode="generate", max_new_tokens=8, temperature=1.0, num_samples=2, limit=3, top_k=4,
                            max_length=256, out=out, reuse=False), **QUIET)
    assert res.num_sequences == 6
    r = CacheReader(out)
    meta = r.meta(0).to_pydict()
    assert sorted(set(meta["sample_index"])) == [0, 1]
    for i, (_, _, seq) in enumerate(r.iter_sequences()):
        p = meta["prompt_length"][i]
        assert seq["loss_mask"][p - 1: -1].all() and not seq["loss_mask"][: p - 1].any()
    # --filter gsm8k-answer keeps exactly the samples whose final answer is right
    from cacher import engine_hf

    def fake_generate(teacher, prompts, **kw):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
        good = np.asarray(tok("so #### 72")["input_ids"])
        bad = np.asarray(tok("so #### 5")["input_ids"])
        return [[good, bad] for _ in prompts]

    monkeypatch.setattr(engine_hf, "generate_hf", fake_generate)
    out2 = str(tmp_path / "filtered")
    res = build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(GSM8K), prompt_field="question", response_field="answer",
                            mode="generate", num_samples=2, limit=2, top_k=4, max_length=256, filter="gsm8k-answer",
                            out=out2, reuse=False), **QUIET)
    # only the first GSM8K row's answer is 72: one kept sample in all
    assert res.num_sequences == 1


def test_reuse_and_mismatch(tiny_gpt2_dir, tmp_path, monkeypatch):
    common = {"model": str(tiny_gpt2_dir), "dataset": str(SHAKESPEARE), "max_length": 32, "limit": 4, "top_k": 4}
    first = str(tmp_path / "root" / "a")
    build(BuildConfig(out=first, **common), **QUIET)
    assert build(BuildConfig(out=first, **common), **QUIET).status == "already built"
    from cacher import engine_hf

    monkeypatch.setattr(engine_hf, "score_batches", lambda *a, **k: pytest.fail("the teacher ran again"))
    assert build(BuildConfig(out=str(tmp_path / "root" / "b"), **common), **QUIET).status == "reused"
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--max-length", "32",
                              "--limit", "4", "--top-k", "3", "--out", first])
    assert res.exit_code == 2 and "settings.top_k: 4 -> 3" in res.output


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope/missing.jsonl"], "no such file"),
    (["--text-field", "body"], "its fields are"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "100000"], "larger than the teacher's vocabulary"),
    (["--max-length", "4096"], "exceeds the model's context"),
    (["--mode", "sample"], "--mode must be"),
    (["--engine", "tpu"], "--engine must be"),
    (["--filter", "gsm8k-answer"], "--filter applies to --mode generate only"),
])
def test_bad_inputs(tiny_gpt2_dir, tmp_path, args, message):
    base = ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(GSM8K), "--text-field", "question",
            "--limit", "2", "--out", str(tmp_path / "o")]
    if "--text-field" in args:
        base = base[: base.index("--text-field")] + base[base.index("--text-field") + 2:]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ")
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_empty_dataset_and_out_is_file_and_no_tokenizer(tiny_gpt2_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no sequences" in res.output
    f = tmp_path / "file"
    f.write_text("x")
    res = runner.invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--limit", "2",
                              "--out", str(f)])
    assert res.exit_code == 2 and "is a file" in res.output
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_gpt2_dir, bare)
    for name in os.listdir(bare):
        if "tokenizer" in name or name.endswith(".jinja"):
            os.remove(bare / name)
    res = runner.invoke(app, ["build", "--model", str(bare), "--limit", "2", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "no tokenizer" in res.output


def test_nan_teacher_commits_nothing(tiny_gpt2_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_gpt2_dir, broken)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[key][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, ["build", "--model", str(broken), "--dataset", str(SHAKESPEARE), "--limit", "2",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "NaN" in res.output
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
    assert not os.path.exists(tmp_path / "o" / "shards" / "shard-00000" / "commit.json")


@pytest.mark.multiproc
def test_sigkill_then_resume_is_byte_identical(tiny_gpt2_dir, tmp_path):
    args = ["--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--max-length", "64", "--limit", "80",
            "--top-k", "8", "--shard-tokens", "400", "--no-reuse"]
    clean = str(tmp_path / "clean")
    subprocess.run([sys.executable, "-m", "cli.kdcache", "build", *args, "--out", clean], check=True, capture_output=True)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "cli.kdcache", "build", *args, "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(killed, "shards", "shard-00001", "commit.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    subprocess.run([sys.executable, "-m", "cli.kdcache", "build", *args, "--out", killed], check=True, capture_output=True)
    a, b = CacheReader(clean), CacheReader(killed)
    assert [s.objects for s in a.manifest.shards] == [s.objects for s in b.manifest.shards]


@pytest.mark.slow
def test_default_smollm2_on_builtin_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["build", "--limit", "3", "--max-length", "64"])
    assert res.exit_code == 0, res.output
    r = CacheReader(str(tmp_path / "cache" / "smollm2-135m"))
    assert r.manifest.vocab_size == 49152 and r.manifest.settings["top_k"] == 64
    assert r.manifest.dataset["name"] == "builtin:pydoc-topics"
    assert 0.5 < r.manifest.totals["mean_topk_mass"] < 1.0


def test_build_config_errors():
    with pytest.raises(BuildError, match="greedy"):
        BuildConfig(mode="generate", prompt_field="q", temperature=0, num_samples=2)
    with pytest.raises(BuildError, match="--worker 2"):
        BuildConfig(worker=2, num_workers=2)
    assert BuildConfig(model="org/gpt2-xl").out == os.path.join("cache", "gpt2-xl")


def test_write_error_mid_shard_then_resume(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A store that fails mid-write (disk full): nothing half-committed; the rerun resumes to a clean result."""
    from shared.store import Store

    common = {"model": str(tiny_gpt2_dir), "dataset": str(SHAKESPEARE), "max_length": 32, "limit": 20, "top_k": 4,
                  "shard_tokens": 100, "reuse": False}
    clean = str(tmp_path / "clean")
    build(BuildConfig(out=clean, **common), **QUIET)
    out = str(tmp_path / "flaky")
    real = Store.write_bytes
    calls = {"n": 0}

    def flaky(self, key, data):
        calls["n"] += 1
        if calls["n"] == 25:
            raise OSError(28, "No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(Store, "write_bytes", flaky)
    with pytest.raises(OSError, match="No space left"):
        build(BuildConfig(out=out, **common), **QUIET)
    monkeypatch.setattr(Store, "write_bytes", real)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    committed = [d for d in os.listdir(os.path.join(out, "shards"))
                 if os.path.exists(os.path.join(out, "shards", d, "commit.json"))]
    assert 0 < len(committed) < len(CacheReader(clean).manifest.shards)
    assert build(BuildConfig(out=out, **common), **QUIET).status == "built"
    assert [s.objects for s in CacheReader(clean).manifest.shards] == [s.objects for s in CacheReader(out).manifest.shards]

