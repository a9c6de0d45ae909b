"""kdtrain run end to end on tiny caches: learning, bit-exact resume, the CE baselines, DDP.

Held-out metrics are also checked on hand-made batches with a mock student of fixed logits.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SHAKESPEARE
from trainer.batch import collate
from trainer.checkpoint import list_checkpoints
from trainer.metrics import read_metrics
from trainer.run_loss import batch_loss, evaluate_heldout
from trainer.run_setup import lr_schedule
from trainer.step import ddp, select_device
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


def test_bf16_autocast_trains_and_saves_float32_weights(trained_cache, tiny_llama_dir, tmp_path):
    """--bf16 runs the student under bfloat16 autocast: the loss still falls, and the saved weights stay float32."""
    out = str(tmp_path / "run")
    summary = train(TrainConfig(out=out, cache=trained_cache, student=str(tiny_llama_dir), steps=20, lr=3e-3,
                                batch_tokens=512, eval_every=20, warmup_steps=2, eval_fraction=0.1, bf16=True), log=quiet)
    assert summary["status"] == "complete"
    evals = [r for r in read_metrics(out) if "eval_kl" in r]
    assert all(math.isfinite(r["eval_kl"]) for r in evals) and evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert read_run(out)["config"]["bf16"] is True
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


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
    """Two caches of the same data from different teachers give the same CE-trained student; its held-out
    metrics still compare it with each cache's teacher (eval_kl, eval_top1_agreement), like a KD run's."""
    outs, finals = [], []
    for i, cache in enumerate([tiny_cache, trained_cache]):
        out = str(tmp_path / f"ce{i}")
        train(TrainConfig(out=out, cache=cache, student=str(tiny_gpt2_dir), loss="ce", steps=6, batch_tokens=512),
              log=quiet)
        outs.append(weights(out))
        finals.append(read_metrics(out)[-1])
        assert {"eval_ppl", "eval_loss", "eval_kl", "eval_top1_agreement"} <= set(finals[-1])
        assert finals[-1]["eval_loss"] == pytest.approx(math.log(finals[-1]["eval_ppl"]))  # the CE objective
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert finals[0]["eval_ppl"] == finals[1]["eval_ppl"] and finals[0]["eval_kl"] != finals[1]["eval_kl"]


def test_no_cache_dataset_ce_baseline(tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "ce")
    summary = train(TrainConfig(out=out, dataset=str(SHAKESPEARE), student=str(tiny_gpt2_dir), loss="ce", steps=5,
                                batch_tokens=512, max_length=64, limit=60, eval_fraction=0.1), log=quiet)
    rows = read_metrics(out)
    assert summary["steps"] == 5 and "eval_ppl" in rows[-1] and "eval_kl" not in rows[-1]
    run = read_run(out)
    assert run["num_heldout"] >= 1 and run["data"]["name"]
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_no_cache_dataset_formats_prompts_with_the_template(tiny_gpt2_dir, tiny_cache, tmp_path):
    """--dataset with --prompt-template minillm --input-field context (an SFT teacher on the prompts the ROUGE-L
    eval asks): the sequences are load_sequences' with that template, recorded in run.json."""
    from transformers import AutoTokenizer

    from common.sequences import load_sequences
    from tests.conftest import GSM8K

    with GSM8K.open(encoding="utf-8") as f:  # dolly's fields: instruction, context (or empty), response
        rows = [json.loads(next(f)) for _ in range(8)]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["question"], "context": "Be brief." if i % 2 else "",
                                        "response": r["answer"]}) + "\n" for i, r in enumerate(rows)))
    out = str(tmp_path / "sft")
    settings = {"dataset": str(data), "prompt_field": "instruction", "response_field": "response", "max_length": 512}
    train(TrainConfig(out=out, student=str(tiny_gpt2_dir), loss="ce", steps=1, batch_tokens=1024, eval_fraction=0.3,
                      prompt_template="minillm", input_field="context", **settings), log=quiet)
    run = read_run(out)
    assert run["data"]["template"] == "minillm" and run["data"]["fields"]["input"] == "context"
    assert run["config"]["prompt_template"] == "minillm"
    expected, _ = load_sequences(tokenizer=AutoTokenizer.from_pretrained(tiny_gpt2_dir), prompt_template="minillm",
                                 input_field="context", **settings)
    assert run["num_sequences"] == len(expected)
    with pytest.raises(TrainError, match="a cache's prompts were formatted when it was built"):
        TrainConfig(out=str(tmp_path / "x"), cache=tiny_cache, student=str(tiny_gpt2_dir), prompt_template="minillm")


