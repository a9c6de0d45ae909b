"""A real (tiny) teacher cache for trainer tests, built once per session with the cacher."""

import pytest

from tests.conftest import SHAKESPEARE


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_gpt2_dir):
    from cacher.build import BuildConfig, build

    out = tmp_path_factory.mktemp("cache") / "tiny"
    build(BuildConfig(model=str(tiny_gpt2_dir), dataset=str(SHAKESPEARE), max_length=64, limit=120, top_k=16,
                      shard_tokens=2000, chunk_rows=512, out=str(out), reuse=False), log=lambda m: None)
    return str(out)
