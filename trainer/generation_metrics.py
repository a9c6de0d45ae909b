"""The generation metrics of `kdtrain eval`: the model writes, the metric scores what it wrote.

- `rouge`: MiniLLM's protocol (ROUGE-L F1 over sampled or greedy responses, per seed, x100);
- `gsm8k`: greedy answers to GSM8K questions asked with GSM8K_INSTRUCTION, exact match of the final number, and
  the hallucination rates of trainer.hallucination on the reasoning;
- `mauve`, `bertscore`: optional packages and local feature models (OPTIONAL), refused before generating when
  they cannot work;
- `generate`: left-padded batched generation, which `grounding` (trainer.hallucination_eval) uses too.

trainer.evaluate dispatches to these. Knows models, tokenizers and the data sets' prompts; never reads a cache
and never imports the cacher.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from common.gsm8k import extract_gsm8k_answer, gsm8k_final_answer
from common.templates import prompt_only_ids
from trainer.config import GSM8K_INSTRUCTION, EvalConfig
from trainer.errors import EvalError
from trainer.hallucination import gsm8k_hallucination

# mauve-text 0.4 loads a feature model only when its name or path contains one of these.
MAUVE_MODEL_MARKERS = ("gpt2", "bert")

# ---------------------------------------------------------------------------------------------
# generation metrics


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, greedy: bool, seed: int,
             batch_size: int = 8) -> list[str]:
    """Left-padded batched generation; returns the decoded responses (special tokens removed)."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad if pad is not None else 0, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.as_tensor(p)
            attn[r, width - len(p):] = 1
        kwargs = {"max_new_tokens": max_new_tokens, "attention_mask": attn, "pad_token_id": pad,
                  "eos_token_id": tokenizer.eos_token_id}
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        gen = model.generate(ids, **kwargs)[:, width:]
        out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 x 100 (rouge-score, Porter stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise EvalError("metric 'rouge' needs rouge-score: pip install 'kdcache[eval]'") from exc
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def prompts_for(config: EvalConfig, tokenizer, template: str) -> tuple[list[list[int]], list[str], dict]:
    """Token ids of formatted prompts and their references; skips prompts over max_prompt_length."""
    from common.datasets import load_rows

    rows, columns = load_rows(config.dataset, config.split, config.dataset_config)
    for f in (config.prompt_field, config.response_field, config.input_field):
        if f and f not in columns:
            raise EvalError(f"field {f!r} is not in {config.dataset}; its fields are: {', '.join(columns)}")
    prompts, refs, skipped = [], [], 0
    for row in rows:
        text = str(row[config.prompt_field] or "")
        if template == "minillm":  # the ids `kdcache build --prompt-template minillm --input-field F` trains on
            context = str(row[config.input_field]) if config.input_field and row[config.input_field] else None
            ids = prompt_only_ids(tokenizer, text, "minillm", context)
        elif template == "gsm8k":
            ids = load_prompt_ids(tokenizer, gsm8k_prompt(text, config.gsm8k_instruction))
        else:
            ids = load_prompt_ids(tokenizer, text)
        if len(ids) > config.max_prompt_length:
            skipped += 1
            continue
        prompts.append(list(ids))
        refs.append(str(row[config.response_field]))
        if config.limit is not None and len(prompts) >= config.limit:
            break
    if not prompts:
        raise EvalError(f"{config.dataset}: no prompt fits in {{max_prompt_length}} {config.max_prompt_length}")
    return prompts, refs, {"num_examples": len(prompts), "num_skipped": skipped}


def load_prompt_ids(tokenizer, text: str) -> list[int]:
    return prompt_only_ids(tokenizer, text)


def rouge_metric(model, tokenizer, config: EvalConfig) -> dict:
    prompts, refs, counts = prompts_for(config, tokenizer, "minillm")
    max_new = max(1, config.max_length - config.max_prompt_length)
    seeds = (0,) if config.greedy else config.seeds
    per_seed = []
    for seed in seeds:
        preds = generate(model, tokenizer, prompts, max_new_tokens=max_new, greedy=config.greedy, seed=seed,
                         batch_size=config.batch_size)
        per_seed.append(rouge_l(preds, refs))
    return {"rougeL": float(np.mean(per_seed)), "rougeL_std": float(np.std(per_seed)), "rougeL_per_seed": per_seed,
            "seeds": list(seeds), "greedy": config.greedy, **counts}


def gsm8k_prompt(question: str, instruction: str = GSM8K_INSTRUCTION) -> str:
    """The question as the gsm8k metric asks it: the instruction after a blank line (once; '' adds nothing)."""
    question = question.rstrip()
    if not instruction or question.endswith(instruction):
        return question
    return f"{question}\n\n{instruction}"


def gsm8k_metric(model, tokenizer, config: EvalConfig) -> dict:
    prompts, refs, counts = prompts_for(config, tokenizer, "gsm8k")
    max_new = max(1, config.max_length - config.max_prompt_length)
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new, greedy=True, seed=0,
                     batch_size=config.batch_size)
    found = [gsm8k_final_answer(p) for p in preds]  # (answer, '####' | 'boxed' | None)
    correct = [a is not None and a == extract_gsm8k_answer(r) for (a, _), r in zip(found, refs)]
    return {"gsm8k_exact_match": float(np.mean(correct)), "num_correct": int(sum(correct)),
            "num_without_answer": sum(a is None for a, _ in found),
            "num_boxed_answers": sum(form == "boxed" for _, form in found), **counts,
            "example_correct": [int(c) for c in correct],  # per question, in order (a report's bootstrap)
            **gsm8k_hallucination(preds)}  # wrong arithmetic statements, answers without a final answer


