"""Random but valid cache contents for format tests (no model involved)."""

from __future__ import annotations

import numpy as np

from shared.writer import BuildHeader

VOCAB = 1000
TOP_K = 8


def header(num_shards: int = 3, *, top_k: int = TOP_K, vocab_size: int = VOCAB, **settings) -> BuildHeader:
    return BuildHeader(
        teacher={"name": "fake-teacher", "dtype": "float32", "engine": "fake", "engine_version": "0"},
        tokenizer={"name": "fake-tok", "vocab_size": vocab_size, "vocab_sha256": "ab" * 32},
        dataset={"name": "fake-data", "fingerprint": "f" * 64, "num_sequences": 3 * num_shards},
        settings={"mode": "score", "top_k": top_k, "max_length": 64, **settings},
        num_shards=num_shards,
    )


def random_sequence(rng: np.random.Generator, length: int, *, top_k: int = TOP_K, vocab_size: int = VOCAB) -> dict:
    """One sequence: a random teacher distribution per row, its top-k, the tail, a real next token."""
    logits = rng.normal(scale=3.0, size=(length, vocab_size))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[:, :top_k]
    topk = np.take_along_axis(logp, order, -1)
    input_ids = rng.integers(0, vocab_size, length)
    target = np.empty(length)
    target[:-1] = logp[np.arange(length - 1), input_ids[1:]]
    target[-1] = np.nan
    tail = np.log1p(-np.exp(topk).sum(-1))
    mask = np.ones(length, dtype=bool)
    mask[-1] = False
    return {"input_ids": input_ids, "loss_mask": mask, "topk_ids": order, "topk_logprobs": topk,
                "target_logprob": target, "tail_logprob": tail}


def reseal(manifest: dict, *, rekey: bool = True) -> dict:
    """A hand-edited manifest made consistent again, as anyone who can write to a share can do: its cache_key
    recomputed from its header (rekey) and its manifest_sha256 from its content."""
    from shared.identity import compute_cache_key, seal

    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if rekey:
        try:
            manifest["cache_key"] = compute_cache_key(*(manifest[s] for s in ("teacher", "tokenizer", "dataset", "settings")))
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a header too broken to key: left as edited (the parser refuses it for that)
    try:
        return seal(manifest, "manifest_sha256")
    except (TypeError, ValueError):  # NaN and the like: canonical JSON refuses them, so nothing can seal it
        return manifest


def reseal_commit(commit: dict) -> dict:
    """A hand-edited commit.json with its commit_sha256 recomputed."""
    from shared.identity import seal

    return seal({k: v for k, v in commit.items() if k != "commit_sha256"}, "commit_sha256")


def write_cache(url: str, *, num_shards: int = 3, seqs_per_shard: int = 3, seed: int = 0, **kw):
    """Write a complete random cache; returns {(shard, seq): arrays as given}."""
    from shared.writer import CacheWriter

    rng = np.random.default_rng(seed)
    written = {}
    with CacheWriter(url, header(num_shards), **kw) as w:
        for s in w.pending_shards():
            with w.shard(s) as buf:
                for i in range(seqs_per_shard):
                    seq = random_sequence(rng, int(rng.integers(5, 40)))
                    buf.add_sequence(**seq, source_index=s * seqs_per_shard + i, text_sha256=f"{s}-{i}")
                    written[(s, i)] = seq
        w.finalize()
    return written
