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

from cacher.engine import DTYPES, Engine, EngineSettings
from cacher.engine_hf import HFEngine
from cacher.engine_vllm_host import VllmEngine, vllm_problem
from cacher.errors import BuildError
from cacher.inputs import TeacherLoader, choose_dtype, engine_settings, model_context, model_vocab, read_data
from cacher.pipeline import EncodePool
from cacher.shards import run_shards
from common.datasets import DEFAULT_DATASET, dataset_name
from common.models import EMBEDDED_DEFAULT, model_name, read_model_config, resolve_model
from common.sequences import plan_shards, sequences_fingerprint
from common.templates import PROMPT_TEMPLATES
from common.tokenizers import load_tokenizer, vocab_fingerprint
from shared.catalog import find_by_key, find_caches
from shared.format import MANIFEST_FILE, MAX_TAIL_SAMPLES, CacheError
from shared.writer import BuildHeader, CacheWriter

FILTERS = ("gsm8k-answer",)
MAX_SAMPLES_FROM = 1000  # characters of --samples-from (a description, recorded in every manifest)
ENGINES: dict[str, Callable[[str, EngineSettings], Engine]] = {"hf": HFEngine, "vllm": VllmEngine}  # (model folder, settings)


@dataclass
class BuildConfig:
    """Settings of one `kdcache build` (each field's docstring is its --help text)."""

    model: str = EMBEDDED_DEFAULT
    """Teacher: a hub id, a local folder, or the embedded default 'smollm2-135m'."""
    dataset: str = DEFAULT_DATASET
    """Data: a hub name, a local .jsonl/.json/.parquet/.csv/.txt file or folder, or builtin:NAME."""
    dataset_config: str | None = None
    """Configuration (subset) of a hub or folder data set that has several, e.g. 'main' for openai/gsm8k."""
    split: str | None = None
    """Split of the data set (default: train); a single file is the split 'train', sliceable as 'train[:1000]'."""
    text_field: str | None = None
    """Field holding plain text (default 'text'); long texts are cut into --max-length windows."""
    prompt_field: str | None = None
    """Field holding the prompt of prompt/response data (with --response-field)."""
    response_field: str | None = None
    """Field holding the response; only response tokens are distilled."""
    prompt_template: str | None = None
    """How prompts are formatted: chat (the tokenizer's chat template), plain (common.templates.PLAIN_TEMPLATE) or minillm
    (MiniLLM's instruction template, as kdtrain eval's ROUGE-L asks); default chat when the tokenizer has one, else plain."""
    input_field: str | None = None
    """Field holding an input for the minillm template's '### Input:' section (dolly's 'context'); empty: none."""
    samples_from: str | None = None
    """Who wrote the data's responses, e.g. 'student runs/s after round 1' for an on-policy round's samples (kdtrain
    generate): recorded as the cache header's dataset.samples_from, so it is part of the cache_key and kdcache info shows it."""
    mode: str = "score"
    """'score': teacher distributions over the data's tokens; 'generate': the teacher writes the responses."""
    top_k: int = 64
    """Number of most likely next tokens stored per position."""
    tail_samples: int = 0
    """Also store M ids drawn from the teacher's distribution outside the top K, with counts (hf engine)."""
    max_length: int = 256
    """Longest sequence in tokens (text is windowed to it; prompt + response are truncated to it)."""
    engine: str = "auto"
    """'vllm', 'hf' (transformers), or 'auto' (vllm when CUDA and vLLM are present, else hf)."""
    out: str | None = None
    """Output folder or URL; default ./cache/<last path component of --model>."""
    shard_tokens: int = 1 << 20
    """Rows per shard (about); shards are the unit of commit, resume and worker split."""
    worker: int = 0
    """This worker's index in [0, --num-workers)."""
    num_workers: int = 1
    """Number of workers splitting the shards (index % num_workers == worker)."""
    limit: int | None = None
    """Use only the first N sequences (prompts in generate mode) of the data set."""
    dtype: str = "auto"
    """Teacher dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA)."""
    overwrite: bool = False
    """Replace a different or unfinished build at --out instead of refusing."""
    batch_tokens: int = 8192
    """Padded tokens per teacher forward batch (hf engine)."""
    chunk_rows: int = 8192
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
    """Generate mode: sampling seed."""
    filter: str | None = None
    """Generate mode: 'gsm8k-answer' keeps samples whose final answer ('#### N', else the last \\boxed{N}) equals
    the reference's."""
    reuse: bool = True
    """Return an existing complete cache with the same cache_key under --out's parent instead of rebuilding."""

    def __post_init__(self):
        if self.mode not in ("score", "generate"):
            raise BuildError(f"--mode must be 'score' or 'generate', got {self.mode!r}")
        if self.engine not in ("auto", "hf", "vllm"):
            raise BuildError(f"--engine must be auto, hf or vllm, got {self.engine!r}")
        if self.top_k < 1:
            raise BuildError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 <= self.tail_samples <= MAX_TAIL_SAMPLES:
            raise BuildError(f"--tail-samples must be in [0, {MAX_TAIL_SAMPLES}] (0 = none), got {self.tail_samples}")
        if self.tail_samples and self.engine == "vllm":
            raise BuildError("--tail-samples needs the hf engine: vLLM returns only the top log-probs of a prompt, not "
                             "its full distribution. Pass --engine hf, or drop --tail-samples")
        if self.max_length < 2:
            raise BuildError(f"--max-length must be >= 2, got {self.max_length}")
        if self.prompt_template is not None and self.prompt_template not in PROMPT_TEMPLATES:
            raise BuildError(f"--prompt-template must be one of {', '.join(PROMPT_TEMPLATES)}, got {self.prompt_template!r}")
        if self.prompt_field is None and (self.prompt_template is not None or self.input_field is not None):
            option = "--prompt-template" if self.prompt_template is not None else "--input-field"
            raise BuildError(f"{option} formats prompts of prompt/response data: give --prompt-field and --response-field")
        if self.input_field is not None and self.prompt_template != "minillm":
            raise BuildError(f"--input-field {self.input_field} is read by --prompt-template minillm only (its "
                             "'### Input:' section); add --prompt-template minillm, or drop --input-field")
        if self.shard_tokens < 1 or self.batch_tokens < 1 or self.chunk_rows < 1:
            raise BuildError("--shard-tokens, --batch-tokens and --chunk-rows must be >= 1")
        if not (self.num_workers >= 1 and 0 <= self.worker < self.num_workers):
            raise BuildError(f"--worker {self.worker} must be in [0, --num-workers {self.num_workers})")
        if self.dtype not in ("auto", *DTYPES):
            raise BuildError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit must be >= 1, got {self.limit}")
        if self.tensor_parallel_size < 1:
            raise BuildError(f"--tensor-parallel-size must be >= 1 (GPUs per teacher), got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise BuildError("--gpu-memory-utilization is the fraction of GPU memory vLLM may take: it must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.mode == "generate":
            if self.prompt_field is None:
                raise BuildError("--mode generate needs --prompt-field (and --response-field for --filter)")
            if self.max_new_tokens < 1:
                raise BuildError("--max-new-tokens must be >= 1")
            if self.temperature < 0:
                raise BuildError("--temperature must be >= 0 (0 = greedy)")
            if self.num_samples < 1:
                raise BuildError("--num-samples must be >= 1")
            if self.temperature == 0 and self.num_samples > 1:
                raise BuildError("greedy decoding (--temperature 0) gives one response per prompt; use --num-samples 1 or a temperature > 0")
            if self.filter is not None and self.filter not in FILTERS:
                raise BuildError(f"--filter must be one of {FILTERS}, got {self.filter!r}")
            if self.filter == "gsm8k-answer" and self.response_field is None:
                raise BuildError("--filter gsm8k-answer compares with the reference: pass --response-field")
            if self.samples_from is not None:
                raise BuildError("--samples-from names who wrote the data's responses; in --mode generate the teacher "
                                 "writes them: drop --samples-from, or use --mode score")
        elif self.filter is not None:
            raise BuildError("--filter applies to --mode generate only")
        if self.samples_from is not None and not (0 < len(self.samples_from) <= MAX_SAMPLES_FROM
                                                  and self.samples_from.isprintable()):
            raise BuildError(f"--samples-from must be 1 to {MAX_SAMPLES_FROM} printable characters, got "
                             f"{self.samples_from[:80]!r}")
        if self.out is None:
            self.out = os.path.join("cache", default_out_name(self.model))


def default_out_name(model: str) -> str:
    """The last path component of --model ('org/name' -> 'name'; '.' -> the current folder's name)."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        name = os.path.basename(os.path.abspath(os.path.expanduser(model)))
    return name or "teacher"


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
    """'hf' or 'vllm' for --engine auto|hf|vllm.

    auto picks vllm only when CUDA is available and a vLLM interpreter (engine_vllm.find_vllm_python)
    reports its vllm version; when KDCACHE_VLLM_PYTHON is set but that interpreter cannot run vLLM,
    auto warns and uses hf. --engine vllm without a working vLLM interpreter is a BuildError.
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
        raise BuildError(f"--engine vllm: {problem}; or use --engine hf")
    from cacher.engine_vllm import PYTHON_ENV_VAR

    if os.environ.get(PYTHON_ENV_VAR):  # asked for vLLM, and it is broken: say so; no vLLM at all is the normal case
        warn(f"--engine auto: {problem}; using the hf engine")
    return "hf"


def ignored_options(config: BuildConfig, engine: str) -> list[str]:
    """One sentence per option that was set (differs from its default) but that `engine` and --mode do not use."""
    defaults = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    changed = {name for name in defaults if getattr(config, name) != defaults[name]}
    notes = [f"--{name.replace('_', '-')} {why}" for name, why in ENGINES[engine].ignored_options.items()
             if name in changed]
    if config.mode == "generate":
        if config.text_field is not None:
            notes.append("--text-field is ignored in --mode generate: the prompts come from --prompt-field")
    else:
        for name in ("max_new_tokens", "temperature", "num_samples"):
            if name in changed:
                notes.append(f"--{name.replace('_', '-')} applies to --mode generate only; --mode score ignores it")
        if "seed" in changed and not config.tail_samples:
            notes.append("--seed seeds generate mode and --tail-samples only; this build uses neither")
    return notes


def build(config: BuildConfig, *, progress=None, log=print, warn=None) -> BuildResult:
    """Build (or resume, or find) the cache that `config` describes. See the module docstring.

    log(message) reports progress; warn(message) reports an option that has no effect (default: log).
    """
    started = time.time()
    with EncodePool() as pool:  # its processes start while the data and the teacher load
        return _build(config, pool, started, progress, log, warn or (lambda message: log(f"warning: {message}")))


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
            f"{sum(len(s.input_ids) for s in sequences):,} tokens in {len(plan)} shards (dropped tokens: {info.num_dropped}, "
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
            log(f"engine {engine_name} ({dtype}); {len(pending)} of {len(writer.my_shards())} shards of this worker to write")
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
    """Whether to load the teacher while the data is read: a local --out that holds no complete cache, and (with
    --reuse) no complete cache of the same teacher and data under its parent, which the build might reuse instead."""
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
    """The vocabulary V a cache of this teacher holds, after checking --top-k, --tail-samples and --max-length."""
    vocab_size, logit_rows = model_vocab(model_folder, tokenizer)
    if logit_rows > vocab_size:
        log(f"teacher: {logit_rows} embedding rows for {vocab_size} token ids; the {logit_rows - vocab_size} padded "
            "rows are never stored (their probability counts in the tail)")
    if config.top_k > vocab_size:
        raise BuildError(f"--top-k {config.top_k} is larger than the teacher's vocabulary ({vocab_size}); use at most {vocab_size}")
    if config.top_k + config.tail_samples > vocab_size:
        raise BuildError(f"--top-k {config.top_k} + --tail-samples {config.tail_samples} exceeds the teacher's vocabulary "
                         f"({vocab_size}); a row's K + M ids are distinct, so use at most {vocab_size - config.top_k} tail samples")
    context = model_context(model_folder)
    if context is not None and config.max_length > context:
        raise BuildError(f"--max-length {config.max_length} exceeds the model's context of {context} tokens; use --max-length {context} or less")
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
