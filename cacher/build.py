"""`kdcache build`: run a teacher once over a data set and write its cache.

build(config) reads top to bottom: resolve the teacher, tokenize the data (common.sequences), plan the
shards (independent of the number of workers), open a CacheWriter (which refuses a different build
in the same place and tells us what is already committed), and run the engine (ENGINES, by name: the
Engine protocol of cacher/engine.py) over the pending shards (cacher/shards.py), whose rows are compressed
and committed while the teacher runs (cacher/pipeline.py). The manifest is written when the last shard is in.

Knows the engines by name, the data and the writer; the cache files themselves are shared/'s business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cacher.config import BuildConfig
from cacher.engine import Engine, EngineSettings
from cacher.engine_hf import HFEngine
from cacher.engine_vllm_host import VllmEngine, vllm_problem
from cacher.errors import BuildError
from cacher.inputs import TeacherLoader, choose_dtype, engine_settings, model_context, model_vocab, read_data
from cacher.pipeline import EncodePool
from cacher.shards import run_shards
from common.datasets import dataset_name
from common.models import model_name, read_model_config, resolve_model
from common.sequences import plan_shards, sequences_fingerprint
from common.tokenizers import load_tokenizer, vocab_fingerprint
from shared.catalog import find_by_key, find_caches
from shared.errors import flagged
from shared.format import MANIFEST_FILE, CacheError
from shared.writer import BuildHeader, CacheWriter

MAX_SAMPLES_FROM = 1000  # characters of --samples-from (a description, recorded in every manifest)
ENGINES: dict[str, Callable[[str, EngineSettings], Engine]] = {"hf": HFEngine, "vllm": VllmEngine}  # (model folder, settings)


@dataclass
class BuildResult:
    url: str
    cache_key: str
    status: str  # "built", "already built", "reused", "partial" (other workers still owe shards)
    num_shards: int
    num_shards_written: int
    num_sequences: int
    num_tokens: int
    num_bytes: int
    seconds: float
    data_notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """What `kdcache build --json` prints: one object a program reads instead of the summary line.

        status: built | already built | reused (an identical cache elsewhere; `cache` names it, nothing is
        written at --out) | partial (other workers still owe shards; counts of the whole cache are 0 then).
        """
        return {"status": self.status, "cache": self.url, "cache_key": self.cache_key, "num_shards": self.num_shards,
                "num_shards_written": self.num_shards_written, "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens, "num_bytes": self.num_bytes, "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------------------------------------


def choose_engine(engine: str, warn=print) -> str:
    """'hf' or 'vllm' for the setting engine: auto, hf or vllm.

    auto picks vllm only when CUDA is available and a vLLM interpreter (engine_vllm.find_vllm_python)
    reports its vllm version; when KDCACHE_VLLM_PYTHON is set but that interpreter cannot run vLLM,
    auto warns and uses hf. vllm without a working vLLM interpreter is a BuildError.
    """
    if engine == "hf":
        return "hf"
    if engine == "auto":
        import torch

        if not torch.cuda.is_available():
            return "hf"
    problem = vllm_problem()
    if problem is None:
        return "vllm"
    if engine == "vllm":
        raise BuildError(f"{{engine}} vllm: {problem}; or use {{engine}} hf")
    from cacher.engine_vllm import PYTHON_ENV_VAR

    if os.environ.get(PYTHON_ENV_VAR):  # asked for vLLM, and it is broken: say so; no vLLM at all is the normal case
        warn(f"{{engine}} auto: {problem}; using the hf engine")
    return "hf"


def ignored_options(config: BuildConfig, engine: str) -> list[str]:
    """One sentence per option that was set (differs from its default) but that `engine` and the mode do not use;
    settings are named as `{field}` (shared.errors)."""
    defaults = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    changed = {name for name in defaults if getattr(config, name) != defaults[name]}
    notes = [f"{{{name}}} {why}" for name, why in ENGINES[engine].ignored_options.items()
             if name in changed]
    if config.mode == "generate":
        if config.text_field is not None:
            notes.append("{text_field} is ignored in {mode} generate: the prompts come from {prompt_field}")
    else:
        for name in ("max_new_tokens", "temperature", "num_samples"):
            if name in changed:
                notes.append(f"{{{name}}} applies to {{mode}} generate only; {{mode}} score ignores it")
        if "seed" in changed and not config.tail_samples:
            notes.append("{seed} seeds generate mode and {tail_samples} only; this build uses neither")
    return notes


def build(config: BuildConfig, *, progress=None, log=print, warn=None) -> BuildResult:
    """Build (or resume, or find) the cache that `config` describes. See the module docstring.

    log(message) reports progress; warn(message) reports an option that has no effect, naming settings as `{field}`
    (default: log, spelled as flags).
    """
    started = time.time()
    with EncodePool() as pool:  # its processes start while the data and the teacher load
        return _build(config, pool, started, progress, log, warn or (lambda message: log(f"warning: {flagged(message)}")))


def _build(config: BuildConfig, pool: EncodePool, started: float, progress, log, warn) -> BuildResult:
    engine_name = "hf" if config.tail_samples and config.engine == "auto" else choose_engine(config.engine, warn)
    for note in ignored_options(config, engine_name):
        warn(note)
    dtype = choose_dtype(config.dtype)
    resolved = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    read_model_config(resolved.path)  # a damaged config.json is named as such, before the tokenizer trips on it
    tokenizer = load_tokenizer(resolved.path, trust_remote_code=config.trust_remote_code)
    vocab_size = _check_teacher(config, resolved.path, tokenizer, log)
    with TeacherLoader(ENGINES[engine_name], resolved.path, engine_settings(config, dtype, tokenizer),
                       early=_teacher_likely_needed(config)) as teacher:
        sequences, info = read_data(config, resolved.path, tokenizer)
        budget = config.num_samples * config.max_new_tokens if config.mode == "generate" else 0  # responses to come
        plan = plan_shards([len(s.input_ids) + budget for s in sequences], config.shard_tokens)
        log(f"data: {info.num_source_rows} rows -> {len(sequences)} sequences, "
            f"{sum(len(s.input_ids) for s in sequences):,} tokens in {len(plan)} shards (dropped tokens: "
            f"{info.num_dropped}, "
            f"truncated: {info.num_truncated}, skipped rows: {info.num_skipped_rows}); {time.time() - started:.1f} s "
            "since the start")
        header = BuildHeader(
            teacher={"name": model_name(config.model),  # a local folder by its real path: ./m and /abs/m resume one build
                     "path": resolved.path, "revision": resolved.revision, "weights_sha256": resolved.weights_sha256,
                     "dtype": dtype, "engine": engine_name, "engine_version": ENGINES[engine_name].version()},
            tokenizer=_tokenizer_section(model_name(config.model), vocab_size, tokenizer),
            dataset={**info.to_json(), "fingerprint": sequences_fingerprint(sequences), "num_sequences": len(sequences),
                     "limit": config.limit, **({"samples_from": config.samples_from} if config.samples_from else {})},
            settings=_settings_section(config, info.template),
            num_shards=len(plan),
        )

        # -- an identical cache elsewhere under the same root? ------------------------------------
        if config.reuse and not config.overwrite and not _complete_with_key(config.out, header.cache_key):
            root = os.path.dirname(os.path.abspath(config.out)) if "://" not in config.out else config.out.rsplit("/", 1)[0]
            found = find_by_key(root, header.cache_key)
            if found and os.path.abspath(found) != os.path.abspath(config.out):
                log(f"already built: {found} has the same cache_key {header.cache_key[:12]}; reusing it")
                return _result_from_manifest(found, header, "reused", started, info)

        with CacheWriter(config.out, header, overwrite=config.overwrite, worker=config.worker,
                         num_workers=config.num_workers, chunk_rows=config.chunk_rows) as writer:
            if writer.complete:
                log(f"already built: {config.out} (cache_key {header.cache_key[:12]})")
                return _result_from_manifest(config.out, header, "already built", started, info)
            pending = writer.pending_shards()
            log(f"engine {engine_name} ({dtype}); {len(pending)} of {len(writer.my_shards())} shards of this worker to "
                "write")
            written = 0
            if pending:
                engine = teacher.get()
                log(f"teacher ready (loaded in {teacher.seconds:.1f} s); {time.time() - started:.1f} s since the start")
                try:
                    written = run_shards(config, writer, engine, pool, tokenizer, sequences, plan, pending, progress, log)
                finally:
                    engine.close()
            manifest = writer.finalize()
    if manifest is None:
        missing = sorted(set(range(len(plan))) - writer.committed_shards())
        log(f"worker {config.worker}/{config.num_workers} done; {len(missing)} shards still owed by other workers "
            f"(the last to finish writes the manifest, or run `kdcache finalize {config.out}`)")
        return BuildResult(config.out, header.cache_key, "partial", len(plan), written, 0, 0, 0, time.time() - started)
    return BuildResult(config.out, header.cache_key, "built", len(plan), written, manifest.totals["num_sequences"],
                       manifest.totals["num_tokens"], manifest.totals["num_bytes"], time.time() - started)


def _teacher_likely_needed(config: BuildConfig) -> bool:
    """Whether to load the teacher while the data is read: a local out that holds no complete cache, and (with
    reuse) no complete cache of the same teacher and data under its parent, which the build might reuse instead."""
    if "://" in config.out or os.path.exists(os.path.join(config.out, MANIFEST_FILE)):
        return False
    if not config.reuse or config.overwrite:
        return True
    try:
        caches = find_caches(os.path.dirname(os.path.abspath(config.out)))
    except CacheError:
        return True
    teacher, data = model_name(config.model), dataset_name(config.dataset)
    return not any(c.get("complete") and c.get("teacher") == teacher and c.get("dataset") == data for c in caches)


def _check_teacher(config: BuildConfig, model_folder: str, tokenizer, log) -> int:
    """The vocabulary V a cache of this teacher holds, after checking top_k, tail_samples and max_length."""
    vocab_size, logit_rows = model_vocab(model_folder, tokenizer)
    if logit_rows > vocab_size:
        log(f"teacher: {logit_rows} embedding rows for {vocab_size} token ids; the {logit_rows - vocab_size} padded "
            "rows are never stored (their probability counts in the tail)")
    if config.top_k > vocab_size:
        raise BuildError(f"{{top_k}} {config.top_k} is larger than the teacher's vocabulary ({vocab_size}); use at "
                         "most "
                         f"{vocab_size}")
    if config.top_k + config.tail_samples > vocab_size:
        raise BuildError(f"{{top_k}} {config.top_k} + {{tail_samples}} {config.tail_samples} exceeds the teacher's "
                         "vocabulary "
                         f"({vocab_size}); a row's K + M ids are distinct, so use at most {vocab_size - config.top_k} "
                         "tail samples")
    context = model_context(model_folder)
    if context is not None and config.max_length > context:
        raise BuildError(f"{{max_length}} {config.max_length} exceeds the model's context of {context} tokens; use "
                         f"{{max_length}} {context} or less")
    return vocab_size


def _tokenizer_section(name: str, vocab_size: int, tokenizer) -> dict:
    return {"name": name, "vocab_size": vocab_size, "vocab_sha256": vocab_fingerprint(tokenizer),
            "tokenizer_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
            if getattr(tokenizer, "chat_template", None) else None}


def _settings_section(config: BuildConfig, template: str | None) -> dict:
    return {
        "mode": config.mode, "top_k": config.top_k, "max_length": config.max_length, "template": template,
        "shard_tokens": config.shard_tokens, "chunk_rows": config.chunk_rows,
        **({"tail_samples": config.tail_samples, "tail_seed": config.seed} if config.tail_samples else {}),
        **({"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
            "num_samples": config.num_samples, "seed": config.seed, "filter": config.filter}
           if config.mode == "generate" else {}),
    }


def _complete_with_key(url: str, cache_key: str) -> bool:
    """True when url already holds a complete cache with this key (then it is 'already built', not 'reused')."""
    from shared.reader import CacheReader

    try:
        return CacheReader(url, check_sizes=False).manifest.cache_key == cache_key
    except CacheError:
        return False


def _result_from_manifest(url: str, header: BuildHeader, status: str, started: float, info) -> BuildResult:
    from shared.reader import CacheReader

    m = CacheReader(url).manifest
    return BuildResult(url, m.cache_key, status, len(m.shards), 0, m.totals["num_sequences"], m.totals["num_tokens"],
                       m.totals["num_bytes"], time.time() - started)
