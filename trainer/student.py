"""Students: load one, build one from a teacher by dropping layers or from a config, check its tokenizer.

Students are plain Hugging Face folders (config.json + safetensors + tokenizer), so anything that reads
transformers checkpoints reads them.

Layer dropping (DistilBERT / Minitron-style init) keeps `keep_layers` evenly spaced transformer layers
of the teacher, with the teacher's embeddings, final norm and head. Layer i of the student is teacher
layer floor(i * (L - 1) / (keep_layers - 1) + 0.5), i.e. round(linspace(0, L - 1, keep_layers)) with
halves rounded up: the first and last layers are always kept (keep_layers == 1 keeps only layer 0).
Each kept layer's `layer_idx` is renumbered, because the KV cache is indexed by it.

Model names resolve by common.models' one rule; tokenizers are loaded and fingerprinted by common.tokenizers.
This module knows transformers models; it must not import `cacher` and knows nothing about the cache
format or the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.models import model_folder
from common.tokenizers import vocab_fingerprint
from trainer.errors import EvalError

# model_type -> dotted path of the ModuleList of transformer layers.
LAYER_LISTS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 or "float32" / "bfloat16" / "float16"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_student(path_or_id: str, dtype: torch.dtype | str = torch.float32):
    """A causal LM from a model name (common.models: the embedded default, a local folder or a hub id)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_folder(path_or_id), dtype=as_dtype(dtype))


def kept_layer_indices(num_layers: int, keep_layers: int) -> list[int]:
    """Teacher layers a `keep_layers`-layer student keeps: evenly spaced, first and last included."""
    if not 1 <= keep_layers <= num_layers:
        raise ValueError(
            f"keep_layers={keep_layers} but the teacher has {num_layers} layers; "
            f"choose 1 <= keep_layers <= {num_layers}"
        )
    if keep_layers == 1:
        return [0]
    # The spacing (L-1)/(n-1) is >= 1, so the indices are distinct.
    return [int(i * (num_layers - 1) / (keep_layers - 1) + 0.5) for i in range(keep_layers)]


def drop_layers(model, keep_layers: int):
    """Keep `keep_layers` evenly spaced layers of `model` in place, renumber them, update its config."""
    config = model.config
    model_type = config.model_type
    if model_type not in LAYER_LISTS:
        raise ValueError(
            f"cannot drop layers of a {model_type!r} model ({type(model).__name__}); "
            f"supported model types: {', '.join(sorted(LAYER_LISTS))}"
        )
    parent_path, _, attr = LAYER_LISTS[model_type].rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    kept = kept_layer_indices(len(layers), keep_layers)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(layers))):
        raise ValueError(
            "this GPT-2 scales attention by 1/(layer_idx+1) (scale_attn_by_inverse_layer_idx=True), so a kept "
            "layer would compute differently at its new position; build the student with student_from_config"
        )
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():  # e.g. self_attn.layer_idx (Llama), attn.layer_idx (GPT-2)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(parent, attr, new_layers)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)  # GPT-2 maps this to n_layer
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    return model


def student_from_teacher(teacher_path: str, keep_layers: int, dtype: torch.dtype | str = torch.float32):
    """A copy of the teacher keeping `keep_layers` evenly spaced layers (see the module docstring)."""
    return drop_layers(load_student(teacher_path, dtype), keep_layers)


