"""`kdtrain make-teacher`: a small teacher made on the spot, so that a plan needs nothing but the repository.

make_teacher(config) trains a byte-level BPE tokenizer on the data set's text (common.tiny), builds a
randomly initialized GPT-2 or Llama of `layers` layers and `width` wide with it, and trains that model
with plain cross-entropy on the data set by `kdtrain run`'s own loop (trainer.train, no cache) for
`steps` steps, so the teacher is really better than a layer-dropped copy of itself. The same settings
and data give the same teacher (CPU; seeded init, data order and tokenizer).

--out becomes a kdtrain run folder (docs/runs-and-plans.md 1) that is also a model folder: the model,
its tokenizer, run.json and metrics.jsonl; so the run-folder rules decide what --resume and
--overwrite may replace, and `kdcache build --model OUT` reads it. A plan's `teacher: {make: {...}}`
runs this as its first stage (orchestration/stages.py).

Knows the tiny model builders and the training loop; never imports the cacher.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common.settings import SettingError, check_choices
from common.templates import PROMPT_TEMPLATES
from trainer.config import EVAL_FRACTION

OUTPUT = {"plan": False, "identity": False}  # where it writes and how it resumes: set by whoever runs it
# The tokenizer is trained on the data set's first characters (enough for a 512-id vocabulary in seconds).
TOKENIZER_CHARS = 200_000
MAX_VOCAB_SIZE = 1 << 16
MIN_VOCAB_SIZE = 259  # a byte-level BPE holds the 256 bytes and common.tiny's 3 special tokens


@dataclass
class MakeTeacherConfig:
    """Settings of one `kdtrain make-teacher` (each field's docstring is its --help text)."""

    SECTION: ClassVar[str] = "teacher.make"  # a plan writes them under teacher: {make: {...}}

    dataset: str
    """Text to train the tokenizer and the teacher on: a local .txt/.jsonl/... file or folder, builtin:NAME, or a hub name."""
    out: str = field(metadata=OUTPUT)
    """Folder the teacher is written to (a kdtrain run folder holding the model and its tokenizer)."""
    text_field: str | None = None
    """Field holding plain text (default 'text'); a .txt file is one text."""
    prompt_field: str | None = None
    """Field holding the prompt of prompt/response data (with --response-field); the teacher learns the responses."""
    response_field: str | None = None
    """Field holding the response of prompt/response data."""
    prompt_template: Literal[PROMPT_TEMPLATES] | None = None
    """How prompts are formatted, as kdcache build's (default: chat; the tokenizer made here has a chat template)."""
    limit: int | None = None
    """Use only the first N sequences of the data set."""
    family: Literal["gpt2", "llama"] = "gpt2"
    """Architecture of the teacher."""
    layers: int = 4
    """Transformer layers of the teacher."""
    width: int = 128
    """Hidden size of the teacher (a multiple of 32: heads of 32)."""
    vocab_size: int = 512
    """Token ids of the tokenizer trained on the data set (special tokens included)."""
    steps: int = 150
    """Optimizer steps of plain cross-entropy training."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    batch_tokens: int = 4096
    """Tokens per batch, padding included."""
    max_length: int = 128
    """Longest training sequence in tokens (text is cut into windows of it)."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""
    eval_fraction: float = EVAL_FRACTION
    """Share of the sequences held out of the teacher's training, as kdtrain run's (recorded in run.json; kdtrain eval
    of the teacher uses it): a plan sets its train.eval_fraction, so the teacher never trains on the rows its
    students are evaluated on."""
    resume: bool = field(default=False, metadata=OUTPUT)
    """Continue an interrupted make in --out (no checkpoint: start over in it)."""
    overwrite: bool = field(default=False, metadata=OUTPUT)
    """Replace the teacher a previous make-teacher wrote to --out."""

    def __post_init__(self):
        check_choices(self, SettingError)
        if self.layers < 1:
            raise SettingError(f"{{layers}} must be >= 1, got {self.layers}")
        if self.width < 32 or self.width % 32:
            raise SettingError(f"{{width}} must be a positive multiple of 32 (heads are 32 wide), got {self.width}")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise SettingError(f"{{vocab_size}} must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (a byte-level BPE "
                               "holds "
                               f"the 256 bytes and 3 special tokens), got {self.vocab_size}")
        if self.steps < 1:
            raise SettingError(f"{{steps}} must be >= 1, got {self.steps}")
        if self.max_length < 2:
            raise SettingError(f"{{max_length}} must be >= 2, got {self.max_length}")
        if not (isinstance(self.eval_fraction, (int, float)) and 0.0 < self.eval_fraction < 1.0):
            raise SettingError(f"{{eval_fraction}} must be in (0, 1), got {self.eval_fraction}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise SettingError("{prompt_field} and {response_field} go together: give both for prompt/response data, "
                               "or neither for plain text")
        if self.prompt_field is not None and self.text_field is not None:
            raise SettingError("give either {text_field} or {prompt_field}/{response_field}, not both")
        if self.resume and self.overwrite:
            raise SettingError("{resume} and {overwrite} contradict each other; pass one")


def tokenizer_text(config: MakeTeacherConfig) -> str:
    """The first TOKENIZER_CHARS characters of the data set's text: each row's text field, or its prompt and
    response, joined by newlines (a .txt file is one row, so this is its text)."""
    from common.datasets import load_rows
    from common.sequences import row_text

    rows, columns = load_rows(config.dataset)
    fields = [config.prompt_field, config.response_field] if config.prompt_field else [config.text_field or "text"]
    missing = [f for f in fields if f not in columns]
    if missing:
        from common.datasets import DataError

        raise DataError(f"field(s) {missing} are not in {config.dataset}; its fields are: {', '.join(columns)}")
    parts, size = [], 0
    for index, row in enumerate(rows):
        for name in fields:
            text = row_text(row, name, index, "{" + name + "}", config.dataset)
            parts.append(text)
            size += len(text) + 1
        if size >= TOKENIZER_CHARS:
            break
    return "\n".join(parts)[:TOKENIZER_CHARS]


def make_teacher(config: MakeTeacherConfig, *, log=print, progress=None) -> dict:
    """Train the teacher into config.out; returns kdtrain run's summary (also in OUT/run.json)."""
    from common.tiny import build_tiny_model, train_tokenizer
    from trainer.train import TrainConfig, train

    text = tokenizer_text(config)
    with tempfile.TemporaryDirectory(prefix="kdtrain-teacher-") as work:
        tokenizer = os.path.join(work, "tokenizer")
        train_tokenizer(tokenizer, text, config.vocab_size)
        init = build_tiny_model(os.path.join(work, "init"), config.family, tokenizer, num_layers=config.layers,
                                seed=config.seed, width=config.width)
        log(f"teacher: {config.family}, {config.layers} layers, {config.width} wide, {config.vocab_size} token ids; "
            f"training {config.steps} steps of cross-entropy on {config.dataset}")
        return train(TrainConfig(
            out=config.out, dataset=config.dataset, text_field=config.text_field, prompt_field=config.prompt_field,
            response_field=config.response_field, prompt_template=config.prompt_template, limit=config.limit,
            student=str(init), loss="ce", steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
            batch_tokens=config.batch_tokens, max_length=config.max_length, seed=config.seed,
            eval_fraction=config.eval_fraction, resume=config.resume,
            overwrite=config.overwrite), log=log, progress=progress)