def test_padded_logit_rows_never_reach_the_loss(tmp_path):
    """A student with 3 padded logit rows beyond the cache's 9 token ids (cache_token_ids): the loss, its gradient
    and the held-out metrics are those of the student without them, whatever their logits (here the largest)."""
    vocab, padded, length = 9, 3, 6
    seqs = [handmade_rows(seed, length=length, vocab=vocab, top_k=4) for seed in range(2)]
    batch = collate(seqs, True)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5))
    wide = torch.cat([table, torch.full((vocab, padded), 30.0)], dim=1)  # (V, V + 3): padding that would win
    for loss in ("fkl", "ce"):
        config = TrainConfig(out=str(tmp_path), cache="c", student="s", loss=loss)
        plain, padded_model = FixedLogits(table.clone()), FixedLogits(wide.clone())
        want, _ = batch_loss(plain, batch, config)
        got, _ = batch_loss(padded_model, batch, config, num_ids=vocab)
        want.backward()
        got.backward()
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        assert torch.allclose(padded_model.table.grad[:, :vocab], plain.table.grad, atol=1e-7)
        assert torch.count_nonzero(padded_model.table.grad[:, vocab:]) == 0
        heldout = evaluate_heldout(FixedLogits(wide.clone()), [batch], config, True, num_ids=vocab)
        assert heldout == pytest.approx(evaluate_heldout(FixedLogits(table.clone()), [batch], config, True))


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
    assert all(math.isfinite(m) for m in first.values())


# ---------------------------------------------------------------------------------------------
# Devices under torchrun


@pytest.mark.parametrize("env,cuda,count,expected", [
    ({}, False, 0, "cpu"),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, 0, "cpu"),  # gloo on a CPU machine
    ({}, True, 1, "cuda:0"),
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "4"}, True, 4, "cuda:0"),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "8", "RANK": "7"}, True, 4, "cuda:3"),  # second node: local, not global
])
def test_select_device_binds_each_rank_to_its_own_gpu(env, cuda, count, expected):
    assert select_device(env, cuda_available=cuda, num_cuda_devices=count) == torch.device(expected)


def test_select_device_refuses_a_rank_without_a_gpu_of_its_own():
    with pytest.raises(TrainError, match="LOCAL_RANK=2 but this machine shows 2 CUDA device"):
        select_device({"LOCAL_RANK": "2"}, cuda_available=True, num_cuda_devices=2)


def test_ddp_gets_the_ranks_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert ddp(model, torch.device("cuda", 2)) is model
    assert ddp(model, torch.device("cpu")) is model
    assert calls == [{"device_ids": [2], "output_device": 2}, {}]


# ---------------------------------------------------------------------------------------------
# Held-out metrics on hand-made batches


class FixedLogits(torch.nn.Module):
    """A mock student: the logits at a position are a fixed row chosen by the input token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # (V, V)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, L, V)


def handmade_rows(seed: int, *, length: int, vocab: int, top_k: int, tail: float | None = None) -> dict:
    """One sequence's cache arrays from a random teacher distribution per row (top-K of it, and its tail)."""
    gen = torch.Generator().manual_seed(seed)
    logp = (2 * torch.randn(length, vocab, generator=gen, dtype=torch.float64)).log_softmax(-1)
    top_lp, top_ids = logp.topk(top_k, dim=-1)
    rest = logp.scatter(1, top_ids, -math.inf).logsumexp(-1)
    return {"input_ids": torch.randint(0, vocab, (length,), generator=gen).numpy(), "loss_mask": np.ones(length, bool),
            "topk_ids": top_ids.numpy(), "topk_logprobs": top_lp.float().numpy(),
            "tail_logprob": (rest if tail is None else torch.full((length,), tail)).float().numpy(), "logp": logp}


