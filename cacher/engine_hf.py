"""The hf teacher engine: transformers forward passes in this process (the Engine protocol of cacher/engine.py).

Batches fill a token budget. On CPU (and wherever packing is not available) they are padded, longest
sequences first, exactly as before; on CUDA with a bf16/fp16 teacher they are packed (cacher/varlen.py:
one row of consecutive sequences, no padding). The output head, log-softmax, top-K, target and tail run
on the device in float32 row chunks of the last hidden states (cacher/rows.py), so no (batch, length,
vocab) tensor is made and a bf16 teacher still gets float32 logits; architectures whose logits are not
just head(hidden) use the plain forward instead. On CUDA a batch's rows travel to the host while the next
batch runs.

Padded embedding rows: a teacher may have more logit rows W than its tokenizer has ids S (Qwen2.5-7B:
W = 152064, S = 151665); rows >= S are padding that no tokenizer produces. Both engines store the
same thing for them, computable exactly by both: the log-probs are those of the teacher's softmax
over all W logits (what vLLM returns, and it cannot restrict prompt_logprobs to some ids); the top K
are the K most likely ids below S; so tail_logprob = log(1 - sum of the top K) holds the padded rows'
mass with the rest of the tail (a renormalization over the S ids would need that mass, which vLLM
does not report). Tail samples are drawn among ids below S outside the top K, and generate mode never
samples an id >= S. No stored id is ever >= S.

Knows models and torch; nothing about the cache's files (that is shared/'s job) or the data sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cacher import varlen
from cacher.engine import (
    DEFAULT_BATCH_TOKENS,
    DTYPES,
    EngineError,
    EngineSettings,
    GenerateGroup,
    Progress,
    Scored,
    ScoreGroup,
    check_finite,
)
from cacher.rows import Head, device_rows, sample_uniforms


@dataclass
class HFTeacher:
    model: object
    device: str
    dtype: str
    vocab_size: int  # the width of the logits (W)
    max_positions: int | None
    num_token_ids: int = 0  # S: ids >= S (padded rows) are never stored; 0 (default) or == vocab_size: no padding
    head: Head | None = None  # the output head on hidden-state chunks, when that path is exact
    packed: bool = False  # batches are packed (cacher/varlen.py) rather than padded

    def __post_init__(self):
        if not self.num_token_ids:
            self.num_token_ids = self.vocab_size


def load_hf_teacher(path: str, *, dtype: str = "float32", device: str | None = None,
                    trust_remote_code: bool = False, num_token_ids: int | None = None) -> HFTeacher:
    """The teacher in eval mode; num_token_ids: the tokenizer's ids S (default: every logit row); see the module
    docstring on padded rows."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise EngineError(f"{{dtype}} {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not os.environ.get("OMP_NUM_THREADS"):  # torch's own default counts physical cores; use them all unless told
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, SafetensorError) as exc:  # unknown architecture, missing or damaged weight files
        if "trust_remote_code" in str(exc):
            raise EngineError(f"model {path} needs custom code; rerun with {{trust_remote_code}} if you trust it") from exc
        raise EngineError(f"could not load model {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                          "check its config.json and weight files (re-save with model.save_pretrained)") from exc
    model.to(device).eval()
    cfg = model.config
    max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    out = model.get_output_embeddings()
    rows = int(out.weight.shape[0])
    teacher = HFTeacher(model=model, device=device, dtype=dtype, vocab_size=rows, max_positions=max_positions,
                        num_token_ids=min(rows, num_token_ids) if num_token_ids else rows)
    if _hidden_path_is_exact(model):
        teacher.head = _head(out)
    teacher.packed = varlen.available(device, dtype) and _packing_is_exact(teacher)
    return teacher


def _hidden_path_is_exact(model) -> bool:
    """True when logits == output_head(base_model(...).last_hidden_state) for this architecture.

    Checked once on a short probe; models that scale or soft-cap their logits fail it and use the
    plain forward instead.
    """
    import torch

    try:
        with torch.inference_mode():
            ids = torch.arange(1, 9, device=next(model.parameters()).device).unsqueeze(0) % model.config.vocab_size
            full = model(input_ids=ids).logits.float()
            hidden = model.base_model(input_ids=ids).last_hidden_state
            head = model.get_output_embeddings()
            mine = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                              head.bias.float() if getattr(head, "bias", None) is not None else None)
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 0.25
        return bool(torch.allclose(full, mine, atol=tol, rtol=tol * 0.1))
    except Exception:  # noqa: BLE001 - any architecture quirk means: use the plain forward
        return False


