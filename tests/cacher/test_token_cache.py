"""cacher/token_cache.py: a local file read with the same settings and tokenizer is tokenized once; any change to
the file, a setting or the tokenizer reads it again; a damaged entry is made again."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cacher import token_cache
from common.sequences import load_prompts, load_sequences
from common.tokenizers import load_tokenizer
from tests.conftest import GSM8K, shakespeare_text


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def counting(load):
    calls = []

    def run():
        calls.append(1)
        return load()
    return run, calls


def same(a, b) -> bool:
    (sa, ia), (sb, ib) = a, b
    return ia == ib and len(sa) == len(sb) and all(
        np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.loss_mask, y.loss_mask) and x.meta() == y.meta()
        and x.reference == y.reference for x, y in zip(sa, sb))


def test_a_file_is_tokenized_once_per_settings(home, tiny_gpt2_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text(3000))
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    settings = {"reader": "load_sequences", "max_length": 16, "limit": None}
    load, calls = counting(lambda: load_sequences(str(text), tokenizer, max_length=16))
    first = token_cache.cached(load, str(text), str(tiny_gpt2_dir), settings)
    again = token_cache.cached(load, str(text), str(tiny_gpt2_dir), settings)
    assert len(calls) == 1 and same(first, again) and same(first, load_sequences(str(text), tokenizer, max_length=16))

    token_cache.cached(load, str(text), str(tiny_gpt2_dir), {**settings, "max_length": 17})  # another setting
    text.write_text(shakespeare_text(3001))  # another file (size and time)
    token_cache.cached(load, str(text), str(tiny_gpt2_dir), settings)
    assert len(calls) == 3
    (entry,) = [p for p in (home / "tokens").iterdir() if p.name == token_cache.entry_path(
        str(text), str(tiny_gpt2_dir), settings).name]
    entry.write_bytes(b"damaged")
    assert same(token_cache.cached(load, str(text), str(tiny_gpt2_dir), settings), load())
    assert len(calls) == 5  # read again (and the call in the assertion)


def test_prompts_with_references_and_a_changed_tokenizer(home, tiny_gpt2_dir, tmp_path):
    import shutil

    tokenizer = load_tokenizer(tiny_gpt2_dir)
    settings = {"reader": "load_prompts", "prompt_field": "question", "response_field": "answer", "limit": 5}
    load, calls = counting(lambda: load_prompts(str(GSM8K), tokenizer, prompt_field="question",
                                                response_field="answer", limit=5))
    first = token_cache.cached(load, str(GSM8K), str(tiny_gpt2_dir), settings)
    assert same(first, token_cache.cached(load, str(GSM8K), str(tiny_gpt2_dir), settings)) and len(calls) == 1
    assert first[0][0].reference
    other = tmp_path / "other-model"
    shutil.copytree(tiny_gpt2_dir, other)
    with open(other / "tokenizer_config.json", "a") as f:  # the same tokenizer, but its files changed
        f.write(" ")
    token_cache.cached(load, str(GSM8K), str(other), settings)
    assert len(calls) == 2


def test_only_local_files_are_kept(home, tiny_gpt2_dir, tmp_path):
    assert token_cache.entry_path("builtin:pydoc-topics", str(tiny_gpt2_dir), {}) is None
    assert token_cache.entry_path(str(tmp_path), str(tiny_gpt2_dir), {}) is None  # a folder


def test_an_unwritable_home_only_costs_time(tiny_gpt2_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("KDCACHE_HOME", str(blocker))  # tokens/ cannot be made under a file
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text(2000))
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    load, calls = counting(lambda: load_sequences(str(text), tokenizer, max_length=16))
    token_cache.cached(load, str(text), str(tiny_gpt2_dir), {})
    token_cache.cached(load, str(text), str(tiny_gpt2_dir), {})
    assert len(calls) == 2 and os.path.isfile(blocker)
