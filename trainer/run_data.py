"""`kdtrain run`'s data, set up before the loop: the cache opened and verified, the held-out split, the mix cache,
the context check, the held-out batches, the run's length in steps and its batcher.

- A cache up to VERIFY_ALL_BYTES is hashed completely before training; a larger one shard by shard the first
  time a shard is read (CacheReader verify_on_read), still before any of its rows is trained on.
- The held-out sequences follow trainer/data.py's rule; without a cache, --dataset is tokenized with the
  student's tokenizer (common.sequences.load_sequences).
- With --mix-cache, batches come from both caches at --mix (trainer/mixed.py).
- kdtrain never cuts a cache's sequences: one longer than the student's context is refused before training.

Knows the cache reader, trainer/data.py's sources, the Batcher and TrainConfig's data fields; nothing about
models beyond their config's context length, nor about losses, the optimizer or the loop.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from shared.format import CacheError
from shared.reader import CacheReader
from trainer.batch import Batch, collate
from trainer.config import TrainConfig
from trainer.data import (
    Source,
    cache_index,
    cache_source,
    epoch_order,
    heldout_hash,
    heldout_mask,
    pack_batches,
    sequence_source,
)
from trainer.errors import TrainError
from trainer.loader import Batcher, plan_spans
from trainer.mixed import MixedBatcher, mix_source

# Caches up to this size are hashed completely before training starts (a few seconds per GiB);
# larger ones are hashed shard by shard the first time a shard is read (CacheReader verify_on_read),
# still before any of its rows is trained on.
VERIFY_ALL_BYTES = 4 * 2**30
# Chunk-aligned blocks whose sequences are shuffled together (trainer/data.py).
SHUFFLE_WINDOW_BLOCKS = 4


def open_cache(config: TrainConfig, log) -> CacheReader:
    """config.cache opened, verified (whole or on read, see VERIFY_ALL_BYTES) and holding loss tokens."""
    try:
        reader = CacheReader(config.cache, verify_on_read=True)
        num_bytes = reader.manifest.totals["num_bytes"]
        if num_bytes <= VERIFY_ALL_BYTES:
            started = time.time()
            problems = reader.verify()
            if problems:
                raise TrainError(f"cache {config.cache} is damaged, refusing to train on it: "
                                 + "; ".join(str(p) for p in problems[:5])
                                 + ". Rebuild the named shards (rerun the same `kdcache build`) or use another cache.")
            reader.verify_on_read = False  # every object was just hashed
            log(f"verified every object of {config.cache} ({num_bytes / 2**20:.1f} MiB) "
                f"in {time.time() - started:.1f}s")
    except CacheError as exc:
        raise TrainError(f"cannot train from {config.cache}: {exc.template}") from exc
    if reader.manifest.totals["num_loss_tokens"] == 0:
        raise TrainError(f"cache {config.cache} has no rows with loss_mask set, so there is nothing to distill; "
                         "rebuild it from data with response tokens (check kdcache build's --prompt-field and "
                         "--response-field)")
    return reader


def mix_sources(config: TrainConfig, reader: CacheReader | None, log) -> tuple[tuple[Source, ...], dict]:
    """((the training sequences of {mix_cache},), what a checkpoint must agree on) (trainer/mixed.py); without it
    (), and the same keys saying there is no mix, so that a resume that adds or drops {mix_cache} is refused too."""
    if config.mix_cache is None:
        return (), {"mix_cache_key": None, "mix": 0.0}
    mix_reader = open_cache(replace(config, cache=config.mix_cache), log)
    source = mix_source(mix_reader, reader, config.eval_fraction, has_teacher=config.loss != "ce",
                        tail_samples=uses_tail_samples(config, mix_reader), window_blocks=SHUFFLE_WINDOW_BLOCKS)
    log(f"mixing: {config.mix:.0%} of the batches from {config.mix_cache} ({len(source)} training sequences)")
    return (source,), {"mix_cache_key": mix_reader.manifest.cache_key, "mix": config.mix}


def training_batches(config: TrainConfig, train_src: Source, mixed: tuple[Source, ...], cursor: dict | None,
                     **options):
    """The run's batches: train_src's Batcher, or with {mix_cache} a MixedBatcher of both sources' Batchers."""
    def make(source: Source, at: dict | None) -> Batcher:
        return Batcher(source, batch_tokens=config.batch_tokens, seed=config.seed, cursor=at,
                       group_tokens=source.window_rows, **options)

    if not mixed:
        return make(train_src, cursor)
    return MixedBatcher(make, train_src, mixed[0], config.mix, config.seed, cursor)


def heldout_batches(eval_src: Source, batch_tokens: int) -> list[Batch]:
    """The held-out sequences in padded batches (whatever the training layout), each batch naming its sequences."""
    batches = []
    for a, b in pack_batches(eval_src.lengths, batch_tokens):
        batches.append(collate(eval_src.read(list(range(a, b))), eval_src.has_teacher))
        batches[-1].ids = eval_src.ids[a:b]
    return batches