def _head(out) -> Head:
    """The head on float32 copies; on CUDA with a bf16/fp16 head, its own weights with float32 accumulation
    and output (rows.Head) when this torch's mm takes out_dtype and agrees with the float32 product."""
    import torch

    weight, bias = out.weight.detach(), out.bias.detach() if getattr(out, "bias", None) is not None else None
    exact = Head(weight.float(), bias.float() if bias is not None else None)
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return exact
    fast = Head(weight, bias, low_precision_mm=True)
    try:
        with torch.inference_mode():
            x = torch.randn(64, weight.shape[1], device=weight.device).to(weight.dtype)
            agree = torch.allclose(fast(x), exact(x), rtol=1e-4, atol=1e-3)
    except (TypeError, RuntimeError):  # no out_dtype in this torch, or not for this dtype
        return exact
    return fast if agree else exact


def _packing_is_exact(teacher: HFTeacher) -> bool:
    """Packed rows of two short sequences match their padded batch (within the teacher dtype's rounding)."""
    import torch

    seqs = [np.arange(3, 10) % teacher.vocab_size, np.arange(20, 40) % teacher.vocab_size]
    try:
        with torch.inference_mode():
            padded = _forward_padded(teacher, seqs, [0, 1])[0].float()
            ids, positions, _, cu, longest = varlen.pack(seqs, teacher.device)
            with varlen.packed(teacher.model, cu, longest):
                packed = teacher.model.base_model(input_ids=ids, position_ids=positions).last_hidden_state[0].float()
    except Exception:  # noqa: BLE001 - any failure of the packed path means: pad
        return False
    error = (padded - packed).norm(dim=-1) / padded.norm(dim=-1).clamp_min(1e-6)
    return bool(error.max() < 0.05)  # attending across the two sequences, or wrong positions, is far above this


# ---------------------------------------------------------------------------------------------
# Batches


