"""Tokenized data kept under $KDCACHE_HOME/tokens, so that building from the same local file again skips reading and
tokenizing it.

An entry is keyed by the file's real path, size and modification time, the tokenizer's files, every
setting that shapes the sequences, the versions of transformers and tokenizers, and the source of the modules
that make sequences (common/sequences.py, templates.py, datasets.py): a change to any of them is a new entry.
Entries are plain arrays (numpy .npz, read without pickle) and JSON, written atomically; one that cannot be
read is made again, and a home that cannot be written only costs the time saved. Hub data sets and folders
are not kept (their identity is not a file's size and time).

Knows common.sequences' Sequence and DataInfo; nothing about models or the cache format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common import datasets, sequences, templates
from common.models import kdcache_home
from common.sequences import DataInfo, Sequence

FORMAT = 1


def _code_digest() -> str:
    h = hashlib.sha256()
    for module in (sequences, templates, datasets):
        h.update(Path(module.__file__).read_bytes())
    import tokenizers
    import transformers

    h.update(f"{transformers.__version__} {tokenizers.__version__} {FORMAT}".encode())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
MAX_TOKENIZER_FILE = 256 * 2**20


def tokenizer_digest(model_folder: str) -> str:
    """sha256 over the model folder's top-level files other than weights (tokenizer, templates, configs)."""
    h = hashlib.sha256()
    for entry in sorted(os.scandir(model_folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.endswith(WEIGHT_SUFFIXES) and not entry.name.startswith(".") \
                and entry.stat().st_size <= MAX_TOKENIZER_FILE:
            h.update(entry.name.encode() + b"\0" + Path(entry.path).read_bytes() + b"\0")
    return h.hexdigest()


def entry_path(dataset: str, model_folder: str, settings: dict) -> Path | None:
    """Where the entry for these inputs lives; None when `dataset` is not a local file."""
    path = os.path.realpath(os.path.expanduser(dataset))
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = json.dumps({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "tokenizer": tokenizer_digest(model_folder), "settings": settings, "code": _code_digest()},
                     sort_keys=True)
    return kdcache_home() / "tokens" / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"


def cached(load: Callable[[], tuple[list[Sequence], DataInfo]], dataset: str, model_folder: str,
           settings: dict) -> tuple[list[Sequence], DataInfo]:
    """load()'s result, from the entry when there is one; otherwise load() and keep its result.

    model_folder: where the tokenizer was loaded from; settings: every argument of load() but the data set.
    """
    path = entry_path(dataset, model_folder, settings)
    if path is not None and path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged or of another layout: made again below
    result = load()
    if path is not None:
        try:
            _write(path, *result)
        except OSError:
            pass
    return result


def _write(path: Path, seqs: list[Sequence], info: DataInfo) -> None:
    lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    meta = {"info": dataclasses.asdict(info),
            "sequences": [[s.source_index, s.window_index, s.prompt_length, s.text_sha256, s.reference] for s in seqs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lengths=lengths, input_ids=np.concatenate([s.input_ids for s in seqs]).astype(np.int64),
                     loss_mask=np.concatenate([np.asarray(s.loss_mask, dtype=bool) for s in seqs]),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path) -> tuple[list[Sequence], DataInfo]:
    with np.load(path, allow_pickle=False) as z:
        lengths, ids, mask = z["lengths"], z["input_ids"], z["loss_mask"]
        meta = json.loads(z["meta"].tobytes())
    if len(meta["sequences"]) != len(lengths) or int(lengths.sum()) != len(ids) or len(mask) != len(ids):
        raise ValueError(f"{path}: inconsistent entry")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seqs = [Sequence(ids[a:b].copy(), mask[a:b].copy(), source_index=m[0], window_index=m[1], prompt_length=m[2],
                     text_sha256=m[3], reference=m[4])
            for a, b, m in zip(bounds[:-1], bounds[1:], meta["sequences"])]
    return seqs, DataInfo(**meta["info"])
