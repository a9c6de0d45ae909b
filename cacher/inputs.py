"""What a build reads before its teacher runs: dtype, the model's context and vocabulary, the data, the engine's settings,
and the teacher itself, loaded in the background while the data is read (TeacherLoader).

config arguments are cacher.build.BuildConfig objects. Knows the engines' settings and common/'s readers; nothing about
the cache's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cacher import token_cache
from cacher.engine import Engine, EngineSettings
from common.models import read_model_config
from common.sequences import load_prompts, load_sequences


class TeacherLoader:
    """with TeacherLoader(make, folder, settings, early=True) as teacher: ... engine = teacher.get() ...

    early: make the engine in a background thread from now on (the model loads while the data is tokenized);
    otherwise when get() is first called. An engine made but never taken (the build found nothing to do) is
    closed on exit; an error while making it is raised by get() only, so it never hides the build's own error.
    """

    def __init__(self, make: Callable[[str, EngineSettings], Engine], folder: str, settings: EngineSettings, *,
                 early: bool):
        self._make, self._args = make, (folder, settings)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kdcache-teacher") if early else None
        self._future: Future | None = self._thread.submit(self._timed) if self._thread else None
        self._taken = False
        self.seconds = 0.0  # how long making the engine took

    def _timed(self) -> Engine:
        started = time.time()
        engine = self._make(*self._args)
        self.seconds = time.time() - started
        return engine

    def get(self) -> Engine:
        self._taken = True
        return self._future.result() if self._future is not None else self._timed()

    def __enter__(self) -> TeacherLoader:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._thread is None:
            return False
        self._thread.shutdown(wait=True)
        if not self._taken and self._future.exception() is None:
            self._future.result().close()
        return False


def choose_dtype(dtype: str) -> str:
    """--dtype auto: bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def model_context(path: str) -> int | None:
    """The model's context in tokens, from its config.json (None when it does not say)."""
    cfg = read_model_config(path)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def model_vocab(path: str, tokenizer) -> tuple[int, int]:
    """(V, the teacher's logit rows): V = len(tokenizer), the ids a cache can hold.

    The rows come from config.json's vocab_size (or text_config's). Rows beyond the tokenizer's ids are
    padding no tokenizer produces (Qwen2.5-7B: 152064 rows for 151665 ids, its smaller siblings 151936):
    the engines never store them (cacher/engine_hf.py, "Padded embedding rows"), so a cache's ids mean
    the same to every model of that tokenizer, whatever its padding.
    """
    cfg = read_model_config(path)
    rows = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return len(tokenizer), int(rows or len(tokenizer))


def read_data(config, model_folder: str, tokenizer):
    """(sequences, DataInfo): text windows or prompt/response pairs (score mode), prompts (generate mode); a local
    file's tokens come from cacher.token_cache when it was read with the same settings and tokenizer before."""
    data = {"split": config.split, "config": config.dataset_config, "prompt_field": config.prompt_field,
            "response_field": config.response_field, "limit": config.limit, "prompt_template": config.prompt_template,
            "input_field": config.input_field}
    if config.mode == "score":
        data.update(text_field=config.text_field, max_length=config.max_length,
                    **({"ids_field": config.ids_field} if config.ids_field else {}))
        load = load_sequences
    else:
        data.update(max_length=config.max_length - 1)  # room for at least one response token
        load = load_prompts
    return token_cache.cached(lambda: load(config.dataset, tokenizer, **data), config.dataset, model_folder,
                              {"reader": load.__name__, **data})


def engine_settings(config, dtype: str, tokenizer) -> EngineSettings:
    """What the engine needs of the build's settings; ids >= len(tokenizer) (padded logit rows) are never stored."""
    return EngineSettings(
        dtype=dtype, top_k=config.top_k, num_token_ids=len(tokenizer), max_length=config.max_length,
        trust_remote_code=config.trust_remote_code, batch_tokens=config.batch_tokens, tail_samples=config.tail_samples,
        tail_seed=config.seed, tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, num_samples=config.num_samples, seed=config.seed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
