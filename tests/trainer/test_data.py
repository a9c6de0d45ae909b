"""trainer/data.py: the pure order, the token budget, the held-out rule, block reads, the batcher."""

import itertools

import numpy as np
import pytest
import torch

from shared.reader import CacheReader
from trainer.data import (
    Batcher,
    cache_index,
    cache_source,
    collate,
    epoch_order,
    heldout_hash,
    heldout_mask,
    heldout_sequences,
    pack_batches,
    sequence_source,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("window_blocks", [1, 3])
def test_epoch_order_disjoint_and_complete_across_ranks(world, window_blocks):
    blocks = np.repeat(np.arange(20), 5)  # 100 items in blocks of 5
    for epoch in range(3):
        parts = [epoch_order(100, 1, epoch, r, world, blocks=blocks, window_blocks=window_blocks) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(100))
        for a, b in itertools.combinations(parts, 2):
            assert not set(a.tolist()) & set(b.tolist())
        # ranks own whole blocks
        for a, b in itertools.combinations(parts, 2):
            assert not set(blocks[a].tolist()) & set(blocks[b].tolist())


def test_epoch_order_is_pure_and_changes_with_epoch_and_seed():
    blocks = np.repeat(np.arange(10), 5)
    a = epoch_order(50, 3, 0, blocks=blocks, window_blocks=2)
    assert np.array_equal(a, epoch_order(50, 3, 0, blocks=blocks, window_blocks=2))
    assert not np.array_equal(a, epoch_order(50, 3, 1, blocks=blocks, window_blocks=2))
    assert not np.array_equal(a, epoch_order(50, 4, 0, blocks=blocks, window_blocks=2))
    with pytest.raises(ValueError):
        epoch_order(10, 0, 0, rank=2, world_size=2)


def test_order_visits_blocks_window_by_window():
    blocks = np.repeat(np.arange(12), 4)  # 48 items, 12 blocks of 4
    order = epoch_order(48, 0, 0, blocks=blocks, window_blocks=3)
    windows = [set(blocks[order[i:i + 12]].tolist()) for i in range(0, 48, 12)]
    assert all(len(w) == 3 for w in windows)  # each run of 12 items comes from exactly 3 blocks
    assert set().union(*windows) == set(range(12))
    # within a window the sequences of its blocks are interleaved, not block after block
    assert len(set(blocks[order[:4]].tolist())) > 1


def test_pack_batches_respects_budget_and_order():
    lengths = np.array([10, 30, 5, 64, 8, 8, 8, 100, 3])
    spans = pack_batches(lengths, 64)
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for start, stop in spans:
        assert lengths[start:stop].max() * (stop - start) <= 64 or stop - start == 1


def test_collate_targets_and_masks():
    seqs = [{"input_ids": np.array([5, 6, 7]), "loss_mask": np.array([True, True, False])},
            {"input_ids": np.array([1, 2]), "loss_mask": np.array([True, False])}]
    b = collate(seqs, has_teacher=False)
    assert b["target_ids"].tolist() == [[6, 7, -100], [2, -100, -100]]
    assert b["loss_mask"].tolist() == [[True, True, False], [True, False, False]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["num_tokens"] == 5 and b["num_loss_tokens"] == 3


def test_collate_target_logprob_rows_follow_the_targets():
    def seq(ids, target_lp):
        n = len(ids)
        return {"input_ids": np.array(ids), "loss_mask": np.r_[np.ones(n - 1, bool), [False]],
                "topk_ids": np.zeros((n, 2), np.uint16), "topk_logprobs": np.full((n, 2), -1.0, np.float16),
                "tail_logprob": np.full(n, -2.0, np.float16), "target_logprob": np.array(target_lp, np.float16)}

    b = collate([seq([5, 6, 7], [-0.5, -1.5, 1.0]), seq([1, 2], [-3.0, 1.0])], has_teacher=True)
    # row t holds the teacher's log-prob of target t (token t + 1); +1.0 = unknown on last rows and padding
    assert b["target_logprob"].tolist() == [[-0.5, -1.5, 1.0], [-3.0, 1.0, 1.0]]
    assert b["target_ids"].tolist() == [[6, 7, -100], [2, -100, -100]]
    no_target = collate([{k: v for k, v in seq([5, 6, 7], [-0.5, -1.5, 1.0]).items() if k != "target_logprob"}], True)
    assert no_target["target_logprob"].tolist() == [[1.0, 1.0, 1.0]]  # unknown: K + 1 buckets


def test_collate_and_cache_source_carry_tail_samples(tail_cache):
    reader = CacheReader(tail_cache)
    index = cache_index(reader)
    src = cache_source(reader, index, [0, 1, 2], has_teacher=True, tail_samples=True)
    seqs = src.read([0, 1, 2])
    assert {"tail_ids", "tail_counts"} <= set(seqs[0])
    b = collate(seqs, has_teacher=True)
    width = max(len(s["input_ids"]) for s in seqs)
    assert b["tail_ids"].shape == (3, width, 8) and b["tail_counts"].dtype == torch.float32
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        assert b["tail_ids"][r, :n].tolist() == s["tail_ids"].astype(np.int64).tolist()
        assert (b["tail_counts"][r, :n].sum(-1) == 8).all() and (b["tail_counts"][r, n:] == 0).all()
    plain = cache_source(reader, index, [0], has_teacher=True).read([0])[0]
    assert "tail_ids" not in plain and "tail_ids" not in collate([plain], True)


def test_heldout_rule_fraction_and_guards():
    hashes = np.array([heldout_hash(f"{i:064x}", 0) for i in range(2000)])
    mask = heldout_mask(hashes, 0.05)
    assert 60 < mask.sum() < 140
    assert np.array_equal(mask, heldout_mask(hashes, 0.05))
    assert heldout_mask(hashes[:2], 0.0).sum() == 0
    assert heldout_mask(hashes[:3], 0.0001).sum() >= 1  # at least one held out
    assert heldout_mask(hashes[:3], 0.9999).sum() < 3  # never everything
    # windows of one text are judged one by one
    assert heldout_hash("a" * 64, 0) != heldout_hash("a" * 64, 1)


def test_heldout_rule_is_the_same_for_caches_of_two_teachers(tiny_cache, trained_cache):
    a, b = CacheReader(tiny_cache), CacheReader(trained_cache)
    assert a.manifest.teacher["path"] != b.manifest.teacher["path"]
    held = heldout_sequences(a, 0.1)
    assert 0 < len(held) and held == heldout_sequences(b, 0.1)
    # and it follows the text, not the position: the same texts are held out
    texts = [a.meta(s).column("text_sha256")[i].as_py() for s, i in held]
    assert texts == [b.meta(s).column("text_sha256")[i].as_py() for s, i in held]


def test_cache_source_reads_the_stored_sequences_block_by_block(tiny_cache, monkeypatch):
    from shared.reader import ShardView

    reader = CacheReader(tiny_cache)
    index = cache_index(reader)
    assert len(index) == reader.manifest.totals["num_sequences"]
    assert len(np.unique(index.blocks)) > reader.num_shards  # chunks of 512 rows split shards into blocks
    src = cache_source(reader, index, list(range(len(index))), has_teacher=True, window_blocks=2)
    reads = []
    original = ShardView.read_rows

    def counting(view, start, stop, fields=None):
        reads.append((view.entry.name, start, stop))
        return original(view, start, stop, fields)

    monkeypatch.setattr(ShardView, "read_rows", counting)
    order = epoch_order(len(src), 0, 0, blocks=src.blocks, window_blocks=2)
    got = src.read(order.tolist())
    monkeypatch.undo()
    for pos, seq in zip(order, got):
        want = reader.shard(int(index.shard_of[pos])).read_sequence(int(index.index_of[pos]))
        for key in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
            assert np.array_equal(seq[key], want[key])
    assert len(reads) == len(np.unique(index.blocks))  # each block decoded once in an epoch


def test_batcher_respects_budget_and_resumes_exactly_from_a_cursor():
    from common.sequences import Sequence

    rng = np.random.default_rng(0)
    seqs = [Sequence(rng.integers(0, 50, n), np.ones(n, bool), i) for i, n in enumerate(rng.integers(3, 30, 60))]
    src = sequence_source(seqs, list(range(60)))
    full = Batcher(src, batch_tokens=64, seed=0)
    reference = [next(full) for _ in range(60)]  # crosses into epoch 1
    full.close()
    assert all(b["input_ids"].numel() <= 64 for b in reference)
    assert reference[-1]["cursor"]["epoch"] >= 1
    part = Batcher(src, batch_tokens=64, seed=0)
    for _ in range(25):
        next(part)
    cursor = part.cursor
    part.close()
    resumed = Batcher(src, batch_tokens=64, seed=0, cursor=cursor)
    for ref in reference[25:]:
        got = next(resumed)
        assert got["input_ids"].equal(ref["input_ids"]) and got["cursor"] == ref["cursor"]
    resumed.close()
