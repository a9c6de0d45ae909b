"""Prompt templates: how a prompt/response row becomes token ids (the prompt's ids never depend on the response).

Templates (the name is recorded as the manifest's `settings.template`):
- `chat`: the tokenizer's chat template, one user turn then the assistant's response;
- `plain`: PLAIN_TEMPLATE, tokenized as text;
- `minillm`: MiniLLM's instruction template (MINILLM_TEMPLATE, or MINILLM_TEMPLATE_WITH_INPUT when
  the row's input field, e.g. dolly's `context`, is non-empty), tokenized as text. `kdtrain eval`'s
  ROUGE-L prompts are made by the same function (prompt_only_ids), so a cache built with it trains on
  exactly the prompts the evaluation asks.
The plain and minillm prompts are `tokenizer(text)["input_ids"]` and the response follows as
`tokenizer(response, add_special_tokens=False)` plus EOS, so the prompt's ids never depend on the response.

Takes a tokenizer object (anything with the Hugging Face tokenizer call interface); knows nothing about
data sets, models or the cache format.
"""

from __future__ import annotations

from common.datasets import DataError

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# MiniLLM's dolly template (LMOps minillm), the one its ROUGE-L protocol prompts with.
MINILLM_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MINILLM_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATES = ("chat", "plain", "minillm")


def minillm_prompt(instruction: str, input_text: str | None = None) -> str:
    """MiniLLM's prompt text: the "### Input:" variant when input_text is non-empty."""
    if input_text:
        return MINILLM_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return MINILLM_TEMPLATE.format(instruction=instruction)


def resolve_template(tokenizer, template: str | None) -> str:
    """The template a build uses: `template`, or for None `chat` when the tokenizer has a chat template, else `plain`.

    Raises DataError for an unknown name and for `chat` with a tokenizer that has no chat template.
    """
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is None:
        return "chat" if has_chat else "plain"
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"{{prompt_template}} {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if template == "chat" and not has_chat:
        raise DataError("{prompt_template} chat: this tokenizer has no chat template; use {prompt_template} plain or "
                        "minillm")
    return template


def prompt_only_ids(tokenizer, prompt: str, template: str | None = None, input_text: str | None = None) -> list[int]:
    """The ids a response follows (and a generation starts from): the prompt formatted by the template.

    template: one of PROMPT_TEMPLATES, or None (resolve_template's default). input_text: the minillm
    template's input (ignored by the others).
    """
    template = resolve_template(tokenizer, template)
    if template == "chat":
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    text = minillm_prompt(prompt, input_text) if template == "minillm" else PLAIN_TEMPLATE.format(prompt=prompt)
    return list(tokenizer(text)["input_ids"])


def prompt_ids_with_template(tokenizer, prompt: str, response: str, template: str | None = None,
                             input_text: str | None = None) -> tuple[list[int], list[int], str]:
    """(ids of the prompt up to where the response starts, ids of prompt + response, the template's name)."""
    template = resolve_template(tokenizer, template)
    prompt_ids = prompt_only_ids(tokenizer, prompt, template, input_text)
    if template == "chat":
        user = [{"role": "user", "content": prompt}]
        full_ids = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                      tokenize=True, return_dict=False))
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return prompt_ids, full_ids, template
        # Templates that rewrite the prompt when a response follows: fall back to concatenation.
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, prompt_ids + list(response_ids) + eos, template


def check_template_options(template: str | None, input_field: str | None, pairs: bool) -> None:
    if template is not None and template not in PROMPT_TEMPLATES:
        raise DataError(f"{{prompt_template}} {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if not pairs and (template is not None or input_field is not None):
        option = "{prompt_template}" if template is not None else "{input_field}"
        raise DataError(f"{option} applies to prompt/response data: give {{prompt_field}} and {{response_field}} too")
    if input_field is not None and template != "minillm":
        raise DataError(f"{{input_field}} {input_field} is read by {{prompt_template}} minillm only (its '### Input:' "
                        "section); add {prompt_template} minillm, or drop {input_field}")
