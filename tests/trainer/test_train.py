"""kdtrain run end to end on tiny caches: learning, bit-exact resume, the CE baselines, DDP."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SHAKESPEARE
from trainer.checkpoint import list_checkpoints
from trainer.metrics import read_metrics
from trainer.train import TrainConfig, TrainError, train


def quiet(message):
    pass


def read_run(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def test_40_steps_lower_heldout_kl(trained_cache, tiny_llama_dir, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(out=out, cache=trained_cache, student=str(tiny_llama_dir), steps=40, lr=3e-3,
                                batch_tokens=512, eval_every=10, warmup_steps=2, eval_fraction=0.1), log=quiet)
    assert summary["status"] == "complete" and summary["steps"] == 40
    print(f"40-step run: {summary['tokens_per_s']:.0f} tokens/s, {summary['seconds']:.1f}s")
    rows = read_metrics(out)
    evals = [r for r in rows if "eval_kl" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["eval_kl"] < 0.6 * evals[0]["eval_kl"]
    assert evals[-1]["eval_ppl"] < evals[0]["eval_ppl"]
    assert evals[-1]["eval_top1_agreement"] > evals[0]["eval_top1_agreement"]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "ce", "kd", "grad_norm"} <= set(steps[0])
    run = read_run(out)
    assert run["status"] == "complete" and run["config"]["loss"] == "fkl" and run["final"]["step"] == 40
    # --out is a plain HF folder: the next `kdcache build --model`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_resume_is_bit_exact(tiny_cache, tmp_path):
    # GPT-2 keeps dropout on: the torch RNG state must come back too; grad_accum covers micro-batches
    common = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "lr": 2e-3, "batch_tokens": 384,
              "seed": 3, "eval_every": 5, "grad_accum": 2, "warmup_steps": 3, "steps": 20}
    full = str(tmp_path / "full")
    train(TrainConfig(out=full, **common), log=quiet)
    part = str(tmp_path / "part")
    stopped = train(TrainConfig(out=part, save_every=4, stop_after=10, **common), log=quiet)
    assert stopped == {"status": "stopped", "step": 10}
    assert [os.path.basename(p) for p in list_checkpoints(part)] == ["step-000008", "step-000010"]  # keeps 2
    # as if killed after step 10 but before its checkpoint: steps 9 and 10 are redone from step 8
    shutil.rmtree(list_checkpoints(part)[-1])
    train(TrainConfig(out=part, resume=True, save_every=4, **common), log=quiet)
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl reads as one run: every step once, the same losses
    rows_full = [r for r in read_metrics(full) if "loss" in r]
    rows_part = [r for r in read_metrics(part) if "loss" in r]
    assert [r["step"] for r in rows_part] == list(range(1, 21))
    assert [r["loss"] for r in rows_part] == [r["loss"] for r in rows_full]


def test_resume_with_other_data_settings_refused(tiny_cache, tmp_path):
    common = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "batch_tokens": 384, "steps": 4}
    out = str(tmp_path / "o")
    train(TrainConfig(out=out, stop_after=2, **common), log=quiet)
    with pytest.raises(TrainError, match="batch_tokens 384 -> 512"):
        train(TrainConfig(out=out, resume=True, **{**common, "batch_tokens": 512}), log=quiet)


def test_ce_with_cache_ignores_teacher_logprobs(tiny_cache, trained_cache, tiny_gpt2_dir, tmp_path):
    """Two caches of the same data from different teachers give the same CE-trained student."""
    outs = []
    for i, cache in enumerate([tiny_cache, trained_cache]):
        out = str(tmp_path / f"ce{i}")
        train(TrainConfig(out=out, cache=cache, student=str(tiny_gpt2_dir), loss="ce", steps=6, batch_tokens=512),
              log=quiet)
        outs.append(weights(out))
        final = read_metrics(out)[-1]
        assert "eval_ppl" in final and "eval_kl" not in final
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_no_cache_dataset_ce_baseline(tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "ce")
    summary = train(TrainConfig(out=out, dataset=str(SHAKESPEARE), student=str(tiny_gpt2_dir), loss="ce", steps=5,
                                batch_tokens=512, max_length=64, limit=60, eval_fraction=0.1), log=quiet)
    rows = read_metrics(out)
    assert summary["steps"] == 5 and "eval_ppl" in rows[-1] and "eval_kl" not in rows[-1]
    run = read_run(out)
    assert run["num_heldout"] >= 1 and run["data"]["name"]
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_student_config_random_init_and_epochs(tiny_cache, tmp_path):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}))
    out = str(tmp_path / "cfg")
    summary = train(TrainConfig(out=out, cache=tiny_cache, student_config=str(cfg), epochs=1, batch_tokens=1024),
                    log=quiet)
    run = read_run(out)
    # one epoch = the training sequences' batches (about 6000 tokens / 1024 per batch)
    assert 4 <= summary["steps"] == run["total_steps"] <= 8
    assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.multiproc
def test_ddp_two_processes(tiny_cache, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "cli.kdtrain", "run", "--cache", tiny_cache, "--student-from-teacher", "--keep-layers", "1",
           "--steps", "6", "--batch-tokens", "256", "--out", out, "--save-every", "3", "--eval-every", "3",
           "--trace-data"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith(("loss", "eval_")))
    assert any("eval_kl" in r for r in rows)
    with open(os.path.join(out, "checkpoints", "step-000006", "state.json")) as f:
        assert len(json.load(f)["cursors"]) == 2  # each rank's own position in its own stripe
    seen = []
    for rank in range(2):
        with open(os.path.join(out, "trace", f"rank-{rank}.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        assert [r["step"] for r in lines] == list(range(1, 7))
        seen.append({tuple(i) for r in lines for i in r["ids"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint stripes (no epoch wrapped in 6 steps)


def test_trainer_never_imports_the_cacher():
    code = ("import sys, cli.kdtrain, trainer.train, trainer.data, trainer.checkpoint, trainer.metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cacher'))")
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert res.stdout.strip() == "[]"


def test_target_bucket_reads_the_caches_target_logprob(trained_cache, tiny_gpt2_dir, tmp_path):
    """With the target bucket (default) the first step's loss differs from --no-target-bucket's: the cache's
    target_logprob reaches the loss (an all-unknown column would give identical K + 1 losses). K < V here."""
    first = {}
    for flag in (True, False):
        out = str(tmp_path / f"tb{flag}")
        train(TrainConfig(out=out, cache=trained_cache, student=str(tiny_gpt2_dir), steps=1, batch_tokens=512,
                          target_bucket=flag), log=quiet)
        first[flag] = next(m for m in read_metrics(out) if "loss" in m)["loss"]
    assert first[True] != pytest.approx(first[False], rel=1e-6)


def test_tail_samples_reach_the_loss(tail_cache, trained_teacher_dir, tmp_path):
    """A cache with tail samples: fkl trains on top-K + draws (its first loss differs from
    --no-tail-samples'), run.json says which targets were used, other losses fall back with a note."""
    first, notes = {}, {}
    for name, kwargs in {"tail": {}, "no-tail": {"tail_samples": False}, "rkl": {"loss": "rkl"}}.items():
        out = str(tmp_path / name)
        train(TrainConfig(out=out, cache=tail_cache, student=str(trained_teacher_dir), steps=2, batch_tokens=512,
                          eval_every=2, **kwargs), log=quiet)
        first[name] = next(m for m in read_metrics(out) if "loss" in m)["loss"]
        notes[name] = read_run(out)["teacher_outcomes"]
    assert notes["tail"] == "top-8 + 8 importance-weighted tail samples (forward KL)"
    assert "unused (--no-tail-samples)" in notes["no-tail"]
    assert "they estimate forward KL only" in notes["rkl"]
    assert first["tail"] != pytest.approx(first["no-tail"], rel=1e-6)
    assert all(m == m for m in first.values())  # finite, not NaN