def test_heldout_kl_on_a_full_vocab_cache_ignores_a_noisy_tail(tmp_path):
    """K = V with a stored tail of rounding noise: eval_kl is the dense KL, not +inf (the rest bucket is empty
    by the same rule the loss uses)."""
    vocab, length = 7, 6
    seqs = [handmade_rows(seed, length=length, vocab=vocab, top_k=vocab, tail=-9.0) for seed in range(2)]
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(9))
    config = TrainConfig(out=str(tmp_path), cache="c", student="s")
    result = evaluate_heldout(FixedLogits(table.clone()), [collate(seqs, True)], config, has_teacher=True)
    dense = []
    for s in seqs:
        student_logp = table.double()[torch.as_tensor(s["input_ids"])].log_softmax(-1)[:-1]  # last row: no target
        teacher_p = s["logp"][:-1].exp()
        dense.append((teacher_p * (s["logp"][:-1] - student_logp)).sum(-1))
    assert result["eval_tokens"] == 2 * (length - 1)
    assert result["eval_kl"] == pytest.approx(float(torch.cat(dense).mean()), rel=1e-5)


@pytest.mark.parametrize("loss", ["fkl", "ce"])
def test_heldout_row_without_teacher_mass_is_refused_naming_it(tmp_path, loss):
    """A cache row whose stored log-probs are all -inf is refused with its shard, sequence and token (not a NaN
    eval_kl), whatever the training loss."""
    vocab, length = 11, 5
    seqs = [handmade_rows(seed, length=length, vocab=vocab, top_k=3) for seed in range(2)]
    seqs[1]["topk_logprobs"][2] = -np.inf
    seqs[1]["tail_logprob"][2] = -np.inf
    batch = collate(seqs, True)
    batch.ids = [(0, 4), (1, 9)]
    config = TrainConfig(out=str(tmp_path), cache="some/cache", student="s", loss=loss)
    model = FixedLogits(torch.zeros(vocab, vocab))
    named = r"cache some/cache, shard 1 sequence 9, token 2: the teacher's stored log-probs hold no probability"
    with pytest.raises(TrainError, match=named + r".*rebuild the cache"):
        evaluate_heldout(model, [batch], config, has_teacher=True)
    if loss == "ce":
        batch_loss(model, batch, config)  # training on cross-entropy alone reads no teacher entry
    else:
        with pytest.raises(TrainError, match=named):
            batch_loss(model, batch, config)  # the training step names it the same way


# ---------------------------------------------------------------------------------------------
# Metrics, resume and --out


def test_logged_lr_is_the_rate_each_step_used(tiny_cache, tmp_path):
    out = str(tmp_path / "lr")
    train(TrainConfig(out=out, cache=tiny_cache, student_from_teacher=True, keep_layers=1, steps=4, warmup_steps=3,
                      lr=1e-3, batch_tokens=384), log=quiet)
    lrs = [r["lr"] for r in read_metrics(out) if "loss" in r]
    assert lrs == pytest.approx([1e-3 * lr_schedule(step, 3, 4) for step in range(4)])
    assert lrs[0] == pytest.approx(1e-3 / 3)  # the first warm-up step


def test_resume_without_a_checkpoint_starts_over_cleanly(tiny_cache, tmp_path):
    """A run killed while writing its first checkpoint: --resume starts over from step 0, deleting what the run
    wrote, and ends as a fresh run (metrics and trace hold every step once)."""
    common = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "steps": 3, "batch_tokens": 384,
              "eval_every": 1, "trace_data": True}
    fresh = str(tmp_path / "fresh")
    train(TrainConfig(out=fresh, **common), log=quiet)
    out = tmp_path / "part"
    train(TrainConfig(out=str(out), stop_after=2, **common), log=quiet)
    shutil.rmtree(list_checkpoints(str(out))[-1])
    (out / "checkpoints" / ".tmp-step-000002").mkdir()  # as if killed mid-write
    messages = []
    summary = train(TrainConfig(out=str(out), resume=True, **common), log=messages.append)
    assert summary["status"] == "complete"
    assert any("holds no complete checkpoint" in m and "starting over from step 0" in m
               and "deleted checkpoints, metrics.jsonl, run.json, trace" in m for m in messages), messages
    assert not (out / "checkpoints" / ".tmp-step-000002").exists()
    def digest(folder):
        return [(r["step"], r.get("loss"), r.get("eval_kl")) for r in read_metrics(str(folder))]

    assert digest(out) == digest(fresh)
    assert [r["step"] for r in read_metrics(str(out)) if "loss" in r] == [1, 2, 3]
    with open(out / "trace" / "rank-0.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_resume_refuses_another_architecture(tiny_cache, tmp_path):
    common = {"cache": tiny_cache, "student_from_teacher": True, "batch_tokens": 384, "steps": 4}
    out = str(tmp_path / "o")
    train(TrainConfig(out=out, keep_layers=1, stop_after=2, **common), log=quiet)
    with pytest.raises(TrainError, match=r"step-000002 holds the weights of another architecture than this student's "
                                         r"\(missing transformer\.h\.1\..*resume with the student the run started with"):
        train(TrainConfig(out=out, keep_layers=2, resume=True, **common), log=quiet)


def test_resume_refuses_other_training_settings(tiny_cache, tmp_path):
    common = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "batch_tokens": 384, "steps": 4}
    out = str(tmp_path / "o")
    train(TrainConfig(out=out, stop_after=2, **common), log=quiet)
    with pytest.raises(TrainError, match=r"other training settings \(temperature 1.0 -> 2.0; lr 0.0005 -> 0.001\)"):
        train(TrainConfig(out=out, resume=True, temperature=2.0, lr=1e-3, **common), log=quiet)
    with pytest.raises(TrainError, match=r"loss 'fkl' -> 'jsd'"):
        train(TrainConfig(out=out, resume=True, loss="jsd", **common), log=quiet)
    train(TrainConfig(out=out, resume=True, eval_every=2, **common), log=quiet)  # logging settings may change


