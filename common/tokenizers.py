"""Tokenizers: load one from a model folder or name, and fingerprint its vocabulary.

The vocabulary fingerprint is what a cache records of its teacher's tokenizer and what a student's
tokenizer is checked against, so the cacher and the trainer use this one function.

Knows transformers' AutoTokenizer and model folders (common.models); nothing about data sets, the cache
format or training.
"""

from __future__ import annotations

from pathlib import Path

from common.models import ModelError, model_folder
from common.vocab import vocab_fingerprint  # noqa: F401 - part of this module's API


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
        fix = ("rerun with {trust_remote_code} if you trust it" if "trust_remote_code" in str(exc)
               else f"check its config.json and tokenizer files (re-save them with save_pretrained({str(path)!r}))")
        raise ModelError(f"could not load the tokenizer of {path} ({type(exc).__name__}: {reason}); {fix}") from exc


def tokenizer_of(name_or_path: str):
    """The tokenizer saved with a model (or in a tokenizer-only folder) named by a model name (common.models)."""
    return load_tokenizer(model_folder(name_or_path, need_config=False))
