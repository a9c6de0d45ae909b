"""`kdtrain eval`: judge a model with real metrics.

Metrics (each a plain function returning a dict of numbers):
- `ppl`: token-weighted perplexity on held-out text: `--dataset` (all of it), or without it the
  held-out sequences of `--cache` (the trainer's held-out rule, so the same text for every stage of a
  chain, never trained on). Windowing of a data set: each document is cut into
  consecutive, non-overlapping windows of `max_length` tokens (common.sequences rules) and every row whose
  next token is in the window and masked in (all rows of plain text; response rows of
  prompt/response data) counts once: ppl = exp(sum NLL / number of predicted tokens).
- `agreement`: against a teacher cache: top-1 agreement (student argmax == teacher's most likely
  token) and mean KL(teacher || student) per token over the cache's K+1 buckets (top K + tail), on
  the cache's loss rows (held-out rows only when `heldout_only`). The KL is the trainer's held-out KL
  (trainer.run_loss.heldout_kl: sparse_kd_loss's forward-KL term, so a K = V cache's rest bucket is empty
  as the model's is), over the model's logits of the cache's token ids only (its padded rows cut off).
  The model needs a row for every id of the cache's tokenizer (every cached id is below it).
- `rouge`: MiniLLM's protocol: its instruction template (common.templates' `minillm` template, the one
  `kdcache build --prompt-template minillm` trains with), responses sampled at temperature 1 with
  top_p 1 for several seeds (or greedy), ROUGE-L F1 (rouge-score, stemming on) averaged per seed, then
  mean and std over seeds, x100 as in the paper.
- `gsm8k`: greedy answers to GSM8K questions asked with GSM8K_INSTRUCTION (end with `#### N`);
  exact match of the final `#### N` number, or of the last `\boxed{N}` when there is no `####`
  (instruct models trained on MATH-style data answer that way): common.gsm8k.extract_gsm8k_answer,
  the same function `kdcache build --filter gsm8k-answer` keeps samples by.
- `mauve`, `bertscore`: when their packages and local models are installed (see docs/evaluation.md);
  otherwise the metric is reported as skipped with the reason. A feature model that cannot work
  (mauve-text only loads folders whose path contains "gpt2" or "bert") is refused before generating.

Held-out rows of a cache (ppl without --dataset, agreement): the fraction is the evaluated run's own, read from
its run.json; a given --eval-fraction must select a subset of those rows (`heldout_split`,
docs/runs-and-plans.md section 2). Results say which fraction they used and where it came from.

Knows models, the cache format's reader and the data; never imports the cacher.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.sequences import load_sequences
from shared.reader import CacheReader
from trainer.config import EVAL_FRACTION, EvalConfig
from trainer.data import cache_sequences
from trainer.errors import EvalError
from trainer.generation_metrics import (
    OPTIONAL,
    generate,
    gsm8k_metric,
    optional_metric,
    optional_metric_setup,
    rouge_metric,
)
from trainer.run_folder import write_file_atomically
from trainer.student import load_model

# ---------------------------------------------------------------------------------------------
# ppl


@torch.no_grad()
def perplexity(model, sequences, batch_size: int = 8) -> dict:
    """exp(token-weighted mean NLL) over the masked rows of sequences (common.sequences.Sequence).

    Also per sequence, in order: sequence_nll (its summed NLL) and sequence_tokens (its scored tokens), so a
    report can bootstrap over sequences (orchestration/noise.py).
    """
    total_nll, total_tokens = 0.0, 0
    sequence_nll, sequence_tokens = [], []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(s.input_ids) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, s in enumerate(batch):
            n = len(s.input_ids)
            ids[r, :n] = torch.as_tensor(s.input_ids)
            attn[r, :n] = 1
            mask[r, :n] = torch.as_tensor(s.loss_mask)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, L-1, V)
        targets = ids[:, 1:]
        m = mask[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits[m], targets[m], reduction="none")  # (M,)
        per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, m.nonzero()[:, 0], nll.double())  # (B,)
        sequence_nll += per_row.tolist()
        sequence_tokens += m.sum(1).tolist()
        total_nll += float(nll.double().sum())
        total_tokens += int(m.sum())
    if total_tokens == 0:
        raise EvalError("no tokens to score for ppl (all windows shorter than 2 tokens?)")
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "num_tokens": total_tokens, "sequence_nll": sequence_nll,
            "sequence_tokens": sequence_tokens}


# ---------------------------------------------------------------------------------------------
# agreement with a teacher cache


@torch.no_grad()
def agreement(model, cache: str, *, heldout_only: bool = True, limit: int | None = None, batch_size: int = 8,
              eval_fraction: float = EVAL_FRACTION) -> dict:
    """Top-1 agreement and mean KL(teacher || student) over the cache's K+1 buckets, per loss token.

    The KL is trainer.run_loss.heldout_kl (the trainer's eval_kl) over the model's logits of the cache's
    token ids (trainer.student.cache_token_ids; rows beyond them are the model's padding). Also per sequence with
    loss rows, in order: sequence_agreed (rows agreeing), sequence_kl (summed KL), sequence_tokens (rows).
    """
    from trainer.batch import TeacherRows
    from trainer.run_loss import heldout_kl, token_logits
    from trainer.student import cache_token_ids

    reader = CacheReader(cache, verify_on_read=True)
    selected = cache_sequences(reader, heldout_only=heldout_only, limit=limit, eval_fraction=eval_fraction)
    if not selected:
        raise EvalError(f"cache {cache} has no {'held-out ' if heldout_only else ''}sequences to compare with")
    emb = model.get_output_embeddings().weight.shape[0]
    num_ids = cache_token_ids(reader.manifest.tokenizer)  # the tokenizer's ids: every cached id is below it
    if emb < num_ids:
        raise EvalError(f"model's vocabulary ({emb}) is smaller than the cache's tokenizer ({num_ids} ids): "
                        "different tokenizer?")
    kl_sum, agree, count = 0.0, 0, 0
    per_sequence = {"sequence_agreed": [], "sequence_kl": [], "sequence_tokens": []}
    for start in range(0, len(selected), batch_size):
        seqs = selected[start:start + batch_size]
        width = max(len(s["input_ids"]) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s["input_ids"])] = torch.as_tensor(s["input_ids"].astype(np.int64))
            attn[r, :len(s["input_ids"])] = 1
        logits = token_logits(model(input_ids=ids, attention_mask=attn).logits.float(), num_ids)  # (B, L, <= V)
        for r, s in enumerate(seqs):
            n = len(s["input_ids"])
            mask = torch.as_tensor(s["loss_mask"])
            if not mask.any():
                continue
            lg = logits[r, :n][mask]  # (M, V): the model's padded rows cut off
            targets = torch.as_tensor(s["input_ids"][1:].astype(np.int64))[mask[: n - 1]]  # (M,) loss rows are < n-1
            topk_ids = torch.as_tensor(s["topk_ids"].astype(np.int64))[mask]  # (M, K)
            top_lp = torch.as_tensor(s["topk_logprobs"].astype(np.float32))[mask]  # (M, K)
            tail_lp = torch.as_tensor(s["tail_logprob"].astype(np.float32))[mask]  # (M,)
            agreed = int((lg.argmax(-1) == topk_ids[:, 0]).sum())
            agree += agreed
            teacher = TeacherRows(topk_ids=topk_ids, topk_logprobs=top_lp, tail_logprob=tail_lp)
            kl = float(heldout_kl(lg, teacher, targets)) * int(mask.sum())
            kl_sum += kl
            count += int(mask.sum())
            for key, value in (("sequence_agreed", agreed), ("sequence_kl", kl), ("sequence_tokens", int(mask.sum()))):
                per_sequence[key].append(value)
    if count == 0:
        raise EvalError(f"cache {cache} has no loss tokens in the selected sequences")
    return {"top1_agreement": agree / count, "kl": kl_sum / count, "num_tokens": count, "cache": cache, **per_sequence}


@torch.no_grad()
def draft_acceptance(model, config: EvalConfig, eval_fraction: float) -> dict:
    """The model as a speculative-decoding draft of the cache's teacher, on the cache's held-out sequences
    (trainer.acceptance.acceptance_metric): bounds from the top-K, exact with a teacher."""
    from trainer.acceptance import acceptance_metric
    from trainer.student import cache_token_ids

    reader = CacheReader(config.cache, verify_on_read=True)
    selected = cache_sequences(reader, heldout_only=config.heldout_only, limit=config.limit, eval_fraction=eval_fraction)
    num_ids = cache_token_ids(reader.manifest.tokenizer)
    teacher = load_model(config.teacher, need_tokenizer=False)[0] if config.teacher else None
    for name, m in (("{model}", model), ("{teacher}", teacher)):
        rows = m.get_output_embeddings().weight.shape[0] if m is not None else num_ids
        if rows < num_ids:
            raise EvalError(f"{name}: its vocabulary ({rows}) is smaller than the cache's {num_ids} token ids: another "
                            "tokenizer? The draft and the teacher must share the cache's tokenizer")
    return {**acceptance_metric(model, selected, num_ids, teacher=teacher, batch_size=config.batch_size),
            "cache": config.cache, "teacher": config.teacher}


def exposure(model, tokenizer, config: EvalConfig, eval_fraction: float) -> dict:
    """KL(teacher || model) on the model's own samples of the cache's held-out prompts (trainer/exposure.py)."""
    from trainer.exposure import exposure_metric

    teacher = load_model(config.teacher, need_tokenizer=False)[0]
    value = exposure_metric(model, tokenizer, teacher, config.cache, eval_fraction=eval_fraction, seeds=config.seeds,
                            greedy=config.greedy, max_length=config.max_length,
                            max_prompt_length=config.max_prompt_length, limit=config.limit, batch_size=config.batch_size)
    return {**value, "teacher": config.teacher}


def run_record(model: str) -> tuple[dict, str] | None:
    """(run.json's contents, its path) when `model` is a kdtrain run folder or one of its checkpoints, else None.

    A checkpoint `<run>/checkpoints/step-NNNNNN` belongs to the run in `<run>`.
    """
    folder = os.path.abspath(model)
    candidates = [folder]
    if os.path.basename(os.path.dirname(folder)) == "checkpoints" and os.path.basename(folder).startswith("step-"):
        candidates.append(os.path.dirname(os.path.dirname(folder)))
    for candidate in candidates:
        path = os.path.join(candidate, "run.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, ValueError) as exc:
                raise EvalError(f"{path} cannot be read ({exc}), so which cache rows that run trained on is unknown; "
                                "restore it, or evaluate with --all-rows (training rows included)") from exc
            return record, path
    return None


def heldout_split(config: EvalConfig) -> tuple[float, str]:
    """(eval_fraction, where it came from) for cache-row metrics (docs/runs-and-plans.md, section 2).

    A kdtrain run's own fraction (run.json) unless config.eval_fraction is given; a given fraction must select a subset
    of the run's held-out rows. The rule is a threshold on a fixed number per sequence, so that holds exactly when
    its threshold is not above the run's.
    """
    from trainer.data import HASH_BUCKETS

    found = run_record(config.model)
    if found is None:
        unknown = "not a kdtrain run folder (no run.json), so the rows this model trained on are unknown"
        if config.eval_fraction is None:
            return EVAL_FRACTION, f"default --eval-fraction {EVAL_FRACTION}; {unknown}"
        return config.eval_fraction, f"--eval-fraction; {unknown}"
    record, path = found
    recorded = record.get("config", {}).get("eval_fraction") if isinstance(record.get("config"), dict) else None
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0 <= recorded < 1:
        raise EvalError(f"{path} records no valid config.eval_fraction (got {recorded!r}), so which cache rows that "
                        "run "
                        "held out is unknown; evaluate with --all-rows (training rows included) or fix run.json")
    if config.eval_fraction is None:
        return float(recorded), f"run.json ({path})"
    if round(config.eval_fraction * HASH_BUCKETS) > round(recorded * HASH_BUCKETS):
        raise EvalError(f"{{eval_fraction}} {config.eval_fraction} selects more sequences than the run held out "
                        f"(eval_fraction {recorded} in {path}), so it would score training rows as held-out; omit "
                        f"{{eval_fraction}} (the run's {recorded} is used) or pass {recorded} or less")
    return config.eval_fraction, f"--eval-fraction, a subset of the held-out rows of {path} (eval_fraction {recorded})"


def _as_sequence(arrays: dict):
    """A cache sequence as a common.sequences.Sequence (ppl counts its loss rows)."""
    from common.sequences import Sequence

    return Sequence(arrays["input_ids"].astype(np.int64), arrays["loss_mask"].astype(bool), source_index=-1)


# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    model: str
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"model": self.model, "metrics": self.metrics, "seconds": self.seconds}


RESULT_KEYS = {"model", "metrics", "seconds"}  # EvalResult.to_json's: what marks a file as kdtrain eval's result


def check_result_path(path: str) -> None:
    """{out} may be a new file or an earlier result of kdtrain eval (a plan's eval stage rewrites its own); anything
    else there is refused before any work, so that eval never replaces a file it did not write."""
    if not os.path.lexists(path):
        return
    problem = None
    if os.path.islink(path) or not os.path.isfile(path):
        problem = "is not a regular file"
    elif os.path.getsize(path) > 64 * 2**20:
        problem = "is larger than any kdtrain eval result"
    else:
        try:
            with open(path, "rb") as f:
                body = json.loads(f.read())
        except (OSError, ValueError):
            body = None
        if not (isinstance(body, dict) and set(body) == RESULT_KEYS and isinstance(body["metrics"], dict)):
            problem = "exists and is not a kdtrain eval result (a JSON object of model, metrics and seconds)"
    if problem:
        raise EvalError(f"{{out}} {path} {problem}; kdtrain eval replaces only its own results: pass a new file name")


def evaluate(config: EvalConfig, log=print) -> EvalResult:
    started = time.time()
    if config.out:
        check_result_path(config.out)
    for metric in config.metrics:
        if metric in OPTIONAL:
            optional_metric_setup(metric)  # a feature model that cannot work fails now, not after generating
    if "speculative" in config.metrics:
        from trainer.speculative import vllm_interpreter

        vllm_interpreter()  # no vLLM interpreter: refused before any model is loaded
    on_cache_rows = (any(m in config.metrics for m in ("agreement", "acceptance", "exposure"))
                     or (("ppl" in config.metrics or "speculative" in config.metrics) and not config.dataset))
    if on_cache_rows and config.heldout_only:
        fraction, split_from = heldout_split(config)  # before loading anything: a refusal costs nothing
        rows = {"source": "cache held-out", "eval_fraction": fraction, "split_from": split_from}
    else:
        fraction, rows = 0.0, {"source": "cache, all rows (training rows included)"}
    model, tokenizer = load_model(config.model,  # text metrics need --dataset; exposure the stop tokens
                                  need_tokenizer=bool(config.dataset) or "exposure" in config.metrics)
    result = EvalResult(model=config.model)
    for metric in config.metrics:
        t0 = time.time()
        if metric == "ppl" and not config.dataset:
            seqs = [_as_sequence(d) for d in cache_sequences(CacheReader(config.cache, verify_on_read=True),
                                                             heldout_only=config.heldout_only, limit=config.limit,
                                                             eval_fraction=fraction)]
            value = {**perplexity(model, seqs, config.batch_size), "num_windows": len(seqs), **rows}
        elif metric == "ppl":
            seqs, _ = load_sequences(config.dataset, tokenizer, split=config.split, config=config.dataset_config,
                                     text_field=config.text_field,
                                        prompt_field=config.prompt_field, response_field=config.response_field,
                                        max_length=config.max_length, limit=config.limit)
            value = {**perplexity(model, seqs, config.batch_size), "num_windows": len(seqs)}
        elif metric == "agreement":
            value = agreement(model, config.cache, heldout_only=config.heldout_only, limit=config.limit,
                              batch_size=config.batch_size, eval_fraction=fraction)
            value.update(rows)
        elif metric == "exposure":
            value = {**exposure(model, tokenizer, config, fraction), **rows}
        elif metric == "acceptance":
            value = {**draft_acceptance(model, config, fraction), **rows}
        elif metric == "speculative":
            from trainer.speculative import speculative_metric

            value = {**speculative_metric(model, tokenizer, config, fraction), **({} if config.dataset else rows)}
        elif metric == "grounding":
            from trainer.hallucination_eval import grounding_metric

            value = grounding_metric(model, tokenizer, config, generate)
        elif metric == "rouge":
            value = rouge_metric(model, tokenizer, config)
        elif metric == "gsm8k":
            value = gsm8k_metric(model, tokenizer, config)
        else:
            value = optional_metric(metric, model, tokenizer, config)
        value["seconds"] = round(time.time() - t0, 2)
        result.metrics[metric] = value
        log(f"{metric}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
                                      if not isinstance(v, list)))
    result.seconds = time.time() - started
    if config.out:
        check_result_path(config.out)  # again: the metrics took a while
        os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
        write_file_atomically(config.out, json.dumps(result.to_json(), indent=1).encode())  # a link is replaced
    return result