def test_resume_with_more_steps_continues_at_the_final_lr(tiny_cache, tmp_path):
    """--steps may grow on resume (the schedule keeps its horizon: the extra steps run at 10% of --lr), not shrink."""
    common = {"cache": tiny_cache, "student_from_teacher": True, "keep_layers": 1, "batch_tokens": 384, "lr": 1e-3,
              "warmup_steps": 1, "save_every": 4}
    out = str(tmp_path / "o")
    train(TrainConfig(out=out, steps=4, **common), log=quiet)
    with pytest.raises(TrainError, match="belongs to a run of 4 steps; 3 steps would cut its learning-rate schedule "
                                         "short: pass --steps 4 or more"):
        train(TrainConfig(out=out, steps=3, resume=True, **common), log=quiet)
    train(TrainConfig(out=out, steps=6, resume=True, **common), log=quiet)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * lr_schedule(s, 1, 4) for s in range(6)])
    assert [r["lr"] for r in rows[4:]] == pytest.approx([1e-4, 1e-4])
    run = read_run(out)
    assert (run["total_steps"], run["schedule_steps"], run["final"]["step"]) == (6, 4, 6)


# ---------------------------------------------------------------------------------------------
# non-finite steps (docs/runs-and-plans.md 1.5): never applied, never saved


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by infinity (a finite loss, a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison_steps(monkeypatch, bad_calls: set[int], how: str = "loss"):
    """Make the loss (how="loss": NaN) or the gradient (how="gradient": infinite) of the given calls of the trainer's
    loss non-finite; calls count from 1, one per step attempt with --grad-accum 1."""
    import trainer.train as trainer_train

    real, calls = trainer_train.batch_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        value, stats = real(*args, **kwargs)
        if calls[0] in bad_calls:
            value = value * math.nan if how == "loss" else InfiniteGradient.apply(value)
        return value, stats

    monkeypatch.setattr(trainer_train, "batch_loss", loss)


NONFINITE_RUN = {"student_from_teacher": True, "keep_layers": 1, "batch_tokens": 384, "lr": 2e-3}


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_checkpoint(tiny_cache, tmp_path, monkeypatch, how):
    """A NaN loss (or an infinite gradient) at step 5 trained on and saved an all-NaN student with exit 0. Now the run
    stops there naming the step, the checkpoints of steps 2 and 4 stay (finite), no student is saved, run.json says
    why, and --resume once the cause is gone continues from step 4."""
    common = {"cache": tiny_cache, "steps": 8, "save_every": 2, **NONFINITE_RUN}
    out = tmp_path / "o"
    poison_steps(monkeypatch, {5}, how)
    with pytest.raises(TrainError, match=r"^step 5: loss \S+, gradient norm \S+ \(not finite on this or another "
                                         r"rank\), "
                                         r"so the step was not applied and the run stops\. Kept: .*step-000004; no "
                                         r"student was saved\. Lower --lr"):
        train(TrainConfig(out=str(out), **common), log=quiet)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["step-000002", "step-000004"]
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "checkpoints" / "step-000004" /
                                                                  "model.safetensors").values())
    assert not (out / "model.safetensors").exists()
    run = read_run(str(out))
    assert run["status"] == "failed" and run["error"].startswith("step 5: ")
    monkeypatch.undo()
    assert train(TrainConfig(out=str(out), resume=True, **common), log=quiet)["status"] == "complete"
    assert all(bool(torch.isfinite(t).all()) for t in weights(str(out)).values())


