"""Plans: parsing and validation, the shipped GPU plans by --dry-run, the tiny plan end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from cli.kdtrain import app
from tests.conftest import REPO_ROOT
from trainer.chain import PlanError, load_plan, nodes_of, parse_plan, stages_of

runner = CliRunner()
EXAMPLES = REPO_ROOT / "examples"


def base_plan(**over):
    plan = {"name": "p", "teacher": {"model": "gpt2"}, "data": {"dataset": "builtin:pydoc-topics"},
            "students": {"a": {"keep_layers": 2}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]]}
    plan.update(over)
    return plan


def test_stages_share_prefixes_and_train_before_caching():
    plan = parse_plan(base_plan(paths=[["a", "s"], ["s"], ["a"]]), out="/tmp/x")
    assert nodes_of(plan) == ["teacher>a", "teacher>s", "teacher>a>s"]
    ids = [s.id for s in stages_of(plan)]
    assert ids.count("train:teacher__a") == 1
    assert ids.index("train:teacher__a") < ids.index("cache:teacher__a") < ids.index("train:teacher__a__s")
    assert "train:ce-a" in ids and "train:ce-s" in ids and "eval:teacher" in ids
    # students start from the same init on every path: a layer-dropped copy of the plan's teacher
    train_s = next(s for s in stages_of(plan) if s.id == "train:teacher__a__s")
    assert train_s.command[train_s.command.index("--teacher") + 1] == "{teacher_folder}"  # resolved at run time


@pytest.mark.parametrize("change,message", [
    ({"studnets": {}}, "unknown key(s) ['studnets']"),
    ({"paths": []}, "paths must be a non-empty list"),
    ({"paths": [["a", "s", "a"]]}, "a cycle"),
    ({"paths": [["teacher", "s"]]}, "lists the teacher"),
    ({"paths": [["x"]]}, "'x', which is not a student"),
    ({"students": {"a": {"keep_layers": 2, "model": "gpt2"}}}, "exactly one of"),
    ({"train": {"lr": 1, "epocs": 2}}, "unknown key(s) ['epocs'] in train"),
    ({"eval": {"metrics": ["bleu"]}}, "eval.metrics has unknown ['bleu']"),
])
def test_bad_plans(change, message):
    with pytest.raises(PlanError) as err:
        parse_plan(base_plan(**change))
    assert message in str(err.value)


def test_unknown_key_lists_valid_ones(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(base_plan(teachr={"model": "x"})))
    res = runner.invoke(app, ["chain", str(path), "--dry-run"])
    assert res.exit_code == 2 and "teachr" in res.output and "students" in res.output


@pytest.mark.parametrize("name", ["gpt2_dolly_chain.yaml", "qwen_gsm8k_chain.yaml", "tiny_chain.yaml"])
def test_shipped_plans_dry_run(name, tmp_path):
    res = runner.invoke(app, ["chain", str(EXAMPLES / name), "--dry-run", "--json", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert any(r["kind"] == "cache" and r["cache_state"] == "missing" for r in rows)
    assert all(not r["done"] for r in rows)


def test_paper_plan_shape():
    plan = load_plan(str(EXAMPLES / "gpt2_dolly_chain.yaml"))
    assert plan.teacher["model"] == "gpt2-xl"
    assert ["large", "medium", "base"] in plan.paths and ["base"] in plan.paths
    assert "rouge" in plan.eval["metrics"] and plan.eval["split"] == "train[-500:]"


@pytest.mark.slow
def test_tiny_chain_end_to_end_and_resume(tmp_path):
    teacher = tmp_path / "tiny-teacher"
    subprocess.run([sys.executable, str(EXAMPLES / "make_tiny_teacher.py"), str(teacher), "--steps", "60"], check=True,
                   cwd=REPO_ROOT, capture_output=True)
    out = tmp_path / "run"
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    paths = {r["path"]: r["metrics"] for r in report["rows"]}
    assert set(paths) >= {"teacher", "teacher → student", "teacher → assistant → student", "CE baseline (student)"}
    assert all("ppl" in m and "top-1 agr." in m for m in paths.values())
    for png in ("loss_curves.png", "metric_ppl.png", "agreement_along_chain.png"):
        assert (out / png).stat().st_size > 1000
    assert "| teacher → assistant → student |" in (out / "report.md").read_text()
    # the teacher cache was built once and is reused by cache_key
    caches = sorted(os.listdir(out / "caches"))
    assert caches == ["tiny-chain__teacher", "tiny-chain__teacher__assistant"]
    # a second run recomputes nothing
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    assert res.exit_code == 0 and res.output.count("done earlier, skipped") == len(
        stages_of(load_plan(str(EXAMPLES / "tiny_chain.yaml"), out=str(out))))
    # a half-done plan resumes: remove the last stages' markers and one run
    shutil.rmtree(out / "runs" / "ce-student")
    for marker in (out / "stages").glob("*ce-student*"):
        marker.unlink()
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    assert res.exit_code == 0 and "train:ce-student: " in res.output and "cache:teacher: done earlier" in res.output


def test_stage_runner_reports_the_running_stages_last_log_line(tmp_path):
    from trainer.chain import _run_stage

    script = "import sys, time\nfor i in range(6):\n    print(f'step {i}/6', flush=True)\n    time.sleep(0.15)\n"
    seen = []
    log_path = str(tmp_path / "stage.log")
    rc = _run_stage([sys.executable, "-c", script], log_path, dict(os.environ), seen.append, poll_s=0.05)
    assert rc == 0
    assert any(line.startswith("step ") for line in seen), seen
    assert open(log_path).read().splitlines()[-1] == "step 5/6"


def test_stage_runner_stops_the_stage_when_the_caller_is_interrupted(tmp_path):
    from trainer.chain import _run_stage

    pid_file = tmp_path / "pid"
    script = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"

    def interrupt(line):
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run_stage([sys.executable, "-c", script], str(tmp_path / "stage.log"), dict(os.environ), interrupt,
                   poll_s=0.05)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left running
        os.kill(pid, 0)


def test_plan_can_turn_the_target_bucket_off(tmp_path):
    plan = parse_plan(base_plan(train={"target_bucket": False}), out=str(tmp_path))
    train = next(s for s in stages_of(plan) if s.id == "train:teacher__s")
    assert "--no-target-bucket" in train.command
    default = parse_plan(base_plan(), out=str(tmp_path))
    assert not any("target-bucket" in c for s in stages_of(default) for c in s.command)


def test_plan_cache_tail_samples_reach_kdcache_build(tmp_path):
    plan = parse_plan(base_plan(cache={"top_k": 48, "tail_samples": 16}, train={"tail_samples": False}),
                      out=str(tmp_path))
    build = next(s for s in stages_of(plan) if s.kind == "cache")
    assert build.command[build.command.index("--tail-samples") + 1] == "16"
    train = next(s for s in stages_of(plan) if s.id == "train:teacher__s")
    assert "--no-tail-samples" in train.command
