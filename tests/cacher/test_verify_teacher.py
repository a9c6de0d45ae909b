"""`kdcache verify --against-teacher` (cacher/verify_teacher.py; storage_layout.md 8.1).

A cache built by `kdcache build` passes: its rows are the teacher's within the documented tolerance. Two caches
that pass every other check fail it: one built by another model and relabelled as this teacher's (header, key
and seals rewritten), and one whose rows were altered consistently (the top two ids of every row swapped, the
targets rewritten to match: every rule of section 3.4 still holds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cacher.verify_teacher import choose_rows
from cli.kdcache import app
from shared.reader import CacheReader
from tests.conftest import build_tiny_model
from tests.reliability.common import write_speeches
from tests.shared.fakes import reseal, reseal_commit

runner = CliRunner()


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_gpt2_dir, tiny_tokenizer_dir):
    """The tiny GPT-2's cache, and the cache of another tiny GPT-2 (other weights) of the same data and settings."""
    root = tmp_path_factory.mktemp("teacher-check")
    data = write_speeches(root / "speeches.jsonl", num_rows=16)
    other = build_tiny_model(root / "other-teacher", "gpt2", tiny_tokenizer_dir, seed=11)
    caches = {}
    for name, model in (("mine", tiny_gpt2_dir), ("theirs", other)):
        res = runner.invoke(app, ["build", "--model", str(model), "--dataset", str(data), "--max-length", "32",
                                  "--top-k", "8", "--engine", "hf", "--no-reuse", "--out", str(root / name)])
        assert res.exit_code == 0, res.output
        caches[name] = root / name
    return caches, other


def verify(cache: Path, *args) -> tuple[int, str]:
    res = runner.invoke(app, ["verify", str(cache), *map(str, args)])
    return res.exit_code, one_line(res.output)


def test_a_cache_built_by_its_teacher_passes(built):
    caches, _ = built
    code, text = verify(caches["mine"], "--against-teacher", "--rows", 24, "--seed", 3)
    assert code == 0, text
    assert "OK: 24 row(s) (seed 3) recomputed with" in text and "agree with the teacher" in text


