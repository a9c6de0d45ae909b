"""Each benchmark at its smallest size on a tiny model: it runs and reports its figure (no timing asserts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, SHAKESPEARE

BENCH_SCRIPTS = sorted(p.name for p in (REPO_ROOT / "bench").glob("*.py")
                       if p.name not in ("__init__.py", "common.py", "tail_losses.py"))


def _row(path):
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_script_runs_by_path(script, tmp_path):
    """`python bench/NAME.py --help` works as `python -m bench.NAME --help` does (bench/ is not installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


def test_p1_kd_overhead_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p1_kd_overhead import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--keep-layers", "1", "--batch-size", "2", "--max-length", "32",
          "--top-k", "8", "--repeats", "1", "--tail-split", "4+4", "--profile", "--profile-steps", "1",
          "--cpu-time", "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P1" and row["ratio_kd_over_ce"] > 0 and row["student_layers"] == 1
    assert row["target_bucket"] and row["ratio_tail_samples_kd_over_ce"] > 0
    assert row["loss_path"] == "hidden states + head, chunked" and row["ratio_linear_over_logits_kd"] > 0
    assert row["clock"] == "process CPU seconds, 1 thread"
    for kind in ("ce", "fkl", "tail"):
        assert 0 < row[f"profile_{kind}"]["loss_share"] < 1


def test_p1_times_the_loss_kdtrain_runs_by_default():
    """P1's KD step runs the trainer's loss: hidden states and the head through linear_kd_loss with the target
    bucket (K + 2 buckets), equal to sparse_kd_loss on the materialized logits, and not the K + 1 loss."""
    import torch

    from bench.p1_kd_overhead import step_loss
    from trainer.batch import collate
    from trainer.losses import sparse_kd_loss
    from trainer.step import StepSetup

    rng = np.random.default_rng(0)
    vocab, k, length, hidden = 40, 4, 12, 6
    rows = []
    for _ in range(2):
        lp = np.log(rng.dirichlet(np.ones(vocab), length))
        ids = np.argsort(-lp, axis=1)[:, :k]
        seq = rng.integers(0, vocab, length)
        top = np.take_along_axis(lp, ids, 1)
        rows.append({"input_ids": seq, "loss_mask": np.ones(length, bool), "topk_ids": ids, "topk_logprobs": top,
                     "tail_logprob": np.log1p(-np.exp(top).sum(1)),
                     "target_logprob": np.r_[lp[np.arange(length - 1), seq[1:]], np.nan]})
    batch = collate(rows, has_teacher=True).to("cpu")

    class FixedHidden(torch.nn.Module):  # the student without its head: a fixed hidden state per input token
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(vocab, hidden, dtype=torch.float64))

        def forward(self, input_ids, **kwargs):
            return self.table[input_ids]  # (B, L, H)

    forward, head = FixedHidden(), torch.randn(vocab, hidden, dtype=torch.float64)
    got = step_loss(StepSetup(forward, head, chunk_tokens=5, compiled=False), batch, "fkl", vocab)
    logits = (forward.table[batch.input_ids] @ head.T).reshape(-1, vocab)  # (B*L, V)
    t = batch.teacher.flat()
    args = (logits, t.topk_ids, t.topk_logprobs, t.tail_logprob, batch.target_ids.reshape(-1), batch.loss_mask.reshape(-1))
    with_target = sparse_kd_loss(*args, target_logprob=t.target_logprob)[0]
    assert torch.allclose(got, with_target)
    assert not torch.allclose(sparse_kd_loss(*args)[0], with_target)  # K + 1 buckets: what P1 timed before


