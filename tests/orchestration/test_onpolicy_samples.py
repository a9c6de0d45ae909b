"""An on-policy round's data path: kdtrain generate's samples, scored by kdcache build exactly as sampled."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cacher.build import BuildConfig, build
from cli.kdtrain import app
from common.datasets import DataError
from shared.reader import CacheReader
from tests.conftest import GSM8K

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_gpt2_dir):
    """A random tiny GPT-2's answers to 16 GSM8K questions (plain template), 2 per question."""
    out = tmp_path_factory.mktemp("samples") / "s.jsonl"
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_gpt2_dir), "--dataset", str(GSM8K),
                                   "--prompt-field", "question", "--response-field", "answer", "--prompt-template",
                                   "plain", "--limit", "16", "--max-length", "400", "--max-new-tokens", "24",
                                   "--num-samples", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def score(model, data, out, **extra):
    return build(BuildConfig(model=str(model), dataset=str(data), prompt_field="prompt", response_field="response",
                             prompt_template="plain", max_length=400, top_k=4, engine="hf", out=str(out), **extra),
                 **QUIET)


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def cache_rows(url):
    reader = CacheReader(url)
    return [reader.shard(s).read_sequence(i) for s in range(reader.num_shards)
            for i in range(reader.shard(s).num_sequences)]


def test_the_teacher_scores_exactly_the_sampled_tokens(samples, tiny_gpt2_dir, tmp_path):
    rows = rows_of(samples)
    exact = score(tiny_gpt2_dir, samples, tmp_path / "ids", ids_field="token_ids", samples_from="s round 1")
    for row, seq in zip(rows, cache_rows(exact.url)):
        assert seq["input_ids"].tolist() == row["token_ids"]
        prompt = len(row["token_ids"]) - len(row["response_ids"])
        assert np.flatnonzero(seq["loss_mask"]).tolist() == list(range(prompt - 1, len(row["token_ids"]) - 1))
    text_only = cache_rows(score(tiny_gpt2_dir, samples, tmp_path / "text").url)
    differs = [r["token_ids"] != s["input_ids"][:len(r["token_ids"])].tolist() for r, s in zip(rows, text_only)]
    assert any(differs) and [not d for d in differs] == [r["exact"] for r in rows]  # `exact` says which


def test_ids_that_do_not_start_with_the_prompt_or_are_no_token_ids_are_refused(samples, tiny_gpt2_dir, tmp_path):
    rows = rows_of(samples)[:3]
    for case, change in (("prompt", lambda ids: [ids[0] + 1, *ids[1:]]), ("range", lambda ids: [*ids, 10**6])):
        bad = tmp_path / f"{case}.jsonl"
        rows[1] = {**rows[1], "token_ids": change(rows[1]["token_ids"])}
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        message = "does not start with the row's prompt" if case == "prompt" else "not a token id of this tokenizer"
        with pytest.raises(DataError, match=f"row 1 of .*{message}"):
            score(tiny_gpt2_dir, bad, tmp_path / case, ids_field="token_ids")
