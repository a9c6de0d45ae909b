"""`kdtrain eval --metrics grounding`: a model's greedy answers to grounded questions, scored by
trainer/hallucination.py (the share of numbers and names found neither in the prompt nor in the context).

The rows are those of GROUNDED_CATEGORIES (dolly's `category` column) when the data set has that column,
else every row; prompts are the `rouge` metric's (MiniLLM's template with the context
as its input, common.templates), so a student is judged on the prompts it was distilled on.
The GSM8K half of the hallucination rate needs no code here: the `gsm8k` metric adds it to its answers.

Knows models, tokenizers and data rows; the definitions live in trainer/hallucination.py.
"""

from __future__ import annotations

from common.datasets import load_rows
from common.templates import prompt_only_ids
from trainer.errors import EvalError
from trainer.hallucination import grounding_hallucination

# dolly-15k's categories whose answers must come from the given context (the others are open questions).
GROUNDED_CATEGORIES = ("closed_qa", "information_extraction")
CATEGORY_FIELD = "category"


def grounded_rows(config, tokenizer) -> tuple[list[list[int]], list[str], list[str | None], dict]:
    """(prompt ids, prompt texts, context texts, counts) of the grounded rows whose prompt fits max_prompt_length.

    config: the EvalConfig fields dataset, split, dataset_config, prompt_field, input_field, max_prompt_length,
    limit. Raises EvalError naming the field that is missing, or when no row is left.
    """
    rows, columns = load_rows(config.dataset, config.split, config.dataset_config)
    for name in (config.prompt_field, config.input_field):
        if name and name not in columns:
            raise EvalError(f"field {name!r} is not in {config.dataset}; its fields are: {', '.join(columns)}")
    by_category = CATEGORY_FIELD in columns
    ids, prompts, contexts, skipped = [], [], [], 0
    for row in rows:
        if by_category and row[CATEGORY_FIELD] not in GROUNDED_CATEGORIES:
            continue
        prompt = str(row[config.prompt_field] or "")
        context = str(row[config.input_field]) if config.input_field and row[config.input_field] else None
        prompt_ids = prompt_only_ids(tokenizer, prompt, "minillm", context)
        if len(prompt_ids) > config.max_prompt_length:
            skipped += 1
            continue
        ids.append(list(prompt_ids))
        prompts.append(prompt)
        contexts.append(context)
        if config.limit is not None and len(ids) >= config.limit:
            break
    if not ids:
        kept = f"rows of category {' or '.join(GROUNDED_CATEGORIES)}" if by_category else "rows"
        raise EvalError(f"{config.dataset}: no {kept} with a prompt that fits in {{max_prompt_length}} "
                        f"{config.max_prompt_length}")
    counts = {"num_examples": len(ids), "num_skipped": skipped,
              "categories": list(GROUNDED_CATEGORIES) if by_category else "all rows (no category column)"}
    return ids, prompts, contexts, counts


def grounding_metric(model, tokenizer, config, generate) -> dict:
    """grounding_hallucination of greedy answers (up to max_length - max_prompt_length new tokens) to the grounded
    rows. generate: trainer.generation_metrics.generate (passed in: this module sits below evaluate)."""
    ids, prompts, contexts, counts = grounded_rows(config, tokenizer)
    answers = generate(model, tokenizer, ids, max_new_tokens=max(1, config.max_length - config.max_prompt_length),
                       greedy=True, seed=0, batch_size=config.batch_size)
    return {**grounding_hallucination(answers, prompts, contexts), **counts}
