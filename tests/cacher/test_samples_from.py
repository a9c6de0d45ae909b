"""`kdcache build --samples-from`: who wrote a data set's responses, in the cache's header and cache_key."""

import json

import pytest
from typer.testing import CliRunner

from cacher.build import BuildConfig, BuildError, build
from cli.kdcache import app
from shared.reader import CacheReader

QUIET = {"log": lambda m: None}


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"prompt": f"Say {w}.", "response": f"{w} {w} {w}"} for w in ("yes", "no", "maybe", "never")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(model, data, out, **extra):
    return BuildConfig(model=str(model), dataset=str(data), prompt_field="prompt", response_field="response",
                       prompt_template="plain", max_length=96, top_k=4, engine="hf", out=str(out), reuse=False, **extra)


def test_samples_from_is_recorded_and_counts_in_the_cache_key(tiny_gpt2_dir, samples, tmp_path):
    a = build(settings(tiny_gpt2_dir, samples, tmp_path / "a", samples_from="student s, round 2"), **QUIET)
    b = build(settings(tiny_gpt2_dir, samples, tmp_path / "b"), **QUIET)
    c = build(settings(tiny_gpt2_dir, samples, tmp_path / "c", samples_from="student s, round 3"), **QUIET)
    assert CacheReader(a.url).manifest.dataset["samples_from"] == "student s, round 2"
    assert "samples_from" not in CacheReader(b.url).manifest.dataset
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 3  # the same tokens, three keys
    shown = CliRunner().invoke(app, ["info", a.url], terminal_width=200).output
    assert "responses written by" in shown and "student s, round 2" in shown
    assert "responses written by" not in CliRunner().invoke(app, ["info", b.url], terminal_width=200).output


def test_a_samples_from_longer_than_its_limit_is_refused(tiny_gpt2_dir, samples, tmp_path):
    with pytest.raises(BuildError, match="samples.from"):
        settings(tiny_gpt2_dir, samples, tmp_path / "x", samples_from="x" * 1001)
