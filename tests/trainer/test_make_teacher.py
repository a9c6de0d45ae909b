"""`kdtrain make-teacher`: a teacher made on the spot, the same for the same settings, in a kdtrain run folder."""

import json

import pytest
from typer.testing import CliRunner

from cli.kdtrain import app
from common.models import weights_sha256
from tests.conftest import GSM8K, SHAKESPEARE

runner = CliRunner()
SMALL = ["--layers", "2", "--width", "32", "--vocab-size", "300", "--steps", "3", "--max-length", "32",
         "--batch-tokens", "256", "--warmup-steps", "1"]


def make(out, *extra):
    return runner.invoke(app, ["make-teacher", "--dataset", str(SHAKESPEARE), "--out", str(out), *SMALL, *extra])


def test_a_made_teacher_is_a_model_folder_and_the_same_settings_make_the_same_teacher(tmp_path):
    res = make(tmp_path / "a")
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "owner.json"):
        assert (tmp_path / "a" / name).is_file()
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["status"] == "complete" and run["steps"] == 3 and run["config"]["loss"] == "ce"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (2, 32, 300)
    assert make(tmp_path / "b").exit_code == 0
    assert weights_sha256(tmp_path / "a") == weights_sha256(tmp_path / "b")
    assert make(tmp_path / "c", "--seed", "1").exit_code == 0
    assert weights_sha256(tmp_path / "c") != weights_sha256(tmp_path / "a")


def test_a_teacher_of_prompt_response_data_and_a_rerun_into_its_folder(tmp_path):
    out = tmp_path / "t"
    args = ["make-teacher", "--dataset", str(GSM8K), "--prompt-field", "question", "--response-field", "answer",
            "--prompt-template", "plain", "--limit", "16", "--out", str(out), *SMALL[:-4], "--max-length", "256",
            "--batch-tokens", "1024"]
    assert runner.invoke(app, args).exit_code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["fields"] == {"prompt": "question", "response": "answer"}
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "is not empty; pass --resume" in " ".join(res.output.split())
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("extra,message", [
    pytest.param(["--width", "40"], "--width must be a positive multiple of 32", id="width"),
    pytest.param(["--prompt-field", "question"], "--prompt-field and --response-field go together",
                 id="prompt without response"),
    pytest.param(["--vocab-size", "200"], "--vocab-size must be in [259, 65536]", id="vocabulary too small"),
])
def test_settings_a_teacher_cannot_have_are_refused_naming_the_flag(tmp_path, extra, message):
    res = make(tmp_path / "x", *extra)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "x").exists()
