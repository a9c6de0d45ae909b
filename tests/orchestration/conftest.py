"""Teacher caches for plan tests, written without the cacher (tests/trainer/teacher_cache.py)."""

import pytest

from tests.trainer.teacher_cache import write_teacher_cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_gpt2_dir):
    """The random tiny GPT-2 (`tiny_gpt2_dir`) as teacher: 120 windows of 64 tokens, top-16."""
    return write_teacher_cache(str(tmp_path_factory.mktemp("cache") / "tiny"), tiny_gpt2_dir)
