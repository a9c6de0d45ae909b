"""`kdtrain generate`: which prompts (the teacher cache's held-out rule), seeded responses, the file it writes."""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from cli.kdtrain import app
from tests.conftest import GSM8K

runner = CliRunner()


def generate(out, model, *extra):
    args = ["generate", "--model", str(model), "--dataset", str(GSM8K), "--prompt-field", "question",
            "--response-field", "answer", "--limit", "24", "--max-length", "512", "--max-new-tokens", "8",
            "--out", str(out), *extra]
    return runner.invoke(app, [str(a) for a in args])


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def heldout_by_hand(eval_fraction: float, limit: int) -> set[int]:
    """The held-out rule of docs/runs-and-plans.md 2 written out for (question, answer) rows 0..limit-1."""
    held = set()
    with open(GSM8K) as f:
        for index, line in zip(range(limit), f):
            row = json.loads(line)
            text = hashlib.sha256((row["question"] + "\0" + row["answer"] + "\0").encode()).hexdigest()
            value = int(hashlib.sha256(f"{text}:{index}:0".encode()).hexdigest()[:8], 16)
            if value % 10_000 < round(eval_fraction * 10_000):
                held.add(index)
    return held


def test_train_and_heldout_prompts_split_by_the_caches_rule(tmp_path, tiny_gpt2_dir):
    for which in ("train", "heldout"):
        res = generate(tmp_path / f"{which}.jsonl", tiny_gpt2_dir, "--prompts", which, "--eval-fraction", "0.25")
        assert res.exit_code == 0, res.output
    train = {r["source_index"] for r in rows_of(tmp_path / "train.jsonl")}
    held = {r["source_index"] for r in rows_of(tmp_path / "heldout.jsonl")}
    assert held == heldout_by_hand(0.25, 24) and held and train == set(range(24)) - held


def test_rows_record_what_wrote_them_and_the_same_settings_give_the_same_file(tmp_path, tiny_gpt2_dir):
    out = tmp_path / "s.jsonl"
    assert generate(out, tiny_gpt2_dir, "--num-samples", "2", "--round", "1", "--keep-layers", "1").exit_code == 0
    rows = rows_of(out)
    assert len(rows) == 2 * len({r["source_index"] for r in rows})
    first = rows[0]
    with open(GSM8K) as f:
        assert first["prompt"] == json.loads(f.readline())["question"]
    assert first["round"] == 1 and first["keep_layers"] == 1 and first["generated_by"] == "kdtrain generate"
    assert len(first["model_sha256"]) == 64 and 1 <= len(first["response_ids"]) <= 8
    assert {r["sample"] for r in rows} == {0, 1}
    again = tmp_path / "again.jsonl"
    assert generate(again, tiny_gpt2_dir, "--num-samples", "2", "--round", "1", "--keep-layers", "1").exit_code == 0
    assert out.read_text() == again.read_text()
    assert generate(again, tiny_gpt2_dir, "--num-samples", "2", "--round", "2", "--keep-layers", "1",
                    "--overwrite").exit_code == 0
    assert [r["response_ids"] for r in rows_of(again)] != [r["response_ids"] for r in rows]  # round 2: other seeds


@pytest.mark.parametrize("case,extra,message", [
    ("train prompts need references", ["--prompts", "train", "--response-field", ""], None),
    ("greedy with samples", ["--temperature", "0", "--num-samples", "2"], "greedy decoding (--temperature 0)"),
    ("negative round", ["--round", "-1"], "--round must be >= 0"),
])
def test_bad_settings_are_refused_naming_the_flag(tmp_path, tiny_gpt2_dir, case, extra, message):
    if case == "train prompts need references":
        res = runner.invoke(app, ["generate", "--model", str(tiny_gpt2_dir), "--dataset", str(GSM8K),
                                  "--prompt-field", "question", "--out", str(tmp_path / "x.jsonl")])
        message = "--prompts train chooses prompts by the held-out rule over (prompt, reference): give --response-field"
    else:
        res = generate(tmp_path / "x.jsonl", tiny_gpt2_dir, *extra)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "x.jsonl").exists()


def test_an_existing_out_is_replaced_only_when_asked_and_only_when_generate_wrote_it(tmp_path, tiny_gpt2_dir):
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "data"}\n')
    res = generate(mine, tiny_gpt2_dir)
    assert res.exit_code == 2 and "exists; pass --overwrite" in " ".join(res.output.split())
    res = generate(mine, tiny_gpt2_dir, "--overwrite")
    assert res.exit_code == 2 and "was not written by kdtrain generate" in " ".join(res.output.split())
    assert mine.read_text() == '{"my": "data"}\n'
    ours = tmp_path / "samples.jsonl"
    assert generate(ours, tiny_gpt2_dir).exit_code == 0
    assert generate(ours, tiny_gpt2_dir, "--overwrite", "--seed", "5").exit_code == 0
