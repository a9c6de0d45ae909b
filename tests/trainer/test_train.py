"""kdtrain run end to end on a tiny cache: learning, resume bit for bit, baselines, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.kdtrain import app
from tests.conftest import SHAKESPEARE
from trainer.train import TrainConfig, TrainError, train

runner = CliRunner()


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_40_steps_lower_heldout_kl(tiny_cache, tiny_llama_dir, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(out=out, cache=tiny_cache, student=str(tiny_llama_dir), steps=40, lr=3e-3,
                                batch_tokens=512, eval_every=10, warmup_steps=2), log=lambda m: None)
    assert summary["status"] == "complete"
    evals = [r for r in metrics(out) if "eval_kl" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["eval_kl"] < 0.5 * evals[0]["eval_kl"]
    rows = [r for r in metrics(out) if "loss" in r]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    # the student is a plain HF folder that loads again
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_resume_is_bit_exact(tiny_cache, tmp_path):
    common = dict(cache=tiny_cache, student_from_teacher=True, keep_layers=1, lr=2e-3, batch_tokens=384, seed=3,
                  eval_every=5)
    full = str(tmp_path / "full")
    train(TrainConfig(out=full, steps=20, **common), log=lambda m: None)
    part = str(tmp_path / "part")
    assert train(TrainConfig(out=part, steps=20, stop_after=10, **common), log=lambda m: None)["status"] == "stopped"
    train(TrainConfig(out=part, steps=20, resume=True, **common), log=lambda m: None)
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(part, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ce_with_cache_ignores_teacher_logprobs(tiny_cache, tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    from cacher.build import BuildConfig, build

    other = str(tmp_path / "other-teacher-cache")
    build(BuildConfig(model=str(tiny_llama_dir), dataset=str(SHAKESPEARE), max_length=64, limit=120, top_k=16,
                      shard_tokens=2000, chunk_rows=512, out=other, reuse=False), log=lambda m: None)
    outs = []
    for i, cache in enumerate([tiny_cache, other]):
        out = str(tmp_path / f"ce{i}")
        train(TrainConfig(out=out, cache=cache, student=str(tiny_gpt2_dir), loss="ce", steps=6, batch_tokens=512),
              log=lambda m: None)
        outs.append(load_file(os.path.join(out, "model.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_no_cache_dataset_ce_baseline(tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "ce")
    train(TrainConfig(out=out, dataset=str(SHAKESPEARE), student=str(tiny_gpt2_dir), loss="ce", steps=5,
                      batch_tokens=512, max_length=64, limit=60), log=lambda m: None)
    rows = metrics(out)
    assert "eval_ppl" in rows[-1] and "eval_kl" not in rows[-1]


def test_student_config_random_init(tiny_cache, tmp_path):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}))
    out = str(tmp_path / "cfg")
    train(TrainConfig(out=out, cache=tiny_cache, student_config=str(cfg), steps=3, batch_tokens=512), log=lambda m: None)
    assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("args,message", [
    (["--loss", "kl2"], "unknown; choose one of"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--keep-layers", "1"], "exactly one of --student"),
])
def test_bad_arguments(tiny_cache, tmp_path, args, message):
    res = runner.invoke(app, ["run", "--cache", tiny_cache, "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output.replace("\n", " ")


def test_nonempty_out_refused_without_resume(tiny_cache, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    res = runner.invoke(app, ["run", "--cache", tiny_cache, "--out", str(tmp_path / "o"), "--student-from-teacher",
                              "--keep-layers", "1", "--steps", "1"])
    assert res.exit_code == 2 and "not empty" in res.output and (tmp_path / "o" / "x").exists()


def test_incomplete_and_corrupt_cache_refused(tiny_cache, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cache, broken)
    chunk = broken / "shards" / "shard-00001" / "topk_ids" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))
    res = runner.invoke(app, ["run", "--cache", str(broken), "--out", str(tmp_path / "o"), "--student-from-teacher",
                              "--keep-layers", "1", "--steps", "1"])
    assert res.exit_code == 2 and "shard-00001" in res.output and "damaged" in res.output
    os.remove(broken / "manifest.json")
    res = runner.invoke(app, ["run", "--cache", str(broken), "--out", str(tmp_path / "o2"), "--student-from-teacher",
                              "--keep-layers", "1", "--steps", "1"])
    assert res.exit_code == 2 and "incomplete cache" in res.output


def test_student_with_other_tokenizer_refused(tiny_cache, tmp_path):
    from tests.conftest import build_tiny_model, train_tokenizer

    tok = tmp_path / "tok"
    train_tokenizer(tok, vocab_size=300)
    other = build_tiny_model(tmp_path / "other", "gpt2", tok)
    with pytest.raises(TrainError, match="differs from that of teacher"):
        train(TrainConfig(out=str(tmp_path / "o"), cache=tiny_cache, student=str(other), steps=1), log=lambda m: None)


@pytest.mark.multiproc
def test_ddp_two_processes(tiny_cache, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "cli.kdtrain", "run", "--cache", tiny_cache, "--student-from-teacher", "--keep-layers", "1",
           "--steps", "6", "--batch-tokens", "512", "--out", out, "--save-every", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = metrics(out)
    assert rows[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(r.get("loss", 0.0))) for r in rows)
    state = json.load(open(os.path.join(out, "checkpoints", "step-000006", "state.json")))
    assert len(state["cursors"]) == 2  # each rank's own position in its own stripe


def test_cache_without_loss_tokens_refused(tiny_gpt2_dir, tmp_path):
    """A cache whose loss_mask is false everywhere (nothing to distill) is refused before training."""
    import numpy as np

    from shared.writer import BuildHeader, CacheWriter

    url = str(tmp_path / "nomask")
    header = BuildHeader(teacher={"name": "t", "dtype": "float32", "engine": "hf", "engine_version": "x",
                                  "path": str(tiny_gpt2_dir)},
                         tokenizer={"name": "t", "vocab_size": 384, "vocab_sha256": "0" * 64},
                         dataset={"name": "d", "fingerprint": "f", "num_sequences": 1},
                         settings={"mode": "score", "top_k": 2, "max_length": 8}, num_shards=1)
    with CacheWriter(url, header) as w:
        with w.shard(0) as buf:
            buf.add_sequence(input_ids=np.arange(5), loss_mask=np.zeros(5, bool), topk_ids=np.tile([1, 2], (5, 1)),
                             topk_logprobs=np.tile([-1.0, -2.0], (5, 1)), target_logprob=np.full(5, -1.0),
                             tail_logprob=np.full(5, -1.0), source_index=0)
        w.finalize()
    with pytest.raises(TrainError, match="no rows with loss_mask set"):
        train(TrainConfig(out=str(tmp_path / "o"), cache=url, student_from_teacher=True, keep_layers=1, steps=1),
              log=lambda m: None)
