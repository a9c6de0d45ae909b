"""`kdtrain eval --metrics speculative`: the evaluated model as its teacher's draft in a real speculative-decoding
run (vLLM), and beside the measurement the estimate kdcache computes for what vLLM does.

What vLLM 0.32.0 computes (trainer/speculative_host.py; docs/evaluation.md, "Speculative decoding measured with
vLLM"): the draft model proposes gamma tokens by argmax, one after the other, and the teacher accepts drafted
token x with probability p_teacher,t(x) (the draft's probability taken as 1), stopping at the first rejection.
- temperature 0: x is accepted exactly when it is the teacher's argmax. The output is the teacher's greedy
  continuation, so the whole run is determined by one bit per position, m_j = [draft's argmax after the prompt and
  the teacher's first j tokens == the teacher's token j], computed here with transformers: `replay_greedy`
  replays vLLM's drafts over those bits (it predicts vLLM's counters exactly when both runs reach the same
  argmaxes), and `estimate` applies the gamma formula to their mean.
- temperature t > 0: the per-position rate is E[p_teacher,t(argmax of the draft)] along the teacher's samples,
  not sum_x min(p, q) (the `acceptance` metric's alpha, for a draft that samples).
Knows models' forwards and the host's JSON protocol; runs vLLM only through the interpreter common.vllm_python
finds; never imports vllm or the cacher.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from common.vllm_python import CPU_FAST_ENV, PYTHON_ENV_VAR, find_vllm_python, probe_vllm_python
from trainer.acceptance import tokens_per_teacher_forward
from trainer.errors import EvalError

HOST = Path(__file__).resolve().with_name("speculative_host.py")
HOST_PROTOCOL_VERSION = 1
SEED = 0  # the teacher's samples at temperature > 0: transformers' generator, vLLM's seed + prompt index
INSTALL_HINT = (f"set {PYTHON_ENV_VAR} to the python of a venv with vLLM; `bash .ci/install --vllm` makes one in "
                f".venv-vllm (then {PYTHON_ENV_VAR}=.venv-vllm/bin/python)")
COUNTERS = {"num_drafts": "vllm:spec_decode_num_drafts", "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
            "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
            "accepted_per_position": "vllm:spec_decode_num_accepted_tokens_per_pos"}

# ---------------------------------------------------------------------------------------------
# Pure functions


def summarize(counts: dict) -> dict:
    """Rates from speculative-decoding counts (num_drafts, num_draft_tokens, num_accepted_tokens,
    accepted_per_position: drafts whose first k+1 tokens were all accepted), as vLLM's own log reports them:
    acceptance_rate = accepted / draft tokens, acceptance_per_position[k] = accepted_per_position[k] / drafts,
    tokens_per_teacher_forward = 1 + accepted / drafts (None without drafts)."""
    drafts, tokens, accepted = counts["num_drafts"], counts["num_draft_tokens"], counts["num_accepted_tokens"]
    per_position = list(counts["accepted_per_position"])
    return {**counts, "acceptance_rate": accepted / tokens if tokens else None,
            "acceptance_per_position": [a / drafts for a in per_position] if drafts else None,
            "tokens_per_teacher_forward": 1 + accepted / drafts if drafts else None}


def parse_vllm_counters(spec_decode: dict, num_draft_tokens: int) -> dict:
    """The counts `summarize` takes, from the host's {metric name: value} (vLLM's `LLM.get_metrics()`)."""
    missing = [name for name in COUNTERS.values() if name not in spec_decode]
    if missing:
        raise RuntimeError(f"vLLM reported no {', '.join(missing)} (metrics: {sorted(spec_decode)}); was speculative "
                           "decoding on, with disable_log_stats=False?")
    counts = {key: spec_decode[name] for key, name in COUNTERS.items() if key != "accepted_per_position"}
    counts = {key: int(value) for key, value in counts.items()}
    per_position = [int(v) for v in spec_decode[COUNTERS["accepted_per_position"]]]
    if len(per_position) != num_draft_tokens:
        raise RuntimeError(f"vLLM reported {len(per_position)} draft positions, {num_draft_tokens} were asked for")
    return {**counts, "accepted_per_position": per_position}


def replay_greedy(matches: Sequence[bool], num_draft_tokens: int, num_new_tokens: int) -> dict:
    """The counts of greedy speculative decoding over one prompt's match bits (summarize's input).

    matches[j]: whether the draft's argmax, given the prompt and the teacher's first j tokens, is the teacher's
    token j; at least num_new_tokens - 1 + num_draft_tokens of them. The teacher's prefill gives token 0; each
    later step drafts num_draft_tokens tokens, keeps the leading matches and adds the teacher's own token, until
    num_new_tokens tokens exist (vLLM counts the last step's drafts whole, also those past the limit)."""
    if len(matches) < num_new_tokens - 1 + num_draft_tokens:
        raise ValueError(f"{len(matches)} match bits for {num_new_tokens} tokens with drafts of {num_draft_tokens}")
    per_position = [0] * num_draft_tokens
    drafts = accepted = 0
    done = 1
    while done < num_new_tokens:
        run = 0
        while run < num_draft_tokens and matches[done + run]:
            per_position[run] += 1
            run += 1
        drafts += 1
        accepted += run
        done += run + 1
    return {"num_drafts": drafts, "num_draft_tokens": drafts * num_draft_tokens, "num_accepted_tokens": accepted,
            "accepted_per_position": per_position}


def add_counts(counts: Sequence[dict]) -> dict:
    """Counts summed over prompts."""
    keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    return {**{k: sum(c[k] for c in counts) for k in keys},
            "accepted_per_position": [sum(v) for v in zip(*(c["accepted_per_position"] for c in counts))]}


def estimate(rate: float, num_draft_tokens: int) -> dict:
    """What a per-position acceptance `rate`, independent between positions, predicts for drafts of gamma tokens:
    acceptance_per_position[k] = rate^(k+1), acceptance_rate = their mean, and tokens_per_teacher_forward =
    (1 - rate^(gamma+1)) / (1 - rate) (trainer.acceptance.tokens_per_teacher_forward)."""
    per_position = [rate ** (k + 1) for k in range(num_draft_tokens)]
    return {"rate": rate, "acceptance_per_position": per_position,
            "acceptance_rate": sum(per_position) / num_draft_tokens,
            "tokens_per_teacher_forward": tokens_per_teacher_forward(rate, num_draft_tokens)}


# ---------------------------------------------------------------------------------------------
# transformers: the teacher's continuation and the draft's argmax along it


@torch.no_grad()
def teacher_continuation(teacher, prompt: Sequence[int], num_tokens: int, temperature: float,
                         generator: torch.Generator | None = None) -> list[int]:
    """The teacher's next num_tokens ids after prompt: argmax at temperature 0, else sampled from
    softmax(logits / temperature); end-of-sequence tokens do not stop it (vLLM's ignore_eos)."""
    device = next(teacher.parameters()).device
    ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
    out, past = [], None
    for _ in range(num_tokens):
        result = teacher(input_ids=ids, past_key_values=past, use_cache=True)
        past, logits = result.past_key_values, result.logits[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
        out.append(token)
        ids = torch.tensor([[token]], device=device)
    return out


@torch.no_grad()
def draft_rates(model, teacher, prompt: Sequence[int], continuation: Sequence[int], temperature: float) -> list[float]:
    """Per continuation position j: at temperature 0, 1.0 where the draft's argmax after prompt + continuation[:j]
    is continuation[j], else 0.0; at t > 0, the teacher's probability at temperature t of that argmax."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(prompt) + list(continuation)], dtype=torch.long, device=device)
    rows = slice(len(prompt) - 1, ids.shape[1] - 1)  # row i predicts token i + 1
    draft = model(input_ids=ids).logits[0, rows].float().argmax(-1)  # (n,)
    if temperature == 0:
        return (draft.cpu() == torch.as_tensor(list(continuation))).float().tolist()
    probs = torch.softmax(teacher(input_ids=ids).logits[0, rows].float() / temperature, -1)  # (n, V)
    return probs.gather(1, draft[:, None])[:, 0].cpu().tolist()


def hf_estimate(model, teacher, prompts: list[list[int]], *, num_draft_tokens: int, num_new_tokens: int,
                temperature: float, seed: int) -> dict:
    """kdcache's figures for vLLM's run on the same prompts (module docstring). Temperature 0 also gives the
    replayed counts and the teacher's greedy continuations (to compare with vLLM's outputs)."""
    generator = torch.Generator().manual_seed(seed)
    # Positions 1 .. N-1 are drafted (token 0 comes from the teacher's prefill), so the continuation is N tokens;
    # at temperature 0 the replay also needs what the last step's drafts may reach past the limit.
    extra = num_draft_tokens if temperature == 0 else 1
    rates, replays, continuations = [], [], []
    for prompt in prompts:
        continuation = teacher_continuation(teacher, prompt, num_new_tokens - 1 + extra, temperature, generator)
        row = draft_rates(model, teacher, prompt, continuation, temperature)
        rates += row[1:num_new_tokens]  # token 0 comes from the teacher's prefill: nothing drafts it
        continuations.append(continuation[:num_new_tokens])
        if temperature == 0:
            replays.append(replay_greedy([r == 1.0 for r in row], num_draft_tokens, num_new_tokens))
    rate = sum(rates) / len(rates)
    out = {"estimate": estimate(rate, num_draft_tokens), "num_positions": len(rates)}
    if temperature == 0:
        out["replayed"] = summarize(add_counts(replays))
    return {**out, "continuations": continuations}


# ---------------------------------------------------------------------------------------------
# vLLM through its interpreter


def vllm_interpreter() -> tuple[str, str]:
    """(python, its vllm version), or EvalError saying how to get one."""
    python = find_vllm_python()
    if python is None:
        raise EvalError(f"metric 'speculative' runs vLLM in its own interpreter and none was found: {INSTALL_HINT}")
    version, problem = probe_vllm_python(python)
    if problem:
        raise EvalError(f"metric 'speculative' cannot run vLLM: {problem}; {INSTALL_HINT}")
    return python, version


def check_same_vocabulary(model, teacher) -> None:
    """vLLM's draft_model method needs the draft's and the teacher's logit rows to be the same ids."""
    rows = [m.get_output_embeddings().weight.shape[0] for m in (model, teacher)]
    if rows[0] != rows[1]:
        raise EvalError(f"metric 'speculative': {{model}} has {rows[0]} logit rows, {{teacher}} {rows[1]}; vLLM drafts "
                        "only with a model of the teacher's vocabulary (the same tokenizer and the same padded size)")


def run_host(python: str, request: dict, workdir: Path, *, timeout: float = 3600.0) -> dict:
    """Run speculative_host.py under `python` on request (its protocol); its result.json as a dict."""
    (workdir / "request.json").write_text(json.dumps({"version": HOST_PROTOCOL_VERSION, "parent_pid": os.getpid(),
                                                      **request}))
    env = {**os.environ, "PYTHONSAFEPATH": "1", **({} if torch.cuda.is_available() else CPU_FAST_ENV)}
    log = workdir / "vllm.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([python, str(HOST), "--request", str(workdir / "request.json")], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # interrupted or timed out: vLLM's engine and workers go too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = workdir / "result.json"
    if code != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise EvalError(f"metric 'speculative': vLLM ({python}) exited with code {code}; the end of its log:\n{tail}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# The metric


def speculative_prompts(tokenizer, config, eval_fraction: float) -> list[list[int]]:
    """Prompts as the `acceptance` metric's continuations take them (trainer.acceptance.continuation_prompt_length)
    from --dataset's windows, else the cache's held-out sequences; at most {max_prompt_length} tokens (the last)."""
    from common.sequences import load_sequences
    from shared.reader import CacheReader
    from trainer.acceptance import continuation_prompt_length
    from trainer.data import cache_sequences

    if config.dataset:
        windows, _ = load_sequences(config.dataset, tokenizer, split=config.split, config=config.dataset_config,
                                    text_field=config.text_field, prompt_field=config.prompt_field,
                                    response_field=config.response_field, max_length=config.max_length,
                                    limit=config.limit)
        pairs = [(w.input_ids, w.loss_mask) for w in windows]
    else:
        rows = cache_sequences(CacheReader(config.cache, verify_on_read=True), heldout_only=config.heldout_only,
                               limit=config.limit, eval_fraction=eval_fraction)
        pairs = [(r["input_ids"], r["loss_mask"]) for r in rows]
    prompts = [[int(t) for t in ids[:continuation_prompt_length(mask)][-config.max_prompt_length:]]
               for ids, mask in pairs]
    if not prompts:
        raise EvalError("metric 'speculative': no prompts (an empty held-out set? a larger {eval_fraction}, "
                        "--all-rows, or {dataset})")
    return prompts


def speculative_metric(model, tokenizer, config, eval_fraction: float) -> dict:
    """`kdtrain eval --metrics speculative`: vLLM's measured counters and rates (`measured`), kdcache's estimate
    for the same prompts (`estimate`; at temperature 0 also `replayed`, vLLM's counters predicted from the match
    bits, and how many of vLLM's outputs are the teacher's greedy continuation as transformers computes it)."""
    from common.models import model_folder
    from trainer.student import load_model

    python, version = vllm_interpreter()  # before loading anything: a refusal costs nothing
    teacher = load_model(config.teacher, need_tokenizer=False)[0]
    check_same_vocabulary(model, teacher)
    prompts = speculative_prompts(tokenizer, config, eval_fraction)
    gamma, num_new, temperature, seed = (config.num_draft_tokens, config.num_new_tokens,
                                         config.speculative_temperature, SEED)
    ours = hf_estimate(model, teacher, prompts, num_draft_tokens=gamma, num_new_tokens=num_new,
                       temperature=temperature, seed=seed)
    request = {"teacher": str(model_folder(config.teacher)), "draft": str(model_folder(config.model)),
               "prompts": prompts, "num_draft_tokens": gamma, "num_new_tokens": num_new, "temperature": temperature,
               "seed": seed,
               "max_model_len": max(map(len, prompts)) + num_new + gamma + 1, "dtype": "float32",
               "enforce_eager": not torch.cuda.is_available()}
    with tempfile.TemporaryDirectory(prefix="kdtrain-speculative-") as work:
        result = run_host(python, request, Path(work))
    measured = summarize(parse_vllm_counters(result["spec_decode"], gamma))
    out = {"measured": measured, "estimate": ours["estimate"],
           "tokens_per_teacher_forward": measured["tokens_per_teacher_forward"],
           "estimate_tokens_per_teacher_forward": ours["estimate"]["tokens_per_teacher_forward"],
           "num_draft_tokens": gamma, "num_new_tokens": num_new, "temperature": temperature, "seed": seed,
           "num_prompts": len(prompts), "num_positions": ours["num_positions"], "vllm": version,
           "vllm_seconds": round(result["seconds"], 2), "teacher": config.teacher}
    if temperature == 0:
        same = sum(list(o) == c for o, c in zip(result["outputs"], ours["continuations"]))
        out.update(replayed=ours["replayed"], outputs_equal_teacher_greedy=same)
    if not all(math.isfinite(v) for v in measured["acceptance_per_position"] or []):
        raise RuntimeError(f"vLLM's counters gave non-finite rates: {measured}")
    return out
