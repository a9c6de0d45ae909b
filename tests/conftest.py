"""Shared fixtures: a tokenizer trained on the spot, tiny GPT-2 and Llama models built from configs.

Nothing here downloads anything, and nothing outside the checkout is read: the data are the repository's
own (data/README.md). The tokenizer is a byte-level BPE trained on the first part of data/shakespeare.txt
(common.tiny), so token ids mean something and texts round-trip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common import tiny
from common.tiny import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
SHAKESPEARE = DATA / "shakespeare.txt"
GSM8K = DATA / "gsm8k" / "train_200.jsonl"

TINY_VOCAB = 384

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shakespeare_text(num_chars: int = 200_000) -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:num_chars]


def train_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB):
    """The tests' tokenizer: a byte-level BPE trained on the first 200,000 characters of Shakespeare."""
    return tiny.train_tokenizer(out_dir, shakespeare_text(), vocab_size)


@pytest.fixture
def hub_calls(monkeypatch) -> list[str]:
    """Every hub download and name lookup the code under test attempts (each then fails as offline would)."""
    import socket

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("no network in this test")

    def getaddrinfo(host, *args, **kwargs):
        calls.append(f"dns:{host}")
        raise OSError("no network in this test")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    with GSM8K.open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(50)]


# ---------------------------------------------------------------------------------------------
# Heavy tests: marked vllm / slow / multiproc; plain `pytest` skips them, `pytest --heavy` (CI) runs them.

HEAVY_MARKERS = ("vllm", "slow", "multiproc")
_VLLM_VENV = REPO_ROOT / ".venv-vllm" / "bin" / "python"
if _VLLM_VENV.exists():
    os.environ.setdefault("KDCACHE_VLLM_PYTHON", str(_VLLM_VENV))


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true", help="also run tests marked vllm, slow or multiproc (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--heavy"):
        return
    skip = pytest.mark.skip(reason="heavy test: run with `pytest --heavy` (CI does)")
    for item in items:
        if any(m in item.keywords for m in HEAVY_MARKERS):
            item.add_marker(skip)
