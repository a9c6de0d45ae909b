"""The settings of `kdcache build`: BuildConfig, the one definition of its options.

Each field is written once: its type (a Literal lists the choices), its default and, right under it, its help.
`kdcache build`'s options, a plan's `teacher`/`data`/`cache` sections and a chain stage's command line are
derived from this class (common.settings); its checks run however it is made. Messages name fields as
`{field}` (common.settings: `--top-k` on a command line, `cache.top_k` in a plan).

Knows the settings and their limits; imports no torch, no engine, no model (the CLI reads it to build --help).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cacher.engine import DEFAULT_BATCH_TOKENS, DTYPES
from cacher.errors import BuildError
from common.datasets import DEFAULT_DATASET
from common.settings import check_choices
from common.smollm2 import EMBEDDED_DEFAULT
from common.templates import PROMPT_TEMPLATES, check_template_options
from shared.format import MAX_TAIL_SAMPLES
from shared.writer import DEFAULT_CHUNK_ROWS

DTYPE_SETTINGS = ("auto", *DTYPES)
FILTERS = ("gsm8k-answer",)
MAX_SAMPLES_FROM = 1000  # characters of samples_from (a description, recorded in every manifest)
# Field metadata: the plan section a setting is written in (the default is the class's SECTION, "cache"), and
# the settings that say where and how a build writes, not what it computes (not plan keys, not in a stage's identity).
TEACHER = {"section": "teacher", "identity": False}  # a stage identifies its teacher by its files instead
DATA = {"section": "data"}
OUTPUT = {"plan": False, "identity": False}


@dataclass
class BuildConfig:
    """Settings of one `kdcache build`."""

    SECTION: ClassVar[str] = "cache"

    model: str = field(default=EMBEDDED_DEFAULT, metadata=TEACHER)
    """Teacher: a hub id, a local folder, or the embedded default smollm2-135m."""
    dataset: str = field(default=DEFAULT_DATASET, metadata=DATA)
    """Data: a hub name, a local .jsonl/.json/.parquet/.csv/.txt file or folder, or builtin:NAME."""
    dataset_config: str | None = field(default=None, metadata=DATA)
    """Configuration (subset) of a hub or folder data set that has several, e.g. main for openai/gsm8k."""
    split: str | None = field(default=None, metadata=DATA)
    """Split of the data set (default: train); a single file is the split train, sliceable as 'train[:1000]'."""
    text_field: str | None = field(default=None, metadata=DATA)
    """Field holding plain text (default 'text'); long texts are cut into {max_length} windows."""
    prompt_field: str | None = field(default=None, metadata=DATA)
    """Field holding the prompt of prompt/response data (with {response_field})."""
    response_field: str | None = field(default=None, metadata=DATA)
    """Field holding the response; only response tokens are distilled."""
    prompt_template: Literal[PROMPT_TEMPLATES] | None = field(default=None, metadata=DATA)
    """Prompt format of prompt/response data: chat (the tokenizer's chat template; the default when it has one),
    plain (### Instruction/### Response; the default otherwise) or minillm (MiniLLM's template, the one kdtrain
    eval's ROUGE-L uses)."""
    input_field: str | None = field(default=None, metadata=DATA)
    """With {prompt_template} minillm: the field of its '### Input:' section (dolly's context); empty values use the
    template without it."""
    samples_from: str | None = field(default=None, metadata=DATA)
    """Who wrote the data's responses (e.g. a student and round, for kdtrain generate's samples): recorded in the
    cache's header and cache_key; shown by kdcache info."""
    ids_field: str | None = field(default=None, metadata=DATA)
    """Field holding each row's token ids, the formatted prompt's then the response's, as a model sampled them
    (kdtrain generate's token_ids): scored exactly as they are, the prompt checked against its formatting."""
    limit: int | None = field(default=None, metadata=DATA)
    """Use only the first N sequences (prompts in generate mode) of the data set."""
    max_length: int = field(default=256, metadata=DATA)
    """Longest sequence in tokens (text is windowed to it; prompt + response are truncated to it)."""
    mode: Literal["score", "generate"] = "score"
    """score: the teacher's distributions over the data's tokens; generate: the teacher writes the responses."""
    top_k: int = 64
    """Most likely next tokens stored per position."""
    tail_samples: int = 0
    """Also store M ids drawn from the teacher's distribution outside the top K, with their counts (hf engine;
    docs/losses.md). E.g. {top_k} 48 {tail_samples} 16."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """vllm, hf (transformers), or auto (vllm when CUDA and vLLM are present, else hf)."""
    dtype: Literal[DTYPE_SETTINGS] = "auto"
    """Teacher dtype; auto: float32 on CPU, bfloat16 on CUDA."""
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    """Padded tokens per teacher forward batch (hf engine)."""
    shard_tokens: int = 1 << 20
    """Rows per shard (about); shards are the unit of commit, resume and worker split."""
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows per Zarr chunk (the unit a reader decompresses)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs to split the teacher over."""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory vLLM may take."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off unless asked for)."""
    max_new_tokens: int = 256
    """Generate mode: longest response."""
    temperature: float = 1.0
    """Generate mode: sampling temperature (0 = greedy)."""
    num_samples: int = 1
    """Generate mode: responses per prompt."""
    seed: int = 0
    """Seed of generate mode's sampling and of {tail_samples}' draws."""
    filter: Literal[FILTERS] | None = None
    """Generate mode: gsm8k-answer keeps samples whose final answer ('#### N', else the last \\boxed{N}) equals the
    reference's."""
    out: str | None = field(default=None, metadata=OUTPUT)
    """Output folder or URL (default ./cache/<last path component of {model}>)."""
    overwrite: bool = field(default=False, metadata=OUTPUT)
    """Replace a different or unfinished build at {out} instead of refusing."""
    reuse: bool = field(default=True, metadata=OUTPUT)
    """Return an identical complete cache (same cache_key) found under {out}'s parent instead of rebuilding."""
    worker: int = field(default=0, metadata=OUTPUT)
    """This worker's index in [0, {num_workers})."""
    num_workers: int = field(default=1, metadata=OUTPUT)
    """Workers splitting the shards (shard index % num_workers == worker); `kdcache finalize` when all are done."""

    def __post_init__(self):
        check_choices(self, BuildError)
        if self.top_k < 1:
            raise BuildError(f"{{top_k}} must be >= 1, got {self.top_k}")
        if not 0 <= self.tail_samples <= MAX_TAIL_SAMPLES:
            raise BuildError(f"{{tail_samples}} must be in [0, {MAX_TAIL_SAMPLES}] (0 = none), got {self.tail_samples}")
        if self.tail_samples and self.engine == "vllm":
            raise BuildError("{tail_samples} needs the hf engine: vLLM returns only the top log-probs of a prompt, not "
                             "its full distribution. Pass {engine} hf, or drop {tail_samples}")
        if self.max_length < 2:
            raise BuildError(f"{{max_length}} must be >= 2, got {self.max_length}")
        check_template_options(self.prompt_template, self.input_field, pairs=self.prompt_field is not None)
        for name in ("shard_tokens", "batch_tokens", "chunk_rows"):
            if getattr(self, name) < 1:
                raise BuildError(f"{{{name}}} must be >= 1, got {getattr(self, name)}")
        if not (self.num_workers >= 1 and 0 <= self.worker < self.num_workers):
            raise BuildError(f"{{worker}} {self.worker} must be in [0, {{num_workers}} {self.num_workers})")
        if self.ids_field is not None and (self.prompt_field is None or self.mode != "score"):
            raise BuildError("{ids_field} gives the token ids of prompt/response rows to score: it needs "
                             "{prompt_field} and {response_field}, and {mode} score")
        if self.samples_from is not None and len(self.samples_from) > MAX_SAMPLES_FROM:
            raise BuildError(f"{{samples_from}} has {len(self.samples_from)} characters; at most {MAX_SAMPLES_FROM} "
                             "(it describes who wrote the responses, recorded in every manifest)")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"{{limit}} must be >= 1, got {self.limit}")
        if self.tensor_parallel_size < 1:
            raise BuildError(f"{{tensor_parallel_size}} must be >= 1 (GPUs per teacher), got "
                             f"{self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise BuildError("{gpu_memory_utilization} is the fraction of GPU memory vLLM may take: it must be in "
                             f"(0, 1], got {self.gpu_memory_utilization}")
        if self.mode == "generate":
            self._check_generate()
        elif self.filter is not None:
            raise BuildError("{filter} applies to {mode} generate only")
        if self.out is None:
            self.out = os.path.join("cache", default_out_name(self.model))

    def _check_generate(self) -> None:
        if self.prompt_field is None:
            raise BuildError("{mode} generate needs {prompt_field} (and {response_field} for {filter})")
        if self.max_new_tokens < 1:
            raise BuildError(f"{{max_new_tokens}} must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise BuildError(f"{{temperature}} must be >= 0 (0 = greedy), got {self.temperature}")
        if self.num_samples < 1:
            raise BuildError(f"{{num_samples}} must be >= 1, got {self.num_samples}")
        if self.temperature == 0 and self.num_samples > 1:
            raise BuildError("greedy decoding ({temperature} 0) gives one response per prompt; use {num_samples} 1 or "
                             "a temperature > 0")
        if self.filter == "gsm8k-answer" and self.response_field is None:
            raise BuildError("{filter} gsm8k-answer compares with the reference: pass {response_field}")


def default_out_name(model: str) -> str:
    """The last path component of a model name ('org/name' -> 'name'; '.' -> the current folder's name)."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        name = os.path.basename(os.path.abspath(os.path.expanduser(model)))
    return name or "teacher"