def student_from_config(config_file: str | Path, vocab_size: int):
    """A randomly initialised causal LM from a JSON config with a `model_type` key.

    vocab_size (the teacher's number of token ids) overrides any vocab_size in the file. Seed with
    torch.manual_seed before calling for a reproducible init.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(config_file)
    try:
        fields = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"student config {config_file} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"student config {config_file} is not valid JSON: {e}") from None
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError(
            f'student config {config_file} has no "model_type" (e.g. "llama" or "gpt2"); add one'
        )
    fields["vocab_size"] = vocab_size
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise ValueError(f"student config {config_file}: {e}") from None
    return AutoModelForCausalLM.from_config(config)


def check_tokenizer_matches(
    student_tokenizer,
    expected_vocab_sha256: str,
    expected_vocab_size: int,
    *,
    num_student_embeddings: int | None = None,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> None:
    """Raise unless the student reads token ids as the teacher that wrote the cache does.

    expected_vocab_sha256: the teacher tokenizer's `vocab_fingerprint`, as the cache recorded it.
    expected_vocab_size: how many token ids the cache's rows range over (its ids are below it): a cache's
        vocab_size (cache_token_ids), which kdcache build sets to the tokenizer's size, never to a teacher's
        padded embedding rows (Qwen2.5-7B: 152064 rows, 151665 ids).
    num_student_embeddings: rows of the student's input embedding; more than expected_vocab_size
        (a padded matrix) is fine, fewer is an error.
    """
    found = vocab_fingerprint(student_tokenizer)
    if found != expected_vocab_sha256:
        raise ValueError(
            f"the tokenizer of student {student_name!r} ({len(student_tokenizer)} tokens, vocab sha256 "
            f"{found[:12]}) differs from that of teacher {teacher_name!r} which wrote the cache "
            f"(vocab sha256 {expected_vocab_sha256[:12]}), so cached token ids would mean other tokens to "
            "the student; build the student on the teacher's tokenizer (a layer-dropped teacher, or a "
            "config with the teacher's vocab_size saved with the teacher's tokenizer)"
        )
    if num_student_embeddings is not None and num_student_embeddings < expected_vocab_size:
        raise ValueError(
            f"student {student_name!r} has {num_student_embeddings} embedding rows but teacher "
            f"{teacher_name!r} emits {expected_vocab_size} token ids, so cached ids could fall outside the "
            f"student's vocabulary; build the student with vocab_size >= {expected_vocab_size}"
        )


def cache_token_ids(tokenizer_section: dict) -> int:
    """The number of token ids a cache's rows range over, from its manifest's `tokenizer` section.

    A student needs that many embedding rows, and the trainer cuts the student's logits to it, so the
    loss sees only ids below it. It is vocab_size, the format's bound on every stored id: the tokenizer's
    size, never a teacher's padded logit rows (storage_layout.md 3; a cache of an older format, which could
    record them, is refused when it is opened).
    """
    return int(tokenizer_section["vocab_size"])


def save_student(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a plain Hugging Face folder: config.json, model.safetensors, tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# What the training step may rely on (checked on the student itself, not assumed from its type)


class HiddenStates(nn.Module):
    """The student without its LM head: forward(**inputs) -> (B, L, H) final hidden states (after the last norm).

    The trainer wraps this (with DDP, torch.compile) when the loss makes the logits from the hidden states and
    the head's weight chunk by chunk (trainer.losses.linear_kd_loss); `model` stays the full causal LM.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model.base_model(**{"use_cache": False, **inputs}).last_hidden_state  # training: no KV cache


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them (transformers'
    gradient_checkpointing_enable with non-reentrant torch.utils.checkpoint).

    A step then holds the activations of the layer inputs and one layer at a time instead of every layer's, for about
    one more forward per step; loss and gradients are unchanged (the recompute replays the saved RNG state, so dropout
    draws the same masks). The layers are the base model's, so HiddenStates' forward is checkpointed too. Active in
    train mode only. Raises ValueError when the model's class has no checkpointing support.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"the student ({type(model).__name__}) does not support gradient checkpointing "
                         "(transformers' supports_gradient_checkpointing is False for its class)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _probe_ids(model, num_tokens: int) -> torch.Tensor:
    """(1, num_tokens) token ids spread over the vocabulary, on the model's device."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return (torch.arange(num_tokens, device=device) * 7919 % vocab)[None]


@torch.no_grad()
def linear_head_weight(model) -> nn.Parameter | None:
    """The LM head's weight when the student's logits are exactly `hidden_states @ weight.T`, else None.

    A plain bias-free nn.Linear head on HiddenStates' output, checked on a short input in eval mode (so a
    model that scales, soft-caps or biases its logits, or whose base model is not what feeds the head, gets
    None and the trainer falls back to the full logits).
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or not hasattr(model, "base_model"):
        return None
    was_training = model.training
    model.eval()
    try:
        ids = _probe_ids(model, 8)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (1, 8, V)
        hidden = HiddenStates(model)(input_ids=ids).float()  # (1, 8, H)
        rebuilt = hidden @ head.weight.float().T
    except (TypeError, AttributeError, ValueError):  # a base model that does not take these inputs
        return None
    finally:
        model.train(was_training)
    same = rebuilt.shape == logits.shape and torch.allclose(rebuilt, logits, rtol=1e-4, atol=1e-4)
    return head.weight if same else None


@torch.no_grad()
def packs_sequences(model) -> bool:
    """Whether the student keeps packed sequences apart: two sequences in one row with position_ids restarting
    at 0 and no attention mask give the logits each gets alone (trainer/batch.py's packed layout)."""
    was_training = model.training
    model.eval()
    try:
        ids = _probe_ids(model, 11)
        first, second = ids[:, :5], ids[:, 5:]
        alone = torch.cat([model(input_ids=first, use_cache=False).logits,
                           model(input_ids=second, use_cache=False).logits], dim=1).float()
        positions = torch.cat([torch.arange(5), torch.arange(6)]).to(ids.device)[None]
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()  # no KV cache: packing
    except (TypeError, ValueError, RuntimeError):  # a model that takes no position_ids
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed, alone, rtol=1e-4, atol=1e-4))


def load_model(path: str, *, need_tokenizer: bool = True):
    """(model, tokenizer) named by `path` under common.models' rule (a mistyped local path fails at once).

    need_tokenizer: False for metrics on cache rows only, which read token ids and never text: the tokenizer
    is then None, and a folder without one (a run's checkpoint holds weights only) will do.
    """
    from transformers.utils import logging as hf_logging

    from common.tokenizers import load_tokenizer

    hf_logging.disable_progress_bar()
    folder = str(model_folder(path))
    try:
        model = load_student(folder)
        tokenizer = load_tokenizer(folder) if need_tokenizer else None
    except OSError as exc:
        raise EvalError(f"could not load model/tokenizer from {path}: {exc}") from exc
    model.eval()
    return model, tokenizer
