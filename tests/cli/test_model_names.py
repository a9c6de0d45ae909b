"""One rule for model names in every command (common.models): a mistyped local path is "no such folder" at once.

`kdtrain eval --model runs/typo` spent 27 s in hub retries and ended in "check your internet connection";
`--model ./typo` said "Repo id must use alphanumeric chars". Each command now names the folder that does not
exist, without asking the hub.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.conftest import GSM8K, SHAKESPEARE

runner = CliRunner()


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding `runs/`, so that `runs/typo` is a mistyped path inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: a name the rule let through would go to the hub
    return tmp_path


@pytest.mark.parametrize("name, reason", [("./typo", "starts with '.'"),
                                          ("runs/typo", "starts with the local folder runs/")],
                         ids=["./typo", "runs/typo"])
def test_kdtrain_eval_with_a_mistyped_model_path(name, reason, workdir, hub_calls):
    from cli.kdtrain import app

    res = runner.invoke(app, ["eval", "--model", name, "--dataset", str(SHAKESPEARE), "--metrics", "ppl",
                              "--limit", "2"])
    assert res.exit_code == 2, res.output
    assert f"error: model '{name}': no such folder (it {reason}, so it names a local path" in one_line(res.output)
    assert hub_calls == []


def test_kdtrain_run_with_a_mistyped_student_path(workdir, hub_calls):
    from cli.kdtrain import app

    res = runner.invoke(app, ["run", "--student", "runs/typo", "--dataset", str(SHAKESPEARE), "--loss", "ce",
                              "--steps", "1", "--out", str(workdir / "out")])
    assert res.exit_code == 2, res.output
    assert "error: model 'runs/typo': no such folder (it starts with the local folder runs/" in one_line(res.output)
    assert hub_calls == []


def test_kdcache_build_with_a_mistyped_model_path(workdir, hub_calls):
    from cli.kdcache import app

    res = runner.invoke(app, ["build", "--model", "./typo", "--dataset", str(GSM8K), "--text-field", "question",
                              "--limit", "2", "--out", str(workdir / "cache")])
    assert res.exit_code == 2, res.output
    assert "error: model './typo': no such folder (it starts with '.'" in one_line(res.output)
    assert hub_calls == [] and not (workdir / "cache").exists()
