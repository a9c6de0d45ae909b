"""Run in the vLLM interpreter: the teacher decodes with a draft model (vLLM's speculative decoding) and the
counters vLLM keeps of it are written back as JSON.

Started by trainer/speculative.py as `VLLM_PYTHON speculative_host.py --request DIR/request.json` with
PYTHONSAFEPATH=1: it is run by path, so it imports only the standard library and vllm (never kdcache, torch or
numpy directly). Protocol (version 1):

- request.json: {"version": 1, "teacher": folder, "draft": folder, "prompts": [[token id, ...], ...],
  "num_draft_tokens": gamma, "num_new_tokens": N, "temperature": t, "seed": s, "max_model_len": L,
  "dtype": "float32", "enforce_eager": bool, "parent_pid": int}.
- result.json (written as result.json.tmp, then renamed): {"version": 1, "vllm_version": str,
  "spec_decode": {metric name: number or list of numbers} for every `vllm:spec_decode*` metric of
  `LLM.get_metrics()`, "outputs": [[token id, ...], ...] (each prompt's N generated ids, in prompt order),
  "seconds": float}.

What vLLM 0.32.0 does with a draft model (read in its source: v1/spec_decode/llm_base_proposer.py,
v1/sample/rejection_sampler.py; config/speculative.py `draft_sample_method="greedy"` by default): the draft
proposes its argmax tokens, and the rejection sampler takes their draft probability as 1, so at temperature 0 a
token is accepted exactly when it is the teacher's argmax, and at temperature t > 0 with probability
p_teacher,t(token). Every prompt generates exactly N tokens (`ignore_eos`). vLLM starts worker processes that
may re-import this file, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

PROTOCOL_VERSION = 1


def exit_with_parent(parent_pid: int) -> None:
    """Kill this process group (this process and vLLM's) once `parent_pid` is no longer our parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def spec_decode_metrics(llm) -> dict:
    """{name: value} of vLLM's speculative-decoding counters (a Vector's value is its list of values)."""
    out = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            values = getattr(metric, "values", None)
            out[metric.name] = list(values) if values is not None else getattr(metric, "value", None)
    return out


def run(request: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.time()
    llm = LLM(model=request["teacher"], skip_tokenizer_init=True, dtype=request["dtype"],
              max_model_len=request["max_model_len"], seed=request["seed"], enforce_eager=request["enforce_eager"],
              generation_config="vllm", disable_log_stats=False,
              speculative_config={"method": "draft_model", "model": request["draft"],
                                  "num_speculative_tokens": request["num_draft_tokens"]})
    params = [SamplingParams(temperature=request["temperature"], top_p=1.0, top_k=0, seed=request["seed"] + i,
                             max_tokens=request["num_new_tokens"], ignore_eos=True, detokenize=False)
              for i in range(len(request["prompts"]))]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    return {"version": PROTOCOL_VERSION, "vllm_version": vllm.__version__, "spec_decode": spec_decode_metrics(llm),
            "outputs": [list(o.outputs[0].token_ids) for o in outputs], "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True)
    path = Path(parser.parse_args().request)
    request = json.loads(path.read_text())
    if request.get("version") != PROTOCOL_VERSION:
        raise SystemExit(f"{path}: protocol version {request.get('version')!r}, this host speaks {PROTOCOL_VERSION}")
    exit_with_parent(request.get("parent_pid", os.getppid()))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; the default is 4
    result = run(request)
    tmp = path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path.with_name("result.json"))


if __name__ == "__main__":
    main()