def length_sorted_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size stays within batch_tokens.

    A sequence longer than batch_tokens forms a batch of its own. Deterministic: ties keep input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def packed_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive indices whose tokens add up to at most batch_tokens (a longer sequence alone), in input order."""
    batches, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def _forward_padded(teacher: HFTeacher, sequences, batch: list[int]):
    """(hidden states or logits of the batch's real rows (R, H or V), their next-token targets (R,))."""
    import torch

    lengths = [len(sequences[i]) for i in batch]
    width = max(lengths)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.full((len(batch), width), -1, dtype=torch.long)
    for row, i in enumerate(batch):
        seq = torch.as_tensor(np.asarray(sequences[i], dtype=np.int64))
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        targets[row, : len(seq) - 1] = seq[1:]
    valid = attention.bool().to(teacher.device)
    kwargs = {"input_ids": input_ids.to(teacher.device), "attention_mask": attention.to(teacher.device)}
    if teacher.head is not None:
        rows = teacher.model.base_model(**kwargs).last_hidden_state[valid]  # (R, H) real rows only
    else:
        rows = teacher.model(**kwargs).logits[valid]  # (R, V)
    return rows, targets.to(teacher.device)[valid]


def _forward_packed(teacher: HFTeacher, sequences, batch: list[int]):
    ids, positions, targets, cu, longest = varlen.pack([sequences[i] for i in batch], teacher.device)
    with varlen.packed(teacher.model, cu, longest):
        if teacher.head is not None:
            return teacher.model.base_model(input_ids=ids, position_ids=positions).last_hidden_state[0], targets  # (N, H)
        return teacher.model(input_ids=ids, position_ids=positions).logits[0], targets  # (N, V)


# ---------------------------------------------------------------------------------------------
# Scoring


def score_batches(teacher: HFTeacher, sequences: list[np.ndarray], *, top_k: int, batch_tokens: int,
                  tail_samples: int = 0, tail_seed: int = 0,
                  sample_keys: list | None = None) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """(indices of a batch's sequences, their rows concatenated in that order), batch by batch.

    While one batch's rows travel to the host (CUDA), the next batch runs. Sequence i's tail draws are
    seeded by (tail_seed, *sample_keys[i]) (default key: (i,)).
    """
    import torch

    if top_k > teacher.num_token_ids:
        raise EngineError(f"{{top_k}} {top_k} is larger than the teacher's vocabulary ({teacher.num_token_ids} token "
                          "ids)")
    if sample_keys is not None and len(sample_keys) != len(sequences):
        raise ValueError(f"sample_keys has {len(sample_keys)} entries for {len(sequences)} sequences")
    lengths = [len(s) for s in sequences]
    chunk_rows = logit_chunk_rows(teacher)
    forward = _forward_packed if teacher.packed else _forward_padded
    plan = (packed_batches if teacher.packed else length_sorted_batches)(lengths, batch_tokens)
    pending = None
    with torch.inference_mode():
        for batch in plan:
            rows, targets = forward(teacher, sequences, batch)
            uniforms = None
            if tail_samples:
                keys = [tuple(sample_keys[i]) if sample_keys is not None else (i,) for i in batch]
                uniforms = sample_uniforms(keys, [lengths[i] for i in batch], tail_samples, tail_seed)
            host = device_rows(rows, top_k, targets, chunk_rows, teacher.head, uniforms, teacher.num_token_ids)
            del rows
            if pending is not None:
                yield pending[0], pending[1].numpy()
            pending = (batch, host)
        if pending is not None:
            yield pending[0], pending[1].numpy()


def logit_chunk_rows(teacher: HFTeacher) -> int:
    """Rows of float32 logits made at once: ~64 MiB on CPU (as always: CPU rows stay bit for bit); on CUDA up to
    2 GiB, at most 1/20 of the device's memory, since a few hundred rows per matmul and top-K leave a GPU idle."""
    budget = 2**26
    if teacher.device.startswith("cuda"):
        import torch

        budget = min(2**31, torch.cuda.get_device_properties(teacher.device).total_memory // 20)
    return max(1, budget // (4 * teacher.vocab_size))


def split_rows(batch: list[int], rows: dict[str, np.ndarray], lengths: list[int]) -> Iterator[tuple[int, dict]]:
    """(sequence index, its rows) for each sequence of a batch whose rows are concatenated in batch order."""
    pos = 0
    for i in batch:
        n = lengths[i]
        yield i, {name: a[pos:pos + n] for name, a in rows.items()}
        pos += n


def score_hf(teacher: HFTeacher, sequences: list[np.ndarray], *, top_k: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
             on_batch=None, tail_samples: int = 0, tail_seed: int = 0, sample_keys: list | None = None) -> list[dict]:
    """Run the teacher over sequences (lists of token ids); rows (cacher/engine.py) in input order.

    on_batch(num_sequences, num_tokens) is called after each batch (progress bars). tail_samples = M > 0
    adds tail_ids / tail_counts; pass each sequence's place in the whole data set as its sample key to make
    its draws independent of how the sequences are split into calls.
    """
    lengths = [len(s) for s in sequences]
    results: list[dict | None] = [None] * len(sequences)
    for batch, rows in score_batches(teacher, sequences, top_k=top_k, batch_tokens=batch_tokens,
                                     tail_samples=tail_samples, tail_seed=tail_seed, sample_keys=sample_keys):
        for i, seq_rows in split_rows(batch, rows, lengths):
            check_finite(seq_rows, f"sequence {i}")
            results[i] = seq_rows
        if on_batch is not None:
            on_batch(len(batch), sum(lengths[i] for i in batch))
    return results


class HFEngine:
    """The Engine protocol over transformers: loads the teacher when made."""

    name = "hf"
    ignored_options: ClassVar[dict[str, str]] = {
        name: "applies to the vllm engine only; the hf engine ignores it"
        for name in ("tensor_parallel_size", "gpu_memory_utilization")}

    def __init__(self, model_path: str, settings: EngineSettings):
        self.settings = settings
        self.teacher = load_hf_teacher(model_path, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code,
                                       num_token_ids=settings.num_token_ids)

    @staticmethod
    def version() -> str:
        import transformers

        return f"transformers {transformers.__version__}"

    def score(self, groups: Iterable[ScoreGroup], on_progress: Progress) -> Iterator[Scored]:
        s = self.settings
        for number, group in enumerate(groups):
            lengths = [len(q) for q in group.sequences]
            try:
                for batch, rows in score_batches(self.teacher, group.sequences, top_k=s.top_k, batch_tokens=s.batch_tokens,
                                                 tail_samples=s.tail_samples, tail_seed=s.tail_seed,
                                                 sample_keys=group.sample_keys):
                    for i, seq_rows in split_rows(batch, rows, lengths):
                        check_finite(seq_rows, f"sequence {i}")
                        yield Scored(number, i, seq_rows)
                    on_progress(len(batch), sum(lengths[i] for i in batch))
            except EngineError as exc:
                raise EngineError(f"{group.label}: {exc}" if group.label else str(exc)) from exc

    def generate(self, groups: Iterable[GenerateGroup]) -> Iterator[list[list[np.ndarray]]]:
        s = self.settings
        for group in groups:
            yield generate_hf(self.teacher, group.prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              num_samples=s.num_samples, seed=s.seed, eos_token_id=s.eos_token_id,
                              pad_token_id=s.pad_token_id, max_length=s.max_length, prompt_indices=group.prompt_indices)

    def close(self) -> None:
        return None


def generate_hf(teacher: HFTeacher, prompts: list[np.ndarray], *, max_new_tokens: int, temperature: float,
                num_samples: int, seed: int, eos_token_id: int | None, pad_token_id: int | None,
                max_length: int | None = None, prompt_indices: list[int] | None = None) -> list[list[np.ndarray]]:
    """Sample num_samples responses per prompt (greedy when temperature == 0); ids of the responses only.

    Each response stops at its first EOS (kept), after max_new_tokens, or when prompt + response reach
    max_length tokens (default: the model's positions; generating past them would index outside the
    position table). Prompt p is sampled from seed `seed * 1_000_003 + prompt_indices[p]` (default: p),
    so passing each prompt's index in the whole data set makes its samples independent of batching.
    Padded logit rows (ids >= teacher.num_token_ids) are never sampled.
    """
    import torch

    limits = [x for x in (max_length, teacher.max_positions) if x is not None]
    limit = min(limits) if limits else None
    out = []
    with torch.inference_mode():
        for p_index, prompt in zip(prompt_indices if prompt_indices is not None else range(len(prompts)), prompts):
            new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt))
            if new_tokens < 1:
                out.append([])
                continue
            torch.manual_seed(seed * 1_000_003 + p_index)
            ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64)).unsqueeze(0).to(teacher.device)
            kwargs = {"max_new_tokens": new_tokens, "num_return_sequences": num_samples,
                      "pad_token_id": pad_token_id if pad_token_id is not None else (eos_token_id or 0),
                      "eos_token_id": eos_token_id, "attention_mask": torch.ones_like(ids)}
            if teacher.num_token_ids < teacher.vocab_size:
                kwargs["suppress_tokens"] = list(range(teacher.num_token_ids, teacher.vocab_size))
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False, num_return_sequences=1)
            gen = teacher.model.generate(ids, **kwargs)[:, ids.shape[1]:]
            samples = []
            for row in gen.cpu().numpy():
                if eos_token_id is not None and (row == eos_token_id).any():
                    row = row[: int(np.argmax(row == eos_token_id)) + 1]  # keep the first EOS, drop padding
                samples.append(row.astype(np.int64))
            out.append(samples)
    return out
