"""`kdtrain generate`: a model writes responses to a data set's prompts; the result is a data set (JSON lines).

The first step of an on-policy distillation round (docs/runs-and-plans.md 3.7): the current student
answers the plan's prompts, `kdcache build --mode score` has the teacher score exactly those responses,
and the student trains on that cache. The prompts are the data set's, read and formatted as `kdcache
build` reads them (common.sequences with the same data settings and template), and chosen by the
held-out rule of trainer/data.py over the (prompt, reference) sequences the teacher cache holds:
`--prompts train` answers only the prompts the teacher cache trains on, so no held-out prompt is ever
trained on; `heldout` only the held-out ones; `all` every one (needs no --response-field).

Every response has its own seed, sample_seed(seed, round, prompt's data set row, sample), so the same
settings give the same file whatever the batching (trainer/sampling.py). Each output row holds `prompt`,
`response` (the decoded response, without the stop token the template re-appends), `input` when the data
has an input field, `token_ids` (the formatted prompt's ids then the sampled ones, the stop token included:
`kdcache build --ids-field token_ids` scores exactly these), `response_ids` (the sampled ids alone), and
where it came from: `source_index`, `sample`, `round`, `model`, `model_sha256`
(the generating model's weights; a layer-dropped teacher: the teacher's, with `keep_layers`), `finished`
(ended at a stop id, not at the length limit), `exact` (the text alone, formatted and tokenized, gives back the
sampled ids; often not so: a byte-level BPE's partial characters decode to U+FFFD, merges cross the prompt's
end, a model may sample a non-canonical split; hence `token_ids`) and `generated_by`. The file is
written whole (temporary name, then renamed) or not at all; an existing --out is replaced only with
--overwrite and only when it is such a file.

Knows models, tokenizers and the data path's held-out rule; never imports the cacher.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common.settings import SettingError, check_choices
from common.templates import PROMPT_TEMPLATES
from trainer.config import EVAL_FRACTION

GENERATED_BY = "kdtrain generate"
# Field metadata: what a plan's data section sets, what the chain sets (the model, the round, the prompts; not plan
# keys), and where it writes (not in a stage's identity: the model is identified by its own stage instead).
DATA = {"section": "data"}
RUNNER = {"plan": False}
OUTPUT = {"plan": False, "identity": False}


@dataclass
class GenerateConfig:
    """Settings of one `kdtrain generate` (each field's docstring is its --help text)."""

    SECTION: ClassVar[str] = "onpolicy"  # a plan's onpolicy section (docs/runs-and-plans.md 3.7)

    model: str = field(metadata=OUTPUT)
    """Model that writes the responses: a model folder (a kdtrain run), or with --keep-layers the teacher it is
    layer-dropped from."""
    dataset: str = field(metadata=DATA)
    """Data set of prompts (and reference responses), read as kdcache build reads it."""
    prompt_field: str = field(metadata=DATA)
    """Field holding the prompt."""
    out: str = field(metadata=OUTPUT)
    """JSON-lines file to write (prompt, response and where each came from)."""
    response_field: str | None = field(default=None, metadata=DATA)
    """Field holding the reference response: the held-out rule is over (prompt, reference), as in the teacher's cache."""
    keep_layers: int | None = field(default=None, metadata=RUNNER)
    """Generate with --model keeping this many evenly spaced layers (kdtrain run --student-from-teacher's student)."""
    dataset_config: str | None = field(default=None, metadata=DATA)
    """Configuration (subset) of a hub or folder data set that has several."""
    split: str | None = field(default=None, metadata=DATA)
    """Split of the data set (default: train)."""
    prompt_template: Literal[PROMPT_TEMPLATES] | None = field(default=None, metadata=DATA)
    """How prompts are formatted, as kdcache build's (default: chat when the tokenizer has a chat template, else plain)."""
    input_field: str | None = field(default=None, metadata=DATA)
    """Field holding the minillm template's input."""
    limit: int | None = field(default=None, metadata=DATA)
    """Use only the first N sequences of the data set, as kdcache build --limit."""
    max_length: int = field(default=256, metadata=DATA)
    """Longest prompt + response in tokens (kdcache build --max-length)."""
    prompts: Literal["train", "heldout", "all"] = field(default="train", metadata=RUNNER)
    """Which prompts: those the teacher cache trains on, those it holds out (--eval-fraction), or all."""
    eval_fraction: float = field(default=EVAL_FRACTION, metadata=RUNNER)
    """Held-out fraction of the data's sequences (kdtrain run --eval-fraction)."""
    num_samples: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    max_new_tokens: int = 256
    """Longest response in tokens (also bounded by --max-length)."""
    seed: int = 0
    """Sampling seed."""
    round: int = field(default=0, metadata=RUNNER)
    """On-policy round these samples are for (recorded in every row, and part of every response's seed)."""
    batch_size: int = 16
    """Responses sampled together."""
    overwrite: bool = field(default=False, metadata=OUTPUT)
    """Replace an existing --out written by kdtrain generate."""

    def __post_init__(self):
        check_choices(self, SettingError)
        if self.prompts != "all" and self.response_field is None:
            raise SettingError(f"--prompts {self.prompts} chooses prompts by the held-out rule over (prompt, "
                               "reference): "
                               "give {response_field}, or use --prompts all")
        if self.keep_layers is not None and self.keep_layers < 1:
            raise SettingError(f"{{keep_layers}} must be >= 1, got {self.keep_layers}")
        if not 0 <= self.eval_fraction < 1:
            raise SettingError(f"{{eval_fraction}} must be in [0, 1), got {self.eval_fraction}")
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise SettingError("{num_samples}, {max_new_tokens} and {batch_size} must be >= 1")
        if not 0 <= self.temperature <= 100:
            raise SettingError(f"{{temperature}} must be in [0, 100] (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise SettingError("greedy decoding ({temperature} 0) gives one response per prompt; use {num_samples} 1 "
                               "or a temperature > 0")
        if self.max_length < 2:
            raise SettingError(f"{{max_length}} must be >= 2, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise SettingError(f"{{limit}} must be >= 1, got {self.limit}")
        if self.round < 0:
            raise SettingError(f"{{round}} must be >= 0, got {self.round}")


def chosen_prompts(config: GenerateConfig, tokenizer) -> tuple[list, str]:
    """(sequences whose prompts are answered, the template) by --prompts and the held-out rule; each sequence's
    prompt ids are input_ids[:prompt_length] (for --prompts all without references: the whole sequence)."""
    import numpy as np

    from common.sequences import load_prompts, load_sequences
    from trainer.data import heldout_hash, heldout_mask

    data = {"split": config.split, "config": config.dataset_config, "prompt_field": config.prompt_field,
            "response_field": config.response_field, "limit": config.limit, "prompt_template": config.prompt_template,
            "input_field": config.input_field}
    if config.response_field is None:
        sequences, info = load_prompts(config.dataset, tokenizer, max_length=config.max_length - 1, **data)
        return sequences, info.template
    sequences, info = load_sequences(config.dataset, tokenizer, max_length=config.max_length, **data)
    if config.prompts == "all":
        return sequences, info.template
    hashes = np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences], dtype=np.int64)
    held = heldout_mask(hashes, config.eval_fraction)
    keep = held if config.prompts == "heldout" else ~held
    return [s for s, k in zip(sequences, keep) if k], info.template