def rewrite_header(cache: Path, teacher: dict) -> None:
    """Give a cache another teacher section, with everything that depends on it recomputed: the cache_key, the seals,
    build.json and the commit files (what a writer to the share can do)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher"] = teacher
    manifest = reseal(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    build = json.loads((cache / "build.json").read_text())
    build.update(teacher=teacher, cache_key=manifest["cache_key"])
    (cache / "build.json").write_text(json.dumps(build))
    for commit_file in cache.glob("shards/*/commit.json"):
        commit = json.loads(commit_file.read_text())
        commit["cache_key"] = manifest["cache_key"]
        commit_file.write_text(json.dumps(reseal_commit(commit)))


def test_a_cache_of_another_model_relabelled_as_the_teachers_fails(built, tmp_path):
    caches, _ = built
    relabelled = tmp_path / "relabelled"
    shutil.copytree(caches["theirs"], relabelled)
    mine = CacheReader(str(caches["mine"])).manifest.teacher
    rewrite_header(relabelled, dict(mine))
    assert CacheReader(str(relabelled)).manifest.teacher == mine
    code, text = verify(relabelled)
    assert code == 0, text  # internally consistent: every other check passes
    code, text = verify(relabelled, "--against-teacher", "--rows", 16, "--seed", 1)
    assert code == 1, text
    assert "NOT THE TEACHER'S shard-0000" in text and "disagree with the teacher" in text and "(seed 1)" in text


def test_rows_altered_consistently_fail(built, tmp_path):
    """Every row's two most likely ids swapped, targets rewritten to agree, written by the format's own writer (so
    every size, sha256 and seal is right, and every rule of section 3.4 holds): the teacher disagrees."""
    from shared.writer import BuildHeader, CacheWriter

    caches, _ = built
    reader = CacheReader(str(caches["mine"]))
    header = BuildHeader.from_bytes((caches["mine"] / "build.json").read_bytes())
    altered = tmp_path / "altered"
    with CacheWriter(str(altered), header, chunk_rows=reader.manifest.settings["chunk_rows"]) as writer:
        for s in range(reader.num_shards):
            view, meta = reader.shard(s), reader.meta(s).to_pylist()
            with writer.shard(s) as buf:
                for i in range(view.num_sequences):
                    rows = view.read_sequence(i)
                    ids = rows["topk_ids"].copy()
                    ids[:, [0, 1]] = ids[:, [1, 0]]
                    target = rows["target_logprob"].astype(np.float32)
                    for t in range(len(target) - 1):
                        if rows["input_ids"][t + 1] in ids[t]:
                            target[t] = rows["topk_logprobs"][t][list(ids[t]).index(rows["input_ids"][t + 1])]
                    buf.add_sequence(**{**rows, "topk_ids": ids, "target_logprob": target},
                                     **{k: v for k, v in meta[i].items() if k != "sequence_index"})
        writer.finalize()
    code, text = verify(altered)
    assert code == 0, text
    code, text = verify(altered, "--against-teacher", "--rows", 8)
    assert code == 1 and "top-K entry 0" in text and "the teacher's" in text, text


def test_another_model_is_named_and_compared(built):
    caches, other = built
    code, text = verify(caches["mine"], "--against-teacher", "--rows", 8, "--model", other)
    assert code == 1, text
    assert f"note: the weights of {other} are not those the cache records" in text


def test_rows_are_chosen_by_the_seed(built):
    caches, _ = built
    reader = CacheReader(str(caches["mine"]))
    total = reader.manifest.totals["num_tokens"]
    a, b, c = choose_rows(reader, 10, 5), choose_rows(reader, 10, 5), choose_rows(reader, 10, 6)
    assert a == b != c and len(set(a)) == 10 and a == sorted(a)
    assert len(choose_rows(reader, total + 100, 0)) == total
    assert all(0 <= row < reader.shards[s].num_tokens for s, row in a)


def test_a_teacher_not_on_this_machine_is_a_clear_error(built, tmp_path):
    caches, _ = built
    moved = tmp_path / "moved"
    shutil.copytree(caches["mine"], moved)
    teacher = dict(CacheReader(str(moved)).manifest.teacher, path=str(tmp_path / "nowhere"))
    rewrite_header(moved, teacher)
    code, text = verify(moved, "--against-teacher")
    assert code == 1 and "is not on this machine" in text and "pass --model (the teacher's folder)" in text, text


def test_stored_top_k_entries_are_compared_on_the_scale_of_their_codes():
    """A stored entry is a sqrt-probability code (storage_layout.md 3.1): entries of small probability come back up to
    a few nats off in log space (below the smallest level, stored as it), which a row written by the writer from the
    teacher's own values must pass; an entry moved by half a nat does not."""
    from cacher.verify_teacher import ABSOLUTE, RELATIVE, compare_row
    from shared.topk_codec import prob_levels
    from shared.writer import validate_shard_arrays

    vocab, top_k = 4000, 64
    logits = np.random.default_rng(0).normal(0, 2, vocab)
    logits[:5] += 16  # a peaked teacher: the other entries of its top K have probabilities near 1e-5
    logp = logits - np.log(np.exp(logits).sum())  # (V,)
    ids = np.argsort(-logp)[:top_k]
    arrays = {"input_ids": np.array([0, ids[0]]), "offsets": np.array([0, 2]), "loss_mask": np.array([True, False]),
              "topk_ids": np.stack([ids, ids]), "topk_logprobs": np.stack([logp[ids], logp[ids]]),
              "target_logprob": np.array([logp[ids[0]], 0.0]), "tail_logprob": np.full(2, np.log1p(-np.exp(logp[ids]).sum()))}
    stored = validate_shard_arrays(arrays, vocab_size=vocab, top_k=top_k, where="test")  # what a reader returns
    truth, absolute = np.stack([logp, logp]), ABSOLUTE["hf", "float32"]
    off = np.abs(stored["topk_logprobs"][0].astype(np.float64) - logp[ids])
    assert (off > RELATIVE * np.abs(logp[ids]) + absolute).any()  # a log-space tolerance would refuse this row
    assert compare_row(stored, truth, 0, vocab, absolute, prob_levels(top_k)) == (None, pytest.approx(off.max()))
    stored["topk_logprobs"] = stored["topk_logprobs"].copy()
    stored["topk_logprobs"][0, 3] -= 0.5
    problem, _ = compare_row(stored, truth, 0, vocab, absolute, prob_levels(top_k))
    assert problem.startswith(f"top-K entry 3, id {ids[3]}: stored log-probability")
