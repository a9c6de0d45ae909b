"""trainer/mixed.py: batches drawn from two sources at a stated share, deterministic and resumable."""

import numpy as np
import pytest

from trainer.data import Source
from trainer.loader import Batcher
from trainer.mixed import MixedBatcher, mix_draw


def source(tag: int, num: int) -> Source:
    """num sequences of 4 tokens whose ids say which source and item they are (tag * 1000 + item)."""
    def read(which):
        return [{"input_ids": np.full(4, tag * 1000 + w, dtype=np.int64), "loss_mask": np.ones(4, dtype=bool)}
                for w in which]
    return Source(list(range(num)), np.full(num, 4, dtype=np.int64), np.arange(num), read, False)


def make(src, cursor):
    return Batcher(src, batch_tokens=8, seed=3, cursor=cursor)  # 2 sequences per batch


def tags(batch) -> list[int]:
    return sorted({int(t) // 1000 for t in batch.input_ids[:, 0]})


def test_each_batch_comes_from_one_source_at_the_stated_share():
    mixed = MixedBatcher(make, source(1, 10), source(2, 6), 0.3, seed=0)
    try:
        drawn = [tags(next(mixed)) for _ in range(400)]
    finally:
        mixed.close()
    assert all(len(t) == 1 for t in drawn)
    share = sum(t == [2] for t in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.07  # 400 draws: standard deviation 0.023
    assert [t == [2] for t in drawn] == [mix_draw(0, i) < 0.3 for i in range(400)]


def test_the_sources_sequence_is_a_pure_function_of_seed_and_batch_number():
    assert [mix_draw(5, i) for i in range(20)] == [mix_draw(5, i) for i in range(20)]
    assert [mix_draw(5, i) for i in range(20)] != [mix_draw(6, i) for i in range(20)]
    assert all(0 <= mix_draw(0, i) < 1 for i in range(100))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_zero_and_one_use_one_source_only(share):
    mixed = MixedBatcher(make, source(1, 4), source(2, 4), share, seed=0)
    try:
        assert {tuple(tags(next(mixed))) for _ in range(30)} == {(2,) if share else (1,)}
    finally:
        mixed.close()


def test_a_resumed_batcher_continues_with_the_same_batches():
    def ids(batch):
        return batch.input_ids[:, 0].tolist()

    whole = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1)
    try:
        expected = [ids(next(whole)) for _ in range(40)]
    finally:
        whole.close()
    first = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1)
    try:
        got = [ids(next(first)) for _ in range(13)]
        cursor = first.cursor
    finally:
        first.close()
    assert cursor["draws"] == 13 and 0 < cursor["from_mix"] < 13 and cursor["epoch"] == cursor["main"]["epoch"]
    second = MixedBatcher(make, source(1, 7), source(2, 5), 0.5, seed=1, cursor=cursor)
    try:
        got += [ids(next(second)) for _ in range(27)]
    finally:
        second.close()
    assert got == expected


def test_a_share_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        MixedBatcher(make, source(1, 2), source(2, 2), 1.5, seed=0)