OPTIONAL = {  # metric -> (module, pip package, env var naming the local feature model)
    "mauve": ("mauve", "mauve-text", "KDCACHE_MAUVE_MODEL"),
    "bertscore": ("bert_score", "bert-score", "KDCACHE_BERTSCORE_MODEL"),
}


def _import_optional(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def optional_metric_setup(name: str) -> tuple[object | None, str | None, str | None]:
    """(module, local feature-model folder, reason it is skipped) for mauve / bertscore.

    Not installed or not configured: a reason to report as skipped. Configured with a folder the
    package cannot use: EvalError, before anything is generated.
    """
    module_name, package, env = OPTIONAL[name]
    module = _import_optional(module_name)
    if module is None:
        return None, None, f"{module_name} is not installed (pip install {package})"
    local = os.environ.get(env)
    if not local:
        return None, None, f"set {env} to a local model folder for {name}'s features (no hub access here)"
    if not os.path.isdir(local) or not os.path.isfile(os.path.join(local, "config.json")):
        raise EvalError(f"{env}={local} is not a model folder with config.json; point it at a local copy of the "
                        f"feature model (docs/evaluation.md)")
    if name == "mauve" and not any(m in local for m in MAUVE_MODEL_MARKERS):
        raise EvalError(f"{env}={local}: mauve-text loads a feature model only when its path contains 'gpt2' (or "
                        "'bert'), and raises 'Unknown model' otherwise; put the model (e.g. gpt2-large, as MAUVE and "
                        "MiniLLM use) in a folder whose path contains 'gpt2'")
    return module, local, None


def bertscore_num_layers(folder: str, requested: int | None, known_layers: dict | None = None) -> int:
    """The layer bert_score takes features from for a local folder (bert_score.score's num_layers).

    bert_score looks num_layers up by model name (model2layers), which fails with KeyError for a path:
    use `requested` (--bertscore-layers), else bert_score's tuned layer for a folder named like a model
    it knows (roberta-large -> 17), else the folder's last layer (config num_hidden_layers).
    """
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise EvalError(f"bertscore: cannot read {folder}/config.json ({exc})") from exc
    total = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)),
                 None)
    if requested is not None:
        if total is not None and requested > total:
            raise EvalError(f"{{bertscore_layers}} {requested}: {folder} has {total} layers; use 1..{total}")
        return requested
    known = (known_layers or {}).get(os.path.basename(folder.rstrip("/")))
    if isinstance(known, int) and (total is None or known <= total):
        return known
    if total is None:
        raise EvalError(f"bertscore: {folder}/config.json names no layer count (num_hidden_layers); pass "
                        "{bertscore_layers} N")
    return total


def optional_metric(name: str, model, tokenizer, config: EvalConfig) -> dict:
    """mauve / bertscore: computed only with their package and a local feature model configured."""
    module, local, skipped = optional_metric_setup(name)
    if skipped:
        return {"skipped": skipped}
    layers = None
    if name == "bertscore":
        utils = _import_optional("bert_score.utils")
        layers = bertscore_num_layers(local, config.bertscore_layers, getattr(utils, "model2layers", None))
    prompts, refs, counts = prompts_for(config, tokenizer, "minillm")
    preds = generate(model, tokenizer, prompts, max_new_tokens=max(1, config.max_length - config.max_prompt_length),
                     greedy=True, seed=0, batch_size=config.batch_size)
    try:
        if name == "bertscore":
            _, _, f1 = module.score(preds, refs, model_type=local, num_layers=layers, lang=None)
            return {"bertscore_f1": float(f1.mean()), "num_layers": layers, "model": local, **counts}
        out = module.compute_mauve(p_text=refs, q_text=preds, featurize_model_name=local, verbose=False)
        return {"mauve": float(out.mauve), "model": local, **counts}
    except Exception as exc:  # the packages raise many types (KeyError, AssertionError, OverflowError, ...)
        detail = f"num_layers={layers}, " if layers is not None else ""
        raise EvalError(f"{name} failed with feature model {local} ({detail}{type(exc).__name__}: {exc}); check that "
                        "the folder holds a complete model and tokenizer (with model_max_length set) for "
                        f"{OPTIONAL[name][1]} (docs/evaluation.md)") from exc
