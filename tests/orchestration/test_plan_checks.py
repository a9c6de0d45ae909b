"""What a plan is checked for before any stage runs: every stage's settings, as its own command checks them;
how a plan file is read; which code its stages run."""

import os

import pytest
import yaml
from typer.testing import CliRunner

from cli.kdtrain import app
from orchestration import runner as plan_runner
from orchestration.checks import check_plan
from orchestration.plan import MAX_PLAN_BYTES, MAX_PLAN_DEPTH, PlanError, load_plan, parse_plan
from orchestration.runner import run_plan, run_stage
from orchestration.stages import stages_of
from orchestration.state import assess

runner = CliRunner()


def plan_spec(**over):
    spec = {"name": "p", "teacher": {"model": "gpt2"}, "data": {"dataset": "builtin:pydoc-topics"},
            "students": {"a": {"keep_layers": 2}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]]}
    spec.update(over)
    return spec


def test_a_bad_loss_is_refused_at_start_naming_the_key_and_the_choices(tmp_path, monkeypatch):
    """Issue 13 item 2: `loss: kl` used to be refused by stage 2, after the teacher cache was built."""
    ran = []
    monkeypatch.setattr(plan_runner, "run_stage", lambda command, *a, **k: ran.append(command) or 0)
    plan = parse_plan(plan_spec(train={"loss": "kl"}), out=str(tmp_path / "out"))
    with pytest.raises(PlanError) as err:
        run_plan(plan, log=lambda m: None)
    assert str(err.value).startswith("plan: train.loss must be one of ")
    assert "'kl'" in str(err.value) and "fkl" in str(err.value) and "jsd" in str(err.value)
    assert ran == [] and not (tmp_path / "out").exists()  # nothing ran, nothing was written
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_spec(train={"loss": "kl"})))
    res = runner.invoke(app, ["chain", str(path), "--dry-run", "--out", str(tmp_path / "dry")])
    assert res.exit_code == 2 and "train.loss" in res.output and "fkl" in res.output


@pytest.mark.parametrize("change,message", [
    ({"train": {"steps": 0}}, "plan: train.steps must be >= 1, got 0 (stage train:teacher__a)"),
    ({"train": {"alpha": 2}}, "plan: train.alpha must be in [0, 1] (it weighs CE against KD), got 2.0"),
    ({"train": {"loss": "jsd", "beta": 1.0}}, "plan: train.beta must be in (0, 1) for train.loss jsd"),
    ({"train": {"lr": "fast"}}, "plan: train.lr is a number; got 'fast'"),
    ({"train": {"steps": 2.5}}, "plan: train.steps is a whole number; got 2.5"),
    ({"train": {"bf16": "yes"}}, "plan: train.bf16 is true or false; got 'yes'"),
    ({"train": {"eval_fraction": 1.5}}, "plan: train.eval_fraction must be in [0, 1), got 1.5"),
    ({"cache": {"top_k": 0}}, "plan: cache.top_k must be >= 1, got 0 (stage cache:teacher)"),
    ({"cache": {"engine": "tpu"}}, "plan: cache.engine must be one of auto, hf, vllm; got 'tpu'"),
    ({"cache": {"tail_samples": 8, "engine": "vllm"}}, ("plan: cache.tail_samples needs the hf engine: vLLM returns "
                                                        "only the top log-probs of a prompt, not its full "
                                                        "distribution. Pass cache.engine hf, or drop "
                                                        "cache.tail_samples")),
    ({"data": {"dataset": "x.jsonl", "input_field": "context"}}, ("plan: data.input_field applies to "
                                                                  "prompt/response data: give data.prompt_field")),
    ({"eval": {"metrics": ["rouge"]}}, ("needs eval.prompt_field and eval.response_field (prompts and references) "
                                        "(stage eval")),
    ({"eval": {"max_length": 1}}, "plan: eval.max_length must be >= 2, got 1"),
])
def test_every_stage_setting_is_checked_by_its_commands_dataclass(change, message):
    with pytest.raises(PlanError) as err:
        check_plan(parse_plan(plan_spec(**change), out="/nonexistent/out"))
    assert message in str(err.value)


def test_values_are_read_as_the_command_line_reads_them():
    """YAML reads 1e-3 as a string; the command line (and so the plan) reads it as the number it is."""
    plan = parse_plan(plan_spec(train={"lr": "1e-3", "steps": "30"}), out="/nonexistent/out")
    assert check_plan(plan) == []
    train = next(st for st in stages_of(plan) if st.id == "train:teacher__a")
    command = assess(plan, train, {}).command
    assert command[command.index("--lr") + 1] == "0.001" and command[command.index("--steps") + 1] == "30"


# ---------------------------------------------------------------------------------------------
# Loading a plan file with bounded resources; stages run the installed kdcache


def test_nested_aliases_are_refused_before_they_expand(tmp_path):
    """Issue 14 class 6: a few hundred bytes of nested aliases expand to 9**levels nodes once anything walks them."""
    lines = ['name: laughs', 'teacher: {model: gpt2}', 'students: {s: {keep_layers: 1}}', 'paths: [[s]]',
             'l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 6)]
    lines += ["eval: {metrics: [ppl], seeds: *l5}"]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    with pytest.raises(PlanError, match=r"an alias \(\*l0\) at line 6, column 10; plans may not use YAML anchors"):
        load_plan(str(path))
    res = runner.invoke(app, ["chain", str(path), "--dry-run"])
    assert res.exit_code == 2 and "alias" in res.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["too large", "too deep", "fifo", "not utf-8"])
def test_plan_files_are_read_within_bounds(tmp_path, kind):
    path = tmp_path / "plan.yaml"
    if kind == "too large":
        path.write_text("# padding\n" * (MAX_PLAN_BYTES // 10 + 1) + "name: big\n")
        message = f"is larger than {MAX_PLAN_BYTES} bytes"
    elif kind == "too deep":
        path.write_text("name: deep\neval: {seeds: " + "[" * 40 + "1" + "]" * 40 + "}\n")
        message = f"collections nested deeper than {MAX_PLAN_DEPTH} at line 2"
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
        message = "is not a regular file"
    else:
        path.write_bytes(b"name: \xff\xfe\n")
        message = "is not UTF-8 text"
    with pytest.raises(PlanError, match=message):
        load_plan(str(path))


def test_a_stage_runs_the_installed_kdcache_whatever_the_working_directory(tmp_path, monkeypatch):
    """Issue 14 class 6: `python -m cli.kdcache` run from a folder holding cli/ or shared/ imported those."""
    touched = tmp_path / "poisoned"
    cwd = tmp_path / "cwd"
    for package in ("cli", "shared", "common", "cacher", "trainer", "orchestration"):
        (cwd / package).mkdir(parents=True)
        (cwd / package / "__init__.py").write_text(f"open({str(touched)!r}, 'a').write('{package}\\n')\n"
                                                   "raise SystemExit(99)\n")
    monkeypatch.chdir(cwd)
    plan = parse_plan(plan_spec(), out=str(tmp_path / "out"))
    for stage in stages_of(plan)[:2]:  # kdcache build, kdtrain run: each asked only for its --help
        log = tmp_path / f"{stage.kind}.log"
        assert run_stage(stage.command + ["--help"], str(log), dict(os.environ)) == 0, log.read_text()
        assert "Usage" in log.read_text() and "--out" in log.read_text()
    assert not touched.exists()
