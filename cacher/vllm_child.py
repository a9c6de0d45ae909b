"""The vLLM side of cacher/engine_vllm.py's subprocess protocol: run by path in the vLLM interpreter.

`python cacher/vllm_child.py --request WORKDIR/request.json` loads the teacher in vLLM, scores or samples the
sequences of WORKDIR/input.npz and writes WORKDIR/out/batch-NNNNN.npz files and done.json, as the protocol in
cacher/engine_vllm.py's docstring says (its row convention, generate-mode seeds, padded logit rows, the
request's settings: DEFAULT_SETTINGS here, which the parent imports). One file on purpose: it runs by path with
PYTHONSAFEPATH=1 in an interpreter that has neither kdcache nor its dependencies, so it imports only the standard
library, numpy and (inside functions) vllm; nothing of kdcache, tokenizers, data sets or the cache format.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
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