def _model(config: GenerateConfig):
    """(model, tokenizer, weights sha256) of --model, layer-dropped with --keep-layers."""
    from common.models import model_folder, weights_sha256
    from common.tokenizers import load_tokenizer
    from trainer.student import load_student, student_from_teacher

    folder = model_folder(config.model)
    model = student_from_teacher(folder, config.keep_layers) if config.keep_layers else load_student(folder)
    return model.eval(), load_tokenizer(folder), weights_sha256(folder)


def _check_out(config: GenerateConfig) -> None:
    """Refuse an --out that exists unless --overwrite, and then unless kdtrain generate wrote it."""
    if os.path.islink(config.out) or (os.path.exists(config.out) and not os.path.isfile(config.out)):
        raise SettingError(f"{{out}} {config.out} is not a regular file; pass a file name")
    if not os.path.exists(config.out):
        return
    if not config.overwrite:
        raise SettingError(f"{{out}} {config.out} exists; pass {{overwrite}} to replace it")
    try:
        with open(config.out) as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        first = {}
    if not isinstance(first, dict) or first.get("generated_by") != GENERATED_BY:
        raise SettingError(f"{{out}} {config.out} was not written by {GENERATED_BY} (its first line has no "
                           f"\"generated_by\": \"{GENERATED_BY}\"), so it is never replaced; choose another file")