def count_steps(config: TrainConfig, train_src: Source, world: int, row_tokens: int | None,
                mixed: tuple[Source, ...] = ()) -> int:
    """The run's optimizer steps: {steps}, else {epochs} of the rank with the fewest batches per epoch.

    With {mix_cache}, {epochs} counts passes over {cache}'s training sequences, which get a share 1 - {mix} of the
    batches (the mix cache's batches come on top); at {mix} 1 only the mix cache is drawn, so it counts passes over
    that one.
    """
    if config.steps is not None:
        return config.steps

    def per_epoch(source: Source) -> int:
        return min(len(plan_spans(source.lengths[epoch_order(
            len(source), config.seed, 0, r, world, blocks=source.blocks, window_blocks=source.window_blocks)],
            config.batch_tokens, row_tokens)) for r in range(world))

    if mixed and config.mix >= 1:
        batches = config.epochs * per_epoch(mixed[0])
    else:
        batches = config.epochs * per_epoch(train_src) / (1 - config.mix if mixed else 1)
    return max(1, int(batches / config.grad_accum))


def split_data(config: TrainConfig, reader: CacheReader | None, tokenizer) -> tuple[Source, Source, dict]:
    """(training source, evaluation source, description) by the held-out rule of trainer/data.py."""
    if reader is not None:
        try:
            index = cache_index(reader)
        except CacheError as exc:
            raise TrainError(f"cannot train from {config.cache}: {exc}") from exc
        held = heldout_mask(index.hashes, config.eval_fraction)
        tail = uses_tail_samples(config, reader)
        # --loss ce trains without the teacher's arrays, but is evaluated against them like every KD run
        train_src = cache_source(reader, index, np.flatnonzero(~held).tolist(), has_teacher=config.loss != "ce",
                                 window_blocks=SHUFFLE_WINDOW_BLOCKS, tail_samples=tail)
        eval_src = cache_source(reader, index, np.flatnonzero(held)[: config.eval_max_sequences].tolist(),
                                has_teacher=True, tail_samples=tail)
        info = {"num_sequences": len(index), "num_heldout": int(held.sum()),
                "teacher_outcomes": _outcomes_note(config, reader.manifest.top_k, reader.manifest.tail_samples, tail)}
    else:
        from common.sequences import load_sequences

        sequences, data_info = load_sequences(
            config.dataset, tokenizer, split=config.split, text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, max_length=config.max_length,
            limit=config.limit, prompt_template=config.prompt_template, input_field=config.input_field)
        held = heldout_mask(np.asarray([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences],
                                       dtype=np.int64), config.eval_fraction)
        train_src = sequence_source(sequences, np.flatnonzero(~held).tolist())
        eval_src = sequence_source(sequences, np.flatnonzero(held)[: config.eval_max_sequences].tolist())
        info = {"num_sequences": len(sequences), "num_heldout": int(held.sum()), "data": data_info.to_json()}
    if len(train_src) == 0:
        raise TrainError(f"no training sequences left after holding out {info['num_heldout']} of "
                         f"{info['num_sequences']} "
                         "for evaluation; use more data or a smaller {eval_fraction}")
    return train_src, eval_src, info


def student_context(model) -> tuple[int, str] | None:
    """(longest input the model's config allows, the config field saying so), or None when it names none."""
    stored = model.config.to_dict()  # the names config.json uses (GPT-2's n_positions, not its alias)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = stored.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_context(config: TrainConfig, model, student_name: str,
                  caches: list[tuple[str | None, tuple[Source, ...]]]) -> None:
    """Refuse, before training, sequences longer than the student's context (they crashed deep inside torch).

    caches: (a cache's URL, its sources) for each cache the run reads ({cache}, {mix_cache}); the refusal names the
    cache the longest sequence is in. kdtrain never cuts a cache's sequences: the teacher's rows of a cut window would
    describe a context the student does not see.
    """
    context = student_context(model)
    if context is None:
        return
    limit, key = context
    if config.cache is None and config.max_length > limit:
        raise TrainError(f"{{max_length}} {config.max_length} exceeds the context of student {student_name} ({key} = "
                         f"{limit} tokens); use {{max_length}} {limit} or less")
    for url, sources in caches:
        longer = [(int(src.lengths[i]), src.ids[i]) for src in sources for i in np.flatnonzero(src.lengths > limit)]
        if not longer:
            continue
        length, where = max(longer, key=lambda item: item[0])
        where = f"shard {where[0]} sequence {where[1]}" if url else f"sequence {where}"
        raise TrainError(f"cache {url}: {len(longer)} sequence(s) are longer than the context of student "
                         f"{student_name} ({key} = {limit} tokens), the longest {where} with "
                         f"{length} tokens; kdtrain does not cut a cache's sequences (the teacher's rows describe the "
                         f"whole window): use a student with a context of at least {length}, or rebuild the cache with "
                         f"kdcache build --max-length {limit} or less")


def uses_tail_samples(config: TrainConfig, reader: CacheReader | None) -> bool:
    """Whether the loss trains on the cache's tail samples: a cache that has them, --tail-samples, --loss fkl."""
    return bool(reader is not None and reader.manifest.tail_samples and config.tail_samples and config.loss == "fkl")


def _outcomes_note(config: TrainConfig, top_k: int, tail_samples: int, used: bool) -> str:
    """One line on what the KD loss compares (logged at start, kept in run.json)."""
    if config.loss == "ce":
        return "cross-entropy only"
    if used:
        return f"top-{top_k} + {tail_samples} importance-weighted tail samples (forward KL)"
    why = ""
    if tail_samples and config.tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused: they estimate forward KL only (--loss fkl)"
    elif tail_samples:
        why = f"; the cache's {tail_samples} tail samples are unused (--no-tail-samples)"
    buckets = f"top-{top_k} + rest bucket" + (" + target bucket" if config.target_bucket else "")
    return buckets + why
