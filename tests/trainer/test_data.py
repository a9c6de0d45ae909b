import numpy as np
import pytest

from trainer.data import Batcher, epoch_order, heldout_hash, heldout_mask, pack_batches, sequence_source


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_epoch_order_disjoint_and_complete(world):
    blocks = np.repeat(np.arange(20), 5)  # 100 items in blocks of 5
    parts = [epoch_order(100, seed=1, epoch=0, rank=r, world_size=world, blocks=blocks) for r in range(world)]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(100))
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(parts[a]) & set(parts[b])


def test_epoch_order_is_pure_and_changes_with_epoch_and_seed():
    a = epoch_order(50, 3, 0)
    assert np.array_equal(a, epoch_order(50, 3, 0))
    assert not np.array_equal(a, epoch_order(50, 3, 1))
    assert not np.array_equal(a, epoch_order(50, 4, 0))
    with pytest.raises(ValueError):
        epoch_order(10, 0, 0, rank=2, world_size=2)


def test_blocks_stay_together():
    blocks = np.repeat(np.arange(10), 4)
    order = epoch_order(40, 0, 0, blocks=blocks)
    # consecutive groups of 4 come from one block
    assert all(len(set(blocks[order[i:i + 4]])) == 1 for i in range(0, 40, 4))


def test_pack_batches_respects_budget_and_order():
    lengths = np.array([10, 30, 5, 64, 8, 8, 8, 100])
    spans = pack_batches(lengths, 64)
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for start, stop in spans:
        width = lengths[start:stop].max()
        assert width * (stop - start) <= 64 or stop - start == 1


def test_heldout_rule_is_stable_and_never_everything():
    hashes = np.array([heldout_hash(f"{i:064x}", 0) for i in range(1000)])
    mask = heldout_mask(hashes, 0.05)
    assert 20 < mask.sum() < 80
    assert np.array_equal(mask, heldout_mask(hashes, 0.05))
    assert heldout_mask(hashes[:2], 0.0).sum() == 0
    assert heldout_mask(hashes[:3], 0.01).sum() >= 1  # at least one held out
    assert heldout_mask(hashes[:3], 0.99).sum() < 3


def test_batcher_resumes_exactly_from_a_cursor():
    from shared.data import Sequence

    rng = np.random.default_rng(0)
    seqs = [Sequence(rng.integers(0, 50, n), np.ones(n, bool), i) for i, n in enumerate(rng.integers(3, 30, 60))]
    src = sequence_source(seqs, list(range(60)))
    full = Batcher(src, batch_tokens=64, seed=0)
    reference = [next(full) for _ in range(12)]
    full.close()
    part = Batcher(src, batch_tokens=64, seed=0)
    for _ in range(5):
        next(part)
    cursor = part.cursor
    part.close()
    resumed = Batcher(src, batch_tokens=64, seed=0, cursor=cursor)
    for ref in reference[5:]:
        got = next(resumed)
        assert got["input_ids"].equal(ref["input_ids"]) and got["cursor"] == ref["cursor"]
    resumed.close()
