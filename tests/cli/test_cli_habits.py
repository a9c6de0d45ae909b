"""What every command does alike: options generated from one settings dataclass (a new field shows in --help, the
plan schema and a stage's argv), -h and --version, no `<bool>` metavar, every option described, errors the user
can fix as one line while bugs keep their traceback, `kdcache ls` paths told apart, `kdtrain run --config`,
`kdtrain chain --set`, optional loggers checked before anything is written, Weights & Biases offline."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cacher.config import BuildConfig
from cli.kdcache import app as kdcache
from cli.kdtrain import app as kdtrain
from cli.options import typer_command
from orchestration import plan as plan_module
from orchestration.plan import load_plan, parse_plan, plan_schema
from orchestration.stages import stages_of
from trainer.config import EvalConfig, TrainConfig

runner = CliRunner()
KDCACHE_COMMANDS = ("build", "info", "verify", "ls", "finalize")
KDTRAIN_COMMANDS = ("run", "eval", "chain", "demo")


def one_line(output: str) -> str:
    return " ".join(output.split())


def plan_spec(**sections) -> dict:
    spec = {"name": "p", "teacher": {"model": "gpt2"}, "data": {"dataset": "builtin:pydoc-topics", "limit": 4},
            "students": {"s": {"keep_layers": 1}}, "paths": [["s"]], "baselines": False, "eval": {"metrics": ["ppl"]}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


# ---------------------------------------------------------------------------------------------
# One definition per setting


@dataclass
class BuildWithDummy(BuildConfig):
    dummy_knob: int = 7
    """A build knob added in one place only."""


@dataclass
class TrainWithDummy(TrainConfig):
    dummy_rate: float = 0.25
    """A training knob added in one place only."""


def test_a_new_field_shows_in_help_the_plan_schema_and_the_stage_argv(monkeypatch, tmp_path):
    """Issue 15's proof: a field added to the real BuildConfig / TrainConfig (in a fixture subclass) is an option of
    the generated command with its help, a key of the plan's section in the schema, and on the stage's command line;
    nothing else is written for it."""
    for cls, name, flag, about in ((BuildWithDummy, "dummy_knob", "--dummy-knob", "A build knob added in one place"),
                                   (TrainWithDummy, "dummy_rate", "--dummy-rate", "A training knob added in one")):
        app = typer.Typer(rich_markup_mode=None)
        app.command("go")(typer_command(cls, lambda config: None))
        app.command("other")(lambda: None)
        help_text = one_line(runner.invoke(app, ["go", "--help"], terminal_width=200).output)
        assert flag in help_text and about in help_text
    monkeypatch.setitem(plan_module.COMMAND_SETTINGS, "cache", BuildWithDummy)
    monkeypatch.setitem(plan_module.COMMAND_SETTINGS, "train", TrainWithDummy)
    schema = plan_schema()
    assert schema["cache"]["dummy_knob"] == {"type": "int", "default": 7, "required": False, "choices": None,
                                             "help": "A build knob added in one place only."}
    assert schema["train"]["dummy_rate"]["default"] == 0.25
    plan = parse_plan(plan_spec(cache={"dummy_knob": 9}, train={"dummy_rate": 0.5}), out=str(tmp_path))
    stages = {s.id: s for s in stages_of(plan)}
    build, train = stages["cache:teacher"].command, stages["train:teacher__s"].command
    assert build[build.index("--dummy-knob") + 1] == "9" and train[train.index("--dummy-rate") + 1] == "0.5"


def test_each_default_is_written_once():
    """The defaults the commands, the plans and the library share come from the dataclasses, not from copies."""
    from trainer.config import EVAL_FRACTION

    assert TrainConfig(out="o", cache="c", student="s").eval_fraction == EVAL_FRACTION
    for path in ("cli/kdtrain.py", "orchestration/plan.py", "orchestration/stages.py", "trainer/evaluate.py",
                 "trainer/data.py", "trainer/train.py"):
        assert "0.05" not in Path(path).read_text(), path  # the held-out fraction
    for path in ("cli/kdcache.py", "orchestration/plan.py", "cacher/build.py"):
        assert not any(f"{flag}" in Path(path).read_text() for flag in ('"--top-k"', '"--max-length"')), path


# ---------------------------------------------------------------------------------------------
# Habits


@pytest.mark.parametrize("app,command",
                         [(kdcache, c) for c in KDCACHE_COMMANDS] + [(kdtrain, c) for c in KDTRAIN_COMMANDS])
def test_short_help_and_no_bool_metavar(app, command):
    res = runner.invoke(app, [command, "-h"], terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "<bool>" not in res.output.lower() and "BOOLEAN" not in res.output


@pytest.mark.parametrize("app,tool", [(kdcache, "kdcache"), (kdtrain, "kdtrain")])
def test_version(app, tool):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"{tool} {importlib.metadata.version('kdcache')}"


@pytest.mark.parametrize("command", ["eval", "run"])
def test_every_option_is_described(command):
    click_command = typer.main.get_command(kdtrain).commands[command]
    options = [p for p in click_command.params if p.param_type_name == "option" and not p.hidden]
    undescribed = [p.opts[0] for p in options if not (p.help or "").strip()]
    assert options and undescribed == []


def test_errors_name_flags_and_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import cacher.build

    res = runner.invoke(kdcache, ["build", "--top-k", "0", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and one_line(res.output) == "error: --top-k must be >= 1, got 0"

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cacher.build, "build", bug)
    res = runner.invoke(kdcache, ["build", "--out", str(tmp_path / "c")])
    assert isinstance(res.exception, RuntimeError) and res.exit_code == 1 and "error:" not in res.output


def test_ls_paths_are_whole_on_a_narrow_terminal(tmp_path):
    from tests.shared.fakes import write_cache

    names = [f"plan__teacher-with-a-long-name-{suffix}" for suffix in ("1a2b3c4d", "9f8e7d6c")]
    for name in names:
        write_cache(str(tmp_path / name), num_shards=1)
    res = runner.invoke(kdcache, ["ls", str(tmp_path)], terminal_width=80)
    assert res.exit_code == 0, res.output
    for name in names:
        assert name in res.output, res.output


# ---------------------------------------------------------------------------------------------
# kdtrain run --config, kdtrain chain --set


@pytest.fixture
def captured(monkeypatch) -> list:
    """The TrainConfig kdtrain run would train with (trainer.train.train replaced)."""
    import trainer.train

    seen = []
    monkeypatch.setattr(trainer.train, "train", lambda config, **kw: seen.append(config) or {"status": "stopped"})
    return seen


def test_run_config_file_with_flags_overriding_it(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text("out: runs/from-file\ncache: caches/c\nstudent_from_teacher: true\nkeep_layers: 2\nlr: 3e-4\n"
                    "loss: jsd\nsteps: 10\n")
    res = runner.invoke(kdtrain, ["run", "--config", str(path), "--steps", "20", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    config = captured[0]
    assert (config.lr, config.loss, config.keep_layers, config.student_from_teacher) == (3e-4, "jsd", 2, True)
    assert config.steps == 20 and config.out == str(tmp_path / "o")  # given on the command line: they win
    assert config.epochs == TrainConfig.epochs  # in neither: the default


@pytest.mark.parametrize("text,message", [
    ("out: o\ncache: c\nstudent: s\nlr: fast\n", "lr in {path} is a number; got 'fast'"),
    ("out: o\ncache: c\nstudent: s\nlearning_rate: 0.1\n", "unknown setting(s) learning_rate in {path}; valid: "),
    ("cache: c\nstudent: s\n", "--out must be given"),
    ("- a list\n", "{path} must be a mapping of settings, got list"),
    ("a: &x 1\nb: *x\n", "config file {path}: an alias (*x)"),
], ids=["ill-typed", "unknown key", "no out", "not a mapping", "alias"])
def test_run_config_file_refusals(tmp_path, captured, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    res = runner.invoke(kdtrain, ["run", "--config", str(path)])
    assert res.exit_code == 2 and message.format(path=path) in one_line(res.output), res.output
    assert captured == []


def test_chain_set_overrides_plan_values(tmp_path, monkeypatch):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_spec(train={"lr": 1e-3})))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text('{"text": "to be or not to be"}\n')
    plan = load_plan(str(path), overrides=["train.lr=3e-4", "data.dataset=./mine.jsonl", "students.s.keep_layers=2",
                                           "cache.top_k=8"])
    assert plan.train["lr"] == "3e-4" and plan.data["dataset"] == str(tmp_path / "mine.jsonl")
    assert plan.students["s"] == {"keep_layers": 2} and plan.cache == {"top_k": 8}
    train = next(s for s in stages_of(plan) if s.id == "train:teacher__s").command
    assert train[train.index("--lr") + 1] == "0.0003"


@pytest.mark.parametrize("override,message", [
    ("train.loss=kl", "plan: train.loss must be one of fkl, rkl, jsd, skl, srkl, tvd, ce; got 'kl'"),
    ("train.learning_rate=1", "plan: unknown key(s) ['learning_rate'] in train"),
    ("train", "plan override 'train': write SECTION.KEY=VALUE, e.g. train.lr=3e-4"),
    ("name.x=1", "plan override 'name.x=1': name is not a section of the plan"),
], ids=["checked", "unknown key", "no value", "not a section"])
def test_chain_set_refusals(tmp_path, override, message):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_spec()))
    res = runner.invoke(kdtrain, ["chain", str(path), "--dry-run", "--set", override, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in one_line(res.output), res.output
    assert not (tmp_path / "o").exists()


def test_chain_schema_lists_every_section():
    res = runner.invoke(kdtrain, ["chain", "--schema"])
    assert res.exit_code == 0, res.output
    schema = json.loads(res.stdout)
    assert schema["cache"]["top_k"]["default"] == BuildConfig.top_k and "lr" in schema["train"]
    assert schema["eval"]["metrics"]["type"] == "list of str" and "model" in schema["teacher"]
    assert set(schema["data"]) >= {"dataset", "split", "prompt_template", "max_length"}
    assert "out" not in schema["train"] and "overwrite" not in schema["cache"]  # set by the chain, not by a plan


# ---------------------------------------------------------------------------------------------
# Optional loggers


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir):
    from tests.trainer.teacher_cache import write_teacher_cache

    return write_teacher_cache(str(tmp_path_factory.mktemp("habits-cache") / "c"), tiny_gpt2_dir, num_sequences=20,
                               shard_tokens=800)


RUN = ("--student-from-teacher", "--keep-layers", "1", "--steps", "2", "--batch-tokens", "256")


@pytest.mark.parametrize("flag,extra", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_missing_logger_is_refused_before_anything_is_written(monkeypatch, tmp_path, cache, flag, extra):
    """--tensorboard without its package used to fail after --out was written, so the rerun was refused as 'not
    empty'. Now it is refused first, naming the extra; the same command without the flag then runs."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a))
    out = tmp_path / "o"
    res = runner.invoke(kdtrain, ["run", "--cache", cache, "--out", str(out), *RUN, flag])
    assert res.exit_code == 2, res.output
    assert (f"{flag} needs the {extra} package, which is not installed: pip install 'kdcache[{extra}]'"
            in one_line(res.output))
    assert not out.exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    res = runner.invoke(kdtrain, ["run", "--cache", cache, "--out", str(out), *RUN])
    assert res.exit_code == 0, res.output


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install "
                                                                      "'kdcache[wandb]')")
def test_wandb_offline_logs_into_the_run_folder(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "o"
    res = runner.invoke(kdtrain, ["run", "--cache", cache, "--out", str(out), *RUN, "--wandb", "--wandb-project", "t"])
    assert res.exit_code == 0, res.output
    run_id = json.loads((out / "owner.json").read_text())["id"]
    runs = [p for p in (out / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert not json.loads((out / "run.json").read_text())["config"]["tensorboard"]
    res = runner.invoke(kdtrain, ["run", "--cache", cache, "--out", str(out), *RUN, "--overwrite"])
    assert res.exit_code == 0 and not (out / "wandb").exists()  # kdtrain's own name: replaced with the run


def test_eval_and_run_configs_are_importable_without_torch():
    """The CLI builds --help from these classes, so they import no torch (kdcache ls and -h stay fast)."""
    import subprocess
    import sys

    code = ("import sys, cacher.config, trainer.config, cli.kdcache, cli.kdtrain; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), check=True)
    assert out.stdout.strip() == "False"
    assert EvalConfig.__module__ == TrainConfig.__module__ == "trainer.config"