def _scored_as_sampled(tokenizer, record: dict, template: str, ids: list[int]) -> bool:
    """Whether kdcache build, formatting this row with the template, gets the sampled ids right after the prompt."""
    from common.templates import prompt_ids_with_template

    prompt, full, _ = prompt_ids_with_template(tokenizer, record["prompt"], record["response"], template,
                                               record.get("input") or None)
    return full[len(prompt): len(prompt) + len(ids)] == ids


def generate_samples(config: GenerateConfig, *, log=print) -> dict:
    """Write config.out (see the module docstring); returns counts: prompts, responses, tokens, finished, exact."""
    from datasets import disable_progress_bars

    from common.datasets import load_rows
    from common.sequences import row_text
    from trainer.sampling import sample_responses, sample_seed, stop_ids

    disable_progress_bars()
    _check_out(config)
    model, tokenizer, sha = _model(config)
    sequences, template = chosen_prompts(config, tokenizer)
    rows, _ = load_rows(config.dataset, config.split, config.dataset_config)
    jobs = [(s, k) for s in sequences for k in range(config.num_samples)]
    prompts = [s.input_ids[: s.prompt_length or len(s.input_ids)].tolist() for s, _ in jobs]
    seeds = [sample_seed(config.seed, config.round, s.source_index, k) for s, k in jobs]
    budgets = [min(config.max_new_tokens, config.max_length - len(p)) for p in prompts]
    stops = stop_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    log(f"{config.model}{f' keeping {config.keep_layers} layers' if config.keep_layers else ''}: {len(jobs)} responses "
        f"to {len(sequences)} prompts ({config.prompts}), temperature {config.temperature}, round {config.round}")
    results = sample_responses(model, prompts, seeds, budgets, temperature=config.temperature, stops=stops,
                               pad_id=pad, num_ids=len(tokenizer), batch_size=config.batch_size)
    counts = {"prompts": len(sequences), "responses": len(jobs), "tokens": 0, "finished": 0, "exact": 0}
    lines = []
    for (seq, sample), prompt, (ids, finished) in zip(jobs, prompts, results):
        text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False)
        row = rows[seq.source_index]
        record = {"prompt": row_text(row, config.prompt_field, seq.source_index, "{prompt_field}", config.dataset),
                  "response": text}
        if config.input_field:
            record["input"] = row_text(row, config.input_field, seq.source_index, "{input_field}", config.dataset)
        exact = _scored_as_sampled(tokenizer, record, template, ids)
        record.update(token_ids=prompt + ids, response_ids=ids, source_index=seq.source_index, sample=sample, round=config.round, model=config.model,
                      model_sha256=sha, keep_layers=config.keep_layers, finished=finished, exact=exact,
                      generated_by=GENERATED_BY)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        counts["tokens"] += len(ids)
        counts["finished"] += finished
        counts["exact"] += exact
    tmp = f"{config.out}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, config.out)
    log(f"wrote {config.out}: {counts['responses']} responses, {counts['tokens']} tokens; {counts['finished']} ended "
        "at a "
        f"stop token; the text alone gives back the sampled ids for {counts['exact']} (token_ids keeps every one exact)")
    return counts