def test_p7_data_path_smoke(tmp_path, monkeypatch):
    from bench.p7_data_path import main

    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.jsonl"
    main(["--tokens", "4096", "--seq-length", "64", "--shard-tokens", "2048", "--batch-tokens", "512", "--batches", "3",
          "--warmup", "1", "--workers", "0,2", "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P7" and [r["workers"] for r in row["runs"]] == [0, 2]
    assert all(r["tokens"] > 0 and r["tokens_per_cpu_s"] > 0 and r["cpu_s_workers"] >= 0 for r in row["runs"])
    assert row["decode_tokens_per_cpu_s"] > 0 and row["collate_tokens_per_cpu_s"] > 0


def test_p9_write_path_smoke(tmp_path):
    """Whole caches written through the build's pipeline in a thread and in two processes: the same bytes either way
    (the encoding does not depend on where it runs), and the figures reported."""
    from bench.p9_write_path import main

    out = tmp_path / "r.jsonl"
    main(["--tokens", "4096", "--seq-length", "256", "--shard-tokens", "2048", "--workers", "0,2", "--repeats", "1",
          "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P9" and row["tokens"] == 4096 and set(row["runs"]) == {"0", "2"}
    assert row["runs"]["0"][0]["bytes"] == row["runs"]["2"][0]["bytes"] > 0
    assert row["workers0_tokens_per_cpu_s"] > 0 and row["workers2_tokens_per_s"] > 0


def test_p9_refuses_bad_arguments():
    from bench.p9_write_path import main

    with pytest.raises(SystemExit, match="--workers must list counts >= 0"):
        main(["--workers", "-1"])
    with pytest.raises(SystemExit, match="must hold one window of --seq-length"):
        main(["--tokens", "10", "--seq-length", "64"])


def test_loss_memory_smoke(tmp_path):
    from bench.loss_memory import main

    out = tmp_path / "r.jsonl"
    main(["--tokens", "256", "--vocab", "4096", "--top-k", "8", "--chunk-tokens", "64", "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P1-memory"
    for name in ("ce", "sparse_kd", "dense_kd"):
        assert row[f"{name}_extra_peak_in_logits"] >= 0


def test_p2_online_vs_offline_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p2_online_vs_offline import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--batch-size", "2", "--max-length", "32", "--top-k", "8", "--repeats", "1",
          "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P2" and row["ratio_online_over_offline"] > 0 and row["param_ratio"] > 1


@pytest.mark.slow
def test_p3_capture_speed_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p3_capture_speed import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--tokens", "256", "--max-length", "64", "--repeats", "1", "--top-k", "8",
          "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P3" and row["ratio_capture_over_bare"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_p8_build_margin_smoke(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Three whole `kdcache build` runs (warm-up, small, large) and the bare forward: the figures are reported."""
    from bench.p8_build_margin import main

    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--top-k", "4", "--max-length", "32",
          "--small-tokens", "256", "--large-tokens", "1024", "--batch-tokens", "512", "--repeats", "1", "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P8" and row["large_tokens"] == 1024 and row["small_tokens"] == 256
    assert row["bare_tokens_per_s"] > 0 and row["ratio_end_to_end_over_bare"] > 0
    assert any(line.startswith("teacher: 1,024 tokens") for line in row["large_build_log"])
    assert row["bare_cpu_us_per_token"] > 0 and "cpu_margin_us_per_token" in row  # tiny sizes: only noise
    assert all(len(used) == 2 and used[0] > 0 for used in row["cpu_build_large"])
    assert row["bare_script_startup_cpu_s"] > 0 and "cpu_startup_beyond_bare_script_s" in row


def test_p8_refuses_a_missing_dataset(tmp_path):
    from bench.p8_build_margin import main

    with pytest.raises(SystemExit, match="is not a file; pass a text file"):
        main(["--model", str(tmp_path), "--dataset", str(tmp_path / "missing.txt")])


def test_p3_engine_vllm_without_a_vllm_interpreter_is_refused(monkeypatch, tmp_path):
    """--engine vllm with no interpreter that has vllm stops before any work, saying how to point at one."""
    from bench import p3_capture_speed

    monkeypatch.delenv("KDCACHE_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("cacher.engine_vllm.find_vllm_python", lambda: None)
    with pytest.raises(SystemExit, match="--vllm-python PATH or set KDCACHE_VLLM_PYTHON"):
        p3_capture_speed.main(["--model", str(tmp_path / "not-loaded"), "--engine", "vllm"])


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_p3_capture_speed_vllm_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p3_capture_speed import main
    from cacher.engine_vllm import find_vllm_python

    vllm_python = find_vllm_python()
    if vllm_python is None:
        pytest.skip("no vLLM interpreter: set KDCACHE_VLLM_PYTHON to a python with vllm (docs/vllm-cpu.md)")

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--tokens", "256", "--max-length", "64", "--repeats", "2", "--top-k", "8",
          "--engine", "vllm", "--vllm-python", vllm_python, "--json", str(out)])
    row = _row(out)
    assert row["engine"] == "vllm" and len(row["vllm_pass_s"]) == 2 and row["vllm_capture_tokens_per_s"] > 0
    assert row["ratio_vllm_capture_over_hf_capture"] > 0 and row["vllm_hf_top1_agreement"] > 0.9


@pytest.mark.slow
def test_p4_storage_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p4_storage import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--tokens", "512", "--max-length", "64", "--rs-tokens", "128",
          "--rs-samples", "8", "--repeats", "1", "--json", str(out)])
    row = _row(out)
    assert sorted({r["K"] for r in row["rows"]}) == [16, 64, 128]
    assert all(r["bytes_per_token_k"] > 0 and r["encode_tokens_per_cpu_s"] > 0 for r in row["rows"])
    chosen = [r for r in row["rows"] if r["encoding"].endswith("(chosen)")]
    assert [r["K"] for r in chosen] == [16, 64, 128] and all(r["mean_kl"] < 1e-5 for r in chosen), chosen
    assert [b["K"] for b in row["build"]] == [64, 128]  # a real kdcache build of each, read back
    assert all(b["bytes_per_token_k"] > 0 and b["mean_kl"] < 1e-5 for b in row["build"]), row["build"]
    assert row["rs_kd"][0]["mean_distinct_ids"] <= 8
    tail = next(r for r in row["rs_kd"] if r.get("tail_samples") == "48+16")
    assert 0 < tail["mean_distinct_ids"] <= 16 and tail["bytes_per_token_slot"] > 0


def test_p4_candidates_give_back_their_rows():
    """Every P4 candidate, and the writer's own objects, decode to the ids exactly and to log-probs within their
    rounding (KL far below 1e-5)."""
    from bench.p4_storage import CANDIDATES, decode, encode, fidelity, writer_objects

    rng = np.random.default_rng(0)
    lp = -np.sort(rng.exponential(0.5, (50, 32)).cumsum(1), axis=1)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True)) + np.log(0.9)
    arrays = {"input_ids": rng.integers(40, 100, 50), "offsets": np.array([0, 50]), "loss_mask": np.r_[np.ones(49, bool), [False]],
              "topk_ids": np.stack([rng.permutation(40)[:32] for _ in range(50)]), "topk_logprobs": lp,
              "target_logprob": np.r_[lp[:-1, -1] - 1, [1.0]], "tail_logprob": np.full(50, np.log(0.1))}
    shipped = writer_objects(arrays, 100, 32)
    for c, objects in [(None, shipped)] + [(c, encode(c, arrays, 100, 32)) for c in CANDIDATES]:
        ids, stored = decode(c, objects, 100, 32)
        np.testing.assert_array_equal(ids, arrays["topk_ids"])
        assert stored.shape == (50, 32) and fidelity(lp, stored)["mean_kl"] < 5e-5, c  # a broken decode: > 1e-2


@pytest.mark.slow
def test_p5_memory_streaming_smoke(tiny_gpt2_dir, tmp_path, monkeypatch):
    from bench.p5_memory_streaming import main

    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.jsonl"
    main(["--student", str(tiny_gpt2_dir), "--tokens", "2048", "--scale", "2", "--seq-length", "64",
          "--shard-tokens", "1024", "--steps", "2", "--batch-tokens", "256", "--repeats", "1", "--stream-batches", "1",
          "--top-k", "8", "--json", str(out)])
    row = _row(out)
    assert row["id"] == "P5" and row["ratio_rss_10x_over_1x"] > 0 and row["ratio_data_path_over_trainer"] > 0
    # the traversal child read every training row of each cache: about twice as many on the 2x cache
    assert row["ratio_traverse_rss_10x_over_1x"] > 0 and row["decoded_bytes_10x"] > 0
    assert 1.5 < row["traverse_rows_10x"] / row["traverse_rows_1x"] < 2.5


def test_p5_child_peak_rss_is_the_childs_own():
    """A child's peak is its own VmHWM, not os.wait4's ru_maxrss (which carries this process's size over)."""
    from bench.p5_memory_streaming import child_peak_rss

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this process
    peak, output = child_peak_rss("platform", [])
    assert output.strip() and 0 < peak < 300 * 2**20, peak
    del ballast


def test_p5_random_rows_are_valid():
    from bench.p5_memory_streaming import random_rows
    from shared.writer import validate_shard_arrays

    rng = np.random.default_rng(0)
    for vocab in (64, 50_000):
        seq = random_rows(rng, 40, vocab, 16)
        arrays = {**seq, "offsets": np.array([0, 40])}
        validate_shard_arrays(arrays, vocab_size=vocab, top_k=16, where="test")
        assert all(len(set(r)) == 16 for r in seq["topk_ids"])


def test_p6_quality_smoke(tiny_gpt2_dir, tmp_path):
    from bench.p6_quality import main

    out = tmp_path / "r.jsonl"
    main(["--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--student", "drop:1", "--ks", "8,16", "--notarget-ks", "8",
          "--rs", "8", "--tail", "12+4", "--steps", "2", "--batch-tokens", "256", "--max-length", "32",
          "--eval-sequences", "4", "--candidates", "fill:bigram,tailce,oracle,groups4+fill:cache",
          "--cand-k", "8", "--eval-kl", "--json", str(out)])
    row = _row(out)
    candidates = {f"{c}@8" for c in ("fill:bigram", "tailce", "oracle", "groups4+fill:cache")}
    assert set(row["variants"]) == {"ce", "dense", "topk-8", "topk-16", "topk-8-notarget", "rs-8", "tail-12+4"} | candidates
    assert all(v["eval_ppl"] > 1 and v["eval_dense_kl"] >= v["eval_tail_kl"] >= 0 for v in row["variants"].values())
    # the teacher's own distribution as the fill is dense KD (up to the cache's float16 log-probs)
    dense, oracle = row["variants"]["dense"]["eval_ppl"], row["variants"]["oracle@8"]["eval_ppl"]
    assert abs(oracle - dense) < 1e-2 * dense


@pytest.mark.parametrize(("args", "message"), [
    (["--candidates", "fill:prior"], "unknown candidate part 'fill:prior'"),
    (["--only", "ce,topk-65"], "--only names variants this run does not define: \\['topk-65'\\]"),
], ids=["unknown candidate", "unknown --only variant"])
def test_p6_bad_variant_names_are_refused_before_any_work(tiny_gpt2_dir, args, message):
    from bench.p6_quality import main

    with pytest.raises((ValueError, SystemExit), match=message):
        main(["--model", str(tiny_gpt2_dir), "--dataset", str(SHAKESPEARE), "--student", "drop:1", "--ks", "8",
              "--rs", "", "--tail", "", *args])


def test_rs_kd_loss_is_the_sampled_cross_entropy():
    """sparse_kd_loss on log(count/N) with an empty tail has the gradient of -sum count/N log q(id)."""
    import torch

    from bench.p6_quality import rs_logprobs, rs_sample
    from trainer.losses import sparse_kd_loss

    torch.manual_seed(0)
    teacher = torch.randn(6, 20)
    ids, counts = rs_sample(teacher, 8, torch.Generator().manual_seed(0))
    assert (counts.sum(1) == 8).all() and all(len(set(r)) == 8 for r in ids)
    z = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, dtype=torch.bool)
    loss, _ = sparse_kd_loss(z, torch.as_tensor(ids), torch.as_tensor(rs_logprobs(counts)),
                             torch.full((6,), -np.inf), torch.zeros(6, dtype=torch.long), mask)
    (grad,) = torch.autograd.grad(loss, z)
    weights = torch.zeros(6, 20, dtype=torch.float64).scatter_(1, torch.as_tensor(ids),
                                                               torch.as_tensor(counts / 8.0, dtype=torch.float64))
    ref = -(weights * torch.log_softmax(z, -1)).sum(-1).mean()
    (ref_grad,) = torch.autograd.grad(ref, z)
    assert torch.allclose(grad, ref_grad, atol=1e-10)
