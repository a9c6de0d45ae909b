"""Running a build's engine over its pending shards: groups of sequences in, committed shards out.

Each pending shard is one group for the engine (cacher/engine.py): in generate mode the engine first
writes the responses (kept per --filter), then scores prompt + response. Groups are made lazily, so the hf
engine generates and scores shard by shard, while vLLM takes them all at once. Scored rows go straight into
the shard pipeline (cacher/pipeline.py), which compresses and commits them while the teacher runs.

Knows the Engine protocol, the build's settings and the sequences; the cache files are shared/'s business.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from cacher.engine import Engine, GenerateGroup, ScoreGroup
from cacher.errors import BuildError
from cacher.pipeline import EncodePool, ShardPipeline
from common.gsm8k import extract_gsm8k_answer
from common.sequences import Sequence
from shared.format import tail_samples_of
from shared.writer import CacheWriter


def run_shards(config, writer: CacheWriter, engine: Engine, pool: EncodePool, tokenizer, sequences: list[Sequence],
               plan: list[list[int]], pending: list[int], progress, log=print) -> int:
    """Score every pending shard and commit it as its rows come in; returns the number of shards written.

    config: the build's BuildConfig. progress(total sequences, total tokens) -> tick(sequences, tokens), or None.
    log(message): how fast the teacher went, and how long the last commit took after its last row.
    """
    samples = config.num_samples if config.mode == "generate" else 1
    total_seqs = samples * sum(len(plan[s]) for s in pending)
    total_tokens = sum(len(sequences[i].input_ids) for s in pending for i in plan[s])
    if config.mode == "generate":
        total_tokens += total_seqs * config.max_new_tokens  # at most; responses stop at EOS
    show = progress(total_seqs, total_tokens) if progress else (lambda n, t: None)
    scored = [0]

    def tick(num_sequences: int, num_tokens: int) -> None:
        scored[0] += num_tokens
        show(num_sequences, num_tokens)

    shards: list[tuple[int, list[tuple[Sequence, int]]]] = []  # (shard index, (sequence, sample index)) per group
    header = writer.header
    with ShardPipeline(writer, pool, vocab_size=header.tokenizer["vocab_size"], top_k=header.settings["top_k"],
                       tail_samples=tail_samples_of(header.settings), chunk_rows=config.chunk_rows) as pipeline:
        group, started = -1, time.time()
        for rows in engine.score(_score_groups(config, engine, tokenizer, sequences, plan, pending, shards), tick):
            if rows.group != group:
                group = rows.group
                pipeline.start_shard(*shards[group])
            pipeline.add(rows.position, rows.rows)
        scoring = time.time() - started
    log(f"teacher: {scored[0]:,} tokens in {scoring:.1f} s ({scored[0] / max(scoring, 1e-9):,.0f} tokens/s); the last "
        f"commit {time.time() - started - scoring:.1f} s after the last row")
    return pipeline.num_committed


def _score_groups(config, engine: Engine, tokenizer, sequences: list[Sequence], plan: list[list[int]],
                  pending: list[int], shards: list) -> Iterator[ScoreGroup]:
    """One group per pending shard, made when the engine asks for it; appends (shard, pairs) to `shards`.

    Tail draws are seeded per (sequence, sample) of the whole data set, generated samples per prompt index:
    neither depends on the shard plan, the workers or what is already committed.
    """
    if config.mode == "generate":
        prompts = (GenerateGroup([sequences[i].input_ids for i in plan[s]], plan[s], f"shard {s}") for s in pending)
        for s, responses in zip(pending, engine.generate(prompts)):
            pairs = _kept_samples(config, tokenizer, s, [sequences[i] for i in plan[s]], responses)
            shards.append((s, pairs))
            yield ScoreGroup([q.input_ids for q, _ in pairs], [(q.source_index, k) for q, k in pairs], f"shard {s}")
        return
    for s in pending:
        shards.append((s, [(sequences[i], 0) for i in plan[s]]))
        yield ScoreGroup([sequences[i].input_ids for i in plan[s]], [(i, 0) for i in plan[s]], f"shard {s}")


def _kept_samples(config, tokenizer, shard_index: int, prompts: list[Sequence],
                  responses: list[list[np.ndarray]]) -> list[tuple[Sequence, int]]:
    """(prompt + response as a Sequence, sample index) for every response that --filter keeps.

    loss_mask is true exactly on the rows whose next token is a response token. A shard holds at
    least one sequence (storage_layout.md 6.3), so a shard whose samples all fail --filter stops the build.
    """
    kept = []
    for prompt, samples in zip(prompts, responses):
        for k, response in enumerate(samples):
            response = np.asarray(response, dtype=np.int64)[: config.max_length - len(prompt.input_ids)]
            if len(response) == 0:
                continue
            if config.filter == "gsm8k-answer":
                text = tokenizer.decode(response, skip_special_tokens=True)
                want = extract_gsm8k_answer(prompt.reference or "")
                if want is None or extract_gsm8k_answer(text) != want:
                    continue
            ids = np.concatenate([prompt.input_ids, response]).astype(np.int64)
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(prompt.input_ids) - 1 : len(ids) - 1] = True
            kept.append((Sequence(ids, mask, source_index=prompt.source_index, prompt_length=len(prompt.input_ids),
                                  text_sha256=prompt.text_sha256, reference=prompt.reference), k))
    if not kept:
        why = (f"none of the {len(prompts) * config.num_samples} samples of its {len(prompts)} prompts passed "
               f"{{filter}} {config.filter}" if config.filter else f"its {len(prompts)} prompts got only empty "
                                                                   "responses")
        raise BuildError(
            f"shard {shard_index}: {why}, and a shard holds at least one sequence. Use more {{num_samples}}, a larger "
            "{shard_tokens} (more prompts per shard) or no {filter} (with {overwrite}, since the settings change)"
        )
    return kept

