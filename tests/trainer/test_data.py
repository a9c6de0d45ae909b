"""trainer/data.py, batch.py, loader.py: the pure order, the token budget, the held-out rule, block reads, collate
(padded and packed), the batcher (a thread or worker processes) and its cursor."""

import itertools

import numpy as np
import pytest
import torch

from shared.reader import CacheReader
from trainer.batch import collate, next_fit_rows
from trainer.data import (
    cache_index,
    cache_source,
    epoch_order,
    heldout_hash,
    heldout_mask,
    heldout_sequences,
    pack_batches,
    sequence_source,
)
from trainer.loader import Batcher, group_batches, pack_rows


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
    assert b.target_ids.tolist() == [[6, 7, -100], [2, -100, -100]]
    assert b.loss_mask.tolist() == [[True, True, False], [True, False, False]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.num_tokens == 5 and b.num_loss_tokens == 3 and b.sequence_lengths == (3, 2)
    assert b.teacher is None and b.position_ids is None
    assert set(b.model_inputs()) == {"input_ids", "attention_mask"}  # padding: the mask is passed
    full = collate(seqs[:1], has_teacher=False)
    assert set(full.model_inputs()) == {"input_ids"}  # no padding: no mask, attention's causal fast path


def test_collate_target_logprob_rows_follow_the_targets():
    def seq(ids, target_lp):
        n = len(ids)
        return {"input_ids": np.array(ids), "loss_mask": np.r_[np.ones(n - 1, bool), [False]],
                "topk_ids": np.zeros((n, 2), np.uint16), "topk_logprobs": np.full((n, 2), -1.0, np.float16),
                "tail_logprob": np.full(n, -2.0, np.float16), "target_logprob": np.array(target_lp, np.float16)}

    b = collate([seq([5, 6, 7], [-0.5, -1.5, 1.0]), seq([1, 2], [-3.0, 1.0])], has_teacher=True)
    # row t holds the teacher's log-prob of target t (token t + 1); +1.0 = unknown on last rows and padding
    assert b.teacher.target_logprob.tolist() == [[-0.5, -1.5, 1.0], [-3.0, 1.0, 1.0]]
    assert b.target_ids.tolist() == [[6, 7, -100], [2, -100, -100]]
    no_target = collate([{k: v for k, v in seq([5, 6, 7], [-0.5, -1.5, 1.0]).items() if k != "target_logprob"}], True)
    assert no_target.teacher.target_logprob.tolist() == [[1.0, 1.0, 1.0]]  # unknown: K + 1 buckets
    # the host keeps the stored dtypes (what crosses to a GPU); .to() widens them as the loss reads them
    assert b.teacher.topk_ids.dtype == torch.int32 and b.teacher.topk_logprobs.dtype == torch.float16
    wide = b.to("cpu").teacher
    assert wide.topk_ids.dtype == torch.int64 and wide.topk_logprobs.dtype == wide.tail_logprob.dtype == torch.float32
    assert wide.tail_logprob.tolist() == [[-2.0, -2.0, -2.0], [-2.0, -2.0, -np.inf]]  # padding: no tail mass


def test_collate_and_cache_source_carry_tail_samples(tail_cache):
    reader = CacheReader(tail_cache)
    index = cache_index(reader)
    src = cache_source(reader, index, [0, 1, 2], has_teacher=True, tail_samples=True)
    seqs = src.read([0, 1, 2])
    assert {"tail_ids", "tail_counts"} <= set(seqs[0])
    b = collate(seqs, has_teacher=True).to("cpu").teacher
    width = max(len(s["input_ids"]) for s in seqs)
    assert b.tail_ids.shape == (3, width, 8) and b.tail_counts.dtype == torch.float32
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        assert b.tail_ids[r, :n].tolist() == s["tail_ids"].astype(np.int64).tolist()
        assert (b.tail_counts[r, :n].sum(-1) == 8).all() and (b.tail_counts[r, n:] == 0).all()
    plain = cache_source(reader, index, [0], has_teacher=True).read([0])[0]
    assert "tail_ids" not in plain and collate([plain], True).teacher.tail_ids is None


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
    assert all(b.input_ids.numel() <= 64 for b in reference)
    assert reference[-1].cursor["epoch"] >= 1
    part = Batcher(src, batch_tokens=64, seed=0)
    for _ in range(25):
        next(part)
    cursor = part.cursor
    part.close()
    resumed = Batcher(src, batch_tokens=64, seed=0, cursor=cursor)
    for ref in reference[25:]:
        got = next(resumed)
        assert got.input_ids.equal(ref.input_ids) and got.cursor == ref.cursor
    resumed.close()


# ---------------------------------------------------------------------------------------------
# Packed rows, batch plans, worker processes


def test_next_fit_rows_and_pack_rows_keep_order_and_budget():
    lengths = np.array([5, 3, 4, 8, 2, 2, 9, 1])
    assert next_fit_rows(lengths, 8) == [[0, 1], [2], [3], [4, 5], [6], [7]]  # 9 > 8: a row of its own
    spans = pack_rows(lengths, batch_tokens=16, row_tokens=8)  # 2 rows per batch
    assert spans == [(0, 3), (3, 6), (6, 8)]
    for a, b in spans:
        assert len(next_fit_rows(lengths[a:b], 8)) <= 2
    assert pack_rows(lengths, batch_tokens=4, row_tokens=8) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8)]


