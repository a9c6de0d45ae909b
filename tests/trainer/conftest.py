"""Teacher caches for trainer tests, written once per session without the cacher (teacher_cache.py).

- `tiny_cache`: the random tiny GPT-2 (`tiny_gpt2_dir`) as teacher, 120 windows of 64 tokens, top-16,
  shards of ~2000 tokens in chunks of 512 rows.
- `trained_teacher_dir` / `trained_cache`: a GPT-2 of another seed trained 40 steps on Shakespeare,
  so a student has something better than noise to learn from.
"""

import pytest

from tests.trainer.teacher_cache import train_tiny_teacher, write_teacher_cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_gpt2_dir):
    return write_teacher_cache(str(tmp_path_factory.mktemp("cache") / "tiny"), tiny_gpt2_dir)


@pytest.fixture(scope="session")
def trained_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    return train_tiny_teacher(tmp_path_factory.mktemp("trained-teacher"), tiny_tokenizer_dir, seed=1, steps=40)


@pytest.fixture(scope="session")
def trained_cache(tmp_path_factory, trained_teacher_dir):
    return write_teacher_cache(str(tmp_path_factory.mktemp("cache") / "trained"), trained_teacher_dir)


@pytest.fixture(scope="session")
def tail_cache(tmp_path_factory, trained_teacher_dir):
    """trained_cache's teacher with top-8 and 8 tail samples per row (kdcache build --top-k 8 --tail-samples 8)."""
    return write_teacher_cache(str(tmp_path_factory.mktemp("cache") / "tail"), trained_teacher_dir, num_sequences=60,
                               top_k=8, tail_samples=8)