def test_skip_nonfinite_skips_up_to_n_steps_and_counts_them(tiny_cache, tmp_path, monkeypatch):
    """--skip-nonfinite 2: two non-finite attempts are skipped without touching the weights, the optimizer or the
    schedule (the logged learning rates are the schedule's at steps 1..6; AdamW counts 6 steps); metrics.jsonl
    counts them; a third stops the run."""
    common = {"cache": tiny_cache, "steps": 6, "save_every": 6, "warmup_steps": 0, **NONFINITE_RUN}
    out = str(tmp_path / "o")
    poison_steps(monkeypatch, {3, 4})
    summary = train(TrainConfig(out=out, skip_nonfinite=2, **common), log=quiet)
    assert summary["status"] == "complete" and summary["steps"] == 6
    rows = read_metrics(out)
    assert [(r["step"], r["skipped_nonfinite"]) for r in rows if "reason" in r] == [(3, 1), (3, 2)]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["skipped_nonfinite"] for r in steps] == [0, 0, 2, 2, 2, 2]
    assert [r["lr"] for r in steps] == pytest.approx([2e-3 * lr_schedule(s, 0, 6) for s in range(6)])
    optimizer = torch.load(os.path.join(out, "checkpoints", "step-000006", "optimizer.pt"), weights_only=True)
    assert {int(s["step"]) for s in optimizer["optimizer"]["state"].values()} == {6}
    assert all(bool(torch.isfinite(t).all()) for t in weights(out).values())

    monkeypatch.undo()
    poison_steps(monkeypatch, {3, 4, 5})
    with pytest.raises(TrainError, match=r"^step 3: loss nan, .* after 2 such step\(s\) skipped \(--skip-nonfinite 2\)"):
        train(TrainConfig(out=str(tmp_path / "o2"), skip_nonfinite=2, **common), log=quiet)


def test_nonfinite_weights_are_never_saved(tiny_cache, tmp_path, monkeypatch):
    """Weights that became non-finite in an optimizer step (a finite loss and gradient) are refused before the
    checkpoint and before the final save."""
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "o"
    with pytest.raises(TrainError, match=r"^after step 3 the student's weights are not finite \(\S+\), so they were "
                                         r"not "
                                         r"saved; kept: .*step-000002"):
        train(TrainConfig(out=str(out), cache=tiny_cache, steps=3, save_every=2, **NONFINITE_RUN), log=quiet)
    assert not (out / "model.safetensors").exists() and read_run(str(out))["status"] == "failed"


def test_an_error_during_the_run_is_recorded_in_run_json(tiny_cache, tmp_path, monkeypatch):
    """An error the loop does not foresee (here a full disk at the optimizer step) stops the run; run.json then says
    failed, with the error, instead of "running" forever."""
    def step(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(out=str(out), cache=tiny_cache, steps=3, **NONFINITE_RUN), log=quiet)
    run = read_run(str(out))
    assert run["status"] == "failed" and "No space left on device" in run["error"]
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# a student's context


def test_student_with_a_shorter_context_than_the_caches_sequences_is_refused(tiny_cache, tiny_gpt2_dir, tmp_path):
    """The cache's windows are 64 tokens; a student of 32 positions crashed deep inside torch (an index error in its
    position embedding). It is refused before training, naming the limit, the longest sequence and the fixes."""
    config = tmp_path / "short.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}))
    out = tmp_path / "o"
    with pytest.raises(TrainError, match=r"sequence\(s\) are longer than the context of student .*short\.json "
                                         r"\(n_positions = 32 tokens\), the longest shard \d+ sequence \d+ with 64 "
                                         r"tokens; kdtrain does not cut a cache's sequences .* use a student with a "
                                         r"context of at least 64, or rebuild the cache with kdcache build "
                                         r"--max-length 32 or less"):
        train(TrainConfig(out=str(out), cache=tiny_cache, student_config=str(config), steps=1), log=quiet)
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(TrainError, match=r"--max-length 64 exceeds the context of student .*short\.json \(n_positions "
                                         r"= 32 tokens\); use --max-length 32 or less"):
        train(TrainConfig(out=str(tmp_path / "o2"), dataset=str(SHAKESPEARE), student_config=str(config),
                          teacher=str(tiny_gpt2_dir), loss="ce", max_length=64, limit=5, steps=1), log=quiet)
