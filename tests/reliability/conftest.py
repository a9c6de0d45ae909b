"""Fixtures of the reliability tests: a local S3 (moto, loopback only), and one clean `kdcache build` to compare with."""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from tests.reliability.common import REPO, command, write_speeches

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="pip install 'kdcache[s3]' (moto[server], s3fs)")
    pytest.importorskip("s3fs", reason="pip install 'kdcache[s3]' (moto[server], s3fs)")
    from tests.reliability.s3server import S3Server

    server = S3Server()
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the local S3, and this process's environment pointed at it; yields its s3:// root."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.fail = None
    yield s3_server.make_bucket(f"kdcache-test-{os.getpid()}-{next(_buckets)}")
    s3_server.fail = None


@pytest.fixture(scope="session")
def build_command(tmp_path_factory, tiny_gpt2_dir) -> list[str]:
    """`kdcache build` of the tiny GPT-2 over 60 Shakespeare speeches: about 25 shards of <= 64 tokens (no --out)."""
    speeches = write_speeches(tmp_path_factory.mktemp("speeches") / "speeches.jsonl", num_rows=60)
    return command("kdcache", "build", "--model", tiny_gpt2_dir, "--dataset", speeches, "--max-length", 32,
                   "--top-k", 8, "--limit", 60, "--shard-tokens", 64, "--engine", "hf", "--no-reuse")


@pytest.fixture(scope="session")
def clean_build(tmp_path_factory, build_command):
    """The uninterrupted build of `build_command`, by one process."""
    out = tmp_path_factory.mktemp("clean-build") / "cache"
    subprocess.run([*build_command, "--out", str(out)], check=True, capture_output=True, cwd=REPO, timeout=300)
    return out