def test_collate_packed_rows_restart_positions_and_never_target_across_sequences():
    seqs = [{"input_ids": np.array([5, 6, 7]), "loss_mask": np.array([True, True, True])},
            {"input_ids": np.array([1, 2]), "loss_mask": np.array([True, True])},
            {"input_ids": np.array([3, 4, 8, 9]), "loss_mask": np.array([False, True, True, True])}]
    b = collate(seqs, has_teacher=False, row_tokens=6)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [3, 4, 8, 9, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]  # padding counts as one more
    assert b.target_ids.tolist() == [[6, 7, -100, 2, -100, -100], [4, 8, 9, -100, -100, -100]]
    assert b.loss_mask.tolist() == [[True, True, False, True, False, False], [False, True, True, False, False, False]]
    assert b.attention_mask is None and set(b.model_inputs()) == {"input_ids", "position_ids"}
    assert b.num_tokens == 9 and b.sequence_lengths == (3, 2, 4)
    one_each = collate(seqs[:1], has_teacher=False, row_tokens=6)  # a row of one sequence needs no position_ids
    assert one_each.position_ids is None and one_each.input_ids.shape == (1, 6)  # packed batches keep their width


def test_packed_batch_gives_each_sequence_its_own_logits(tiny_gpt2_dir):
    """The packed layout through a real student: the loss rows' logits equal those of each sequence alone."""
    from trainer.student import load_student, packs_sequences

    model = load_student(str(tiny_gpt2_dir)).eval()
    assert packs_sequences(model)
    rng = np.random.default_rng(3)
    seqs = [{"input_ids": rng.integers(0, 300, n), "loss_mask": np.ones(n, bool)} for n in (7, 4, 9, 5)]
    packed = collate(seqs, has_teacher=False, row_tokens=12)
    padded = collate(seqs, has_teacher=False)
    with torch.no_grad():
        a = model(**packed.model_inputs(), use_cache=False).logits[packed.loss_mask]
        b = model(**padded.model_inputs(), use_cache=False).logits[padded.loss_mask]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert packed.target_ids[packed.loss_mask].tolist() == padded.target_ids[padded.loss_mask].tolist()


def test_group_batches_reach_the_token_goal():
    lengths = np.full(10, 4)
    spans = [(i, i + 1) for i in range(10)]
    assert group_batches(spans, lengths, 10) == [spans[0:3], spans[3:6], spans[6:9], spans[9:10]]
    assert group_batches(spans, lengths, 0) == [[s] for s in spans]


def test_cache_rows_reopen_the_cache_after_pickling(tiny_cache):
    from multiprocessing.reduction import ForkingPickler  # what multiprocessing sends a spawned worker

    reader = CacheReader(tiny_cache)
    index = cache_index(reader)
    src = cache_source(reader, index, list(range(len(index))), has_teacher=True)
    clone = ForkingPickler.loads(ForkingPickler.dumps(src.read))  # a spawned worker's copy: no reader, opened on use
    for a, b in zip(src.read([3, 0, 5]), clone([3, 0, 5])):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("row_tokens", [None, 96])
def test_batcher_workers_give_the_threads_batches_and_resume(tiny_cache, row_tokens):
    """Two worker processes hand out exactly the batches of the one-thread batcher, in order, across an epoch
    boundary, and resume from a cursor the same way."""
    reader = CacheReader(tiny_cache)
    index = cache_index(reader)
    src = cache_source(reader, index, list(range(len(index))), has_teacher=True, window_blocks=2)

    def take(num_workers, count, cursor=None):
        batcher = Batcher(src, batch_tokens=256, seed=1, cursor=cursor, row_tokens=row_tokens,
                          num_workers=num_workers, group_tokens=300, device="cpu")
        try:
            return [next(batcher) for _ in range(count)], batcher.cursor
        finally:
            batcher.close()

    thread, _ = take(0, 80)
    assert thread[-1].cursor["epoch"] >= 1
    workers, _ = take(2, 80)
    for a, b in zip(thread, workers):
        assert a.cursor == b.cursor and a.ids == b.ids
        assert a.input_ids.equal(b.input_ids) and a.loss_mask.equal(b.loss_mask)
        assert a.teacher.topk_logprobs.equal(b.teacher.topk_logprobs) and b.teacher.topk_ids.dtype == torch.int64
    _, cursor = take(2, 13)
    resumed, _ = take(2, 5, cursor)
    assert [b.ids for b in resumed] == [b.ids for b in thread[13:18]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_read_error_in_the_batcher_reaches_the_training_process(tiny_cache, monkeypatch, num_workers):
    """A damaged block found by a reader (thread or worker process) is raised by next(batcher) as the same error."""
    from shared.format import CacheCorruptError
    from trainer.data import CacheRows

    reader = CacheReader(tiny_cache)
    src = cache_source(reader, cache_index(reader), [0, 1, 2, 3], has_teacher=True)

    def damaged(self, which):
        raise CacheCorruptError("shard-00000: array topk_ids: cannot decode its chunks", [("shard-00000", "x", "decode")])

    monkeypatch.setattr(CacheRows, "__call__", damaged)  # forked workers inherit it
    batcher = Batcher(src, batch_tokens=128, seed=0, num_workers=num_workers)
    with pytest.raises(CacheCorruptError, match="shard-00000: array topk_ids: cannot decode") as info:
        next(batcher)
    batcher.close()
    assert info.value.problems == [("shard-00000", "x", "decode")]
